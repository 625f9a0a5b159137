"""How a chat format shows tools to the model and how its answer calls them: one ToolFormat per way.

- MetaJsonTools: Meta's Llama 3.1 / 3.2 / 3.3 JSON custom tool calling (llama-models'
  llama3_1/prompt_format.md, "JSON based tool calling"): "Environment: ipython" and the dates in
  the system message, the functions in JSON in a user message of their own, the model answering
  `{"type": "function", "name": ..., "parameters": {...}}` (after <|python_tag|>, ending with
  <|eom_id|>); decoded as llama-models' ChatFormat.decode_assistant_message decodes custom calls
  (a JSON object with "name", `<function=NAME>{...}</function>`, a Python list of calls).
- TemplateJsonTools: a Jinja template that takes `tools` itself; its answers are read as JSON calls.
- GenericTools: every other model (Llama 1/2, templates without tools such as SmolLM2's): the
  tools in the system message, a call answered as `{"tool_calls": [{"name": ..., "arguments":
  {...}}]}`, tool results as user turns (so strict formats such as Llama 2's still alternate).

A ToolFormat also gives the JSON schema of a call answer (what a forced tool_choice's grammar
enforces) and a ToolCallStream that turns the answer's text into OpenAI's streamed tool-call deltas.
"""
from __future__ import annotations

import ast
import json
import re
import secrets
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Callable

import regex  # tiktoken's dependency; partial matching tells a call's opening from text early

from .chat_format import (ChatFormat, JinjaChatFormat, Llama3ChatFormat, Message, TOOL_ROLE, call_arguments,
                          llama3_call_text)

CUSTOM_TOOL_CALL = re.compile(r"<function=(?P<function_name>[^}]+)>(?P<args>{.*?})")  # llama-models' tool_utils
_JSON_STRING = r'"(?P<name>(?:[^"\\]|\\.)*)"'


def new_call(name: str, arguments) -> dict:
    """One tool call in OpenAI's shape (arguments as a JSON string)."""
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{secrets.token_hex(12)}", "type": "function", "function": {"name": name, "arguments": args}}


class ToolFormat:
    name = "base"
    renders_tools = False  # the chat template itself takes `tools`
    call_key, args_key = "name", "parameters"
    first_call: str = ""  # regex: the answer's text up to where the first call's arguments begin
    next_call: str = ""  # regex: from the end of one call's arguments to the next call's

    def prepare(self, dialog: list[Message], tools: list[dict] | None, native_tool_history: bool) -> list[Message]:
        """The dialog as the chat format will encode it: the tools shown, and tool calls and results
        rewritten where the format cannot write them (native_tool_history: it can)."""
        return dialog

    def call_schema(self, functions: list[dict], parallel: bool) -> dict:
        """The JSON schema of an answer that calls one of `functions` (several calls if parallel)."""
        calls = [{"type": "object", "properties": {self.call_key: {"const": f["name"]},
                                                   self.args_key: f.get("parameters") or {"type": "object"}},
                  "required": [self.call_key, self.args_key], "additionalProperties": False} for f in functions]
        return calls[0] if len(calls) == 1 else {"anyOf": calls}

    def parse(self, text: str) -> list[dict] | None:
        """The tool calls in an answer, OpenAI's shape; None when the answer is text."""
        raise NotImplementedError


class MetaJsonTools(ToolFormat):
    name = "llama3-json"
    today: Callable[[], str] = staticmethod(lambda: datetime.now().strftime("%d %B %Y"))
    first_call = (r"\s*\{\s*(?:\"type\"\s*:\s*\"function\"\s*,\s*)?\"name\"\s*:\s*" + _JSON_STRING
                  + r"\s*,\s*\"(?:parameters|arguments)\"\s*:\s*")
    next_call = r"\s*\}\s*;?" + first_call

    def prepare(self, dialog, tools, native_tool_history=True):
        if not tools:
            return dialog
        system = dialog[0].content if dialog and dialog[0].role == "system" else None
        rest = dialog[1:] if system is not None else dialog
        head = "Environment: ipython\n\nCutting Knowledge Date: December 2023\nToday Date: " + self.today() + "\n"
        head += f"\n{system}\n" if system else ""
        return [Message("system", head), Message("user", self.tool_prompt(tools)), *rest]

    @staticmethod
    def tool_prompt(tools: list[dict]) -> str:
        """prompt_format.md's user message listing the functions. Meta's generator writes each
        parameter as {"type": "object", "description": ...} whatever its type; we keep the
        parameter's own type and keywords, so a model sees what it must send."""
        blocks = []
        for t in tools:
            f = t["function"]
            params = f.get("parameters") or {}
            props = [{name: {"type": p.get("type", "object"), "description": p.get("description", ""),
                             **{k: v for k, v in p.items() if k not in ("type", "description")}}}
                     for name, p in (params.get("properties") or {}).items() if isinstance(p, dict)]
            body = {"type": "function", "function": {"name": f["name"], "description": f.get("description", ""),
                                                     "parameters": {"type": "object", "properties": props,
                                                                    "required": "\0required\0"}}}
            # Meta's template writes the required list on one line inside the indented JSON
            blocks.append(json.dumps(body, indent=4, ensure_ascii=False).replace(
                '"\\u0000required\\u0000"', json.dumps(params.get("required") or [])) + "\n")
        return ("Answer the user's question by making use of the following functions if needed.\n"
                "If none of the function can be used, please say so.\n"
                "Here is a list of functions in JSON format:\n" + "".join(blocks) + "\nReturn function calls in JSON format.")

    encode_call = staticmethod(llama3_call_text)  # an earlier call as the model writes it (chat_format's)

    def parse(self, text: str) -> list[dict] | None:
        content = text.strip(" ").removeprefix("<|python_tag|>")
        m = CUSTOM_TOOL_CALL.search(content)
        if m:
            try:
                return [new_call(m.group("function_name"), json.loads(m.group("args").replace("'", '"')))]
            except ValueError:
                return None
        try:
            obj = json.loads(content)
        except ValueError:
            return _json_calls(content, self.call_key, ("parameters", "arguments")) or _python_calls(content)
        if isinstance(obj, dict) and (obj.get("type") == "function" or "name" in obj) and isinstance(obj.get("name"), str):
            return [new_call(obj["name"], obj.get("parameters", obj.get("arguments", {})))]
        return None


