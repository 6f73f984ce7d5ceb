"""Early stopping: the best evaluation so far, the weights it was measured on, and how many evaluations have passed
without improving on it. Checkpoints carry it as a plain dict (`state()`), so a resumed run stops where the
uninterrupted one would, and checkpoints written before this class existed still load."""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger("kotune")


def improved(metric: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value < best if metric == "eval_loss" else value > best


@dataclass
class EarlyStop:
    metric: str | None  # training.early_stopping_metric; None: never stop early
    patience: int  # evaluations without improvement before stopping
    best: float | None = None
    best_step: int = 0
    bad: int = 0
    stopped: bool = False
    weights: dict | None = None  # a CPU copy of the trainable tensors at the best evaluation

    def update(self, ev: dict, step: int, params: dict) -> None:
        """Take one evaluation's metrics; `params` are the full (unsharded) trainable tensors."""
        if not self.metric:
            return
        value = ev[self.metric]
        if improved(self.metric, value, self.best):
            self.best, self.best_step, self.bad = value, step, 0
            self.weights = {k: v.detach().to("cpu", copy=True) for k, v in params.items()}
            return
        self.bad += 1
        if self.bad >= self.patience:
            self.stopped = True
            log.info(
                "early stop at step %d: %s has not improved on %.4f (step %d) for %d evaluations",
                step,
                self.metric,
                self.best,
                self.best_step,
                self.bad,
            )

    def state(self) -> dict:
        return {
            "best": self.best,
            "best_step": self.best_step,
            "bad": self.bad,
            "stopped": self.stopped,
            "weights": self.weights,
        }

    def restore(self, state: dict | None) -> None:
        for key, value in (state or {}).items():
            setattr(self, key, value)
