"""`kotune serve`: the OpenAI-compatible API, streaming, errors, auth, queueing, shutdown, and the load bench."""

from __future__ import annotations

import importlib.util
import json
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

import httpx  # noqa: E402
from conftest import ROOT  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from serving import CITING_QUESTION, citing_text  # noqa: E402

QUESTIONS = [
    "전세권이란 무엇인가요?",
    "대항력은 언제 생기나요?",
    "확정일자는 왜 받나요?",
    "계약금을 포기하면 해제할 수 있나요?",
    "보증금을 안 돌려주면 어떻게 하나요?",
    "월세를 올릴 수 있나요?",
]


@pytest.fixture(scope="module")
def bot(tiny_run):
    from kotune.infer.generate import Chatbot

    return Chatbot.from_run(tiny_run, greedy=True, max_new_tokens=24)


def make_app(bot, **kw):
    from kotune.serve import create_app

    return create_app(bot, **kw)


def body(question="전세권이란 무엇인가요?", **kw):
    return {"model": "kotune", "messages": [{"role": "user", "content": question}], **kw}


def sse_events(lines) -> list:
    """`data:` payloads of a server-sent-event stream, parsed; `[DONE]` is kept as a string."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def streamed(client, payload) -> list:
    with client.stream("POST", "/v1/chat/completions", json=payload) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        return sse_events(r.iter_lines())


def test_models_health_and_page_need_nothing_from_outside(tiny_run):
    from kotune.serve import create_app

    with TestClient(create_app(tiny_run, greedy=True)) as c:
        models = c.get("/v1/models").json()
        assert models["object"] == "list" and [m["id"] for m in models["data"]] == [tiny_run.name]
        assert c.get(f"/v1/models/{tiny_run.name}").json()["object"] == "model"
        health = c.get("/health").json()
        assert health["status"] == "ok" and health["model"] == tiny_run.name and health["pending"] == 0
        page = c.get("/")
        assert page.status_code == 200 and "법률 상담" in page.text
        for asset in ("/static/app.js", "/static/style.css"):
            assert c.get(asset).status_code == 200
    static = ROOT / "src" / "kotune" / "serve" / "static"
    for f in static.iterdir():  # works offline: no CDN, fonts or scripts from elsewhere
        text = f.read_text(encoding="utf-8")
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, f.name


def test_completion_schema_and_stream_carry_the_same_answer(bot):
    with TestClient(make_app(bot)) as c:
        r = c.post("/v1/chat/completions", json=body(max_tokens=20))
        assert r.status_code == 200
        full = r.json()
        assert full["object"] == "chat.completion" and full["model"] == "kotune" and full["id"].startswith("chatcmpl-")
        choice = full["choices"][0]
        assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
        assert choice["finish_reason"] in ("stop", "length")
        u = full["usage"]
        assert u["completion_tokens"] <= 20 and u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] > 0
        assert {"citations", "flagged_citations", "retrieved"} <= set(full)

        events = streamed(c, body(max_tokens=20, stream=True, stream_options={"include_usage": True}))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(ch["object"] == "chat.completion.chunk" and ch["id"] == chunks[0]["id"] for ch in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    deltas = [ch["choices"][0]["delta"].get("content", "") for ch in chunks if ch["choices"]]
    pieces = [d for d in deltas if d]
    assert len(pieces) > 1  # streamed in several pieces, not once at the end
    # a piece never ends inside a character: only the last may end in U+FFFD (bytes the model never completed)
    assert not any(p.endswith("\ufffd") for p in pieces[:-1])
    assert "".join(pieces).strip() == choice["message"]["content"]
    final = [ch for ch in chunks if ch["choices"] and ch["choices"][0]["finish_reason"]]
    assert len(final) == 1 and final[0]["choices"][0]["finish_reason"] == choice["finish_reason"]
    assert final[0]["checked_content"] == choice["message"]["content"] and "citations" in final[0]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == full["usage"]


@pytest.mark.parametrize(
    "payload, status, param, code",
    [
        (body() | {"model": "gpt-4o"}, 404, "model", "model_not_found"),
        (body(max_tokens=100_000), 400, "max_tokens", "max_tokens_too_large"),
        (body(max_tokens=0), 400, "max_tokens", None),
        (body("가" * 5000), 400, "messages[0].content", "message_too_long"),
        (body("가" * 3000), 400, "messages[0].content", "invalid_question"),  # over generation.max_question_chars
        (body() | {"messages": []}, 400, "messages", None),
        (
            body() | {"messages": [{"role": "user", "content": "질문"}, {"role": "assistant", "content": "답"}]},
            400,
            "messages",
            None,
        ),
        (body() | {"messages": [{"role": "wizard", "content": "질문"}]}, 400, "messages.0.role", None),
        (body(n=2), 400, "n", "unsupported_parameter"),
        (body(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools", "unsupported_parameter"),
        (body(temperature=5), 400, "temperature", None),
        ({"messages": [{"role": "user", "content": "질문"}]}, 400, "model", None),
    ],
)
def test_bad_requests_get_openai_style_errors(bot, payload, status, param, code):
    with TestClient(make_app(bot, limits=_limits(max_tokens=256))) as c:
        r = c.post("/v1/chat/completions", json=payload)
    assert r.status_code == status
    err = r.json()["error"]
    assert err["message"] and err["type"] and err["param"] == param and err["code"] == code


def _limits(**kw):
    from kotune.serve import Limits

    return Limits(**kw)


def test_malformed_json_and_unknown_routes_answer_in_the_same_shape(bot):
    with TestClient(make_app(bot)) as c:
        r = c.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        r = c.get("/v1/nothing-here")
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_api_key_guards_every_v1_route_and_only_those(bot):
    with TestClient(make_app(bot, api_key="s3cret")) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            for method, path in (
                ("get", "/v1/models"),
                ("post", "/v1/chat/completions"),
                ("get", "/v1/statutes/민법/303"),
            ):
                r = getattr(c, method)(path, headers=headers, **({"json": body()} if method == "post" else {}))
                assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, headers)
        ok = {"Authorization": "Bearer s3cret"}
        assert c.get("/v1/models", headers=ok).status_code == 200
        assert c.post("/v1/chat/completions", json=body(max_tokens=4), headers=ok).status_code == 200
        assert c.get("/health").json()["auth"] is True and c.get("/").status_code == 200


def test_grounded_answer_carries_structured_citations(citing_bot):
    with TestClient(make_app(citing_bot)) as c:
        full = c.post("/v1/chat/completions", json=body(CITING_QUESTION)).json()
        events = streamed(c, body(CITING_QUESTION, stream=True))
        art = c.get("/v1/statutes/민법/303").json()
        missing = c.get("/v1/statutes/민법/9999")
    assert full["choices"][0]["message"]["content"] == citing_text(citing_bot) and full["abstained"] is False
    assert full["rule"] is None or full["choices"][0]["message"]["content"].startswith(full["rule"])
    [cite] = full["citations"]
    assert (cite["law"], cite["article"], cite["cite"]) == ("민법", "303", "민법 제303조")
    assert cite["title"] == art["title"] and cite["summary"] == art["summary"] and len(cite["summary"]) > 20
    assert full["flagged_citations"] == [] and "민법 제303조" in [r["cite"] for r in full["retrieved"]]
    final = [e for e in events[:-1] if e["choices"] and e["choices"][0]["finish_reason"]][0]
    assert final["citations"] == full["citations"]
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"


def test_citation_fields_are_the_groundings_check():
    from kotune.config.sections import RetrievalSection
    from kotune.infer.generate import Answer
    from kotune.legal.grounding import StatuteGrounding
    from kotune.legal.statutes import load_kb
    from kotune.serve.app import citation_extras

    kb = load_kb()
    checker = StatuteGrounding(kb, RetrievalSection(citation_policy="mark"))  # an ungrounded run that checks
    text, cited, flagged = checker.check("설명입니다. (근거: 민법 제303조, 민법 제999조)", [])
    extras = citation_extras(Answer("q", text, 10, True, 0.1, citations=cited, flagged=flagged))
    assert [c["cite"] for c in extras["citations"]] == ["민법 제303조"]
    assert extras["citations"][0]["title"] == kb[("민법", "303")].title
    assert extras["flagged_citations"] == ["민법 제999조"] and extras["retrieved"] == []
    assert checker.lookup("민법", "303")["title"] == kb[("민법", "303")].title and checker.lookup("민법", "999") is None


@pytest.fixture(scope="module")
def live(bot):
    """The app on a real socket (uvicorn in a thread), for clients that need one."""
    from kotune.serve import running_server

    with running_server(make_app(bot, api_key="k")) as (url, _):
        yield url


def test_official_openai_client_works(live):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{live}/v1", api_key="k", max_retries=0)
    assert [m.id for m in client.models.list()] == ["kotune"]
    r = client.chat.completions.create(
        model="kotune", messages=[{"role": "user", "content": QUESTIONS[0]}], max_tokens=16
    )
    assert r.choices[0].message.content and r.usage.completion_tokens <= 16
    assert r.model_extra["citations"] == [] and "retrieved" in r.model_extra
    stream = client.chat.completions.create(
        model="kotune", messages=[{"role": "user", "content": QUESTIONS[0]}], max_tokens=16, stream=True
    )
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text.strip() == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "질문"}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{live}/v1", api_key="wrong", max_retries=0).models.list()


def _stream_text(url, question, max_tokens=16, out=None) -> str:
    with httpx.stream(
        "POST",
        f"{url}/v1/chat/completions",
        json=body(question, max_tokens=max_tokens, stream=True),
        headers={"Authorization": "Bearer k"},
        timeout=120,
    ) as r:
        r.raise_for_status()
        events = sse_events(r.iter_lines())
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"])
    if out is not None:
        out[question] = text.strip()
    return text.strip()


def test_concurrent_streams_are_queued_and_never_mix(live, bot):
    expected = {q: bot.answer(q, max_new_tokens=16).text for q in QUESTIONS}
    assert len(set(expected.values())) > 1  # otherwise mixing could not show
    got: dict = {}
    threads = [threading.Thread(target=_stream_text, args=(live, q, 16, got)) for q in QUESTIONS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == expected


@pytest.fixture(scope="module")
def long_question(bot) -> str:
    """A question the tiny model answers past 100 tokens, so its generation is still running when we act."""
    for q in QUESTIONS:
        if not bot.answer(q, max_new_tokens=100).stopped:
            return q
    pytest.fail("every question ends early on the tiny model")


def test_a_client_that_leaves_stops_its_generation(live, long_question):
    before = httpx.get(f"{live}/health").json()["cancelled"]
    with httpx.stream(
        "POST",
        f"{live}/v1/chat/completions",
        json=body(long_question, max_tokens=900, stream=True),
        headers={"Authorization": "Bearer k"},
        timeout=60,
    ) as r:
        lines = r.iter_lines()
        next(line for line in lines if '"content": ""' not in line and line.startswith("data: "))  # first real piece
    deadline = time.monotonic() + 20
    while httpx.get(f"{live}/health").json()["cancelled"] == before:
        assert time.monotonic() < deadline, "the abandoned generation was not stopped"
        time.sleep(0.1)
    assert httpx.get(f"{live}/health").json()["pending"] == 0


def test_full_queue_is_refused_with_429(bot, long_question):
    from kotune.serve import running_server

    app = make_app(bot, limits=_limits(max_queue=1))
    with running_server(app) as (url, _):
        with httpx.stream(
            "POST", f"{url}/v1/chat/completions", json=body(long_question, max_tokens=900, stream=True), timeout=60
        ) as r:
            lines = r.iter_lines()  # kept: a dropped iterator closes the connection, which cancels the request
            next(lines)  # accepted: the stream has begun
            second = httpx.post(f"{url}/v1/chat/completions", json=body(max_tokens=4), timeout=60)
            assert app.state.worker.pending == 1  # the first is still generating
        assert second.status_code == 429 and second.json()["error"]["code"] == "queue_full"


def test_shutdown_lets_the_running_answer_finish(bot, long_question):
    from kotune.serve import running_server

    events: list = []
    with running_server(make_app(bot)) as (url, server):

        def client():
            with httpx.stream(
                "POST", f"{url}/v1/chat/completions", json=body(long_question, max_tokens=200, stream=True), timeout=60
            ) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])

        t = threading.Thread(target=client)
        t.start()
        deadline = time.monotonic() + 30
        while len(events) < 2:  # generation under way
            assert time.monotonic() < deadline
            time.sleep(0.01)
        server.should_exit = True
        t.join(60)
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] in ("stop", "length")
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health", timeout=5)


def test_serve_command_names_the_extra_when_fastapi_is_missing(tiny_run, monkeypatch):
    import sys

    from typer.testing import CliRunner

    from kotune.cli import app

    for name in [m for m in sys.modules if m == "kotune.serve" or m.startswith("kotune.serve.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "fastapi", None)
    r = CliRunner().invoke(app, ["serve", str(tiny_run)])
    assert r.exit_code == 2 and "kotune[serve]" in r.output and "Traceback" not in r.output


def test_load_bench_runs_without_errors(tiny_run, tmp_path):
    spec = importlib.util.spec_from_file_location("load_server", ROOT / "bench" / "load_server.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "load.json"
    report = bench.main(
        ["--run", str(tiny_run), "--clients", "4", "--duration", "3", "--max-tokens", "8", "--output", str(out)]
    )
    assert report["errors"] == 0 and report["requests"] >= 4
    assert report["ttft_s"]["p50"] <= report["latency_s"]["p50"] and report["tokens_per_s"] > 0
    assert json.loads(out.read_text(encoding="utf-8"))["requests"] == report["requests"]
    split = report["generation_thread"]  # from the server's /health counters
    assert 0 < split["admit_share"] < 1 and split["step_ms"] > 0 and 1 <= split["rows_per_step"] <= 4


def test_requests_share_the_running_batch_and_each_answers_as_alone(bot):
    from kotune.serve.worker import Job, Worker

    expected = [bot.answer(q, max_new_tokens=16).text for q in QUESTIONS]
    worker = Worker(bot, max_batch=4)
    widest = []
    jobs = [Job(q, 16, on_text=lambda _: widest.append(worker.active)) for q in QUESTIONS]
    try:
        futures = [worker.submit(j) for j in jobs]
        got = [f.result(120)[0].text for f in futures]
    finally:
        worker.close()
    assert got == expected
    stats = worker.stats  # the generation thread's time, as /health reports it
    assert stats.admit_s > 0 and stats.decode_s > 0 and stats.steps <= stats.step_rows <= 4 * stats.steps
    assert max(widest) == 4, "at most max_batch requests decode at once, and they did share the batch"
    assert worker.stats.served == len(QUESTIONS) and worker.pending == 0


def test_a_client_that_goes_away_frees_its_slot(bot):
    from kotune.serve.worker import Cancelled, Job, Worker

    worker = Worker(bot, max_batch=2)
    leaving = Job(QUESTIONS[0], 24)
    leaving.on_text = lambda _: leaving.cancel.set()  # gone after its first piece of text
    staying = [Job(q, 16) for q in QUESTIONS[1:4]]
    try:
        futures = [worker.submit(j) for j in [leaving, *staying]]
        with pytest.raises(Cancelled):
            futures[0].result(120)
        assert all(f.result(120)[0].new_tokens > 0 for f in futures[1:])  # the slot went to the next request
    finally:
        worker.close()
    assert (worker.stats.cancelled, worker.stats.served, worker.active) == (1, 3, 0)


def test_a_request_past_the_timeout_gets_504(bot):
    from kotune.serve import Limits

    client = TestClient(make_app(bot, limits=Limits(request_timeout_s=0.001)))
    r = client.post("/v1/chat/completions", json=body(max_tokens=16))
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    assert "0.001 s" in r.json()["error"]["message"]
    assert client.get("/health").json()["timed_out"] == 1


def test_earlier_turns_are_the_conversation_the_question_is_read_in(bot):
    from kotune.serve.app import conversation
    from kotune.serve.schemas import Message

    msgs = [
        Message(role="system", content="법률 상담"),
        Message(role="user", content="전세 계약이 끝났는데 보증금을 안 줘요"),
        Message(role="assistant", content="임차권등기명령을 신청할 수 있습니다."),
        Message(role="user", content="답이 없던 질문"),
        Message(role="user", content="그럼 월세는요?"),
    ]
    history = conversation(msgs[:-1])
    assert history == [("전세 계약이 끝났는데 보증금을 안 줘요", "임차권등기명령을 신청할 수 있습니다.")]
    with_history = bot.tok.decode(bot.prompt_ids("그럼 월세는요?", [], history))
    alone = bot.tok.decode(bot.prompt_ids("그럼 월세는요?"))
    assert "보증금을 안 줘요" in with_history and "임차권등기명령" in with_history and with_history.endswith(alone)
    assert "보증금" not in alone
    # a budget of 0 tokens answers every message alone
    from kotune.config import apply_overrides

    bot_gen = bot.gen
    try:
        bot.gen = apply_overrides(bot_gen, "generation", {"history_tokens": 0})
        assert bot.prompt_ids("그럼 월세는요?", [], history) == bot.prompt_ids("그럼 월세는요?")
    finally:
        bot.gen = bot_gen
