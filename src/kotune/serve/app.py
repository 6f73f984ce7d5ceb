"""The FastAPI app: OpenAI-compatible chat completions, models, health, statutes, and the chat page.

Requests wait in a bounded queue and are decoded together in a running batch by `Worker` (see worker.py). The last
user message is the question; the earlier user/assistant turns are the conversation it is read in (retrieval reads a
follow-up with the previous question, and the prompt carries the turns that fit `generation.history_tokens`).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..infer.generate import Chatbot
from .schemas import UNSUPPORTED, APIError, ChatRequest, Limits
from .worker import Job, QueueFull, TimedOut, Worker

STATIC = Path(__file__).parent / "static"
KEEPALIVE_S = 5.0  # an SSE comment while a request waits in the queue, so proxies and clients keep the connection


def citation_extras(answer) -> dict:
    """The extra response fields: the cited sources that hold, flagged citations, and the sources put in the prompt
    (the bot's grounding checked them; a run without one has none)."""
    return {
        "citations": answer.citation_records(),
        "flagged_citations": list(answer.flagged),
        "retrieved": [a.record() for a in answer.context],
        "abstained": answer.abstained,
        "rule": answer.rule or None,
    }


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(
    bot_or_run,
    api_key: str | None = None,
    model_id: str | None = None,
    limits: Limits | None = None,
    **generation_overrides,
) -> FastAPI:
    """`bot_or_run`: a `Chatbot`, or a run folder to load one from (with `generation_overrides`). The routes below
    find the bot, its worker and the server's settings in `app.state`."""

    if isinstance(bot_or_run, Chatbot):
        bot = bot_or_run
    else:
        bot = Chatbot.from_run(bot_or_run, **generation_overrides)
        model_id = model_id or Path(bot_or_run).resolve().name
    limits = limits or Limits()
    app = FastAPI(title="kotune", version="1", lifespan=_lifespan, docs_url="/docs", redoc_url=None)
    worker = Worker(bot, max_queue=limits.max_queue, max_batch=limits.max_batch, timeout_s=limits.request_timeout_s)
    app.state.bot, app.state.worker, app.state.limits = bot, worker, limits
    app.state.model_id, app.state.api_key, app.state.created = model_id or "kotune", api_key, int(time.time())
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.include_router(v1)
    app.include_router(pages)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI):
    yield
    await asyncio.to_thread(app.state.worker.close)  # uvicorn has already let in-flight responses finish


async def _api_error(request: Request, exc: APIError):
    return JSONResponse(exc.body(), status_code=exc.status)


async def _invalid(request: Request, exc: RequestValidationError):
    errs = exc.errors()
    first = errs[0] if errs else {}
    param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None  # drop the leading "body"
    msg = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'body'}: {e.get('msg')}" for e in errs)
    return JSONResponse(APIError(400, msg or "invalid request", param=param).body(), status_code=400)


async def _http_error(request: Request, exc: StarletteHTTPException):
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return JSONResponse(APIError(exc.status_code, str(exc.detail), kind).body(), status_code=exc.status_code)


async def check_key(request: Request, authorization: str | None = Header(None)):
    api_key = request.app.state.api_key
    if api_key is None:
        return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
        raise APIError(
            401,
            "Incorrect or missing API key: send the header `Authorization: Bearer <key>`.",
            code="invalid_api_key",
        )


v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])
pages = APIRouter()


def model_card(state) -> dict:
    return {"id": state.model_id, "object": "model", "created": state.created, "owned_by": "kotune"}


@v1.get("/models")
async def models(request: Request):
    return {"object": "list", "data": [model_card(request.app.state)]}


@v1.get("/models/{name}")
async def model(request: Request, name: str):
    if name != request.app.state.model_id:
        raise APIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")
    return model_card(request.app.state)


@v1.get("/statutes/{law}/{article}")
async def statute(request: Request, law: str, article: str):
    grounding = request.app.state.bot.grounding
    record = grounding.lookup(law, article) if grounding is not None else None
    if record is None:
        num, _, branch = article.partition("의")
        cite = f"{law} 제{num}조" + (f"의{branch}" if branch else "")
        where = "the statute knowledge base" if grounding is not None else "this run (it has no knowledge base)"
        raise APIError(404, f"{cite} is not in {where}.", "not_found_error")
    return record


