"""The playground in headless Chromium (Debian's, via Playwright's Python package; nothing is
downloaded): send a message, see the streamed answer, click thumbs-up, find the row in the store."""

from __future__ import annotations

import os
import shutil

import pytest

from polling import wait_until
from test_serve_support import ThreadServer, make_app, serve_model_dir  # noqa: F401

CHROMIUM = os.environ.get("FMFORGE_CHROMIUM", "/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def test_playground_streams_and_records_thumbs_up(serve_model_dir, tmp_path):  # noqa: F811
    playwright = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM) and not shutil.which("chromium"):
        pytest.skip("Debian's chromium is not installed")
    app, store = make_app(serve_model_dir, str(tmp_path / "feedback.db"))
    with ThreadServer(app) as server, playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            page.wait_for_function(
                "document.getElementById('model-name').textContent !== 'loading model…'"
            )
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "16")
            page.fill("#input", "<b>hello</b> & return")
            page.click("#send")
            page.wait_for_selector(".msg.assistant .thumb-up", timeout=30_000)
            user = page.locator(".msg.user").first
            assert user.inner_text() == "<b>hello</b> & return"  # escaped, not markup
            assert page.locator(".msg.user b").count() == 0
            answer = page.locator(".msg.assistant .text").first.inner_text()
            page.click(".thumb-up")
            page.wait_for_selector(".thumb-up.chosen", timeout=10_000)
            page.screenshot(path=str(tmp_path / "playground.png"), full_page=True)
        finally:
            browser.close()
    wait_until(lambda: store.counts()["feedback"] >= 1, timeout=5)
    rows = store.list_feedback()
    assert [(r["kind"], r["value"]) for r in rows] == [("thumbs", "up")]
    generation = store.get_generation(rows[0]["generation_id"])
    assert generation["messages"][-1]["content"] == "<b>hello</b> & return"
    assert " ".join(generation["outputs"][0].split()) == " ".join(answer.split())
    assert (tmp_path / "playground.png").stat().st_size > 1000
    if os.environ.get("FMFORGE_SCREENSHOT"):  # keep a copy, e.g. for a report
        shutil.copy(tmp_path / "playground.png", os.environ["FMFORGE_SCREENSHOT"])
