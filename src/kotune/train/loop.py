"""Fine-tuning with LoRA (or a full fine-tune): one straight training loop for every task.

`train(cfg)` is the top-level entry point and the only function here that
sees the whole config. What differs per task (batches, loss, metrics) comes
from `tasks.py`. Data order is a pure function of (seed, step), so a resumed
run continues exactly where the checkpoint left it; under torchrun/accelerate
every process takes its slice of the same global batches and the model runs
under torch's DDP or FSDP, or DeepSpeed ZeRO (`distributed.py`).
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

from .. import runfolder
from ..config import KotuneConfig
from ..errors import ModelError
from ..memory import (
    apply_cap,
    choose_precision,
    cpu_threads,
    memory_line,
    memory_stats,
    quantization_problem,
    release_cache,
)
from ..model import add_lora, default_targets, load_base_model
from ..prepare import Prepared, dry_run_report, prepare
from ..runfolder import holds_run
from ..tasks import count, item_length
from . import checkpoint as ckpt
from . import distributed as dd
from .early import EarlyStop
from .logs import (
    Interrupted,
    StopFlag,
    TrainError,
    epoch_report,
    format_eval,
    log,
    progress,
    setup_logging,
    tensorboard,
)
from .report import MetricsLog, plot_losses
from .steps import BatchPlan, accumulate_gradients, evaluate_loss, lr_factor, trainable_state

# ---------------------------------------------------------------- entry point


def train(cfg: KotuneConfig, *, resume: str | None = None, overwrite: bool = False, dry_run: bool = False):
    """Train and return the run folder (or, with dry_run, the report text).

    Under `torchrun`/`accelerate launch` every process runs this; rank 0 alone
    writes the run folder, the log and the progress bar."""
    out = Path(cfg.model.output_dir)
    if dry_run:
        setup_logging(None, cfg.logging.level, cfg.logging.format)
        report = dry_run_report(cfg, prepare(cfg))
        held = None if resume else holds_run(out)
        if held:  # the dry run passes; the real one would stop here, so say so now
            how = "it replaces that run" if overwrite else "training needs `--resume` or `--overwrite`"
            report += f"\n\nnote: {out} already holds {held}; {how}."
        return report

    import torch

    problem = quantization_problem(cfg.model.quantization, torch.cuda.is_available())
    if problem:
        raise ModelError(problem)
    d = dd.from_env()
    problem = dd.engine_problem(d, cfg.model.quantization)
    if problem:
        raise TrainError(problem)
    device = f"cuda:{d.local_rank}" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    dd.init(d, device)
    try:
        return _train(cfg, out, d, device, resume, overwrite)
    finally:
        dd.shutdown(d)


def _train(cfg: KotuneConfig, out: Path, d: dd.Dist, device: str, resume: str | None, overwrite: bool) -> Path:
    import torch

    held = None if resume else runfolder.holds_run(out)
    if held and not overwrite:
        raise TrainError(
            f"{out} already holds {held}. Continue with `--resume`, start over with `--overwrite` (the old "
            "run is kept until the new one finishes), or choose another `--output_dir`."
        )
    if d.main:
        runfolder.check_writable(out)
    # Console only until everything is checked: nothing in `out` changes before the data, model name and template pass.
    setup_logging(None, cfg.logging.level, cfg.logging.format)
    threads = cfg.training.num_threads or max(1, cpu_threads() // (d.world if device == "cpu" else 1))
    torch.set_num_threads(threads)
    prep = prepare(cfg)
    start = ckpt.load_intact(out if resume == "latest" else Path(resume), log.warning) if resume else None
    dd.barrier(d)  # every process has checked before rank 0 moves the old run aside
    log_path = None
    if d.main:
        if held:
            runfolder.set_aside(out)
        log_path = setup_logging(out, cfg.logging.level, cfg.logging.format)
    else:
        setup_logging(None, "WARNING", cfg.logging.format)
    for r in prep.reports:
        log.info(r.summary())
        for msg in r.problems + r.duplicates:
            log.warning("  %s", msg)
    for msg in prep.long_rows:
        log.warning("  too long (%s): %s", cfg.data.too_long, msg)
    log.info(
        "task %s: train rows %d, eval rows %d; token length p50 %d, max %d",
        cfg.model.task,
        len(prep.train),
        len(prep.eval),
        prep.stats["p50"],
        prep.stats["max"],
    )
    if prep.labels:
        log.info("labels (%d): %s", len(prep.labels), ", ".join(prep.labels))
    if d.enabled:
        engine = {"fsdp": "FSDP", "deepspeed": "DeepSpeed"}.get(d.engine, "data-parallel (DDP)")
        log.info(
            "%s: %d processes; each takes 1/%d of every batch of %d rows", engine, d.world, d.world, cfg.data.batch_size
        )
    try:
        result = _loop(cfg, prep, out, start, log_path, threads, d, device)
    except BaseException as e:
        if d.main and (out / runfolder.PREVIOUS).is_dir():
            # Resumable (a checkpoint of its own, or Ctrl+C): the new run stays and the old one waits beside it.
            resumable = isinstance(e, Interrupted) or bool(ckpt.list_checkpoints(out / "checkpoints"))
            log.warning(runfolder.settle(out, log_path, resumable))
        raise
    if d.main:
        runfolder.discard_previous(out)  # the new run is complete: the one it replaced can go
    return result


def _build_model(cfg: KotuneConfig, prep: Prepared, device: str):
    """Base model with the task's head, then LoRA (or everything trainable for a full fine-tune)."""
    import torch

    task, mc, lc = cfg.model.task, cfg.memory, cfg.lora
    torch.manual_seed(cfg.training.seed)  # a new classification head is initialised while loading
    model = load_base_model(
        prep.resolved,
        dtype=cfg.model.dtype,
        trust_remote_code=cfg.model.trust_remote_code,
        revision=cfg.model.revision,
        task=task,
        labels=prep.labels,
        pad_token_id=prep.tokenizer.pad_token_id,
        quantization=cfg.model.quantization,
        device=device,
    )
    checkpointing = mc.gradient_checkpointing or mc.optimize_memory_usage
    quantized = cfg.model.quantization != "none"
    if quantized:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    targets, fifo = default_targets(model, prep.resolved.preset)
    torch.manual_seed(cfg.training.seed)  # LoRA init
    if lc.enabled:
        model = add_lora(
            model,
            r=lc.r,
            alpha=lc.alpha,
            dropout=lc.dropout,
            target_modules=lc.target_modules or targets,
            fan_in_fan_out=fifo if lc.fan_in_fan_out is None else lc.fan_in_fan_out,
            bias=lc.bias,
            task=task,
            last_layers=lc.last_layers,
        )
    if checkpointing and not quantized:
        base = model.get_base_model() if lc.enabled else model
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not quantized:  # bitsandbytes places quantized weights itself
        model.to(device)
    return model, (lc.target_modules or targets) if lc.enabled else "all (full fine-tune)"


