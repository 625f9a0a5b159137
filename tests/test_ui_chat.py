"""The chat page's features in headless Chromium over the fake engine (issue 26): conversations kept
in the browser, regenerate / edit / undo, copy and export, Markdown rendering, settings, the queue,
Stop, errors, keyboard, a phone's width, and login. One server and one browser for the module.

Needs Debian's chromium; skipped where /usr/bin/chromium is absent."""
from __future__ import annotations

import json
import threading

import httpx
import pytest

from conftest import ROOT, make_tokenizer
from fakes import FakeClient, ServerThread, SlowEventStream, chat_format
from llama_demo.config import ServerConfig
from llama_demo.model.parallel import free_port
from llama_demo.serve import ui_js
from llama_demo.serve.app import build_app
from llama_demo.text.tokenizer import load_tokenizer
from test_ui_browser import CHROMIUM, CHROMIUM_ARGS, wait_ready

WAIT_MS = 15_000
MARKDOWN = ("Here:\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n```python\ndef f(x):\n    return x + 1\n```\n\n"
            "Euler: $e^{i\\pi} + 1 = 0$")
# The chat's answers and their stats notes (Gradio draws a note, a message with a metadata title, as a "thought")
MESSAGES_JS = """(kind) => [...document.querySelectorAll('#chatbot [data-testid="' + (kind === 'user' ? 'user' : 'bot') + '"]')]
  .filter(e => kind === 'user' || e.parentElement.classList.contains('thought') === (kind === 'note'))
  .map(e => e.innerText.trim())"""

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install -y chromium)")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    sync_api = pytest.importorskip("playwright.sync_api")
    folder = tmp_path_factory.mktemp("tok")
    make_tokenizer(folder)
    tok = load_tokenizer(folder)
    fake = FakeClient(tok, max_seq_len=4096, delay=0.004, script=MARKDOWN)
    app = build_app(fake, chat_format(tok), ServerConfig(), system_prompt="Be brief.")
    with ServerThread(app, free_port()) as server, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            context = browser.new_context(viewport={"width": 1200, "height": 900}, accept_downloads=True)
            context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
            context.set_default_timeout(WAIT_MS)
            yield browser, context, server, fake
        finally:
            browser.close()


@pytest.fixture
def page(site):
    """The chat page, on a new chat, the fake answering MARKDOWN quickly."""
    _, context, server, fake = site
    page = context.pages[0] if context.pages else context.new_page()
    if page.url != f"{server.url}/":
        page.goto(f"{server.url}/")
    wait_ready(page)
    fake.script, fake.delay, fake.capacity = MARKDOWN, 0.004, 1000
    page.click("#new-chat")
    page.wait_for_function("() => !document.querySelector('#chatbot [data-testid=\"user\"]')")
    page.fake = fake
    return page


def messages(page, kind: str) -> list[str]:
    return page.evaluate(MESSAGES_JS, kind)


def ask(page, text: str, notes: int | None = None) -> None:
    """Send `text` and wait for its answer's stats note (the `notes`-th in the chat)."""
    want = notes if notes is not None else len(messages(page, "note")) + 1
    page.fill("#message textarea", text)
    page.press("#message textarea", "Enter")
    wait_notes(page, want)


def wait_notes(page, n: int) -> None:
    page.wait_for_function(f"() => ({MESSAGES_JS})('note').length === {n}")


