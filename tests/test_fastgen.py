"""Fast inference engine: same tokens as `generate`, casts that run, GGUF export, llama.cpp engine."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from kotune.infer.fastgen import FastGenerator, convert_model, load_engine, load_fast
from kotune.infer.generate import Chatbot
from kotune.infer.sampling import warp_scores
from kotune.model import load_run

QUESTIONS = ["전세권이란?", "대항력은 언제 생기나요 아주 길게 물어봅니다?", "계약금"]


def _prompts(bot: Chatbot) -> list[list[int]]:
    return [bot.prompt_ids(q) for q in QUESTIONS]


def _hf_generate(model, ids, mask, tok, **kw):
    with torch.inference_mode():
        return model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=10,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            **kw,
        )


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_tokens_equal_hf_generate(any_run, penalty):
    model, tok, _ = load_run(any_run)
    fast = FastGenerator(model, "float32")
    bot = Chatbot(fast, tok, "질문: {question}\n답변: {answer}", None)
    for p in _prompts(bot):
        ids = torch.tensor([p])
        want = _hf_generate(model, ids, torch.ones_like(ids), tok, repetition_penalty=penalty)
        got = fast.generate(
            ids,
            max_new_tokens=10,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            repetition_penalty=penalty,
        )
        assert got.tolist() == want.tolist()


def test_left_padded_batch_equals_hf_generate(any_run):
    model, tok, _ = load_run(any_run)
    fast = FastGenerator(model, "float32")
    rows = _prompts(Chatbot(fast, tok, "질문: {question}\n답변: {answer}", None))
    width = max(map(len, rows))
    pad = tok.pad_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    want = _hf_generate(model, ids, mask, tok, repetition_penalty=1.1)
    got = fast.generate(
        ids, mask, max_new_tokens=10, eos_token_id=tok.eos_token_id, pad_token_id=pad, repetition_penalty=1.1
    )
    assert got.tolist() == want.tolist()


def test_warped_scores_match_hf_processors():
    from transformers import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 3
    seen = torch.randint(0, 50, (3, 7))
    hf = LogitsProcessorList(
        [
            RepetitionPenaltyLogitsProcessor(1.2),
            TemperatureLogitsWarper(0.7),
            TopKLogitsWarper(20),
            TopPLogitsWarper(0.8),
        ]
    )
    want = hf(seen, logits.clone())
    got = warp_scores(logits, seen, repetition_penalty=1.2, do_sample=True, temperature=0.7, top_k=20, top_p=0.8)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert torch.allclose(got[~torch.isinf(got)], want[~torch.isinf(want)])


@pytest.mark.parametrize("precision,shortlist_head", [("bfloat16", False), ("bfloat16", True), ("int8", False)])
def test_reduced_precision_logits_stay_close(tiny_gemma_run, precision, shortlist_head):
    model, tok, _ = load_run(tiny_gemma_run)
    ids = torch.tensor([Chatbot(model, tok, "질문: {question}\n답변: {answer}", None).prompt_ids(QUESTIONS[1])])
    with torch.inference_mode():
        ref = model(input_ids=ids).logits[0, -1].float()
        low = convert_model(load_run(tiny_gemma_run)[0], precision, shortlist_head=shortlist_head)
        got = low(input_ids=ids).logits[0, -1].float()
    assert torch.nn.functional.cosine_similarity(ref, got, dim=0) > 0.99
    out = FastGenerator(low, precision).generate(ids, max_new_tokens=5, eos_token_id=tok.eos_token_id)
    assert out.shape[1] > ids.shape[1] and out[0, : ids.shape[1]].tolist() == ids[0].tolist()


def test_sampling_stops_at_eos_and_streams(tiny_run):
    eng, tok, _ = load_fast(tiny_run, "float32")
    ids = torch.tensor([Chatbot(eng, tok, "질문: {question}\n답변: {answer}", None).prompt_ids("전세권이란?")])
    torch.manual_seed(3)
    put = []

    class Recorder:
        def put(self, v):
            put.append(v.reshape(-1).tolist())

        def end(self):
            put.append("end")

    out = eng.generate(
        ids,
        streamer=Recorder(),
        max_new_tokens=20,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        do_sample=True,
        temperature=0.9,
        top_p=0.9,
        top_k=50,
        repetition_penalty=1.1,
    )
    new = out[0, ids.shape[1] :].tolist()
    assert put[0] == ids[0].tolist() and put[-1] == "end"
    assert [x for chunk in put[1:-1] for x in chunk] == new
    assert tok.eos_token_id not in new[:-1]  # nothing is generated after EOS


def test_engine_follows_config_and_overrides(tiny_run):
    eng, _, cfg = load_engine(tiny_run, precision="int8")
    assert isinstance(eng, FastGenerator) and eng.precision == "int8" and cfg.generation.backend == "torch"
    with pytest.raises(ValueError, match="unknown generation backend"):
        load_engine(tiny_run, backend="onnx")


# ---------------------------------------------------------------- GGUF export


def _template_gguf(model_dir, path, arch="gemma3"):
    """A GGUF holding the tiny Gemma's weights (F32, embeddings in Q8_0) under llama.cpp names."""
    import gguf
    from safetensors.torch import load_file

    from kotune.infer.gguf_export import hf_to_gguf_names

    name = hf_to_gguf_names(arch, 2)
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_block_count(2)
    w.add_string("tokenizer.ggml.model", "gpt2")
    for hf, t in load_file(str(model_dir / "model.safetensors")).items():
        g = name(hf)
        if g is None:
            continue
        arr = t.float().numpy()
        if g == "token_embd.weight":
            w.add_tensor(
                g, gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0
            )
        else:
            w.add_tensor(g, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_adapted_weights_equal_peft_merge(any_run):
    from kotune.infer.gguf_export import adapted_weights

    merged = load_run(any_run)[0].state_dict()
    weights = adapted_weights(any_run)
    assert weights
    for name, w in weights.items():
        assert torch.allclose(w, merged[name].float(), atol=1e-5), name


def test_export_writes_merged_gguf(tiny_gemma, tiny_gemma_run, tmp_path):
    import gguf
    from gguf.quants import dequantize

    from kotune.infer.gguf_export import adapted_weights, hf_to_gguf_names, write_merged_gguf

    template = _template_gguf(tiny_gemma, tmp_path / "base.gguf")
    name = hf_to_gguf_names("gemma3", 2)
    merged = {name(k): v for k, v in adapted_weights(tiny_gemma_run).items()}
    assert "blk.0.attn_q.weight" in merged and "blk.1.ffn_down.weight" in merged
    out = tmp_path / "run.gguf"
    stats = write_merged_gguf(template, merged, out, "q8_0")
    before, after = gguf.GGUFReader(str(template)), gguf.GGUFReader(str(out))
    assert [t.name for t in after.tensors] == [t.name for t in before.tensors]
    assert stats["replaced"] == len(merged) == 14
    assert after.fields["tokenizer.ggml.model"].contents() == "gpt2"
    old = {t.name: t for t in before.tensors}
    for t in after.tensors:
        if t.name in merged:
            assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
            got = dequantize(t.data, t.tensor_type)
            assert abs(got - merged[t.name].numpy()).max() < 0.02 * abs(merged[t.name].numpy()).max()
        else:  # untouched tensors are copied byte for byte, in their own type
            assert t.tensor_type == old[t.name].tensor_type and bytes(t.data) == bytes(old[t.name].data)


def test_export_refuses_a_non_gguf_base(tiny_run):
    from kotune.infer.gguf_export import ExportError, export_gguf

    with pytest.raises(ExportError, match="convert_hf_to_gguf"):
        export_gguf(tiny_run)


def test_llamacpp_backend_names_the_extra(tiny_run, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_llama(name, *a, **k):
        if name.startswith("llama_cpp"):
            raise ImportError("No module named 'llama_cpp'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_llama)
    with pytest.raises(ImportError, match=r"kotune\[llamacpp\]"):
        load_engine(tiny_run, backend="llamacpp")


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python not installed (extra `llamacpp`)"
)
def test_llamacpp_greedy_agrees_with_torch_on_the_default_base():
    """The shipped base GGUF run by llama.cpp and its fp32 conversion run by torch
    start their greedy answers with the same tokens (quantised compute drifts later)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kotune.infer.gguf_export import base_gguf
    from kotune.infer.llamacpp import LlamaCppGenerator
    from kotune.model import resolve_model

    path = resolve_model("gemma3-270m").path
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.tensor([tok("질문: 전세권이란 무엇인가요?\n답변:")["input_ids"]])
    kw = dict(max_new_tokens=4, eos_token_id=tok.eos_token_id, pad_token_id=0, repetition_penalty=1.0)
    want = FastGenerator(model, "float32").generate(ids, **kw)
    got = LlamaCppGenerator(base_gguf("gemma3-270m"), n_ctx=256).generate(ids, **kw)
    assert got[0, : ids.shape[1] + 2].tolist() == want[0, : ids.shape[1] + 2].tolist()


@pytest.mark.parametrize("weight", [0.5, 2.0])
def test_context_contrast_equals_hf_guidance(any_run, weight):
    """Context-aware decoding is `generate`'s classifier-free guidance with the articles-free prompt as the negative
    prompt: (1+w)·log p(y|prompt) − w·log p(y|contrast) = guidance_scale 1+w."""
    model, tok, _ = load_run(any_run)
    fast = FastGenerator(model, "float32")
    bot = Chatbot(fast, tok, "질문: {question}\n답변: {answer}", None)
    ids, neg = torch.tensor([bot.prompt_ids(QUESTIONS[1])]), torch.tensor([bot.prompt_ids("계약금")])
    want = _hf_generate(model, ids, torch.ones_like(ids), tok, guidance_scale=1 + weight, negative_prompt_ids=neg)
    got = fast.generate(
        ids,
        max_new_tokens=10,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        contrast_ids=neg,
        contrast_weight=weight,
    )
    assert got.tolist() == want.tolist()
    scores = []  # and the contrast does change the scores (on a random model the tokens may still agree)
    for w in (0.0, weight):
        fast.generate(
            ids,
            max_new_tokens=1,
            logits_processor=[lambda s, x: scores.append(x) or x],
            contrast_ids=neg,
            contrast_weight=w,
        )
    assert not torch.allclose(scores[0].log_softmax(-1), scores[1], atol=1e-3)


def test_context_contrast_batch_equals_single_rows(any_run):
    """Prompts and their contrast prompts of different lengths, left-padded in one batch: each row decodes as alone
    (positions follow the mask, which matters for GPT-2's absolute positions)."""
    model, tok, _ = load_run(any_run)
    fast = FastGenerator(model, "float32")
    bot = Chatbot(fast, tok, "질문: {question}\n답변: {answer}", None)
    rows, negs = _prompts(bot), [bot.prompt_ids(q[:2]) for q in reversed(QUESTIONS)]

    def left(batch):
        width = max(map(len, batch))
        return (
            torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in batch]),
            torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in batch]),
        )

    kw = dict(max_new_tokens=8, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, contrast_weight=1.0)
    (ids, mask), (neg, neg_mask) = left(rows), left(negs)
    batch = fast.generate(ids, mask, contrast_ids=neg, contrast_mask=neg_mask, **kw)
    for b, (r, n) in enumerate(zip(rows, negs)):
        one = fast.generate(torch.tensor([r]), contrast_ids=torch.tensor([n]), **kw)[0, len(r) :].tolist()
        got = batch[b, ids.shape[1] :].tolist()[: len(one)]
        assert got == one, f"row {b}"
