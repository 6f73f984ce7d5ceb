"""Benchmark 1 — training throughput: kotune vs a naive seed-style pipeline.

Both train the same base model (`model.name` of the config, default Gemma 3 270M)
with the same LoRA, the same training rows, the same global batch and the same
number of optimizer steps, each in its own process so peak RSS is its own.

naive  : HF `Trainer`, `DataCollatorForLanguageModeling(mlm=False)` with pad = eos,
         loss on the whole text (prompt included), fp32, every row padded to max_length.
kotune : `kotune.train.train` with the config as given (answer-only loss, LM head
         at answer positions only, length-grouped batches, autocast per config).

Reported: real (non-pad) tokens/s, mean step time, peak RSS (VmHWM of the process,
read right after training), final train loss (each pipeline's own loss), and an
eval loss computed the same way for both after training: answer-token cross-entropy
in fp32 on the config's held-out rows.

    PYTHONPATH=src .venv/bin/python bench/train_throughput.py --steps 10 \
        [--config configs/civil_law.yaml] [--output bench/results/train_throughput.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def rss_mb(field: str = "VmHWM") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_cfg(args, out_dir: str):
    from kotune.config import load_config

    sets = [
        f"model.output_dir={out_dir}",
        f"training.max_steps={args.steps}",
        "training.logging_steps=1",
        f"training.save_steps={10**6}",
        "logging.progress_bar=false",
        "logging.level=WARNING",
    ]
    return load_config(args.config, sets + list(args.set))


def eval_answer_loss(model, eval_set, pad: int, batch_size: int) -> float:
    """Mean answer-token loss in fp32 without autocast — the same measure for both pipelines."""
    import torch

    from kotune.prompt import collate
    from kotune.train import answer_loss_sum

    model.eval()
    tot, n = 0.0, 0
    with torch.no_grad():
        for k in range(0, len(eval_set), batch_size):
            s, c = answer_loss_sum(model, collate(eval_set[k : k + batch_size], pad))
            tot, n = tot + float(s), n + c
    return tot / max(n, 1)


# ---------------------------------------------------------------- workers (one per process)


def worker_naive(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

    from kotune.model import add_lora, default_targets, load_base_model
    from kotune.prepare import prepare

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_cfg(args, tmp)
        prep = prepare(cfg)  # the same split and rows kotune uses
        d, t, lc = cfg.data, cfg.training, cfg.lora
        tok = prep.tokenizer
        from transformers import AutoTokenizer

        naive_tok = AutoTokenizer.from_pretrained(prep.resolved.path)
        naive_tok.pad_token = naive_tok.eos_token  # the seed's choice: EOS is masked out of the labels with the padding
        from kotune.prepare import load_split

        train_ex, _, _ = load_split(cfg)
        texts = [d.template.format(question=e.question, answer=e.answer) for e in train_ex]
        enc = naive_tok(texts, padding="max_length", truncation=True, max_length=d.max_length)
        ds = Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
        base = load_base_model(prep.resolved, dtype="float32")
        targets, fifo = default_targets(base, prep.resolved.preset)
        torch.manual_seed(t.seed)
        model = add_lora(
            base,
            r=lc.r,
            alpha=lc.alpha,
            dropout=lc.dropout,
            target_modules=lc.target_modules or targets,
            fan_in_fan_out=fifo if lc.fan_in_fan_out is None else lc.fan_in_fan_out,
        )
        collator = DataCollatorForLanguageModeling(naive_tok, mlm=False)
        real = {"tokens": 0}

        def counting_collator(rows):
            batch = collator(rows)
            real["tokens"] += int(batch["attention_mask"].sum())
            return batch

        steps: list[float] = []

        class StepTimer(TrainerCallback):
            def on_step_begin(self, a, s, c, **kw):
                self.t0 = time.perf_counter()

            def on_step_end(self, a, s, c, **kw):
                steps.append(time.perf_counter() - self.t0)

        targs = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=d.batch_size,
            gradient_accumulation_steps=cfg.memory.gradient_accumulation_steps,
            max_steps=args.steps,
            learning_rate=t.learning_rate,
            warmup_steps=t.warmup_steps or int(t.warmup_ratio * args.steps),
            lr_scheduler_type=t.lr_scheduler,
            weight_decay=t.weight_decay,
            max_grad_norm=t.max_grad_norm or 0.0,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            seed=t.seed,
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        trainer = Trainer(
            model=model, args=targs, train_dataset=ds, data_collator=counting_collator, callbacks=[StepTimer()]
        )
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
        peak = rss_mb()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        ev = eval_answer_loss(model, prep.eval, tok.pad_token_id, d.batch_size)
    return dict(
        pipeline="naive",
        steps=len(steps),
        real_tokens=real["tokens"],
        train_s=sum(steps),
        wall_s=wall,
        step_s=steps,
        final_train_loss=losses[-1] if losses else None,
        train_loss_kind="whole text, pad=eos masked",
        eval_answer_loss=ev,
        peak_rss_mb=peak,
    )


def worker_kotune(args) -> dict:
    from kotune.prepare import epoch_batches
    from kotune.train import train
    from kotune.train.report import read_metrics

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_cfg(args, tmp)
        t0 = time.perf_counter()
        out = train(cfg)
        wall = time.perf_counter() - t0
        peak = rss_mb()
        recs = read_metrics(Path(out) / "metrics.jsonl")
        train_recs = [r for r in recs if "loss" in r]
        elapsed = [r["elapsed_s"] for r in train_recs]
        step_s = [b - a for a, b in zip([0.0] + elapsed[:-1], elapsed)]
        # Real tokens per step from the same deterministic batch order train() used.
        from kotune.prepare import prepare

        prep = prepare(cfg)
        lengths = [len(e.input_ids) for e in prep.train]
        bs, ga = cfg.data.batch_size, cfg.memory.gradient_accumulation_steps
        n_batches = -(-len(lengths) // bs)
        real = 0
        for m in range(args.steps * ga):
            epoch, k = divmod(m, n_batches)
            real += sum(
                lengths[i] for i in epoch_batches(lengths, bs, cfg.training.seed, epoch, cfg.data.group_by_length)[k]
            )
        from peft import PeftModel

        from kotune.model import load_base_model

        base = load_base_model(prep.resolved, dtype="float32")
        model = PeftModel.from_pretrained(base, str(Path(out) / "adapter"))
        ev = eval_answer_loss(model, prep.eval, prep.tokenizer.pad_token_id, cfg.data.batch_size)
    return dict(
        pipeline="kotune",
        steps=len(step_s),
        real_tokens=real,
        train_s=elapsed[-1],
        wall_s=wall,
        step_s=step_s,
        final_train_loss=train_recs[-1]["loss"],
        train_loss_kind="answer tokens + EOS",
        eval_answer_loss=ev,
        peak_rss_mb=peak,
        mixed_precision=cfg.memory.mixed_precision,
    )


# ---------------------------------------------------------------- driver


def run_worker(name: str, args) -> dict:
    cmd = [sys.executable, str(HERE), "--worker", name, "--steps", str(args.steps), "--config", args.config]
    for s in args.set:
        cmd += ["--set", s]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HERE.parent.parent / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    print(f"[{name}] running {args.steps} steps…", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{name} worker failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(r: dict) -> dict:
    steady = r["step_s"][1:] or r["step_s"]
    return dict(
        r,
        tokens_per_s=r["real_tokens"] / r["train_s"],
        mean_step_s=r["train_s"] / max(r["steps"], 1),
        mean_step_s_after_first=sum(steady) / len(steady),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10, help="Optimizer steps for each pipeline.")
    ap.add_argument("--config", default="configs/civil_law.yaml")
    ap.add_argument(
        "--set", action="append", default=[], help="Config override for both pipelines (section.key=value)."
    )
    ap.add_argument("--only", choices=["naive", "kotune"], help="Run one pipeline only.")
    ap.add_argument("--output", default="bench/results/train_throughput.json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        result = {"naive": worker_naive, "kotune": worker_kotune}[args.worker](args)
        print(json.dumps(result))
        return
    rows = {name: summarise(run_worker(name, args)) for name in ("naive", "kotune") if args.only in (None, name)}
    print(
        f"\nconfig {args.config}, {args.steps} optimizer steps each, {os.cpu_count()} CPUs (load avg "
        f"{os.getloadavg()[0]:.1f} at end)"
    )
    print(
        "| pipeline | real tokens/s | mean step (s) | step after 1st (s) | peak RSS (MB) | final train loss | eval "
        "answer loss |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['tokens_per_s']:.0f} | {r['mean_step_s']:.2f} | {r['mean_step_s_after_first']:.2f} | "
            f"{r['peak_rss_mb']:.0f} | {r['final_train_loss']:.3f} ({r['train_loss_kind']}) | "
            f"{r['eval_answer_loss']:.3f} |"
        )
    if len(rows) == 2:
        n, k = rows["naive"], rows["kotune"]
        print(
            f"\nkotune / naive: {k['tokens_per_s'] / n['tokens_per_s']:.2f}x tokens/s, "
            f"{k['peak_rss_mb'] / n['peak_rss_mb']:.0%} of peak RSS, eval answer loss {k['eval_answer_loss']:.3f} vs "
            f"{n['eval_answer_loss']:.3f}"
        )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(
        json.dumps(
            {
                "config": args.config,
                "steps": args.steps,
                "overrides": args.set,
                "load_avg_end": os.getloadavg(),
                "results": rows,
            },
            indent=2,
        ),
        encoding="utf-8",
    )
    print(f"written {args.output}")


if __name__ == "__main__":
    main()
