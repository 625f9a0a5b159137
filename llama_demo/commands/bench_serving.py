"""Serving scenarios for the benchmark (python -m llama_demo.bench --scenario chat):

- a multi-turn chat: each turn's prompt is the whole conversation so far, as the chat page sends
  it; time to first token per turn with prefix reuse on and off;
- running decodes while a long prompt arrives: their token rate during its prefill against their
  rate without it.

Both drive the engine directly on this process's ranks (no HTTP), greedy, the same on every rank.
"""
from __future__ import annotations

import time

import torch

from ..engine.engine import Engine, Request
from ..engine.sampler import SamplingParams
from ..text.chat_format import ChatFormat, Message
from .bench import _sync

USER_TURNS = [
    "Tell me about llamas.", "Where do they live?", "What do they eat?", "How long do they live?",
    "Are they related to camels?", "Can they be kept as pets?", "What is their wool used for?",
    "Summarise what you told me.",
]


def _first_token_time(engine: Engine, req: Request) -> tuple[float, int, str]:
    """Seconds from adding `req` to its first token; then runs it to the end:
    (time to first token, prompt tokens reused from the cache, text)."""
    _sync(engine.device)
    t0 = time.perf_counter()
    engine.add(engine.check(req))
    ttft, reused, text = None, 0, []
    while not engine.idle:
        for ev in engine.step():
            if ttft is None and ev.token_id is not None:
                _sync(engine.device)
                ttft, reused = time.perf_counter() - t0, ev.reused
            text.append(ev.text)
    return ttft or 0.0, reused, "".join(text)


def chat_turns(engine: Engine, chat_format: ChatFormat, new_tokens: int = 100,
               turns: int = len(USER_TURNS)) -> list[dict]:
    """One conversation of `turns` turns, each answer `new_tokens` long (end-of-turn ids ignored,
    so every turn adds the same amount): per turn, prompt length, reused tokens, time to first token."""
    stop_ids, engine.stop_ids = engine.stop_ids, frozenset()
    try:
        dialog, out = [], []
        for i in range(turns):
            dialog.append(Message("user", USER_TURNS[i % len(USER_TURNS)]))
            ids = chat_format.encode_dialog(dialog)
            if len(ids) + new_tokens >= engine.max_seq_len:
                break
            ttft, reused, text = _first_token_time(
                engine, Request(f"turn{i}", ids, SamplingParams(temperature=0.0, max_new_tokens=new_tokens)))
            out.append({"turn": i + 1, "prompt_tokens": len(ids), "reused": reused, "ttft_s": ttft})
            dialog.append(Message("assistant", text))
        return out
    finally:
        engine.stop_ids = stop_ids


def decode_during_prefill(engine: Engine, vocab: int, running: int = 4, long_prompt: int = 1000,
                          window: int = 8, seed: int = 0) -> dict:
    """Aggregate decode rate (tokens/s) of `running` requests over `window` steps alone, then while
    a `long_prompt`-token prompt is prefilled beside them (until its first token)."""
    g = torch.Generator().manual_seed(seed)

    def prompt(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    long_prompt = min(long_prompt, engine.max_seq_len - 2)
    stop_ids, engine.stop_ids = engine.stop_ids, frozenset()
    try:
        far = engine.max_seq_len - 40  # decodes that outlast the measurement
        for i in range(running):
            engine.add(engine.check(Request(f"run{i}", prompt(32), SamplingParams(temperature=0.0, max_new_tokens=far))))
        while any(not s.out_ids for s in engine.running.values()):  # every running request decodes
            engine.step()

        def rate(until) -> tuple[float, int]:
            n, steps = 0, 0
            _sync(engine.device)
            t0 = time.perf_counter()
            while not until(steps):
                n += sum(1 for ev in engine.step() if str(ev.request_id).startswith("run") and ev.token_id is not None)
                steps += 1
            _sync(engine.device)
            return n / (time.perf_counter() - t0), steps

        alone, _ = rate(lambda steps: steps >= window)
        engine.add(engine.check(Request("long", prompt(long_prompt), SamplingParams(temperature=0.0, max_new_tokens=1))))
        during, steps = rate(lambda steps: steps > 0 and "long" not in engine.running)
        for rid in [f"run{i}" for i in range(running)]:
            engine.cancel(rid)
        return {"running": running, "long_prompt": long_prompt, "decode_tok_s_alone": alone,
                "decode_tok_s_during_prefill": during, "ratio": during / alone if alone else 0.0,
                "prefill_steps": steps, "step_tokens": engine.step_tokens}
    finally:
        engine.stop_ids = stop_ids
