"""One decode step's LM head in isolation: [1, 640] x [640, 262144] (Gemma 3 270M) per weight format.
`--shape OUT IN` times another matrix-vector product, e.g. a decoder layer's `--shape 2048 640`
(hot cache: the same small weight every call, unlike the decode loop).

    PYTHONPATH=src .venv/bin/python bench/lm_head_matvec.py [--threads 2] [--shape 262144 640]
"""

from __future__ import annotations

import argparse
import time
import warnings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--shape", type=int, nargs=2, default=(262144, 640), metavar=("OUT", "IN"))
    args = ap.parse_args()
    import torch

    from kotune.infer.fastgen import int8_linear
    from kotune.memory import cpu_threads

    torch.set_num_threads(args.threads or cpu_threads())
    warnings.simplefilter("ignore")
    vocab, hidden = args.shape
    w = torch.randn(vocab, hidden) * 0.02
    x = torch.randn(1, hidden)
    s = w.abs().amax(1) / 127
    wq = (w / s[:, None]).round().to(torch.int8)
    q = int8_linear(w)
    variants = {
        "fp32": (lambda: torch.nn.functional.linear(x, w)),
        "bf16": (lambda xb=x.bfloat16(), wb=w.bfloat16(): torch.nn.functional.linear(xb, wb)),
        "fp16": (lambda xh=x.half(), wh=w.half(): torch.nn.functional.linear(xh, wh)),
        "int8 weight-only (bf16 act.)": (
            lambda xb=x.bfloat16(), sb=s.bfloat16(): torch._weight_int8pack_mm(xb, wq, sb)
        ),
        "int8 dynamic (int8 act.)": (lambda: q(x)),
    }
    print(f"| weights | ms per call ({torch.get_num_threads()} threads) |\n|---|---|")
    with torch.inference_mode():
        for name, f in variants.items():
            f(), f()
            t = time.perf_counter()
            for _ in range(args.repeat):
                f()
            print(f"| {name} | {(time.perf_counter() - t) / args.repeat * 1000:.3g} |", flush=True)


if __name__ == "__main__":
    main()
