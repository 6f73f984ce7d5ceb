"""Training across processes started by `torchrun` or `accelerate launch`, through torch's own engines.

Both launchers set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; kotune
reads them, so no launcher-specific code is needed. Every process takes its slice of
every global batch, and the model is handed to one of torch's engines:

- DDP (default): `torch.nn.parallel.DistributedDataParallel`. Every process holds the
  whole model; DDP's autograd hooks all-reduce the gradients of the trainable (LoRA)
  parameters in buckets during the backward of the last micro-batch of each optimizer
  step (`no_sync` for the others).
- FSDP (`accelerate launch` with an FSDP config): torch's FSDP2 `fully_shard` on every
  transformer block and on the root; parameters, gradients and optimizer state are
  sharded over the processes.
- DeepSpeed ZeRO-2/3 (`accelerate launch` with a DeepSpeed config): `deepspeed.initialize`
  on the same root and the loop's optimizer (`deepspeed_zero.py`).

All of them wrap `TaskLoss`, a module whose forward is the task's loss sum: the causal-LM loss
calls the model body and the LM head directly (the head only at answer positions), which
would bypass a wrapped Hugging Face model's own forward and so the engine's hooks.
Losses are divided by the trained-unit count of the *global* step and multiplied by the
world size (the engines average gradients over processes), so N processes compute the
update one process computes on the same global batch.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass

from ..tasks import loss_sum
from . import deepspeed_zero as dz
from .deepspeed_zero import copy_into as zero_copy_into
from .deepspeed_zero import gathered

log = logging.getLogger("kotune")
_TRUE = ("1", "true", "yes")


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    engine: str = "none"  # "ddp", "fsdp", "deepspeed" (world > 1) or "none"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def sharded(self) -> bool:
        return self.engine == "fsdp"


def from_env() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Dist()
    return Dist(
        rank=int(os.environ.get("RANK", "0")),
        world=world,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        engine={"FSDP": "fsdp", "DeepSpeed": "deepspeed"}.get(engine_requested() or "", "ddp"),
    )


def exit_hard_after_training() -> bool:
    """A DeepSpeed process that finished training should leave with os._exit: on CPU (gloo), interpreter teardown
    after DeepSpeed's communication ops sometimes hangs about 30 s and then aborts ("terminate called without an
    active exception"), and the launcher reports a finished run as failed. Seen once in about 35 two-process
    launches; without it each launch also spent about 1.5 s more in teardown."""
    return engine_requested() == "DeepSpeed" and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def engine_requested() -> str | None:
    """`accelerate launch` with an FSDP or DeepSpeed config announces it in the environment."""
    for var, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if os.environ.get(var, "").lower() in _TRUE:
            return name
    return None


def engine_problem(d: Dist, quantization: str) -> str | None:
    """Why this launch cannot train, checked before anything is loaded (None when it can)."""
    asked = engine_requested()
    if asked and not d.enabled:
        # Training on anyway would quietly ignore the engine the config names (and its memory savings).
        return (
            f"accelerate launch asked for {asked} but started a single process, and {asked} needs two or more: "
            f"pass --num_processes 2 (or more), or train one process without the {asked} config (plain `kotune train`)."
        )
    if d.engine == "deepspeed":
        if quantization != "none":
            return (
                "DeepSpeed with model.quantization (bitsandbytes) is not supported (never tested): "
                "use DDP (configs/accelerate/ddp.yaml) with 4bit/8bit."
            )
        try:
            dz.require()
            dz.settings()
        except ValueError as e:
            return str(e)
        return None
    if not d.sharded:
        return None
    if quantization != "none":
        return (
            "FSDP with model.quantization (bitsandbytes) is not supported: shard an unquantized model, "
            "or use DDP (configs/accelerate/ddp.yaml) with 4bit/8bit."
        )
    try:
        fsdp_settings()
    except ValueError as e:
        return str(e)
    return None


def fsdp_settings(env=os.environ) -> tuple[dict, list[str]]:
    """The FSDP settings `accelerate launch` exports from its config (FSDP_*), checked.

    Returns (settings, notes for the log). Settings kotune cannot honour are an error,
    not silently dropped: the user would believe they are in effect."""

    def flag(name: str, default: str = "false") -> bool:
        return env.get(name, default).lower() in _TRUE

    problems, notes = [], []
    if env.get("FSDP_VERSION", "2") != "2":
        problems.append("fsdp_version must be 2: kotune shards with FSDP2 (torch.distributed.fsdp.fully_shard)")
    policy = env.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")
    if policy not in ("TRANSFORMER_BASED_WRAP", "NO_WRAP"):
        problems.append(f"fsdp_auto_wrap_policy {policy} is not supported (TRANSFORMER_BASED_WRAP or NO_WRAP)")
    if flag("FSDP_OFFLOAD_PARAMS"):
        problems.append("fsdp_offload_params: true is not supported (never tested with kotune)")
    if flag("FSDP_ACTIVATION_CHECKPOINTING"):
        problems.append("fsdp_activation_checkpointing: true is not supported; use memory.gradient_checkpointing")
    if problems:
        raise ValueError("accelerate FSDP config: " + "; ".join(problems) + ". See docs/distributed.md.")
    if flag("FSDP_CPU_RAM_EFFICIENT_LOADING"):
        notes.append("fsdp_cpu_ram_efficient_loading is ignored: every process loads the whole model, then shards it")
    if env.get("FSDP_STATE_DICT_TYPE", "FULL_STATE_DICT") != "FULL_STATE_DICT":
        notes.append(
            "fsdp_state_dict_type is ignored: checkpoints and the adapter are always saved unsharded by rank 0"
        )
    if env.get("ACCELERATE_MIXED_PRECISION", "no") != "no":
        notes.append("accelerate's mixed_precision is ignored: memory.mixed_precision sets autocast")
    classes = [c.strip() for c in env.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if c.strip()]
    return {
        "wrap": policy == "TRANSFORMER_BASED_WRAP",
        "classes": classes,
        "reshard_after_forward": flag("FSDP_RESHARD_AFTER_FORWARD", "true"),
    }, notes


def init(d: Dist, device: str) -> None:
    if not d.enabled:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        # On GPUs the small CPU collectives (token counts, metrics, RNG states) need gloo beside nccl.
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.startswith("cuda") else "gloo")


def shutdown(d: Dist) -> None:
    if d.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def shard(items: list, d: Dist) -> list:
    """This process's rows of one global batch (may be empty when the batch is short)."""
    return items[d.rank :: d.world] if d.enabled else items


