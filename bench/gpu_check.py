#!/usr/bin/env python
"""kotune GPU check (issue 24): prove the CUDA paths on one accelerator in one short run.

Two halves, so the device machine (no network, no retrieval stack, no model cache) needs nothing but
the working tree and `.gpu/`:

  prepare  HERE (bench/gpu_prepare.sh): render the recipe's training and eval rows through `kotune`'s own
           `prepare` (the retrieved article already in each prompt), write a travel recipe whose template puts
           them back unchanged (checked: the same token ids, row for row), and copy the model's tokenizer
           (xz-compressed) into `.gpu/bundle/`.
  run      THERE (bench/gpu_check.sh), or here with --cpu: versions; `pytest -m cuda`; the recipe for N steps in
           bf16 with the memory cap (tokens/s, peak allocated/reserved, the cap honoured, eval answer loss against
           the CPU figure in bench/gpu_check_expected.json); fp16; QLoRA 4-bit and 8-bit; a cap too small to hold
           the model must raise out-of-memory; the fast engine against HF `generate` at batch 1 and 8; a
           checkpoint taken on the GPU resumed and finished on CPU, and both adapters answering on CPU.
           Writes report.md and report.json into --out after every step (a killed run still leaves them).

The base model is the Gemma 3 270M architecture with random weights from a fixed seed (`seeded_init`): the
real weights (a 253 MB GGUF) cannot travel, and the same shapes give real speed and memory figures. The same
seed on CPU and GPU gives the same start, so the eval answer losses are comparable. `--tiny` swaps in a
two-layer Gemma 3 and a tokenizer trained on the rows (seconds; the CI test).

Every training and generation runs in its own process (`_worker`), so peak memory is per run and a crash in
one (bitsandbytes, say) does not end the check; with --cpu the workers see no GPU (CUDA_VISIBLE_DEVICES="").
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import platform
import shutil
import subprocess
import sys
import time
import zlib
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXPECTED = ROOT / "bench" / "gpu_check_expected.json"
INIT_SEED = 20261207
INIT_STD = 0.02  # transformers' initializer_range for Gemma 3
# The Gemma 3 270M text model (the converted cache's config.json); the rest are Gemma3TextConfig's defaults
# (rope 1e6 global / 1e4 local, query_pre_attn_scalar 256, gelu_pytorch_tanh), the same values.
GEMMA3_270M = dict(
    hidden_size=640,
    intermediate_size=2048,
    num_hidden_layers=18,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=256,
    max_position_embeddings=32768,
    sliding_window=512,
    rms_norm_eps=1e-6,
    query_pre_attn_scalar=256,
    attention_bias=False,
    final_logit_softcapping=None,
    attn_logit_softcapping=None,
    tie_word_embeddings=True,
    layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)],
)
TINY_GEMMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    max_position_embeddings=1024,
    sliding_window=64,
    rms_norm_eps=1e-6,
    query_pre_attn_scalar=16,
    attention_bias=False,
    final_logit_softcapping=None,
    attn_logit_softcapping=None,
    tie_word_embeddings=True,
    layer_types=["sliding_attention", "full_attention"],
)
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "added_tokens.json")
# GPU bf16 against the CPU reference: eval answer loss and every step's training loss within 2 %, the tolerance
# docs/benchmarks.md set for CPU bf16 against fp32 (every step within 2 %).
LOSS_TOLERANCE = 0.02
# On the device no step starts after --budget-s, and one already running may overrun it by this much.
GRACE_S = 45


def sha256_bytes(*chunks: bytes) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def git_commit() -> str | None:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        return None


# ====================================================================== prepare (here)


def travel_template(template: str) -> tuple[str, str]:
    """(travel template, separator): the part of the prompt after its last placeholder stays in the template,
    everything before it (article and question filled in) travels as the row's question."""
    head, tail = template.split("{answer}", 1)
    ends = [head.rfind(p) + len(p) for p in ("{question}", "{context}") if p in head]
    sep = head[max(ends) :]
    return "{question}" + sep + "{answer}" + tail, sep


def travel_question(template: str, sep: str, question: str, context: str) -> str:
    head = template.split("{answer}")[0].replace("{context}", context).replace("{question}", question)
    assert head.endswith(sep), (head[-40:], sep)
    return head[: len(head) - len(sep)] if sep else head


