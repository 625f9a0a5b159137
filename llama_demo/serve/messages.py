"""Anthropic's Messages API: `POST /v1/messages` and `POST /v1/messages/count_tokens`.

The body is translated into what a chat request holds and run by the chat rules
(OpenAIApi.dialog_job through serve.fronts): `system` and the messages' text blocks make the
dialog; an assistant's `tool_use` blocks are its tool calls and a user's `tool_result` blocks the
tools' answers; `tools` (`input_schema`) and `tool_choice` (auto / any / tool / none) become chat's
tools and tool_choice, so a forced call is the same grammar; `output_config.format` is chat's
json_schema response format. Errors take Anthropic's shape (serve.errors, by path); the API key
may come as `x-api-key` (serve.auth). Images, documents, thinking and the other features this
server lacks are a 400 naming the field.
"""
from __future__ import annotations

import json
import secrets
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict

from ..config import API_SAMPLING
from ..engine.sampler import SamplingParams
from ..text.chat_format import Message
from .errors import ApiError, anthropic_error
from .fronts import WholeAnswer, answer_calls, answer_steps, event, matched_stop, parts_text, refuse_unhonoured, \
    respelled, submit_dialog, whole_answer
from .openai import OpenAIApi
from .sse import EventStream
from .tools import ToolReader

ENDPOINT = "/v1/messages"
SPELLING = {"stop": "stop_sequences", "response_format": "output_config.format"}
# fields asking for what this server cannot do, with the values that ask for nothing
REFUSED: dict[str, tuple] = {
    "thinking": ({"type": "disabled"},), "container": (), "diagnostics": (), "inference_geo": (),
    "speed": ("standard",), "service_tier": ("auto", "standard_only"), "mcp_servers": ([],),
    "context_management": (),
}
BLOCKS = "text, tool_use (assistant) and tool_result (user) blocks"


class CountTokensRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None  # any name: this server runs one model
    messages: list[dict]
    system: str | list[dict] | None = None
    tools: list[dict] | None = None
    tool_choice: dict | None = None
    output_config: dict | None = None  # format: json_schema (a grammar); effort refused
    # labels: the prefix reuse that cache_control asks for is automatic here
    cache_control: Any = None
    user_profile_id: Any = None
    workspace_id: Any = None
    # REFUSED unless neutral
    thinking: Any = None
    speed: Any = None
    context_management: Any = None
    mcp_servers: Any = None


class MessagesRequest(CountTokensRequest):
    max_tokens: int  # required, as Anthropic's API has it
    stop_sequences: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stream: bool | None = None
    metadata: dict | None = None  # a label ({"user_id": ...})
    container: Any = None
    diagnostics: Any = None
    inference_geo: Any = None
    service_tier: Any = None


def _id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


# --- request -> dialog, tools, format -------------------------------------------------------------


def messages_dialog(system, messages: list[dict]) -> list[Message]:
    dialog = [Message("system", parts_text(system, "system", ("text",)))] if system else []
    for i, m in enumerate(messages):
        where, role, content = f"messages.{i}", m.get("role"), m.get("content")
        if role not in ("user", "assistant"):
            raise ApiError(400, f"{where}.role: {role!r}: expected user or assistant", param=f"{where}.role")
        if isinstance(content, str):
            dialog.append(Message(role, content))
            continue
        if not isinstance(content, list):
            raise ApiError(400, f"{where}.content: expected a text or a list of blocks", param=f"{where}.content")
        texts, calls, results = [], [], []
        for j, b in enumerate(content):
            kind = b.get("type") if isinstance(b, dict) else None
            at = f"{where}.content.{j}"
            if kind == "text" and isinstance(b.get("text"), str):
                texts.append(b["text"])
            elif kind == "tool_use" and role == "assistant" and isinstance(b.get("name"), str):
                calls.append({"id": str(b.get("id")), "type": "function",
                              "function": {"name": b["name"], "arguments": json.dumps(b.get("input") or {})}})
            elif kind == "tool_result" and role == "user":
                text = parts_text(b.get("content") or "", f"{at}.content", ("text",))
                results.append(Message("tool", f"Error: {text}" if b.get("is_error") else text,
                                       tool_call_id=b.get("tool_use_id")))
            else:
                raise ApiError(400, f"{at}.type: {kind!r} blocks are not supported in a {role} message: this server "
                                    f"takes {BLOCKS} (no images, documents or thinking)", param=f"{at}.type")
        if role == "assistant":
            dialog.append(Message("assistant", "".join(texts), tool_calls=calls or None))
        else:  # the tools' answers first: they answer the turn before this one
            dialog += results
            if texts or not results:
                dialog.append(Message("user", "".join(texts)))
    if dialog and dialog[-1].role == "assistant":
        raise ApiError(400, "messages: a last assistant message (a prefill the answer continues) is not supported: "
                            "end with a user message", param="messages")
    return dialog


