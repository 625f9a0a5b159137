"""Rank 0's web front: one FastAPI app on one port.

- `GET /health`: 200 while every rank is in step, 503 with the reason otherwise;
- `/v1/models`, `/v1/completions`, `/v1/chat/completions`: the OpenAI wire format
  (llama_demo.protocol), streamed as server-sent events when asked;
- `/`: the Gradio chat UI (gr.Blocks mounted with gr.mount_gradio_app), whose handler is also the
  gradio_client endpoint `/chat`.

Every route validates into SamplingParams + prompt ids and hands them to EngineClient; leaving
`client.generate` early (disconnect, Stop button) cancels the request on every rank.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable, TypeVar

import gradio as gr
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from . import protocol as p
from ..text.chat_format import ChatFormat, Message
from ..config import ServerConfig
from ..engine.engine import PromptTooLong, TokenEvent
from ..engine.sampler import SamplingParams
from .loop import EngineClient

ASSETS = Path(__file__).resolve().parents[2] / "assets"
WARNING = "⚠️"  # starts every problem report the UI writes into the chat
# SamplingParams field -> OpenAI request field, for the `param` of a 400
_PARAM_NAMES = {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p",
                "top_k": "top_k", "repetition_penalty": "repetition_penalty", "stop": "stop", "seed": "seed"}
T = TypeVar("T")


class ShareError(RuntimeError):
    """No public share link could be opened; the one-line message says why (usually: no internet)."""


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.info = status, p.ErrorInfo(message=message, type=type, param=param, code=code)


def build_app(client: EngineClient, chat_format: ChatFormat | None, cfg: ServerConfig,
              system_prompt: str = "") -> FastAPI:
    app = FastAPI(title=f"llama_demo: {client.model_name}", docs_url="/v1/docs", openapi_url="/v1/openapi.json")
    install_error_handlers(app)
    app.add_api_route("/health", lambda: health_response(client), methods=["GET"])
    app.include_router(openai_router(OpenAIApi(client, chat_format, cfg), cfg.auth))
    demo = build_ui(client, chat_format, cfg, system_prompt)
    return gr.mount_gradio_app(app, demo, path="/", auth=cfg.auth, theme=gr.themes.Soft(),
                               css_paths=[ASSETS / "style.css"], footer_links=["api"])


# --- health and errors ----------------------------------------------------------------------------


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


def install_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": 'Basic realm="llama_demo"'} if e.status == 401 else None
        return JSONResponse(p.ErrorResponse(error=e.info).model_dump(), status_code=e.status, headers=headers)

    async def invalid_body(request: Request, e: RequestValidationError) -> JSONResponse:
        if not request.url.path.startswith("/v1/"):
            return await request_validation_exception_handler(request, e)
        # OpenAI answers 400 for a malformed body; say which field and why. A union field (prompt:
        # str | list[str] | list[int]) fails once per member: one line, the members' reasons joined.
        reasons: dict[str, list[str]] = {}
        for err in e.errors():
            where = ".".join(str(x) for x in err.get("loc", ()) if x != "body" and not _is_type_tag(x))
            reasons.setdefault(where, []).append(err.get("msg", "invalid value"))
        where, msgs = next(iter(reasons.items()))
        return await api_error(request, ApiError(400, f"{where or 'body'}: {'; or '.join(dict.fromkeys(msgs))}",
                                                 param=where or None))

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, invalid_body)


def _is_type_tag(loc_part) -> bool:
    """pydantic names a union member in an error's loc ("str", "list[int]"): not a field."""
    return isinstance(loc_part, str) and (loc_part in ("str", "int", "float", "bool", "list", "dict")
                                          or "[" in loc_part)


