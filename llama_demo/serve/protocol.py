"""The OpenAI wire format for /v1: pydantic models of requests, responses and stream chunks.

Shaped after FastChat's openai_api_protocol.py: ids and timestamps come from default factories,
so a handler only fills in what it computed. A request field is honoured or refused, never
ignored: unknown fields are a 400 (extra="forbid"); OpenAI's fields that we cannot honour are
declared here as REFUSED, and the web layer answers a 400 naming them unless they hold their
neutral value (`"store": false`, `"tool_choice": "none"`, ...). Every optional field takes an
explicit null, meaning its default, as OpenAI's API does.
"""
from __future__ import annotations

import secrets
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer


def _id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def _now() -> int:
    return int(time.time())


# --- errors ---------------------------------------------------------------------------------------


class ErrorInfo(BaseModel):
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# --- models ---------------------------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "llama_demo"
    max_model_len: int | None = None  # vLLM's extension: the context in tokens


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- shared ---------------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose KV an earlier request left in the cache (not computed again)


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class StreamOptions(BaseModel):
    include_usage: bool | None = False
    include_obfuscation: bool | None = None  # OpenAI's padding against length side channels: we send none


# Fields that only label a request for the client's own records: they cannot change an answer, so
# they are accepted and honoured by doing nothing.
LABELS = ("user", "safety_identifier", "metadata", "prompt_cache_key")

# OpenAI fields this server does not honour, with the values that ask for nothing (accepted);
# any other value is a 400 naming the field. Checked by serve.openai.refuse_unsupported.
REFUSED: dict[str, tuple] = {
    "suffix": ("",), "best_of": (1,),  # best_of: also accepted when it equals n
    "functions": ([],), "function_call": ("none", "auto"),  # OpenAI's deprecated spelling of tools
    "parallel_tool_calls": (True, False),  # honoured by serve.tools: false allows exactly one call
    "audio": (), "modalities": (["text"],), "prediction": (),
    "reasoning_effort": (), "verbosity": (), "web_search_options": (), "store": (False,),
    "service_tier": ("auto", "default"), "moderation": (), "prompt_cache_retention": (), "prompt_cache_options": (),
}


class SamplingRequest(BaseModel):
    """The fields both endpoints share (model, sampling, streaming, stops), declared once; each
    endpoint adds its own input and the fields whose type or default differ between them
    (max_tokens, logprobs). None = the endpoint's default."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None  # None: 1
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None  # token id (as JSON's string key) -> bias in [-100, 100]
    # extensions that vLLM accepts too; they map straight onto SamplingParams
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    # labels (LABELS) and refused fields (REFUSED): accepted by the parser, judged by the web layer
    user: Any = None
    safety_identifier: Any = None
    metadata: Any = None
    prompt_cache_key: Any = None
    store: Any = None
    service_tier: Any = None
    prompt_cache_retention: Any = None
    prompt_cache_options: Any = None
    moderation: Any = None


# --- /v1/completions ------------------------------------------------------------------------------


class CompletionRequest(SamplingRequest):
    # a text, a batch of texts, token ids, or a batch of token id lists (lm-evaluation-harness)
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = None  # None: 16, OpenAI's default
    echo: bool | None = None
    logprobs: int | None = None  # the chosen token's logprob and this many alternatives (0..5, or up to 20)
    best_of: int | None = None
    suffix: Any = None


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy shape: parallel lists, one entry per token (echoed prompt tokens first)."""
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionResponseChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: _id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionResponseChoice]
    usage: UsageInfo


class CompletionStreamResponse(BaseModel):
    id: str = Field(default_factory=lambda: _id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionResponseChoice]
    usage: UsageInfo | None = None


# --- /v1/chat/completions -------------------------------------------------------------------------


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str  # checked by the chat format, whose message names the allowed roles
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict] | None = None  # an assistant's earlier tool calls, for templates that render them
    tool_call_id: str | None = None  # a tool message's answer to one of them


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage]
    max_tokens: int | None = None  # None: as much as fits, up to the server's default
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = None  # alternatives per token (0..20), with logprobs: true
    # refused (REFUSED) unless neutral
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    response_format: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None
    refusal: list[ChatTokenLogprob] | None = None


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[dict] | None = None


class ChatCompletionResponseChoice(BaseModel):
    index: int = 0
    message: ResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: _id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[dict] | None = None

    @model_serializer(mode="wrap")
    def _without_nones(self, handler):  # OpenAI's deltas omit what they do not carry
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatCompletionStreamChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionStreamResponse(BaseModel):
    id: str = Field(default_factory=lambda: _id("chatcmpl"))
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None


# --- /tokenize, /detokenize (vLLM's shapes) --------------------------------------------------------


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None  # a dialog, rendered by the chat format as for a chat request
    add_special_tokens: bool | None = None  # plain prompts: BOS as the tokenizer says (None/true) or not (false)
    add_generation_prompt: bool | None = None  # accepted for vLLM's clients: the chat format always opens the answer


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str
