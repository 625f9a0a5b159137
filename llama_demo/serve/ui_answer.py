"""How the chat page gets its answers: the conversation becomes a dialog, goes through the same
gate and EngineClient as the API, and streams back with a stats line. A tab's messages wait in its
Inbox while an answer runs, so one sent meanwhile is queued (and shown), not lost."""
from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field, replace
from typing import AsyncIterator

import gradio as gr

from ..config import ServerConfig
from ..engine.engine import TokenEvent
from ..text.chat_format import Message
from . import ui_chats
from .errors import ApiError
from .gate import Gate
from .loop import EngineClient, QueueFull
from .metrics import Metrics

WARNING = "⚠️"  # starts every problem report the page writes into the chat
RANDOM_SEED = -1  # the seed setting's "a fresh one for every answer"


def page_dialog(message: str, history: list[dict], system_prompt: str) -> list[Message]:
    """The page's conversation as a dialog ending with `message`. An unanswered question (stopped
    early, refused) is replaced by the next; answers that are problem reports, and stats notes,
    are skipped."""
    if not message.strip():
        raise ApiError(400, "the message is empty: type a question first")
    dialog = [Message("system", system_prompt)] if system_prompt and system_prompt.strip() else []
    question = None
    for m in history:
        text = ui_chats.text_of(m.get("content"))
        if ui_chats.is_stats(m):
            continue
        if m.get("role") == "user":
            question = text
        elif m.get("role") == "assistant" and question is not None and not text.startswith(WARNING):
            dialog += [Message("user", question), Message("assistant", text)]
            question = None
    return dialog + [Message("user", message)]


class Rate:
    """The stats line of the answer being streamed: tokens, tokens/s, prompt tokens reused, finish."""

    def __init__(self, prompt_tokens: int = 0):
        self.start, self.tokens, self.prompt_tokens = time.monotonic(), 0, prompt_tokens
        self.first_token_s: float | None = None
        self.reused = 0
        self.finish = ""

    def line(self, ev: TokenEvent) -> str:
        self.tokens += ev.token_id is not None
        secs = time.monotonic() - self.start
        if self.first_token_s is None and ev.token_id is not None:
            self.first_token_s = secs
        self.reused = ev.reused or self.reused
        self.finish = (ev.note or ev.finish_reason or "") if ev.finished else ""
        rate = self.tokens / secs if secs > 0 else 0.0
        reused = f" · {self.reused} prompt tokens reused" if self.reused else ""
        return f"{self.tokens} tokens in {secs:.1f} s · **{rate:.1f} tokens/s**{reused}" + (
            f" · {self.finish}" if ev.finished else "")


@dataclass
class Turn:
    text: str
    fresh_seed: bool = False  # Regenerate: a new seed even where the settings fix one


@dataclass
class Inbox:
    """One tab's messages waiting for the model (gr.State: per session, never shared)."""
    queue: list[Turn] = field(default_factory=list)
    busy: str | None = None  # the token of the drain answering them, None when idle
    # the chat as the server last sent it to the browser (every event that changes the chat says so
    # through `shows`); the value the browser sends with an event may lag behind it, a chunk or a
    # whole answer that was on its way, and must not wind the chat back
    latest: list[dict] = field(default_factory=list)

    def shows(self, history: list[dict]) -> list[dict]:
        """`history` is what the browser is sent now."""
        self.latest = history
        return history

    def chat(self, sent: list[dict] | None) -> list[dict]:
        """The conversation an event works on: the browser's, unless the server has sent more of it."""
        sent = [ui_chats.plain(m) for m in sent or []]
        return self.latest if ui_chats.leads(self.latest, sent) else sent

    def shown(self) -> str:
        """The queued messages as the page shows them above the input box."""
        if not self.queue:
            return ""
        lines = [f"{i}. {' '.join(t.text.split())[:120]}" for i, t in enumerate(self.queue, 1)]
        return "**Queued** (sent when the current answer ends):\n\n" + "\n".join(lines)


@dataclass(frozen=True)
class Sampling:
    """The settings a page answer is asked with, as the browser sent them."""
    system_prompt: str
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int | float | None


def draw_seed(setting, fresh: bool) -> int:
    """The seed of one answer: the setting's, unless it asks for random or this is a regeneration."""
    try:
        fixed = int(setting)
    except (TypeError, ValueError):
        fixed = RANDOM_SEED
    return secrets.randbelow(2**31) if fresh or fixed < 0 else fixed