def require_auth(auth: tuple[str, str] | None) -> list:
    """The /v1 dependency list: none, or a check of `Bearer user:pass` / HTTP basic credentials."""
    if auth is None:
        return []
    want = f"{auth[0]}:{auth[1]}".encode()

    def check(request: Request) -> None:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        given = value.strip().encode()
        if scheme.lower() == "basic":
            try:
                given = base64.b64decode(given, validate=True)
            except (binascii.Error, ValueError):
                given = b""
        if scheme.lower() not in ("bearer", "basic") or not secrets.compare_digest(given, want):
            raise ApiError(401, "this server needs credentials: send 'Authorization: Bearer USER:PASS' "
                                "(the OpenAI client's api_key='USER:PASS') or HTTP basic auth",
                           code="invalid_api_key")

    return [Depends(check)]


# --- the OpenAI API -------------------------------------------------------------------------------


@dataclass
class Job:
    """A validated request: what to send to the engine and how to label the answer."""
    prompt_ids: list[int]
    params: SamplingParams
    model: str


class OpenAIApi:
    def __init__(self, client: EngineClient, chat_format: ChatFormat | None, cfg: ServerConfig):
        self.client, self.chat_format, self.cfg = client, chat_format, cfg

    def models(self) -> p.ModelList:
        return p.ModelList(data=[p.ModelCard(id=self.client.model_name, max_model_len=self.client.max_seq_len)])

    def completion_job(self, req: p.CompletionRequest) -> Job:
        refuse_unsupported(req, echo=req.echo, logprobs=req.logprobs is not None, best_of=(req.best_of or 1) != 1)
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ApiError(400, f"prompt: batches are not supported (got {len(prompt)} prompts); send one",
                               param="prompt")
            prompt = prompt[0]
        ids = self.client.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        return self._job(req, ids, req.max_tokens if req.max_tokens is not None else 16, (), "prompt")

    def chat_job(self, req: p.ChatCompletionRequest) -> Job:
        if self.chat_format is None:
            raise ApiError(400, "this server runs a base model without a chat format: use /v1/completions "
                                "(or restart with --chat)", param="messages")
        refuse_unsupported(req, logprobs=req.logprobs)
        dialog = [Message(_role(m.role), _content_text(m.content, i, m.role)) for i, m in enumerate(req.messages)]
        try:
            ids = self.chat_format.encode_dialog(dialog)
        except ValueError as e:
            raise ApiError(400, f"messages: {e}", param="messages") from None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        default = self.cfg.default_max_new_tokens  # clipped below to what the context has room for
        return self._job(req, ids, default if max_tokens is None else max_tokens,
                         self.chat_format.stop_strings, "messages")

    def _job(self, req: p.SamplingRequest, ids: list[int], max_tokens: int, stops, prompt_field: str) -> Job:
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        params = SamplingParams(
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k or 0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            max_new_tokens=max_tokens, stop=stop + [s for s in stops if s not in stop], seed=req.seed)
        try:
            self.client.validate(ids, params)
        except PromptTooLong as e:
            raise ApiError(400, str(e), param=prompt_field) from None
        except ValueError as e:  # SamplingError's message starts with the field it names: use the API's name
            field, _, rest = str(e).partition(" ")
            param = _PARAM_NAMES.get(field)
            raise ApiError(400, f"{param} {rest}" if param else str(e), param=param) from None
        # Like vLLM, answer what fits (finish_reason "length") rather than refuse a large max_tokens.
        params.max_new_tokens = min(params.max_new_tokens, self.client.max_seq_len - len(ids))
        return Job(ids, params, self.client.model_name)

    async def run(self, job: Job) -> tuple[str, str, int]:
        """The whole answer: (text, finish_reason, completion tokens)."""
        parts, n, reason = [], 0, "stop"
        async for ev in self.events(job):
            parts.append(ev.text)
            n += ev.token_id is not None
            if ev.finished:
                reason = finish_reason(ev)
        return "".join(parts), reason, n

    async def events(self, job: Job) -> AsyncIterator[TokenEvent]:
        """client.generate with its failures as API errors (the engine refusing, the model gone)."""
        gen = self.client.generate(job.prompt_ids, job.params)
        try:
            async for ev in gen:
                if ev.finish_reason == "error":
                    raise ApiError(400, ev.error or "the engine refused the request")
                yield ev
        except RuntimeError as e:
            raise ApiError(503, str(e), type="server_error") from None
        finally:
            await gen.aclose()  # before an exception leaves: cancels the request now, not at GC

    def usage(self, job: Job, n: int) -> p.UsageInfo:
        k = len(job.prompt_ids)
        return p.UsageInfo(prompt_tokens=k, completion_tokens=n, total_tokens=k + n)


