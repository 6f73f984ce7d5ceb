"""Data-parallel training across processes started by `torchrun` or `accelerate launch`.

Both launchers set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; kotune
reads them, so no launcher-specific code is needed. Every process holds the whole
model and takes its slice of every global batch; after the backward pass the
gradients are summed across processes (one all-reduce of one flat buffer per
optimizer step — the arithmetic of DistributedDataParallel, without wrapping the
model, so the task losses may call parts of the model directly and a process
whose slice is empty simply contributes zeros). Losses are divided by the token
count of the *global* step, so N processes compute exactly the update one process
computes on the same global batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def from_env() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Dist()
    return Dist(rank=int(os.environ.get("RANK", "0")), world=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def sharding_engine_requested() -> str | None:
    """`accelerate launch` with an FSDP or DeepSpeed config announces it in the environment."""
    for var, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if os.environ.get(var, "").lower() in ("1", "true", "yes"):
            return name
    return None


def init(d: Dist, device: str) -> None:
    if not d.enabled:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")


def shutdown(d: Dist) -> None:
    if d.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def shard(items: list, d: Dist) -> list:
    """This process's rows of one global batch (may be empty when the batch is short)."""
    return items[d.rank::d.world] if d.enabled else items


def all_sum(values: list[float], d: Dist) -> list[float]:
    """Sum plain numbers over processes (float64, so token counts stay exact)."""
    if not d.enabled:
        return values
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def all_sum_tensor(t, d: Dist):
    if d.enabled:
        import torch.distributed as dist

        t = t.clone()
        dist.all_reduce(t)
    return t


def sum_gradients(params: list, d: Dist) -> None:
    """Sum the gradients of `params` over processes, in one flat buffer."""
    if not d.enabled:
        return
    import torch
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    k = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[k:k + n].view_as(p).to(p.dtype)
        k += n


def broadcast_params(params: list, d: Dist) -> None:
    """Start every process from rank 0's trainable weights (as DDP does)."""
    if not d.enabled:
        return
    import torch
    import torch.distributed as dist

    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


def any_true(flag: bool, d: Dist) -> bool:
    """A stop request seen by any process stops all of them at the same step."""
    return bool(all_sum([float(flag)], d)[0]) if d.enabled else flag


def gather(obj, d: Dist) -> list:
    if not d.enabled:
        return [obj]
    import torch.distributed as dist

    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def barrier(d: Dist) -> None:
    if d.enabled:
        import torch.distributed as dist

        dist.barrier()
