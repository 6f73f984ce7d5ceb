"""The LM head's precision in a running batch: decode steps at batch 1 and 8 with the engine's fp16 head, then with
the same weights as a bf16 head (an experiment: the engine ships the fp16 head).

    .venv/bin/python bench/batch_head.py [--run runs/civil_law]
"""

from __future__ import annotations

import argparse
import time

import torch

from kotune.infer.batch import BatchDecoder, Sequence
from kotune.infer.generate import Chatbot


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/civil_law")
    args = ap.parse_args()
    bot = Chatbot.from_run(args.run, greedy=True)
    prompt = bot.plan("집주인이 계약 만료 때 보증금을 안 돌려주면 어떻게 해야 하나요?").prompt
    engine = bot.model

    def run(label: str) -> None:
        for width in (1, 8):
            dec = BatchDecoder(engine)
            for _ in range(width):
                dec.add(Sequence(list(prompt), 10000))
            dec.step()
            t = time.perf_counter()
            for _ in range(16):
                dec.step()
            ms = (time.perf_counter() - t) / 16 * 1000
            print(f"{label}, batch {width}: {ms:.0f} ms a step, {width / ms * 1000:.1f} tokens/s")

    run("fp16 head")
    weight = engine.model.get_output_embeddings().weight.data.to(torch.bfloat16)

    class BF16Head(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.linear(x.to(torch.bfloat16), weight)

    engine.model.set_output_embeddings(BF16Head())
    run("bf16 head")


if __name__ == "__main__":
    main()