def wait_for(page, done, ms: int = WAIT_MS) -> None:
    for _ in range(ms // 50):
        if done():
            return
        page.wait_for_timeout(50)
    raise AssertionError("timed out")


def screenshot(page, name: str) -> None:
    out = ROOT / "test-output"
    out.mkdir(exist_ok=True)
    page.screenshot(path=str(out / name))


def test_answers_render_markdown_tables_highlighted_code_with_copy_and_latex(page):
    ask(page, "show me markdown")
    bot = page.locator('#chatbot [data-testid="bot"]').first
    assert bot.locator("table td").all_inner_texts() == ["1", "2"]
    page.wait_for_selector('#chatbot pre code.language-python .token.keyword')  # highlighted once whole
    assert bot.locator(".code_wrap .copy_code_button").count() == 1  # each code block has its copy button
    assert bot.locator(".katex").count() == 1
    note = messages(page, "note")[0]  # item 6: the stats line stays under its answer
    assert "tokens/s" in note and "tokens in" in note and note.endswith("stop")
    header = page.inner_text("#title")
    assert "fake-llama" in header and "4096 tokens of context" in header and "1 rank" in header
    screenshot(page, "chat-markdown.png")


def test_streaming_keeps_the_reader_where_they_scrolled_and_stop_keeps_the_partial_answer(page):
    fake = page.fake
    # 512 tokens of short paragraphs at 50 tokens/s: many lines, long before it ends
    fake.script = "\n\n".join(f"Paragraph {i}: the llama walks." for i in range(300))
    fake.delay, fake.cancel_event = 0.02, threading.Event()
    page.fill("#message textarea", "a long answer please")
    page.click("#send")
    wrap = "document.querySelector('#chatbot .bubble-wrap')"
    page.wait_for_function(f"() => {wrap}.scrollHeight > {wrap}.clientHeight + 100")
    assert page.evaluate(f"() => {wrap}.scrollTop") > 50  # it followed the answer down
    # the reader scrolls up; the answer keeps streaming in the same element, and the view stays put
    page.evaluate(f"() => {{ {wrap}.scrollTop = 0; }}")  # as a reader's scroll: it fires a scroll event
    page.evaluate("() => { document.querySelectorAll('#chatbot [data-testid=\"bot\"]')[0].dataset.mark = 'same'; }")
    page.wait_for_timeout(300)
    top = page.evaluate(f"() => {wrap}.scrollTop")
    before = len(messages(page, "answer")[0])
    page.wait_for_timeout(1200)
    assert top < 5 and page.evaluate(f"() => {wrap}.scrollTop") == top
    assert len(messages(page, "answer")[0]) > before
    assert page.evaluate("() => document.querySelectorAll('#chatbot [data-testid=\"bot\"]')[0].dataset.mark") == "same"
    page.click("#stop")
    assert fake.cancel_event.wait(5), "Stop did not cancel the engine request"
    wait_notes(page, 1)
    partial = messages(page, "answer")[0]
    page.wait_for_timeout(300)
    assert messages(page, "answer")[0] == partial and partial
    assert messages(page, "note")[0].endswith("stopped")


def test_a_message_sent_while_answering_is_queued_visibly_then_answered(page):
    page.fake.delay = 0.03  # ~3 s for the first answer
    page.fill("#message textarea", "first question")
    page.press("#message textarea", "Enter")
    page.wait_for_function(f"() => ({MESSAGES_JS})('answer').length === 1")
    page.fill("#message textarea", "second question")
    page.press("#message textarea", "Enter")
    page.wait_for_function("() => document.querySelector('#queued')?.innerText.includes('second question')")
    assert "Queued" in page.inner_text("#queued")
    page.fake.delay = 0.004
    wait_notes(page, 2)
    assert messages(page, "user") == ["first question", "second question"]
    page.wait_for_function("() => !document.querySelector('#queued')?.innerText.includes('second')")
    prompt = page.fake.tokenizer.decode(page.fake.requests[-1][0])
    assert "first question" in prompt and "second question" in prompt


def test_what_is_typed_after_sending_is_never_wiped_by_the_reply_to_the_send(page):
    # a slow network: the server's reply to "first" lands while "second question" is being typed
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.emulateNetworkConditions",
             {"offline": False, "latency": 300, "downloadThroughput": -1, "uploadThroughput": -1})
    try:
        page.fill("#message textarea", "first")
        page.press("#message textarea", "Enter")
        # emptied at once, not by the reply (which takes twice the latency)
        page.wait_for_function("() => document.querySelector('#message textarea').value === ''", timeout=250)
        page.type("#message textarea", "second question", delay=60)
        page.press("#message textarea", "Enter")
        wait_notes(page, 2)
        assert messages(page, "user") == ["first", "second question"]
    finally:
        cdp.send("Network.emulateNetworkConditions",
                 {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1})
        cdp.detach()


def test_a_message_sent_as_the_last_answer_ends_is_answered(site):
    # On a slow link the page hears that the answer to "first" has ended 0.8 s after the server has
    # ended it: "second", sent in between, must be answered all the same (it was left unanswered
    # twice over: the page skipped its answering event while it counted the last one as running,
    # and Gradio's server closed the tab's event stream, so the answer never reached the page).
    _, context, server, fake = site
    fake.script, fake.delay, fake.capacity = "short answer", 0.004, 1000
    with SlowEventStream(server.port, delay=0.8) as link:
        page = context.new_page()
        try:
            page.goto(f"{link.url}/")
            wait_ready(page)
            page.click("#new-chat")
            asked = len(fake.requests)
            page.fill("#message textarea", "first")
            page.press("#message textarea", "Enter")
            wait_for(page, lambda: len(fake.requests) > asked)
            page.wait_for_timeout(300)  # the server is done with "first" (~0.05 s); the page does not know yet
            assert messages(page, "note") == []
            page.fill("#message textarea", "second")
            page.press("#message textarea", "Enter")
            wait_notes(page, 2)
            assert messages(page, "user") == ["first", "second"]
            # and "second" was asked after "first" and its answer, not in a chat without them
            assert "first" in fake.tokenizer.decode(fake.requests[-1][0])
        finally:
            page.close()


