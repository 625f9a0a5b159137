"""The one request check: everything a client sends is validated here, on rank 0, before anything
is published on the bus. Routes (serve.openai) and the chat page (serve.ui) turn their inputs
into a Job through a Gate; the engine client and the engine take Jobs as they are (ranks may
assert, they do not re-validate).

Costs are bounded before they are paid: a text whose character count proves it is longer than the
context is refused without tokenizing it (Tokenizer.max_token_chars), and tokenization and chat
rendering run in a worker thread, so a big input never blocks the event loop that streams other
users' tokens.
"""
from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from ..config import MAX_CHAT_MESSAGES, SamplingDefaults
from ..engine.grammar import GrammarError, Matcher, ll_tokenizer, response_format_grammar
from ..engine.sampler import SamplingError, SamplingParams
from ..engine.scheduler import PromptTooLong, check_request, check_token_ids
from ..text.chat_format import ChatFormat, Message, answer_stop_ids
from ..text.tool_format import tool_format_for
from ..text.tokenizer import Tokenizer
from .errors import ApiError

# SamplingParams field -> the OpenAI request field a 400 names
API_NAMES = {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
             "repetition_penalty": "repetition_penalty", "stop": "stop", "seed": "seed",
             "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty", "min_p": "min_p",
             "logit_bias": "logit_bias", "logprobs": "logprobs", "prompt_logprobs": "logprobs"}


@dataclass
class Job:
    """A checked request: what to publish to the engine, and how to label the answer."""
    prompt_ids: list[int]
    params: SamplingParams
    model: str


