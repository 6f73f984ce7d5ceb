"""Where one decode step of the torch engine spends its time (torch.profiler).

Decodes --tokens tokens at batch 1 after one prompt, and prints: mean ms/token, the
LM head's share (timed with forward hooks; Gemma 3's head is 262k x 640, larger than
the whole transformer body), the decoder layers' share, the rest (sampling, cache,
Python), and the top operators by self CPU time.

    PYTHONPATH=src .venv/bin/python bench/profile_generation.py RUN [--precision bfloat16] [--tokens 32] \
        [--output bench/results/profile_generation_bf16.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--precision", default="bfloat16", choices=["float32", "bfloat16", "int8"])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--output")
    args = ap.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from kotune.infer.fastgen import load_fast
    from kotune.prompt import encode_prompt, split_template

    eng, tok, cfg = load_fast(args.run, args.precision)
    model = eng.model
    head = model.get_output_embeddings()
    layers = getattr(model, model.base_model_prefix).layers
    spent = {"head": 0.0, "layers": 0.0}

    def timer(key):
        def pre(mod, inp):
            mod._t0 = time.perf_counter()

        def post(mod, inp, out):
            spent[key] += time.perf_counter() - mod._t0

        return pre, post

    for key, mods in (("head", [head]), ("layers", list(layers))):
        for m in mods:
            pre, post = timer(key)
            m.register_forward_pre_hook(pre)
            m.register_forward_hook(post)
    ids = torch.tensor(
        [
            encode_prompt(
                tok,
                split_template(
                    cfg.data.template, "전세 계약이 끝났는데 집주인이 보증금을 안 돌려줘요. 어떻게 해야 하나요?"
                )[0],
            )
        ]
    )
    kw = dict(max_new_tokens=args.tokens, eos_token_id=None, pad_token_id=tok.pad_token_id, repetition_penalty=1.1)
    eng.generate(ids, max_new_tokens=4, eos_token_id=None, pad_token_id=tok.pad_token_id)  # warm-up

    class Clock:  # time from the first new token on: decode only, no prefill
        def put(self, v):
            self.n = getattr(self, "n", -1) + 1
            if self.n == 1:
                self.t1 = time.perf_counter()
                spent["head"] = spent["layers"] = 0.0

        def end(self):
            self.t2 = time.perf_counter()

    clock = Clock()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        eng.generate(ids, streamer=clock, **kw)
    n = args.tokens - 1
    per_tok = (clock.t2 - clock.t1) / n * 1000
    head_ms, layers_ms = spent["head"] / n * 1000, spent["layers"] / n * 1000
    print(f"{args.precision}: {per_tok:.1f} ms/token ({1000 / per_tok:.1f} tok/s, profiler on) over {n} decode steps")
    print(
        f"  LM head {head_ms:.1f} ms ({head_ms / per_tok:.0%}), decoder layers {layers_ms:.1f} ms "
        f"({layers_ms / per_tok:.0%}), "
        f"rest (embedding, final norm, logits processing, cache, Python) {per_tok - head_ms - layers_ms:.1f} ms"
    )
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    print(table)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
        Path(args.output).write_text(
            json.dumps(
                {
                    "run": args.run,
                    "precision": args.precision,
                    "decode_steps": n,
                    "ms_per_token": per_tok,
                    "lm_head_ms": head_ms,
                    "layers_ms": layers_ms,
                    "top_ops": [
                        {
                            "op": e.key,
                            "self_cpu_ms_per_token": e.self_cpu_time_total / 1000 / args.tokens,
                            "calls": e.count,
                        }
                        for e in top
                    ],
                },
                indent=2,
            ),
            encoding="utf-8",
        )


if __name__ == "__main__":
    main()
