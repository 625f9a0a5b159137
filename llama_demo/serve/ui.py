"""The Gradio chat page (mounted at / on rank 0's app), its gradio_client endpoint `/chat`, and
Gradio's public share link. Inputs go through the same gate as the API."""
from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import AsyncIterator

import gradio as gr

from ..config import ServerConfig
from ..engine.engine import TokenEvent
from ..text.chat_format import Message
from .errors import ApiError
from .gate import Gate
from .loop import EngineClient, QueueFull
from .metrics import Metrics

ASSETS = Path(__file__).resolve().parents[2] / "assets"
WARNING = "⚠️"  # starts every problem report the page writes into the chat


class ShareError(RuntimeError):
    """No public share link could be opened; the one-line message says why (usually: no internet)."""


def page_dialog(message: str, history: list[dict], system_prompt: str) -> list[Message]:
    """The page's conversation as a dialog ending with `message`. An unanswered question (stopped
    early, refused) is replaced by the next; answers that are problem reports are skipped."""
    if not message.strip():
        raise ApiError(400, "the message is empty: type a question first")
    dialog = [Message("system", system_prompt)] if system_prompt and system_prompt.strip() else []
    question = None
    for m in history:
        text = _ui_text(m.get("content"))
        if m.get("role") == "user":
            question = text
        elif m.get("role") == "assistant" and question is not None and not text.startswith(WARNING):
            dialog += [Message("user", question), Message("assistant", text)]
            question = None
    return dialog + [Message("user", message)]


