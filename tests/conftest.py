"""Tiny models built locally: nothing is downloaded.

`tiny_gpt2`: GPT-2 with a byte-level BPE tokenizer trained here with KoGPT2's
special tokens (`</s>` as bos/eos, `<pad>`, `<unk>`, `<mask>`).
`tiny_gemma`: a two-layer Gemma 3 text model sharing that tokenizer.
`kb_slice`: a fixed corner of the shipped statute KB (a `retrieval.kb_dir`) for the grounding tests.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).parent.parent


def qa_rows(n: int = 24) -> list[dict]:
    topics = [
        ("전세권", "전세권은 전세금을 내고 남의 부동산을 쓰는 물권입니다. (근거: 민법 제303조)"),
        ("대항력", "대항력은 주택 인도와 전입신고를 마친 다음 날부터 생깁니다. (근거: 주택임대차보호법 제3조)"),
        (
            "확정일자",
            "확정일자를 받으면 경매 때 후순위 채권자보다 먼저 보증금을 받습니다. (근거: 주택임대차보호법 제3조의2)",
        ),
        (
            "계약금",
            "어느 한쪽이 이행에 착수하기 전이면 계약금을 포기하거나 배액을 상환하고 "
            "해제할 수 있습니다. (근거: 민법 제565조)",
        ),
    ]
    rows = []
    for i in range(n):
        name, answer = topics[i % len(topics)]
        rows.append(
            {
                "question": f"{name}에 대해 알려주세요 {i}번?",
                "answer": answer,
                "category": "테스트",
                "difficulty": "초급",
            }
        )
    return rows


def write_csv(path: Path, rows: list[dict], encoding: str = "utf-8") -> Path:
    with path.open("w", encoding=encoding, newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def _train_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = [r["question"] + " " + r["answer"] for r in qa_rows(40)] + [
        "질문: 답변: 보증금 임대인 임차인 전세 월세 계약 해지 갱신 등기 경매 민법 주택임대차보호법 제 조 의",
    ]
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["</s>", "<pad>", "<unk>", "<mask>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(text * 5, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="</s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
    )
    fast.save_pretrained(folder)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("tiny_gpt2")
    _train_tokenizer(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=1024,
        n_embd=64,
        n_layer=2,
        n_head=2,
        initializer_range=0.2,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    GPT2LMHeadModel(cfg).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_gemma(tmp_path_factory) -> Path:
    import torch
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    folder = tmp_path_factory.mktemp("tiny_gemma")
    _train_tokenizer(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        initializer_range=0.2,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=1024,
        sliding_window=64,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        final_logit_softcapping=30.0,
    )
    Gemma3ForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture
def qa_csv(tmp_path) -> Path:
    return write_csv(tmp_path / "qa.csv", qa_rows())


def tiny_config(model_dir: Path, data_file: Path, out: Path, **sections):
    """A config for a few fast steps on a tiny model (sections may include `model`)."""
    from kotune.config import load_config

    sets = [
        f"model.name={model_dir}",
        f"model.output_dir={out}",
        f"data.train_file={data_file}",
        "data.batch_size=4",
        "data.max_length=128",
        "data.eval_ratio=0.2",
        "training.max_steps=6",
        "training.learning_rate=3e-2",
        "training.save_steps=3",
        "training.logging_steps=1",
        "training.warmup_ratio=0",
        "logging.progress_bar=false",
        "lora.r=4",
        "lora.alpha=8",
        "lora.dropout=0.1",
        "memory.mixed_precision=no",
        "generation.max_new_tokens=12",
        "generation.greedy=true",
    ]
    for section, values in sections.items():
        sets += [f"{section}.{k}={v}" for k, v in values.items()]
    return load_config(None, sets)


def _finished_run(model: Path, root: Path) -> Path:
    from kotune.train import train

    data = write_csv(root / "qa.csv", qa_rows())
    return train(tiny_config(model, data, root / "run", training={"max_steps": 8}))


@pytest.fixture(scope="session")
def tiny_run(tiny_gpt2, tmp_path_factory) -> Path:
    """A finished run folder on the tiny GPT-2 (shared by inference tests; treat as read-only)."""
    return _finished_run(tiny_gpt2, tmp_path_factory.mktemp("tiny_run"))


@pytest.fixture(scope="session")
def tiny_gemma_run(tiny_gemma, tmp_path_factory) -> Path:
    return _finished_run(tiny_gemma, tmp_path_factory.mktemp("tiny_gemma_run"))


@pytest.fixture(params=["tiny_run", "tiny_gemma_run"])
def any_run(request) -> Path:
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory) -> Path:
    """A tiny encoder-decoder for `text2text` (same locally trained tokenizer)."""
    import torch
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    folder = tmp_path_factory.mktemp("tiny_t5")
    _train_tokenizer(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    cfg = T5Config(
        vocab_size=len(tok),
        d_model=64,
        d_ff=128,
        d_kv=16,
        num_layers=2,
        num_heads=2,
        decoder_start_token_id=tok.pad_token_id,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    T5ForConditionalGeneration(cfg).save_pretrained(folder, safe_serialization=True)
    return folder


def topic_rows(n: int = 32) -> list[dict]:
    """Classification rows: the label is the topic word that ends the text (the tiny decoders
    pool the last token, so the tests need few steps)."""
    rows = []
    for r in qa_rows(n):
        topic = r["question"].split("에")[0]
        rows.append({"text": f"{r['question']} 주제: {topic}", "label": topic, "answer": r["answer"]})
    return rows


@pytest.fixture
def topic_csv(tmp_path) -> Path:
    return write_csv(tmp_path / "topics.csv", topic_rows())


# A fixed corner of the shipped statute KB, for the tests about behaviour (retrieval, grounded training and answers,
# abstention), not about the shipped KB itself: retrievers, article classifiers and scope calibration over all of it
# cost seconds each, more as the KB grows, and what they retrieve would move with it. Whole chapters, so the slice does
# not change as the KB grows elsewhere. The tests that check the shipped KB and data (test_statutes.py) use the real
# files.
KB_SLICE = (
    ("민법", 303, 319),  # 전세권: qa_rows cite 303, the grounding tests 307 and 309
    ("민법", 563, 568),  # 매매 총칙: qa_rows cite 565 (해약금)
    ("민법", 618, 624),  # 임대차 (neighbours)
    ("주택임대차보호법", 1, 10),  # qa_rows cite 3 and 3의2; 3의3 is a long article; the dev set's first questions
    ("상가건물 임대차보호법", 1, 4),  # neighbours from the third law
)
KB_SLICE_NEEDS = [("민법", "303"), ("민법", "307"), ("민법", "309"), ("민법", "565")] + [
    ("주택임대차보호법", a) for a in ("3", "3의2", "3의3")
]


def in_kb_slice(key: tuple[str, str]) -> bool:
    law, article = key
    return any(law == name and lo <= int(article.split("의")[0]) <= hi for name, lo, hi in KB_SLICE)


@pytest.fixture(scope="session")
def kb_slice(tmp_path_factory) -> Path:
    """A KB folder (`retrieval.kb_dir`) holding the shipped articles of KB_SLICE (55 of them), copied line for line
    from the shipped files."""
    from kotune.legal.statutes import DEFAULT_KB, load_kb

    folder = tmp_path_factory.mktemp("kb_slice")
    for path in sorted(DEFAULT_KB.glob("*.jsonl")):
        records = [(x, json.loads(x)) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
        keep = [x + "\n" for x, r in records if in_kb_slice((r["law"], str(r["article"])))]
        if keep:
            (folder / path.name).write_text("".join(keep), encoding="utf-8")
    kb = load_kb(folder)
    missing = [k for k in KB_SLICE_NEEDS if k not in kb]
    assert not missing, f"the shipped KB lost articles the tests need: {missing}"
    assert 40 <= len(kb) <= 80, len(kb)  # a slice: a few dozen articles, not the whole KB
    return folder


def kb_slice_examples(source: Path, dest: Path, n: int) -> Path:
    """The first `n` example questions of `source` (a Q&A CSV or `{"question", "citations"}` lines) whose citations all
    fall in KB_SLICE, written to `dest` in the same format."""
    from kotune.legal.statutes import find_citations

    def in_slice(text: str) -> bool:
        cited = find_citations(text)
        return bool(cited) and all(map(in_kb_slice, cited))

    if source.suffix == ".csv":
        with source.open(encoding="utf-8", newline="") as f:
            return write_csv(dest, [r for r in csv.DictReader(f) if in_slice(r["answer"])][:n])
    lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
    dest.write_text("".join([x for x in lines if in_slice(" ".join(json.loads(x)["citations"]))][:n]), encoding="utf-8")
    return dest


from serving import citing_bot  # noqa: E402,F401  (one session fixture for the server and page tests)
