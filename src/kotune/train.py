"""Causal-LM supervised fine-tuning with LoRA: one straight training loop.

`train(cfg)` is the top-level entry point and the only function here that
sees the whole config. Data order is a pure function of (seed, step), so a
resumed run continues exactly where the checkpoint left it.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import time
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path

from . import checkpoint as ckpt
from .config import KotuneConfig
from .prepare import dry_run_report, epoch_batches, prepare
from .prompt import IGNORE, collate

log = logging.getLogger("kotune")


class TrainError(RuntimeError):
    pass


class Interrupted(Exception):
    """Raised after Ctrl+C once the checkpoint is safely written."""

    def __init__(self, checkpoint: Path):
        self.checkpoint = checkpoint
        super().__init__(f"interrupted; checkpoint saved at {checkpoint}")


# ---------------------------------------------------------------- logging

class _TqdmHandler(logging.Handler):
    def emit(self, record):
        from tqdm import tqdm

        tqdm.write(self.format(record))


def setup_logging(out_dir: Path | None, level: str, fmt: str) -> Path | None:
    log.setLevel(level)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    console = _TqdmHandler()
    console.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(console)
    if out_dir is None:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"training_{datetime.now():%Y%m%d_%H%M%S}.log"
    fh = logging.FileHandler(path, encoding="utf-8")
    fh.setFormatter(logging.Formatter(fmt))
    log.addHandler(fh)
    return path


# ---------------------------------------------------------------- model pieces

def answer_loss_sum(model, batch):
    """Sum of token losses over trained positions, and their count.

    The LM head runs only at trained positions: with Gemma's 262k vocabulary the
    full logits tensor would dominate time and memory."""
    import torch
    import torch.nn.functional as F

    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(hf, hf.base_model_prefix)
    hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    logits = hf.get_output_embeddings()(hidden[:, :-1][keep])
    cap = getattr(hf.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    loss = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
    return loss, int(keep.sum())


def accumulate_gradients(model, batches: list[dict], device: str, autocast) -> tuple[float, int, int]:
    """Backward over the micro-batches of one optimizer step. Each micro-batch's loss
    sum is divided by the trained-token count of the whole step, so the gradient is
    the same as for one big batch however the rows are split or padded.
    Returns (loss sum, trained tokens, non-pad tokens)."""
    n_tok = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
    total, real = 0.0, 0
    for b in batches:
        b = {k: v.to(device) for k, v in b.items()}
        with autocast():
            s, _ = answer_loss_sum(model, b)
        (s / n_tok).backward()
        total += float(s.detach())
        real += int(b["attention_mask"].sum())
    return total, n_tok, real


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def choose_precision(setting: str, device: str) -> str | None:
    """The autocast dtype name, or None for plain fp32."""
    import torch

    if setting == "no":
        return None
    if device == "cuda":
        if setting == "fp16":
            return "float16"
        if setting == "bf16" or torch.cuda.is_bf16_supported():
            return "bfloat16"
        return "float16"
    if setting == "fp16":
        raise TrainError("fp16 autocast is for CUDA GPUs; on CPU use `memory.mixed_precision: bf16` or `no`.")
    if setting == "bf16" or cpu_has_bf16():
        return "bfloat16"
    return None


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def trainable_state(model) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------- entry point

def train(cfg: KotuneConfig, *, resume: str | None = None, overwrite: bool = False, dry_run: bool = False):
    """Train and return the run folder (or, with dry_run, the report text)."""
    out = Path(cfg.model.output_dir)
    if dry_run:
        setup_logging(None, cfg.logging.level, cfg.logging.format)
        return dry_run_report(cfg, prepare(cfg))

    ckroot = out / "checkpoints"
    start_ckpt = None
    if resume:
        start_ckpt = ckpt.find_checkpoint(out if resume == "latest" else Path(resume))
        if start_ckpt is None:
            raise TrainError(f"no checkpoint found in {out if resume == 'latest' else resume}; train without --resume first.")
    elif ckpt.list_checkpoints(ckroot):
        if not overwrite:
            raise TrainError(f"{out} already holds checkpoints. Continue with `--resume`, start over with `--overwrite`, "
                             "or choose another `--output_dir`.")
        shutil.rmtree(ckroot)
        (out / "metrics.jsonl").unlink(missing_ok=True)

    log_path = setup_logging(out, cfg.logging.level, cfg.logging.format)
    import torch

    threads = cfg.training.num_threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    prep = prepare(cfg)
    for r in prep["reports"]:
        log.info(r.summary())
        for msg in r.problems + r.duplicates:
            log.warning("  %s", msg)
    for msg in prep["long_rows"]:
        log.warning("  too long (%s): %s", cfg.data.too_long, msg)
    log.info("train rows %d, eval rows %d; token length p50 %d, max %d", len(prep["train"]), len(prep["eval"]),
             prep["stats"]["p50"], prep["stats"]["max"])
    return _loop(cfg, prep, out, start_ckpt, log_path, threads)


def _loop(cfg: KotuneConfig, prep: dict, out: Path, start_ckpt: Path | None, log_path: Path | None, threads: int) -> Path:
    import torch

    from .model import add_lora, default_targets, load_base_model
    from .report import MetricsLog

    tok, train_set, eval_set = prep["tokenizer"], prep["train"], prep["eval"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    amp = choose_precision(cfg.memory.mixed_precision, device)
    model = load_base_model(prep["resolved"], dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code,
                            revision=cfg.model.revision)
    targets, fifo = default_targets(model, prep["resolved"].preset)
    lc = cfg.lora
    torch.manual_seed(cfg.training.seed)  # LoRA init
    model = add_lora(model, r=lc.r, alpha=lc.alpha, dropout=lc.dropout, target_modules=lc.target_modules or targets,
                     fan_in_fan_out=fifo if lc.fan_in_fan_out is None else lc.fan_in_fan_out, bias=lc.bias)
    if cfg.memory.gradient_checkpointing:
        model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(device)
    params = trainable_state(model)
    n_train = sum(p.numel() for p in params.values())
    n_all = sum(p.numel() for p in model.parameters())
    log.info("model %s on %s (%s autocast, %d threads); LoRA targets %s; trainable %d / %d params (%.2f%%)",
             prep["resolved"].path, device, amp or "no", threads, lc.target_modules or targets, n_train, n_all, 100 * n_train / n_all)

    t = cfg.training
    bs, ga = cfg.data.batch_size, cfg.memory.gradient_accumulation_steps
    lengths = [len(e.input_ids) for e in train_set]
    n_batches = math.ceil(len(train_set) / bs)
    total = t.max_steps or max(1, math.ceil(math.ceil(t.epochs * n_batches) / ga))
    warmup = t.warmup_steps or int(t.warmup_ratio * total)
    opt = torch.optim.AdamW(params.values(), lr=t.learning_rate, weight_decay=t.weight_decay)

    step = 0
    if start_ckpt is not None:
        weights, state = ckpt.load_checkpoint(start_ckpt)
        missing = set(params) - set(weights)
        if missing:
            raise TrainError(f"{start_ckpt} does not match this model/LoRA config (missing {sorted(missing)[:3]}…).")
        with torch.no_grad():
            for k, v in weights.items():
                params[k].copy_(v)
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng_cpu"])
        if device == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"])
        step = int(state["step"])
        log.info("resumed from %s at step %d of %d", start_ckpt, step, total)

    metrics = MetricsLog(out / "metrics.jsonl", truncate_after=step)
    tb = _tensorboard(out) if cfg.logging.tensorboard else None
    autocast = (lambda: torch.autocast(device, dtype=getattr(torch, amp))) if amp else nullcontext
    pad = tok.pad_token_id
    cache: dict[int, list[list[int]]] = {}

    def micro_batch(m: int):
        epoch, k = divmod(m, n_batches)
        if epoch not in cache:
            cache.clear()
            cache[epoch] = epoch_batches(lengths, bs, t.seed, epoch, cfg.data.group_by_length)
        return collate([train_set[i] for i in cache[epoch][k]], pad)

    def evaluate() -> float | None:
        if not eval_set:
            return None
        model.eval()
        tot, n = 0.0, 0
        order = sorted(range(len(eval_set)), key=lambda i: len(eval_set[i].input_ids))
        with torch.no_grad(), autocast():
            for k in range(0, len(order), bs):
                b = {kk: v.to(device) for kk, v in collate([eval_set[i] for i in order[k:k + bs]], pad).items()}
                s, c = answer_loss_sum(model, b)
                tot, n = tot + float(s), n + c
        model.train()
        return tot / max(n, 1)

    def save(at: int) -> Path:
        state = {"step": at, "optimizer": opt.state_dict(), "rng_cpu": torch.get_rng_state()}
        if device == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state()
        return ckpt.save_checkpoint(out / "checkpoints", at, params, state, t.save_total_limit)

    stop = _StopFlag()
    model.train()
    bar = _progress(total, step, cfg.logging.progress_bar)
    win_loss, win_tok, win_real, win_t0 = 0.0, 0, 0, time.perf_counter()
    t_start = time.perf_counter()
    try:
        with stop:
            while step < total:
                batches = [micro_batch(m) for m in range(step * ga, (step + 1) * ga)]
                loss_sum, n_tok, n_real = accumulate_gradients(model, batches, device, autocast)
                win_loss, win_tok, win_real = win_loss + loss_sum, win_tok + n_tok, win_real + n_real
                if t.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params.values(), t.max_grad_norm)
                lr = t.learning_rate * lr_factor(step, total, warmup, t.lr_scheduler)
                for g in opt.param_groups:
                    g["lr"] = lr
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                epoch = step * ga / n_batches
                bar.update(1)
                if step % t.logging_steps == 0 or step == total:
                    dt = time.perf_counter() - win_t0
                    rec = {"step": step, "epoch": round(epoch, 3), "loss": win_loss / max(win_tok, 1), "lr": lr,
                           "tokens_per_s": win_real / dt, "elapsed_s": time.perf_counter() - t_start}
                    metrics.write(rec)
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
                    if tb:
                        tb.add_scalar("train/loss", rec["loss"], step)
                        tb.add_scalar("train/lr", lr, step)
                    win_loss, win_tok, win_real, win_t0 = 0.0, 0, 0, time.perf_counter()
                crossed_epoch = int(step * ga / n_batches) > int((step - 1) * ga / n_batches)
                if (t.eval_steps and step % t.eval_steps == 0) or (not t.eval_steps and crossed_epoch) or step == total:
                    ev = evaluate()
                    if ev is not None:
                        metrics.write({"step": step, "epoch": round(epoch, 3), "eval_loss": ev})
                        log.info("step %d: eval loss %.4f", step, ev)
                        if tb:
                            tb.add_scalar("eval/loss", ev, step)
                if step % t.save_steps == 0 or step == total:
                    save(step)
                if stop.requested:
                    path = save(step)
                    raise Interrupted(path)
    finally:
        bar.close()
        if tb:
            tb.close()
    _finish(cfg, model, tok, prep, out, metrics, log_path)
    return out


def _finish(cfg, model, tok, prep, out: Path, metrics, log_path) -> None:
    from .report import plot_losses

    model.save_pretrained(str(out / "adapter"), safe_serialization=True)
    tok.save_pretrained(str(out))
    cfg.save(out / "config.yaml")
    if prep["resolved"].notice:
        (out / "NOTICE").write_text(prep["resolved"].notice, encoding="utf-8")
    if cfg.retrieval.enabled:  # the run folder answers from the exact KB it was trained with
        from .statutes import DEFAULT_KB

        shutil.copytree(cfg.retrieval.kb_dir or DEFAULT_KB, out / "statutes", dirs_exist_ok=True)
        if prep["retrieval_examples"]:
            from .retrieval import save_examples

            save_examples(prep["retrieval_examples"], out / "retrieval_examples.jsonl")
    plot_losses(out / "metrics.jsonl", out / "loss.png")
    log.info("run folder ready: %s (adapter, tokenizer, config.yaml, metrics.jsonl, loss.png%s)", out,
             f", {log_path.name}" if log_path else "")


class _StopFlag:
    """First Ctrl+C (or SIGTERM): finish the step, checkpoint, exit. Second: stop now."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("stop requested: finishing this step and writing a checkpoint (press Ctrl+C again to abort)")

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False


def _progress(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True, desc="train")


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise TrainError("TensorBoard logging needs the extra: pip install 'kotune[tensorboard]'") from None
    return SummaryWriter(str(out / "tensorboard"))
