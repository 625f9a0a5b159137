"""Test doubles for the web layer: an in-process EngineClient and a uvicorn server in a thread."""
from __future__ import annotations

import asyncio
import itertools
import threading
import time

from llama_demo.text.chat_format import JinjaChatFormat
from llama_demo.engine.engine import TokenEvent, check_prompt
from llama_demo.engine.sampler import SamplingParams
from llama_demo.serve.loop import Health
from llama_demo.text.tokenizer import StreamDecoder, Tokenizer

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
                 model_name: str = "fake-llama", script: str | None = None):
        self.tokenizer, self.max_seq_len, self.model_name = tokenizer, max_seq_len, model_name
        self.delay = delay  # seconds per token, so that a test can leave mid-stream
        self.script = script
        self.health = Health(time.time(), time.monotonic(), 60.0)
        self.last_stats: dict = {}
        self.requests: list[tuple[list[int], SamplingParams]] = []
        self.cancelled: list[str] = []
        self.cancel_event = threading.Event()
        self.refuse: str | None = None  # set: the engine answers the next request with an error event
        self._ids = itertools.count(1)

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        params.validate()
        check_prompt(len(prompt_ids), self.max_seq_len)

    async def generate(self, prompt_ids: list[int], params: SamplingParams):
        self.validate(prompt_ids, params)
        rid = f"r{next(self._ids)}"
        self.requests.append((list(prompt_ids), params))
        if self.refuse:
            yield TokenEvent(rid, None, "", True, "error", error=self.refuse)
            return
        n = min(params.max_new_tokens, self.max_seq_len - len(prompt_ids))
        answer = continuation(prompt_ids, n)
        if self.script is not None:
            answer = self.tokenizer.encode(self.script, bos=False)[:n]
        reason = "stop" if len(answer) < n else "length"
        decoder = StreamDecoder(self.tokenizer)
        finished, start = False, time.monotonic()
        try:
            for i, tok in enumerate(answer):
                await asyncio.sleep(self.delay)
                finished = i == len(answer) - 1
                text = decoder.push(tok) + (decoder.flush() if finished else "")
                yield TokenEvent(rid, tok, text, finished, reason if finished else None)
            self.last_stats = {"tokens": n, "seconds": time.monotonic() - start, "tokens_per_s": 0.0}
        finally:
            if not finished:  # as EngineClient: leaving early cancels the request
                self.cancelled.append(rid)
                self.cancel_event.set()


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
