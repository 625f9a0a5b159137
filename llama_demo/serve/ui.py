"""The Gradio chat page (mounted at / on rank 0's app), its gradio_client endpoint `/chat`, and
Gradio's public share link. Inputs go through the same gate as the API (serve.ui_answer).

What a visitor keeps (conversations, settings) lives in their own browser (gr.BrowserState), never
on the server: a shared link shows each visitor only their own chats."""
from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
from pathlib import Path

import gradio as gr

from ..config import ServerConfig
from . import ui_chats
from .gate import Gate
from .loop import EngineClient
from .metrics import Metrics
from . import ui_js
from .ui_answer import RANDOM_SEED, WARNING, Answerer, Inbox, Rate, Sampling, Turn, page_dialog

__all__ = ["ASSETS", "WARNING", "Rate", "ShareError", "build_ui", "mount_ui", "open_share_tunnel", "page_dialog"]

ASSETS = Path(__file__).resolve().parents[2] / "assets"
# Markdown maths in answers: KaTeX, with the delimiters models write ($...$ inline as well)
LATEX = [{"left": "$$", "right": "$$", "display": True}, {"left": "\\[", "right": "\\]", "display": True},
         {"left": "$", "right": "$", "display": False}, {"left": "\\(", "right": "\\)", "display": False}]
SETTINGS = ("system_prompt", "temperature", "top_p", "max_new_tokens", "seed")
# How often the page's stream-keeping event looks up (see keep_stream_open): the longest it
# outlives a closed tab on the server.
STREAM_KEEPER_S = 10.0


class ShareError(RuntimeError):
    """No public share link could be opened; the one-line message says why (usually: no internet)."""


def load_examples() -> list[str]:
    path = ASSETS / "examples.json"
    return [str(e) for e in json.loads(path.read_text(encoding="utf-8"))] if path.is_file() else []


