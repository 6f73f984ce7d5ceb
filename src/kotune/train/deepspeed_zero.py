"""DeepSpeed ZeRO-2/3 as the engine of kotune's training loop (`accelerate launch` with a DeepSpeed config).

`deepspeed.initialize` takes the same `TaskLoss` module DDP and FSDP wrap, with the loop's torch
AdamW as a client optimizer, so ZeRO partitions the state of the optimizer single-process training
uses and the update stays the same. The loop drives the engine the way DeepSpeed expects:

- each micro-batch: `engine(batch)`, then `engine.backward(loss, scale_wrt_gas=False)`; the loss
  is already divided by the global step's trained-unit count (and multiplied by the world size,
  as ZeRO averages gradients over processes like DDP), so DeepSpeed must not divide it by the
  accumulation steps again. `set_gradient_accumulation_boundary` marks the step's last micro-batch:
  DeepSpeed's own `no_sync` is refused under ZeRO-2/3.
- each optimizer step: `engine.step()`, which clips (`gradient_clipping` = training.max_grad_norm),
  steps and zeroes the gradients; the loop sets the learning rate on the param groups before.

Checkpoints stay in kotune's single-process format (full trainable weights, torch AdamW's
`state_dict`): DeepSpeed's `safe_get_full_*` API gathers them, and a resume scatters them back,
so a run can be continued under DeepSpeed, DDP, FSDP or one process alike. `deepspeed` is an
optional dependency (extra `deepspeed`), imported only here.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

log = logging.getLogger("kotune")

# Set by kotune from its own config; a DeepSpeed config file may only say "auto" for them.
_OWN = {
    "train_batch_size": "data.batch_size",
    "train_micro_batch_size_per_gpu": "data.batch_size",
    "gradient_accumulation_steps": "memory.gradient_accumulation_steps",
    "gradient_clipping": "training.max_grad_norm",
}
_PASSED = ("steps_per_print", "wall_clock_breakdown")


def require():
    try:
        import deepspeed
    except ImportError as e:
        raise ValueError(
            f"DeepSpeed is not installed ({e}): pip install 'kotune[deepspeed]', or use "
            "configs/accelerate/fsdp.yaml (torch FSDP2). See docs/distributed.md."
        ) from None
    return deepspeed


def settings(
    env=os.environ, accumulation: int | None = None, max_grad_norm: float | None = None
) -> tuple[dict, dict, list[str]]:
    """The ZeRO settings `accelerate launch` exports (ACCELERATE_DEEPSPEED_*), or its `deepspeed_config_file`, checked.

    Returns (zero_optimization section, other passed-through keys, notes for the log). As for
    FSDP, settings kotune cannot honour are an error rather than silently dropped."""
    problems, notes, zero, extra = [], [], {}, {}
    path = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if path:
        try:
            cfg = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"DeepSpeed config file {path}: {e}") from None
        for key, value in cfg.items():
            if key in _OWN:
                if value != "auto":
                    problems.append(f'{key} is set from {_OWN[key]}: write "auto" or leave it out')
            elif key in ("fp16", "bf16"):
                if isinstance(value, dict) and value.get("enabled", False) not in (False, "auto"):
                    problems.append(
                        f"{key}.enabled is not supported (never tested): memory.mixed_precision sets autocast"
                    )
            elif key == "zero_optimization":
                zero = dict(value)
                # Hugging Face's integrations fill in "auto" from the model; DeepSpeed's own config expects numbers.
                problems += [
                    f'zero_optimization.{k}: "auto" is not resolved by kotune; give a value or leave it out'
                    for k, v in zero.items()
                    if v == "auto"
                ]
            elif key in _PASSED:
                extra[key] = value
            else:
                problems.append(f"{key} is not supported by kotune")
        zero.setdefault("stage", 0)  # DeepSpeed's default
    else:
        zero["stage"] = int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))
        for var, key in (
            ("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "offload_optimizer"),
            ("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "offload_param"),
        ):
            if env.get(var, "none") != "none":
                zero[key] = {"device": env[var]}
    if zero["stage"] not in (2, 3):
        problems.append(
            f"zero_stage {zero['stage']} is not supported: 2 or 3 (for data parallelism without "
            "sharding use configs/accelerate/ddp.yaml)"
        )
    for key in ("offload_optimizer", "offload_param"):
        device = (zero.get(key) or {}).get("device", "none")
        if device not in ("none", None):
            problems.append(f"{key} to {device} is not supported (never tested with kotune)")
    if zero.get("zero_hpz_partition_size", 1) != 1 or zero.get("mics_shard_size", -1) > 0:
        problems.append(
            "zero_hpz_partition_size / mics_shard_size are not supported: kotune assumes one partition per process"
        )
    if problems:
        raise ValueError("accelerate DeepSpeed config: " + "; ".join(problems) + ". See docs/distributed.md.")
    if env.get("ACCELERATE_MIXED_PRECISION", "no") != "no":
        notes.append(
            "accelerate's mixed_precision is ignored: DeepSpeed runs without its fp16/bf16 modes; "
            "memory.mixed_precision sets autocast"
        )
    own = env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    if own and accumulation is not None and own != str(accumulation):
        notes.append(
            f"accelerate's gradient_accumulation_steps {own} is ignored: "
            f"memory.gradient_accumulation_steps ({accumulation}) is passed to DeepSpeed"
        )
    own = env.get("ACCELERATE_GRADIENT_CLIPPING")
    if own and own != "none" and max_grad_norm is not None and float(own) != float(max_grad_norm or 0):
        notes.append(
            f"accelerate's gradient_clipping {own} is ignored: training.max_grad_norm ({max_grad_norm}) "
            "is passed to DeepSpeed"
        )
    if env.get("ACCELERATE_DEEPSPEED_ZERO3_INIT", "false") == "true":
        notes.append(
            "zero3_init_flag is ignored: every process loads the whole model, then deepspeed.initialize partitions it"
        )
    if env.get("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL", "false") == "true":
        notes.append(
            "zero3_save_16bit_model is ignored: the adapter/model is always gathered and saved by rank 0 "
            "in its normal format"
        )
    return zero, extra, notes


def initialize(
    root,
    model,
    opt,
    params: dict,
    rank: int,
    world: int,
    device: str,
    *,
    accumulation: int,
    max_grad_norm: float,
    batch_size: int,
):
    """`deepspeed.initialize` on the TaskLoss `root` and the torch optimizer `opt`.
    Returns (engine, ZeroOptimizer); `params` (the trainable ones, in `opt`'s order) stay valid."""
    ds = require()
    zero, extra, notes = settings(accumulation=accumulation, max_grad_norm=max_grad_norm)
    for note in notes if rank == 0 else []:
        log.warning("DeepSpeed: %s", note)
    if zero["stage"] == 3:
        # The causal-LM loss multiplies by the LM head's weight directly (only at answer positions), not
        # through the head module's forward, so ZeRO-3's hooks would leave it partitioned: gather it for
        # the whole forward and backward of the root.
        hf = model.get_base_model() if hasattr(model, "get_base_model") else model
        head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
        if head is not None:
            ds.zero.register_external_parameter(root, head.weight)
    groups = opt.state_dict()["param_groups"]  # before ZeRO swaps the parameters for its flat partitions
    config = {
        "train_micro_batch_size_per_gpu": max(1, math.ceil(batch_size / world)),
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": float(max_grad_norm or 0.0),
        "zero_optimization": zero,
        # torch's AdamW, not DeepSpeed's: the update single-process training makes.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        **extra,
    }
    engine, zopt, _, _ = ds.initialize(model=root, optimizer=opt, config=config)
    trainable = list(params.values())
    # ZeRO-3 keeps parameters under stage3_param_persistence_threshold whole between forward passes.
    split = sum(1 for p in trainable if hasattr(p, "ds_id") and not p.ds_persist)
    log.info(
        "DeepSpeed ZeRO-%d (%s, %d processes): %s over torch %s; %d trainable tensors, %d of them partitioned "
        "between forward passes",
        engine.zero_optimization_stage(),
        "nccl" if device.startswith("cuda") else "gloo",
        world,
        type(zopt).__name__,
        type(opt).__name__,
        len(trainable),
        split,
    )
    return engine, ZeroOptimizer(engine, trainable, groups, rank)


def _flat_partitions(zo) -> list:
    """This process's fp32 partitions, the tensors ZeRO's inner (torch) optimizer keeps state for."""
    flat = getattr(zo, "fp32_partitioned_groups_flat", None)  # ZeRO-3
    return list(flat if flat is not None else zo.single_partition_of_fp32_groups)  # ZeRO-1/2


def _set_full(p, value, rank: int, key: str | None = None) -> None:
    """Write a full tensor into p's fp32 master (key None) or optimizer state `key`, partitioned."""
    import torch
    from deepspeed import utils as du

    value = value.detach().to(torch.float32)
    if not hasattr(p, "ds_id"):  # ZeRO-1/2
        du.safe_set_full_fp32_param(p, value) if key is None else du.safe_set_full_optimizer_state(p, value, key)
        return
    # ZeRO-3: DeepSpeed 0.19.8's safe_set_full_* slices past the end of a parameter whose size the world
    # size does not divide (RuntimeError on the last rank), so take this process's padded slice here.
    n = p.ds_tensor.numel()
    local = torch.zeros(n, dtype=torch.float32)
    piece = value.flatten()[rank * n : (rank + 1) * n]
    local[: piece.numel()] = piece
    du.safe_set_local_fp32_param(p, local) if key is None else du.safe_set_local_optimizer_state(p, local, key)


class ZeroOptimizer:
    """What the loop calls its optimizer under DeepSpeed: the engine steps, and the state is read and
    written in torch AdamW's single-process format (collectives: every process must call them)."""

    def __init__(self, engine, params: list, groups: list[dict], rank: int):
        self.engine, self.params, self.groups, self.rank = engine, params, groups, rank

    @property
    def param_groups(self) -> list[dict]:
        return self.engine.optimizer.param_groups

    def step(self) -> None:
        self.engine.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass  # engine.step() zeroes the gradients at the accumulation boundary

    def state_dict(self) -> dict:
        from deepspeed.utils import safe_get_full_optimizer_state

        zo = self.engine.optimizer
        flat = _flat_partitions(zo)[0]
        inner = zo.optimizer.state.get(flat, {})  # empty until the first step
        keys = [k for k, v in inner.items() if k != "step" and hasattr(v, "shape") and v.shape == flat.shape]
        state = {}
        for i, p in enumerate(self.params):
            full = {k: safe_get_full_optimizer_state(p, k).detach().cpu() for k in keys}
            if inner:
                state[i] = {"step": inner["step"].detach().clone().cpu(), **full}
        lr = zo.param_groups[0]["lr"]
        return {"state": state, "param_groups": [{**g, "lr": lr} for g in self.groups]}

    def load_state_dict(self, sd: dict) -> None:
        import torch

        zo = self.engine.optimizer
        saved = sd["state"]
        if saved:
            first = saved[min(saved)]
            # The inner optimizer creates its state at its first step; create it now (as torch's AdamW
            # would), then overwrite each parameter's slice of it.
            for flat in _flat_partitions(zo):
                st = zo.optimizer.state[flat]
                for k, v in first.items():
                    st[k] = torch.as_tensor(v).clone() if k == "step" else torch.zeros_like(flat)
            if not hasattr(zo, "fp32_partitioned_groups_flat"):
                # ZeRO-1/2 link each parameter to its piece of that state only after the first step.
                from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

                for lp, flat in zip(zo.bit16_groups, zo.single_partition_of_fp32_groups):
                    lazy_init_hp_params_optimizer_state(lp, flat, zo.optimizer.state)
            for i, p in enumerate(self.params):
                for k, v in saved[i].items():
                    if k != "step":
                        _set_full(p, v, self.rank, k)
        hyper = {k: v for k, v in sd["param_groups"][0].items() if k != "params"}
        for g in zo.param_groups:
            g.update(hyper)


def gathered(tensors: dict) -> dict:
    """Full copies of ZeRO-3-partitioned tensors (a collective); others are returned as they are."""
    import torch

    GatheredParameters = require().zero.GatheredParameters
    full: dict[int, object] = {}  # tied weights stay one tensor, as save_pretrained expects
    with torch.no_grad():
        for v in tensors.values():
            if id(v) in full:
                continue
            if hasattr(v, "ds_id"):
                with GatheredParameters([v]):  # one at a time: never the whole model at once
                    full[id(v)] = v.detach().clone().cpu()
            else:
                full[id(v)] = v
    return {k: full[id(v)] for k, v in tensors.items()}


def copy_into(params: dict, weights: dict, rank: int) -> None:
    """Load full tensors into the model's parameters and into ZeRO's fp32 master copies
    (which the next step starts from)."""
    import torch

    GatheredParameters = require().zero.GatheredParameters
    with torch.no_grad():
        for k, v in weights.items():
            p = params[k]
            if hasattr(p, "ds_id"):  # ZeRO-3: every process writes the same values; rank 0's are kept
                with GatheredParameters([p], modifier_rank=0):
                    p.data.copy_(v.to(p.dtype))
            else:
                p.data.copy_(v.to(device=p.device, dtype=p.dtype))
            if p.requires_grad:
                _set_full(p, v, rank)