def job_for(req: ChatRequest, bot, model_id: str, limits: Limits) -> Job:
    """The job a request asks for, or the APIError that says what is wrong with it."""
    if req.model != model_id:
        raise APIError(
            404,
            f"The model `{req.model}` does not exist; this server serves `{model_id}` (GET /v1/models).",
            param="model",
            code="model_not_found",
        )
    given = req.model_extra or {}
    for name in UNSUPPORTED:
        if given.get(name) not in (None, [], {}):
            raise APIError(400, f"`{name}` is not supported by this server.", param=name, code="unsupported_parameter")
    if req.n != 1:
        raise APIError(400, "Only n=1 is supported.", param="n", code="unsupported_parameter")
    if len(req.messages) > limits.max_messages:
        raise APIError(
            400, f"{len(req.messages)} messages; at most {limits.max_messages} are accepted.", param="messages"
        )
    for i, m in enumerate(req.messages):
        if len(m.text()) > limits.max_message_chars:
            raise APIError(
                400,
                f"messages[{i}] has {len(m.text())} characters; the limit is {limits.max_message_chars}.",
                param=f"messages[{i}].content",
                code="message_too_long",
            )
    last = req.messages[-1]
    if last.role != "user" or not last.text().strip():
        raise APIError(
            400,
            "The last message must be a non-empty `user` message: it is the question answered.",
            param="messages",
        )
    try:
        bot.check_question(last.text())
    except ValueError as e:
        raise APIError(
            400, str(e), param=f"messages[{len(req.messages) - 1}].content", code="invalid_question"
        ) from None
    max_tokens = req.max_completion_tokens or req.max_tokens
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise APIError(
            400,
            f"max_tokens={max_tokens} is over this server's limit of {limits.max_tokens}.",
            param="max_tokens",
            code="max_tokens_too_large",
        )
    overrides = {}
    history = conversation(req.messages[:-1])
    if req.temperature is not None:
        overrides = {"greedy": True} if req.temperature == 0 else {"greedy": False, "temperature": req.temperature}
    if req.top_p is not None:
        overrides["top_p"] = req.top_p
    return Job(last.text().strip(), max_tokens, overrides, history=history)


def conversation(messages) -> list[tuple[str, str]]:
    """(question, answer) pairs of the earlier turns: each user message with the assistant message after it.
    System and tool messages, and a user message left unanswered, are not part of it."""
    pairs, pending = [], None
    for m in messages:
        if m.role == "user":
            pending = m.text().strip() or None
        elif m.role == "assistant" and pending is not None:
            pairs.append((pending, m.text().strip()))
            pending = None
    return pairs


def _submit(worker: Worker, job: Job):
    try:
        return worker.submit(job)
    except QueueFull as e:
        raise APIError(429, str(e), "rate_limit_error", code="queue_full") from None


def usage(answer, prompt_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": answer.new_tokens,
        "total_tokens": prompt_tokens + answer.new_tokens,
    }


