"""The chat page in headless Chromium over a fake engine: send, stream, stats, Stop, New chat.

Needs Debian's chromium (`apt-get install -y chromium`); skipped where /usr/bin/chromium is absent.
Leaves a screenshot of the answered chat in test-output/chat.png."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest

from conftest import ROOT, make_tokenizer
from fakes import FakeClient, ServerThread, chat_format
from llama_demo.config import ServerConfig
from llama_demo.model.parallel import free_port
from llama_demo.text.tokenizer import load_tokenizer
from llama_demo.serve.app import build_app

CHROMIUM = Path("/usr/bin/chromium")
# Playwright's own browser download does not work here; these keep Debian's chromium offline and quiet
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
ANSWER = "Hello from the fake llama! Café, naïve."
WAIT_MS = 15_000

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install -y chromium)")


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    sync_api = pytest.importorskip("playwright.sync_api")
    folder = tmp_path_factory.mktemp("tok")
    make_tokenizer(folder)
    tok = load_tokenizer(folder)
    fake = FakeClient(tok, max_seq_len=2048, delay=0.02, script=ANSWER)  # room for a few turns
    app = build_app(fake, chat_format(tok), ServerConfig(), system_prompt="Be brief.")
    with ServerThread(app, free_port()) as server, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.set_default_timeout(WAIT_MS)
            page.goto(f"{server.url}/")
            wait_ready(page)
            page.fake = fake
            yield page
        finally:
            browser.close()


def wait_ready(page) -> None:
    """Until the page has shown the browser's stored conversation and settings (an edit made
    before would be overwritten by them)."""
    page.wait_for_function("() => document.body.dataset.ready === '1'")


def send(page, text: str) -> None:
    page.fill("#message textarea", text)
    page.click("#send")


# the answers, not the stats notes under them (Gradio draws a note, a message with a title, as a thought)
ANSWERS = "[...document.querySelectorAll('#chatbot [data-testid=\"bot\"]')].filter(m => !m.parentElement.classList.contains('thought'))"


def bot_texts(page) -> list[str]:
    return page.evaluate(f"() => {ANSWERS}.map(m => m.innerText.trim())")


def settled_answer(page, index: int, quiet_ms: int = 250, bound_ms: int = 5000) -> str:
    """The answer's text once it has not changed for quiet_ms (a live stream of 50 tokens a second never is)."""
    text, waited = bot_texts(page)[index], 0
    while waited < bound_ms:
        page.wait_for_timeout(quiet_ms)
        waited += quiet_ms
        now = bot_texts(page)[index]
        if now == text:
            return text
        text = now
    raise AssertionError(f"the answer kept growing for {bound_ms} ms after Stop")


def test_message_gets_a_streamed_answer_and_a_tokens_per_second_line(page):
    send(page, "hi llama")
    page.wait_for_function(f"t => {ANSWERS}.some(m => m.innerText.trim() === t)", arg=ANSWER)
    page.wait_for_function("() => document.querySelector('#stats')?.innerText.includes('tokens/s')")
    assert bot_texts(page) == [ANSWER]
    assert "hi llama" in page.inner_text('#chatbot [data-testid="user"]')
    stats = page.inner_text("#stats")
    assert "tokens in" in stats and "tokens/s" in stats and "stop" in stats
    out = ROOT / "test-output"
    out.mkdir(exist_ok=True)
    page.screenshot(path=str(out / "chat.png"), full_page=True)
    prompt_ids, params = page.fake.requests[-1]
    assert params.max_new_tokens > 0 and prompt_ids  # the dialog went through the chat format


def test_stop_button_cancels_the_generation(page):
    fake = page.fake
    fake.script, fake.cancel_event = None, threading.Event()  # a long answer: 512 tokens at 50 per second
    try:
        send(page, "tell me more")
        page.wait_for_function(f"() => {ANSWERS}.length === 2")
        page.click("#stop")
        assert fake.cancel_event.wait(5), "Stop did not cancel the engine request"
        partial = settled_answer(page, 1)  # a chunk sent before the cancel may still be drawn
        page.wait_for_timeout(500)
        assert bot_texts(page)[1] == partial and len(partial) > 0  # the answer stops growing
    finally:
        fake.script = ANSWER


def test_new_chat_stops_the_answer_and_empties_the_chat(page):
    fake = page.fake
    fake.script, fake.cancel_event = None, threading.Event()
    try:
        send(page, "and then?")
        page.wait_for_function(f"() => {ANSWERS}.length === 3")
        page.click("#new-chat")
        assert fake.cancel_event.wait(5), "New chat did not cancel the answer in progress"
        fake.script = ANSWER
        page.wait_for_function("() => !document.querySelector('#chatbot [data-testid=\"bot\"]')")
        page.wait_for_function("() => !document.querySelector('#stats')?.innerText.includes('tokens/s')")
        page.wait_for_timeout(500)  # a late chunk of the cancelled answer must not bring the chat back
        assert bot_texts(page) == []
        send(page, "fresh start")  # the next question is a new conversation
        page.wait_for_function(f"t => {ANSWERS}.some(m => m.innerText.trim() === t)", arg=ANSWER)
    finally:
        fake.script = ANSWER
    prompt_ids, _ = fake.requests[-1]
    text = page.fake.tokenizer.decode(prompt_ids)
    assert "fresh start" in text and "hi llama" not in text