def _ui_text(content) -> str:
    """Text of a Chatbot message: a string, or (Gradio 6) a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    if isinstance(content, (list, tuple)):
        return "".join(_ui_text(c) for c in content)
    return ""


class Rate:
    """The stats line under the chat: tokens and tokens/s of the answer being streamed."""

    def __init__(self):
        self.start, self.tokens = time.monotonic(), 0

    def line(self, ev: TokenEvent) -> str:
        self.tokens += ev.token_id is not None
        secs = time.monotonic() - self.start
        rate = self.tokens / secs if secs > 0 else 0.0
        reused = f" · {ev.reused} prompt tokens reused" if ev.reused else ""
        return f"{self.tokens} tokens in {secs:.1f} s · **{rate:.1f} tokens/s**{reused}" + (
            f" · {ev.note or ev.finish_reason}" if ev.finished else "")


def load_examples() -> list[str]:
    path = ASSETS / "examples.json"
    return [str(e) for e in json.loads(path.read_text(encoding="utf-8"))] if path.is_file() else []


def build_ui(client: EngineClient, gate: Gate, cfg: ServerConfig, system_prompt: str = "",
             metrics: Metrics | None = None) -> gr.Blocks:
    max_len = max(1, min(client.max_seq_len - 1, 4096))
    chat_mode = gate.chat_format is not None

    async def answer(message: str, history: list[dict], system_prompt: str, temperature, top_p,
                     max_new_tokens) -> AsyncIterator[tuple[str, str]]:
        """(answer so far, stats line) while the answer streams; problems become a ⚠️ answer."""
        try:
            message = message if isinstance(message, str) else ""
            if chat_mode:
                ids = await gate.encode_dialog(page_dialog(message, history or [], system_prompt or ""), "message")
            elif not message.strip():
                raise ApiError(400, "the message is empty: type a question first")
            else:
                ids = await gate.encode(message, "message")
            job = gate.job(ids, gate.page_params(temperature, top_p, max_new_tokens, cfg.page), "message")
            sub = client.submit(job.prompt_ids, job.params)
        except (ApiError, QueueFull) as e:
            why = str(e)
            if "context" in why and history:
                why += " (or press Clear to start a new conversation)"
            gr.Warning(why)
            yield f"{WARNING} {why}", ""
            return
        except RuntimeError as e:  # the model stopped serving
            yield f"{WARNING} {e}", ""
            return
        text, rate = "", Rate()
        try:
            answer_events = metrics.track(sub, "page", len(job.prompt_ids)) if metrics else sub
            async for ev in answer_events:  # Stop cancels this task, and so the request (finally: close)
                text += ev.text if ev.finish_reason != "error" else f"{WARNING} {ev.error}"
                yield text, rate.line(ev)
        except RuntimeError as e:  # the model stopped serving
            yield f"{text}\n\n{WARNING} {e}", ""
        finally:
            sub.close()

    def user_turn(message: str, history: list[dict]):
        return "", history + [{"role": "user", "content": message}], message

    async def respond(history: list[dict], message: str, *settings):
        async for text, line in answer(message, history[:-1], *settings):
            yield history + [{"role": "assistant", "content": text}], line

    async def chat(message: str, system_prompt: str, temperature: float, top_p: float, max_new_tokens: int):
        """One answer, streamed, for gradio_client: Client(url).predict(message, system_prompt,
        temperature, top_p, max_new_tokens, api_name="/chat") -> (answer, stats line).
        A fresh conversation each call; completion mode ignores system_prompt."""
        async for text, line in answer(message, [], system_prompt, temperature, top_p, max_new_tokens):
            yield text, line

    with gr.Blocks(title=client.model_name, analytics_enabled=False) as demo:
        gr.Markdown(f"# {client.model_name}" + ("" if chat_mode else
                    "\nCompletion mode: the model continues the text you send."), elem_id="title")
        chatbot = gr.Chatbot(elem_id="chatbot", height=480, buttons=["copy", "copy_all"], show_label=False,
                             placeholder=f"Ask **{client.model_name}** something.")
        with gr.Row(equal_height=True):
            message = gr.Textbox(placeholder="Type a message and press Enter", elem_id="message", show_label=False,
                                 autofocus=True, scale=8, container=False)
            send = gr.Button("Send", variant="primary", elem_id="send", scale=1, min_width=80)
            stop = gr.Button("Stop", variant="stop", elem_id="stop", scale=1, min_width=80)
            clear = gr.Button("Clear", elem_id="clear", scale=1, min_width=80)
        stats = gr.Markdown("", elem_id="stats", label="stats")
        with gr.Accordion("Settings", open=False):
            settings = [
                gr.Textbox(system_prompt, label="System prompt", lines=2, visible=chat_mode),
                gr.Slider(0.0, 2.0, value=cfg.page.temperature, step=0.05, label="Temperature (0 = greedy)"),
                gr.Slider(0.05, 1.0, value=cfg.page.top_p, step=0.05, label="Top-p"),
                gr.Slider(1, max_len, value=min(cfg.page.max_new_tokens, max_len), step=1, label="Max new tokens"),
            ]
        if examples := load_examples():
            gr.Examples([[e] for e in examples], inputs=[message], label="Examples")
        pending = gr.State("")  # the message being answered, once the textbox is cleared

        answering = [
            trigger(user_turn, [message, chatbot], [message, chatbot, pending], queue=False, api_visibility="private")
            .then(respond, [chatbot, pending, *settings], [chatbot, stats], api_visibility="private",
                  concurrency_id="model", concurrency_limit=cfg.max_batch_size)
            for trigger in (message.submit, send.click)]
        stop.click(None, cancels=answering, api_visibility="private")
        # Cancel first, then empty: emptied by the cancelling event itself, the chat kept showing the
        # cancelled answer (seen in Chromium).
        clear.click(None, cancels=answering, api_visibility="private").then(
            lambda: ([], ""), None, [chatbot, stats], queue=False, api_visibility="private")
        # the API endpoint, as gr.ChatInterface makes its own: an event no one in the page triggers
        api_answer = gr.Textbox(visible=False, label="answer")
        gr.Button(visible=False).click(chat, [message, *settings], [api_answer, stats], api_name="chat",
                                       concurrency_id="model", concurrency_limit=cfg.max_batch_size)
    # Gradio's own queue is bounded too: beyond it the page says the queue is full (no endless spinner)
    demo.queue(default_concurrency_limit=cfg.max_batch_size, max_size=max(1, cfg.max_waiting))
    return demo


def mount_ui(app, demo: gr.Blocks, cfg: ServerConfig):
    return gr.mount_gradio_app(app, demo, path="/", auth=cfg.auth, theme=gr.themes.Soft(),
                               css_paths=[ASSETS / "style.css"], footer_links=["api"])


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
