"""Dialog -> prompt ids, per model family.

- Llama2ChatFormat: Meta's llama/generation.py chat_completion ([INST] ... [/INST], a BOS/EOS pair
  around each finished exchange, system prompt folded into the first user turn).
- Llama3ChatFormat: Meta's llama3 ChatFormat (header tokens, <|eot_id|> after each message).
- JinjaChatFormat: a model's own chat_template, rendered as transformers' apply_chat_template does.

chat_format_for() picks one for a model folder; is_chat_model() guesses the server's --chat default.

Which dialogs are allowed is the format's to say: Meta's Llama 2 code requires an optional system
message, then strictly alternating user/assistant turns ending with the user (validate_dialog);
Meta's Llama 3 layout writes any sequence of headed messages (a tool result as Llama 3.1's
"ipython" role); a model's own template decides for itself (it may raise_exception), given the
roles it knows: "tool" only where the template mentions it.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Sequence

from .tokenizer import HFTokenizer, SentencePieceTokenizer, TiktokenTokenizer, Tokenizer
from .tokenizer_files import load_tokenizer_config

ROLES = ("system", "user", "assistant")
TOOL_ROLE = "tool"  # OpenAI's role for a tool's result

# Llama 2 chat tags (meta-llama/llama llama/generation.py)
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
LLAMA2_SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")

# Llama 3 header and end-of-turn tokens (meta-llama/llama3 llama/tokenizer.py ChatFormat)
BEGIN_OF_TEXT = "<|begin_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
EOM = "<|eom_id|>"  # Llama 3.1: end of a message that calls a tool


class ChatFormatError(ValueError):
    """A dialog the chat format cannot encode; the message says what is wrong with it."""


@dataclass
class Message:
    role: str  # "system" | "user" | "assistant" (| "tool" where the format has it)
    content: str
    name: str | None = None  # the speaker's name, for templates that render it
    tool_calls: list[dict] | None = None  # an assistant's tool calls (OpenAI's shape), for templates that render them
    tool_call_id: str | None = None  # which call a tool message answers (an identifier: never changes the prompt)


Dialog = list[Message]


def answer_stop_ids(tokenizer: Tokenizer, chat_format: "ChatFormat | None") -> frozenset[int]:
    """The ids that end an answer: the tokenizer's, and when chatting its format's end of a turn.
    One home: the engine stops on these (commands/serve.py sets them) and the gate builds
    llguidance's vocabulary for these; a set that differed would have the engine rebuild that
    vocabulary (seconds) inside the serving loop, stalling every running answer."""
    return frozenset(tokenizer.stop_ids) | (frozenset(chat_format.stop_ids) if chat_format is not None else frozenset())


def call_arguments(call: dict) -> dict:
    """An OpenAI tool call's arguments as an object (the API sends them as a JSON string)."""
    args = call.get("function", {}).get("arguments") or "{}"
    try:
        value = json.loads(args) if isinstance(args, str) else args
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def llama3_call_text(call: dict) -> str:
    """An assistant's earlier tool call as a Llama 3 model writes it (llama-models'
    ToolUtils.encode_tool_call): part of the chat format, which renders earlier turns; the tool
    formats read the model's new calls."""
    return json.dumps({"type": "function", "name": call["function"]["name"], "parameters": call_arguments(call)})


def check_messages(dialog: Sequence[Message], roles: Sequence[str] = ROLES, extras: Sequence[str] = (),
                   why: str = "") -> None:
    """The shape every format needs: at least one message, known roles, text content, and only
    the optional fields (name, tool_calls) the format renders."""
    if not dialog:
        raise ChatFormatError("empty dialog: send at least one user message")
    for i, m in enumerate(dialog):
        if m.role not in roles:
            raise ChatFormatError(f"message {i}: unknown role {m.role!r}; expected one of {', '.join(roles)}{why}")
        if not isinstance(m.content, str):
            raise ChatFormatError(f"message {i}: content must be a string, got {type(m.content).__name__}")
        for extra in ("name", "tool_calls"):
            if getattr(m, extra) is not None and extra not in extras:
                raise ChatFormatError(f"message {i}: this model's chat format does not render {extra}")