class Gate:
    def __init__(self, tokenizer: Tokenizer, chat_format: ChatFormat | None, max_seq_len: int, vocab_size: int,
                 model_name: str):
        self.tokenizer, self.chat_format = tokenizer, chat_format
        self.max_seq_len, self.vocab_size, self.model_name = max_seq_len, vocab_size, model_name
        self.max_token_chars = tokenizer.max_token_chars  # a pass over the vocabulary: at start-up, not per request

    # --- inputs -> prompt ids ---------------------------------------------------------------------
    async def encode(self, text: str, field: str, bos: bool | None = None) -> list[int]:
        """Ids of a plain-text prompt (BOS as the tokenizer says, unless `bos` says)."""
        self._check_text_size([text], field)
        return await self._off_loop(lambda: self.tokenizer.encode(text, bos=bos), field)

    async def encode_dialog(self, dialog: list[Message], field: str = "messages",
                            tools: list[dict] | None = None) -> list[int]:
        if self.chat_format is None:
            raise ApiError(400, "this server runs a base model without a chat format: use /v1/completions "
                                "(or restart with --chat)", param=field)
        if len(dialog) > MAX_CHAT_MESSAGES:
            raise ApiError(400, f"{field}: at most {MAX_CHAT_MESSAGES} messages, got {len(dialog)}", param=field)
        self._check_text_size([m.content for m in dialog], field)
        return await self._off_loop(lambda: self.encode_with_tools(dialog, tools), field)

    def encode_with_tools(self, dialog: list[Message], tools: list[dict] | None) -> list[int]:
        """The chat format's prompt, the tools shown as its tool format shows them (text.tool_format):
        by the model's own template, Meta's Llama 3 messages, or the generic system message."""
        fmt, native_history = tool_format_for(self.chat_format)
        shown = fmt.prepare(list(dialog), tools, native_history)
        return self.chat_format.encode_dialog(shown, tools if fmt.renders_tools else None)

    async def decode(self, ids: list[int], field: str) -> str:
        """Text of token ids (/detokenize): ids checked like a prompt's, decoded off the event loop."""
        try:
            check_token_ids(ids, self.vocab_size)
        except ValueError as e:
            raise ApiError(400, f"{field}: {e}", param=field) from None
        return await asyncio.to_thread(self.tokenizer.decode, ids)

    def _check_text_size(self, texts: Sequence[str], field: str) -> None:
        chars = sum(len(t) for t in texts)
        # fewer tokens than chars / max_token_chars is impossible: too long, whatever the tokenizer does
        at_least = chars // self.max_token_chars
        if at_least >= self.max_seq_len:
            raise ApiError(400, f"{field}: the prompt is {chars} characters, at least {at_least} tokens, but this "
                                f"model's context (max_seq_len) is {self.max_seq_len} tokens including the answer: "
                                "shorten it", param=field)
        for t in texts:
            try:
                t.encode("utf-8")
            except UnicodeEncodeError:
                raise ApiError(400, f"{field}: the text is not valid Unicode (a lone surrogate?)", param=field) from None

    @staticmethod
    async def _off_loop(work, field: str) -> list[int]:
        try:
            return await asyncio.to_thread(work)
        except ValueError as e:  # ChatFormatError, TokenizerError: the dialog or text cannot be encoded
            raise ApiError(400, f"{field}: {e}", param=field) from None

    # --- the check --------------------------------------------------------------------------------
    def job(self, prompt_ids: list, params: SamplingParams, prompt_field: str, clip_to_context: bool = True,
            names: dict[str, str] | None = None) -> Job:
        """Check prompt ids and sampling values completely; a 400 names the field at fault (by
        API_NAMES, or `names` where an endpoint spells a field its own way). A max_tokens beyond
        the context is clipped to what fits (as vLLM does), not refused."""
        try:
            checked = check_request(prompt_ids, params, self.max_seq_len, self.vocab_size)
        except PromptTooLong as e:
            raise ApiError(400, str(e), param=prompt_field) from None
        except SamplingError as e:  # its message starts with the field it names: use the API's name
            field, _, rest = str(e).partition(" ")
            param = {**API_NAMES, **(names or {})}.get(field)
            raise ApiError(400, f"{param} {rest}" if param else str(e), param=param) from None
        except ValueError as e:  # token ids outside the vocabulary
            raise ApiError(400, f"{prompt_field}: {e}", param=prompt_field) from None
        if clip_to_context:
            checked.max_new_tokens = min(checked.max_new_tokens, self.max_seq_len - len(prompt_ids))
        return Job(list(prompt_ids), checked, self.model_name)

    async def grammar(self, response_format) -> str | None:
        """response_format -> the grammar the answer must follow (None: free text)."""
        try:
            grammar = response_format_grammar(response_format)
        except GrammarError as e:
            raise ApiError(400, f"response_format: {e}", param="response_format") from None
        if grammar is not None:
            try:
                await asyncio.to_thread(self.check_grammar, grammar)
            except GrammarError as e:
                raise ApiError(400, f"response_format: {e}", param="response_format") from None
        return grammar

    def check_grammar(self, grammar: str) -> None:
        """Build llguidance's view of the vocabulary here (~1 s for 50k tokens, once), not in the
        serving loop where it would stall every running answer; the engine finds it cached (same
        tokenizer, vocabulary size and stop ids: answer_stop_ids, as serve sets the engine's). Then the grammar's
        first step: a schema no document satisfies (e.g. {"$ref": "#"}) allows no token at all."""
        stops = answer_stop_ids(self.tokenizer, self.chat_format)
        ll_tokenizer(self.tokenizer, self.vocab_size, stops)
        try:
            first = Matcher(grammar, self.tokenizer, self.vocab_size, stops).allowed()
        except GrammarError as e:
            first, why = None, f" ({e})"
        else:
            why = ""
        if first is None or not first.any():
            raise GrammarError(f"the JSON schema admits no document that can be generated{why}")

    def page_params(self, temperature, top_p, max_new_tokens, defaults: SamplingDefaults) -> SamplingParams:
        """The chat page's sliders (numbers from the browser, or from gradio_client: anything)."""
        def number(v, default):
            try:
                return default if v is None else float(v)
            except (TypeError, ValueError):
                raise ApiError(400, f"not a number: {v!r}") from None

        tokens = number(max_new_tokens, defaults.max_new_tokens)
        if tokens != tokens or tokens in (float("inf"), float("-inf")):
            raise ApiError(400, "max_tokens must be a finite number", param="max_tokens")
        return SamplingParams(number(temperature, defaults.temperature), number(top_p, defaults.top_p),
                              max_new_tokens=int(tokens), top_k=defaults.top_k,
                              repetition_penalty=defaults.repetition_penalty, repeat_guard=defaults.repeat_guard)
