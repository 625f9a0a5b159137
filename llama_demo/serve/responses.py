"""OpenAI's Responses API: `POST /v1/responses`, `GET` / `DELETE /v1/responses/{id}`.

A Responses body is translated into what a chat request holds (a dialog, function tools in chat's
shape, a response format) and run by the chat rules (OpenAIApi.dialog_job through serve.fronts):
the same gate, limits, 413 / 429, prefix reuse, grammar for structured output and forced calls,
and the same tool-call parsing. Only the wire shapes are this module's:

- input: a text, or items: role messages (text parts), and the `function_call` /
  `function_call_output` items a client sends back after a call (an assistant's tool call and
  the tool's answer in the dialog);
- output: a `message` item with `output_text`, or `function_call` items; `incomplete` with
  `incomplete_details` when max_output_tokens ran out;
- stream: the Responses event sequence, each event named on its `event:` line and numbered;
- store (default true): the answer kept (serve.response_store) for GET and previous_response_id,
  which continues that response's dialog (its instructions are not carried over, as OpenAI's are not).
Built-in tools, reasoning and other modalities are a 400 naming the field.
"""
from __future__ import annotations

import secrets
import time
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from ..config import API_SAMPLING
from ..engine.sampler import SamplingParams
from ..text.chat_format import Message
from . import protocol as p
from .errors import ApiError
from .fronts import WholeAnswer, answer_calls, answer_steps, event, parts_text, refuse_unhonoured, submit_dialog, \
    whole_answer
from .openai import OpenAIApi
from .sse import EventStream
from .response_store import ResponseStore
from .tools import ToolReader

ENDPOINT = "/v1/responses"
# chat's field -> this API's, for the 400s the chat rules raise
SPELLING = {"max_tokens": "max_output_tokens", "messages": "input", "response_format": "text.format"}
# fields asking for what this server cannot do, with the values that ask for nothing
REFUSED: dict[str, tuple] = {
    "background": (False,), "background_options": (), "access_programs": (), "context_management": (),
    "conversation": (), "image": (), "include": ([],), "max_tool_calls": (), "prompt": (), "reasoning": ({},),
    "top_logprobs": (0,), "truncation": ("disabled",),
    **{k: p.REFUSED[k] for k in ("service_tier", "moderation", "prompt_cache_retention", "prompt_cache_options")},
}
TEXT_PARTS = ("input_text", "output_text", "text")


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    input: str | list[dict] | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None  # None: as much as fits, up to the server's default (as chat)
    temperature: float | None = None
    top_p: float | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None  # false: at most one call (chat's)
    text: dict | None = None  # {"format": {...}, "verbosity": ...}
    stream: bool | None = None
    stream_options: dict | None = None  # include_obfuscation: we pad nothing
    store: bool | None = None  # None: true, as OpenAI's
    previous_response_id: str | None = None
    # labels (p.LABELS): metadata is echoed back
    metadata: dict[str, str] | None = None
    user: Any = None
    safety_identifier: Any = None
    prompt_cache_key: Any = None
    # REFUSED unless neutral
    background: Any = None
    background_options: Any = None
    access_programs: Any = None
    context_management: Any = None
    conversation: Any = None
    image: Any = None
    include: Any = None
    max_tool_calls: Any = None
    moderation: Any = None
    prompt: Any = None
    prompt_cache_options: Any = None
    prompt_cache_retention: Any = None
    reasoning: Any = None
    service_tier: Any = None
    top_logprobs: Any = None
    truncation: Any = None


def _id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


# --- request -> dialog, tools, format -------------------------------------------------------------