class TemplateJsonTools(MetaJsonTools):
    """A model's own template shows the tools; answers are JSON calls (Llama 3.1's, Hermes-like)."""
    name = "template-json"
    renders_tools = True

    def prepare(self, dialog, tools, native_tool_history=True):
        return dialog


class GenericTools(ToolFormat):
    name = "generic"
    args_key = "arguments"
    first_call = r"\s*\{\s*\"tool_calls\"\s*:\s*\[\s*\{\s*\"name\"\s*:\s*" + _JSON_STRING + r"\s*,\s*\"arguments\"\s*:\s*"
    next_call = r"\s*\}\s*,\s*\{\s*\"name\"\s*:\s*" + _JSON_STRING + r"\s*,\s*\"arguments\"\s*:\s*"
    INSTRUCTIONS = ("You can call these tools (each line: a tool's name, what it does, and the JSON Schema of "
                    "its arguments):\n{tools}\nTo call tools, answer with nothing but one JSON object: "
                    "{{\"tool_calls\": [{{\"name\": <tool name>, \"arguments\": {{<arguments>}}}}]}}. "
                    "A tool's result comes back in the next message. Otherwise, answer in plain text.")

    def prepare(self, dialog, tools, native_tool_history=False):
        out: list[Message] = []
        names = {}  # tool_call_id -> function name, to label results
        for m in dialog:
            if m.role == "assistant" and m.tool_calls and not native_tool_history:
                names.update({c.get("id"): c["function"]["name"] for c in m.tool_calls})
                calls = [{"name": c["function"]["name"], "arguments": call_arguments(c)} for c in m.tool_calls]
                text = (m.content + "\n" if m.content else "") + json.dumps({"tool_calls": calls}, ensure_ascii=False)
                out.append(Message("assistant", text))
            elif m.role == "tool" and not native_tool_history:
                text = f"Result of {names.get(m.tool_call_id, 'the tool')}: {m.content}"
                if out and out[-1].role == "user":  # several results (or a result and a question) are one turn
                    out[-1] = replace(out[-1], content=out[-1].content + "\n\n" + text)
                else:
                    out.append(Message("user", text))
            elif m.role == "user" and out and out[-1].role == "user" and not native_tool_history:
                out[-1] = replace(out[-1], content=out[-1].content + "\n\n" + m.content)
            else:
                out.append(m)
        if tools:
            lines = "\n".join(json.dumps({"name": t["function"]["name"], "description": t["function"].get("description", ""),
                                          "parameters": t["function"].get("parameters") or {"type": "object"}},
                                         ensure_ascii=False) for t in tools)
            shown = self.INSTRUCTIONS.format(tools=lines)
            if out and out[0].role == "system":
                out[0] = replace(out[0], content=out[0].content + "\n\n" + shown)
            else:
                out.insert(0, Message("system", shown))
        return out

    def call_schema(self, functions, parallel):
        one = super().call_schema(functions, parallel)
        calls = {"type": "array", "items": one, "minItems": 1, **({} if parallel else {"maxItems": 1})}
        return {"type": "object", "properties": {"tool_calls": calls}, "required": ["tool_calls"],
                "additionalProperties": False}

    def parse(self, text):
        try:
            obj = json.loads(text)
        except ValueError:
            return None
        calls = obj.get("tool_calls") if isinstance(obj, dict) else None
        if not isinstance(calls, list) or not calls or not all(
                isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls):
            return None
        return [new_call(c["name"], c.get("arguments", {})) for c in calls]