# ---------------------------------------------------------------- the engines


def task_loss(task: str, model):
    """The module DDP / FSDP wrap: forward(batch) -> (loss sum, trained units, predictions or None)."""
    import torch

    class TaskLoss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, batch: dict):
            return loss_sum(task, self.model, batch)

    return TaskLoss()


def wrap(model, task: str, d: Dist, device: str):
    """`TaskLoss` around `model`, under DDP or FSDP when there are several processes (logged).
    Under FSDP the model's parameters are replaced by sharded ones: build the optimizer afterwards.
    DeepSpeed takes the root over together with the optimizer, in `deepspeed_initialize`."""
    root = task_loss(task, model)
    if not d.enabled or d.engine == "deepspeed":
        return root
    if d.sharded:
        settings, notes = fsdp_settings()
        for note in notes if d.main else []:
            log.warning("FSDP: %s", note)
        root, desc = _fully_shard(root, model, d, device, settings)
        log.info("%s", desc)
        return root
    from torch.nn.parallel import DistributedDataParallel as DDP

    # Frozen base weights are identical everywhere (every process loads the same files): DDP
    # would skip them in the all-reduce anyway, and ignoring them also spares broadcasting
    # the whole base model (or its quantized blocks) from rank 0 at start.
    frozen = [n for n, p in root.named_parameters() if not p.requires_grad]
    DDP._set_params_and_buffers_to_ignore_for_model(root, frozen)
    # find_unused_parameters=False: every trainable tensor (LoRA, a new head) lies on the path
    # of every loss, and a process with nothing to train runs a zero-weighted filler batch.
    # Buffers (rotary tables, masks) are constants, so they are not re-broadcast every forward
    # (`broadcast_buffers` is deprecated for this from torch 2.13 on).
    import inspect

    quiet = (
        "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else "broadcast_buffers"
    )
    ddp = DDP(
        root,
        device_ids=[d.local_rank] if device.startswith("cuda") else None,
        find_unused_parameters=False,
        **{quiet: False},
    )
    info = ddp._get_ddp_logging_data()  # what the reducer really registered, for the log and the tests
    log.info(
        "DistributedDataParallel (%s, %d processes): all-reduces %s trainable tensors (%s bytes); "
        "%d frozen tensors not registered",
        info.get("backend_name"),
        d.world,
        info.get("num_parameter_tensors"),
        info.get("total_parameter_size_bytes"),
        len(frozen),
    )
    return ddp


