"""Screenshot of the chat page answering a question (for docs/), in Debian's headless Chromium.

    .venv/bin/python bench/page_screenshot.py --run runs/civil_law --question "전세권이란 무엇인가요?" \\
        --out docs/serve-page.png

Starts the server for the run in this process (loopback), asks the question on the page, waits for the
streamed answer to finish, opens the first cited article (if any), and saves a PNG.
"""

from __future__ import annotations

import argparse
import re


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--question", default="전세권이란 무엇인가요?")
    ap.add_argument("--out", default="docs/serve-page.png")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--greedy", action="store_true", help="Deterministic decoding for the screenshot.")
    args = ap.parse_args(argv)

    from playwright.sync_api import expect, sync_playwright

    from kotune.serve import create_app, running_server

    app = create_app(args.run, greedy=True if args.greedy else None)
    with running_server(app) as (url, _), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 700})
        page.goto(url)
        page.fill("#question", args.question)
        page.press("#question", "Enter")
        answer = page.locator(".msg.assistant").first
        expect(answer).to_have_attribute("data-done", re.compile("stop|length"), timeout=600_000)
        chips = answer.locator(".chip.cited, .chip.retrieved")
        if chips.count():
            chips.first.click()
        page.screenshot(path=args.out)
        browser.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