def input_dialog(items: str | list[dict]) -> list[Message]:
    """`input` as a dialog: role messages, and function_call / function_call_output items as an
    assistant's tool calls (consecutive calls are one assistant turn) and the tool's answers."""
    if isinstance(items, str):
        return [Message("user", items)]
    dialog: list[Message] = []
    for i, item in enumerate(items):
        where = f"input.{i}"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise ApiError(400, f"{where}.role: {role!r}: expected user, assistant, system or developer",
                               param=f"{where}.role")
            text = parts_text(item.get("content"), f"{where}.content", TEXT_PARTS)
            dialog.append(Message("system" if role == "developer" else role, text))
        elif kind == "function_call":
            _require(item, ("call_id", "name", "arguments"), where)
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            if dialog and dialog[-1].role == "assistant" and dialog[-1].tool_calls:
                dialog[-1].tool_calls.append(call)
            else:
                dialog.append(Message("assistant", "", tool_calls=[call]))
        elif kind == "function_call_output":
            _require(item, ("call_id", "output"), where)
            text = parts_text(item["output"], f"{where}.output", TEXT_PARTS)
            dialog.append(Message("tool", text, tool_call_id=item["call_id"]))
        else:
            raise ApiError(400, f"{where}.type: {kind!r} items are not supported: send messages, function_call "
                                "and function_call_output items", param=f"{where}.type")
    return dialog


def _require(item: dict, keys: tuple[str, ...], where: str) -> None:
    for k in keys:
        if not isinstance(item.get(k), str):
            raise ApiError(400, f"{where}.{k}: a {item.get('type')} item needs {k} (a string)", param=f"{where}.{k}")


def chat_tools(tools: list[dict] | None) -> list[dict] | None:
    """Responses' flat function tools -> chat's {"type": "function", "function": {...}}."""
    if tools is None:
        return None
    out = []
    for i, t in enumerate(tools):
        if t.get("type") != "function":
            raise ApiError(400, f"tools.{i}.type: {t.get('type')!r} tools are not supported (no built-in tools: web "
                                "search, file search, computer use, code interpreter, MCP): only \"function\"",
                           param=f"tools.{i}.type")
        out.append({"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters")
                                                     if t.get(k) is not None}})
    return out


def chat_tool_choice(choice):
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise ApiError(400, "tool_choice: expected \"auto\", \"none\", \"required\" or {\"type\": \"function\", "
                                "\"name\": ...} (no built-in tools, no allowed_tools)", param="tool_choice")
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


def response_format(text: dict | None) -> dict | None:
    """`text.format` -> chat's response_format (json_schema's fields one level down)."""
    text = dict(text or {})
    refuse_unhonoured(text, {"verbosity": ("medium",)}, "text.")
    fmt = text.pop("format", None)
    text.pop("verbosity", None)
    if text:
        raise ApiError(400, f"text.{next(iter(text))}: unknown field", param=f"text.{next(iter(text))}")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {k: v for k, v in fmt.items() if k != "type"}}
    return fmt


# --- answer -> output items, response -------------------------------------------------------------


