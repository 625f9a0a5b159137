"""Tool calling through the model's own chat template (`tools` is handed to the template, as
transformers' apply_chat_template does), and Llama 3.1's JSON tool calls read back out of the
answer: `{"name": "f", "parameters": {...}}` (optionally after <|python_tag|>, several joined by
";"), as Meta's prompt format documents and vLLM's llama3_json parser reads them.

`tool_choice` "auto" lets the model decide; "none" hides the tools; "required" or a named function
forces a call by a grammar over the calls' JSON (engine.grammar), so the answer is always one.
"""
from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

from ..engine.grammar import GrammarError, json_schema_grammar
from .errors import ApiError

PYTHON_TAG = "<|python_tag|>"


@dataclass
class ToolUse:
    """What a chat request's tools mean for its prompt, its sampling and its answer."""
    tools: list[dict] | None  # for the chat template (None: no tools)
    grammar: str | None  # a forced call's grammar
    parse: bool  # read tool calls out of the answer


def tool_use(tools, tool_choice) -> ToolUse:
    """Check `tools` and `tool_choice` (400s name them) and say what they ask for."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise ApiError(400, "tool_choice needs tools", param="tool_choice")
        return ToolUse(None, None, False)
    if not isinstance(tools, list) or not all(
            isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str) for t in tools):
        raise ApiError(400, "tools must be a list of {\"type\": \"function\", \"function\": {\"name\": ..., "
                            "\"parameters\": {...}}}", param="tools")
    names = {t["function"]["name"]: t["function"] for t in tools}
    if tool_choice in (None, "auto"):
        return ToolUse(tools, None, True)
    if tool_choice == "none":
        return ToolUse(None, None, False)
    if tool_choice == "required":
        forced = list(names.values())
    elif isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict) \
            and tool_choice["function"].get("name") in names:
        forced = [names[tool_choice["function"]["name"]]]
    else:
        raise ApiError(400, "tool_choice must be \"auto\", \"none\", \"required\" or {\"type\": \"function\", "
                            "\"function\": {\"name\": <one of the tools>}}", param="tool_choice")
    calls = [{"type": "object", "properties": {"name": {"const": f["name"]},
                                               "parameters": f.get("parameters") or {"type": "object"}},
              "required": ["name", "parameters"], "additionalProperties": False} for f in forced]
    try:
        grammar = json_schema_grammar(calls[0] if len(calls) == 1 else {"anyOf": calls})
    except GrammarError as e:
        raise ApiError(400, f"tools: a function's parameters cannot be enforced: {e}", param="tools") from None
    return ToolUse(tools, grammar, True)


def parse_tool_calls(text: str) -> list[dict] | None:
    """Llama 3.1 JSON tool calls in an answer, in OpenAI's shape; None when the answer is text."""
    body = text.strip()
    if body.startswith(PYTHON_TAG):
        body = body[len(PYTHON_TAG):].strip()
    if not body.startswith("{"):
        return None
    calls, decoder, at = [], json.JSONDecoder(), 0
    while at < len(body):
        try:
            obj, end = decoder.raw_decode(body, at)
        except ValueError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        args = obj.get("parameters", obj.get("arguments", {}))
        calls.append({"id": f"call_{secrets.token_hex(12)}", "type": "function",
                      "function": {"name": obj["name"],
                                   "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}})
        at = end
        while at < len(body) and body[at] in " \t\r\n;":
            at += 1
    return calls or None
