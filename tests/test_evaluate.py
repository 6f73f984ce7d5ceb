"""Dev-set scoring: exact metric values on hand-made answers."""

from __future__ import annotations

import pytest

from kotune.infer.generate import Answer
from kotune.legal.evaluate import evaluate_answers, lcs, markdown_table, rouge_l
from kotune.legal.statutes import load_kb

ITEMS = [
    {
        "id": "a",
        "question": "q1",
        "citations": ["민법 제281조"],
        "key_facts": [["15년"], ["최단", "영구"]],
        "reference": "기간 을 정하지 않으면 최단 기간 이다",
    },
    {
        "id": "b",
        "question": "q2",
        "citations": ["주택임대차보호법 제3조", "주택임대차보호법 제3조의2"],
        "key_facts": [["다음 날"]],
    },
]


def _a(text, raw=None, stopped=True, seconds=1.0):
    return Answer("q", text, 5, stopped, seconds, raw_text=raw or text)


def test_metrics_exact():
    answers = [
        _a("최단기간 15년입니다. (근거: 민법 제281조, 민법 제280조)"),  # hit; 1 of 2 cited is gold
        _a(
            "모릅니다. (근거: 주택임대차보호법 제3조)",
            raw="모릅니다. (근거: 주택임대차보호법 제3조, 민법 제999조)",
            stopped=False,
            seconds=3.0,
        ),
    ]
    summary, rows = evaluate_answers(ITEMS, answers, load_kb(), tokenize=str.split)
    assert summary["citation_hit"] == 1.0
    assert summary["citation_precision"] == pytest.approx(2 / 3)
    assert summary["citation_recall"] == pytest.approx(2 / 3)
    assert summary["key_fact_recall"] == pytest.approx((2 / 2 + 0 / 1) / 2)
    assert summary["stop_rate"] == 0.5
    assert summary["fabricated_citation_rate"] == pytest.approx(1 / 4)  # raw: 281, 280, 3, 999
    assert summary["mean_latency_s"] == 2.0
    assert rows[0]["key_facts"] == "2/2" and rows[1]["rouge_l"] is None
    assert "| x | 1.000 |" in markdown_table({"x": summary})


def test_rouge_l():
    assert lcs("a b c d".split(), "a c d e".split()) == 3
    assert rouge_l("a b c d".split(), "a c d e".split()) == pytest.approx(0.75)
    assert rouge_l([], ["a"]) == 0.0
