"""Constrained citations: the grammar on text, and generation that can only cite the context."""

from __future__ import annotations

import pytest

from kotune.infer.constrain import RepeatGuard, open_citation
from kotune.legal.constrain import CitationConstraint, citation_items, fits
from kotune.legal.statutes import Article, find_citations

A303 = Article("민법", "303", "전세권의 내용", ("첫째 항", "둘째 항"), ())
H3_2 = Article("주택임대차보호법", "3의2", "보증금의 회수", ("항",), ())
ITEMS = citation_items([A303, H3_2])


@pytest.mark.parametrize(
    "tail",
    [
        "",
        " ",
        " 민",
        " 민법 제30",
        " 민법 제303조",
        " 민법 제303조 제2항",
        " 민법 제303조)",
        " 민법 제303조, 주택임대차보호법 제3조의",
        " 민법 제303조 제1항, 주택임대차보호법 제3조의2 제1항)",
        " 주택임대차보호법 제3조의2,",
        " 민법 제303조) 그러니",
    ],
)
def test_allowed_beginnings(tail):
    assert fits(tail, ITEMS)


@pytest.mark.parametrize(
    "tail",
    [
        " 민법 제304조",
        " 민법 제303조 제3항",
        " 주택임대차보호법 제3조)",
        " 주택임대차보호법 제3조의3",
        " 민법 제303조, 민법 제999조",
        " 형법",
        " 민법 제303조의2",
    ],
)
def test_refused_beginnings(tail):
    assert not fits(tail, ITEMS)


def test_open_citation_only_inside_an_unclosed_list():
    assert open_citation("설명입니다. (근거: 민법 제3") == " 민법 제3"
    assert open_citation("설명입니다. (근거: 민법 제303조) 끝") is None
    assert open_citation("설명입니다.") is None


@pytest.mark.parametrize("engine", ["hf-generate", "kotune-engine"])
def test_generation_can_only_cite_the_context(tiny_run, engine):
    import torch

    from kotune.infer.generate import Chatbot
    from kotune.model import load_run

    bot = Chatbot.from_run(tiny_run, greedy=True)
    tok = bot.tok
    model = load_run(tiny_run)[0] if engine == "hf-generate" else bot.model
    prompt = tok("질문: 전세권? 답변:", add_special_tokens=False)["input_ids"]
    started = tok(" 설명입니다. (근거:", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + started])
    for context in ([A303], [H3_2], [A303, H3_2]):
        proc = CitationConstraint(tok, [context], prompt_len=len(prompt))
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=24,
            do_sample=False,
            logits_processor=[proc],
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        text = tok.decode(out[0, len(prompt) :], skip_special_tokens=True)
        cited = find_citations(text)
        # An untrained model has no reason to write these strings: only the constraint makes it.
        assert cited and set(cited) <= {a.key for a in context}, text
        assert fits(open_citation(text) or text[text.index("근거:") + 3 :], citation_items(context))


def test_for_row_keeps_only_that_rows_articles(tiny_gpt2):
    from transformers import AutoTokenizer

    proc = CitationConstraint(AutoTokenizer.from_pretrained(tiny_gpt2), [[A303], [H3_2]], prompt_len=5)
    one = proc.for_row(1)
    assert one.items == [citation_items([H3_2])] and one.prompt_len == 5


def test_repeat_guard_forbids_only_a_third_occurrence():
    guard = RepeatGuard(None, n=3, prompt_len=0)
    assert guard.banned([1, 2, 3, 1, 2]) == []  # 1 2 3 occurred once: a second time is allowed
    assert guard.banned([1, 2, 3, 1, 2, 3, 1, 2]) == [3]
    assert guard.banned([5, 5, 5, 5]) == [5]  # `등등등등…`
    assert guard.banned([1, 2]) == []


def _max_ngram_count(ids, n):
    from collections import Counter

    return max(Counter(tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)).values())


@pytest.mark.parametrize("engine", ["hf-generate", "kotune-engine"])
def test_repeat_guard_breaks_loops_of_generated_text_only(tiny_run, engine):
    import torch

    from kotune.infer.generate import Chatbot
    from kotune.model import load_run

    bot = Chatbot.from_run(tiny_run, greedy=True)
    tok = bot.tok
    model = load_run(tiny_run)[0] if engine == "hf-generate" else bot.model
    prompt = tok("질문: 전세권? 답변:", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt])
    kw = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=60,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=tok.pad_token_id,
    )
    free = model.generate(**kw)[0, len(prompt) :].tolist()
    assert _max_ngram_count(free, 4) >= 3  # the untrained model loops: the test can fail
    guarded = model.generate(**kw, logits_processor=[RepeatGuard(tok, 4, len(prompt))])[0, len(prompt) :].tolist()
    assert _max_ngram_count(guarded, 4) <= 2
    first = next(i for i in range(4, len(free) + 1) if _max_ngram_count(free[:i], 4) >= 3)
    assert guarded[: first - 1] == free[: first - 1]  # nothing changes before the loop's third turn


def test_repeat_guard_leaves_open_citations_and_the_prompt_alone(tiny_gpt2):
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    cite = tok("(근거: 민법 제3", add_special_tokens=False)["input_ids"]
    looped = tok("가나다 가나다 가나다 가나", add_special_tokens=False)["input_ids"]
    guard = RepeatGuard(tok, 2, prompt_len=0)
    assert guard.banned(looped)  # the unguarded case bans something
    scores = torch.zeros(1, len(tok))
    guard(torch.tensor([looped + cite]), scores)
    assert torch.isfinite(scores).all()  # inside `(근거: …` the law's name may repeat
    scores = torch.zeros(1, len(tok))
    RepeatGuard(tok, 2, prompt_len=len(looped))(torch.tensor([looped + looped[:1]]), scores)
    assert torch.isfinite(scores).all()  # repeats inside the prompt do not count
    scores = torch.zeros(1, len(tok))
    guard(torch.tensor([looped]), scores)
    assert not torch.isfinite(scores).all()


def test_a_candidates_text_from_a_window_is_its_text_after_the_whole_answer(tiny_gpt2):
    import random

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    proc = CitationConstraint(tok, [[A303]], prompt_len=0)
    text = "임차인은 보증금을 돌려받을 때까지 집을 비워 주지 않아도 됩니다. 동시이행의 항변권입니다. (근거: 민법 제3"
    answer = tok(text, add_special_tokens=False)["input_ids"]
    rng = random.Random(0)
    candidates = list(range(tok.vocab_size))
    for end in range(1, len(answer) + 1):  # every prefix, so windows start inside characters too
        gen = answer[:end]
        text = tok.decode(gen, skip_special_tokens=True)
        picked = rng.sample(candidates, 40)
        whole = [tok.decode(gen + [t], skip_special_tokens=True)[len(text) :] for t in picked]
        assert proc.pieces(gen, text, picked) == whole
