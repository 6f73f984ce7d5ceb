"""Constrained citations: the grammar on text, and generation that can only cite the context."""

from __future__ import annotations

import pytest

from kotune.constrain import CitationConstraint, citation_items, fits, open_citation
from kotune.statutes import Article, find_citations

A303 = Article("민법", "303", "전세권의 내용", ("첫째 항", "둘째 항"), ())
H3_2 = Article("주택임대차보호법", "3의2", "보증금의 회수", ("항",), ())
ITEMS = citation_items([A303, H3_2])


@pytest.mark.parametrize("tail", [
    "", " ", " 민", " 민법 제30", " 민법 제303조", " 민법 제303조 제2항", " 민법 제303조)",
    " 민법 제303조, 주택임대차보호법 제3조의", " 민법 제303조 제1항, 주택임대차보호법 제3조의2 제1항)",
    " 주택임대차보호법 제3조의2,", " 민법 제303조) 그러니",
])
def test_allowed_beginnings(tail):
    assert fits(tail, ITEMS)


@pytest.mark.parametrize("tail", [
    " 민법 제304조", " 민법 제303조 제3항", " 주택임대차보호법 제3조)", " 주택임대차보호법 제3조의3",
    " 민법 제303조, 민법 제999조", " 형법", " 민법 제303조의2",
])
def test_refused_beginnings(tail):
    assert not fits(tail, ITEMS)


def test_open_citation_only_inside_an_unclosed_list():
    assert open_citation("설명입니다. (근거: 민법 제3") == " 민법 제3"
    assert open_citation("설명입니다. (근거: 민법 제303조) 끝") is None
    assert open_citation("설명입니다.") is None


@pytest.mark.parametrize("engine", ["hf-generate", "kotune-engine"])
def test_generation_can_only_cite_the_context(tiny_run, engine):
    import torch

    from kotune.generate import Chatbot
    from kotune.model import load_run

    bot = Chatbot.from_run(tiny_run, greedy=True)
    tok = bot.tok
    model = load_run(tiny_run)[0] if engine == "hf-generate" else bot.model
    prompt = tok("질문: 전세권? 답변:", add_special_tokens=False)["input_ids"]
    started = tok(" 설명입니다. (근거:", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + started])
    for context in ([A303], [H3_2], [A303, H3_2]):
        proc = CitationConstraint(tok, [context], prompt_len=len(prompt))
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                             logits_processor=[proc], eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        text = tok.decode(out[0, len(prompt):], skip_special_tokens=True)
        cited = find_citations(text)
        # An untrained model has no reason to write these strings: only the constraint makes it.
        assert cited and set(cited) <= {a.key for a in context}, text
        assert fits(open_citation(text) or text[text.index("근거:") + 3:], citation_items(context))


def test_for_row_keeps_only_that_rows_articles(tiny_gpt2):
    from transformers import AutoTokenizer

    proc = CitationConstraint(AutoTokenizer.from_pretrained(tiny_gpt2), [[A303], [H3_2]], prompt_len=5)
    one = proc.for_row(1)
    assert one.items == [citation_items([H3_2])] and one.prompt_len == 5