def _loop(
    cfg: KotuneConfig,
    prep: Prepared,
    out: Path,
    start: tuple | None,
    log_path: Path | None,
    threads: int,
    d: dd.Dist,
    device: str,
) -> Path:
    import torch

    task, tok, train_set, eval_set = cfg.model.task, prep.tokenizer, prep.train, prep.eval
    mc = cfg.memory
    amp = choose_precision(mc.mixed_precision, device)
    if apply_cap(mc.max_gpu_memory_usage, device):
        log.info("CUDA memory capped at %.0f%% of the GPU for this process", 100 * mc.max_gpu_memory_usage)
    model, target_desc = _build_model(cfg, prep, device)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    log.info(
        "model %s on %s (%s autocast, %d threads, quantization %s); trained modules %s; trainable %d / %d params "
        "(%.2f%%)",
        prep.resolved.path,
        device,
        amp or "no",
        threads,
        cfg.model.quantization,
        target_desc,
        n_train,
        n_all,
        100 * n_train / n_all,
    )
    runner = dd.wrap(model, task, d, device)  # forward(batch) -> loss sum, under DDP or FSDP with several processes
    params = trainable_state(model)  # after wrapping: FSDP swaps in sharded parameters

    t = cfg.training
    bs, ga = cfg.data.batch_size, mc.gradient_accumulation_steps
    lengths = [item_length(e) for e in train_set]
    n_batches = math.ceil(len(train_set) / bs)  # = plan.n_batches
    total = t.max_steps or max(1, math.ceil(math.ceil(t.epochs * n_batches) / ga))
    warmup = t.warmup_steps or int(t.warmup_ratio * total)
    opt = torch.optim.AdamW(params.values(), lr=t.learning_rate, weight_decay=t.weight_decay)
    # unchanged without DeepSpeed
    runner, opt = dd.deepspeed_initialize(
        runner, model, opt, params, d, device, accumulation=ga, max_grad_norm=t.max_grad_norm, batch_size=bs
    )
    # Early stopping and the per-epoch train loss live in the checkpoint, so a resumed run decides as the original
    # would.
    early = EarlyStop(t.early_stopping_metric, t.early_stopping_patience)
    epoch_acc = [0.0, 0]

    step = 0
    if start is not None:
        step, epoch_acc = ckpt.restore_training_state(start, params, opt, early, d, device)
        log.info("resumed from %s at step %d of %d", start[0], step, total)

    metrics = MetricsLog(out / "metrics.jsonl", truncate_after=step) if d.main else None
    tb = tensorboard(out) if cfg.logging.tensorboard and d.main else None
    dev_type = device.split(":")[0]
    autocast = (lambda: torch.autocast(dev_type, dtype=getattr(torch, amp))) if amp else nullcontext
    write = metrics.write if metrics is not None else (lambda rec: None)
    plan = BatchPlan(
        train_set, lengths, bs, t.seed, cfg.data.group_by_length, cfg.data.max_batch_tokens, tok.pad_token_id, d
    )
    n_labels = len(prep.labels or [])

    stop = StopFlag()
    model.train()
    bar = progress(total, step, cfg.logging.progress_bar and d.main)
    win_loss, win_tok, win_real, win_t0 = 0.0, 0, 0, time.perf_counter()
    t_start = time.perf_counter()
    n_epochs = total * ga / n_batches
    try:
        with stop:
            while step < total and not early.stopped:
                batches, weights = zip(*(b for m in range(step * ga, (step + 1) * ga) for b in plan.micro_batches(m)))
                n_global = dd.all_sum([float(sum(count(task, b) for b, w in zip(batches, weights) if w))], d)[0]
                loss_s, n_tok, n_real = accumulate_gradients(
                    runner,
                    list(batches),
                    device,
                    autocast,
                    task,
                    n_total=int(n_global),
                    weights=list(weights),
                    world=d.world,
                )
                loss_s, n_tok, n_real = dd.all_sum([loss_s, float(n_tok), float(n_real)], d)
                win_loss, win_tok, win_real = win_loss + loss_s, win_tok + n_tok, win_real + n_real
                epoch_acc[0], epoch_acc[1] = epoch_acc[0] + loss_s, epoch_acc[1] + n_tok
                if t.max_grad_norm and d.engine != "deepspeed":  # DeepSpeed clips in its step (gradient_clipping)
                    torch.nn.utils.clip_grad_norm_(params.values(), t.max_grad_norm)
                lr = t.learning_rate * lr_factor(step, total, warmup, t.lr_scheduler)
                for g in opt.param_groups:
                    g["lr"] = lr
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                epoch = step * ga / n_batches
                bar.update(1)
                if (mc.empty_cache_freq and step % mc.empty_cache_freq == 0) or (
                    t.cuda_cleanup_freq and step % t.cuda_cleanup_freq == 0
                ):
                    release_cache(device)
                if step % t.logging_steps == 0 or step == total:
                    dt = time.perf_counter() - win_t0
                    rec = {
                        "step": step,
                        "epoch": round(epoch, 3),
                        "loss": win_loss / max(win_tok, 1),
                        "lr": lr,
                        "tokens_per_s": win_real / dt,
                        "elapsed_s": time.perf_counter() - t_start,
                        **memory_stats(device),
                    }
                    write(rec)
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
                    if tb:
                        tb.add_scalar("train/loss", rec["loss"], step)
                        tb.add_scalar("train/lr", lr, step)
                    win_loss, win_tok, win_real, win_t0 = 0.0, 0, 0, time.perf_counter()
                if step % mc.report_steps == 0:
                    log.info("step %d: %s", step, memory_line(memory_stats(device)))
                crossed_epoch = int(step * ga / n_batches) > int((step - 1) * ga / n_batches)
                ev = None
                if (t.eval_steps and step % t.eval_steps == 0) or (not t.eval_steps and crossed_epoch) or step == total:
                    ev = evaluate_loss(model, runner, eval_set, bs, tok.pad_token_id, n_labels, device, autocast, d)
                    if ev is not None:
                        write({"step": step, "epoch": round(epoch, 3), **ev})
                        log.info("step %d: %s", step, format_eval(ev))
                        if tb:
                            for k, v in ev.items():
                                tb.add_scalar(f"eval/{k.removeprefix('eval_')}", v, step)
                        if early.metric:
                            early.update(ev, step, dd.unsharded(params))  # unsharded: a collective, on every process
                if crossed_epoch or step == total or early.stopped:
                    epoch_report(step, epoch, n_epochs, epoch_acc, lr, ev, device, time.perf_counter() - t_start, write)
                    epoch_acc = [0.0, 0]
                    if mc.optimize_memory_usage:
                        release_cache(device)
                interrupted = dd.any_true(stop.requested, d)
                if step % t.save_steps == 0 or step == total or early.stopped or interrupted:
                    state = {"step": step, "early": early.state(), "epoch_acc": epoch_acc}
                    path = ckpt.save_training_state(
                        out / "checkpoints", step, params, opt, state, t.save_total_limit, device, d
                    )
                    if interrupted:
                        raise Interrupted(path)
    finally:
        bar.close()
        if tb:
            tb.close()
    if early.weights is not None:
        dd.copy_into(params, early.weights)
        log.info("kept the best weights: step %d, %s %.4f", early.best_step, early.metric, early.best)
    state = dd.model_state(model, cfg.lora.enabled, params)  # collective under FSDP; None otherwise
    if d.main:
        _finish(cfg, model, tok, prep, out, metrics, log_path, state)
    dd.barrier(d)
    return out


def _finish(cfg, model, tok, prep, out: Path, metrics, log_path, state: dict | None = None) -> None:

    weights = out / ("adapter" if cfg.lora.enabled else "model")
    model.save_pretrained(str(weights), safe_serialization=True, **({"state_dict": state} if state is not None else {}))
    tok.save_pretrained(str(out))
    cfg.save(out / "config.yaml")
    if prep.labels:
        (out / "labels.json").write_text(json.dumps(prep.labels, ensure_ascii=False, indent=1), encoding="utf-8")
    if prep.resolved.notice:
        for folder in {out, weights}:
            (folder / "NOTICE").write_text(prep.resolved.notice, encoding="utf-8")
    if prep.grounding is not None:  # the run folder answers from the exact sources it was trained with
        prep.grounding.save(out)
    plot_losses(out / "metrics.jsonl", out / "loss.png")
    log.info(
        "run folder ready: %s (%s, tokenizer, config.yaml, metrics.jsonl, loss.png%s)",
        out,
        weights.name,
        f", {log_path.name}" if log_path else "",
    )
