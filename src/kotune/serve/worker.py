"""One generation thread: requests wait in a bounded queue and run one at a time.

The model and `Chatbot.gen` are shared state, and `model.generate` is not
thread-safe, so a single worker thread owns them. Each job carries its own
callback and cancel flag, so outputs of concurrent requests never mix and a
client that went away stops its generation at the next token.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from ..config import apply_overrides


class Cancelled(Exception):
    """The client went away; raised inside generation to stop it early."""


class QueueFull(Exception):
    pass


@dataclass
class Stats:
    served: int = 0
    cancelled: int = 0
    failed: int = 0


@dataclass(eq=False)  # identity: two jobs with the same question are still two jobs
class Job:
    question: str
    max_tokens: int | None = None
    overrides: dict = field(default_factory=dict)  # GenerationSection fields for this request only
    on_text: object = None  # called from the worker thread with each new piece of text
    cancel: threading.Event = field(default_factory=threading.Event)


class Worker:
    def __init__(self, bot, max_queue: int = 64):
        self.bot, self.base_gen, self.max_queue = bot, bot.gen, max_queue
        self.stats = Stats()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kotune-generate")
        self._lock = threading.Lock()
        self._jobs: set[Job] = set()
        self.closed = False

    @property
    def pending(self) -> int:
        """Requests waiting or generating."""
        return len(self._jobs)

    def submit(self, job: Job) -> Future:
        with self._lock:
            if self.closed:
                raise QueueFull("the server is shutting down")
            if len(self._jobs) >= self.max_queue:
                raise QueueFull(
                    f"{len(self._jobs)} requests are already waiting (limit {self.max_queue}); retry shortly"
                )
            self._jobs.add(job)
        fut = self._pool.submit(self._run, job)
        fut.add_done_callback(lambda f: self._finished(job, f))
        return fut

    def _finished(self, job: Job, fut: Future) -> None:
        with self._lock:
            self._jobs.discard(job)
            if fut.cancelled() or isinstance(fut.exception(), Cancelled):
                self.stats.cancelled += 1
            elif fut.exception() is not None:
                self.stats.failed += 1
            else:
                self.stats.served += 1

    def _run(self, job: Job):
        """Runs in the worker thread; returns `(Answer, prompt_tokens)`."""
        if job.cancel.is_set():
            raise Cancelled()

        def on_text(piece: str) -> None:
            if job.cancel.is_set():
                raise Cancelled()  # unwinds model.generate from inside its streamer
            job.on_text(piece)

        # validated like the config, though the app only passes values it has checked
        self.bot.gen = apply_overrides(self.base_gen, "generation", job.overrides) if job.overrides else self.base_gen
        try:
            answer = self.bot.answer(
                job.question, on_text=on_text if job.on_text else None, max_new_tokens=job.max_tokens
            )
            # counted here: the tokenizer is not safe to share with the event-loop thread
            return answer, len(self.bot.prompt_ids(job.question, answer.context))
        finally:
            self.bot.gen = self.base_gen

    def close(self) -> None:
        """Refuse new jobs, drop the waiting ones, let the running one finish."""
        with self._lock:
            self.closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)
