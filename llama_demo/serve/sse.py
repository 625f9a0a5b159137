"""An answer's events on their way to the client: a submission's events with its failures as API
errors, every choice's events merged with keep-alives and a watch on the client (answer_events,
which every streamed front frames its own way), and OpenAI's server-sent-event stream over them.
"""
from __future__ import annotations

import asyncio
import time
from contextlib import aclosing
from typing import AsyncIterator, Awaitable, Callable, Protocol, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from ..engine.engine import TokenEvent
from . import protocol as p
from .errors import ApiError
from .loop import Submission

T = TypeVar("T")


class StreamingApi(Protocol):
    """What a stream needs of the API it serves (serve.openai.OpenAIApi)."""
    keepalive_s: float  # a keep-alive goes out after this long without an event

    def usage(self, choices: list, answers: list | None = None, tokens: int = 0,
              reused: list[int] | None = None) -> p.UsageInfo: ...


class Tracked:
    """A submission and its events as the metrics see them."""

    def __init__(self, sub: Submission, tracked: AsyncIterator[TokenEvent]):
        self.sub, self.tracked = sub, tracked

    def __aiter__(self):
        return self.tracked

    def close(self) -> None:
        self.sub.close()


async def events(sub: "Tracked | Submission") -> AsyncIterator[TokenEvent]:
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
        if isinstance(sub, Tracked):
            await sub.tracked.aclose()  # counts a request left midway now, not when collected


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


def stream(api: StreamingApi, choices: list, subs: list[Submission], req: p.SamplingRequest, request: Request,
           kind: type, chunk: Callable, opening: list[BaseModel] = ()) -> "EventStream":
    """The answers as server-sent events, every choice's chunks as they come (each names its
    index). The requests are checked and published already, so the response starts at once; a
    keep-alive comment goes out while nothing arrives (a request waiting for a KV row); a failure
    mid-answer is an error event, then [DONE]."""
    cid = kind(model="", choices=[]).id  # every chunk of one response carries the same id
    created = int(time.time())  # and the same creation time

    def sse(obj: BaseModel) -> str:
        if hasattr(obj, "created"):
            obj.id, obj.created = cid, created
        return f"data: {obj.model_dump_json()}\n\n"

    async def body() -> AsyncIterator[str]:
        tokens, started, reused = 0, [False] * len(subs), [0] * len(subs)
        for o in opening:  # OpenAI's chat stream opens each choice with the assistant's role
            yield sse(o)
        async with aclosing(answer_events(api, subs, request)) as answers:
            async for i, ev in answers:
                if ev is None:
                    yield ": keep-alive\n\n"
                    continue
                if isinstance(ev, ApiError):  # the request failed mid-answer: the status is sent already
                    yield sse(p.ErrorResponse(error=ev.info))
                    break
                tokens += ev.token_id is not None
                reused[i] = max(reused[i], ev.reused)
                out = chunk(i, ev, not started[i])
                started[i] = True
                if out is not None:
                    yield sse(out)
            else:
                if req.stream_options and req.stream_options.include_usage and not await request.is_disconnected():
                    yield sse(kind(model=choices[0].job.model, choices=[],
                                   usage=api.usage(choices, tokens=tokens, reused=reused)))
        yield "data: [DONE]\n\n"

    return EventStream(body(), lambda: [s.close() for s in subs])


DISCONNECT_CHECK_S = 0.1  # how often a stream asks whether its client is still there


async def answer_events(api: StreamingApi, subs: list, request: Request) -> AsyncIterator[tuple[int, object]]:
    """Every choice's events as they come, as (choice, event): a TokenEvent, an ApiError when the
    request failed (the stream should end with it), or None when nothing arrived for a keep-alive
    interval (a request waiting for a KV row). Ends when every answer is whole or the client has
    gone; the requests are closed (cancelled if unfinished) however it ends. Every streamed front
    (chat, completions, serve.responses, serve.messages) frames these its own way."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, sub: Submission) -> None:
        try:
            async for ev in events(sub):
                queue.put_nowait((i, ev))
        except ApiError as e:
            queue.put_nowait((i, e))
        except Exception as e:  # a bug of ours: end the stream with it rather than wait forever
            queue.put_nowait((i, ApiError(500, f"the answer could not be streamed: {e}", type="server_error")))

    pumps = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(subs)]
    left = len(subs)
    checked = time.monotonic()
    try:
        while left:
            try:  # an event that is there already costs no timer task (wait_for makes one a call)
                i, ev = queue.get_nowait()
            except asyncio.QueueEmpty:
                try:
                    i, ev = await asyncio.wait_for(queue.get(), api.keepalive_s)
                except asyncio.TimeoutError:
                    yield 0, None
                    continue
            yield i, ev
            if isinstance(ev, ApiError):
                return
            left -= ev.finished
            # a gone client is noticed within DISCONNECT_CHECK_S, not asked about at every token
            if time.monotonic() - checked >= DISCONNECT_CHECK_S:
                checked = time.monotonic()
                if await request.is_disconnected():
                    return
    finally:
        for t in pumps:
            t.cancel()
        for s in subs:
            s.close()


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