def chat_tools(tools: list[dict] | None) -> list[dict] | None:
    if tools is None:
        return None
    out = []
    for i, t in enumerate(tools):
        if t.get("type") not in (None, "custom") or not isinstance(t.get("name"), str):
            raise ApiError(400, f"tools.{i}.type: {t.get('type')!r} tools are not supported (no server tools: web "
                                "search, code execution, computer use, bash, text editor): give name, description "
                                "and input_schema", param=f"tools.{i}.type")
        out.append({"type": "function", "function": {"name": t["name"], "description": t.get("description") or "",
                                                     "parameters": t.get("input_schema") or {"type": "object"}}})
    return out


def chat_tool_choice(choice: dict | None):
    """auto / any / tool / none -> chat's "auto" / "required" / a named function / "none"
    (disable_parallel_tool_use is chat's parallel_tool_calls: false)."""
    if choice is None:
        return None
    kind = choice.get("type")
    if kind == "tool" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    if kind in ("auto", "any", "none"):
        return {"auto": "auto", "any": "required", "none": "none"}[kind]
    raise ApiError(400, "tool_choice: expected {\"type\": \"auto\" | \"any\" | \"none\"} or {\"type\": \"tool\", "
                        "\"name\": ...}", param="tool_choice")


def response_format(output_config: dict | None) -> dict | None:
    config = dict(output_config or {})
    refuse_unhonoured(config, {"effort": ()}, "output_config.")
    fmt = config.pop("format", None)
    config.pop("effort", None)
    if config:
        raise ApiError(400, f"output_config.{next(iter(config))}: unknown field", param="output_config")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        raise ApiError(400, "output_config.format: expected {\"type\": \"json_schema\", \"schema\": {...}}",
                       param="output_config.format")
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt.get("schema")}}


async def prompt_of(api: OpenAIApi, req: CountTokensRequest) -> tuple[list[Message], list | None, Any, Any]:
    refuse_unhonoured(req.model_dump(), REFUSED)
    return (messages_dialog(req.system, req.messages), chat_tools(req.tools), chat_tool_choice(req.tool_choice),
            response_format(req.output_config))


# --- answer -> message ----------------------------------------------------------------------------


def content_blocks(answer: WholeAnswer, reader: ToolReader | None, stops: list[str],
                   tokenizer) -> tuple[list[dict], str, str | None]:
    """The answer's content blocks, stop_reason and stop_sequence."""
    calls, text = answer_calls(answer, reader)
    if calls:
        blocks = [{"type": "tool_use", "id": tool_use_id(c["id"]), "name": c["function"]["name"],
                   "input": _arguments(c["function"]["arguments"])} for c in calls]
        return blocks, "max_tokens" if answer.finish_reason == "length" else "tool_use", None
    if answer.finish_reason == "length":
        return [{"type": "text", "text": text}], "max_tokens", None
    stop = matched_stop(tokenizer, answer.ids, text, stops)
    return [{"type": "text", "text": text}], "end_turn" if stop is None else "stop_sequence", stop


def tool_use_id(call_id: str) -> str:
    """A tool_use block's id from chat's call id (the same random part)."""
    return "toolu_" + call_id.partition("_")[2]


def _arguments(arguments: str) -> dict:
    try:
        value = json.loads(arguments)
    except ValueError:
        return {"arguments": arguments}  # not JSON: still the model's words, under a key
    return value if isinstance(value, dict) else {"arguments": value}


