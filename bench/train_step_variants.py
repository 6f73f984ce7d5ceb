"""Seconds per training step and peak memory of the grounded recipe under LoRA-depth and checkpointing variants.

    .venv/bin/python bench/train_step_variants.py [--config configs/civil_law.yaml] [--steps 7] \
        [--output bench/results/train_step_variants.json]

The recipe's data is prepared once (as `kotune train` would, retrieval contexts included); then each variant runs in
its own process on the same batches: one warm-up step, then `--steps` batches at evenly spaced ranks of padded length
(shortest to longest), so their mean stands for a whole epoch's. Peak RSS is the process's (model, activations,
allocator), not a whole run's, which also holds what the allocator kept from earlier batches.
"""

from __future__ import annotations

import argparse
import json
import pickle
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

VARIANTS = [  # (name, gradient checkpointing, last_layers)
    ("18 layers, checkpointing (the recipe until 2026-12-07)", True, None),
    ("18 layers, no checkpointing", False, None),
    ("last 9 layers, checkpointing", True, 9),
    ("last 9 layers, no checkpointing (the recipe)", False, 9),
    ("last 6 layers, no checkpointing", False, 6),
]


def worker(prep_file: str, gc: bool, last_layers: int | None, steps: int) -> dict:
    import torch

    from kotune.model import add_lora, default_targets, load_base_model
    from kotune.prepare import epoch_batches
    from kotune.tasks import collate, item_length, loss_sum

    prep = pickle.loads(Path(prep_file).read_bytes())
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = load_base_model(
        prep.resolved,
        dtype="float32",
        trust_remote_code=False,
        revision=None,
        task="causal-lm",
        labels=None,
        pad_token_id=prep.tokenizer.pad_token_id,
        quantization="none",
        device="cpu",
    )
    targets, fifo = default_targets(model, prep.resolved.preset)
    model = add_lora(
        model, r=32, alpha=32, dropout=0.0, target_modules=targets, fan_in_fan_out=fifo, last_layers=last_layers
    )
    if gc:
        model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    train = prep.train
    lengths = [item_length(e) for e in train]
    batches = epoch_batches(lengths, 8, 42, 0, True)
    order = sorted(range(len(batches)), key=lambda i: max(lengths[j] for j in batches[i]))
    pick = [order[round(k * (len(order) - 1) / (steps - 1))] for k in range(steps)]
    times, tokens = [], []
    for n, bi in enumerate([pick[len(pick) // 2]] + pick):
        b = collate([train[i] for i in batches[bi]], prep.tokenizer.pad_token_id)
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            s, c, _ = loss_sum("causal-lm", model, b)
        (s / c).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if n:  # the first is a warm-up
            times.append(time.perf_counter() - t0)
            tokens.append(int(b["attention_mask"].sum()))
    return {
        "s_per_step": sum(times) / len(times),
        "tokens_per_s": sum(tokens) / sum(times),
        "longest_batch_s": times[-1],
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "configs" / "civil_law.yaml"))
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--output", type=Path)
    ap.add_argument("--_worker", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._worker:
        prep_file, gc, last, steps = a._worker
        print(json.dumps(worker(prep_file, gc == "1", None if last == "none" else int(last), int(steps))))
        return

    from kotune.config import load_config
    from kotune.prepare import prepare

    prep = prepare(load_config(Path(a.config)))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        prep_file = Path(tmp) / "prep.pkl"
        prep_file.write_bytes(pickle.dumps(prep))
        for name, gc, last in VARIANTS:
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--_worker",
                    str(prep_file),
                    "1" if gc else "0",
                    str(last or "none"),
                    str(a.steps),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            r = {"variant": name, **json.loads(out.stdout.strip().splitlines()[-1])}
            results.append(r)
            print(
                f"{name}: {r['s_per_step']:.2f} s/step, longest batch {r['longest_batch_s']:.1f} s, "
                f"peak RSS {r['peak_rss_gib']:.2f} GiB",
                flush=True,
            )
    base = results[0]["s_per_step"]
    print("\n| variant | s/step | × the first | longest batch (s) | process peak RSS (GiB) |\n|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['variant']} | {r['s_per_step']:.2f} | {r['s_per_step'] / base:.2f} | {r['longest_batch_s']:.1f} | "
            f"{r['peak_rss_gib']:.2f} |"
        )
    if a.output:
        a.output.write_text(json.dumps({"config": a.config, "steps": a.steps, "results": results}, indent=1))


if __name__ == "__main__":
    main()
