"""Rank 0's web front: one FastAPI app on one port.

- `GET /health`: 200 while every rank is in step, 503 with the reason otherwise;
- `/v1/models`, `/v1/completions`, `/v1/chat/completions`: the OpenAI wire format
  (serve.protocol), streamed as server-sent events when asked; errors in OpenAI's shape
  (serve.errors), access checked by serve.auth;
- `/`: the Gradio chat page (serve.ui).

Every route turns its body into a Job through the gate (serve.gate) and submits it to the
EngineClient; leaving early (disconnect, Stop button) cancels the request on every rank.
"""
from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator, Awaitable, Callable, TypeVar

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from ..config import API_SAMPLING, RETRY_AFTER_S, ServerConfig
from ..engine.engine import TokenEvent
from ..engine.sampler import SamplingParams
from ..text.chat_format import ChatFormat, Message
from . import protocol as p
from .auth import require_api_access
from .errors import ApiError, BodyLimit, install_error_handlers
from .gate import Gate, Job
from .loop import EngineClient, QueueFull, Submission
from .ui import build_ui, mount_ui

T = TypeVar("T")


def build_app(client: EngineClient, chat_format: ChatFormat | None, cfg: ServerConfig,
              system_prompt: str = "") -> FastAPI:
    gate = Gate(client.tokenizer, chat_format, client.max_seq_len, client.vocab_size, client.model_name)
    app = FastAPI(title=f"llama_demo: {client.model_name}", docs_url="/v1/docs", openapi_url="/v1/openapi.json")
    install_error_handlers(app)
    app.add_middleware(BodyLimit, limit=cfg.max_request_bytes)
    app.add_api_route("/health", lambda: health_response(client), methods=["GET"])
    app.include_router(openai_router(OpenAIApi(client, gate, cfg), require_api_access(cfg.api_key, cfg.auth)))
    return mount_ui(app, build_ui(client, gate, cfg, system_prompt), cfg)


def health_response(client: EngineClient) -> JSONResponse:
    h = client.health
    if h.ok():
        return JSONResponse({"status": "ok", "running": h.running, "waiting": h.waiting})
    if h.error or not h.loop_alive:
        reason = f"the serving loop stopped: {h.error or 'no error recorded'}"
    else:
        reason = f"no collective for {time.monotonic() - h.last_collective:.0f}s: a rank may be hung"
    return JSONResponse({"status": "unavailable", "reason": reason, "running": h.running, "waiting": h.waiting},
                        status_code=503)


