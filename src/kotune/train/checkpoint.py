"""Atomic training checkpoints.

A checkpoint is written into a temporary folder and renamed into place, so a
kill during a save leaves either the previous checkpoints or the new one —
never a half-written folder that resume would pick up. A save that fails (a full
disk) removes its partial folder; a checkpoint damaged after it was written is
named on resume, which falls back to the one before it (`load_intact`).
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from ..errors import CheckpointError, TrainError
from ..runfolder import CKPT_STATE as STATE
from ..runfolder import CKPT_WEIGHTS as WEIGHTS
from ..runfolder import checkpoint_dir, list_checkpoints
from . import distributed as dd


def save_checkpoint(root: Path, step: int, trainable: dict, state: dict, keep: int) -> Path:
    import torch
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(root, step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, str(tmp / WEIGHTS))
        torch.save(state, tmp / STATE)
        for f in tmp.iterdir():  # data on disk before the rename makes it visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    except Exception as e:  # a full disk surfaces as OSError from torch and as SafetensorError from safetensors
        shutil.rmtree(tmp, ignore_errors=True)
        full = getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e)
        then = "continue with `--resume`" if list_checkpoints(root) else "train again"
        reason = "the disk is full; free some space" if full else f"{str(e).splitlines()[0][:200]}; fix that"
        raise CheckpointError(
            f"could not write checkpoint {final}: {reason}, then {then}. The partial checkpoint was removed."
        ) from e
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-*"):  # left by a process killed mid-save
        if stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> tuple[dict, dict]:
    """(trainable weights, state); a file that cannot be read raises CheckpointError naming it."""
    import torch
    from safetensors.torch import load_file

    try:
        weights = load_file(str(path / WEIGHTS))
    except Exception as e:
        raise CheckpointError(f"{path / WEIGHTS}: unreadable ({str(e).splitlines()[0][:160]})") from None
    try:
        state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path / STATE}: unreadable ({str(e).splitlines()[0][:160]})") from None
    if "step" not in state or "optimizer" not in state:
        raise CheckpointError(f"{path / STATE}: not a kotune checkpoint state (no step or optimizer state)")
    return weights, state


def load_intact(path: Path, warn) -> tuple[Path, dict, dict]:
    """The newest checkpoint under `path` (a run, a checkpoints folder or one checkpoint) that loads. A broken
    newer one (truncated by a kill or a full disk) is reported through `warn` and the one before it is used;
    a checkpoint named directly is used or refused, never replaced by another."""
    if (path / STATE).is_file() or (path / WEIGHTS).is_file():
        candidates = [path]
    else:
        candidates = next((c for c in (list_checkpoints(path), list_checkpoints(path / "checkpoints")) if c), [])
    if not candidates:
        raise CheckpointError(f"no checkpoint found in {path}; train without --resume first.")
    broken = []
    for c in reversed(candidates):
        try:
            weights, state = load_checkpoint(c)
        except CheckpointError as e:
            broken.append(str(e))
            warn(f"{e}; " + ("trying the checkpoint before it" if c != candidates[0] else "no earlier checkpoint"))
            continue
        return c, weights, state
    raise CheckpointError(
        "no intact checkpoint to resume from:\n"
        + "\n".join(f"  - {b}" for b in broken)
        + "\nStart over with `--overwrite` (the broken run is kept until the new one finishes)."
    )


def restore_training_state(start: tuple, params: dict, opt, early, d, device: str) -> tuple[int, list]:
    """Load a checkpoint (path, weights, state) into the trainable tensors, optimizer, RNGs and early stopping;
    returns (step, the epoch's loss accumulator)."""
    import torch

    start_ckpt, weights, state = start
    missing = set(params) - set(weights)
    if missing:
        raise TrainError(f"{start_ckpt} does not match this model/LoRA config (missing {sorted(missing)[:3]}…).")
    dd.copy_into(params, weights)
    dd.load_optimizer_state(opt, state["optimizer"])
    rngs = state.get("rng_cpu_ranks") or [state["rng_cpu"]]
    torch.set_rng_state(rngs[d.rank] if len(rngs) == d.world else state["rng_cpu"])
    if device.startswith("cuda") and "rng_cuda" in state:
        torch.cuda.set_rng_state(state["rng_cuda"])
    early.restore(state.get("early"))
    return int(state["step"]), list(state.get("epoch_acc") or [0.0, 0])


def save_training_state(root: Path, at: int, params: dict, opt, state: dict, keep: int | None, device: str, d) -> Path:
    """Write checkpoint `at` (trainable tensors, optimizer, RNGs and `state`); every process takes part."""
    import torch

    # Collectives first: every process takes part (gathering FSDP / ZeRO shards, RNG states).
    weights, opt_state, rngs = dd.unsharded(params), dd.optimizer_state(opt), dd.gather(torch.get_rng_state(), d)
    path = None
    if d.main:
        state = {**state, "optimizer": opt_state, "rng_cpu": rngs[0], "rng_cpu_ranks": rngs}
        if device.startswith("cuda"):
            state["rng_cuda"] = torch.cuda.get_rng_state()
        path = save_checkpoint(root, at, weights, state, keep)
    dd.barrier(d)
    return path or checkpoint_dir(root, at)
