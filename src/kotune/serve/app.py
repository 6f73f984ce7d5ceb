"""The FastAPI app: OpenAI-compatible chat completions, models, health, statutes, and the chat page.

Requests are queued and answered one at a time by `Worker` (see worker.py).
Only the last user message is answered (and used for retrieval): the models
are trained on single question → answer pairs, so earlier turns are accepted
for compatibility and ignored.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Header
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from .schemas import UNSUPPORTED, APIError, ChatRequest, Limits
from .worker import Job, QueueFull, Worker

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
    """`bot_or_run`: a `Chatbot`, or a run folder to load one from (with `generation_overrides`)."""
    from ..infer.generate import Chatbot

    if isinstance(bot_or_run, Chatbot):
        bot = bot_or_run
    else:
        bot = Chatbot.from_run(bot_or_run, **generation_overrides)
        model_id = model_id or Path(bot_or_run).resolve().name
    model_id = model_id or "kotune"
    limits = limits or Limits()
    worker = Worker(bot, max_queue=limits.max_queue)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(worker.close)  # uvicorn has already let in-flight responses finish

    app = FastAPI(title="kotune", version="1", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.worker, app.state.bot, app.state.model_id = worker, bot, model_id

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None  # drop the leading "body"
        msg = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'body'}: {e.get('msg')}" for e in errs)
        return JSONResponse(APIError(400, msg or "invalid request", param=param).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(exc.status_code, str(exc.detail), kind).body(), status_code=exc.status_code)

    async def check_key(authorization: str | None = Header(None)):
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

    def model_card() -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "kotune"}

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @v1.get("/models/{name}")
    async def model(name: str):
        if name != model_id:
            raise APIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")
        return model_card()

    @v1.get("/statutes/{law}/{article}")
    async def statute(law: str, article: str):
        record = bot.grounding.lookup(law, article) if bot.grounding is not None else None
        if record is None:
            num, _, branch = article.partition("의")
            cite = f"{law} 제{num}조" + (f"의{branch}" if branch else "")
            where = "the statute knowledge base" if bot.grounding is not None else "this run (it has no knowledge base)"
            raise APIError(404, f"{cite} is not in {where}.", "not_found_error")
        return record

    def job_for(req: ChatRequest) -> Job:
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
                raise APIError(
                    400, f"`{name}` is not supported by this server.", param=name, code="unsupported_parameter"
                )
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
        if req.temperature is not None:
            overrides = {"greedy": True} if req.temperature == 0 else {"greedy": False, "temperature": req.temperature}
        if req.top_p is not None:
            overrides["top_p"] = req.top_p
        return Job(last.text().strip(), max_tokens, overrides)

    def submit(job: Job):
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
    async def chat_completions(req: ChatRequest):
        job = job_for(req)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_id}
        if not req.stream:
            fut = submit(job)
            try:
                answer, prompt_tokens = await asyncio.wrap_future(fut)
            except asyncio.CancelledError:
                job.cancel.set()
                raise
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
        fut = submit(job)  # a full queue is refused here, before any byte of the stream
        fut.add_done_callback(lambda _: hand_over(None))
        include_usage = bool((req.stream_options or {}).get("include_usage"))

        def chunk(delta: dict, finish_reason=None, **extra) -> dict:
            return {
                **head,
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
                **extra,
            }

        async def events():
            try:
                yield _sse(chunk({"role": "assistant", "content": ""}))
                while True:
                    try:
                        piece = await asyncio.wait_for(pieces.get(), KEEPALIVE_S)
                    except asyncio.TimeoutError:
                        yield ": waiting in queue\n\n"
                        continue
                    if piece is None:
                        break
                    yield _sse(chunk({"content": piece}))
                if fut.cancelled() or fut.exception() is not None:
                    reason = (
                        "the server is shutting down" if fut.cancelled() else f"generation failed: {fut.exception()}"
                    )
                    yield _sse(APIError(500, reason, "server_error").body())
                else:
                    answer, prompt_tokens = fut.result()
                    # the streamed text is the raw generation; `checked_content` is it after the citation policy
                    yield _sse(
                        chunk(
                            {},
                            "stop" if answer.stopped else "length",
                            checked_content=answer.text,
                            **citation_extras(answer),
                        )
                    )
                    if include_usage:
                        yield _sse(
                            {
                                **head,
                                "object": "chat.completion.chunk",
                                "choices": [],
                                "usage": usage(answer, prompt_tokens),
                            }
                        )
                yield "data: [DONE]\n\n"
            finally:  # also runs when the client went away: stop its generation, or drop it from the queue
                job.cancel.set()
                fut.cancel()

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    app.include_router(v1)

    @app.get("/health")
    async def health():
        s = worker.stats
        return {
            "status": "ok",
            "model": model_id,
            "grounded": bot.grounded,
            "auth": api_key is not None,
            "notice": bot.gen.notice,
            "pending": worker.pending,
            "served": s.served,
            "cancelled": s.cancelled,
            "failed": s.failed,
        }

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


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