def train_tiny_tokenizer(texts: list[str], folder: Path) -> None:
    """A byte-level BPE over the rows' own text (what tests/conftest.py does), with Gemma's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.save_pretrained(folder)


def encoded_digest(items) -> str:
    return sha256_bytes(json.dumps([[e.input_ids, e.labels] for e in items]).encode())


def cmd_prepare(args) -> int:
    import yaml

    import kotune.prepare as kp
    from kotune.config import load_config
    from kotune.data import load_examples

    cfg = load_config(args.config)
    if cfg.model.task != "causal-lm":
        raise SystemExit(f"{args.config}: the GPU check trains causal-lm recipes (this one is {cfg.model.task}).")
    bundle = Path(args.bundle)
    shutil.rmtree(bundle, ignore_errors=True)
    (bundle / "tokenizer").mkdir(parents=True)
    sets = []
    if args.tiny:  # a tokenizer trained on the rows themselves: no model cache needed
        rows, _ = load_examples(
            cfg.data.train_file,
            question_column=cfg.data.question_column,
            answer_column=cfg.data.answer_column,
            bad_rows="skip",
            duplicates="drop",
        )
        texts = [
            cfg.data.template.replace("{context}", "참고 조문")
            .replace("{question}", r.question)
            .replace("{answer}", r.answer)
            for r in rows
        ]
        train_tiny_tokenizer(texts * 3, bundle / "tokenizer")
        sets.append(f"model.name={bundle / 'tokenizer'}")
        cfg = load_config(args.config, sets)

    # kotune's own prepare renders the rows; `encode` is watched to keep the contexts it is given.
    seen: list[tuple[list, list | None]] = []
    encode = kp.encode

    def watching(task, tok, examples, *a, **kw):
        seen.append((list(examples), kw.get("contexts")))
        return encode(task, tok, examples, *a, **kw)

    kp.encode = watching
    try:
        prep = kp.prepare(cfg)
    finally:
        kp.encode = encode
    if len(seen) != 2:
        raise SystemExit(f"kotune.prepare called encode {len(seen)} times (expected train, eval); update cmd_prepare.")
    template, sep = travel_template(cfg.data.template)
    counts = {}
    for (examples, contexts), name in zip(seen, ("train", "eval")):
        lines = []
        for i, ex in enumerate(examples):
            q = travel_question(cfg.data.template, sep, ex.question, contexts[i] if contexts else "")
            lines.append(json.dumps({"question": q, "answer": ex.answer}, ensure_ascii=False))
        (bundle / f"{name}.jsonl").write_text("".join(x + "\n" for x in lines), encoding="utf-8")
        counts[name] = len(lines)

    tree = yaml.safe_load(cfg.to_yaml())
    tree["data"].update(template=template, train_file="train.jsonl", eval_file="eval.jsonl", dataset_name=None)
    tree["retrieval"]["enabled"] = False
    if tree.get("generation", {}).get("context_contrast"):
        tree["generation"]["context_contrast"] = 0
    recipe = (
        "# Travel recipe written by bench/gpu_check.py prepare from "
        + str(args.config)
        + ": rows carry their rendered prompt (retrieved article included).\n"
        + yaml.safe_dump(tree, allow_unicode=True, sort_keys=False)
    )
    (bundle / "recipe.yaml").write_text(recipe, encoding="utf-8")

    # Same token ids, row for row, as the original recipe: the device trains exactly what the recipe trains.
    check = load_config(
        bundle / "recipe.yaml",
        sets
        + [
            f"model.name={cfg.model.name}",
            f"data.train_file={bundle / 'train.jsonl'}",
            f"data.eval_file={bundle / 'eval.jsonl'}",
        ],
    )
    prep2 = kp.prepare(check)
    for name in ("train", "eval"):
        a, b = getattr(prep, name), getattr(prep2, name)
        if len(a) != len(b):
            raise SystemExit(f"travel rows: {name} has {len(b)} encoded rows, the recipe {len(a)}")
        for x, y in zip(a, b):
            if (x.input_ids, x.labels) != (y.input_ids, y.labels):
                raise SystemExit(f"travel rows: {x.source} encodes differently from the recipe ({y.source})")

    tok_dir = Path(prep.resolved.path)
    if not args.tiny:
        raw = (tok_dir / "tokenizer.json").read_bytes()
        (bundle / "tokenizer" / "tokenizer.json.xz").write_bytes(lzma.compress(raw, preset=9))
        for f in TOKENIZER_FILES:
            if (tok_dir / f).is_file():
                shutil.copy(tok_dir / f, bundle / "tokenizer" / f)
    else:
        raw = (bundle / "tokenizer" / "tokenizer.json").read_bytes()
    tok = prep.tokenizer
    model_kwargs = dict(
        TINY_GEMMA if args.tiny else GEMMA3_270M,
        vocab_size=len(tok) if args.tiny else 262144,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    # What decides the figures: the rows, the training settings, the tokenizer, the model and its seed (not the
    # config's name, output folder or generation settings).
    trained = {k: v for k, v in tree.items() if k in ("model", "data", "lora", "training", "memory")}
    trained["model"] = {k: v for k, v in trained["model"].items() if k not in ("name", "output_dir", "cache_dir")}
    files = [(bundle / n).read_bytes() for n in ("train.jsonl", "eval.jsonl")]
    files.append(json.dumps(trained, sort_keys=True, ensure_ascii=False).encode())
    meta = {
        "source_config": str(args.config),
        "tiny": bool(args.tiny),
        "fingerprint": sha256_bytes(
            *files, raw, json.dumps(model_kwargs, sort_keys=True).encode(), str(INIT_SEED).encode()
        )[:16],
        "model_kwargs": model_kwargs,
        "init_seed": INIT_SEED,
        "rows": {**counts, "train_encoded": len(prep.train), "eval_encoded": len(prep.eval)},
        "tokens_sha256": {"train": encoded_digest(prep.train), "eval": encoded_digest(prep.eval)},
        "token_lengths": prep.stats,
        "prepared": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "git_commit": git_commit(),
    }
    (bundle / "meta.json").write_text(json.dumps(meta, ensure_ascii=False, indent=1), encoding="utf-8")
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    print(
        f"bundle {bundle}: {counts['train']} train + {counts['eval']} eval rows from {args.config} "
        f"(encoded {meta['rows']['train_encoded']} + {meta['rows']['eval_encoded']}, same token ids as the recipe), "
        f"fingerprint {meta['fingerprint']}, {size / 2**20:.1f} MiB"
    )
    return 0


def cmd_slim_wheel(args) -> int:
    """Rewrite a wheel without the native libraries the device cannot use (bitsandbytes ships one per CUDA
    release and ROCm/XPU: 43 MB, of which the CUDA 12.8/13.0/13.2 and CPU ones are about 14 MB)."""
    import zipfile

    src = Path(args.wheel)
    keep = tuple(args.keep)
    tmp = src.with_suffix(".slim")
    dropped = []
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
        names = zin.namelist()
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        for n in names:
            base = n.rsplit("/", 1)[-1]
            if base.endswith(".so") and base.startswith("libbitsandbytes_") and not any(k in base for k in keep):
                dropped.append(n)
                continue
            if n != record:
                zout.writestr(zin.getinfo(n), zin.read(n))
        lines = [ln for ln in zin.read(record).decode().splitlines() if ln.split(",")[0] not in dropped]
        zout.writestr(zin.getinfo(record), "\n".join(lines) + "\n")
    before, after = src.stat().st_size, tmp.stat().st_size
    os.replace(tmp, src)
    print(f"{src.name}: dropped {len(dropped)} native libraries, {before / 2**20:.1f} -> {after / 2**20:.1f} MiB")
    return 0


def travelling_size(carry: list[str]) -> dict:
    """What a device call sends: tracked + untracked-not-ignored files, plus the carried paths."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    tree = sum((ROOT / p.decode()).stat().st_size for p in out if p and (ROOT / p.decode()).is_file())
    carried = {
        c: sum(p.stat().st_size for p in (ROOT / c).rglob("*") if p.is_file()) for c in carry if (ROOT / c).exists()
    }
    return {"tree_bytes": tree, "carried_bytes": carried, "total_bytes": tree + sum(carried.values())}


def cmd_size(args) -> int:
    s = travelling_size(args.carry)
    for c, n in s["carried_bytes"].items():
        print(f"  carried {c}: {n / 2**20:.1f} MiB")
    print(f"working tree {s['tree_bytes'] / 2**20:.1f} MiB + carried = {s['total_bytes'] / 2**20:.1f} MiB of 64 MiB")
    return 0 if s["total_bytes"] < 64 * 2**20 else 1


# ====================================================================== workers (one process each)


def seeded_init(model, seed: int) -> None:
    """Every weight from its own CPU generator (seed, parameter name): the same start on any machine and any
    transformers release that names the parameters the same (the fingerprint in the report says so).
    Matrices ~ N(0, 0.02), vectors (Gemma's RMSNorm offsets, biases) 0."""
    import torch

    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * INIT_STD)
            else:
                p.zero_()


