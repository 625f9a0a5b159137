"""The chat page on a real server (issue 26): `app.py` on 2 ranks of a random-weight model with
SmolLM2's tokenizer and chat template, behind a login and an API key, walked in headless Chromium.
The answers are noise; what is checked is the page around them. One server for the module (~30 s
to start on 2 cores)."""
from __future__ import annotations

import json

import httpx
import pytest

from families import family_checkpoint
from test_server import Server
from test_ui_browser import CHROMIUM, CHROMIUM_ARGS, wait_ready
from test_ui_chat import MESSAGES_JS, ask, messages, screenshot, wait_notes

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install -y chromium)")
LOGIN, KEY = ("ann", "llama-pass"), "sk-ui-test"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("ui-server")
    folder = family_checkpoint(base, "default", n_shards=2)
    # the model's own sampling defaults, which the page must show as such
    (folder / "generation_config.json").write_text(json.dumps({"temperature": 0.7, "top_p": 0.8}))
    (base / "login").write_text(":".join(LOGIN))
    (base / "key").write_text(KEY)
    s = Server(folder, 2, "--chat", "--max_seq_len", "512", "--max_new_tokens", "12", "--auth", f"@{base / 'login'}",
               "--api_key", f"@{base / 'key'}")
    try:
        s.wait_healthy(180)
        yield s
    finally:
        s.stop()


def test_the_page_on_two_ranks_behind_a_login(server):
    sync_api = pytest.importorskip("playwright.sync_api")
    # item 8: nothing of the model without the credentials
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    assert httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert httpx.get(f"{server.url}/config").status_code == 401
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            context = browser.new_context(viewport={"width": 1200, "height": 900})
            context.set_default_timeout(30_000)
            page = context.new_page()
            page.goto(f"{server.url}/")
            page.wait_for_selector("input[type=password]")
            page.locator("input").first.fill(LOGIN[0])
            page.fill("input[type=password]", LOGIN[1])
            page.keyboard.press("Enter")
            wait_ready(page)
            # item 6: the header names the model, its context and the ranks serving it
            header = page.inner_text("#title")
            assert "smollm2" in header and "512 tokens of context" in header and "served by 2 ranks" in header
            # item 4: the model's defaults (its generation_config.json), shown as such
            page.get_by_text("Settings (kept in this browser)").click()
            assert "temperature 0.7 · top-p 0.8 · max new tokens 12" in page.inner_text("#model-defaults")
            assert page.input_value("#temperature input[type=number]") == "0.7"
            ask(page, "Hello there")
            note = messages(page, "note")[0]
            assert "12 tokens in" in note and "tokens/s" in note and note.endswith("length")
            # item 2: regenerate, edit, undo on the real engine
            page.evaluate("() => { document.querySelector('#stats').dataset.before = "
                          "document.querySelector('#stats')?.innerText; }")
            page.click('#chatbot button[aria-label="Retry"]')
            page.wait_for_function("() => { const s = document.querySelector('#stats');"
                                   " return s.innerText !== s.dataset.before && s.innerText.endsWith('length'); }")
            wait_notes(page, 1)
            assert messages(page, "user") == ["Hello there"]
            ask(page, "And then?")
            page.locator('#chatbot button[aria-label="Edit"]').first.click()
            page.fill("#chatbot textarea", "Hello again")
            page.click('#chatbot button[aria-label="Submit"]')
            page.wait_for_function("() => document.body.innerText.includes('were dropped')")
            page.wait_for_function(f"() => ({MESSAGES_JS})('user').join() === 'Hello again'")
            wait_notes(page, 1)
            # item 5: a second message while the first is answered waits in the queue, then is answered
            page.fill("#message textarea", "one")
            page.press("#message textarea", "Enter")
            # as a person would, typed once the box shows "one" has gone (Gradio takes a message
            # some event-loop turns after Enter: one typed within them is the message sent)
            page.wait_for_function("() => document.querySelector('#message textarea').value === ''")
            page.fill("#message textarea", "two")
            page.press("#message textarea", "Enter")
            wait_notes(page, 3)
            assert messages(page, "user") == ["Hello again", "one", "two"]
            # reused prompt tokens: the second turn's prompt starts with the first's
            assert "prompt tokens reused" in messages(page, "note")[2]
            screenshot(page, "chat-two-ranks.png")
            # item 1: the conversation is there after a reload; undo removes its last turn
            page.reload()
            page.wait_for_function(f"() => ({MESSAGES_JS})('user').length === 3")
            page.click('#chatbot button[aria-label="Undo"]')
            page.wait_for_function(f"() => ({MESSAGES_JS})('user').length === 2")
            assert page.input_value("#message textarea") == "two"
            # item 7: a phone's width
            page.set_viewport_size({"width": 375, "height": 740})
            page.reload()
            wait_ready(page)
            page.wait_for_function("() => !document.querySelector('#sidebar.open')")
            assert page.evaluate("() => document.documentElement.scrollWidth") <= 375
        finally:
            browser.close()