class OpenAIApi:
    def __init__(self, client: EngineClient, gate: Gate, cfg: ServerConfig):
        self.client, self.gate, self.cfg = client, gate, cfg

    def models(self) -> p.ModelList:
        return p.ModelList(data=[p.ModelCard(id=self.client.model_name, max_model_len=self.client.max_seq_len)])

    async def completion_job(self, req: p.CompletionRequest) -> Job:
        refuse_unsupported(req, echo=req.echo, logprobs=req.logprobs is not None, best_of=(req.best_of or 1) != 1)
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ApiError(400, f"prompt: batches are not supported (got {len(prompt)} prompts); send one",
                               param="prompt")
            prompt = prompt[0]
        ids = await self.gate.encode(prompt, "prompt") if isinstance(prompt, str) else list(prompt)
        max_tokens = req.max_tokens if req.max_tokens is not None else API_SAMPLING.max_new_tokens
        return self.gate.job(ids, sampling(req, max_tokens), "prompt")

    async def chat_job(self, req: p.ChatCompletionRequest) -> Job:
        refuse_unsupported(req, logprobs=bool(req.logprobs))
        dialog = [Message(_role(m.role), _content_text(m.content, i, m.role)) for i, m in enumerate(req.messages)]
        ids = await self.gate.encode_dialog(dialog, "messages")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        # no max_tokens: the server's default, clipped by the gate to what the context has room for
        return self.gate.job(ids, sampling(req, self.cfg.page.max_new_tokens if max_tokens is None else max_tokens),
                             "messages")

    def submit(self, job: Job) -> Submission:
        try:
            return self.client.submit(job.prompt_ids, job.params)
        except QueueFull as e:
            raise ApiError(429, str(e), type="rate_limit_error", code="server_busy",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except RuntimeError as e:  # the model stopped serving
            raise ApiError(503, str(e), type="server_error") from None

    async def run(self, sub: Submission) -> tuple[str, str, int]:
        """The whole answer: (text, finish_reason, completion tokens)."""
        parts, n, reason = [], 0, "stop"
        async for ev in events(sub):
            parts.append(ev.text)
            n += ev.token_id is not None
            if ev.finished:
                reason = finish_reason(ev)
        return "".join(parts), reason, n

    def usage(self, job: Job, n: int) -> p.UsageInfo:
        k = len(job.prompt_ids)
        return p.UsageInfo(prompt_tokens=k, completion_tokens=n, total_tokens=k + n)


def sampling(req: p.SamplingRequest, max_tokens: int) -> SamplingParams:
    """The request's sampling fields, OpenAI's defaults for those it leaves out (the gate checks them)."""
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    return SamplingParams(
        temperature=API_SAMPLING.temperature if req.temperature is None else req.temperature,
        top_p=API_SAMPLING.top_p if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        max_new_tokens=max_tokens, stop=stop, seed=req.seed)


async def events(sub: Submission) -> AsyncIterator[TokenEvent]:
    """A submission's events with its failures as API errors (a request that failed inside the
    engine, the model gone); closing it early cancels the request now, not at collection."""
    try:
        async for ev in sub:
            if ev.finish_reason == "error":
                raise ApiError(500, f"the request failed: {ev.error or 'no reason given'}", type="server_error")
            yield ev
    except RuntimeError as e:
        raise ApiError(503, str(e), type="server_error") from None
    finally:
        sub.close()


def openai_router(api: OpenAIApi, dependencies: list) -> APIRouter:
    router = APIRouter(prefix="/v1", dependencies=dependencies)

    @router.get("/models")
    async def models() -> p.ModelList:
        return api.models()

    @router.post("/completions")
    async def completions(req: p.CompletionRequest, request: Request):
        job = await api.completion_job(req)
        sub = api.submit(job)
        if req.stream:
            def chunk(text: str, reason: str | None, cid: str) -> p.CompletionStreamResponse:
                return p.CompletionStreamResponse(id=cid, model=job.model, choices=[
                    p.CompletionResponseChoice(text=text, finish_reason=reason)])
            return stream(api, job, sub, req, request, p.CompletionStreamResponse, chunk)
        try:
            text, reason, n = await until_disconnect(request, api.run(sub))
        finally:
            sub.close()
        return p.CompletionResponse(model=job.model, usage=api.usage(job, n),
                                    choices=[p.CompletionResponseChoice(text=text, finish_reason=reason)])

    @router.post("/chat/completions")
    async def chat_completions(req: p.ChatCompletionRequest, request: Request):
        job = await api.chat_job(req)
        sub = api.submit(job)
        if req.stream:
            def chunk(text: str, reason: str | None, cid: str) -> p.ChatCompletionStreamResponse:
                delta = p.DeltaMessage(content=text) if text or reason is None else p.DeltaMessage()
                return p.ChatCompletionStreamResponse(id=cid, model=job.model, choices=[
                    p.ChatCompletionStreamChoice(delta=delta, finish_reason=reason)])
            return stream(api, job, sub, req, request, p.ChatCompletionStreamResponse, chunk,
                          first=p.DeltaMessage(role="assistant", content=""))
        try:
            text, reason, n = await until_disconnect(request, api.run(sub))
        finally:
            sub.close()
        return p.ChatCompletionResponse(model=job.model, usage=api.usage(job, n), choices=[
            p.ChatCompletionResponseChoice(message=p.ResponseMessage(content=text), finish_reason=reason)])

    @router.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
    async def unknown(path: str, request: Request):
        raise ApiError(404, f"{request.method} /v1/{path}: no such endpoint on this server (it serves /v1/models, "
                            "/v1/completions and /v1/chat/completions)", type="not_found_error", code="not_found")

    return router


class EventStream(StreamingResponse):
    """SSE that ends its request however the response ends (client gone before or during the body,
    server stopping), so the engine request behind it is cancelled at once. The headers go out at
    once: a client sees the stream open while its request waits for a KV row."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            self.on_close()


def stream(api: OpenAIApi, job: Job, sub: Submission, req: p.SamplingRequest, request: Request, kind: type,
           chunk: Callable, first: p.DeltaMessage | None = None) -> "EventStream":
    """The answer as server-sent events. The request is checked and published already, so the
    response starts at once; a failure mid-answer is an error event, then [DONE]."""
    cid = kind(model=job.model, choices=[]).id  # every chunk of one answer carries the same id
    created = int(time.time())  # and the same creation time

    def sse(obj: BaseModel) -> str:
        return f"data: {obj.model_dump_json()}\n\n"

    async def body() -> AsyncIterator[str]:
        n = 0
        answer = events(sub)
        try:
            if first is not None:  # OpenAI's chat stream opens with the assistant's role
                yield sse(kind(id=cid, created=created, model=job.model,
                               choices=[p.ChatCompletionStreamChoice(delta=first)]))
            async for ev in answer:
                n += ev.token_id is not None
                if ev.text or ev.finished:
                    out = chunk(ev.text, finish_reason(ev) if ev.finished else None, cid)
                    out.created = created
                    yield sse(out)
                if ev.finished or await request.is_disconnected():
                    break
            if req.stream_options and req.stream_options.include_usage:
                yield sse(kind(id=cid, created=created, model=job.model, choices=[], usage=api.usage(job, n)))
        except ApiError as e:  # the request failed mid-answer: the status is sent already
            yield sse(p.ErrorResponse(error=e.info))
        finally:
            await answer.aclose()
        yield "data: [DONE]\n\n"

    return EventStream(body(), sub.close)


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and so its engine request) if the client goes away first."""
    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait([task, watch], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait([task])  # let it unwind: its generators close, the engine request is cancelled
    if task.cancelled():
        raise ApiError(499, "the client closed the connection")
    return task.result()


def finish_reason(ev: TokenEvent) -> str:
    return "length" if ev.finish_reason == "length" else "stop"


def refuse_unsupported(req: p.SamplingRequest, **used: bool) -> None:
    """A 400 naming a field we cannot honour, rather than quietly answering something else."""
    used.update(n=req.n != 1, presence_penalty=bool(req.presence_penalty),
                frequency_penalty=bool(req.frequency_penalty))
    for name, is_used in used.items():
        if is_used:
            hint = " (only n=1)" if name == "n" else " (use repetition_penalty)" if "penalty" in name else ""
            raise ApiError(400, f"{name} is not supported by this server{hint}", param=name)


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
