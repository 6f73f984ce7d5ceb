"""What a running batch costs on this machine: prefill of one grounded prompt, and one decode step at batch 1…8.

    .venv/bin/python bench/batch_step.py --run runs/civil_law [--question "전세권이란 무엇인가요?"] [--steps 16]

Explains the serving figures: every request pays its own prefill (not batched: compute-bound on a CPU), then shares
decode steps with the others. Then the LM head's product alone for 1…8 rows in fp16 and bf16, the step's largest part.
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--question", default="집주인이 계약 만료 때 보증금을 안 돌려주면 어떻게 해야 하나요?")
    ap.add_argument("--steps", type=int, default=16)
    args = ap.parse_args()

    from kotune.infer.batch import BatchDecoder, Sequence
    from kotune.infer.generate import Chatbot

    bot = Chatbot.from_run(args.run, greedy=True)
    plan = bot.plan(args.question)
    prompt = plan.prompt
    print(f"prompt: {len(prompt)} tokens")
    engine = bot.model
    for width in (1, 2, 4, 8):
        dec = BatchDecoder(engine)
        t = time.perf_counter()
        for _ in range(width):
            dec.add(Sequence(list(prompt), 10_000))
        prefill = (time.perf_counter() - t) / width
        dec.step()  # warm-up
        t = time.perf_counter()
        for _ in range(args.steps):
            dec.step()
        step = (time.perf_counter() - t) / args.steps
        print(
            f"batch {width}: prefill {prefill:.2f} s a request, decode step {step * 1000:.0f} ms "
            f"({width / step:.1f} tokens/s)"
        )
    del bot, engine, dec
    head_times()


def head_times(rows=(1, 2, 4, 8), repeat: int = 10) -> None:
    """The LM head's product (Gemma 3: 262 144 x 640) for 1…8 rows, fp16 and bf16, random weights."""
    import torch

    torch.manual_seed(0)
    weight = torch.randn(262144, 640)
    for dtype in (torch.float16, torch.bfloat16):
        w = weight.to(dtype)
        for m in rows:
            x = torch.randn(m, 640).to(dtype)
            torch.nn.functional.linear(x, w)
            t = time.perf_counter()
            for _ in range(repeat):
                torch.nn.functional.linear(x, w)
            ms = (time.perf_counter() - t) / repeat * 1000
            print(f"LM head {str(dtype).split('.')[-1]}, {m} row(s): {ms:.1f} ms")


if __name__ == "__main__":
    main()