def test_sending_empties_the_box_only_of_the_message_sent(page):
    # The send's browser step runs some event-loop turns after Enter: what was typed meanwhile stays
    take = ui_js.TAKE_MESSAGE
    page.fill("#message textarea", "two")
    assert page.evaluate(f"() => ({take})('one', null)[0]") == "one"
    assert page.input_value("#message textarea") == "two"
    page.fill("#message textarea", "one")
    page.evaluate(f"() => ({take})('one', null)")
    assert page.input_value("#message textarea") == ""


def test_a_busy_server_answers_with_a_warning_in_the_chat(page):
    page.fake.capacity = 0  # submit raises QueueFull: the API's 429
    page.fill("#message textarea", "anyone there?")
    page.click("#send")
    page.wait_for_function(f"() => ({MESSAGES_JS})('answer').some(t => t.includes('busy'))")
    assert messages(page, "answer")[0].startswith("⚠️")


def test_regenerate_draws_a_fresh_seed_edit_resends_and_drops_later_turns_undo_removes_a_turn(page):
    fake = page.fake
    ask(page, "question one")
    ask(page, "question two")
    first_seed = fake.requests[-1][1].seed
    asked = len(fake.requests)
    page.click('#chatbot button[aria-label="Retry"]')
    wait_for(page, lambda: len(fake.requests) > asked)
    wait_notes(page, 2)
    assert fake.requests[-1][1].seed != first_seed
    assert "question two" in fake.tokenizer.decode(fake.requests[-1][0])
    assert messages(page, "user") == ["question one", "question two"]  # one answer to it, not two
    # edit the first question: the answer to it and the second turn go, and the toast says so
    page.locator('#chatbot button[aria-label="Edit"]').first.click()
    page.fill("#chatbot textarea", "question one, edited")
    page.click('#chatbot button[aria-label="Submit"]')
    page.wait_for_function("() => document.body.innerText.includes('were dropped')")
    page.wait_for_function(f"() => ({MESSAGES_JS})('user').length === 1")
    wait_notes(page, 1)
    assert messages(page, "user") == ["question one, edited"]
    prompt = fake.tokenizer.decode(fake.requests[-1][0])
    assert "question one, edited" in prompt and "question two" not in prompt
    page.click('#chatbot button[aria-label="Undo"]')
    page.wait_for_function("() => !document.querySelector('#chatbot [data-testid=\"user\"]')")
    assert page.input_value("#message textarea") == "question one, edited"


def test_copy_a_message_and_the_conversation_as_markdown(page):
    ask(page, "copy me")
    # the answer's copy button (0 is the question's): its Markdown as written, then its stats note
    page.locator('#chatbot button[aria-label="Copy message"]').nth(1).click()
    page.wait_for_function("t => navigator.clipboard.readText().then(c => c.startsWith(t))", arg=MARKDOWN)
    page.click("#copy-md")
    page.wait_for_function("() => (document.body.dataset.copied || '').includes('## You')")
    copied = page.evaluate("() => navigator.clipboard.readText()")
    assert copied.startswith("# copy me") and "## You\n\ncopy me" in copied and "## fake-llama" in copied
    assert "| a | b |" in copied and "```python" in copied and "tokens/s" in copied


def test_export_to_json_and_import_it_back(page, tmp_path):
    ask(page, "export this")
    with page.expect_download() as download:
        page.click("#export")
    saved = tmp_path / download.value.suggested_filename
    download.value.save_as(saved)
    doc = json.loads(saved.read_text(encoding="utf-8"))
    assert doc["format"] == "llama_demo-chat" and doc["title"] == "export this"
    assert [m["role"] for m in doc["messages"]] == ["user", "assistant", "assistant"]  # question, answer, stats
    assert doc["messages"][1]["content"] == MARKDOWN and doc["settings"]["system_prompt"] == "Be brief."
    page.click("#new-chat")
    page.wait_for_function("() => !document.querySelector('#chatbot [data-testid=\"user\"]')")
    page.set_input_files("#import input[type=file], input[type=file]", str(saved))
    page.wait_for_function(f"() => ({MESSAGES_JS})('user').join() === 'export this'")
    assert messages(page, "answer") == [page.locator('#chatbot [data-testid="bot"]').first.inner_text().strip()]
    # the original and the import (the list follows the store a round trip later)
    wait_for(page, lambda: page.locator("#chat-list label", has_text="export this").count() == 2)


