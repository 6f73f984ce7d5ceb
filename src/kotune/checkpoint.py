"""Atomic training checkpoints.

A checkpoint is written into a temporary folder and renamed into place, so a
kill during a save leaves either the previous checkpoints or the new one —
never a half-written folder that resume would pick up.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

PREFIX = "step-"
WEIGHTS = "trainable.safetensors"
STATE = "state.pt"


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step:07d}"


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / STATE).is_file() and (p / WEIGHTS).is_file()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX):]))


def find_checkpoint(path: Path) -> Path | None:
    """`path` is a checkpoint itself, a checkpoints folder, or a run folder."""
    if (path / STATE).is_file():
        return path
    for root in (path, path / "checkpoints"):
        found = list_checkpoints(root)
        if found:
            return found[-1]
    return None


def save_checkpoint(root: Path, step: int, trainable: dict, state: dict, keep: int) -> Path:
    import torch
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(root, step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, str(tmp / WEIGHTS))
    torch.save(state, tmp / STATE)
    for f in tmp.iterdir():  # data on disk before the rename makes it visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
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
    import torch
    from safetensors.torch import load_file

    weights = load_file(str(path / WEIGHTS))
    state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    return weights, state