def weights_digest(model) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def w_build_model(spec: dict) -> dict:
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    t0 = time.perf_counter()
    bundle, folder = Path(spec["bundle"]), Path(spec["folder"])
    meta = json.loads((bundle / "meta.json").read_text(encoding="utf-8"))
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    config = Gemma3TextConfig(**meta["model_kwargs"])
    torch.manual_seed(meta["init_seed"])
    model = Gemma3ForCausalLM(config)
    seeded_init(model, meta["init_seed"])
    digest = weights_digest(model)
    model.save_pretrained(folder, safe_serialization=True)
    tok = bundle / "tokenizer"
    for f in tok.iterdir():
        if f.name == "tokenizer.json.xz":
            (folder / "tokenizer.json").write_bytes(lzma.decompress(f.read_bytes()))
        elif f.is_file():
            shutil.copy(f, folder / f.name)
    return {
        "ok": True,
        "weights_sha256": digest,
        "params": sum(p.numel() for p in model.parameters()),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def w_versions(spec: dict) -> dict:
    import importlib.metadata as md

    import torch

    cpu = platform.machine()
    try:
        cpu = next(
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cpu": cpu,
        "cpu_threads": len(os.sched_getaffinity(0)),
    }
    for pkg in (
        "transformers",
        "peft",
        "accelerate",
        "bitsandbytes",
        "tokenizers",
        "safetensors",
        "pydantic",
        "pytest",
    ):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.update(
            gpu=torch.cuda.get_device_name(0),
            gpu_memory_mib=round(p.total_memory / 2**20),
            compute_capability=f"{p.major}.{p.minor}",
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
        try:
            out["driver"] = (
                subprocess.run(
                    ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                    capture_output=True,
                    text=True,
                    timeout=20,
                ).stdout.strip()
                or None
            )
        except (OSError, subprocess.SubprocessError):
            out["driver"] = None
    if out.get("bitsandbytes"):
        try:
            import bitsandbytes  # noqa: F401

            out["bitsandbytes_import"] = "ok"
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            out["bitsandbytes_import"] = f"{type(e).__name__}: {str(e)[:300]}"
    return out


def _train_config(spec: dict):
    from kotune.config import load_config

    return load_config(spec["recipe"], spec["sets"])


def w_train(spec: dict) -> dict:
    """One `kotune.train.train` run; figures from its metrics.jsonl, its log and the CUDA allocator."""
    import resource

    import torch

    import kotune.train.loop as loop
    from kotune.model import ModelError
    from kotune.train import TrainError, train
    from kotune.train.report import read_metrics

    cfg = _train_config(spec)
    out = Path(cfg.model.output_dir)
    prep_box = {}
    original = getattr(loop, "prepare", None)
    if original is not None:  # watch the rows the loop trains on (digest of their token ids)

        def watching(c):
            prep_box["prep"] = original(c)
            return prep_box["prep"]

        loop.prepare = watching
    cuda = torch.cuda.is_available()
    res: dict = {
        "device": "cuda" if cuda else "cpu",
        "quantization": cfg.model.quantization,
        "mixed_precision": cfg.memory.mixed_precision,
        "cap_fraction": cfg.memory.max_gpu_memory_usage,
    }
    t0 = time.perf_counter()
    try:
        train(cfg, resume=spec.get("resume"), overwrite=not spec.get("resume"))
    except (ModelError, TrainError) as e:
        res.update(ok=False, error=f"{type(e).__name__}: {e}", needs_cuda=not cuda and "CUDA" in str(e))
        return res
    except torch.OutOfMemoryError as e:
        free, total = torch.cuda.mem_get_info() if cuda else (0, 0)
        res.update(
            ok=False,
            oom=True,
            error=f"OutOfMemoryError: {str(e).splitlines()[0][:400]}",
            free_mib_at_oom=round(free / 2**20),
            total_mib=round(total / 2**20),
            allocated_mib_at_oom=round(torch.cuda.memory_allocated() / 2**20) if cuda else None,
        )
        return res
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    rows = read_metrics(out / "metrics.jsonl")
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    res.update(
        ok=True,
        run=str(out),
        steps=len(steps),
        last_step=steps[-1]["step"] if steps else None,
        losses=[round(r["loss"], 4) for r in steps],
        eval_loss=evals[-1]["eval_loss"] if evals else None,
        rss_peak_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    )
    if steps:
        el = [r["elapsed_s"] for r in steps]
        dts = [b - a for a, b in zip([0.0] + el[:-1], el)]
        toks = [r["tokens_per_s"] * dt for r, dt in zip(steps, dts)]
        res["loop_s"] = round(el[-1], 2)
        res["tokens_per_s"] = round(sum(toks) / max(el[-1], 1e-9), 1)
        later = sorted(r["tokens_per_s"] for r in steps[1:]) or [steps[0]["tokens_per_s"]]
        res["tokens_per_s_median_step"] = round(later[len(later) // 2], 1)  # steps after the first (warm-up)
        res["step_s_median"] = round(sorted(dts[1:] or dts)[len(dts[1:] or dts) // 2], 4)
        res["first_step_s"] = round(dts[0], 3)
        res["tokens_trained_per_step"] = round(sum(toks) / len(steps))
    if "prep" in prep_box:
        p = prep_box["prep"]
        res["tokens_sha256"] = {"train": encoded_digest(p.train), "eval": encoded_digest(p.eval)}
    logs = sorted(out.glob("training_*.log"))
    text = logs[-1].read_text(encoding="utf-8") if logs else ""
    res["cap_logged"] = "CUDA memory capped at" in text
    res["resumed_from"] = next(
        (ln.split("resumed from ", 1)[1].strip() for ln in text.splitlines() if "resumed from " in ln), None
    )
    if cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        res.update(
            peak_allocated_mib=round(torch.cuda.max_memory_allocated() / 2**20),
            peak_reserved_mib=round(torch.cuda.max_memory_reserved() / 2**20),
            total_mib=round(total / 2**20),
        )
        if cfg.memory.max_gpu_memory_usage:
            res["cap_mib"] = round(cfg.memory.max_gpu_memory_usage * total / 2**20)
            res["cap_honoured"] = res["peak_reserved_mib"] <= res["cap_mib"]
        freqs = [f for f in (cfg.memory.empty_cache_freq, cfg.training.cuda_cleanup_freq) if f]
        if freqs:  # the memory line is written after the cache was emptied at these steps
            at = [r["gpu_reserved_mb"] for r in steps if any(r["step"] % f == 0 for f in freqs)]
            other = [
                r["gpu_reserved_mb"] for r in steps if not any(r["step"] % f == 0 for f in freqs) and r["step"] > 1
            ]
            res["reserved_mib_after_release"] = round(sum(at) / len(at)) if at else None
            res["reserved_mib_other_steps"] = round(sum(other) / len(other)) if other else None
    answer = spec.get("answer")
    if answer:
        res["answers"] = [_answer(run, answer) for run in [str(out)] + answer.get("also", [])]
    return res


def _prompts(recipe_template: str, rows_file: Path, tok, n: int) -> list[list[int]]:
    from kotune.prompt import encode_prompt, split_template

    rows = [json.loads(x) for x in rows_file.read_text(encoding="utf-8").splitlines() if x.strip()]
    return [encode_prompt(tok, split_template(recipe_template, r["question"])[0]) for r in rows[:n]]


def _answer(run: str, spec: dict) -> dict:
    """Load a run folder with the fast engine (CPU here) and answer one held-out prompt greedily."""
    import torch

    from kotune.infer.fastgen import load_fast

    t0 = time.perf_counter()
    engine, tok, cfg = load_fast(run)
    ids = _prompts(cfg.data.template, Path(spec["rows"]), tok, 1)[0]
    out = engine.generate(
        torch.tensor([ids], device=engine.device),
        max_new_tokens=spec.get("max_new_tokens", 24),
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        do_sample=False,
    )
    new = out[0, len(ids) :].tolist()
    return {
        "run": run,
        "device": str(engine.device),
        "precision": engine.precision,
        "new_tokens": len(new),
        "text": tok.decode(new, skip_special_tokens=True)[:200],
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _trim(seq: list[int], eos: int | None, pad: int | None) -> list[int]:
    out = []
    for t in seq:
        out.append(t)
        if t == eos:
            break
    while out and out[-1] == pad and pad != eos:
        out.pop()
    return out


def w_generate(spec: dict) -> dict:
    """The fast engine against HF `generate` on the very same converted model: greedy tokens and tokens/s."""
    import torch
    from transformers import GenerationConfig

    from kotune.infer.fastgen import load_fast

    cuda = torch.cuda.is_available()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    res = {"device": "cuda" if cuda else "cpu", "max_new_tokens": spec["max_new_tokens"], "rows": []}
    for precision in spec["precisions"]:
        t0 = time.perf_counter()
        engine, tok, cfg = load_fast(spec["run"], precision)
        load_s = time.perf_counter() - t0
        dev = engine.device
        eos, pad, rp = tok.eos_token_id, tok.pad_token_id, cfg.generation.repetition_penalty
        prompts = _prompts(cfg.data.template, Path(spec["rows"]), tok, max(spec["batch"], spec["single"]))
        gcfg = GenerationConfig(
            do_sample=False,
            num_beams=1,
            max_new_tokens=spec["max_new_tokens"],
            eos_token_id=eos,
            pad_token_id=pad,
            repetition_penalty=rp,
        )

        def fast(ids, mask):
            return engine.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=spec["max_new_tokens"],
                eos_token_id=eos,
                pad_token_id=pad,
                repetition_penalty=rp,
                do_sample=False,
            )

        def hf(ids, mask):
            with torch.inference_mode():
                return engine.model.generate(input_ids=ids, attention_mask=mask, generation_config=gcfg)

        def batch_of(rows):
            width = max(len(r) for r in rows)
            ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=dev)
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=dev)
            return ids, mask

        ids, mask = batch_of(prompts[:1])  # warm-up (kernels, allocator)
        engine.generate(ids, attention_mask=mask, max_new_tokens=4, eos_token_id=eos, pad_token_id=pad)
        with torch.inference_mode():
            engine.model.generate(
                input_ids=ids,
                attention_mask=mask,
                generation_config=GenerationConfig(
                    do_sample=False, max_new_tokens=4, eos_token_id=eos, pad_token_id=pad
                ),
            )
        for size in (1, spec["batch"]):
            groups = [[p] for p in prompts[: spec["single"]]] if size == 1 else [prompts[:size]]
            outs, secs, ntok = {"fast": [], "hf": []}, {"fast": 0.0, "hf": 0.0}, {"fast": 0, "hf": 0}
            for g in groups:
                ids, mask = batch_of(g)
                for name, f in (("fast", fast), ("hf", hf)):
                    sync()
                    t = time.perf_counter()
                    o = f(ids, mask)
                    sync()
                    secs[name] += time.perf_counter() - t
                    for row in o[:, ids.shape[1] :].tolist():
                        new = _trim(row, eos, pad)
                        outs[name].append(new)
                        ntok[name] += len(new)
            same = [a == b for a, b in zip(outs["fast"], outs["hf"])]
            first_diff = []
            for a, b in zip(outs["fast"], outs["hf"]):
                k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
                first_diff.append(k if k is not None else (None if len(a) == len(b) else min(len(a), len(b))))
            res["rows"].append(
                {
                    "precision": engine.precision,
                    "requested": precision,
                    "batch": size,
                    "prompts": len(outs["fast"]),
                    "load_s": round(load_s, 1),
                    "fast_tokens": ntok["fast"],
                    "hf_tokens": ntok["hf"],
                    "fast_tok_s": round(ntok["fast"] / secs["fast"], 1),
                    "hf_tok_s": round(ntok["hf"] / secs["hf"], 1),
                    "same_rows": sum(same),
                    "first_divergence": first_diff,
                    "sample": tok.decode(outs["fast"][0], skip_special_tokens=True)[:120],
                }
            )
        engine = None  # the closures above are done with it: free the model before the next precision loads
        if cuda:
            torch.cuda.empty_cache()
    return res


WORKERS = {"versions": w_versions, "build_model": w_build_model, "train": w_train, "generate": w_generate}


def cmd_worker(args) -> int:
    spec = json.loads(Path(args.spec).read_text(encoding="utf-8"))
    try:
        res = WORKERS[args.kind](spec)
    except Exception as e:  # noqa: BLE001 - every failure is a finding for the report
        import traceback

        res = {
            "ok": False,
            "error": f"{type(e).__name__}: {str(e)[:1500]}",
            "traceback": traceback.format_exc()[-4000:],
        }
    res.setdefault("ok", True)
    Path(args.result).write_text(json.dumps(res, ensure_ascii=False, indent=1), encoding="utf-8")
    return 0


# ====================================================================== run (there, or here with --cpu)


class Check:
    """The orchestrator: no torch here, every figure comes from a worker process."""

    def __init__(self, args):
        self.args = args
        self.t0 = time.perf_counter()
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.bundle = Path(args.bundle).resolve()
        if args.tiny:  # a tiny bundle made here and now from --config
            self.bundle = (self.work / "tiny_bundle").resolve()
            cmd_prepare(argparse.Namespace(config=args.config, bundle=str(self.bundle), tiny=True))
        if not (self.bundle / "meta.json").is_file():
            raise SystemExit(
                f"{self.bundle}: no bundle. Make it here first: bash bench/gpu_prepare.sh [CONFIG] "
                "(or use --tiny for the plumbing alone)."
            )
        self.meta = json.loads((self.bundle / "meta.json").read_text(encoding="utf-8"))
        self.mode = "cpu" if args.cpu else "cuda"
        self.log = open(self.out / "workers.log", "a", encoding="utf-8")
        self.r: dict = {
            "mode": self.mode,
            "command": " ".join(sys.argv),
            "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "git_commit": git_commit(),
            "steps": args.steps,
            "bundle": self.meta,
            "checks": [],
            "skipped": [],
        }
        self.expected_path = Path(args.expected)

    # -------------------------------------------------------------- plumbing
    def left(self) -> float:
        return (self.args.budget_s or 1e9) - (time.perf_counter() - self.t0)

    def say(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:6.0f}s] {msg}", flush=True)

    def check(self, name: str, ok: bool | None, detail: str) -> None:
        self.r["checks"].append({"check": name, "ok": ok, "detail": detail})
        self.say(f"{'PASS' if ok else 'SKIP' if ok is None else 'FAIL'} {name}: {detail}")

    def worker(self, kind: str, spec: dict, name: str, timeout: float, cpu: bool = False) -> dict:
        if self.left() < 0:
            self.r["skipped"].append(f"{name}: time budget ({self.args.budget_s} s) spent")
            return {"ok": False, "error": "skipped: time budget spent", "budget": True}
        spec_f, res_f = self.work / f"{name}.spec.json", self.work / f"{name}.result.json"
        spec_f.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
        res_f.unlink(missing_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT / "src")] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        )
        if cpu or self.mode == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        self.log.write(f"\n===== {name} ({kind}) =====\n")
        self.log.flush()
        t = time.perf_counter()
        # On the device every step has its limit (the session's device time is short); the CPU dry run has none
        # unless --budget-s is given: on a shared 2-core CPU one 270M step can take a minute.
        # A step started inside the budget may run GRACE_S past it, so the report is written before the call's limit.
        limit = None if self.mode == "cpu" and not self.args.budget_s else max(10, min(timeout, self.left() + GRACE_S))
        try:
            subprocess.run(
                [sys.executable, __file__, "_worker", kind, str(spec_f), str(res_f)],
                env=env,
                cwd=ROOT,
                stdout=self.log,
                stderr=subprocess.STDOUT,
                timeout=limit,
            )
        except subprocess.TimeoutExpired:
            return {"ok": False, "error": f"timed out after {time.perf_counter() - t:.0f} s"}
        if not res_f.is_file():
            return {"ok": False, "error": "the worker died without a result (see workers.log)"}
        res = json.loads(res_f.read_text(encoding="utf-8"))
        res["process_s"] = round(time.perf_counter() - t, 1)
        return res

    def save(self) -> None:
        self.r["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        (self.out / "report.json").write_text(json.dumps(self.r, ensure_ascii=False, indent=1), encoding="utf-8")
        (self.out / "report.md").write_text(render_markdown(self.r), encoding="utf-8")

    def train_sets(self, name: str, extra: list[str]) -> list[str]:
        return [
            f"model.name={self.work / 'model'}",
            f"model.output_dir={self.work / 'runs' / name}",
            f"data.train_file={self.bundle / 'train.jsonl'}",
            f"data.eval_file={self.bundle / 'eval.jsonl'}",
            f"training.max_steps={self.args.steps}",
            "training.logging_steps=1",
            "logging.progress_bar=false",
            "training.save_total_limit=3",
            *extra,
        ]

    def train(self, name: str, extra: list[str], timeout: float) -> dict:
        spec = {"recipe": str(self.bundle / "recipe.yaml"), "sets": self.train_sets(name, extra)}
        return self.worker("train", spec, f"train_{name}", timeout)

    # -------------------------------------------------------------- the steps
    def run(self) -> int:
        a = self.args
        self.say(
            f"kotune GPU check, mode {self.mode}, bundle {self.meta['source_config']} "
            f"(fingerprint {self.meta['fingerprint']}), {a.steps} steps, out {self.out}"
        )
        v = self.worker("versions", {}, "versions", 120)
        self.r["versions"] = v
        self.say(
            "versions: "
            + ", ".join(
                f"{k} {v.get(k)}" for k in ("torch", "cuda", "gpu", "transformers", "peft", "bitsandbytes") if k in v
            )
        )
        if self.mode == "cuda" and not v.get("cuda_available"):
            self.check("CUDA available", False, "torch sees no CUDA GPU: run with --cpu for the dry run")
            self.save()
            return 2
        self.save()
        if "pytest" not in a.skip:
            self.pytest()
            self.save()
        built = self.worker(
            "build_model", {"bundle": str(self.bundle), "folder": str(self.work / "model")}, "build_model", 300
        )
        self.r["model"] = built
        if not built.get("ok"):
            self.check("random-init model", False, built.get("error", "?"))
            self.save()
            return 1
        self.say(
            f"model: {built['params']:,} parameters, weights sha256 {built['weights_sha256']} ({built['seconds']} s)"
        )
        self.training()
        self.save()
        if "generate" not in a.skip:
            self.generation()
            self.save()
        if "resume" not in a.skip:
            self.resume()
            self.save()
        failed = [c for c in self.r["checks"] if c["ok"] is False]
        self.say(
            f"done in {time.perf_counter() - self.t0:.0f} s: {len(failed)} failed checks, "
            f"report {self.out / 'report.md'}"
        )
        return 1 if failed else 0

    def pytest(self) -> None:
        files = sorted(
            str(p.relative_to(ROOT))
            for p in (ROOT / "tests").glob("test_*.py")
            if "mark.cuda" in p.read_text(encoding="utf-8")
        )
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT / "src")] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        )
        if self.mode == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider", *files]
        t = time.perf_counter()
        try:
            p = subprocess.run(
                cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=min(240, self.left() + GRACE_S)
            )
            text, rc = p.stdout + p.stderr, p.returncode
        except subprocess.TimeoutExpired as e:
            text, rc = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), 124
        (self.out / "pytest.txt").write_text(text, encoding="utf-8")
        summary = next(
            (
                ln.strip("= ")
                for ln in reversed(text.splitlines())
                if " in " in ln and any(w in ln for w in ("passed", "skipped", "failed", "error", "deselected"))
            ),
            "(no summary)",
        )
        self.r["pytest"] = {
            "command": " ".join(cmd[1:]),
            "rc": rc,
            "summary": summary,
            "seconds": round(time.perf_counter() - t, 1),
        }
        if self.mode == "cpu":
            self.check(
                "pytest -m cuda",
                None if rc in (0, 5) and "failed" not in summary else False,
                f"{summary} (no GPU: the CUDA tests skip)",
            )
        else:
            self.check("pytest -m cuda", rc == 0 and "skipped" not in summary, summary)

    def training(self) -> None:
        a = self.args
        cap = [f"memory.max_gpu_memory_usage={a.cap}"]
        runs: dict = {}
        self.r["train"] = runs
        # 3. the recipe in bf16 with the cap; checkpoints at step N-2 and N for the resume step
        save = f"training.save_steps={max(1, a.steps - 2)}"
        runs["bf16"] = self.train("bf16", ["memory.mixed_precision=bf16", save, *cap], 600)
        self.save()
        self.training_checks("bf16", runs["bf16"])
        self.compare_reference(runs["bf16"])
        if a.write_expected:
            self.write_expected(runs["bf16"])
        self.save()
        # fp16 autocast with the cache released every few steps (both option names)
        if "fp16" in a.skip:
            return self.quantized(cap)
        runs["fp16"] = self.train(
            "fp16",
            [
                "memory.mixed_precision=fp16",
                "memory.empty_cache_freq=10",
                "training.cuda_cleanup_freq=15",
                "training.save_steps=100000",
                *cap,
            ],
            300,
        )
        self.training_checks("fp16", runs["fp16"])
        self.save()
        self.quantized(cap)

    def quantized(self, cap: list[str]) -> None:
        a, runs = self.args, self.r["train"]
        # 4. QLoRA
        for bits in ("4bit", "8bit"):
            if bits in a.skip:
                continue
            runs[bits] = self.train(
                bits,
                [f"model.quantization={bits}", "memory.mixed_precision=bf16", "training.save_steps=100000", *cap],
                300,
            )
            self.training_checks(bits, runs[bits])
            self.save()
        # the cap enforced: a share of the GPU too small for the model must end in out-of-memory
        if "probe" in a.skip:
            return
        if self.mode == "cuda" and self.r["versions"].get("gpu_memory_mib"):
            frac = round(a.probe_cap_mib / self.r["versions"]["gpu_memory_mib"], 5)
            p = self.train(
                "cap_probe",
                [
                    f"memory.max_gpu_memory_usage={frac}",
                    "memory.mixed_precision=bf16",
                    "training.max_steps=2",
                    "training.save_steps=100000",
                ],
                180,
            )
            self.r["cap_probe"] = {**p, "fraction": frac, "cap_mib": a.probe_cap_mib}
            if p.get("budget"):
                return self.check(f"cap enforced ({a.probe_cap_mib} MiB)", None, p["error"])
            self.check(
                f"cap enforced ({a.probe_cap_mib} MiB)",
                bool(p.get("oom")),
                f"out-of-memory with {p.get('free_mib_at_oom')} MiB of the GPU still free"
                if p.get("oom")
                else f"no out-of-memory: {p.get('error') or 'trained under a cap smaller than the model'}",
            )
        else:
            self.check("cap enforced", None, "needs CUDA (the cap is ignored on CPU)")

    def training_checks(self, name: str, r: dict) -> None:
        if r.get("budget"):
            return self.check(f"train {name}", None, r["error"])
        if not r.get("ok"):
            if r.get("needs_cuda") or (self.mode == "cpu" and "CUDA" in r.get("error", "")):
                self.check(f"train {name}", None, "needs CUDA: " + r["error"].split(": ", 1)[-1][:160])
            else:
                self.check(f"train {name}", False, r.get("error", "?")[:300])
            return
        finite = all(x == x and abs(x) != float("inf") for x in r["losses"]) and r.get("eval_loss") is not None
        self.check(
            f"train {name}",
            finite and r["last_step"] == self.args.steps,
            f"{r['steps']} steps on {r['device']}, {r['tokens_per_s']} tokens/s, eval answer loss "
            f"{r.get('eval_loss') and round(r['eval_loss'], 4)}",
        )
        if self.mode == "cuda":
            self.check(
                f"cap honoured ({name})",
                bool(r.get("cap_honoured")) and r.get("cap_logged"),
                f"peak reserved {r.get('peak_reserved_mib')} MiB of a {r.get('cap_mib')} MiB cap; "
                f"log line {'present' if r.get('cap_logged') else 'missing'}",
            )
        if "tokens_sha256" in r and r["tokens_sha256"] != self.meta["tokens_sha256"]:
            self.check(f"rows ({name})", False, "the trained token ids differ from the bundle's (tokenizer version?)")

    def reference(self) -> dict | None:
        if not self.expected_path.is_file():
            return None
        refs = json.loads(self.expected_path.read_text(encoding="utf-8")).get("references", {})
        return refs.get(self.meta["fingerprint"], {}).get(str(self.args.steps))

    def compare_reference(self, r: dict) -> None:
        ref = self.reference()
        self.r["reference"] = ref
        if not r.get("ok"):
            return
        if ref is None:
            self.check(
                "eval loss vs CPU",
                None,
                f"no CPU reference for bundle {self.meta['fingerprint']} at "
                f"{self.args.steps} steps in {self.expected_path.name}: measure it with "
                "`bash bench/gpu_check.sh --cpu --write-expected`",
            )
            return
        ok, detail, diff, steps = compare_losses(r, ref, self.r["model"]["weights_sha256"])
        self.r["reference_diff"] = round(diff, 4)
        self.r["reference_step_diffs"] = [round(x, 4) for x in steps]
        self.check("eval loss vs CPU", ok, detail)

    def write_expected(self, r: dict) -> None:
        if not r.get("ok") or r["device"] != "cpu":
            self.say("--write-expected: only a finished CPU run is a reference; nothing written")
            return
        data = json.loads(self.expected_path.read_text(encoding="utf-8")) if self.expected_path.is_file() else {}
        data.setdefault("about", "CPU reference figures for bench/gpu_check.py, keyed by bundle fingerprint and steps.")
        v = self.r["versions"]
        entry = {
            "source_config": self.meta["source_config"],
            "rows": self.meta["rows"],
            "eval_loss": r["eval_loss"],
            "losses": r["losses"],
            "mixed_precision": r["mixed_precision"],
            "weights_sha256": self.r["model"]["weights_sha256"],
            "tokens_sha256": r.get("tokens_sha256"),
            "wall_s": r["wall_s"],
            "loop_s": r.get("loop_s"),
            "tokens_per_s": r["tokens_per_s"],
            "rss_peak_mib": r["rss_peak_mib"],
            "measured": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
            "git_commit": git_commit(),
            "host": f"{v.get('cpu')}, {v.get('cpu_threads')} threads; torch {v.get('torch')}, transformers "
            f"{v.get('transformers')}, peft {v.get('peft')}",
            "command": "bash bench/gpu_check.sh --cpu --write-expected",
        }
        data.setdefault("references", {}).setdefault(self.meta["fingerprint"], {})[str(self.args.steps)] = entry
        self.expected_path.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        self.say(f"CPU reference written to {self.expected_path}")

    def generation(self) -> None:
        src = self.r["train"].get("bf16", {})
        if not src.get("ok"):
            self.check("fast engine", None if src.get("budget") else False, "no trained run to generate from")
            return
        a = self.args
        g = self.worker(
            "generate",
            {
                "run": src["run"],
                "rows": str(self.bundle / "eval.jsonl"),
                "precisions": ["auto", "float32"],
                "single": a.gen_prompts,
                "batch": 8,
                "max_new_tokens": a.gen_tokens,
            },
            "generate",
            400,
        )
        self.r["generation"] = g
        if g.get("budget"):
            return self.check("fast engine", None, g["error"])
        if not g.get("ok"):
            self.check("fast engine", False, g.get("error", "?")[:300])
            return
        for row in g["rows"]:
            ok = row["same_rows"] == row["prompts"]
            self.check(
                f"fast engine = HF generate ({row['precision']}, batch {row['batch']})",
                ok if row["precision"] == "float32" else (ok or None),
                f"{row['same_rows']}/{row['prompts']} rows the same greedy tokens (first divergence "
                f"{row['first_divergence']}); {row['fast_tok_s']} vs {row['hf_tok_s']} tokens/s",
            )

    def resume(self) -> None:
        src = self.r["train"].get("bf16", {})
        if not src.get("ok"):
            self.check("resume on CPU", None if src.get("budget") else False, "no trained run with a checkpoint")
            return
        a = self.args
        run, copy = Path(src["run"]), self.work / "runs" / "resume_cpu"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(run, copy)
        cks = sorted((copy / "checkpoints").glob("step-*"))
        keep = [c for c in cks if int(c.name.split("-")[1]) < a.steps]
        if not keep:
            self.check("resume on CPU", False, f"no checkpoint before step {a.steps} in {run}")
            return
        for c in cks:
            if c not in keep[-1:]:
                shutil.rmtree(c)
        shutil.rmtree(copy / "adapter", ignore_errors=True)
        extra = ["memory.mixed_precision=bf16", f"training.save_steps={max(1, a.steps - 2)}"]
        sets = self.train_sets("resume_cpu", extra)
        r = self.worker(
            "train",
            {
                "recipe": str(self.bundle / "recipe.yaml"),
                "sets": sets,
                "resume": "latest",
                "answer": {"rows": str(self.bundle / "eval.jsonl"), "max_new_tokens": 24, "also": [str(run)]},
            },
            "resume_cpu",
            600,
            cpu=True,
        )
        self.r["resume"] = {**r, "from": keep[-1].name, "taken_on": src["device"]}
        if r.get("budget"):
            return self.check("resume on CPU", None, r["error"])
        if not r.get("ok"):
            self.check("resume on CPU", False, r.get("error", "?")[:300])
            return
        ans = r.get("answers") or []
        answered = len(ans) == 2 and all(x["new_tokens"] > 0 for x in ans)
        diff = abs(r["eval_loss"] - src["eval_loss"]) / src["eval_loss"]
        self.check(
            "resume on CPU",
            r["last_step"] == a.steps and r.get("resumed_from") is not None and answered,
            f"checkpoint {keep[-1].name} taken on {src['device']} resumed on {r['device']} to step {r['last_step']}; "
            f"eval answer loss {r['eval_loss']:.4f} vs {src['eval_loss']:.4f} finished on {src['device']} "
            f"({100 * diff:.2f} % apart); adapters answer on CPU: "
            + "; ".join(f"{x['new_tokens']} tokens" for x in ans),
        )


