"""Load test for `kotune serve`: N concurrent streaming clients for a bounded time.

    .venv/bin/python bench/load_server.py --run runs/civil_law [--clients 1 8 32] [--duration 60] [--max-tokens 64]
        [--max-batch 8]
    .venv/bin/python bench/load_server.py --url http://127.0.0.1:8000 [--api-key KEY]

With --run the server is started as its own process (`kotune serve` on loopback, a free port), as clients elsewhere
would meet it: clients in the server's process would compete with it for the interpreter lock; with --url an already
running server is used (loopback addresses only). Before measuring, each question is asked once (--warmup): the first
time a question's articles are used, their paragraphs are embedded and cached, which would otherwise weigh on
whichever client count runs first. Each client sends a streaming chat request,
reads it to the end, and sends the next one until --duration has passed; requests under way then finish.
Several --clients values run one after another against the same server (one process, the same model), so their
figures compare: `--clients 1 8` gives the single stream beside 8 at once. Time to first token (TTFT) is measured to
the first non-empty content piece, so it includes the time a request waits in the server's queue. A grounded answer
streams its article's rule before the model writes: `TTFT model` is the time to the first piece after it (the first
piece the model generated; the same as TTFT for answers without a rule). Prints a markdown table and writes the
figures as JSON (--output), with the server process's peak RSS (with --run) and, from /health before and after each
client count, where the generation thread's time went: its share admitting requests (planning, retrieval, prefill,
during which the batch waits), the mean decode step and the rows it carried.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from urllib.parse import urlparse

QUESTIONS = [
    "전세권이란 무엇인가요?",
    "전입신고를 하면 대항력은 언제부터 생기나요?",
    "집주인이 계약 만료 때 보증금을 안 돌려주면 어떻게 해야 하나요?",
    "계약금만 낸 상태에서 계약을 해제할 수 있나요?",
    "확정일자는 왜 받아야 하나요?",
    "임대차 계약을 갱신하자고 요구할 수 있나요?",
]


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100)."""
    if not values:
        return None
    s = sorted(values)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