def test_conversations_are_listed_renamed_deleted_and_reopened_on_reload_in_this_browser_only(site, page):
    browser, _, server, _ = site
    ask(page, "about llamas")
    page.click("#new-chat")
    ask(page, "about alpacas", notes=1)
    title = "#chat-title input, #chat-title textarea"
    page.wait_for_function("s => document.querySelector(s)?.value === 'about alpacas'", arg=title)  # the list caught up
    page.fill("#chat-title input, #chat-title textarea", "Alpaca notes")
    page.click("#rename")
    page.wait_for_function("() => document.querySelector('#chat-list')?.innerText.includes('Alpaca notes')")
    page.reload()
    page.wait_for_function(f"() => ({MESSAGES_JS})('user').join() === 'about alpacas'")  # the last one reopened
    assert page.input_value("#chat-title input, #chat-title textarea") == "Alpaca notes"
    page.locator("#chat-list label", has_text="about llamas").first.click()
    page.wait_for_function(f"() => ({MESSAGES_JS})('user').join() === 'about llamas'")
    page.click("#delete-chat")
    page.wait_for_function("() => !document.querySelector('#chat-list')?.innerText.includes('about llamas')")
    assert "Alpaca notes" in page.inner_text("#chat-list")
    # another visitor of the same server (a shared link) has a browser of their own: no chats
    other = browser.new_context()
    try:
        visitor = other.new_page()
        visitor.goto(f"{server.url}/")
        wait_ready(visitor)
        visitor.wait_for_timeout(500)
        assert visitor.locator("#chat-list label").count() == 0
        assert not visitor.query_selector('#chatbot [data-testid="user"]')
    finally:
        other.close()


def test_settings_say_what_they_do_persist_per_browser_and_reset_to_the_models_defaults(page):
    page.get_by_text("Settings (kept in this browser)").click()
    assert "model default 0.3" in page.inner_text("#temperature")
    assert "temperature 0.3 · top-p 0.9" in page.inner_text("#model-defaults")
    page.fill("#temperature input[type=number]", "1.2")
    page.press("#temperature input[type=number]", "Enter")
    page.fill("#seed input", "7")
    page.press("#seed input", "Tab")
    page.wait_for_timeout(400)
    ask(page, "seeded")
    params = page.fake.requests[-1][1]
    assert params.temperature == pytest.approx(1.2) and params.seed == 7
    page.reload()
    wait_ready(page)
    page.get_by_text("Settings (kept in this browser)").click()
    page.wait_for_function("() => document.querySelector('#seed input')?.value === '7'")
    assert page.input_value("#temperature input[type=number]") == "1.2"
    page.click("#reset-settings")
    page.wait_for_function("() => document.querySelector('#seed input')?.value === '-1'")
    assert page.input_value("#temperature input[type=number]") == "0.3"
    page.wait_for_timeout(400)
    page.reload()  # the reset is kept too
    wait_ready(page)
    page.get_by_text("Settings (kept in this browser)").click()
    page.wait_for_function("() => document.querySelector('#seed input')?.value === '-1'")


def test_enter_sends_and_shift_enter_starts_a_new_line(page):
    page.click("#message textarea")
    page.keyboard.type("line one")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("line two")
    assert page.input_value("#message textarea") == "line one\nline two"
    page.keyboard.press("Enter")
    wait_notes(page, 1)
    assert messages(page, "user") == ["line one\nline two"]
    assert page.input_value("#message textarea") == ""


def test_the_page_works_at_a_phones_width(site, page):
    _, context, server, _ = site
    phone = context.new_page()
    try:
        phone.set_viewport_size({"width": 375, "height": 740})
        phone.goto(f"{server.url}/")
        wait_ready(phone)
        phone.wait_for_function("() => !document.querySelector('#sidebar.open')")  # the chat, not the sidebar
        ask(phone, "hello from a phone", notes=len(messages(phone, "note")) + 1)
        assert phone.evaluate("() => document.documentElement.scrollWidth") <= 375
        for button in ("#send", "#stop"):
            box = phone.locator(button).bounding_box()
            assert box["x"] >= 0 and box["x"] + box["width"] <= 375
        screenshot(phone, "chat-phone-fake.png")
    finally:
        phone.close()


def test_login_and_api_key_guard_the_page_and_its_stored_chats(site, tmp_path):
    browser, _, _, fake = site
    cfg = ServerConfig(auth=("ann", "s3cret"), api_key="sk-test")
    app = build_app(fake, chat_format(fake.tokenizer), cfg)
    with ServerThread(app, free_port()) as server:
        assert httpx.get(f"{server.url}/v1/models").status_code == 401
        config = httpx.get(f"{server.url}/config")
        assert config.status_code == 401 and "llama_demo.chats" not in config.text  # no page, no storage key
        context = browser.new_context()
        try:
            page = context.new_page()
            page.set_default_timeout(WAIT_MS)
            page.goto(f"{server.url}/")
            page.wait_for_selector("input[type=password]")
            assert not page.query_selector("#chatbot")
            page.locator("input").first.fill("ann")
            page.fill("input[type=password]", "s3cret")
            page.keyboard.press("Enter")
            wait_ready(page)
            fake.script = MARKDOWN
            ask(page, "behind a login", notes=1)
        finally:
            context.close()
