"""Score answers against a dev set: citations, key facts, ROUGE-L, stop rate, latency.

Dev lines: `{"id", "question", "citations": ["민법 제281조"], "key_facts": [["15년"], ["최단", "영구"]],
"reference": "…", "category"}`. A key fact is a list of alternative strings; any one in the
answer counts. Citation metrics use the answer the user sees; the fabricated-citation rate
uses the raw generation, before any citation policy removed or marked them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..data import read_question_lines
from ..infer.generate import Answer
from .answer import refusal
from .statutes import find_citations, format_cite


@dataclass
class Scored:
    id: str
    cited: list
    gold: list
    hit: bool
    facts_found: int
    facts_total: int
    rouge_l: float | None
    fabricated: int
    raw_cited: int


def load_dev(path: str | Path) -> list[dict]:
    return read_question_lines(path, ("question", "citations", "key_facts"))


def lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, start=1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: list[str], reference: list[str]) -> float:
    if not candidate or not reference:
        return 0.0
    m = lcs(candidate, reference)
    if m == 0:
        return 0.0
    p, r = m / len(candidate), m / len(reference)
    return 2 * p * r / (p + r)


def facts_found(text: str, facts: list[list[str]]) -> int:
    """Key facts of which at least one alternative string is in `text`."""
    return sum(any(alt in text for alt in fact) for fact in facts)


def score_one(item: dict, text: str, raw_text: str, kb: dict, tokenize=None) -> Scored:
    gold = [c for g in item["citations"] for c in find_citations(g)]
    cited = find_citations(text)
    raw = find_citations(raw_text)
    facts = item["key_facts"]
    found = facts_found(text, facts)
    rl = None
    if tokenize is not None and item.get("reference"):
        rl = rouge_l(tokenize(text), tokenize(item["reference"]))
    return Scored(
        str(item["id"]),
        cited,
        gold,
        bool(set(cited) & set(gold)),
        found,
        len(facts),
        rl,
        sum(1 for c in raw if c not in kb),
        len(raw),
    )


def summarise(
    scored: list[Scored], stopped: list[bool], seconds: list[float], abstained: list[bool] | None = None
) -> dict:
    n = max(len(scored), 1)
    cited = sum(len(s.cited) for s in scored)
    correct = sum(len(set(s.cited) & set(s.gold)) for s in scored)
    gold = sum(len(set(s.gold)) for s in scored)
    rls = [s.rouge_l for s in scored if s.rouge_l is not None]
    raw = sum(s.raw_cited for s in scored)
    return {
        "questions": len(scored),
        "citation_hit": sum(s.hit for s in scored) / n,
        "citation_precision": correct / cited if cited else 0.0,
        "citation_recall": correct / gold if gold else 0.0,
        "key_fact_recall": sum(s.facts_found / max(s.facts_total, 1) for s in scored) / n,
        "rouge_l": sum(rls) / len(rls) if rls else None,
        "stop_rate": sum(stopped) / n,
        "fabricated_citation_rate": sum(s.fabricated for s in scored) / raw if raw else 0.0,
        "mean_latency_s": sum(seconds) / n,
        "abstain_rate": sum(abstained or []) / n,
    }


def out_of_scope_summary(answers) -> dict:
    """On questions no KB article answers: how often the system abstained, and how often it cited an article anyway
    (the dangerous failure: a confident answer resting on a statute that does not decide the question)."""
    n = max(len(answers), 1)
    return {
        "questions": len(answers),
        "abstain_rate": sum(a.abstained for a in answers) / n,
        "cited_rate": sum(bool(find_citations(a.text)) for a in answers) / n,
    }


def evaluate_answers(items: list[dict], answers, kb: dict, tokenize=None) -> tuple[dict, list[dict]]:
    """`answers`: objects with text, raw_text, stopped, seconds (kotune.infer.generate.Answer)."""
    scored = [score_one(it, a.text, a.raw_text or a.text, kb, tokenize) for it, a in zip(items, answers)]
    summary = summarise(
        scored,
        [a.stopped for a in answers],
        [a.seconds for a in answers],
        [getattr(a, "abstained", False) for a in answers],
    )
    rows = [
        {
            "id": s.id,
            "question": it["question"],
            "answer": a.text,
            "hit": s.hit,
            "abstained": getattr(a, "abstained", False),
            "cited": [format_cite(*c) for c in s.cited],
            "gold": [format_cite(*c) for c in s.gold],
            "retrieved": [c.cite for c in getattr(a, "context", [])],
            "flagged": list(getattr(a, "flagged", [])),
            "key_facts": f"{s.facts_found}/{s.facts_total}",
            "rouge_l": s.rouge_l,
            "stopped": a.stopped,
        }
        for s, it, a in zip(scored, items, answers)
    ]
    return summary, rows


def retrieval_only_answers(retriever, questions: list[str], method: str = "hybrid"):
    """Baseline: the top-1 article's summary, cited, as the answer; the same refusals as the chatbot's when the
    retriever has out-of-scope examples."""
    import time

    out = []
    for q in questions:
        t0 = time.perf_counter()
        text = refusal(q, retriever.in_scope(q))
        if text is not None:
            out.append(Answer(q, text, 0, True, time.perf_counter() - t0, raw_text=text, abstained=True))
            continue
        a = retriever.search(q, k=1, method=method)[0].article
        text = a.summary + f" (근거: {a.cite})"
        out.append(Answer(q, text, 0, True, time.perf_counter() - t0, citations=[a], context=[a], raw_text=text))
    return out


def markdown_table(results: dict[str, dict]) -> str:
    cols = [
        "citation_hit",
        "citation_precision",
        "citation_recall",
        "key_fact_recall",
        "rouge_l",
        "stop_rate",
        "fabricated_citation_rate",
        "mean_latency_s",
        "abstain_rate",
        "out_of_scope_abstain_rate",
        "out_of_scope_cited_rate",
    ]
    lines = ["| system | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, r in results.items():
        cells = ["–" if r.get(c) is None else f"{r[c]:.3f}" for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
