"""What the Responses and Messages fronts (serve.responses, serve.messages) share on top of the
chat route (serve.openai): both turn their body into a dialog, tools in chat's shape and a
response format, hand those to OpenAIApi.dialog_job (the chat rules, the gate), submit one
choice, and read its answer whole or as it streams. Only the translation and the framing are
theirs; the checks, the engine request, the tool parsing and the stream loop are the chat route's.
"""
from __future__ import annotations

import json
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import AsyncIterator

from fastapi import Request

from ..engine.engine import TokenEvent
from ..engine.sampler import SamplingParams
from ..text.chat_format import Message
from ..text.tool_format import ToolCallStream
from .errors import ApiError
from .openai import Answer, Choice, OpenAIApi, chat_message
from .sse import answer_events, until_disconnect
from .tools import ToolReader


async def submit_dialog(api: OpenAIApi, endpoint: str, dialog: list[Message], params: SamplingParams, tools,
                        tool_choice, response_format, spelling: dict[str, str],
                        parallel: bool | None = None) -> tuple[Choice, list]:
    """Check and submit a dialog as one choice; a 400 names the field as this endpoint spells it
    (`spelling`: chat's name -> the endpoint's). `parallel`: chat's parallel_tool_calls."""
    try:
        job, parse = await api.dialog_job(dialog, params, tools, tool_choice, response_format, parallel=parallel)
    except ApiError as e:
        raise respelled(e, spelling) from None
    choice = Choice(0, job, 0, tool_calls=parse)
    return choice, api.submit([choice], endpoint)


def respelled(e: ApiError, spelling: dict[str, str]) -> ApiError:
    """The same error naming the field the endpoint's way (chat's `max_tokens` is `max_output_tokens`
    in a Responses body): its param, and its message where it starts with the name."""
    old = e.info.param
    new = spelling.get(old) if old else None
    if new is None:
        return e
    message = e.info.message
    if message.startswith(old):
        message = new + message[len(old):]
    out = ApiError(e.status, message, param=new, type=e.info.type, code=e.info.code, headers=e.headers)
    return out


@dataclass
class WholeAnswer(Answer):
    """An Answer that keeps its token ids too (which stop string ended it: matched_stop)."""
    ids: list[int] = field(default_factory=list)
    streamed_calls: list[dict] | None = None  # a streamed answer's calls as its scanner read them

    def add(self, ev: TokenEvent) -> None:
        super().add(ev)
        if ev.token_id is not None:
            self.ids.append(ev.token_id)


async def whole_answer(api: OpenAIApi, subs: list, request: Request) -> WholeAnswer:
    """The answer of a request not streamed; a failure is its ApiError, a client gone a 499."""
    async def last() -> WholeAnswer:
        async with aclosing(answer_steps(api, subs, request)) as steps:
            async for step in steps:
                if isinstance(step, ApiError):
                    raise step
                if isinstance(step, WholeAnswer):
                    return step
        raise ApiError(499, "the client closed the connection")

    return await until_disconnect(request, last())


async def answer_steps(api: OpenAIApi, subs: list, request: Request,
                       scanner: ToolCallStream | None = None) -> AsyncIterator:
    """One choice's answer as the fronts frame it, in chat's stream deltas: ("content", text) as it
    comes; with tools offered, the text goes through `scanner` (ToolReader.stream(), the scanner
    chat's stream reads calls with), so a call comes as ("call", index, id, name) and then
    ("arguments", index, fragment)s as generated. None for a keep-alive; an ApiError when the
    request failed (then nothing more); last, the WholeAnswer (not when the client left first)."""
    whole = WholeAnswer()
    async with aclosing(answer_events(api, subs, request)) as events:
        async for _, ev in events:
            if ev is None or isinstance(ev, ApiError):
                yield ev
                if ev is not None:
                    return
                continue
            whole.add(ev)
            if scanner is None:
                if ev.text:
                    yield ("content", ev.text)
                continue
            for delta in scanner.feed(ev.text) + (scanner.finish() if ev.finished else []):
                yield delta
    if whole.finish_reason is not None:
        whole.streamed_calls = None if scanner is None else scanner.calls
        yield whole


def answer_calls(answer: WholeAnswer, reader: ToolReader | None) -> tuple[list[dict] | None, str]:
    """The answer's tool calls (None: it is text) and text. A streamed answer is what its deltas
    said (the calls' ids went out already; a call cut by max_tokens stays a call, as in chat's
    stream); a whole one is parsed as chat parses it (a call only if the answer ended by itself)."""
    if answer.streamed_calls is not None:
        return answer.streamed_calls or None, "" if answer.streamed_calls else "".join(answer.text)
    msg, _ = chat_message(answer, reader)
    return msg.tool_calls, msg.content or ""


def refuse_unhonoured(body: dict, refused: dict[str, tuple], where: str = "") -> None:
    """A 400 naming the first field of `body` that asks for what this server cannot do: a field in
    `refused` holding anything but one of its neutral values (None is always neutral)."""
    for name, neutral in refused.items():
        v = body.get(name)
        if v is None or any(type(v) is type(x) and v == x for x in neutral):
            continue
        raise ApiError(400, f"{where}{name}: {json.dumps(v)[:80]} is not supported by this server", param=where + name)


def parts_text(content, field: str, text_types: tuple[str, ...]) -> str:
    """A message's content (a text, or a list of parts) as one text; a part of any other type
    (image, file, audio, document) is a 400 naming it."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiError(400, f"{field}: expected a text or a list of content parts", param=field)
    out = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in text_types or not isinstance(part.get("text"), str):
            raise ApiError(400, f"{field}.{j}.type: {kind!r} parts are not supported: this server takes text "
                                f"({', '.join(text_types)})", param=f"{field}.{j}.type")
        out.append(part["text"])
    return "".join(out)


def event(name: str, payload: dict) -> str:
    """One server-sent event with its name on the `event:` line, as both APIs stream."""
    return f"event: {name}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"


def matched_stop(tokenizer, answer_ids: list[int], visible: str, stops: list[str]) -> str | None:
    """Which stop string ended an answer: the text shown stops where the stop string starts, so the
    decoded ids go on with it (the earliest, as rank 0's matcher stops at the earliest)."""
    rest = tokenizer.decode(answer_ids)[len(visible):] if stops else ""
    hits = [(rest.find(s), s) for s in stops if s and s in rest]
    return min(hits)[1] if hits else None