def validate_dialog(dialog: Sequence[Message]) -> None:
    """Raise ChatFormatError unless: optional system first, then user/assistant alternating, user
    last (Meta's Llama 2 rules)."""
    check_messages(dialog)
    start = 1 if dialog[0].role == "system" else 0
    for i in range(start, len(dialog)):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if dialog[i].role != expected:
            rule = "a system message may only come first" if dialog[i].role == "system" else "turns alternate"
            raise ChatFormatError(f"message {i}: role {dialog[i].role!r} where {expected!r} was expected ({rule})")
    if dialog[-1].role != "user":
        raise ChatFormatError("the last message must be from the user (the model answers it)")


class ChatFormat:
    name: str = "base"

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    @property
    def stop_ids(self) -> frozenset[int]:
        return self.tokenizer.stop_ids

    supports_tools = False  # whether the format can show the model a list of tools

    def encode_dialog(self, dialog: Sequence[Message], tools: list[dict] | None = None) -> list[int]:
        """Prompt ids for `dialog` (and the tools the model may call, OpenAI's shape), ending where
        the assistant's answer begins."""
        self.check(dialog)
        if tools and not self.supports_tools:
            raise ChatFormatError("this model's chat format has no place for tools")
        return self._encode(dialog, tools) if tools else self._encode(dialog)

    def check(self, dialog: Sequence[Message]) -> None:
        """Raise ChatFormatError for a dialog this format cannot write (default: Llama 2's rules)."""
        validate_dialog(dialog)

    def _encode(self, dialog: Sequence[Message]) -> list[int]:
        raise NotImplementedError


class Llama2ChatFormat(ChatFormat):
    name = "llama2"

    def _encode(self, dialog: Sequence[Message]) -> list[int]:
        for i, m in enumerate(dialog):
            for tag in LLAMA2_SPECIAL_TAGS:
                if tag in m.content:
                    # Meta's chat_completion refuses these too: they would let a message fake a turn.
                    raise ChatFormatError(f"message {i} contains the chat tag {tag!r}; remove it")
        turns = [(m.role, m.content) for m in dialog]
        if turns[0][0] == "system":
            turns = [(turns[1][0], B_SYS + turns[0][1] + E_SYS + turns[1][1])] + turns[2:]
        enc = self.tokenizer.encode
        ids: list[int] = []
        for (_, prompt), (_, answer) in zip(turns[::2], turns[1::2]):
            ids += enc(f"{B_INST} {prompt.strip()} {E_INST} {answer.strip()} ", bos=True, eos=True)
        ids += enc(f"{B_INST} {turns[-1][1].strip()} {E_INST}", bos=True, eos=False)
        return ids


class Llama3ChatFormat(ChatFormat):
    name = "llama3"

    def __init__(self, tokenizer: Tokenizer):
        super().__init__(tokenizer)
        ids = {t: tokenizer.token_id(t) for t in (BEGIN_OF_TEXT, START_HEADER, END_HEADER, EOT)}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ChatFormatError(f"tokenizer lacks the Llama 3 chat tokens {', '.join(missing)}")
        self._bot, self._start, self._end, self._eot = (ids[t] for t in (BEGIN_OF_TEXT, START_HEADER, END_HEADER, EOT))
        self._eom = tokenizer.token_id(EOM) or self._eot  # Llama 3.0's vocabulary has no <|eom_id|>

    @property
    def stop_ids(self) -> frozenset[int]:
        return self.tokenizer.stop_ids | {self._eot, self._eom}  # the answer ends with <|eot_id|> (<|eom_id|>: a call)

    def check(self, dialog: Sequence[Message]) -> None:
        # any sequence of headed messages: Meta's layout has no turn-order rule of its own
        check_messages(dialog, ROLES + (TOOL_ROLE,), extras=("tool_calls",))

    def _header(self, role: str) -> list[int]:
        enc = self.tokenizer.encode
        return [self._start, *enc(role, bos=False), self._end, *enc("\n\n", bos=False)]

    def _encode(self, dialog: Sequence[Message]) -> list[int]:
        ids = [self._bot]
        for m in dialog:
            role = "ipython" if m.role == TOOL_ROLE else m.role  # Llama 3.1's role for tool results
            ids += self._header(role) + self.tokenizer.encode(m.content, bos=False)  # as written: Meta strips nothing
            if m.role == "assistant" and m.tool_calls:  # as llama-models writes an earlier call: its JSON, then
                ids += self.tokenizer.encode("".join(map(llama3_call_text, m.tool_calls)), bos=False)
                ids.append(self._eom)  # <|eom_id|>, where the model stopped for the tool's result
            else:
                ids.append(self._eot)
        return ids + self._header("assistant")  # open the assistant's turn for the model to complete