def tool_format_for(fmt: ChatFormat | None) -> tuple[ToolFormat, bool]:
    """The tool format a chat format uses, and whether it writes tool calls and results itself."""
    if isinstance(fmt, Llama3ChatFormat):
        return MetaJsonTools(), True
    if isinstance(fmt, JinjaChatFormat):
        native = TOOL_ROLE in fmt.roles and "tool_calls" in fmt.extras
        return (TemplateJsonTools(), native) if fmt.supports_tools else (GenericTools(), native)
    return GenericTools(), False


def _json_calls(body: str, name_key: str, arg_keys: tuple[str, ...]) -> list[dict] | None:
    """Several JSON calls one after another (";" or whitespace between), as vLLM's llama3_json
    parser reads parallel calls; None unless the whole body is calls."""
    body = body.strip()
    calls, decoder, at = [], json.JSONDecoder(), 0
    while at < len(body):
        try:
            obj, at = decoder.raw_decode(body, at)
        except ValueError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get(name_key), str):
            return None
        calls.append(new_call(obj[name_key], next((obj[k] for k in arg_keys if k in obj), {})))
        while at < len(body) and body[at] in " \t\r\n;":
            at += 1
    return calls or None


def _python_calls(body: str) -> list[dict] | None:
    """`[f(a=1), g(b="x")]` (Llama 3.2's zero-shot format; llama-models decodes its first call)."""
    try:
        tree = ast.parse(body.strip())
        expr = tree.body[0].value if len(tree.body) == 1 and isinstance(tree.body[0], ast.Expr) else None
        if not isinstance(expr, ast.List) or not expr.elts or not all(
                isinstance(e, ast.Call) and isinstance(e.func, ast.Name) and not e.args for e in expr.elts):
            return None
        return [new_call(e.func.id, {k.arg: ast.literal_eval(k.value) for k in e.keywords}) for e in expr.elts]
    except (SyntaxError, ValueError):
        return None


@dataclass
class ToolCallStream:
    """An answer's text as it streams -> OpenAI's chat deltas: ("content", text), ("call", index,
    id, name) when a call's name is known, ("arguments", index, fragment) as its arguments arrive.
    Text that may still open a call is held back (a few characters); once it cannot, it flows as
    content. Arguments are cut by a JSON scanner (strings, escapes, nesting), not re-serialized."""
    fmt: ToolFormat
    parallel: bool = True
    buffer: str = ""
    state: str = "head"  # head (may open a call), text, args (inside a call's arguments), between, done
    calls: list[dict] = field(default_factory=list)
    _depth: int = 0
    _in_string: bool = False
    _escaped: bool = False

    def feed(self, text: str) -> list[tuple]:
        self.buffer += text
        out: list[tuple] = []
        while self.buffer:
            if self.state == "text":
                out.append(("content", self.buffer))
                self.buffer = ""
            elif self.state in ("head", "between"):
                if self.state == "between" and not self.parallel:
                    self.state, self.buffer = "done", ""
                    break
                m = regex.match(self.fmt.first_call if self.state == "head" else self.fmt.next_call, self.buffer,
                                partial=True)
                if m is not None and m.partial:
                    break  # wait for more text
                if m is None:
                    if self.state == "head":
                        self.state = "text"
                        continue
                    break  # after a call: its closing brackets, held until the end
                call = new_call(json.loads(f'"{m.group("name")}"'), "")
                self.calls.append(call)
                out.append(("call", len(self.calls) - 1, call["id"], call["function"]["name"]))
                self.buffer, self.state, self._depth = self.buffer[m.end():], "args", 0
            elif self.state == "args":
                if not self.calls[-1]["function"]["arguments"]:
                    self.buffer = self.buffer.lstrip()  # the client's arguments start at their "{"
                    if not self.buffer:
                        break
                cut = self._scan()
                piece, self.buffer = self.buffer[:cut], self.buffer[cut:]
                if piece:
                    self.calls[-1]["function"]["arguments"] += piece
                    out.append(("arguments", len(self.calls) - 1, piece))
                if self.state == "args":
                    break
            else:
                self.buffer = ""
        return out

    def _scan(self) -> int:
        """How much of the buffer belongs to the current arguments; leaves state 'between' at their end."""
        for i, ch in enumerate(self.buffer):
            if self._in_string:
                self._escaped, self._in_string = (False, True) if self._escaped else (ch == "\\", ch != '"')
                continue
            if ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    self.state = "between"
                    return i + 1
            elif self._depth == 0 and not ch.isspace():  # a scalar where an object belongs: not ours to cut
                self.state = "between"
                return i
        return len(self.buffer)

    def finish(self) -> list[tuple]:
        """At the end of the answer: text still held back is content (unless calls were made)."""
        out = [("content", self.buffer)] if self.buffer and not self.calls else []
        self.buffer = ""
        return out