def openai_router(api: OpenAIApi, auth: tuple[str, str] | None) -> APIRouter:
    router = APIRouter(prefix="/v1", dependencies=require_auth(auth))

    @router.get("/models")
    async def models() -> p.ModelList:
        return api.models()

    @router.post("/completions")
    async def completions(req: p.CompletionRequest, request: Request):
        job = api.completion_job(req)
        if req.stream:
            def chunk(text: str, reason: str | None, cid: str) -> p.CompletionStreamResponse:
                return p.CompletionStreamResponse(id=cid, model=job.model, choices=[
                    p.CompletionResponseChoice(text=text, finish_reason=reason)])
            return await stream(api, job, req, request, p.CompletionStreamResponse, chunk)
        text, reason, n = await until_disconnect(request, api.run(job))
        return p.CompletionResponse(model=job.model, usage=api.usage(job, n),
                                    choices=[p.CompletionResponseChoice(text=text, finish_reason=reason)])

    @router.post("/chat/completions")
    async def chat_completions(req: p.ChatCompletionRequest, request: Request):
        job = api.chat_job(req)
        if req.stream:
            def chunk(text: str, reason: str | None, cid: str) -> p.ChatCompletionStreamResponse:
                delta = p.DeltaMessage(content=text) if text or reason is None else p.DeltaMessage()
                return p.ChatCompletionStreamResponse(id=cid, model=job.model, choices=[
                    p.ChatCompletionStreamChoice(delta=delta, finish_reason=reason)])
            return await stream(api, job, req, request, p.ChatCompletionStreamResponse, chunk,
                                first=p.DeltaMessage(role="assistant", content=""))
        text, reason, n = await until_disconnect(request, api.run(job))
        return p.ChatCompletionResponse(model=job.model, usage=api.usage(job, n), choices=[
            p.ChatCompletionResponseChoice(message=p.ResponseMessage(content=text), finish_reason=reason)])

    return router


class EventStream(StreamingResponse):
    """SSE that closes its generator however the response ends (client gone, server stopping),
    so the engine request behind it is cancelled at once rather than when it is collected."""

    def __init__(self, content: AsyncIterator[str]):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def stream(api: OpenAIApi, job: Job, req: p.SamplingRequest, request: Request, kind: type, chunk: Callable,
                 first: p.DeltaMessage | None = None) -> EventStream:
    events = api.events(job)
    # Wait for the first event before answering, so that a request the engine refuses is a 400
    # with a status code, not an error inside a 200 stream.
    try:
        head = await until_disconnect(request, anext(events))
    except BaseException:
        await events.aclose()
        raise
    cid = kind(model=job.model, choices=[]).id  # every chunk of one answer carries the same id

    def sse(obj: BaseModel) -> str:
        return f"data: {obj.model_dump_json()}\n\n"

    async def body() -> AsyncIterator[str]:
        n, ev = 0, head
        try:
            if first is not None:  # OpenAI's chat stream opens with the assistant's role
                yield sse(kind(id=cid, model=job.model, choices=[p.ChatCompletionStreamChoice(delta=first)]))
            while True:
                n += ev.token_id is not None
                if ev.text or ev.finished:
                    yield sse(chunk(ev.text, finish_reason(ev) if ev.finished else None, cid))
                if ev.finished or await request.is_disconnected():
                    break
                ev = await anext(events)
            if req.stream_options and req.stream_options.include_usage:
                yield sse(kind(id=cid, model=job.model, choices=[], usage=api.usage(job, n)))
        except ApiError as e:  # the model failed mid-answer: the status is sent already
            yield sse(p.ErrorResponse(error=e.info))
        finally:
            await events.aclose()
        yield "data: [DONE]\n\n"

    return EventStream(body())


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


