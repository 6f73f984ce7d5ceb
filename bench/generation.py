"""Benchmark 2 — generation on one fine-tuned run: naive `generate` vs kotune's engines vs llama.cpp.

Engines (each in its own process, so peak RSS is its own):
  naive            AutoModelForCausalLM fp32 + PeftModel adapter unmerged + `model.generate`
  kotune-fp32      kotune torch engine: adapter merged, lean KV-cache loop, fp32 weights
  kotune-bf16      the same with bf16 weights (the default on CPUs with native bf16)
  kotune-int8      the same with dynamic int8 weights
  kotune-llamacpp  kotune's llama.cpp engine on the run's GGUF export (`kotune export`)
  llamacpp         llama-cpp-python's own `Llama.generate` on the same GGUF (its native sampler)

Same prompts (the first --n dev questions through the run's template), greedy, the config's
repetition penalty, a fixed --max_new_tokens. Reported per engine: load time, time to first
token (prompt prefill + first token), decode tokens/s at batch 1 (tokens after the first),
peak RSS (VmHWM, load included) and RSS after answering; quality against naive fp32:
share of prompts with identical greedy output, and teacher-forced top-1 agreement (the
argmax of each engine's logits on naive's own prompt + answer sequences).

    PYTHONPATH=src .venv/bin/python bench/generation.py RUN [--n 3] [--max_new_tokens 48] \
        [--engines naive,kotune-bf16,…] [--output bench/results/generation.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
ENGINES = ["naive", "kotune-fp32", "kotune-bf16", "kotune-int8", "kotune-llamacpp", "llamacpp"]


def proc_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def prompts(run: Path, questions: str, n: int):
    from kotune.config import load_config
    from kotune.data import read_question_lines
    from kotune.prompt import split_template

    cfg = load_config(run / "config.yaml")
    qs = [r["question"] for r in read_question_lines(Path(questions))][:n]
    return cfg, [split_template(cfg.data.template, q)[0] for q in qs]


class FirstToken:
    """Streamer that only notes when the first new token arrives."""

    def __init__(self):
        self.calls, self.t_first = 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == 2:
            self.t_first = time.perf_counter()

    def end(self):
        pass


def worker(args) -> dict:
    import torch

    from kotune.memory import cpu_threads
    from kotune.prompt import encode_prompt

    torch.set_num_threads(cpu_threads())
    run = Path(args.run)
    cfg, texts = prompts(run, args.questions, args.n)
    g = cfg.generation
    t0 = time.perf_counter()
    name = args.worker
    scorer = None
    if name == "naive":
        from kotune.model import load_run

        model, tok, _ = load_run(run, merge=False)
        gen = model.generate
        scorer = lambda ids: model(input_ids=ids).logits[0]  # noqa: E731
    elif name.startswith("kotune-") and name != "kotune-llamacpp":
        from kotune.infer.fastgen import load_fast

        eng, tok, _ = load_fast(run, {"fp32": "float32", "bf16": "bfloat16", "int8": "int8"}[name.split("-")[1]])
        gen = eng.generate
        scorer = lambda ids: eng.model(input_ids=ids).logits[0]  # noqa: E731
    elif name == "kotune-llamacpp":
        from kotune.infer.llamacpp import load_llamacpp

        eng, tok, _ = load_llamacpp(run, gguf_file=args.gguf)
        gen = eng.generate
    elif name == "llamacpp":
        from llama_cpp import Llama
        from transformers import AutoTokenizer

        from kotune.memory import cpu_threads as threads

        tok = AutoTokenizer.from_pretrained(str(run))
        llm = Llama(
            model_path=args.gguf or str(run / "model-q8_0.gguf"),
            n_ctx=2048,
            n_threads=threads(),
            n_threads_batch=threads(),
            verbose=False,
        )

        def gen(input_ids, streamer=None, max_new_tokens=64, eos_token_id=None, repetition_penalty=1.0, **_):
            out = []
            streamer.put(input_ids)
            for t in llm.generate(
                input_ids[0].tolist(),
                temp=0.0,
                top_k=1,
                top_p=1.0,
                min_p=0.0,
                repeat_penalty=repetition_penalty,
                reset=True,
            ):
                out.append(int(t))
                streamer.put(torch.tensor([t]))
                if t == eos_token_id or len(out) >= max_new_tokens:
                    break
            return torch.tensor([input_ids[0].tolist() + out])
    else:
        raise SystemExit(f"unknown engine {name}")
    load_s = time.perf_counter() - t0
    rss_loaded = proc_mb("VmRSS")
    rows = []
    for text in texts:
        ids = torch.tensor([encode_prompt(tok, text)])
        st = FirstToken()
        t1 = time.perf_counter()
        with torch.inference_mode():
            out = gen(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                streamer=st,
                max_new_tokens=args.max_new_tokens,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
                repetition_penalty=g.repetition_penalty,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
            )
        t2 = time.perf_counter()
        new = out[0, ids.shape[1] :].tolist()
        if tok.eos_token_id in new:
            new = new[: new.index(tok.eos_token_id) + 1]
        rows.append(
            dict(
                prompt_tokens=ids.shape[1],
                new_tokens=len(new),
                ttft_s=st.t_first - t1,
                total_s=t2 - t1,
                decode_tok_s=(len(new) - 1) / (t2 - st.t_first) if len(new) > 1 else None,
                ids=new,
                text=tok.decode(new, skip_special_tokens=True),
            )
        )
    peak, rss_end = proc_mb("VmHWM"), proc_mb("VmRSS")  # before scoring, which loads more for llama.cpp
    if scorer is None and args.reference:  # llama.cpp engines: a second context that keeps every position's logits
        from llama_cpp import Llama

        scoring = Llama(model_path=args.gguf or str(run / "model-q8_0.gguf"), n_ctx=512, logits_all=True, verbose=False)

        def scorer(ids):
            scoring.reset()
            scoring.eval(ids[0].tolist())
            return torch.from_numpy(scoring.scores[: ids.shape[1]].copy())

    agreement = None
    if args.reference and scorer is not None:
        ref = json.loads(Path(args.reference).read_text())
        same = total = 0
        with torch.inference_mode():
            for text, r in zip(texts, ref["rows"]):
                p = encode_prompt(tok, text)
                seq = torch.tensor([p + r["ids"]])
                mine = scorer(seq)[len(p) - 1 : -1].float().argmax(-1).tolist()
                same += sum(a == b for a, b in zip(mine, r["argmax"]))
                total += len(mine)
        agreement = same / max(total, 1)
    if name == "naive":  # the reference for the others: naive's own argmax along its answers
        with torch.inference_mode():
            for text, r in zip(texts, rows):
                p = encode_prompt(tok, text)
                r["argmax"] = scorer(torch.tensor([p + r["ids"]]))[len(p) - 1 : -1].float().argmax(-1).tolist()
    return dict(
        engine=name,
        load_s=load_s,
        rss_after_load_mb=rss_loaded,
        rss_end_mb=rss_end,
        peak_rss_mb=peak,
        rows=rows,
        teacher_forced_top1=agreement,
    )


def run_worker(name: str, args, reference: str | None) -> dict:
    cmd = (
        [
            sys.executable,
            str(HERE),
            args.run,
            "--worker",
            name,
            "--n",
            str(args.n),
            "--max_new_tokens",
            str(args.max_new_tokens),
            "--questions",
            args.questions,
        ]
        + (["--reference", reference] if reference else [])
        + (["--gguf", args.gguf] if args.gguf else [])
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HERE.parent.parent / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    print(f"[{name}] …", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"{name} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(r: dict, ref: dict | None) -> dict:
    rows = r["rows"]
    dec = [x["decode_tok_s"] for x in rows if x["decode_tok_s"]]
    toks = sum(x["new_tokens"] - 1 for x in rows)
    decode_time = sum((x["new_tokens"] - 1) / x["decode_tok_s"] for x in rows if x["decode_tok_s"])
    same = None
    if ref is not None:
        same = sum(a["ids"] == b["ids"] for a, b in zip(rows, ref["rows"])) / len(rows)
    return dict(
        engine=r["engine"],
        load_s=r["load_s"],
        ttft_s=sum(x["ttft_s"] for x in rows) / len(rows),
        decode_tok_s=toks / decode_time if decode_time else None,
        decode_tok_s_per_prompt=dec,
        new_tokens=[x["new_tokens"] for x in rows],
        peak_rss_mb=r["peak_rss_mb"],
        rss_end_mb=r["rss_end_mb"],
        same_greedy_output=same,
        teacher_forced_top1=r["teacher_forced_top1"],
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="Trained run folder (default-model run for the published figures).")
    ap.add_argument("--questions", default="data/civil_law_dev.jsonl")
    ap.add_argument("--n", type=int, default=3, help="Prompts (first N dev questions).")
    ap.add_argument("--max_new_tokens", type=int, default=48)
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--gguf", help="GGUF for the llama.cpp engines (default RUN/model-q8_0.gguf, exported if missing).")
    ap.add_argument("--output", default="bench/results/generation.json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--reference", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if importlib.util.find_spec("llama_cpp") is None:
        skipped = [e for e in engines if "llamacpp" in e]
        engines = [e for e in engines if "llamacpp" not in e]
        if skipped:
            print(f"llama-cpp-python not installed: skipping {', '.join(skipped)} (pip install 'kotune[llamacpp]')")
    elif any("llamacpp" in e for e in engines) and not args.gguf and not (Path(args.run) / "model-q8_0.gguf").is_file():
        from kotune.infer.gguf_export import export_gguf

        print("exporting the run to GGUF (once)…", flush=True)
        export_gguf(args.run)
    raw, ref_path, ref = {}, None, None
    with tempfile.TemporaryDirectory() as tmp:
        if "naive" in engines:
            raw["naive"] = ref = run_worker("naive", args, None)
            ref_path = str(Path(tmp) / "ref.json")
            Path(ref_path).write_text(json.dumps(ref))
        for e in engines:
            if e != "naive":
                raw[e] = run_worker(e, args, ref_path)
    rows = {e: summarise(r, ref) for e, r in raw.items()}
    print(
        f"\nrun {args.run}; {args.n} dev prompts, greedy, max_new_tokens {args.max_new_tokens}, batch 1; "
        f"{os.cpu_count()} CPUs (load avg {os.getloadavg()[0]:.1f} at end)"
    )
    print(
        "| engine | load (s) | TTFT (s) | decode tok/s | × naive | peak RSS (MB) | RSS after (MB) | same greedy text | "
        "teacher-forced top-1 |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    base = rows.get("naive", {}).get("decode_tok_s")
    for e, r in rows.items():
        speed = f"{r['decode_tok_s'] / base:.1f}×" if base and r["decode_tok_s"] else "–"
        same = "–" if r["same_greedy_output"] is None else f"{r['same_greedy_output']:.0%}"
        tf = "–" if r["teacher_forced_top1"] is None else f"{r['teacher_forced_top1']:.1%}"
        print(
            f"| {e} | {r['load_s']:.1f} | {r['ttft_s']:.2f} | {r['decode_tok_s']:.1f} | {speed} | "
            f"{r['peak_rss_mb']:.0f} | "
            f"{r['rss_end_mb']:.0f} | {same} | {tf} |"
        )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(
        json.dumps(
            {
                "run": args.run,
                "n": args.n,
                "max_new_tokens": args.max_new_tokens,
                "load_avg_end": os.getloadavg(),
                "summary": rows,
                "raw": raw,
            },
            indent=2,
            ensure_ascii=False,
        ),
        encoding="utf-8",
    )
    print(f"written {args.output}")


if __name__ == "__main__":
    main()
