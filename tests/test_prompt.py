"""Rendering: prompt masked, answer and the real EOS id trained, template pitfalls refused."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from kotune.prompt import (
    IGNORE,
    TemplateError,
    check_encoded,
    collate,
    encode_example,
    length_stats,
    render_sample,
    split_template,
)

T = "질문: {question}\n답변: {answer}"


@pytest.fixture(scope="module")
def tok(tiny_gpt2):
    return AutoTokenizer.from_pretrained(tiny_gpt2)


def test_split_moves_trailing_space_to_answer():
    assert split_template(T, "전세권?", "답입니다") == ("질문: 전세권?\n답변:", " 답입니다")


def test_prompt_masked_answer_and_eos_trained(tok):
    enc = encode_example(tok, T, "전세권이란?", "전세금을 내고 쓰는 권리입니다.", tok.eos_token_id, "x.csv:2")
    prompt_ids = tok("질문: 전세권이란?\n답변:")["input_ids"]
    assert enc.labels[: len(prompt_ids)] == [IGNORE] * len(prompt_ids)
    assert enc.labels[len(prompt_ids) :] == enc.input_ids[len(prompt_ids) :]
    assert enc.input_ids[-1] == enc.labels[-1] == tok.eos_token_id
    # EOS is one id, not the characters "</s>" spelled out by the tokenizer
    assert tok.decode(enc.input_ids[-1:]) == "</s>" and enc.input_ids.count(tok.eos_token_id) == 1
    check_encoded(enc, tok.eos_token_id, tok.pad_token_id)
    text = render_sample(tok, enc)
    assert "⟦</s>⟧" in text and "x.csv:2" in text


def test_sample_shows_readable_korean_for_byte_level_tokens(tok):
    enc = encode_example(tok, T, "갱신청구권 행사", "묵시적 갱신입니다.", tok.eos_token_id, "x.csv:3")
    assert any("ì" in p or "ê" in p for p in tok.convert_ids_to_tokens(enc.input_ids))  # byte glyphs, as KoGPT2 shows
    text = render_sample(tok, enc)
    assert "ì" not in text and "ê" not in text and "\ufffd" not in text
    prompt_line, trained_line = text.splitlines()[2:4]

    def shown(line, o, c):
        return "".join(p.split(c)[0] for p in line.split(": ", 1)[1].split(o)[1:])

    assert shown(prompt_line, "[", "]") == "질문: 갱신청구권 행사\\n답변:"
    assert shown(trained_line, "⟦", "⟧") == " 묵시적 갱신입니다.</s>"


def test_pad_equal_to_eos_refused(tok):
    enc = encode_example(tok, T, "질문", "답", tok.eos_token_id)
    with pytest.raises(TemplateError, match="pad token id equals EOS"):
        check_encoded(enc, tok.eos_token_id, tok.eos_token_id)


def test_untrained_eos_refused(tok):
    enc = encode_example(tok, T, "질문", "답", tok.eos_token_id)
    enc.labels[-1] = IGNORE  # what the seed's pad=eos masking did
    with pytest.raises(TemplateError, match="trained EOS"):
        check_encoded(enc, tok.eos_token_id, tok.pad_token_id)


def test_template_that_tokenises_differently_in_context_refused(tok):
    # The prompt ends inside a word ("근" | "거"): in context the BPE merges across the boundary.
    assert len(tok("근거")["input_ids"]) < len(tok("근")["input_ids"]) + len(tok("거")["input_ids"])
    with pytest.raises(TemplateError, match="tokenises differently"):
        encode_example(tok, "질문: {question}\n근{answer}", "q", "거: 민법", tok.eos_token_id, "x.csv:3")


def test_collate_masks_padding(tok):
    a = encode_example(tok, T, "짧은 질문", "답", tok.eos_token_id)
    b = encode_example(tok, T, "조금 더 긴 질문입니다", "조금 더 긴 답변입니다", tok.eos_token_id)
    batch = collate([a, b], tok.pad_token_id)
    n = len(a.input_ids)
    assert batch["attention_mask"][0, n:].sum() == 0
    assert (batch["labels"][0, n:] == IGNORE).all()
    assert (batch["input_ids"][0, n:] == tok.pad_token_id).all()


def test_length_stats():
    s = length_stats([10, 20, 30, 40, 300], 256)
    assert s["p50"] == 30 and s["max"] == 300 and s["over_max_length"] == 1
