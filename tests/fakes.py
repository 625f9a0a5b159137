"""Test doubles for the web layer: an in-process EngineClient and a uvicorn server in a thread."""
from __future__ import annotations

import asyncio
import itertools
import threading
import time

from llama_demo.text.chat_format import JinjaChatFormat
from llama_demo.engine.engine import TokenEvent
from llama_demo.engine.sampler import SamplingParams
from llama_demo.model.parallel import free_port
from llama_demo.serve.loop import Health, QueueFull
from llama_demo.text.detok import StreamDecoder
from llama_demo.text.tokenizer import Tokenizer

CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def chat_format(tokenizer: Tokenizer) -> JinjaChatFormat:
    return JinjaChatFormat(CHATML, tokenizer)


def continuation(prompt_ids: list[int], n: int) -> list[int]:
    """The fake model's answer: the prompt's ids reversed, repeated as long as asked."""
    rev = prompt_ids[::-1]
    return [rev[i % len(rev)] for i in range(n)]


def expected_text(tokenizer: Tokenizer, prompt_ids: list[int], max_new_tokens: int, max_seq_len: int) -> str:
    return tokenizer.decode(continuation(prompt_ids, min(max_new_tokens, max_seq_len - len(prompt_ids))))


class FakeClient:
    """EngineClient's interface over a deterministic continuation; records cancellations.

    The answer is `continuation(prompt)`, or with `script` set that text, ending with "stop"."""

    def __init__(self, tokenizer: Tokenizer, max_seq_len: int = 256, delay: float = 0.0,
                 model_name: str = "fake-llama", script: str | None = None, capacity: int = 1000):
        self.tokenizer, self.max_seq_len, self.model_name = tokenizer, max_seq_len, model_name
        self.vocab_size = tokenizer.vocab_size
        self.delay = delay  # seconds per token, so that a test can leave mid-stream
        self.script = script
        self.capacity = capacity  # requests in flight before submit() refuses (QueueFull)
        self.in_flight = 0
        self.health = Health(time.time(), time.monotonic(), 60.0)
        self.requests: list[tuple[list[int], SamplingParams]] = []
        self.cancelled: list[str] = []
        self.cancel_event = threading.Event()
        self.refuse: str | None = None  # set: the engine fails the next request with this error
        self._ids = itertools.count(1)

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> "FakeSubmission":
        return self.submit_many([(prompt_ids, params)])[0]

    def submit_many(self, requests: list[tuple[list[int], SamplingParams]]) -> list["FakeSubmission"]:
        if self.in_flight + len(requests) > self.capacity:  # all or none, as EngineClient
            raise QueueFull(f"the server is busy: {self.in_flight} requests are running or waiting")
        subs = []
        for prompt_ids, params in requests:
            rid = f"r{next(self._ids)}"
            self.requests.append((list(prompt_ids), params))
            self.in_flight += 1
            subs.append(FakeSubmission(self, rid, self._answer(rid, prompt_ids, params)))
        return subs

    async def _answer(self, rid: str, prompt_ids: list[int], params: SamplingParams):
        if self.refuse:
            yield TokenEvent(rid, None, "", True, "error", error=self.refuse)
            return
        n = min(params.max_new_tokens, self.max_seq_len - len(prompt_ids))
        answer = continuation(prompt_ids, n)
        if self.script is not None:
            answer = self.tokenizer.encode(self.script, bos=False)[:n]
        reason = "stop" if len(answer) < n else "length"
        decoder = StreamDecoder(self.tokenizer)
        for i, tok in enumerate(answer):
            await asyncio.sleep(self.delay)
            finished = i == len(answer) - 1
            text = decoder.push(tok) + (decoder.flush() if finished else "")
            ev = TokenEvent(rid, tok, text, finished, reason if finished else None)
            if params.logprobs is not None:
                ev.logprob, ev.top_logprobs = fake_logprobs(tok, params.logprobs)
            if i == 0 and params.prompt_logprobs is not None:
                ev.prompt_logprobs = [(prompt_ids[0], None, [])] + [
                    (t, *fake_logprobs(t, params.prompt_logprobs)) for t in prompt_ids[1:]]
            yield ev


def fake_logprobs(tok: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """The fake model's logprobs: every token is the most likely, at -0.25; alternatives below it."""
    return -0.25, [(tok, -0.25)] + [((tok + j) % 7 + 400, -0.25 - j) for j in range(1, k)][:max(0, k - 1)] if k else []


class FakeSubmission:
    """As serve.loop.Submission: events in order; close() before the end records a cancellation."""

    def __init__(self, client: FakeClient, rid: str, events):
        self.client, self.id, self._events, self._done = client, rid, events, False

    def __aiter__(self):
        return self

    async def __anext__(self) -> TokenEvent:
        if self._done:
            raise StopAsyncIteration
        ev = await self._events.__anext__()
        if ev.finished:
            self._done = True
            self.client.in_flight -= 1
        return ev

    def close(self) -> None:
        if not self._done:
            self._done = True
            self.client.in_flight -= 1
            self.client.cancelled.append(self.id)
            self.client.cancel_event.set()


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1:port in a daemon thread; start/stop wait boundedly."""

    def __init__(self, app, port: int):
        import uvicorn

        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                                    timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start within 30 s")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


class SlowEventStream:
    """A TCP proxy on 127.0.0.1 in front of `port` that hands on the responses to Gradio's event
    stream (/queue/data) `delay` seconds late and everything else at once: a busy or distant link,
    where the page hears that an answer has ended well after the server has ended it."""

    def __init__(self, port: int, delay: float):
        self.target, self.delay = port, delay
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def _pipe(self, client_r, client_w):
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target)
        slow = False  # is the response now flowing back the event stream's?
        due: asyncio.Queue = asyncio.Queue()

        async def upstream():
            nonlocal slow
            while data := await client_r.read(65536):
                if data[:8].split(b" ")[0] in (b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS"):
                    slow = b"/queue/data" in data.split(b"\r\n", 1)[0]  # HTTP/1.1: one response at a time
                server_w.write(data)
                await server_w.drain()
            server_w.close()

        async def downstream():
            while data := await server_r.read(65536):
                await due.put((time.monotonic() + (self.delay if slow else 0.0), data))
            await due.put((time.monotonic() + self.delay, b""))

        async def deliver():
            while True:
                when, data = await due.get()
                await asyncio.sleep(max(0.0, when - time.monotonic()))
                if not data:
                    break
                client_w.write(data)
                await client_w.drain()
            client_w.close()

        try:
            await asyncio.gather(upstream(), downstream(), deliver())
        except (ConnectionError, OSError):
            pass
        finally:
            client_w.close()
            server_w.close()

    def __enter__(self) -> "SlowEventStream":
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._pipe, "127.0.0.1", self.port), self.loop).result(10)
        return self

    async def _close(self) -> None:
        self.server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()
