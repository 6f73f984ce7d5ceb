"""One generation thread that answers many requests at once: a running batch that requests join and leave.

The model, the tokenizer and the grounding are shared and not thread-safe, so a single thread owns them. It admits
waiting requests into the running batch (`infer/batch.py`) between decode steps, up to `max_batch` at a time: each
is planned (refusal, sources, rule, prompt), prefilled alone, then decoded with the others, each with its own
sampling settings, stop rule, citation constraint and callback. A client that went away, or a request past its
deadline, leaves the batch at the next step and frees its slot. Engines that cannot batch (llama.cpp, context-aware
decoding) answer one request at a time in the same thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

from ..config import apply_overrides
from ..infer.batch import BatchDecoder, Sequence, supports_batching
from ..infer.sampling import stop_ids
from ..memory import release_parallel_threads

log = logging.getLogger("kotune")


class Cancelled(Exception):
    """The client went away; raised inside generation to stop it early."""


class TimedOut(Exception):
    """The request ran past the server's `request_timeout_s`."""


class QueueFull(Exception):
    pass


@dataclass
class Stats:
    served: int = 0
    cancelled: int = 0
    failed: int = 0
    timed_out: int = 0
    # Where the generation thread's time goes: admitting requests (planning, retrieval, prefill; the whole answer
    # when the engine cannot batch) against decode steps (with the finishing of the answers that end in them), and
    # how many rows the steps carried.
    admit_s: float = 0.0
    decode_s: float = 0.0
    steps: int = 0
    step_rows: int = 0


@dataclass(eq=False)  # identity: two jobs with the same question are still two jobs
class Job:
    question: str
    max_tokens: int | None = None
    overrides: dict = field(default_factory=dict)  # GenerationSection fields for this request only
    on_text: object = None  # called from the worker thread with each new piece of text
    history: list = field(default_factory=list)  # earlier (question, answer) turns of the conversation
    cancel: threading.Event = field(default_factory=threading.Event)
    future: Future = field(default_factory=Future)
    deadline: float | None = None  # time.monotonic() after which the request is abandoned


@dataclass(eq=False)
class _Running:
    job: Job
    plan: object
    seq: Sequence


