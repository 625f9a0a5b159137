"""The OpenAI API: `/v1/models`, `/v1/completions`, `/v1/chat/completions` in the OpenAI wire
format (serve.protocol), streamed as server-sent events when asked (serve.sse); vLLM's `/tokenize`
and `/detokenize`; the API's docs behind the same credential. OpenAIApi holds what every front
shares: choices from a request, the chat rules (dialog_job, also serve.responses' and
serve.messages'), submission, collection, usage. The app is assembled in serve.app.

Every route turns its body into a Job through the gate (serve.gate) and submits it to the
EngineClient; leaving early (disconnect, Stop button) cancels the request on every rank.
"""
from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

from ..config import API_SAMPLING, MAX_CHOICES, MAX_SEED, RETRY_AFTER_S, ServerConfig
from ..engine.engine import TokenEvent
from ..engine.grammar import GrammarError
from ..engine.sampler import SamplingParams
from ..text.chat_format import Message
from ..text.tokenizer import Tokenizer
from . import protocol as p
from .errors import ApiError
from .gate import Gate, Job
from .loop import Draining, EngineClient, QueueFull, Submission
from .metrics import Metrics
from .logprobs import CompletionLogprobWriter, chat_logprobs
from ..text.tool_format import ToolCallStream
from .sse import Tracked, events, stream, until_disconnect
from .tools import ToolReader, ToolUse, parse_tool_calls, tool_use


@dataclass
class Choice:
    """One engine request of a response: n > 1 and batches of prompts make several."""
    index: int
    job: Job
    prompt: int  # which prompt of the request (usage counts each prompt once)
    echo: str | None = None  # completions' echo: the prompt text the answer follows
    tool_calls: ToolReader | None = None  # chat with tools: how to read tool calls out of the answer


@dataclass
class Answer:
    """One choice's answer as its events arrive."""
    text: list[str] = field(default_factory=list)
    tokens: int = 0
    finish_reason: str | None = None
    logprobs: list[tuple[int, float | None, list]] = field(default_factory=list)  # (id, logprob, top)
    prompt_logprobs: list | None = None
    reused: int = 0  # prompt tokens found in the KV cache (usage's cached_tokens)

    def add(self, ev: TokenEvent) -> None:
        self.text.append(ev.text)
        self.tokens += ev.token_id is not None
        self.reused = max(self.reused, ev.reused)
        if ev.prompt_logprobs is not None:
            self.prompt_logprobs = ev.prompt_logprobs
        if ev.logprob is not None:
            self.logprobs.append((ev.token_id, ev.logprob, ev.top_logprobs or [], ev.stop_id))
        if ev.finished:
            self.finish_reason = finish_reason(ev)