# --- the Gradio chat UI ---------------------------------------------------------------------------


def ui_prompt_ids(client: EngineClient, chat_format: ChatFormat | None, message: str, history: list[dict],
                  system_prompt: str) -> list[int]:
    """Prompt ids for the UI's next answer: the dialog in the model's chat format, or in completion
    mode the message alone as plain text. Raises ValueError with a message for the user."""
    if not message.strip():
        raise ValueError("the message is empty: type a question first")
    if chat_format is None:
        return client.tokenizer.encode(message)
    dialog = [Message("system", system_prompt)] if system_prompt and system_prompt.strip() else []
    question = None
    for m in history:
        text = _ui_text(m.get("content"))
        if m.get("role") == "user":
            question = text  # an unanswered question (stopped early, refused) is replaced by the next
        elif m.get("role") == "assistant" and question is not None and not text.startswith(WARNING):
            dialog += [Message("user", question), Message("assistant", text)]
            question = None
    return chat_format.encode_dialog(dialog + [Message("user", message)])


def _ui_text(content) -> str:
    """Text of a Chatbot message: a string, or (Gradio 6) a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    if isinstance(content, (list, tuple)):
        return "".join(_ui_text(c) for c in content)
    return ""


class Rate:
    """The stats line under the chat: tokens and tokens/s of the answer being streamed."""

    def __init__(self):
        self.start, self.tokens = time.monotonic(), 0

    def line(self, ev: TokenEvent) -> str:
        self.tokens += ev.token_id is not None
        secs = time.monotonic() - self.start
        rate = self.tokens / secs if secs > 0 else 0.0
        return f"{self.tokens} tokens in {secs:.1f} s · **{rate:.1f} tokens/s**" + (
            f" · {ev.finish_reason}" if ev.finished else "")


def load_examples() -> list[str]:
    path = ASSETS / "examples.json"
    return [str(e) for e in json.loads(path.read_text(encoding="utf-8"))] if path.is_file() else []


def build_ui(client: EngineClient, chat_format: ChatFormat | None, cfg: ServerConfig,
             system_prompt: str = "") -> gr.Blocks:
    stops = list(chat_format.stop_strings) if chat_format is not None else []
    max_len = max(1, min(client.max_seq_len - 1, 4096))

    async def answer(message: str, history: list[dict], system_prompt: str, temperature: float, top_p: float,
                     max_new_tokens: int) -> AsyncIterator[tuple[str, str]]:
        """(answer so far, stats line) while the answer streams; problems become a ⚠️ answer."""
        try:
            ids = ui_prompt_ids(client, chat_format, message or "", history, system_prompt)
            params = SamplingParams(float(temperature), float(top_p), max_new_tokens=int(max_new_tokens), stop=stops)
            client.validate(ids, params)
        except ValueError as e:
            why = str(e)
            if isinstance(e, PromptTooLong) and history:
                why += " (or press Clear to start a new conversation)"
            gr.Warning(why)
            yield f"{WARNING} {why}", ""
            return
        params.max_new_tokens = min(params.max_new_tokens, client.max_seq_len - len(ids))
        text, rate = "", Rate()
        try:
            async for ev in client.generate(ids, params):  # Stop cancels this task, and so the request
                text += ev.text if ev.finish_reason != "error" else f"{WARNING} {ev.error}"
                yield text, rate.line(ev)
        except RuntimeError as e:  # the model stopped serving
            yield f"{text}\n\n{WARNING} {e}", ""

    def user_turn(message: str, history: list[dict]):
        return "", history + [{"role": "user", "content": message}], message

    async def respond(history: list[dict], message: str, *settings):
        async for text, line in answer(message, history[:-1], *settings):
            yield history + [{"role": "assistant", "content": text}], line

    async def chat(message: str, system_prompt: str, temperature: float, top_p: float, max_new_tokens: int):
        """One answer, streamed, for gradio_client: Client(url).predict(message, system_prompt,
        temperature, top_p, max_new_tokens, api_name="/chat") -> (answer, stats line).
        A fresh conversation each call; completion mode ignores system_prompt."""
        async for text, line in answer(message, [], system_prompt, temperature, top_p, max_new_tokens):
            yield text, line

    chat_mode = chat_format is not None
    with gr.Blocks(title=client.model_name, analytics_enabled=False) as demo:
        gr.Markdown(f"# {client.model_name}" + ("" if chat_mode else
                    "\nCompletion mode: the model continues the text you send."), elem_id="title")
        chatbot = gr.Chatbot(elem_id="chatbot", height=480, buttons=["copy", "copy_all"], show_label=False,
                             placeholder=f"Ask **{client.model_name}** something.")
        with gr.Row(equal_height=True):
            message = gr.Textbox(placeholder="Type a message and press Enter", elem_id="message", show_label=False,
                                 autofocus=True, scale=8, container=False)
            send = gr.Button("Send", variant="primary", elem_id="send", scale=1, min_width=80)
            stop = gr.Button("Stop", variant="stop", elem_id="stop", scale=1, min_width=80)
            clear = gr.Button("Clear", elem_id="clear", scale=1, min_width=80)
        stats = gr.Markdown("", elem_id="stats", label="stats")
        with gr.Accordion("Settings", open=False):
            settings = [
                gr.Textbox(system_prompt, label="System prompt", lines=2, visible=chat_mode),
                gr.Slider(0.0, 2.0, value=cfg.default_temperature, step=0.05, label="Temperature (0 = greedy)"),
                gr.Slider(0.05, 1.0, value=cfg.default_top_p, step=0.05, label="Top-p"),
                gr.Slider(1, max_len, value=min(cfg.default_max_new_tokens, max_len), step=1, label="Max new tokens"),
            ]
        if examples := load_examples():
            gr.Examples([[e] for e in examples], inputs=[message], label="Examples")
        pending = gr.State("")  # the message being answered, once the textbox is cleared

        answering = [
            trigger(user_turn, [message, chatbot], [message, chatbot, pending], queue=False, api_visibility="private")
            .then(respond, [chatbot, pending, *settings], [chatbot, stats], api_visibility="private",
                  concurrency_id="model", concurrency_limit=cfg.max_batch_size)
            for trigger in (message.submit, send.click)]
        stop.click(None, cancels=answering, api_visibility="private")
        # Cancel first, then empty: emptied by the cancelling event itself, the chat kept showing the
        # cancelled answer (seen in Chromium).
        clear.click(None, cancels=answering, api_visibility="private").then(
            lambda: ([], ""), None, [chatbot, stats], queue=False, api_visibility="private")
        # the API endpoint, as gr.ChatInterface makes its own: an event no one in the page triggers
        api_answer = gr.Textbox(visible=False, label="answer")
        gr.Button(visible=False).click(chat, [message, *settings], [api_answer, stats], api_name="chat",
                                       concurrency_id="model", concurrency_limit=cfg.max_batch_size)
    demo.queue(default_concurrency_limit=cfg.max_batch_size)
    return demo


# --- share links ----------------------------------------------------------------------------------


def open_share_tunnel(host: str, port: int) -> str:
    """A public https URL (Gradio's frp share server) forwarding to the app served at host:port.

    Gradio's own launch(share=True) does the same through gradio.networking.setup_tunnel; the
    tunnel process lives until this process exits. Raises ShareError (one line) without internet."""
    from gradio import networking

    local = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
    try:
        url = networking.setup_tunnel(local, port, secrets.token_urlsafe(32), None, None)
    except Exception as e:  # gradio raises RuntimeError/ValueError/OSError/httpx errors here
        cause = e.__cause__ or e
        why = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:200]
        raise ShareError(f"could not open a Gradio share link ({type(cause).__name__}: {why}); it needs internet "
                         f"access to api.gradio.app. The server still runs at http://{local}:{port}/") from None
    return "https://" + url.split("://", 1)[-1]  # frpc reports http; the share server speaks https
