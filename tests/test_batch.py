"""infer/batch.py: requests join and leave a running batch; each decodes as it would alone."""

from __future__ import annotations

import random

import pytest
import torch

from kotune.infer.batch import BatchDecoder, Sequence, supports_batching
from kotune.infer.fastgen import FastGenerator, _shortlist_head, convert_model


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=300, n_positions=256, n_embd=64, n_layer=2, n_head=2, initializer_range=0.2)
    return GPT2LMHeadModel(cfg)


def _gemma():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        initializer_range=0.2,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=256,
        sliding_window=16,  # shorter than most prompts here: the merge must keep each row's window right
        final_logit_softcapping=30.0,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    )
    return Gemma3ForCausalLM(cfg)


def _deepseek():
    # multi-head latent attention: keys and values of different widths in the cache and in attention
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    cfg = DeepseekV3Config(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=8,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        n_shared_experts=1,
        first_k_dense_replace=1,
        max_position_embeddings=256,
        initializer_range=0.2,
    )
    return DeepseekV3ForCausalLM(cfg)


PROMPT_LENGTHS = (5, 23, 11, 40, 3, 17)


def _prompts():
    rng = random.Random(0)
    return [[rng.randrange(5, 300) for _ in range(n)] for n in PROMPT_LENGTHS]


def _alone(engine, prompt, n):
    return engine.generate(torch.tensor([prompt]), max_new_tokens=n)[0, len(prompt) :].tolist()


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize("build", [_gpt2, _gemma, _deepseek], ids=["gpt2", "gemma3-sliding", "deepseek-mla"])
def test_greedy_output_is_the_same_alone_or_in_a_batch(build, precision):
    # bf16: the CPU's shortlist head, with a shortlist of 8 of the 300 tokens so that its approximate logits (int8,
    # the activations scaled per call) really differ between the two runs
    engine = FastGenerator(
        convert_model(build().eval(), precision, shortlist_head=precision == "bfloat16", shortlist=8)
    )
    assert supports_batching(engine)
    prompts = _prompts()
    alone = [_alone(engine, p, 30) for p in prompts]
    decoder = BatchDecoder(engine)
    seqs = [Sequence(p, 30) for p in prompts]
    waiting, step, widths = list(seqs), 0, []
    while waiting or len(decoder):
        if waiting and step % 4 == 0:  # join while others are mid-answer, with longer and shorter prompts
            decoder.add(waiting.pop(0))
        widths.append(len(decoder))
        decoder.step()
        step += 1
    assert max(widths) >= 4, "the requests must really have shared the batch"
    assert [s.new for s in seqs] == alone


def test_a_row_that_leaves_early_changes_no_other_row():
    engine = FastGenerator(convert_model(_gpt2().eval(), "bfloat16", shortlist_head=True))
    prompts = _prompts()
    alone = [_alone(engine, p, 20) for p in prompts]
    decoder = BatchDecoder(engine)

    def stop_after(n):
        def on_token(_):
            if len(seq_by_n[n].new) >= n:
                raise RuntimeError("client went away")

        return on_token

    seq_by_n = {}
    seqs = []
    for i, p in enumerate(prompts):
        s = Sequence(p, 20, on_token=stop_after(i + 3) if i % 2 else None)
        seq_by_n[i + 3] = s
        seqs.append(s)
        decoder.add(s)
    while len(decoder):
        decoder.step()
    for i, (s, want) in enumerate(zip(seqs, alone)):
        if i % 2:  # cancelled: ended with the callback's error, after a prefix of its own answer
            assert isinstance(s.error, RuntimeError) and s.new == want[: len(s.new)] and len(s.new) == i + 3
        else:
            assert s.error is None and s.new == want
    assert decoder.cache is None and decoder.mask is None  # nothing left behind


def test_each_row_keeps_its_own_stop_ids_budget_and_sampling():
    engine = FastGenerator(_gpt2().eval())
    prompts = _prompts()[:3]
    greedy_alone = _alone(engine, prompts[0], 12)
    stop = _alone(engine, prompts[1], 12)[4]  # a token the second row writes fifth
    decoder = BatchDecoder(engine)
    g = torch.Generator().manual_seed(0)
    seqs = [
        Sequence(prompts[0], 12),
        Sequence(prompts[1], 12, stop_ids=frozenset([stop])),
        Sequence(prompts[2], 7, do_sample=True, temperature=1.5, top_p=0.9, generator=g),
    ]
    for s in seqs:
        decoder.add(s)
    while len(decoder):
        decoder.step()
    assert seqs[0].new == greedy_alone
    assert seqs[1].new[-1] == stop and seqs[1].stopped and len(seqs[1].new) <= 5
    assert len(seqs[2].new) == 7 and not seqs[2].stopped


def test_the_shortlist_head_is_exact_on_its_shortlist_whatever_the_batch():
    torch.manual_seed(0)
    weight = torch.nn.Parameter((torch.randn(5000, 64) * 0.3).to(torch.bfloat16), requires_grad=False)
    head = _shortlist_head(weight, k=16)
    x = torch.randn(8, 1, 64).to(torch.bfloat16)
    with torch.inference_mode():
        together = head(x)[:, 0]
        alone = torch.cat([head(x[i : i + 1])[:, 0] for i in range(8)])
    exact = (x[:, 0].double() @ weight.double().T).float()  # fp64 products of the bf16 values, rounded once
    assert not torch.equal(together, alone)  # the approximate rest of the vocabulary differs (int8 scales per call) ...
    top = exact.topk(4).indices
    for row in (together, alone):  # ... the most likely tokens do not: bit for bit the exact logits
        assert torch.equal(row.gather(1, top), exact.gather(1, top))
    assert torch.equal(together.argmax(-1), exact.argmax(-1)) and torch.equal(alone.argmax(-1), exact.argmax(-1))


@pytest.mark.parametrize("headroom", [3, 256], ids=["runs-out-of-room", "room-ahead"])
@pytest.mark.parametrize("build", [_gpt2, _gemma, _deepseek], ids=["gpt2", "gemma3-sliding", "deepseek-mla"])
def test_the_cache_appends_in_place_and_decodes_as_concatenation_does(monkeypatch, build, headroom):
    import kotune.infer.batch as batch
    import kotune.infer.fastgen as fastgen

    engine = FastGenerator(convert_model(build().eval(), "float32"))
    prompts = _prompts()
    monkeypatch.setattr(fastgen, "appending", lambda cache: cache)  # the dynamic cache's own torch.cat
    concatenated = [_alone(engine, p, 30) for p in prompts]
    monkeypatch.undo()
    monkeypatch.setattr(batch, "HEADROOM", headroom)
    assert [_alone(engine, p, 30) for p in prompts] == concatenated
    decoder = BatchDecoder(engine)
    seqs = [Sequence(p, 30) for p in prompts]
    for s in seqs[:3]:
        decoder.add(s)
    buffers = []
    for _ in range(6):
        decoder.step()
        buffers.append([layer._kbuf.data_ptr() for layer in decoder.cache.layers])
    moves = sum(a != b for a, b in zip(buffers, buffers[1:]))
    assert (moves > 0) == (headroom == 3)  # with room ahead every step writes into the same buffers
    for s in seqs[3:]:
        decoder.add(s)
    while len(decoder):
        decoder.step()
    assert [s.new for s in seqs] == concatenated