def usage(api: OpenAIApi, choice, answer: WholeAnswer | None = None) -> dict:
    """Anthropic's usage: input_tokens are those computed, cache_read_input_tokens those found in
    the KV cache (the engine's prefix reuse); the two add up to the prompt."""
    u = api.usage([choice], [answer] if answer else None, reused=[0])
    cached = u.prompt_tokens_details.cached_tokens
    return {"input_tokens": u.prompt_tokens - cached, "output_tokens": u.completion_tokens,
            "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}


# --- routes ---------------------------------------------------------------------------------------


def messages_router(api: OpenAIApi, dependencies: list) -> APIRouter:
    router = APIRouter(prefix="/v1", dependencies=dependencies)

    @router.post("/messages")
    async def create(req: MessagesRequest, request: Request):
        dialog, tools, tool_choice, fmt = await prompt_of(api, req)
        stops = list(req.stop_sequences or [])
        params = SamplingParams(
            temperature=API_SAMPLING.temperature if req.temperature is None else req.temperature,
            top_p=API_SAMPLING.top_p if req.top_p is None else req.top_p, top_k=req.top_k or 0,
            max_new_tokens=req.max_tokens, stop=stops)
        one = (req.tool_choice or {}).get("disable_parallel_tool_use")
        choice, subs = await submit_dialog(api, ENDPOINT, dialog, params, tools, tool_choice, fmt, SPELLING,
                                           parallel=None if one is None else not one)
        message = {"id": _id("msg"), "type": "message", "role": "assistant", "model": choice.job.model,
                   "content": [], "stop_reason": None, "stop_sequence": None}

        def finish(answer: WholeAnswer) -> dict:
            blocks, reason, stop = content_blocks(answer, choice.tool_calls, stops, api.tokenizer)
            return {**message, "content": blocks, "stop_reason": reason, "stop_sequence": stop,
                    "usage": usage(api, choice, answer)}

        if not req.stream:
            return finish(await whole_answer(api, subs, request))
        opening = {**message, "usage": {**usage(api, choice), "output_tokens": 0}}
        return EventStream(stream_events(api, subs, request, choice.tool_calls, finish, opening),
                           lambda: [s.close() for s in subs])

    @router.post("/messages/count_tokens")
    async def count_tokens(req: CountTokensRequest):
        dialog, tools, tool_choice, _ = await prompt_of(api, req)
        try:
            ids, _ = await api.dialog_ids(dialog, tools, tool_choice)
        except ApiError as e:
            raise respelled(e, SPELLING) from None
        return {"input_tokens": len(ids)}

    return router


async def stream_events(api: OpenAIApi, subs: list, request: Request, reader: ToolReader | None, finish,
                        opening: dict):
    """Anthropic's event sequence. Text streams as it comes; with tools offered the answer goes
    through chat's call scanner (ToolReader.stream()), so a tool_use block starts once its name is
    read and its input streams as `input_json_delta` fragments."""
    yield event("message_start", {"type": "message_start", "message": opening})
    blocks: list[str] = []  # the kind of each block started, in order
    if reader is None:  # no tools: the answer is one text block, started before its first token
        yield _start(blocks, {"type": "text", "text": ""})
    yield event("ping", {"type": "ping"})
    async with aclosing(answer_steps(api, subs, request, reader.stream() if reader else None)) as steps:
        async for step in steps:
            if step is None:
                yield event("ping", {"type": "ping"})  # Anthropic's keep-alive
            elif isinstance(step, ApiError):  # the status went out already: an error event ends the stream
                yield event("error", anthropic_error(step))
            elif isinstance(step, WholeAnswer):
                done = finish(step)
                for block in done["content"][len(blocks):]:  # never streamed (an empty text answer)
                    yield _start(blocks, {**block, "text": ""} if block["type"] == "text" else {**block, "input": {}})
                    if block.get("text"):
                        yield _delta(len(blocks) - 1, {"type": "text_delta", "text": block["text"]})
                yield event("content_block_stop", {"type": "content_block_stop", "index": len(blocks) - 1})
                yield event("message_delta", {"type": "message_delta", "usage": done["usage"], "delta": {
                    "stop_reason": done["stop_reason"], "stop_sequence": done["stop_sequence"]}})
                yield event("message_stop", {"type": "message_stop"})
            elif step[0] == "content":
                if not blocks:
                    yield _start(blocks, {"type": "text", "text": ""})
                yield _delta(len(blocks) - 1, {"type": "text_delta", "text": step[1]})
            elif step[0] == "call":  # ("call", index, id, name): a block is done when the next one starts
                if blocks:
                    yield event("content_block_stop", {"type": "content_block_stop", "index": len(blocks) - 1})
                yield _start(blocks, {"type": "tool_use", "id": tool_use_id(step[2]), "name": step[3], "input": {}})
            else:  # ("arguments", index, fragment): calls are the answer's only blocks
                yield _delta(step[1], {"type": "input_json_delta", "partial_json": step[2]})


def _start(blocks: list[str], block: dict) -> str:
    blocks.append(block["type"])
    return event("content_block_start", {"type": "content_block_start", "index": len(blocks) - 1,
                                         "content_block": block})


def _delta(index: int, delta: dict) -> str:
    return event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})
