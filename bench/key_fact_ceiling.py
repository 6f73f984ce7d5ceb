"""Where the dev set's key facts are: the share of them (`kotune eval`'s key_fact_recall) found in the prompt's
article context, in whole retrieved summaries, in the gold articles' summaries and, given an eval report, in the
answers. An answer can only repeat what its context holds or infer the rest from the user's facts, so these shares
bound what copying from the context can reach.

    .venv/bin/python bench/key_fact_ceiling.py runs/civil_law --report bench/results/eval_grounded.json

Only the run folder's config, KB and retrieval examples are used; no model is loaded.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kotune.config import load_config
from kotune.legal.evaluate import facts_found, load_dev
from kotune.legal.retrieval import Retriever
from kotune.legal.retrieval.examples import load_examples_file
from kotune.legal.statutes import find_citations, load_kb


def share(items: list[dict], texts: list[str]) -> float:
    return sum(facts_found(t, it["key_facts"]) / max(len(it["key_facts"]), 1) for it, t in zip(items, texts)) / max(
        len(items), 1
    )


def whole(articles) -> str:
    return " ".join(p for a in articles for p in a.paragraphs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--dev", default="data/civil_law_dev.jsonl")
    ap.add_argument("--report", help="a `kotune eval --output` JSON of this run, for the answers")
    ap.add_argument("--k", type=int, help="articles in the prompt context (default: the run's answer_k or k)")
    ap.add_argument("--snippet_chars", type=int, help="context characters per article (default: the run's)")
    args = ap.parse_args()
    cfg = load_config(Path(args.run) / "config.yaml").retrieval
    kb = load_kb(Path(args.run) / "statutes")
    retriever = Retriever(kb, examples=load_examples_file(Path(args.run) / "retrieval_examples.jsonl"))
    items = load_dev(args.dev)
    k = args.k or cfg.answer_k or cfg.k
    chars = args.snippet_chars or cfg.snippet_chars
    ranked = [[h.article for h in retriever.search(it["question"], k=max(k, 2), method=cfg.method)] for it in items]
    gold = [[kb[c] for g in it["citations"] for c in find_citations(g) if c in kb] for it in items]
    rows = {
        f"prompt context (k={k}, snippet_chars={chars})": [
            retriever.format_context(r[:k], it["question"], chars) for r, it in zip(ranked, items)
        ],
        "whole top-1 summary": [whole(r[:1]) for r in ranked],
        "whole top-2 summaries": [whole(r[:2]) for r in ranked],
        "whole gold summaries": [whole(g) for g in gold],
    }
    if args.report:
        answers = {r["id"]: r["answer"] for r in json.loads(Path(args.report).read_text(encoding="utf-8"))["rows"]}
        texts = [answers[str(it["id"])] for it in items]
        rows["answers"] = texts
        rows["answers + whole top-1 summary"] = [t + " " + s for t, s in zip(texts, rows["whole top-1 summary"])]
    print(
        f"{args.dev}: {len(items)} questions, {sum(len(it['key_facts']) for it in items)} key facts; "
        f"retrieval {cfg.method} with {args.run}'s examples"
    )
    print("| text | key facts found |\n|---|---|")
    for name, texts in rows.items():
        print(f"| {name} | {share(items, texts):.3f} |")


if __name__ == "__main__":
    main()