# ====================================================================== the report


def _f(x, nd=1):
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:,.{nd}f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def render_markdown(r: dict) -> str:
    v = r.get("versions", {})
    m = r.get("bundle", {})
    lines = [
        f"# kotune GPU check — {v.get('gpu') or 'CPU (' + str(v.get('cpu')) + ')'}",
        "",
        f"- started {r['started']}, commit {r.get('git_commit')}, mode **{r['mode']}**, {r['steps']} steps, "
        f"took {_f(r.get('elapsed_s'))} s",
        f"- command: `{r['command']}`",
        f"- rows: {m.get('source_config')} (bundle {m.get('fingerprint')}, {m.get('rows', {}).get('train_encoded')} "
        "train / "
        f"{m.get('rows', {}).get('eval_encoded')} eval rows, token length p50 {m.get('token_lengths', {}).get('p50')}, "
        f"max {m.get('token_lengths', {}).get('max')}); model: Gemma 3 "
        f"{'tiny' if m.get('tiny') else '270M'} architecture, random weights (seed {m.get('init_seed')}, sha256 "
        f"{r.get('model', {}).get('weights_sha256')})",
        "",
        "| "
        + " | ".join(
            k
            for k in (
                "python",
                "torch",
                "cuda",
                "gpu",
                "driver",
                "transformers",
                "peft",
                "accelerate",
                "bitsandbytes",
                "pydantic",
            )
        )
        + " |",
        "|" + "---|" * 10,
        "| "
        + " | ".join(
            _f(v.get(k))
            for k in (
                "python",
                "torch",
                "cuda",
                "gpu",
                "driver",
                "transformers",
                "peft",
                "accelerate",
                "bitsandbytes",
                "pydantic",
            )
        )
        + " |",
        "",
        "## Checks",
        "",
        "| check | result | detail |",
        "|---|---|---|",
    ]
    for c in r["checks"]:
        res = "pass" if c["ok"] else "skipped" if c["ok"] is None else "**FAIL**"
        lines.append(f"| {c['check']} | {res} | {c['detail'].replace('|', '/')} |")
    if r.get("pytest"):
        p = r["pytest"]
        lines += ["", f"`{p['command']}`: {p['summary']} (exit {p['rc']}, {p['seconds']} s; full output in pytest.txt)"]
    if r.get("train"):
        lines += [
            "",
            "## Training",
            "",
            "| run | device | quantization | autocast | tokens/s (all steps) | tokens/s (median step after the 1st) | "
            "step (s, median) | 1st step (s) | peak allocated (MiB) | peak reserved (MiB) | cap (MiB) | eval answer "
            "loss | wall (s) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, t in r["train"].items():
            if not t.get("ok"):
                err = (t.get("error") or "").replace("|", "/")
                lines.append(f"| {name} | " + " | ".join([err[:160]] + ["–"] * 11) + " |")
                continue
            lines.append(
                f"| {name} | {t['device']} | {t['quantization']} | {t['mixed_precision']} | "
                f"{_f(t.get('tokens_per_s'))} | "
                f"{_f(t.get('tokens_per_s_median_step'))} | {_f(t.get('step_s_median'), 3)} | "
                f"{_f(t.get('first_step_s'), 2)} | "
                f"{_f(t.get('peak_allocated_mib'))} | {_f(t.get('peak_reserved_mib'))} | {_f(t.get('cap_mib'))} | "
                f"{_f(t.get('eval_loss'), 4)} | {_f(t.get('wall_s'))} |"
            )
        ref = r.get("reference")
        if ref:
            lines += [
                "",
                f"CPU reference ({ref['host']}, {ref['measured']}): eval answer loss **{ref['eval_loss']:.4f}** after "
                f"{r['steps']} steps ({ref['mixed_precision']} autocast, {ref['wall_s']} s); difference "
                f"{100 * r.get('reference_diff', 0):+.2f} %.",
            ]
        fp = r["train"].get("fp16", {})
        if fp.get("reserved_mib_after_release") is not None:
            lines += [
                "",
                f"fp16 run, cache emptied every 10 (`memory.empty_cache_freq`) and 15 (`training.cuda_cleanup_freq`) "
                f"steps: reserved {fp['reserved_mib_after_release']} MiB right after those steps, "
                f"{fp['reserved_mib_other_steps']} MiB after the others.",
            ]
    if r.get("cap_probe"):
        p = r["cap_probe"]
        lines += [
            "",
            f"Cap probe: `memory.max_gpu_memory_usage={p['fraction']}` ({p['cap_mib']} MiB): "
            f"{p.get('error') or 'trained without running out of memory'}",
        ]
    g = r.get("generation", {})
    if g.get("rows"):
        lines += [
            "",
            "## Fast engine vs HF generate (greedy, same converted model)",
            "",
            f"{g['max_new_tokens']} new tokens at most; tokens/s counts generated tokens up to EOS.",
            "",
            "| weights | batch | prompts | engine tokens/s | HF generate tokens/s | same greedy tokens | first "
            "divergence | load (s) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in g["rows"]:
            lines.append(
                f"| {row['precision']} | {row['batch']} | {row['prompts']} | {_f(row['fast_tok_s'])} | "
                f"{_f(row['hf_tok_s'])} | "
                f"{row['same_rows']}/{row['prompts']} | {row['first_divergence']} | {row['load_s']} |"
            )
    rs = r.get("resume", {})
    if rs.get("ok"):
        lines += [
            "",
            "## Checkpoint resumed on CPU",
            "",
            f"{rs['from']} taken on {rs['taken_on']}, resumed on {rs['device']} to step {rs['last_step']}: eval answer "
            "loss "
            f"{rs['eval_loss']:.4f} (the run finished on {rs['taken_on']}: {r['train']['bf16']['eval_loss']:.4f}).",
            "",
        ]
        for x in rs.get("answers", []):
            lines.append(
                f"- `{x['run']}` on {x['device']} ({x['precision']}): {x['new_tokens']} tokens: "
                f"{json.dumps(x['text'], ensure_ascii=False)}"
            )
    lines.append("")
    return "\n".join(lines)


def compare_losses(run: dict, ref: dict, weights_sha256: str | None) -> tuple[bool, str, float, list[float]]:
    """GPU (or any) bf16 run against the CPU reference: eval answer loss and the training loss of every step."""
    same_start = ref.get("weights_sha256") == weights_sha256
    same_rows = ref.get("tokens_sha256") == run.get("tokens_sha256")
    diff = (run["eval_loss"] - ref["eval_loss"]) / ref["eval_loss"]
    steps = [(a - b) / b for a, b in zip(run["losses"], ref.get("losses") or [])]
    worst = max(steps, key=abs) if steps else 0.0
    detail = (
        f"{run['device']} {run['eval_loss']:.4f} vs CPU {ref['eval_loss']:.4f} ({100 * diff:+.2f} %); training loss "
        f"step 1 {100 * (steps[0] if steps else 0):+.2f} %, worst step {100 * worst:+.2f} % (tolerance "
        f"{100 * LOSS_TOLERANCE:.0f} %); same initial weights: {same_start}; same token ids: {same_rows}"
    )
    ok = abs(diff) <= LOSS_TOLERANCE and abs(worst) <= LOSS_TOLERANCE and same_start and same_rows
    return ok, detail, diff, steps


def cmd_compare(args) -> int:
    """A device report against a CPU reference measured later (or again): the eval answer losses side by side."""
    r = json.loads(Path(args.report).read_text(encoding="utf-8"))
    refs = json.loads(Path(args.expected).read_text(encoding="utf-8")).get("references", {})
    ref = refs.get(r["bundle"]["fingerprint"], {}).get(str(r["steps"]))
    t = r.get("train", {}).get("bf16", {})
    if ref is None or not t.get("ok"):
        print(
            f"nothing to compare: reference {'found' if ref else 'missing'} for bundle {r['bundle']['fingerprint']} "
            f"at {r['steps']} steps; bf16 run {'ok' if t.get('ok') else 'failed'}"
        )
        return 1
    ok, detail, _, _ = compare_losses(t, ref, r.get("model", {}).get("weights_sha256"))
    print(("PASS " if ok else "FAIL ") + detail)
    return 0 if ok else 1


# ====================================================================== command line


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="render the rows and tokenizer that travel (run here)")
    p.add_argument("--config", default="configs/civil_law.yaml")
    p.add_argument("--bundle", default=".gpu/bundle")
    p.add_argument("--tiny", action="store_true", help="a tokenizer trained on the rows and a two-layer model (tests)")
    p.set_defaults(fn=cmd_prepare)
    p = sub.add_parser("run", help="the checks (on the device; --cpu here)")
    p.add_argument("--bundle", default=".gpu/bundle")
    p.add_argument("--out", default=os.environ.get("OUT") or "/tmp/kotune_gpu_check/out")
    p.add_argument("--work", default="/tmp/kotune_gpu_check/work", help="model, run folders (not returned)")
    p.add_argument("--cpu", action="store_true", help="dry run: the same steps on CPU, CUDA-only ones skipped")
    p.add_argument(
        "--tiny",
        action="store_true",
        help="make a tiny bundle from --config first: a two-layer model and a "
        "tokenizer trained on the rows (seconds; the CI test)",
    )
    p.add_argument("--config", default="configs/civil_law.yaml", help="with --tiny: the recipe whose rows are used")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--cap", type=float, default=0.25, help="memory.max_gpu_memory_usage for the training runs")
    p.add_argument("--probe-cap-mib", type=int, default=512, help="a cap too small for the model (must OOM)")
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--gen-prompts", type=int, default=4, help="prompts generated one by one (batch 1)")
    p.add_argument("--budget-s", type=float, default=None, help="stop starting steps after this many seconds")
    p.add_argument(
        "--skip",
        nargs="+",
        default=[],
        choices=["pytest", "fp16", "4bit", "8bit", "probe", "generate", "resume"],
        help="steps to leave out (a rerun of what failed; bf16 training always runs)",
    )
    p.add_argument("--expected", default=str(EXPECTED))
    p.add_argument("--write-expected", action="store_true", help="store the CPU eval loss as the reference")
    p.set_defaults(fn=lambda a: Check(a).run())
    p = sub.add_parser("compare", help="a device report.json against the CPU reference in --expected")
    p.add_argument("report")
    p.add_argument("--expected", default=str(EXPECTED))
    p.set_defaults(fn=cmd_compare)
    p = sub.add_parser("slim-wheel", help="drop bitsandbytes' native libraries for other CUDA/ROCm releases")
    p.add_argument("wheel")
    p.add_argument("--keep", nargs="+", default=["cpu", "cuda128", "cuda130", "cuda132"])
    p.set_defaults(fn=cmd_slim_wheel)
    p = sub.add_parser("size", help="the size of what a device call sends")
    p.add_argument("--carry", nargs="*", default=[".gpu"])
    p.set_defaults(fn=cmd_size)
    p = sub.add_parser("_worker")
    p.add_argument("kind", choices=sorted(WORKERS))
    p.add_argument("spec")
    p.add_argument("result")
    p.set_defaults(fn=cmd_worker)
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