@v1.post("/chat/completions")
async def chat_completions(request: Request, req: ChatRequest):
    state = request.app.state
    job = job_for(req, state.bot, state.model_id, state.limits)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.model_id}
    if not req.stream:
        fut = _submit(state.worker, job)
        try:
            answer, prompt_tokens = await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            job.cancel.set()
            raise
        except TimedOut:
            raise APIError(504, timeout_message(state.limits), "server_error", code="timeout") from None
        return {
            **head,
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": answer.text},
                    "finish_reason": "stop" if answer.stopped else "length",
                    "logprobs": None,
                }
            ],
            "usage": usage(answer, prompt_tokens),
            **citation_extras(answer),
        }
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue = asyncio.Queue()

    def hand_over(item) -> None:  # from the worker thread
        try:
            loop.call_soon_threadsafe(pieces.put_nowait, item)
        except RuntimeError:  # the loop is gone (shutdown): nobody is listening
            job.cancel.set()

    job.on_text = hand_over
    fut = _submit(state.worker, job)  # a full queue is refused here, before any byte of the stream
    fut.add_done_callback(lambda _: hand_over(None))
    include_usage = bool((req.stream_options or {}).get("include_usage"))
    return StreamingResponse(
        _events(job, fut, pieces, head, include_usage, state.limits),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _chunk(head: dict, delta: dict, finish_reason=None, **extra) -> dict:
    return {
        **head,
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
        **extra,
    }


def timeout_message(limits: Limits) -> str:
    return (
        f"the request took longer than this server's limit of {limits.request_timeout_s:g} s "
        "(waiting and generating); retry, or ask for fewer tokens"
    )


async def _events(job: Job, fut, pieces: asyncio.Queue, head: dict, include_usage: bool, limits: Limits):
    """The SSE stream of one answer: its pieces as they come (`None` ends them), then the checked answer."""
    try:
        yield _sse(_chunk(head, {"role": "assistant", "content": ""}))
        while True:
            try:
                piece = await asyncio.wait_for(pieces.get(), KEEPALIVE_S)
            except asyncio.TimeoutError:
                yield ": waiting in queue\n\n"
                continue
            if piece is None:
                break
            yield _sse(_chunk(head, {"content": piece}))
        if fut.cancelled() or fut.exception() is not None:
            err = None if fut.cancelled() else fut.exception()
            if isinstance(err, TimedOut):
                yield _sse(APIError(504, timeout_message(limits), "server_error", code="timeout").body())
            else:
                reason = "the server is shutting down" if err is None else f"generation failed: {err}"
                yield _sse(APIError(500, reason, "server_error").body())
        else:
            answer, prompt_tokens = fut.result()
            # the streamed text is the raw generation; `checked_content` is it after the citation policy
            finish = "stop" if answer.stopped else "length"
            yield _sse(_chunk(head, {}, finish, checked_content=answer.text, **citation_extras(answer)))
            if include_usage:
                yield _sse(
                    {**head, "object": "chat.completion.chunk", "choices": [], "usage": usage(answer, prompt_tokens)}
                )
        yield "data: [DONE]\n\n"
    finally:  # also runs when the client went away: stop its generation, or drop it from the queue
        job.cancel.set()
        fut.cancel()


@pages.get("/health")
async def health(request: Request):
    state = request.app.state
    s = state.worker.stats
    return {
        "status": "ok",
        "model": state.model_id,
        "grounded": state.bot.grounded,
        "auth": state.api_key is not None,
        "notice": state.bot.gen.notice,
        "pending": state.worker.pending,
        "active": state.worker.active,
        "max_batch": state.worker.max_batch,
        "served": s.served,
        "cancelled": s.cancelled,
        "failed": s.failed,
        "timed_out": s.timed_out,
        "admit_s": round(s.admit_s, 3),
        "decode_s": round(s.decode_s, 3),
        "steps": s.steps,
        "step_rows": s.step_rows,
    }


@pages.get("/", include_in_schema=False)
async def page():
    return FileResponse(STATIC / "index.html")


def run_server(
    app: FastAPI, host: str = "127.0.0.1", port: int = 8000, graceful_s: int = 30, log_level: str = "info"
) -> None:
    """Serve until SIGINT/SIGTERM; then stop accepting, let running answers finish (up to `graceful_s`), exit."""
    import uvicorn

    uvicorn.Server(
        uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=graceful_s, log_level=log_level)
    ).run()


@contextmanager
def running_server(app: FastAPI, host: str = "127.0.0.1", port: int = 0, startup_s: float = 30.0):
    """Serve `app` from a background thread (tests, benchmarks); yields the base URL, stops gracefully on exit."""
    import socket
    import threading

    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=10))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="kotune-serve")
    thread.start()
    deadline = time.monotonic() + startup_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    url_host = f"[{host}]" if ":" in host else host
    try:
        yield f"http://{url_host}:{sock.getsockname()[1]}", server
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
