"""How much of a sentence must repeat the shown rule before the answer gate calls it a restatement
(`kotune.legal.answer.RESTATEMENT`). Measured on training answers only: the 428 rows written rule-first (their first
sentence states the cited article's rule, the rest apply it), never on an evaluation set.

    .venv/bin/python bench/restatement_threshold.py

For each threshold it prints the share of rule-stating first sentences and of application sentences whose character
bigrams are at least that much in the cited articles' KB text: the gate should catch the first and spare the second.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from kotune.legal.answer import _SENTENCE_END, bigrams, overlap  # noqa: E402
from kotune.legal.statutes import find_citations, load_kb  # noqa: E402

FIRST_RULE_FIRST_ROW = 422  # rows 423.. of data/civil_law_qa.csv were written rule first (docs/evaluation.md)


def main() -> None:
    kb = load_kb()
    with (ROOT / "data" / "civil_law_qa.csv").open(encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))[FIRST_RULE_FIRST_ROW:]
    first, rest = [], []
    for r in rows:
        cites = [c for c in find_citations(r["answer"]) if c in kb]
        if not cites:
            continue
        rule = bigrams(" ".join(kb[c].summary for c in cites))
        sentences = [s for s in _SENTENCE_END.split(r["answer"]) if s.strip() and "(근거" not in s]
        for i, s in enumerate(sentences):
            (first if i == 0 else rest).append(overlap(s, rule))
    print(f"{len(rows)} rule-first training answers: {len(first)} rule sentences, {len(rest)} application sentences\n")
    print("| threshold | rule sentences at or above | application sentences at or above |\n|---|---|---|")
    for t in (0.5, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85):
        print(f"| {t} | {sum(x >= t for x in first) / len(first):.3f} | {sum(x >= t for x in rest) / len(rest):.3f} |")


if __name__ == "__main__":
    main()
