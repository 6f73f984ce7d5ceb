"""Generation settings scored on a run's held-out training split (its `data.eval_ratio` rows), not on the dev set:
citations against each row's own answer, ROUGE-L against that answer. This is how the grounded recipe's
`repetition_penalty` and `context_contrast` were chosen. Every combination of the values given is scored; an option
left out keeps the run's own value.

    .venv/bin/python bench/heldout_generation.py runs/civil_law --penalty 1.1 --penalty 1.0
    .venv/bin/python bench/heldout_generation.py runs/civil_law --contrast 0 --contrast 0.5 --contrast 1
"""

from __future__ import annotations

import argparse

from kotune.config import load_config
from kotune.infer.generate import Chatbot
from kotune.legal.evaluate import evaluate_answers, markdown_table
from kotune.legal.retrieval import Morphemes
from kotune.legal.statutes import find_citations, format_cite
from kotune.prepare import load_split


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--penalty", type=float, action="append", help="repetition_penalty to try (repeat)")
    ap.add_argument("--contrast", type=float, action="append", help="generation.context_contrast to try (repeat)")
    args = ap.parse_args()
    cfg = load_config(f"{args.run}/config.yaml")
    _, held, _ = load_split(cfg)
    items = [
        {
            "id": e.source,
            "question": e.question,
            "citations": [format_cite(*c) for c in find_citations(e.answer)],
            "key_facts": [],
            "reference": e.answer,
        }
        for e in held
    ]
    tokenize = Morphemes()
    results = {}
    bot = Chatbot.from_run(args.run, greedy=True)
    base = bot.gen
    for p in args.penalty or [cfg.generation.repetition_penalty]:
        for w in args.contrast or [cfg.generation.context_contrast]:
            bot.gen = base.model_copy(update={"repetition_penalty": p, "context_contrast": w})
            summary, _ = evaluate_answers(
                items, bot.answer_batch([i["question"] for i in items]), bot.grounding.kb, tokenize
            )
            # the rows have no key facts
            results[f"repetition_penalty {p}, context_contrast {w}"] = {**summary, "key_fact_recall": None}
    print(f"{args.run}: {len(items)} held-out training rows (greedy, batches of 8)")
    print(markdown_table(results))


if __name__ == "__main__":
    main()