class Worker:
    """`max_batch`: requests decoded together; `timeout_s`: longest a request may wait and generate (None: no limit)."""

    def __init__(self, bot, max_queue: int = 64, max_batch: int = 8, timeout_s: float | None = None):
        self.bot, self.base_gen, self.max_queue, self.timeout_s = bot, bot.gen, max_queue, timeout_s
        self.stats = Stats()
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._running: list[_Running] = []
        self.closed = False
        batchable = max_batch > 1 and not bot.gen.context_contrast and supports_batching(bot.model)
        self.max_batch = max_batch if batchable else 1
        self._decoder = BatchDecoder(bot.model) if batchable else None
        if max_batch > 1 and not batchable:
            log.info("serving one request at a time: this engine or `context_contrast` cannot batch")
        release_parallel_threads()  # from here on only the generation thread runs the model (memory.py says why)
        self._thread = threading.Thread(target=self._loop, name="kotune-generate", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        """Requests waiting or generating."""
        with self._cond:
            return len(self._waiting) + len(self._running)

    @property
    def active(self) -> int:
        """Requests generating now."""
        return len(self._running)

    def submit(self, job: Job) -> Future:
        with self._cond:
            if self.closed:
                raise QueueFull("the server is shutting down")
            n = len(self._waiting) + len(self._running)
            if n >= self.max_queue:
                raise QueueFull(f"{n} requests are already waiting (limit {self.max_queue}); retry shortly")
            if self.timeout_s:
                job.deadline = time.monotonic() + self.timeout_s
            self._waiting.append(job)
            self._cond.notify()
        return job.future

    # -- the generation thread --------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._waiting or self._running or self.closed):
                    self._cond.wait()
                if self.closed and not self._running:
                    break
                admit = []
                while self._waiting and len(self._running) + len(admit) < self.max_batch:
                    admit.append(self._waiting.popleft())
                expired = self._expired_waiting()
            for job in expired:
                self._end(job, error=TimedOut())
            for job in admit:
                t = time.perf_counter()
                self._start(job)
                self.stats.admit_s += time.perf_counter() - t
            if self._running:
                t = time.perf_counter()
                self._step()
                self.stats.decode_s += time.perf_counter() - t

    def _expired_waiting(self) -> list[Job]:
        now = time.monotonic()
        gone = [j for j in self._waiting if j.deadline is not None and now > j.deadline]
        for j in gone:
            self._waiting.remove(j)
        return gone

    def _end(self, job: Job, result=None, error: BaseException | None = None) -> None:
        """Resolve the job's future once and count it."""
        if job.future.done():
            return
        if error is None:
            self.stats.served += 1
            job.future.set_result(result)
            return
        kind = {Cancelled: "cancelled", TimedOut: "timed_out"}.get(type(error), "failed")
        setattr(self.stats, kind, getattr(self.stats, kind) + 1)
        if kind == "failed":
            log.error("generation failed: %s", error, exc_info=error)
        job.future.set_exception(error)

    def _on_text(self, job: Job):
        if job.on_text is None:
            return None

        def on_text(piece: str) -> None:
            if job.cancel.is_set():
                raise Cancelled()  # unwinds the generation from inside its streamer
            job.on_text(piece)

        return on_text

    def _prompt_tokens(self, job: Job, answer) -> int:
        return len(self.bot.prompt_ids(job.question, answer.context, job.history))

    def _start(self, job: Job) -> None:
        if not job.future.set_running_or_notify_cancel() or job.cancel.is_set():
            if not job.future.done():
                job.future.set_exception(Cancelled())
            self.stats.cancelled += 1
            return
        try:
            # validated like the config, though the app only passes values it has checked
            gen = apply_overrides(self.base_gen, "generation", job.overrides) if job.overrides else self.base_gen
            if self._decoder is None:
                answer = self.bot.answer(job.question, self._on_text(job), job.max_tokens, job.history, gen)
                self._end(job, (answer, self._prompt_tokens(job, answer)))
                return
            plan = self.bot.plan(job.question, self._on_text(job), job.max_tokens, job.history, gen)
            if plan.answer is not None:
                self._end(job, (plan.answer, self._prompt_tokens(job, plan.answer)))
                return
            seq = self._sequence(job, plan)
            self._decoder.add(seq)
        except Exception as e:  # noqa: BLE001 — one request's failure must not stop the others
            self._end(job, error=e)
            return
        if seq.finished:
            self._finish(_Running(job, plan, seq))
        else:
            self._running.append(_Running(job, plan, seq))

    def _sequence(self, job: Job, plan) -> Sequence:
        kw = plan.kwargs
        streamer = plan.streamer

        def on_token(token: int) -> None:
            if job.cancel.is_set():
                raise Cancelled()
            if streamer is not None:
                streamer.token(token)

        return Sequence(
            plan.prompt,
            kw["max_new_tokens"],
            stop_ids=stop_ids(kw.get("eos_token_id")),
            do_sample=kw.get("do_sample", False),
            temperature=kw.get("temperature"),
            top_k=kw.get("top_k"),
            top_p=kw.get("top_p"),
            repetition_penalty=kw.get("repetition_penalty") or 1.0,
            logits_processor=list(plan.processors or []),
            on_token=on_token,
        )

    def _finish(self, run: _Running) -> None:
        if run.seq.error is not None:
            self._end(run.job, error=run.seq.error)
            return
        try:
            answer = self.bot.finish(run.plan, run.seq.new)
            self._end(run.job, (answer, len(run.plan.prompt)))
        except Exception as e:  # noqa: BLE001
            self._end(run.job, error=e)

    def _step(self) -> None:
        now = time.monotonic()
        leaving = []
        for run in self._running:
            if run.job.cancel.is_set() or run.job.future.cancelled():
                leaving.append((run, Cancelled()))
            elif run.job.deadline is not None and now > run.job.deadline:
                leaving.append((run, TimedOut()))
        if leaving:
            self._decoder.remove([r.seq for r, _ in leaving])
            for run, error in leaving:
                self._running.remove(run)
                self._end(run.job, error=error)
        if not self._running:
            return
        self.stats.steps += 1
        self.stats.step_rows += len(self._decoder)
        try:
            done = {id(s) for s in self._decoder.step()}
        except Exception as e:  # noqa: BLE001 — the batch is lost; every request in it fails, the server goes on
            runs, self._running = self._running, []
            self._decoder = BatchDecoder(self.bot.model)
            for run in runs:
                self._end(run.job, error=e)
            return
        for run in [r for r in self._running if id(r.seq) in done]:
            self._running.remove(run)
            self._finish(run)

    def close(self, wait_s: float = 60.0) -> None:
        """Refuse new jobs, drop the waiting ones, let the running ones finish (up to `wait_s`)."""
        with self._cond:
            self.closed = True
            dropped = list(self._waiting)
            self._waiting.clear()
            self._cond.notify()
        for job in dropped:
            self.stats.cancelled += 1
            job.future.cancel()
        self._thread.join(wait_s)