class OpenAIApi:
    def __init__(self, client: EngineClient, gate: Gate, cfg: ServerConfig, metrics: Metrics):
        self.client, self.gate, self.cfg, self.metrics = client, gate, cfg, metrics
        self.keepalive_s = cfg.sse_keepalive_s

    @property
    def tokenizer(self) -> Tokenizer:
        return self.client.tokenizer

    def models(self) -> p.ModelList:
        return p.ModelList(data=[p.ModelCard(id=self.client.model_name, max_model_len=self.client.max_seq_len)])

    async def completion_choices(self, req: p.CompletionRequest) -> list[Choice]:
        refuse_unsupported(req)
        prompts = _prompts(req.prompt)
        n = self._choices_per_prompt(req, len(prompts))
        max_tokens = req.max_tokens if req.max_tokens is not None else API_SAMPLING.max_new_tokens
        k = req.logprobs
        params = sampling(req, max_tokens, logprobs=k, prompt_logprobs=k if req.echo and k is not None else None)
        choices = []
        for i, prompt in enumerate(prompts):
            field_name = "prompt" if len(prompts) == 1 else f"prompt.{i}"
            ids = await self.gate.encode(prompt, field_name) if isinstance(prompt, str) else prompt
            job = self.gate.job(ids, params, field_name, names={"logprobs": "logprobs", "prompt_logprobs": "logprobs"})
            echo = (prompt if isinstance(prompt, str) else self.tokenizer.decode(ids)) if req.echo else None
            choices += [Choice(i * n + j, _nth(job, j), i, echo) for j in range(n)]
        return choices

    async def chat_choices(self, req: p.ChatCompletionRequest) -> list[Choice]:
        refuse_unsupported(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        n = self._choices_per_prompt(req, 1)
        dialog = [_message(m, i) for i, m in enumerate(req.messages)]
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        # no max_tokens: the server's default, clipped by the gate to what the context has room for
        params = sampling(req, self.cfg.page.max_new_tokens if max_tokens is None else max_tokens,
                          logprobs=(req.top_logprobs or 0) if req.logprobs else None)
        job, parse = await self.dialog_job(dialog, params, req.tools, req.tool_choice, req.response_format,
                                           names={"logprobs": "top_logprobs"}, parallel=req.parallel_tool_calls)
        return [Choice(j, _nth(job, j), 0, tool_calls=parse) for j in range(n)]

    async def dialog_ids(self, dialog: list[Message], tools, tool_choice,
                         parallel: bool | None = None) -> tuple[list[int], ToolUse]:
        """A dialog's prompt ids with the tools it offers, in the chat format's tool format
        (serve.tools; chat's shapes: 400s name chat's fields)."""
        use = tool_use(tools, tool_choice, self.gate.chat_format, parallel)
        return await self.gate.encode_dialog(dialog, "messages", tools=use.tools), use

    async def dialog_job(self, dialog: list[Message], params: SamplingParams, tools, tool_choice, response_format,
                         names: dict[str, str] | None = None, parallel: bool | None = None) -> tuple[Job, ToolReader | None]:
        """The chat rules, shared with the Responses and Messages fronts (serve.responses,
        serve.messages): a dialog, its tools and the shape its answer must take -> a checked Job,
        and how to read tool calls out of the answer (None: it is text)."""
        ids, tools = await self.dialog_ids(dialog, tools, tool_choice, parallel)
        params.grammar = await self.gate.grammar(response_format)
        if tools.grammar is not None:
            if params.grammar is not None:
                raise ApiError(400, "tool_choice: a tool call's grammar and a response_format cannot both shape the "
                                    "answer", param="tool_choice")
            try:
                await asyncio.to_thread(self.gate.check_grammar, tools.grammar)
            except GrammarError as e:
                raise ApiError(400, f"tools: the functions' parameters cannot be enforced: {e}", param="tools") from None
            params.grammar = tools.grammar
        return self.gate.job(ids, params, "messages", names=names), tools.parse

    def _choices_per_prompt(self, req: p.SamplingRequest, prompts: int) -> int:
        n = 1 if req.n is None else req.n
        if n < 1:
            raise ApiError(400, f"n must be an integer >= 1, got {n}", param="n")
        total = n * prompts
        limit = min(MAX_CHOICES, getattr(self.client, "capacity", MAX_CHOICES))
        if total > limit:
            raise ApiError(400, f"n: this request asks for {total} answers ({prompts} prompt(s) x n={n}); this server "
                                f"runs at most {limit} at once: ask for fewer", param="n" if prompts == 1 else "prompt")
        return n

    def submit(self, choices: list[Choice], endpoint: str) -> list:
        """Every choice's engine request, all or none (a 429 when the queue cannot take them all);
        returns each one's events (failures as ApiErrors), counted and timed by the metrics."""
        try:
            subs = self.client.submit_many([(c.job.prompt_ids, c.job.params) for c in choices])
            return [Tracked(s, self.metrics.track(s, endpoint, len(c.job.prompt_ids))) for s, c in zip(subs, choices)]
        except QueueFull as e:
            raise ApiError(429, str(e), type="rate_limit_error", code="server_busy",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except Draining as e:
            raise ApiError(503, str(e), type="server_error", code="server_stopping",
                           headers={"Retry-After": str(e.retry_after)}) from None
        except RuntimeError as e:  # the model stopped serving
            raise ApiError(503, str(e), type="server_error") from None

    async def collect(self, subs: list["Tracked"]) -> list[Answer]:
        """Every choice's whole answer; the first failure cancels the others."""
        async def one(sub: Submission) -> Answer:
            answer = Answer()
            async for ev in events(sub):
                answer.add(ev)
            return answer

        tasks = [asyncio.ensure_future(one(s)) for s in subs]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for t in tasks:
                t.cancel()

    def usage(self, choices: list[Choice], answers: list[Answer] | None = None, tokens: int = 0,
              reused: list[int] | None = None) -> p.UsageInfo:
        """OpenAI's usage: each prompt counted once however many choices it has; its cached tokens
        are the fewest any of its choices found in the KV cache (`reused`, per choice, or the
        answers'), so a prompt is never reported more cached than every copy of it was."""
        reused = [a.reused for a in answers] if answers is not None else reused or [0] * len(choices)
        size, cached = {}, {}  # by prompt: its tokens, and the fewest any of its choices found cached
        for c, r in zip(choices, reused):
            size[c.prompt] = len(c.job.prompt_ids)
            cached[c.prompt] = min(r, cached.get(c.prompt, r))
        prompt = sum(size.values())
        done = sum(a.tokens for a in answers) if answers is not None else tokens
        details = p.PromptTokensDetails(cached_tokens=sum(cached.values()))
        return p.UsageInfo(prompt_tokens=prompt, completion_tokens=done, total_tokens=prompt + done,
                           prompt_tokens_details=details)


def _prompts(prompt) -> list:
    """OpenAI's four prompt shapes -> a list of prompts, each a text or a list of token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(t, int) for t in prompt):
        return [list(prompt)]
    if not prompt:
        raise ApiError(400, "prompt: empty: send a text, a list of texts, token ids, or lists of token ids",
                       param="prompt")
    return [x if isinstance(x, str) else list(x) for x in prompt]


def _nth(job: Job, j: int) -> Job:
    """Choice j of n: its own request; with a seed, choice j draws from seed + j, so the n answers
    differ and each is reproducible (choice 0 is what the same request with n=1 answers)."""
    if j == 0 or job.params.seed is None:
        return job if j == 0 else dataclasses.replace(job, params=dataclasses.replace(job.params))
    return dataclasses.replace(job, params=dataclasses.replace(job.params, seed=(job.params.seed + j) % MAX_SEED))


def sampling(req: p.SamplingRequest, max_tokens: int, logprobs: int | None = None,
             prompt_logprobs: int | None = None) -> SamplingParams:
    """The request's sampling fields, OpenAI's defaults for those it leaves out or sends as null
    (the gate checks them)."""
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    return SamplingParams(
        temperature=API_SAMPLING.temperature if req.temperature is None else req.temperature,
        top_p=API_SAMPLING.top_p if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        max_new_tokens=max_tokens, stop=stop, seed=req.seed,
        presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
        min_p=req.min_p or 0.0, logit_bias=req.logit_bias or [], logprobs=logprobs, prompt_logprobs=prompt_logprobs)


def completion_choice(tokenizer: Tokenizer, c: Choice, a: Answer, logprobs: bool) -> p.CompletionResponseChoice:
    lp = None
    if logprobs:
        lp = CompletionLogprobWriter(tokenizer).write((a.prompt_logprobs or []) + a.logprobs)
    return p.CompletionResponseChoice(index=c.index, text=(c.echo or "") + "".join(a.text), logprobs=lp,
                                      finish_reason=a.finish_reason)


def chat_message(a: Answer, tool_calls: ToolReader | None) -> tuple[p.ResponseMessage, str]:
    """The assistant's message and finish_reason: tool calls when the answer is one (and tools were
    offered), else its text."""
    text = "".join(a.text)
    calls = parse_tool_calls(text, tool_calls) if tool_calls and a.finish_reason == "stop" else None
    if calls:
        return p.ResponseMessage(content=None, tool_calls=calls), "tool_calls"
    return p.ResponseMessage(content=text), a.finish_reason


def tool_chunk(index: int, scanner: ToolCallStream, ev: TokenEvent, model: str,
               tok: Tokenizer | None) -> p.ChatCompletionStreamResponse | None:
    """One streamed chunk of an answer that may call tools: its text as content until it opens a
    call, then the call's deltas (OpenAI's: {index, id, type, function.name} first, then
    {index, function.arguments} fragments). finish_reason "tool_calls" once a call was made."""
    deltas = scanner.feed(ev.text) + (scanner.finish() if ev.finished else [])
    content = "".join(d[1] for d in deltas if d[0] == "content")
    tool_calls = [{"index": d[1], "id": d[2], "type": "function", "function": {"name": d[3], "arguments": ""}}
                  if d[0] == "call" else {"index": d[1], "function": {"arguments": d[2]}}
                  for d in deltas if d[0] != "content"]
    lp = chat_logprobs(tok, [(ev.token_id, ev.logprob, ev.top_logprobs or [], False)]) \
        if tok and ev.logprob is not None and not ev.stop_id else None
    reason = None
    if ev.finished:
        reason = "tool_calls" if scanner.calls and ev.finish_reason != "length" else finish_reason(ev)
    if not content and not tool_calls and reason is None and lp is None:
        return None
    return p.ChatCompletionStreamResponse(model=model, choices=[p.ChatCompletionStreamChoice(
        index=index, delta=p.DeltaMessage(content=content or None, tool_calls=tool_calls or None), logprobs=lp,
        finish_reason=reason)])


def openai_router(api: OpenAIApi, dependencies: list) -> APIRouter:
    router = APIRouter(prefix="/v1", dependencies=dependencies)
    tok = api.tokenizer

    @router.get("/models")
    async def models() -> p.ModelList:
        return api.models()

    @router.post("/completions")
    async def completions(req: p.CompletionRequest, request: Request):
        choices = await api.completion_choices(req)
        subs = api.submit(choices, "/v1/completions")
        want_logprobs = req.logprobs is not None
        model = choices[0].job.model
        if req.stream:
            writers = [CompletionLogprobWriter(tok) for _ in choices]

            def chunk(i: int, ev: TokenEvent, first: bool) -> p.CompletionStreamResponse | None:
                c = choices[i]
                text = (c.echo or "") + ev.text if first else ev.text
                lp = None
                if want_logprobs and ev.token_id is not None:
                    lp = writers[i].write((ev.prompt_logprobs or []) +
                                          ([(ev.token_id, ev.logprob, ev.top_logprobs or [])] if ev.logprob is not None else []))
                if not text and not ev.finished and lp is None:
                    return None
                return p.CompletionStreamResponse(model=model, choices=[p.CompletionResponseChoice(
                    index=c.index, text=text, logprobs=lp, finish_reason=finish_reason(ev) if ev.finished else None)])
            return stream(api, choices, subs, req, request, p.CompletionStreamResponse, chunk)
        try:
            answers = await until_disconnect(request, api.collect(subs))
        finally:
            for s in subs:
                s.close()
        return p.CompletionResponse(model=model, usage=api.usage(choices, answers), choices=[
            completion_choice(tok, c, a, want_logprobs) for c, a in zip(choices, answers)])

    @router.post("/chat/completions")
    async def chat_completions(req: p.ChatCompletionRequest, request: Request):
        choices = await api.chat_choices(req)
        subs = api.submit(choices, "/v1/chat/completions")
        model = choices[0].job.model
        if req.stream:
            # with tools: each answer's text through its format's call scanner, so that a call streams
            # as OpenAI streams one (id, type and name first, then the arguments in fragments)
            calls = [c.tool_calls.stream() if c.tool_calls else None for c in choices]

            def chunk(i: int, ev: TokenEvent, first: bool) -> p.ChatCompletionStreamResponse | None:
                if calls[i] is not None:
                    return tool_chunk(choices[i].index, calls[i], ev, model, req.logprobs and tok)
                lp = None
                if req.logprobs and ev.logprob is not None and not ev.stop_id:
                    lp = chat_logprobs(tok, [(ev.token_id, ev.logprob, ev.top_logprobs or [], False)])
                if not ev.text and not ev.finished and lp is None:
                    return None
                delta = p.DeltaMessage(content=ev.text) if ev.text or lp is not None else p.DeltaMessage()
                return p.ChatCompletionStreamResponse(model=model, choices=[p.ChatCompletionStreamChoice(
                    index=choices[i].index, delta=delta, logprobs=lp,
                    finish_reason=finish_reason(ev) if ev.finished else None)])
            opening = [p.ChatCompletionStreamResponse(model=model, choices=[p.ChatCompletionStreamChoice(
                index=c.index, delta=p.DeltaMessage(role="assistant", content=""))]) for c in choices]
            return stream(api, choices, subs, req, request, p.ChatCompletionStreamResponse, chunk, opening)
        try:
            answers = await until_disconnect(request, api.collect(subs))
        finally:
            for s in subs:
                s.close()
        replies = [chat_message(a, c.tool_calls) for c, a in zip(choices, answers)]
        return p.ChatCompletionResponse(model=model, usage=api.usage(choices, answers), choices=[
            p.ChatCompletionResponseChoice(index=c.index, message=msg, finish_reason=reason,
                                           logprobs=chat_logprobs(tok, a.logprobs) if req.logprobs else None)
            for c, a, (msg, reason) in zip(choices, answers, replies)])

    @router.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
    async def unknown(path: str, request: Request):
        raise ApiError(404, f"{request.method} /v1/{path}: no such endpoint on this server (it serves /v1/models, "
                            "/v1/completions, /v1/chat/completions, /v1/responses and /v1/messages)", type="not_found_error", code="not_found")

    return router


def docs_router(app: FastAPI, dependencies: list) -> APIRouter:
    """The API's OpenAPI schema at /v1/openapi.json and its Swagger page at /v1/docs, behind the
    same credential as the rest of /v1 (open only when /v1 is)."""
    router = APIRouter(prefix="/v1", dependencies=dependencies, include_in_schema=False)

    @router.get("/openapi.json")
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @router.get("/docs")
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/v1/openapi.json", title=f"{app.title}: API")

    return router


def tokenizer_router(api: OpenAIApi, dependencies: list) -> APIRouter:
    """vLLM's /tokenize and /detokenize: what the model sees of a prompt (or a dialog), and back."""
    router = APIRouter(dependencies=dependencies)

    @router.post("/tokenize")
    async def tokenize(req: p.TokenizeRequest) -> p.TokenizeResponse:
        if (req.prompt is None) == (req.messages is None):
            raise ApiError(400, "send either prompt (a text) or messages (a dialog)", param="prompt")
        if req.add_generation_prompt is False:
            raise ApiError(400, "add_generation_prompt: false is not supported (the chat format always opens "
                                "the answer)", param="add_generation_prompt")
        if req.prompt is not None:
            ids = await api.gate.encode(req.prompt, "prompt", bos=None if req.add_special_tokens is None
                                        else req.add_special_tokens and api.tokenizer.bos_id is not None)
        else:
            ids = await api.gate.encode_dialog([_message(m, i) for i, m in enumerate(req.messages)], "messages")
        return p.TokenizeResponse(tokens=ids, count=len(ids), max_model_len=api.client.max_seq_len)

    @router.post("/detokenize")
    async def detokenize(req: p.DetokenizeRequest) -> p.DetokenizeResponse:
        return p.DetokenizeResponse(prompt=await api.gate.decode(req.tokens, "tokens"))

    return router


