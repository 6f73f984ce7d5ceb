"""Follow-up questions: does the second turn of a conversation retrieve the article it is really about?

    .venv/bin/python bench/followups.py --run runs/civil_law [--cases data/civil_law_followups.jsonl]
        [--answers] [--out bench/results/followups.json]

For every two-turn case (`turns`, `citations` = the articles that answer the second turn read after the first), the
second turn is given to the run's grounding with each `retrieval.follow_up` mode: `off` (the second turn alone, as
before conversations), `joined` (the previous question and it as one text) and `fused` (both rankings fused). It
reports hit@1 (the first article put into the prompt is a gold one), hit@k (any article in the prompt is), and how
often the second turn is refused as out of scope (the scope check reads a follow-up alone). It also reads the
out-of-scope eval questions (data/civil_law_out_of_scope.jsonl) as follow-ups of the cases' first turns, and reports
how many the scope check would let through if it read a follow-up with the previous question instead.

--answers also generates the second turn's answer (greedy) with and without the conversation and reports citation
hit: the answer cites a gold article (slow: two answers per case).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from kotune.config import apply_overrides
from kotune.data import read_question_lines
from kotune.legal.statutes import find_citations
from kotune.runfolder import require_run

MODES = ("off", "joined", "fused")


def gold(item) -> set:
    return set(find_citations(" ".join(item["citations"])))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--cases", default="data/civil_law_followups.jsonl")
    ap.add_argument("--out_of_scope", default="data/civil_law_out_of_scope.jsonl")
    ap.add_argument("--answers", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from kotune.legal import for_run

    cfg = require_run(Path(args.run))
    cases = [json.loads(line) for line in Path(args.cases).read_text(encoding="utf-8").splitlines() if line.strip()]
    oos = [r["question"] for r in read_question_lines(args.out_of_scope)]
    results: dict = {"run": args.run, "cases": len(cases), "k": cfg.retrieval.answer_k or cfg.retrieval.k, "modes": {}}
    g = for_run(Path(args.run), cfg.retrieval)
    r = g.retriever
    refused = [g.refusal(c["turns"][1], [c["turns"][0]])[0] is not None for c in cases]
    for mode in MODES:
        g.settings = apply_overrides(cfg.retrieval, "retrieval", {"follow_up": mode})
        hit1 = hitk = answered_hit1 = 0
        for c, no in zip(cases, refused):
            first, second = c["turns"]
            keys = [a.key for a in g.sources(second, [first])]
            top = bool(keys) and keys[0] in gold(c)
            hit1 += top
            hitk += bool(gold(c) & set(keys))
            answered_hit1 += top and not no
        n = len(cases)
        results["modes"][mode] = {"hit@1": hit1 / n, "hit@k": hitk / n, "answered_and_hit@1": answered_hit1 / n}
        print(f"{mode:7s} " + "  ".join(f"{k} {v:.3f}" for k, v in results["modes"][mode].items()))
    # the scope check reads a follow-up alone; how many would pass if it read the joined text instead
    t = g.scope_threshold
    joined_scope = [max(r.scope(c["turns"][1]), r.scope(c["turns"][0] + "\n" + c["turns"][1])) >= t for c in cases]
    oos_alone = [r.scope(q) >= t for q in oos]
    oos_joined = [
        max(r.scope(q), r.scope(cases[i % len(cases)]["turns"][0] + "\n" + q)) >= t for i, q in enumerate(oos)
    ]
    results["scope"] = {
        "followups_refused": sum(refused) / len(cases),
        "followups_refused_if_joined": 1 - sum(joined_scope) / len(cases),
        "out_of_scope_followups_answered": sum(oos_alone) / len(oos),
        "out_of_scope_followups_answered_if_joined": sum(oos_joined) / len(oos),
        "out_of_scope_followups": len(oos),
    }
    print("scope: " + "  ".join(f"{k} {v:.3f}" for k, v in results["scope"].items()))
    if args.answers:
        from kotune.infer.generate import Chatbot

        bot = Chatbot.from_run(args.run, greedy=True)
        for label, with_history in (("alone", False), ("conversation", True)):
            hit = cited = 0
            t0 = time.perf_counter()
            for c in cases:
                first, second = c["turns"]
                history = []
                if with_history:
                    history = [(first, bot.answer(first).text)]
                a = bot.answer(second, history=history)
                keys = {x.key for x in a.citations}
                cited += bool(keys)
                hit += bool(keys & gold(c))
            results[f"answers_{label}"] = {
                "citation_hit": hit / len(cases),
                "cited": cited / len(cases),
                "seconds": time.perf_counter() - t0,
            }
            print(f"answers {label}: citation hit {hit}/{len(cases)}, cited {cited}/{len(cases)}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
