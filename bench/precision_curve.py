"""Does bf16 autocast train like fp32? The same kotune run twice — `memory.mixed_precision`
`bf16` and `no` — with the same data order and seed, then the per-step training loss of
each, their difference, and the eval answer loss at the end.

    PYTHONPATH=src .venv/bin/python bench/precision_curve.py --steps 16 \
        [--config configs/civil_law.yaml] [--output bench/results/precision_curve.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def run(config: str, steps: int, precision: str, extra: list[str]) -> dict:
    from kotune.config import load_config
    from kotune.train import train
    from kotune.train.report import read_metrics

    with tempfile.TemporaryDirectory() as tmp:
        sets = [
            f"model.output_dir={tmp}",
            f"training.max_steps={steps}",
            "training.logging_steps=1",
            f"training.save_steps={10**6}",
            f"training.eval_steps={steps}",
            "logging.progress_bar=false",
            "logging.level=WARNING",
            f"memory.mixed_precision={precision}",
        ]
        cfg = load_config(config, sets + extra)
        t0 = time.perf_counter()
        out = train(cfg)
        wall = time.perf_counter() - t0
        recs = read_metrics(Path(out) / "metrics.jsonl")
    losses = [r["loss"] for r in recs if "loss" in r]
    evals = [r["eval_loss"] for r in recs if "eval_loss" in r]
    return {"precision": precision, "wall_s": wall, "losses": losses, "eval_loss": evals[-1] if evals else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--config", default="configs/civil_law.yaml")
    ap.add_argument("--set", action="append", default=[], help="Extra config override (section.key=value).")
    ap.add_argument("--output", default="bench/results/precision_curve.json")
    args = ap.parse_args()
    runs = [run(args.config, args.steps, p, args.set) for p in ("bf16", "no")]
    bf, fp = runs[0]["losses"], runs[1]["losses"]
    diffs = [b - f for b, f in zip(bf, fp)]
    rel = [abs(d) / f for d, f in zip(diffs, fp)]
    print("| step | fp32 loss | bf16 loss | bf16 − fp32 | relative |")
    print("|---|---|---|---|---|")
    for i, (f, b, d, r) in enumerate(zip(fp, bf, diffs, rel), start=1):
        print(f"| {i} | {f:.4f} | {b:.4f} | {d:+.4f} | {r:.1%} |")
    print(
        f"\nmax |relative difference| {max(rel):.1%}, mean {sum(rel) / len(rel):.1%}; "
        f"eval answer loss fp32 {runs[1]['eval_loss']:.4f}, bf16 {runs[0]['eval_loss']:.4f}; "
        f"wall fp32 {runs[1]['wall_s']:.0f} s, bf16 {runs[0]['wall_s']:.0f} s (load {os.getloadavg()[0]:.1f})"
    )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(
        json.dumps(
            {"config": args.config, "steps": args.steps, "overrides": args.set, "runs": runs, "max_rel_diff": max(rel)},
            indent=2,
        ),
        encoding="utf-8",
    )
    print(f"written {args.output}")


if __name__ == "__main__":
    main()