class Answerer:
    def __init__(self, client: EngineClient, gate: Gate, cfg: ServerConfig, metrics: Metrics | None):
        self.client, self.gate, self.cfg, self.metrics = client, gate, cfg, metrics
        self.chat_mode = gate.chat_format is not None

    async def answer(self, message: str, history: list[dict], s: Sampling, seed: int | None = None,
                     rate: Rate | None = None) -> AsyncIterator[tuple[str, str]]:
        """(answer so far, stats line) while the answer streams; problems become a ⚠️ answer."""
        rate = rate or Rate()
        try:
            message = message if isinstance(message, str) else ""
            if self.chat_mode:
                ids = await self.gate.encode_dialog(page_dialog(message, history or [], s.system_prompt or ""),
                                                    "message")
            elif not message.strip():
                raise ApiError(400, "the message is empty: type a question first")
            else:
                ids = await self.gate.encode(message, "message")
            params = replace(self.gate.page_params(s.temperature, s.top_p, s.max_new_tokens, self.cfg.page), seed=seed)
            job = self.gate.job(ids, params, "message")
            sub = self.client.submit(job.prompt_ids, job.params)
        except (ApiError, QueueFull) as e:
            why = str(e)
            if "context" in why and history:
                why += " (or press New chat to start a new conversation)"
            gr.Warning(why)
            yield f"{WARNING} {why}", ""
            return
        except RuntimeError as e:  # the model stopped serving
            yield f"{WARNING} {e}", ""
            return
        text, rate.prompt_tokens = "", len(job.prompt_ids)
        try:
            events = self.metrics.track(sub, "page", len(job.prompt_ids)) if self.metrics else sub
            async for ev in events:  # Stop cancels this task, and so the request (finally: close)
                text += ev.text if ev.finish_reason != "error" else f"{WARNING} {ev.error}"
                yield text, rate.line(ev)
        except RuntimeError as e:  # the model stopped serving
            yield f"{text}\n\n{WARNING} {e}", ""
        finally:
            sub.close()

    async def drain(self, history: list[dict], inbox: Inbox, store: dict, s: Sampling):
        """Answer the tab's queued messages in turn, each appended to the chat with its answer and a
        stats note; yields (chat, stats line, queue shown, store), the store only once an answer
        is whole. A second drain while one runs leaves everything to the first."""
        if inbox.busy is not None:
            yield gr.skip(), gr.skip(), inbox.shown(), gr.skip()
            return
        inbox.busy = token = secrets.token_hex(4)
        # a drain started as the last one ended gets the chat as the browser had it then, which
        # may lack that last answer
        history = inbox.chat(history)
        try:
            while inbox.queue and inbox.busy == token:
                turn = inbox.queue.pop(0)
                seed = draw_seed(s.seed, turn.fresh_seed)
                before, rate, text, line = history, Rate(), "", ""
                history = before + [{"role": "user", "content": turn.text}]
                yield inbox.shows(history), "", inbox.shown(), gr.skip()
                async for text, line in self.answer(turn.text, before, s, seed, rate):
                    yield inbox.shows(history + [{"role": "assistant", "content": text}]), line, gr.skip(), gr.skip()
                history = history + [{"role": "assistant", "content": text}]
                if line:  # a refused question gets no stats note
                    history.append(ui_chats.stats_message(line.replace("**", ""), self.details(rate, s, seed)))
                store = ui_chats.save(store, history)
                yield inbox.shows(history), line, inbox.shown(), store
        finally:
            if inbox.busy == token:
                inbox.busy = None

    def details(self, rate: Rate, s: Sampling, seed: int) -> str:
        """The unfolded stats note: what the answer was asked with, and when its first token came."""
        greedy = float(s.temperature or 0) <= 0
        first = f" · first token after {rate.first_token_s:.2f} s" if rate.first_token_s is not None else ""
        return (f"{rate.prompt_tokens} prompt tokens ({rate.reused} reused){first} · temperature {float(s.temperature):g}"
                f" · top-p {float(s.top_p):g} · max new tokens {int(s.max_new_tokens)} · "
                + ("greedy, so no seed" if greedy else f"seed {seed}"))
