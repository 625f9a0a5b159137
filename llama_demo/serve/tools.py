"""Tool calling for every chat format: the API's `tools`, `tool_choice` and `parallel_tool_calls`
checked (400s name them) and turned into what the prompt shows, what the grammar enforces and how
the answer is read. The formats themselves (prompt text, call syntax, parsing, streaming) live in
text/tool_format.py: Meta's JSON tool calls for Llama 3 folders, the model's own template where
it takes `tools`, and a generic format for every other model (Llama 1/2, SmolLM2's template).

`tool_choice` "none" hides the tools; "auto" lets the model decide (with the generic format a
grammar admits either plain text or a well-formed call); "required" or a named function forces a
call by a grammar over the call's JSON, so the answer is always one. `parallel_tool_calls: false`
allows exactly one call (the grammar's maxItems, or the first call read).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from ..engine.grammar import GrammarError, json_schema_grammar
from ..text.chat_format import ChatFormat
from ..text.tool_format import GenericTools, MetaJsonTools, ToolCallStream, ToolFormat, tool_format_for
from .errors import ApiError


@dataclass
class ToolReader:
    """How to read tool calls out of one answer (truthy: read them)."""
    fmt: ToolFormat
    parallel: bool = True

    def parse(self, text: str) -> list[dict] | None:
        calls = self.fmt.parse(text)
        return calls[:1] if calls and not self.parallel else calls

    def stream(self) -> ToolCallStream:
        return ToolCallStream(self.fmt, self.parallel)


@dataclass
class ToolUse:
    """What a chat request's tools mean for its prompt, its sampling and its answer."""
    tools: list[dict] | None  # shown to the model (None: no tools)
    grammar: str | None  # a forced call's grammar, or generic auto's text-or-call grammar
    parse: ToolReader | None  # read tool calls out of the answer


def tool_use(tools, tool_choice, chat_format: ChatFormat | None = None, parallel: bool | None = None) -> ToolUse:
    """Check `tools`, `tool_choice` and `parallel_tool_calls` and say what they ask for."""
    if parallel is not None and not isinstance(parallel, bool):
        raise ApiError(400, "parallel_tool_calls must be true or false", param="parallel_tool_calls")
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise ApiError(400, "tool_choice needs tools", param="tool_choice")
        return ToolUse(None, None, None)
    if not isinstance(tools, list) or not all(
            isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str) for t in tools):
        raise ApiError(400, "tools must be a list of {\"type\": \"function\", \"function\": {\"name\": ..., "
                            "\"parameters\": {...}}}", param="tools")
    fmt = tool_format_for(chat_format)[0] if chat_format is not None else MetaJsonTools()
    reader = ToolReader(fmt, parallel is not False)
    names = {t["function"]["name"]: t["function"] for t in tools}
    if tool_choice == "none":
        return ToolUse(None, None, None)
    if tool_choice in (None, "auto"):
        forced = None
    elif tool_choice == "required":
        forced = list(names.values())
    elif isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict) \
            and tool_choice["function"].get("name") in names:
        forced = [names[tool_choice["function"]["name"]]]
    else:
        raise ApiError(400, "tool_choice must be \"auto\", \"none\", \"required\" or {\"type\": \"function\", "
                            "\"function\": {\"name\": <one of the tools>}}", param="tool_choice")
    if forced is None and not isinstance(fmt, GenericTools):
        return ToolUse(tools, None, reader)  # Meta's models and native templates know their own call syntax
    schema = fmt.call_schema(forced or list(names.values()), reader.parallel)
    try:
        if forced is not None:
            grammar = json_schema_grammar(schema)
        else:  # generic auto: plain text (not opening with "{") or a well-formed call
            import llguidance

            grammar = llguidance.LLMatcher.grammar_from_lark(
                f"start: call | TEXT\ncall: %json {json.dumps(schema)}\nTEXT: /[ \\t\\n]*[^{{ \\t\\n](?s:.*)/\n")
    except (GrammarError, ValueError) as e:
        raise ApiError(400, f"tools: a function's parameters cannot be enforced: {e}", param="tools") from None
    return ToolUse(tools, grammar, reader)


def parse_tool_calls(text: str, reader: ToolReader | bool = True) -> list[dict] | None:
    """Tool calls in an answer, in OpenAI's shape; None when the answer is text."""
    if not reader:
        return None
    return (reader if isinstance(reader, ToolReader) else ToolReader(MetaJsonTools())).parse(text)
