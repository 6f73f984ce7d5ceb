"""What a running batch costs on this machine: prefill of one grounded prompt, then decode steps at batch 1 and wider.

    .venv/bin/python bench/batch_step.py --run runs/civil_law [--widths 1 8] [--seconds 60] [--steps 10]

Explains the serving figures: every request pays its own prefill (not batched: compute-bound on a CPU), then shares
decode steps with the others. The widths are measured in turn, round after round, for --seconds, and the medians are
printed with each width's tokens/s against batch 1 (the median of the rounds' ratios): on a shared host a single
measurement moves by a third from one minute to the next, so the rounds pair each width with a batch-1 measurement
taken moments before. Rows sample as the run's config says (the recipe: temperature 0.7, top-k 50, top-p 0.9).
Then the LM head alone (Gemma 3's 262 144 x 640, random weights) for 1…8 rows: fp16, bf16 and dynamic-int8
products, and the engine's shortlist head (fastgen.py); and one layer's decode attention (Gemma 3 270M: 4 heads, 1
kv head, d 256) for 1 and 8 rows over 120…512 keys, through the SDPA kernel and through `_row_attention` (batch.py).
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--question", default="집주인이 계약 만료 때 보증금을 안 돌려주면 어떻게 해야 하나요?")
    ap.add_argument("--widths", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--steps", type=int, default=10, help="Decode steps timed per width per round.")
    args = ap.parse_args()

    from kotune.infer.batch import BatchDecoder, Sequence
    from kotune.infer.generate import Chatbot

    bot = Chatbot.from_run(args.run)
    plan = bot.plan(args.question)
    kw = plan.kwargs
    engine = bot.model

    def sequence():
        return Sequence(
            list(plan.prompt),
            10_000,
            do_sample=kw.get("do_sample", False),
            temperature=kw.get("temperature"),
            top_k=kw.get("top_k"),
            top_p=kw.get("top_p"),
            repetition_penalty=kw.get("repetition_penalty") or 1.0,
            logits_processor=list(plan.processors or []),
        )

    widths = sorted(set([1] + args.widths))
    steps: dict[int, list[float]] = {w: [] for w in widths}
    prefill = []
    deadline = time.perf_counter() + args.seconds
    while time.perf_counter() < deadline or not steps[widths[-1]]:
        for width in widths:
            dec = BatchDecoder(engine)
            for _ in range(width):
                t = time.perf_counter()
                dec.add(sequence())
                prefill.append(time.perf_counter() - t)
            dec.step()  # warm-up
            t = time.perf_counter()
            for _ in range(args.steps):
                dec.step()
            steps[width].append((time.perf_counter() - t) / args.steps)
    print(f"prompt: {len(plan.prompt)} tokens, prefill median {statistics.median(prefill):.2f} s a request")
    for width in widths:
        ms = statistics.median(steps[width]) * 1000
        ratios = [(width / s) / (1 / one) for s, one in zip(steps[width], steps[1])]
        print(
            f"batch {width}: decode step {ms:.0f} ms (median of {len(steps[width])} rounds, "
            f"{min(steps[width]) * 1000:.0f}-{max(steps[width]) * 1000:.0f}), {width / ms * 1000:.1f} tokens/s, "
            f"{statistics.median(ratios):.2f}x batch 1"
        )
    del bot, engine, dec
    head_times()
    attention_times()


def head_times(rows=(1, 2, 4, 8), repeat: int = 10) -> None:
    """The LM head (Gemma 3: 262 144 x 640) for 1…8 rows: fp16, bf16 and dynamic-int8 products and the
    shortlist head."""
    import torch

    from kotune.infer.fastgen import _shortlist_head, int8_linear

    torch.manual_seed(0)
    weight = torch.randn(262144, 640) * 0.02
    bf16 = weight.to(torch.bfloat16)
    heads = {
        "fp16": lambda x, w=weight.to(torch.float16): torch.nn.functional.linear(x.to(torch.float16), w),
        "bf16": lambda x: torch.nn.functional.linear(x, bf16),
        "int8": lambda x, lin=int8_linear(bf16): lin(x.float()),
        "shortlist": _shortlist_head(torch.nn.Parameter(bf16, requires_grad=False)),
    }
    with torch.inference_mode():
        for name, head in heads.items():
            for m in rows:
                x = torch.randn(m, 1, 640).to(torch.bfloat16)
                head(x)
                t = time.perf_counter()
                for _ in range(repeat):
                    head(x)
                ms = (time.perf_counter() - t) / repeat * 1000
                print(f"LM head {name}, {m} row(s): {ms:.1f} ms")


def attention_times(lengths=(120, 250, 512), rows=(1, 8), repeat: int = 100) -> None:
    """One layer's decode attention (one query a row; Gemma 3 270M: 4 heads, 1 kv head, d 256, bf16): one SDPA call
    for the rows, against `_row_attention`'s loop over them."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from kotune.infer.batch import _row_attention

    class Module:
        num_key_value_groups, is_causal, training = 4, True, False

    def us(f) -> float:
        f()
        t = time.perf_counter()
        for _ in range(repeat):
            f()
        return (time.perf_counter() - t) / repeat * 1e6

    torch.manual_seed(0)
    scale = 256**-0.5
    with torch.inference_mode():
        for b in rows:
            for n in lengths:
                q = torch.randn(b, 4, 1, 256).to(torch.bfloat16)
                k, v = (torch.randn(b, 1, n, 256).to(torch.bfloat16) for _ in range(2))
                sdpa = us(lambda: sdpa_attention_forward(Module(), q, k, v, None, scaling=scale))
                mine = us(lambda: _row_attention(Module(), q, k, v, None, scaling=scale))
                print(
                    f"attention, {b} row(s), one query over {n} keys: SDPA {sdpa:.0f} us, _row_attention {mine:.0f} us"
                )


if __name__ == "__main__":
    main()
