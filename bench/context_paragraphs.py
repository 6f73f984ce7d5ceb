"""Which paragraphs a long article shows in the prompt: on the training rows that cite a paragraph (`제N조 제M항`)
of an article whose summary is longer than `--chars`, how often that paragraph is in the context, for the
question-relevant selection (`Retriever.format_context`) and for the summary's start (what kotune showed before).

    .venv/bin/python bench/context_paragraphs.py --chars 300
"""

from __future__ import annotations

import argparse
import re

from kotune.data import load_examples
from kotune.legal.retrieval import Retriever
from kotune.legal.retrieval.context import format_context
from kotune.legal.statutes import load_kb

PARAGRAPH = re.compile(r"(민법|주택임대차보호법)\s*제(\d+)조(?:의(\d+))?\s*제(\d+)항")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", default="data/civil_law_qa.csv")
    ap.add_argument("--chars", type=int, default=300, help="retrieval.snippet_chars")
    args = ap.parse_args()
    kb = load_kb()
    retriever = Retriever(kb)
    rows, _ = load_examples(args.train, bad_rows="skip", duplicates="keep")
    cases = relevant = start = 0
    for ex in rows:
        for law, num, branch, para in PARAGRAPH.findall(ex.answer):
            art = kb.get((law, f"{num}의{branch}" if branch else num))
            if art is None or len(art.summary) <= args.chars or int(para) > len(art.paragraphs):
                continue
            wanted = art.paragraphs[int(para) - 1][:40]
            cases += 1
            relevant += wanted in retriever.format_context([art], ex.question, args.chars)
            start += wanted in format_context([art], args.chars)
    print(f"{cases} citations of a paragraph of an article longer than {args.chars} characters ({args.train})")
    print(f"cited paragraph in the context: question-relevant {relevant}/{cases}, summary's start {start}/{cases}")


if __name__ == "__main__":
    main()
