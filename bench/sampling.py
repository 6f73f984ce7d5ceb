"""Milliseconds to pick one token from a row of logits over Gemma 3's vocabulary (262,144), as the engines do it
(`kotune.infer.sampling.next_tokens`): greedy, and sampling with the recipe's warpers, on a flat random row and on
a peaked one (as a trained model's rows are).

    .venv/bin/python bench/sampling.py [--threads 2] [--batch 1]
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    import torch

    from kotune.infer.sampling import next_tokens

    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--n", type=int, default=50)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    vocab = 262144
    flat, seen = torch.randn(a.batch, vocab) * 3, torch.randint(0, vocab, (a.batch, 300))
    # A language model's row is peaked: a few dozen tokens hold most of the probability. Here 50 tokens 12 above the
    # rest hold over 99 % of it at temperature 0.7, so top-p finds its nucleus among the top 1024 without a full sort.
    peaked = flat.clone()
    peaked[:, :50] += 12
    cases = {
        "greedy": dict(do_sample=False),
        "greedy, repetition penalty 1.1": dict(do_sample=False, repetition_penalty=1.1),
        "sampling: temperature 0.8, top-k 50, top-p 0.9 (generation defaults)": dict(
            do_sample=True, temperature=0.8, top_k=50, top_p=0.9
        ),
        "sampling: temperature 0.8, top-p 0.9, no top-k": dict(do_sample=True, temperature=0.8, top_k=0, top_p=0.9),
        "sampling: temperature 0.7, top-p 0.9, no top-k (the civil-law recipe), peaked row": dict(
            do_sample=True, temperature=0.7, top_k=0, top_p=0.9, peaked=True
        ),
    }
    print(f"| picker (batch {a.batch}, {a.threads} threads, vocabulary {vocab}) | ms per step |\n|---|---|")
    for name, kw in cases.items():
        logits = peaked if kw.pop("peaked", False) else flat
        for _ in range(3):
            next_tokens(logits, seen, **kw)
        t = time.perf_counter()
        for _ in range(a.n):
            next_tokens(logits, seen, **kw)
        print(f"| {name} | {(time.perf_counter() - t) / a.n * 1000:.2f} |")


if __name__ == "__main__":
    main()