def serving_ranks() -> int:
    """How many ranks run the model: rank 0 serves the page inside torchrun's process group."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def browser_secret(model_name: str) -> str:
    """BrowserState's key for the visitor's localStorage. Gradio sends it in the page config, so it
    hides nothing from the visitor; fixed per model (not random per start, Gradio's default) so
    that chats stay readable after the server restarts."""
    return hashlib.sha256(f"llama_demo chats {model_name}".encode()).hexdigest()[:32]


def build_ui(client: EngineClient, gate: Gate, cfg: ServerConfig, system_prompt: str = "",
             metrics: Metrics | None = None) -> gr.Blocks:
    max_len = max(1, min(client.max_seq_len - 1, 4096))
    answerer = Answerer(client, gate, cfg, metrics)
    chat_mode = answerer.chat_mode
    model, d = client.model_name, cfg.page
    defaults = {"system_prompt": system_prompt, "temperature": d.temperature, "top_p": d.top_p,
                "max_new_tokens": min(d.max_new_tokens, max_len), "seed": RANDOM_SEED}
    ranks = serving_ranks()

    def settings_of(values) -> Sampling:
        return Sampling(*values)

    with gr.Blocks(title=model, analytics_enabled=False) as demo:
        secret = browser_secret(model)
        chats = gr.BrowserState(ui_chats.new_store(), storage_key=f"llama_demo.chats.{model}", secret=secret)
        kept_settings = gr.BrowserState(defaults, storage_key=f"llama_demo.settings.{model}", secret=secret)
        inbox = gr.State(Inbox())
        with gr.Sidebar(elem_id="sidebar", label="Conversations"):
            new_chat = gr.Button("New chat", elem_id="new-chat", variant="primary")
            chat_list = gr.Radio([], label="Conversations", info="Kept in this browser only", elem_id="chat-list")
            title = gr.Textbox(label="Title of this chat", elem_id="chat-title", max_lines=1,
                               placeholder="Set once the first answer is in")
            with gr.Row():
                rename = gr.Button("Rename", elem_id="rename", size="sm")
                delete = gr.Button("Delete", elem_id="delete-chat", variant="stop", size="sm")
            with gr.Row():
                copy_md = gr.Button("Copy as Markdown", elem_id="copy-md", size="sm")
                export = gr.Button("Export JSON", elem_id="export", size="sm")
            load_json = gr.UploadButton("Import JSON", file_types=[".json"], elem_id="import", size="sm")
            md_text = gr.Textbox(visible=False, elem_id="md-text")
            json_text = gr.Textbox(visible=False, elem_id="json-text")
        with gr.Column(elem_id="main"):
            mode = "chat" if chat_mode else "completion mode: the model continues the text you send"
            gr.Markdown(f"# {model}\n{client.max_seq_len} tokens of context · served by {ranks} rank"
                        f"{'s' if ranks != 1 else ''} · {mode}", elem_id="title")
            chatbot = gr.Chatbot(elem_id="chatbot", height="62vh", min_height=320, buttons=["copy"], show_label=False,
                                 editable="user" if chat_mode else None, latex_delimiters=LATEX, autoscroll=False,
                                 feedback_options=None, placeholder=f"Ask **{model}** something.")
            queued = gr.Markdown("", elem_id="queued")
            with gr.Row(equal_height=True, elem_id="input-row"):
                message = gr.Textbox(placeholder="Message (Enter sends, Shift+Enter starts a new line)", elem_id="message",
                                     show_label=False, autofocus=True, lines=1, max_lines=8, scale=8, container=False)
                send = gr.Button("Send", variant="primary", elem_id="send", scale=1, min_width=70)
                stop = gr.Button("Stop", variant="stop", elem_id="stop", scale=1, min_width=70)
            stats = gr.Markdown("", elem_id="stats", label="stats")
            with gr.Accordion("Settings (kept in this browser)", open=False, elem_id="settings"):
                settings = [
                    gr.Textbox(system_prompt, label="System prompt", lines=2, visible=chat_mode, elem_id="system-prompt",
                               info="Instructions the model reads before the conversation"),
                    gr.Slider(0.0, 2.0, value=d.temperature, step=0.05, label="Temperature", elem_id="temperature",
                              info=f"How far answers stray from the likeliest words; 0 = greedy, always the same answer "
                                   f"(model default {d.temperature:g})"),
                    gr.Slider(0.05, 1.0, value=d.top_p, step=0.05, label="Top-p", elem_id="top-p",
                              info=f"Sample only from the likeliest words that make up this much probability "
                                   f"(model default {d.top_p:g})"),
                    gr.Slider(1, max_len, value=defaults["max_new_tokens"], step=1, label="Max new tokens",
                              elem_id="max-new-tokens", info=f"The longest answer, in tokens (default "
                                                             f"{defaults['max_new_tokens']})"),
                    gr.Number(RANDOM_SEED, precision=0, minimum=RANDOM_SEED, label="Seed", elem_id="seed",
                              info="-1: a fresh random seed for each answer; another number repeats answers exactly "
                                   "(Regenerate always draws a new one)"),
                ]
                gr.Markdown(f"**The model's defaults**: temperature {d.temperature:g} · top-p {d.top_p:g} · "
                            f"max new tokens {defaults['max_new_tokens']}"
                            + (f" · top-k {d.top_k}" if d.top_k else "")
                            + (f" · repetition penalty {d.repetition_penalty:g}" if d.repetition_penalty != 1 else "")
                            + " (from its generation_config.json where it has one, unless the server's flags set them)",
                            elem_id="model-defaults")
                reset = gr.Button("Reset to the model's defaults", elem_id="reset-settings", size="sm")
            if examples := load_examples():
                gr.Examples([[e] for e in examples], inputs=[message], label="Examples")

        # --- answering: a message joins the tab's inbox; one drain at a time answers it --------
        def enqueue(text: str, box: Inbox):
            if not isinstance(text, str) or not text.strip():
                gr.Warning("the message is empty: type a question first")
                return box.shown()
            box.queue.append(Turn(text))
            return box.shown()

        async def drain(history, box: Inbox, store, *values):
            async for out in answerer.drain(history, box, store, settings_of(values)):
                yield out

        private = dict(api_visibility="private")
        drain_kw = dict(fn=drain, inputs=[chatbot, inbox, chats, *settings], outputs=[chatbot, stats, queued, chats],
                        concurrency_id="model", concurrency_limit=cfg.max_batch_size,
                        trigger_mode="multiple", **private)
        # A message typed within a round trip of the last one must not be lost: trigger_mode
        # "multiple" on the send and on the drain after it (Gradio's default, "once", skips an event
        # while the browser still counts the previous one as running, and the browser hears of a
        # drain's end later than the server: a message queued in between was left unanswered; a
        # drain that finds another running leaves its queue to it), and the box emptied in the
        # browser as the message leaves (emptied by the server's reply, it wiped what was typed meanwhile)
        answering = [trigger(enqueue, [message, inbox], [queued], js=ui_js.TAKE_MESSAGE, queue=False,
                             trigger_mode="multiple", **private).then(**drain_kw)
                     for trigger in (message.submit, send.click)]

        def regenerate(history, box: Inbox):
            """The last answer dropped and its question queued again, with a fresh seed."""
            history = box.chat(history)
            last = max((i for i, m in enumerate(history) if m.get("role") == "user"), default=None)
            if last is None:
                return gr.skip()
            box.queue.insert(0, Turn(ui_chats.text_of(history[last].get("content")), fresh_seed=True))
            return box.shows(history[:last])

        def resend_edited(history, box: Inbox, edit: gr.EditData):
            """The conversation up to the edited message, which is queued to be answered afresh."""
            history = box.chat(history)
            at = edit.index[0] if isinstance(edit.index, (list, tuple)) else edit.index
            dropped = sum(1 for m in history[at + 1:] if not ui_chats.is_stats(m))
            box.queue.insert(0, Turn(ui_chats.text_of(edit.value)))
            if dropped:
                gr.Info(f"Your edited message is sent again; the {dropped} message{'s' if dropped != 1 else ''} "
                        "after it were dropped.")
            return box.shows(history[:at])

        answering.append(chatbot.retry(regenerate, [chatbot, inbox], [chatbot], queue=False, **private)
                         .then(**drain_kw))
        if chat_mode:
            answering.append(chatbot.edit(resend_edited, [chatbot, inbox], [chatbot], **private)  # queued: its toast shows
                             .then(**drain_kw))

        def undo(history, box: Inbox, store):
            """The last question and its answer removed; the question goes back to the input box."""
            history = box.chat(history)
            last = max((i for i, m in enumerate(history) if m.get("role") == "user"), default=None)
            if last is None:
                return gr.skip(), gr.skip(), gr.skip()
            kept = box.shows(history[:last])
            return kept, ui_chats.text_of(history[last].get("content")), ui_chats.save(store, kept)

        chatbot.undo(undo, [chatbot, inbox, chats], [chatbot, message, chats], queue=False, **private)

        def stopped(history, line: str, box: Inbox, store, typed: str):
            """After Stop: the partial answer kept with a stats note, queued messages back in the box."""
            box.busy = None
            waiting = [t.text for t in box.queue] + ([typed] if typed and typed.strip() else [])
            box.queue.clear()
            history = box.chat(history)
            if history and history[-1]["role"] == "assistant" and not ui_chats.is_stats(history[-1]) and line:
                history.append(ui_chats.stats_message(line.replace("**", "") + " · stopped", "Stopped by you"))
            return box.shows(history), "\n\n".join(waiting) or gr.skip(), "", ui_chats.save(store, history)

        stop.click(None, cancels=answering, **private).then(
            stopped, [chatbot, stats, inbox, chats, message], [chatbot, message, queued, chats], queue=False, **private)

        # --- conversations: the sidebar over the browser's store --------------------------------
        def shown_store(store):
            chat = ui_chats.current(store)
            return gr.Radio(choices=ui_chats.choices(store), value=chat and chat["id"]), (chat or {}).get("title", "")

        def start_new(box: Inbox, store):
            box.queue.clear()
            box.busy = None
            return box.shows([]), "", "", ui_chats.open_chat(store, None)

        def open_selected(chat_id, box: Inbox, store):
            box.queue.clear()
            box.busy = None
            store = ui_chats.open_chat(store, chat_id)
            return box.shows((ui_chats.current(store) or {}).get("messages", [])), "", "", store

        for trigger in (new_chat.click, chatbot.clear):  # the chat's own bin button starts a new one too
            trigger(None, cancels=answering, **private).then(
                start_new, [inbox, chats], [chatbot, stats, queued, chats], queue=False, **private)
        chat_list.input(None, cancels=answering, **private).then(
            open_selected, [chat_list, inbox, chats], [chatbot, stats, queued, chats], queue=False, **private)
        chats.change(shown_store, [chats], [chat_list, title], queue=False, **private)

        def renamed(name: str, store):
            if ui_chats.current(store) is None:
                gr.Warning("nothing to rename yet: the chat is kept once its first answer is in")
            return ui_chats.rename(store, name)

        for trigger in (rename.click, title.submit):
            trigger(renamed, [title, chats], [chats], queue=False, **private)

        def deleted(box: Inbox, store):
            store = ui_chats.delete(store)
            return box.shows((ui_chats.current(store) or {}).get("messages", [])), "", store

        delete.click(None, cancels=answering, **private).then(deleted, [inbox, chats], [chatbot, stats, chats], queue=False,
                                                               **private)

        def as_markdown(history, store):
            chat = ui_chats.current(store)
            return ui_chats.to_markdown((chat or {}).get("title") or ui_chats.title_for(history), history, model)

        def as_json(history, store, *values):
            return ui_chats.to_json(ui_chats.current(store), history, model, dict(zip(SETTINGS, values)))

        copy_md.click(as_markdown, [chatbot, chats], [md_text], queue=False, **private).then(
            None, [md_text], None, js=ui_js.COPY, **private)
        export.click(as_json, [chatbot, chats, *settings], [json_text], queue=False, **private).then(
            None, [json_text], None, js=ui_js.DOWNLOAD, **private)

        def imported(path, box: Inbox, store):
            """An exported conversation read back (the upload is deleted once read) and opened."""
            try:
                data = Path(path).read_bytes()
                Path(path).unlink(missing_ok=True)
                name, messages = ui_chats.from_json(data)
            except (OSError, ui_chats.NotAConversation) as e:
                gr.Warning(f"could not import that file: {e}")
                return gr.skip(), gr.skip()
            gr.Info(f"Imported “{name}”: {len(messages)} messages")
            return box.shows(messages), ui_chats.add_imported(store, name, messages)

        load_json.upload(None, cancels=answering, **private).then(
            imported, [load_json, inbox, chats], [chatbot, chats], queue=False, **private)

        # --- settings: kept in the browser, the model's defaults one click away ----------------
        def kept(*values):
            return dict(zip(SETTINGS, values))

        gr.on([s.change for s in settings], kept, settings, [kept_settings], queue=False,
              trigger_mode="always_last", **private)
        reset.click(lambda: [defaults[k] for k in SETTINGS], None, settings, queue=False, **private)

        def reopened(box: Inbox, store, saved):
            """On load: the last conversation and this browser's settings."""
            saved = saved if isinstance(saved, dict) else {}
            values = [saved.get(k, defaults[k]) for k in SETTINGS]
            chat = ui_chats.current(store)
            return [box.shows((chat or {}).get("messages", [])), *shown_store(store), *values]

        demo.load(None, js=ui_js.ON_LOAD, **private)

        async def keep_stream_open():
            """One event that runs as long as the tab is open, so the tab's event stream never
            closes. Gradio's server closes a session's stream when its last event completes; a
            message sent before the browser has heard of that close joins the queue on a stream the
            browser still thinks open, and its answer waits on the server, never shown (seen on a
            busy machine). Costs a sleeping task per open tab; ends at the first look after the
            tab has gone (Gradio marks its events dead when the stream drops)."""
            while True:
                await asyncio.sleep(STREAM_KEEPER_S)
                yield

        demo.load(keep_stream_open, None, None, concurrency_id="stream-keeper", concurrency_limit=None,
                  show_progress="hidden", **private)
        # body[data-ready] once the browser's conversation and settings are back: before that an
        # edit would be overwritten by them (tests wait for it)
        demo.load(reopened, [inbox, chats, kept_settings], [chatbot, chat_list, title, *settings], queue=False,
                  **private).then(None, js=ui_js.READY, **private)

        # the API endpoint, as gr.ChatInterface makes its own: an event no one in the page triggers
        async def chat(message: str, system_prompt: str, temperature: float, top_p: float, max_new_tokens: int):
            """One answer, streamed, for gradio_client: Client(url).predict(message, system_prompt,
            temperature, top_p, max_new_tokens, api_name="/chat") -> (answer, stats line).
            A fresh conversation each call; completion mode ignores system_prompt."""
            s = Sampling(system_prompt, temperature, top_p, max_new_tokens, None)
            async for text, line in answerer.answer(message, [], s):
                yield text, line

        api_answer = gr.Textbox(visible=False, label="answer")
        gr.Button(visible=False).click(chat, [message, *settings[:4]], [api_answer, stats], api_name="chat",
                                       concurrency_id="model", concurrency_limit=cfg.max_batch_size)
    # Gradio's own queue is bounded too: beyond it the page says the queue is full (no endless spinner)
    demo.queue(default_concurrency_limit=cfg.max_batch_size, max_size=max(1, cfg.max_waiting))
    return demo


def mount_ui(app, demo: gr.Blocks, cfg: ServerConfig):
    # Any credential guards the page and Gradio's API behind it: the page login, or with only an
    # API key a login taking the key (serve.auth). Gradio's own FastAPI docs are off: open, they
    # listed its routes to anyone.
    from .auth import KEY_LOGIN_MESSAGE, guard_gradio_api, page_login

    login = page_login(cfg.auth, cfg.api_key)
    app = gr.mount_gradio_app(app, demo, path="/", auth=login, theme=gr.themes.Soft(),
                              auth_message=KEY_LOGIN_MESSAGE if login is not None and cfg.auth is None else None,
                              css_paths=[ASSETS / "style.css"], footer_links=["api"],
                              app_kwargs={"docs_url": None, "redoc_url": None, "openapi_url": None})
    return guard_gradio_api(app) if login is not None else app


def open_share_tunnel(host: str, port: int) -> str:
    """A public https URL (Gradio's frp share server) forwarding to the app served at host:port.

    Gradio's own launch(share=True) does the same through gradio.networking.setup_tunnel; the
    tunnel process lives until this process exits. Raises ShareError (one line) without internet."""
    from gradio import networking

    local = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
    try:
        url = networking.setup_tunnel(local, port, secrets.token_urlsafe(32), None, None)
    except Exception as e:  # gradio raises RuntimeError/ValueError/OSError/httpx errors here
        cause = e.__cause__ or e
        why = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:200]
        raise ShareError(f"could not open a Gradio share link ({type(cause).__name__}: {why}); it needs internet "
                         f"access to api.gradio.app. The server still runs at http://{local}:{port}/") from None
    return "https://" + url.split("://", 1)[-1]  # frpc reports http; the share server speaks https
