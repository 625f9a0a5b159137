"""Serving scenarios for the benchmark (python -m llama_demo.bench --scenario chat):

- a multi-turn chat: each turn's prompt is the whole conversation so far, as the chat page sends
  it; time to first token per turn with prefix reuse on and off;
- conversations that share a long system prompt: each one's time to first token against a fully
  cached prompt's;
- many chats at once in a fixed KV memory: how many run together, and their decode rate;
- running decodes while a long prompt arrives: their token rate during its prefill against their
  rate without it.

All drive the engine directly on this process's ranks (no HTTP), greedy, the same on every rank.
"""
from __future__ import annotations

import time

import torch

from ..engine.engine import Engine, Request
from ..engine.sampler import SamplingParams
from ..text.chat_format import ChatFormat, Message
from ..model.parallel import synchronize as _sync

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


def shared_system_prompt(engine: Engine, chat_format: ChatFormat, system: str, conversations: int = 8,
                         new_tokens: int = 16) -> dict:
    """`conversations` chats that start with the same long system prompt, one after another: the
    time to first token of each, and of the first one's prompt sent again (fully cached but its last
    token): the figure the later conversations are held to."""
    stop_ids, engine.stop_ids = engine.stop_ids, frozenset()
    try:
        out = []
        for i in range(conversations):
            ids = chat_format.encode_dialog([Message("system", system), Message("user", USER_TURNS[i % len(USER_TURNS)])])
            ttft, reused, _ = _first_token_time(
                engine, Request(f"sys{i}", ids, SamplingParams(temperature=0.0, max_new_tokens=new_tokens)))
            out.append({"prompt_tokens": len(ids), "reused": reused, "ttft_s": ttft})
        ids = chat_format.encode_dialog([Message("system", system), Message("user", USER_TURNS[0])])
        cached, reused, _ = _first_token_time(engine, Request("again", ids, SamplingParams(temperature=0.0, max_new_tokens=new_tokens)))
        later = max(c["ttft_s"] for c in out[1:]) if len(out) > 1 else 0.0
        return {"system_tokens": len(chat_format.encode_dialog([Message("system", system)])), "conversations": out,
                "cached_ttft_s": cached, "cached_reused": reused, "worst_later_over_cached": later / cached if cached else 0.0}
    finally:
        engine.stop_ids = stop_ids


def many_chats(engine: Engine, vocab: int, counts: tuple[int, ...] = (16, 32), prompt_len: int = 300,
               new_tokens: int = 100, seed: int = 0) -> list[dict]:
    """For each count, that many chats of `prompt_len` prompt + `new_tokens` answer tokens sent at
    once: how many ran at the same time (all of them: none waited for memory), the aggregate decode
    rate over the steps where every one of them decodes, and the KV blocks they held at the most."""
    g = torch.Generator().manual_seed(seed)
    stop_ids, engine.stop_ids = engine.stop_ids, frozenset()
    rows = []
    try:
        for n in counts:
            engine.scheduler.forget_cached()  # distinct random prompts: nothing to share
            for i in range(n):
                prompt = torch.randint(3, vocab, (prompt_len,), generator=g).tolist()
                engine.add(engine.check(Request(f"chat{i}", prompt, SamplingParams(temperature=0.0, max_new_tokens=new_tokens))))
            most, blocks, decoded, decode_s = 0, 0, 0, 0.0
            while not engine.idle:
                sched = engine.scheduler
                all_decode = len(sched.running) == n and all(s.decoding for s in sched.running.values())
                _sync(engine.device)
                t0 = time.perf_counter()
                events = engine.step()
                _sync(engine.device)
                if all_decode:
                    decoded += sum(1 for ev in events if ev.token_id is not None)
                    decode_s += time.perf_counter() - t0
                most, blocks = max(most, len(sched.running)), max(blocks, sched.pool.used)
            rows.append({"chats": n, "ran_at_once": most, "decode_tok_s": decoded / decode_s if decode_s else 0.0,
                         "kv_blocks_held": blocks, "kv_blocks": engine.scheduler.pool.num_blocks,
                         "preemptions": engine.scheduler.preempted_total})
        return rows
    finally:
        engine.stop_ids = stop_ids


