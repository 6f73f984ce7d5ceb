"""The chat page at `/`, driven in Debian's Chromium through Playwright: ask, watch the answer stream, open a
citation."""

from __future__ import annotations

import os
import re
import shutil

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api")

from serving import CITING_QUESTION, citing_text  # noqa: E402

CHROMIUM = os.environ.get("KOTUNE_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture(scope="module")
def browser():
    if not (os.access(CHROMIUM, os.X_OK) or shutil.which(CHROMIUM)):
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium; .ci/run installs it)")
    with sync_api.sync_playwright() as p:
        # Debian's browser, never one downloaded by Playwright; no sandbox: CI runs as root in a container
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def site(citing_bot):
    from kotune.serve import create_app, running_server

    with running_server(create_app(citing_bot, model_id="civil-law-tiny")) as (url, _):
        yield url


def test_page_streams_an_answer_and_opens_its_citation(browser, site, citing_bot):
    page = browser.new_page(viewport={"width": 1100, "height": 760})
    external = []
    page.on("request", lambda r: None if r.url.startswith(site) else external.append(r.url))
    page.goto(site)
    sync_api.expect(page.locator("#notice")).to_contain_text("법률 자문이 아닙니다")
    sync_api.expect(page.locator("#model")).to_contain_text("civil-law-tiny")
    # record every text the answer bubble shows, to see it grow piece by piece
    page.evaluate("""() => {
        window.seen = [];
        new MutationObserver(() => {
            const b = document.querySelector('.msg.assistant .bubble');
            if (b) window.seen.push(b.textContent);
        }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
    }""")
    page.fill("#question", CITING_QUESTION)
    page.press("#question", "Enter")
    answer = page.locator(".msg.assistant").first
    sync_api.expect(answer).to_have_attribute("data-done", "stop", timeout=60_000)
    expected = citing_text(citing_bot)
    assert answer.locator(".bubble").inner_text() == expected
    partial = [t for t in page.evaluate("window.seen") if t and expected.startswith(t) and t != expected]
    assert len(set(partial)) >= 2, "the answer appeared at once, not streamed"

    chip = answer.locator(".chip.cited")
    sync_api.expect(chip).to_have_count(1)
    assert "민법 제303조" in chip.inner_text()
    chip.click()
    detail = answer.locator(".detail")
    sync_api.expect(detail).to_be_visible()
    from kotune.legal.statutes import load_kb

    art = load_kb()[("민법", "303")]
    assert art.title in detail.inner_text() and art.paragraphs[0][:20] in detail.inner_text()
    assert answer.locator(".chip.retrieved").count() >= 1  # the other article put in the prompt

    # the conversation stays on the page and is sent with the next question
    page.fill("#question", "전세권에 대해 다시 알려주세요")
    page.click("#send")
    sync_api.expect(page.locator(".msg.assistant").nth(1)).to_have_attribute(
        "data-done", re.compile("stop|length"), timeout=60_000
    )
    assert page.locator(".msg.user").count() == 2 and page.locator(".msg.assistant").count() == 2
    assert external == []  # nothing fetched from outside the server
    page.close()


def test_page_shows_server_errors_in_korean(browser, site):
    page = browser.new_page()
    page.goto(site)
    page.fill("#question", "가" * 10)
    page.evaluate("document.getElementById('question').value = '가'.repeat(4500)")  # past maxlength, like a pasted text
    page.click("#send")
    err = page.locator(".bubble.error")
    sync_api.expect(err).to_contain_text("오류")
    sync_api.expect(err).to_contain_text("4000")
    page.close()