class JinjaChatFormat(ChatFormat):
    """A chat template rendered as transformers renders it, then encoded without an extra BOS."""

    name = "jinja"

    def __init__(
        self,
        template: str,
        tokenizer: Tokenizer,
        bos_token: str | None = None,
        eos_token: str | None = None,
    ):
        super().__init__(tokenizer)
        self.template_source = template
        self._template = _compile_template(template)
        self._variables = {
            "bos_token": bos_token if bos_token is not None else tokenizer.bos_token,
            "eos_token": eos_token if eos_token is not None else tokenizer.eos_token,
        }
        # what the template knows beyond role and content, read from its source
        self.roles = ROLES + ((TOOL_ROLE,) if re.search(r"""['"]tool['"]""", template) else ())
        self.supports_tools = bool(re.search(r"\btools\b", template))
        self.extras = tuple(x for x, pattern in (("tool_calls", r"tool_calls"), ("name", r"""(\.name\b|\[['"]name['"]\])"""))
                            if re.search(pattern, template))

    def check(self, dialog: Sequence[Message]) -> None:
        # the template decides the order of turns (it may raise_exception); we check the shape
        check_messages(dialog, self.roles, self.extras,
                       "" if TOOL_ROLE in self.roles else " (this model's chat template has no tool role)")

    def render(self, dialog: Sequence[Message], tools: list[dict] | None = None) -> str:
        """The prompt text, ready for the assistant's answer (add_generation_prompt=True)."""
        import jinja2

        self.check(dialog)
        messages = [{"role": m.role, "content": m.content,
                     **{k: v for k in ("name", "tool_calls", "tool_call_id") if (v := getattr(m, k)) is not None}}
                    for m in dialog]
        try:
            return self._template.render(
                messages=messages, tools=tools or None, documents=None, add_generation_prompt=True, **self._variables
            )
        except jinja2.TemplateError as e:  # raise_exception(...) in the template lands here too
            raise ChatFormatError(f"the model's chat template rejected the dialog: {e}") from e

    def _encode(self, dialog: Sequence[Message], tools: list[dict] | None = None) -> list[int]:
        # The template writes BOS itself if the model wants it; special-token strings become ids.
        return self.tokenizer.encode_with_special_tokens(self.render(dialog, tools))


def _compile_template(template: str):
    """Compile like transformers' _compile_jinja_template: sandboxed, trim/lstrip blocks, its helpers."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters, which a prompt must not see
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatFormatError(f"chat template does not compile: {e.message} (line {e.lineno})") from e


def _model_folder(model_dir: str | Path) -> Path:
    path = Path(model_dir)
    return path.parent if path.is_file() else path


def chat_format_for(model_dir: str | Path, tokenizer: Tokenizer) -> ChatFormat | None:
    """The chat format for a model: its own template if it ships one, else Meta's format for its family."""
    template = load_tokenizer_config(_model_folder(model_dir)).chat_template or tokenizer.chat_template
    if template:
        return JinjaChatFormat(template, tokenizer)
    if isinstance(tokenizer, TiktokenTokenizer) or (
        isinstance(tokenizer, HFTokenizer) and tokenizer.token_id(START_HEADER) is not None
    ):
        return Llama3ChatFormat(tokenizer)
    if isinstance(tokenizer, SentencePieceTokenizer):
        return Llama2ChatFormat(tokenizer)
    return None


def is_chat_model(model_dir: str | Path) -> bool:
    """A default for --chat: the model ships a chat template, or its name says chat/instruct."""
    path = Path(model_dir)
    name = path.name.lower()
    if "chat" in name or "instruct" in name:
        return True
    return load_tokenizer_config(_model_folder(path)).chat_template is not None