def bench_chat(a) -> int:
    """`bench --scenario chat`: the chat scenarios above on --ckpt_dir, one engine whose KV pool
    has the memory of 8 sequences of 2048 positions (the old fixed cache's) shared by up to 32."""
    import json
    from pathlib import Path

    from ..config import DEFAULT_KV_ROWS
    from ..model.parallel import init_distributed, parse_dtype
    from ..text.chat_format import chat_format_for
    from ..text.tokenizer import load_tokenizer
    from ..weights.loading import load_model
    from .startup import find_tokenizer

    info = init_distributed(device=a.device)
    tok = load_tokenizer(find_tokenizer(a.ckpt_dir, None))
    model = load_model(a.ckpt_dir, info, parse_dtype(a.dtype), 2048, 32, progress=False, quantize=a.quantize,
                       kv_cache_tokens=DEFAULT_KV_ROWS * 2048)
    engine = Engine(model, tok, info.rank, info.world_size, info.device, seed=0)
    fmt = chat_format_for(a.ckpt_dir, tok)
    engine.calibrate()  # the step's budget, as the server's start-up measures it; and a warm-up
    turns = {}
    for reuse in (False, True):
        engine.scheduler.prefix_cache = reuse
        engine.scheduler.forget_cached()
        turns[reuse] = chat_turns(engine, fmt, new_tokens=100)
    system = _system_prompt(tok, 1500)
    shared = shared_system_prompt(engine, fmt, system)
    chats = many_chats(engine, model.args.vocab_size)
    prefill = decode_during_prefill(engine, model.args.vocab_size)
    if info.rank == 0:
        result = {"model": str(a.ckpt_dir), "ranks": info.world_size, "device": str(info.device),
                  "chat_turns": {"reuse": turns[True], "no_reuse": turns[False]}, "shared_system_prompt": shared,
                  "many_chats": chats, "decode_during_prefill": prefill}
        if a.json:
            print(json.dumps(result))
            return 0
        print(f"multi-turn chat, {Path(a.ckpt_dir).name}, 100 new tokens a turn: time to first token (s)")
        print(f"{'turn':>4} {'prompt':>7} {'reused':>7} {'reuse on':>9} {'reuse off':>10}")
        for on, off in zip(turns[True], turns[False]):
            print(f"{on['turn']:>4} {on['prompt_tokens']:>7} {on['reused']:>7} {on['ttft_s']:>9.3f} {off['ttft_s']:>10.3f}")
        last, first = turns[True][-1]["ttft_s"], turns[True][0]["ttft_s"]
        print(f"last turn / first turn with reuse: {last / first:.2f}x")
        print(f"{len(shared['conversations'])} conversations with one {shared['system_tokens']}-token system prompt: "
              f"time to first token " + ", ".join(f"{c['ttft_s']:.3f}" for c in shared["conversations"])
              + f" s (reused {', '.join(str(c['reused']) for c in shared['conversations'])}); fully cached prompt "
              f"{shared['cached_ttft_s']:.3f} s; worst later one {shared['worst_later_over_cached']:.2f}x that")
        for row in chats:
            print(f"{row['chats']} chats of 300 + 100 tokens at once, KV pool of {row['kv_blocks']} blocks: "
                  f"{row['ran_at_once']} ran at once, {row['decode_tok_s']:.1f} tok/s decoding all, "
                  f"{row['kv_blocks_held']} blocks held at most, {row['preemptions']} preemptions so far")
        print(f"{prefill['running']} running requests while a {prefill['long_prompt']}-token prompt is prefilled "
              f"({prefill['step_tokens']} tokens a step, {prefill['prefill_steps']} steps): "
              f"{prefill['decode_tok_s_during_prefill']:.1f} tok/s vs {prefill['decode_tok_s_alone']:.1f} alone "
              f"({prefill['ratio']:.2f}x)")
    return 0


def _system_prompt(tokenizer, tokens: int) -> str:
    """About `tokens` tokens of the project's sample text (assets/pride_and_prejudice.txt), as a
    system prompt: 'Answer from this book: ...'."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "assets" / "pride_and_prejudice.txt").read_text(encoding="utf-8")
    words = text.split()[:4 * tokens]
    lo, hi = 1, len(words)
    while lo < hi:  # the most words whose tokens fit
        mid = (lo + hi + 1) // 2
        if len(tokenizer.encode(" ".join(words[:mid]), bos=False, eos=False)) <= tokens:
            lo = mid
        else:
            hi = mid - 1
    return "Answer questions using this book:\n" + " ".join(words[:lo])