def output_items(answer: WholeAnswer, reader: ToolReader | None) -> tuple[list[dict], list[Message]]:
    """The answer as output items, and as the assistant's turn of the stored dialog."""
    calls, text = answer_calls(answer, reader)
    status = "incomplete" if answer.finish_reason == "length" else "completed"
    if calls:
        items = [{"type": "function_call", "id": _id("fc"), "call_id": c["id"], "name": c["function"]["name"],
                  "arguments": c["function"]["arguments"], "status": status} for c in calls]
        return items, [Message("assistant", "", tool_calls=calls)]
    item = {"type": "message", "id": _id("msg"), "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}
    return [item], [Message("assistant", text)]


def response_object(rid: str, created: int, req: ResponsesRequest, params: SamplingParams, model: str,
                    status: str = "in_progress", output: list[dict] = (), usage: p.UsageInfo | None = None) -> dict:
    return {
        "id": rid, "object": "response", "created_at": created, "status": status, "model": model,
        "output": list(output), "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
        "temperature": params.temperature, "top_p": params.top_p, "tools": req.tools or [],
        "tool_choice": req.tool_choice or "auto", "parallel_tool_calls": req.parallel_tool_calls is not False,
        "text": {"format": (req.text or {}).get("format") or {"type": "text"}},
        "previous_response_id": req.previous_response_id, "store": req.store is not False,
        "metadata": req.metadata or {}, "user": req.user, "truncation": "disabled",
        "reasoning": {"effort": None, "summary": None}, "service_tier": "default",
        "usage": None if usage is None else {
            "input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
            "input_tokens_details": {"cached_tokens": usage.prompt_tokens_details.cached_tokens},
            "output_tokens_details": {"reasoning_tokens": 0}},
    }


# --- routes ---------------------------------------------------------------------------------------


def responses_router(api: OpenAIApi, dependencies: list, store: ResponseStore | None = None) -> APIRouter:
    router = APIRouter(prefix="/v1", dependencies=dependencies)
    store = store or ResponseStore()

    @router.post("/responses")
    async def create(req: ResponsesRequest, request: Request):
        refuse_unhonoured(req.model_dump(), REFUSED)
        if req.input is None:
            raise ApiError(400, "input: required (a text or a list of items)", param="input")
        dialog = input_dialog(req.input)
        if req.previous_response_id is not None:
            dialog = store.get(req.previous_response_id, "previous_response_id").dialog + dialog
        prompt = ([Message("system", req.instructions)] if req.instructions else []) + dialog
        params = SamplingParams(
            temperature=API_SAMPLING.temperature if req.temperature is None else req.temperature,
            top_p=API_SAMPLING.top_p if req.top_p is None else req.top_p,
            max_new_tokens=api.cfg.page.max_new_tokens if req.max_output_tokens is None else req.max_output_tokens)
        choice, subs = await submit_dialog(api, ENDPOINT, prompt, params, chat_tools(req.tools),
                                           chat_tool_choice(req.tool_choice), response_format(req.text), SPELLING,
                                           parallel=req.parallel_tool_calls)
        rid, created, model = _id("resp"), int(time.time()), choice.job.model

        def finish(answer: WholeAnswer) -> dict:
            items, turn = output_items(answer, choice.tool_calls)
            status = "incomplete" if answer.finish_reason == "length" else "completed"
            done = response_object(rid, created, req, choice.job.params, model, status, items,
                                   api.usage([choice], [answer]))
            if req.store is not False:
                store.put(done, dialog + turn)
            return done

        if not req.stream:
            return finish(await whole_answer(api, subs, request))
        return EventStream(stream_events(api, subs, request, choice.tool_calls, finish,
                                         response_object(rid, created, req, choice.job.params, model)),
                           lambda: [s.close() for s in subs])

    @router.get("/responses/{rid}")
    async def retrieve(rid: str):
        return store.get(rid).response

    @router.delete("/responses/{rid}")
    async def delete(rid: str):
        store.delete(rid)
        return JSONResponse({"id": rid, "object": "response.deleted", "deleted": True})

    return router


async def stream_events(api: OpenAIApi, subs: list, request: Request, reader: ToolReader | None, finish,
                        opening: dict):
    """The Responses event sequence. Text streams as it comes; with tools offered the answer goes
    through chat's call scanner (ToolReader.stream()), so a call's item opens once its name is read
    and its arguments stream as `response.function_call_arguments.delta` fragments."""
    frames = _Frames()
    yield frames.send("response.created", response=opening)
    yield frames.send("response.in_progress", response=opening)
    if reader is None:  # no tools: the answer is a message, announced before its first token
        yield "".join(frames.open_message())
    async with aclosing(answer_steps(api, subs, request, reader.stream() if reader else None)) as steps:
        async for step in steps:
            if step is None:
                yield ": keep-alive\n\n"
            elif isinstance(step, ApiError):  # the status went out already: an error event ends the stream
                yield frames.send("error", code=step.info.code, message=step.info.message, param=step.info.param)
                return
            elif isinstance(step, tuple):
                yield "".join(frames.delta(step))
            else:
                yield "".join(frames.close(finish(step)))


class _Frames:
    """One streamed answer's events, numbered: a message item opened at its first text, a
    function_call item at each call's name (the one before it closed then), all closed with the
    final response's items (whose ids are the ones announced)."""

    def __init__(self):
        self.seq = 0
        self.opened: list[dict] = []  # output items announced, in order
        self.closed = 0  # how many of them are done

    def send(self, kind: str, **fields) -> str:
        self.seq += 1
        return event(kind, {"type": kind, "sequence_number": self.seq - 1, **fields})

    def open_message(self) -> list[str]:
        item = {"type": "message", "id": _id("msg"), "status": "in_progress", "role": "assistant", "content": []}
        self.opened.append(item)
        at = len(self.opened) - 1
        return [self.send("response.output_item.added", output_index=at, item=item),
                self.send("response.content_part.added", item_id=item["id"], output_index=at, content_index=0,
                          part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})]

    def delta(self, d: tuple) -> list[str]:
        out = []
        if d[0] == "content":
            if not self.opened:
                out += self.open_message()
            at = len(self.opened) - 1
            out.append(self.send("response.output_text.delta", item_id=self.opened[at]["id"], output_index=at,
                                 content_index=0, delta=d[1], logprobs=[]))
        elif d[0] == "call":
            out += self._close_upto(len(self.opened))  # OpenAI's items complete in order
            item = {"type": "function_call", "id": _id("fc"), "call_id": d[2], "name": d[3], "arguments": "",
                    "status": "in_progress"}
            self.opened.append(item)
            out.append(self.send("response.output_item.added", output_index=len(self.opened) - 1, item=item))
        else:  # ("arguments", index, fragment): calls are the answer's only items, index is the output's
            item = self.opened[d[1]]
            item["arguments"] += d[2]
            out.append(self.send("response.function_call_arguments.delta", item_id=item["id"], output_index=d[1],
                                 delta=d[2]))
        return out

    def _close_upto(self, n: int, final: list[dict] | None = None) -> list[str]:
        """Close the announced items before index n, each as its final item when given."""
        out = []
        for i in range(self.closed, n):
            item = final[i] if final else {**self.opened[i], "status": "completed"}
            if item["type"] == "function_call":
                out.append(self.send("response.function_call_arguments.done", item_id=item["id"], output_index=i,
                                     name=item["name"], arguments=item["arguments"]))
            else:
                part = item["content"][0]
                where = {"item_id": item["id"], "output_index": i, "content_index": 0}
                out += [self.send("response.output_text.done", **where, text=part["text"], logprobs=[]),
                        self.send("response.content_part.done", **where, part=part)]
            out.append(self.send("response.output_item.done", output_index=i, item=item))
        self.closed = max(self.closed, n)
        return out

    def close(self, done: dict) -> list[str]:
        """The answer is whole: every item done (one never announced, such as an empty message,
        is announced first), then response.completed or .incomplete."""
        out, final = [], done["output"]
        for item, announced in zip(final, self.opened):
            item["id"] = announced["id"]
        for i in range(len(self.opened), len(final)):
            if final[i]["type"] == "message":
                out += self.open_message()
                if final[i]["content"][0]["text"]:  # never streamed: a text answer has its deltas
                    out.append(self.send("response.output_text.delta", item_id=self.opened[i]["id"], output_index=i,
                                         content_index=0, delta=final[i]["content"][0]["text"], logprobs=[]))
            else:  # a call never streamed: not expected (streamed answers' calls are the scanner's)
                self.opened.append({**final[i], "arguments": ""})
                out.append(self.send("response.output_item.added", output_index=i, item=self.opened[i]))
        out += self._close_upto(len(final), final)
        return out + [self.send(f"response.{done['status']}", response=done)]