async def one_request(client, url: str, model: str, question: str, max_tokens: int, headers: dict) -> dict:
    import httpx

    payload = {
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    ttft, tokens, done, pieces, rule = None, 0, False, [], False
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=payload, headers=headers) as r:
            if r.status_code != 200:
                await r.aread()
                return {"error": f"HTTP {r.status_code}: {r.text[:200]}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    return {"error": event["error"].get("message", "error event")}
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                rule = rule or bool(event.get("rule"))
                for choice in event.get("choices", []):
                    if choice["delta"].get("content"):
                        pieces.append(time.perf_counter() - t0)
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    if not done:
        return {"error": "stream ended without [DONE]"}
    total = time.perf_counter() - t0
    ttft = pieces[0] if pieces else total
    model_first = pieces[1] if rule and len(pieces) > 1 else (total if rule else ttft)
    return {"ttft": ttft, "ttft_model": model_first, "latency": total, "tokens": tokens}


async def run_load(
    url: str, model: str, clients: int, duration: float, max_tokens: int, api_key: str | None, questions: int = 0
) -> dict:
    """`questions`: each client sends at least this many requests (the warm-up), whatever the duration."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline = time.perf_counter() + duration
    results: list[dict] = []

    async def client_loop(i: int, client) -> None:
        n = 0
        while time.perf_counter() < deadline or n < questions:
            results.append(
                await one_request(client, url, model, QUESTIONS[(i + n) % len(QUESTIONS)], max_tokens, headers)
            )
            n += 1

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    # A request may wait behind every other client's answer: allow for the whole queue.
    async with httpx.AsyncClient(timeout=httpx.Timeout(duration + 600), limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(i, client) for i in range(clients)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    ttft, lat = [r["ttft"] for r in ok], [r["latency"] for r in ok]
    ttft_model = [r["ttft_model"] for r in ok]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "url": url,
        "model": model,
        "clients": clients,
        "duration_s": duration,
        "max_tokens": max_tokens,
        "wall_s": round(wall, 2),
        "requests": len(ok),
        "errors": len(errors),
        "error_samples": errors[:5],
        "ttft_s": {"p50": percentile(ttft, 50), "p95": percentile(ttft, 95)},
        "ttft_model_s": {"p50": percentile(ttft_model, 50), "p95": percentile(ttft_model, 95)},
        "latency_s": {"p50": percentile(lat, 50), "p95": percentile(lat, 95)},
        "requests_per_s": len(ok) / wall if wall else 0.0,
        "completion_tokens": tokens,
        "tokens_per_s": tokens / wall if wall else 0.0,
    }


def server_time(url: str) -> dict | None:
    """The generation thread's time counters from /health (None from a server without them)."""
    import httpx

    health = httpx.get(f"{url}/health", timeout=30).json()
    return {k: health[k] for k in ("admit_s", "decode_s", "steps", "step_rows")} if "admit_s" in health else None


def thread_split(before: dict | None, after: dict | None) -> dict | None:
    """Between two readings: the share of the generation thread's busy time spent admitting requests, the mean
    decode step and the mean rows a step carried."""
    if not before or not after:
        return None
    d = {k: after[k] - before[k] for k in after}
    busy, steps = d["admit_s"] + d["decode_s"], d["steps"]
    return {
        "admit_share": round(d["admit_s"] / busy, 3) if busy else 0.0,
        "step_ms": round(1000 * d["decode_s"] / steps, 1) if steps else 0.0,
        "rows_per_step": round(d["step_rows"] / steps, 2) if steps else 0.0,
    }


@contextmanager
def server_process(run: str, max_queue: int, max_batch: int, api_key: str | None, startup_s: float = 900.0):
    """`kotune serve RUN` in its own process on a free loopback port: yields (base URL, pid), stops it on exit."""
    import os
    import socket
    import subprocess
    import sys
    import tempfile

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "kotune", "serve", run, "--port", str(port), "--max_queue", str(max_queue)]
    cmd += ["--max_batch", str(max_batch), "--timeout", "0"]
    env = {**os.environ, **({"KOTUNE_API_KEY": api_key} if api_key else {})}
    log = tempfile.TemporaryFile()  # the server's own log (a line per request): shown only if it fails to start
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if proc.poll() is not None:
                log.seek(0)
                tail = log.read().decode("utf-8", "replace")[-2000:]
                raise SystemExit(f"`{' '.join(cmd)}` exited with {proc.returncode} before serving:\n{tail}")
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"the server did not answer /health within {startup_s:.0f} s")
            time.sleep(1)
        yield url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def peak_rss_mb(pid: int) -> int | None:
    """The process's peak resident set (VmHWM), in MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024)
    except OSError:
        return None
    return None


def table(r: dict) -> str:
    def f(x):
        return "–" if x is None else f"{x:.2f}"

    return "\n".join(
        [
            "| clients | duration (s) | max_tokens | requests | errors | TTFT p50 (s) | TTFT p95 (s) "
            "| TTFT model p50 (s) | TTFT model p95 (s) | latency p50 (s) | latency p95 (s) | requests/s | tokens/s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
            f"| {r['clients']} | {r['wall_s']:.0f} | {r['max_tokens']} | {r['requests']} | {r['errors']} | "
            f"{f(r['ttft_s']['p50'])} | {f(r['ttft_s']['p95'])} | "
            f"{f(r['ttft_model_s']['p50'])} | {f(r['ttft_model_s']['p95'])} | "
            f"{f(r['latency_s']['p50'])} | {f(r['latency_s']['p95'])} | "
            f"{r['requests_per_s']:.2f} | "
            f"{r['tokens_per_s']:.1f} |",
        ]
    )


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = ap.add_mutually_exclusive_group(required=True)
    target.add_argument("--run", help="Run folder: start a server for it in this process.")
    target.add_argument("--url", help="Base URL of a running server on this machine, e.g. http://127.0.0.1:8000")
    ap.add_argument("--clients", type=int, nargs="+", default=[32], help="One or more client counts, run in turn.")
    ap.add_argument("--max-batch", type=int, default=8, help="The server's max_batch (1: one request at a time).")
    ap.add_argument("--duration", type=float, default=60.0, help="Seconds during which clients start new requests.")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--api-key", default=None)
    ap.add_argument(
        "--warmup", action=argparse.BooleanOptionalAction, default=True, help="Ask each question once first."
    )
    ap.add_argument("--output", default=None, help="Write the figures as JSON here.")
    args = ap.parse_args(argv)
    if args.url and urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        ap.error("--url must be a loopback address: this bench only loads servers on this machine")

    if args.run:
        server = server_process(args.run, max(args.clients) + 8, args.max_batch, args.api_key)
        model = Path(args.run).resolve().name
    else:
        import httpx

        server = nullcontext((args.url.rstrip("/"), None))
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        model = httpx.get(f"{args.url.rstrip('/')}/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
    reports = []
    with server as (url, pid):
        if args.warmup:
            asyncio.run(run_load(url, model, 1, 0.0, args.max_tokens, args.api_key, questions=len(QUESTIONS)))
        for clients in args.clients:
            before = server_time(url)
            report = asyncio.run(run_load(url, model, clients, args.duration, args.max_tokens, args.api_key))
            report["run"], report["max_batch"] = args.run, args.max_batch
            report["generation_thread"] = thread_split(before, server_time(url))
            if pid is not None:
                report["peak_rss_mb"] = peak_rss_mb(pid)
            print(table(report), flush=True)
            if report["generation_thread"]:
                g = report["generation_thread"]
                print(
                    f"generation thread: {g['admit_share']:.0%} admitting requests (plan, retrieval, prefill), "
                    f"decode steps of {g['step_ms']:.0f} ms carrying {g['rows_per_step']:.1f} rows on average"
                )
            if report["errors"]:
                print("errors:", *report["error_samples"], sep="\n  ")
            reports.append(report)
    if len(reports) > 1:
        one = None  # each run against the latest single-client run before it (`--clients 1 8 1 8` pairs them)
        for r in reports:
            one = r if r["clients"] == 1 else one
            if one and one["tokens_per_s"]:
                r["x_single_stream"] = round(r["tokens_per_s"] / one["tokens_per_s"], 2)
                print(f"{r['clients']} clients: {r['x_single_stream']}x the single stream's tokens/s")
    report = reports[0] if len(reports) == 1 else {"runs": reports}
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, ensure_ascii=False, indent=2), encoding="utf-8")
    return report


if __name__ == "__main__":
    main()
