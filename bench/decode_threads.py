"""Why the server's loading thread gives back its OpenMP workers (`memory.release_parallel_threads`).

    .venv/bin/python bench/decode_threads.py --run runs/civil_law [--rounds 4] [--steps 20]

`kotune serve` loads the model in one thread and decodes in another, as here. Each thread that runs torch ops gets its
own OpenMP team; once the process holds more OpenMP threads than CPUs, the runtime puts its workers to sleep after
every op instead of spinning. Decode steps at batch 1, in turn: in the loading thread, in a second thread while the
loading thread keeps its team, and in a third thread after the loading thread gave its team back. Prints each one's
median ms a step and the process's voluntary context switches a step (getrusage).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import threading
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--question", default="전세권이란 무엇인가요?")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()

    from kotune.infer.batch import BatchDecoder, Sequence
    from kotune.infer.generate import Chatbot
    from kotune.memory import release_parallel_threads

    bot = Chatbot.from_run(args.run)
    prompt = bot.plan(args.question).prompt

    def measure() -> tuple[float, float]:
        ms, switches = [], []
        for _ in range(args.rounds):
            dec = BatchDecoder(bot.model)
            dec.add(Sequence(list(prompt), 10_000))
            dec.step()
            before, t = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw, time.perf_counter()
            for _ in range(args.steps):
                dec.step()
            ms.append((time.perf_counter() - t) / args.steps * 1000)
            switches.append((resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw - before) / args.steps)
        return statistics.median(ms), statistics.median(switches)

    def in_thread() -> tuple[float, float]:
        out = []
        thread = threading.Thread(target=lambda: out.append(measure()))
        thread.start()
        thread.join()
        return out[0]

    rows = [("the loading thread", measure()), ("a second thread", in_thread())]
    released = release_parallel_threads()
    rows.append(
        (f"a third thread, after the release ({'taken' if released else 'no OpenMP runtime found'})", in_thread())
    )
    for label, (ms, switches) in rows:
        print(f"{label}: {ms:.0f} ms a step, {switches:.0f} voluntary context switches a step")


if __name__ == "__main__":
    main()