def _fully_shard(root, model, d: Dist, device: str, settings: dict):
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        raise ValueError("FSDP needs torch >= 2.6 (torch.distributed.fsdp.fully_shard).") from None

    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(settings.get("classes") or getattr(hf, "_no_split_modules", None) or [])
    blocks = [m for m in root.modules() if type(m).__name__ in names] if settings.get("wrap", True) else []
    if settings.get("wrap", True) and not blocks:
        raise ValueError(
            f"FSDP: no module of class {sorted(names) or '(none named)'} in {type(hf).__name__}; "
            "set fsdp_transformer_layer_cls_to_wrap in the accelerate config."
        )
    kinds = sorted({type(m).__name__ for m in blocks})  # before fully_shard renames the classes
    mesh = init_device_mesh(device.split(":")[0], (d.world,))
    reshard = settings.get("reshard_after_forward", True)
    for m in blocks:
        fully_shard(m, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(root, mesh=mesh, reshard_after_forward=reshard)
    desc = (
        f"FSDP2 fully_shard ({'nccl' if device.startswith('cuda') else 'gloo'}, {d.world} processes): "
        f"{len(blocks)} blocks ({', '.join(kinds) or 'none'}) + root, reshard_after_forward={reshard}"
    )
    return root, desc


def deepspeed_initialize(runner, model, opt, params: dict, d: Dist, device: str, **kw):
    """(engine, its optimizer) under DeepSpeed; (runner, opt) unchanged otherwise."""
    if d.engine != "deepspeed":
        return runner, opt

    return dz.initialize(runner, model, opt, params, d.rank, d.world, device, **kw)


def _is_deepspeed(module) -> bool:
    return hasattr(module, "set_gradient_accumulation_boundary")


def backward(module, loss) -> None:
    if _is_deepspeed(module):
        # The loss is already divided by the step's trained-unit count: no division by the accumulation steps.
        module.backward(loss, scale_wrt_gas=False)
    else:
        loss.backward()


@contextmanager
def no_sync(module, sync: bool):
    """Gradients stay local (accumulate) unless `sync`: the last micro-batch of an optimizer step."""
    if _is_deepspeed(module):  # ZeRO-2/3 refuse `no_sync`; the boundary tells them which backward ends the step
        module.set_gradient_accumulation_boundary(sync)
        yield
        return
    if sync:
        yield
        return
    if hasattr(module, "no_sync"):  # DDP
        with module.no_sync():
            yield
        return
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2: the flag is read in backward
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
        return
    yield


# ---------------------------------------------------------------- sharded state (FSDP, ZeRO), unchanged otherwise


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _zero3(tensors) -> bool:
    return any(hasattr(v, "ds_id") for v in tensors)


def _zero(tensors) -> bool:
    """Parameters DeepSpeed ZeRO keeps fp32 master copies of (the attributes its safe_get_* API checks)."""
    return any(hasattr(v, "ds_id") or hasattr(v, "_hp_mapping") for v in tensors)


def unsharded(tensors: dict) -> dict:
    """Full tensors for sharded (FSDP, ZeRO-3) ones — a collective: every process must call it."""
    import torch

    if _zero3(tensors.values()):
        return gathered(tensors)
    if not any(_is_dtensor(v) for v in tensors.values()):
        return tensors
    full: dict[int, object] = {}  # tied weights (embeddings = LM head) stay one tensor, as save_pretrained expects
    with torch.no_grad():
        for v in tensors.values():
            if id(v) not in full:
                full[id(v)] = v.full_tensor().cpu() if _is_dtensor(v) else v
    return {k: full[id(v)] for k, v in tensors.items()}


def copy_into(params: dict, weights: dict) -> None:
    """Load full tensors into parameters that may be sharded (each process keeps its part)."""
    import torch

    if _zero(params.values()):
        import torch.distributed as dist

        return zero_copy_into(params, weights, dist.get_rank())

    with torch.no_grad():
        for k, v in weights.items():
            p = params[k]
            v = v.to(device=p.device, dtype=p.dtype)
            if _is_dtensor(p):
                from torch.distributed.tensor import distribute_tensor

                v = distribute_tensor(v, p.device_mesh, p.placements, src_data_rank=None)  # slices locally, no traffic
            p.copy_(v)


def optimizer_state(opt) -> dict:
    """`opt.state_dict()` with sharded state gathered (collective under FSDP), so a checkpoint
    has one format whatever wrote it."""
    sd = opt.state_dict()
    if not any(_is_dtensor(v) for s in sd["state"].values() for v in s.values()):
        return sd
    state = {
        i: {k: v.full_tensor().cpu() if _is_dtensor(v) else v for k, v in s.items()} for i, s in sd["state"].items()
    }
    return {**sd, "state": state}


def load_optimizer_state(opt, sd: dict) -> None:
    opt.load_state_dict(sd)
    for group in opt.param_groups:
        for p in group["params"]:
            if not _is_dtensor(p):
                continue
            from torch.distributed.tensor import distribute_tensor

            st = opt.state.get(p, {})
            for k, v in st.items():
                if not _is_dtensor(v) and v.shape == p.shape:  # exp_avg / exp_avg_sq, not the step count
                    st[k] = distribute_tensor(v.detach(), p.device_mesh, p.placements, src_data_rank=None)


def model_state(model, lora: bool, params: dict) -> dict | None:
    """What `save_pretrained` needs under FSDP or ZeRO-3 (collective); None when the model is not sharded."""
    if not any(_is_dtensor(p) for p in params.values()) and not _zero3(model.parameters()):
        return None
    return unsharded(params if lora else model.state_dict(keep_vars=True))


# ---------------------------------------------------------------- small collectives


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