def finish_reason(ev: TokenEvent) -> str:
    return "length" if ev.finish_reason == "length" else "stop"


HINTS = {
    "functions": ": use tools", "function_call": ": use tool_choice",
    "suffix": ": insertion (fill-in-the-middle) is not implemented",
    "best_of": " (only best_of = n): every choice is returned",
    "store": " (only false): this server stores nothing",
    "modalities": " (only [\"text\"])", "service_tier": " (only \"auto\" or \"default\")",
}


def refuse_unsupported(req: p.SamplingRequest) -> None:
    """A 400 naming a field we cannot honour, rather than quietly answering something else."""
    if req.stream_options is not None and not req.stream:
        raise ApiError(400, "stream_options is only allowed with stream: true", param="stream_options")
    for name, neutral in p.REFUSED.items():
        if name not in type(req).model_fields:
            continue
        v = getattr(req, name)
        if v is None or any(type(v) is type(x) and v == x for x in neutral):
            continue
        if name == "best_of" and type(v) is int and v == (req.n or 1):
            continue
        raise ApiError(400, f"{name} is not supported by this server{HINTS.get(name, '')}", param=name)


def _message(m: p.ChatMessage, i: int) -> Message:
    """An API message as the chat format takes it; the format refuses what it cannot write."""
    return Message(_role(m.role), _content_text(m.content, i, m.role), name=m.name, tool_calls=m.tool_calls,
                   tool_call_id=m.tool_call_id)


def _role(role: str) -> str:
    return "system" if role == "developer" else role  # OpenAI's newer name for the system role


def _content_text(content: str | list[p.ContentPart] | None, i: int, role: str) -> str:
    if content is None and role != "assistant":
        raise ApiError(400, f"messages.{i}.content: a {role} message needs content", param=f"messages.{i}.content")
    if content is None or isinstance(content, str):
        return content or ""
    if any(part.type != "text" for part in content):
        raise ApiError(400, f"messages.{i}.content: only text parts are supported", param=f"messages.{i}.content")
    return "".join(part.text or "" for part in content)
