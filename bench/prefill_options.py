"""Two ways to take a request's prefill off the running batch's path, measured (neither ships).

    .venv/bin/python bench/prefill_options.py --run runs/civil_law [--rows 7] [--steps 30]

A server request pays its prefill alone while the batch waits (docs/benchmarks.md, "Serving"). This bench checks the
two remedies that do not change what a request decodes:

1. Prefill in a second thread while the batch keeps decoding (the prefill thread on one OpenMP thread). Prints the
   median decode step of a batch of --rows with and without a prefill running beside it, and the prefill's own time
   in both cases: it only helps if the two together take less than one after the other.
2. Prefix caching that keeps greedy output exact: the prompt is always prefilled in fixed blocks, so a block whose
   tokens were seen before could be reused bit for bit. Prints the prefill time in one pass and in blocks of 16, 32
   and 64 tokens, and how far the blocked prefill's last logits are from the one-pass ones.

Last, where a one-pass prefill's time goes (torch profiler): the matrix products' share and their rate (2 FLOP per
weight of the decoder's linear layers per token), and the attention kernel's share.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--question", default="전세 계약 갱신요구권은 몇 번 쓸 수 있나요?")
    ap.add_argument("--rows", type=int, default=7, help="Rows of the running batch.")
    ap.add_argument("--steps", type=int, default=30, help="Decode steps timed in each condition.")
    args = ap.parse_args()

    import torch

    from kotune.infer.batch import BatchDecoder, Sequence
    from kotune.infer.generate import Chatbot
    from kotune.memory import release_parallel_threads

    bot = Chatbot.from_run(args.run)
    engine, plan = bot.model, bot.plan(args.question)
    prompt, kw = list(plan.prompt), plan.kwargs
    print(f"prompt: {len(prompt)} tokens")

    def prefill(block: int | None = None):
        """The prompt's last logits and cache, in one pass or in blocks of `block` tokens."""
        cache, n = None, len(prompt)
        with torch.inference_mode():
            for start in range(0, n, block or n):
                end = min(n, start + (block or n))
                ids = torch.tensor([prompt[start:end]])
                logits, cache = engine._forward(ids, torch.ones(1, end), torch.arange(start, end)[None], cache)
        return logits

    def median_time(f, repeat: int = 5) -> float:
        f()
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    results: dict = {}

    def batch_with_and_without_a_prefill_beside() -> None:  # the server's generation thread is not the main one
        decoder = BatchDecoder(engine)
        for _ in range(args.rows):
            decoder.add(
                Sequence(
                    list(prompt),
                    10_000,
                    do_sample=kw.get("do_sample", False),
                    temperature=kw.get("temperature"),
                    top_k=kw.get("top_k"),
                    top_p=kw.get("top_p"),
                    logits_processor=list(plan.processors or []),
                )
            )

        def steps() -> list[float]:
            times = []
            for _ in range(args.steps):
                t = time.perf_counter()
                decoder.step()
                times.append(time.perf_counter() - t)
            return times

        steps()
        results["step alone"] = statistics.median(steps())
        results["prefill alone"] = median_time(prefill)
        stop, beside = threading.Event(), []

        def prefill_loop() -> None:
            torch.set_num_threads(1)
            while not stop.is_set():
                t = time.perf_counter()
                prefill()
                beside.append(time.perf_counter() - t)

        thread = threading.Thread(target=prefill_loop)
        thread.start()
        results["step beside a prefill"] = statistics.median(steps())
        stop.set()
        thread.join()
        results["prefill beside the batch"] = statistics.median(beside)

    release_parallel_threads()
    worker = threading.Thread(target=batch_with_and_without_a_prefill_beside)
    worker.start()
    worker.join()
    s1, p1 = results["step alone"], results["prefill alone"]
    s2, p2 = results["step beside a prefill"], results["prefill beside the batch"]
    print(f"batch of {args.rows}: decode step {s1 * 1000:.0f} ms; prefill {p1 * 1000:.0f} ms in the same thread")
    print(f"with a prefill in a second thread: decode step {s2 * 1000:.0f} ms, the prefill {p2 * 1000:.0f} ms")
    print(
        f"a prefill plus the steps it overlaps: {p2 * 1000:.0f} ms side by side, "
        f"{(p1 + p2 / s2 * s1) * 1000:.0f} ms one after the other"
    )

    one_pass = prefill()
    print(f"prefill in one pass: {median_time(prefill) * 1000:.0f} ms")
    for block in (16, 32, 64):
        blocked = prefill(block)
        diff = (blocked.float() - one_pass.float()).abs().max().item()
        same = bool(blocked.argmax() == one_pass.argmax())
        took = median_time(lambda b=block: prefill(b))
        print(
            f"prefill in blocks of {block}: {took * 1000:.0f} ms, last logits differ by up to {diff:.2f} "
            f"(same argmax: {same})"
        )

    from torch.profiler import ProfilerActivity, profile

    head = engine.model.get_output_embeddings()
    body = sum(m.weight.numel() for m in engine.model.modules() if isinstance(m, torch.nn.Linear) and m is not head)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            prefill()
    self_us = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    total = sum(self_us.values())
    mm = self_us.get("aten::mm", 0) + self_us.get("aten::addmm", 0)
    attention = sum(v for k, v in self_us.items() if "scaled_dot_product" in k)
    rate = 2 * body * len(prompt) * 5 / (mm / 1e6) / 1e9 if mm else 0.0
    print(
        f"one-pass prefill, profiled: matrix products {mm / total:.0%} of the time, at {rate:.0f} GFLOP/s "
        f"({body / 1e6:.0f} M linear weights); attention kernel {attention / total:.0%}"
    )


if __name__ == "__main__":
    main()
