"""Run metrics: the append-only `metrics.jsonl` and the loss-curve PNG."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    """Append-only JSON lines. On resume, lines past the checkpoint's step are
    dropped: they belong to steps that will be trained again."""

    def __init__(self, path: Path, truncate_after: int = 0):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_after and path.is_file():
            kept = [r for r in read_metrics(path) if r.get("step", 0) <= truncate_after]
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")
        elif not truncate_after:
            path.write_text("", encoding="utf-8")

    def write(self, record: dict) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def plot_losses(metrics_path: Path, png_path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    ev = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="train loss")
    if ev:
        ax.plot(*zip(*ev), marker="o", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per answer token")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
