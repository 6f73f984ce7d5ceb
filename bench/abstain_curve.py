"""The curve that picked the abstention threshold, from calibration data only (never the evaluation sets).

Every in-scope example question (the run's retrieval examples) and every out-of-scope example
(`retrieval.out_of_scope_examples`) is scored once while held out of a 5-fold cross-validation; the threshold is the
highest at which at most `retrieval.abstain_in_scope` of the in-scope ones would be abstained. With `--by_area`, a
second cross-validation holds out whole topic areas of the out-of-scope file (its `area` field), which estimates how
often questions on a topic the calibration set never saw are abstained.

    .venv/bin/python bench/abstain_curve.py runs/civil_law --by_area data/out_of_scope_examples.jsonl \
        --output bench/results/abstain_curve.json --plot docs/abstain_curve.png
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))


def by_area(retriever, questions: list[str], areas: list[str], rate: float, seed: int = 0) -> dict:
    """Out-of-fold scores with each fold holding out about a fifth of the areas (and a fifth of the in-scope rows)."""
    import numpy as np

    from kotune.config import cache_root
    from kotune.legal.retrieval import _Index
    from kotune.legal.retrieval.scope import FOLDS, ScopeModel

    oos = _Index(questions, retriever.morph, cache_root() / "retrieval", query_side=True)
    vectors = np.concatenate([retriever.ex_index.vectors, oos.vectors])
    tokens = retriever.ex_index.tokens + oos.tokens
    n_in = retriever.ex_index.size
    in_scope = [True] * n_in + [False] * oos.size
    order = list(range(n_in))
    random.Random(seed).shuffle(order)
    fold = {i: k % FOLDS for k, i in enumerate(order)}
    names = sorted(set(areas))
    fold.update({n_in + j: names.index(a) % FOLDS for j, a in enumerate(areas)})
    oof = np.zeros(len(in_scope))
    for k in range(FOLDS):
        keep = [i for i in range(len(in_scope)) if fold[i] != k]
        model = ScopeModel(vectors[keep], [tokens[i] for i in keep], [in_scope[i] for i in keep])
        for i in range(len(in_scope)):
            if fold[i] == k:
                oof[i] = model.score(vectors[i], tokens[i])
    s_in = np.sort(oof[:n_in])
    threshold = float(s_in[int(np.floor(rate * n_in))])
    per_area = {a: float(np.mean([oof[n_in + j] < threshold for j, b in enumerate(areas) if b == a])) for a in names}
    return {
        "threshold": threshold,
        "out_of_scope_abstained": float(np.mean(oof[n_in:] < threshold)),
        "in_scope_abstained": float(np.mean(oof[:n_in] < threshold)),
        "per_area": per_area,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="A grounded run folder with out-of-scope examples (retrieval_out_of_scope.jsonl).")
    ap.add_argument(
        "--by_area", help="The out-of-scope examples file with an `area` field per line (the same questions)."
    )
    ap.add_argument("--output", type=Path)
    ap.add_argument("--plot", type=Path, help="PNG of the curve.")
    a = ap.parse_args()

    from kotune.config import load_config
    from kotune.data import read_question_lines
    from kotune.infer.generate import OUT_OF_SCOPE_FILE
    from kotune.legal.retrieval import Retriever
    from kotune.legal.retrieval.examples import load_examples_file
    from kotune.legal.statutes import load_kb

    run = Path(a.run)
    cfg = load_config(run / "config.yaml")
    oos = [r["question"] for r in read_question_lines(run / OUT_OF_SCOPE_FILE)]
    rate = cfg.retrieval.abstain_in_scope
    retriever = Retriever(
        load_kb(run / "statutes"),
        examples=load_examples_file(run / "retrieval_examples.jsonl"),
        out_of_scope=oos,
        abstain_in_scope=rate,
    )
    cal = retriever.calibration
    print(
        f"calibration: {cal.examples['in_scope']} in-scope, {cal.examples['out_of_scope']} out-of-scope example "
        f"questions; target: at most {rate:.0%} of in-scope abstained -> threshold {cal.threshold:.3f}\n"
    )
    print("| threshold | in-scope abstained | out-of-scope abstained |\n|---|---|---|")
    for row in cal.curve:
        mark = " **(chosen)**" if row["threshold"] == round(cal.threshold, 4) else ""
        print(
            f"| {row['threshold']:.3f}{mark} | {row['in_scope_abstained']:.3f} | {row['out_of_scope_abstained']:.3f} |"
        )
    report = {"run": str(run), **cal.__dict__}
    if a.by_area:
        rows = read_question_lines(a.by_area, ("question", "area"))
        area = {r["question"].strip(): r["area"] for r in rows}
        missing = [q for q in oos if q not in area]
        if missing:
            raise SystemExit(
                f"{a.by_area} lacks {len(missing)} of the run's out-of-scope questions, e.g. {missing[0]!r}"
            )
        grouped = by_area(retriever, oos, [area[q] for q in oos], rate)
        report["by_area"] = grouped
        print(
            f"\nwhole areas held out: threshold {grouped['threshold']:.3f}, in-scope abstained "
            f"{grouped['in_scope_abstained']:.3f}, out-of-scope abstained {grouped['out_of_scope_abstained']:.3f}"
        )
        for name, v in sorted(grouped["per_area"].items(), key=lambda kv: kv[1]):
            print(f"  {name}: {v:.3f}")
    if a.output:
        a.output.parent.mkdir(parents=True, exist_ok=True)
        a.output.write_text(json.dumps(report, ensure_ascii=False, indent=1), encoding="utf-8")
    if a.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        t = [r["threshold"] for r in cal.curve]
        fig, ax = plt.subplots(figsize=(6, 3.6))
        ax.plot(t, [r["in_scope_abstained"] for r in cal.curve], marker="o", label="in-scope examples abstained")
        ax.plot(
            t, [r["out_of_scope_abstained"] for r in cal.curve], marker="s", label="out-of-scope examples abstained"
        )
        ax.axvline(cal.threshold, color="gray", linestyle="--", label=f"chosen {cal.threshold:.3f}")
        ax.set_xlabel("threshold on P(in scope)")
        ax.set_ylabel("share abstained (out of fold)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(a.plot, dpi=110)


if __name__ == "__main__":
    main()
