"""What one training step is made of: which rows form each micro-batch (`BatchPlan`), the accumulated gradients of a
step's micro-batches, the learning-rate schedule, the trainable tensors, and the held-out evaluation. `loop.py` runs
them in order."""

from __future__ import annotations

import math

from ..prepare import epoch_batches, split_by_tokens
from ..tasks import classification_metrics, collate, confusion, count, item_length
from . import distributed as dd


def accumulate_gradients(
    model,
    batches: list[dict],
    device: str,
    autocast,
    task: str = "causal-lm",
    n_total: int | None = None,
    *,
    weights: list[float] | None = None,
    world: int = 1,
) -> tuple[float, int, int]:
    """Backward over the micro-batches of one optimizer step; `model` is what
    `distributed.wrap` returns (forward(batch) -> the task's loss sum).

    Each micro-batch's loss sum is divided by the trained-unit count of the whole step
    (`n_total`: of the global step across processes), so the gradient is the same as for
    one big batch however the rows are split, padded or spread over processes. DDP, FSDP
    and ZeRO average gradients over the `world` processes, hence the factor `world`.
    A batch of weight 0 is a filler: this process's slice was empty, but it must still
    take part in the engine's collectives. Gradients are synchronised in the backward of
    the last micro-batch only. Returns (loss sum, trained units, non-pad tokens) of the real batches."""
    weights = weights or [1.0] * len(batches)
    local = sum(count(task, b) for b, w in zip(batches, weights) if w)
    n_tok = n_total if n_total is not None else local
    total, real = 0.0, 0
    for i, (b, w) in enumerate(zip(batches, weights)):
        b = {k: v.to(device) for k, v in b.items()}
        with dd.no_sync(model, sync=i == len(batches) - 1):
            with autocast():
                s = model(b)[0]
            dd.backward(model, s * (w * world) / max(n_tok, 1))
        if w:
            total += float(s.detach())
            real += int(b["attention_mask"].sum())
    return total, local, real


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def trainable_state(model) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


class BatchPlan:
    """Which rows form each micro-batch: a pure function of (seed, epoch), so a resumed run sees the same order."""

    def __init__(
        self,
        rows: list,
        lengths: list[int],
        batch_size: int,
        seed: int,
        group_by_length: bool,
        max_batch_tokens: int | None,
        pad: int,
        d: dd.Dist,
    ):
        self.rows, self.lengths, self.bs, self.seed, self.group = rows, lengths, batch_size, seed, group_by_length
        self.max_tokens, self.pad, self.d = max_batch_tokens, pad, d
        self.n_batches = math.ceil(len(rows) / batch_size)
        self._epoch: tuple[int, list[list[int]]] | None = None

    def micro_batches(self, m: int) -> list[tuple[dict, float]]:
        """This process's share of global micro-batch m, with its weight: 0 for a one-row filler when the slice
        is empty (the engines' collectives need every process). One process alone splits a batch over
        `data.max_batch_tokens` into smaller ones; several must run the same number of micro-batches."""
        epoch, k = divmod(m, self.n_batches)
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, epoch_batches(self.lengths, self.bs, self.seed, epoch, self.group))
        batch = self._epoch[1][k]
        rows = dd.shard(batch, self.d)
        if not rows:
            return [(collate([self.rows[i] for i in batch[:1]], self.pad), 0.0)]
        parts = split_by_tokens(rows, self.lengths, self.max_tokens) if self.d.world == 1 else [rows]
        return [(collate([self.rows[i] for i in part], self.pad), 1.0) for part in parts]


def evaluate_loss(model, runner, rows: list, bs: int, pad: int, n_labels: int, device: str, autocast, d: dd.Dist):
    """Held-out loss (and, for classification, accuracy and macro-F1) over every process's share of `rows`."""
    import torch

    if not rows:
        return None
    model.eval()
    tot, n = 0.0, 0
    cm = torch.zeros((n_labels, n_labels), dtype=torch.long)
    order = sorted(range(len(rows)), key=lambda i: item_length(rows[i]))
    with torch.no_grad(), autocast():
        for k in range(0, len(order), bs):
            mine = dd.shard(order[k : k + bs], d)
            # Under FSDP and ZeRO-3 every forward gathers parameters, so a process with no rows runs a filler.
            b = {kk: v.to(device) for kk, v in collate([rows[i] for i in mine or order[k : k + 1]], pad).items()}
            s, c, preds = runner(b)
            if not mine:
                continue
            tot, n = tot + float(s), n + c
            if preds is not None:
                cm += confusion(preds, b["labels"], n_labels)
    model.train()
    tot, n = dd.all_sum([tot, float(n)], d)
    res = {"eval_loss": tot / max(n, 1)}
    if n_labels:
        res.update(classification_metrics(dd.all_sum_tensor(cm, d)))
    return res
