"""`bench --scenario speculative`: speculative decoding as users meet it, through the HTTP API.

The same streamed chat requests (greedy) go to several servers in one run, all started first, then
each load sent to every server in turn, in --rounds interleaved rounds (bench_http.interleaved):
app.py as it is, app.py with each `--speculative` method asked for (ngram, int8 / int4: its own
weights quantized as the draft, draft: --draft_ckpt_dir), and, where llama.cpp's `llama-server`
is found, llama-server as it is, with its own n-gram speculation (`--spec-type ngram-simple`) and,
beside our int8 / int4 drafts, with the same GGUF in q8_0 / q4_0 as its draft model (`-md`), on
the same GGUF and threads. Two workloads: input-grounded answers (rewrite, quote or edit a ~300-token
passage: the answer repeats its input, where prompt lookup shines) and open chat (questions with
no text to draw on: proposals are rare and mostly rejected, where speculation must cost nothing).
Each at 1 user and at --concurrency's largest. Our acceptance rate and tokens per verification
come from the server's /metrics after each load.
"""
from __future__ import annotations

import asyncio
import os
import random
import sys
from pathlib import Path

from .bench_http import drive, interleaved, peer_gguf, summarize

SYSTEM = "You are a helpful assistant."
GROUNDED_TASKS = ["Copy the passage above exactly, word for word.",
                  "Rewrite the passage above, keeping every sentence but putting each on its own line.",
                  "Quote the first four sentences of the passage above.",
                  "Repeat the passage above, replacing every name with the word NAME."]
OPEN_QUESTIONS = ["Write a short story about a dragon who learns to bake bread.", "How does a bicycle stay upright?",
                  "Give me five tips for learning a new language.", "What is the difference between weather and climate?",
                  "Describe a perfect day at the beach.", "Why is the sky blue?", "Explain what a computer program is.",
                  "Write a poem about autumn leaves."]


def grounded(text_path: str | Path, n: int, seed: int) -> list[list[dict]]:
    """n requests: a passage of about 300 tokens (200-240 words) and a task that reuses its text."""
    words = Path(text_path).read_text(encoding="utf-8").split()
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(200, 240)
        start = rng.randrange(0, len(words) - length)
        passage = " ".join(words[start:start + length])
        out.append([{"role": "system", "content": SYSTEM},
                    {"role": "user", "content": f"{passage}\n\n{GROUNDED_TASKS[i % len(GROUNDED_TASKS)]}"}])
    return out


def open_chat(n: int, seed: int) -> list[list[dict]]:
    rng = random.Random(seed)
    qs = OPEN_QUESTIONS * (n // len(OPEN_QUESTIONS) + 1)
    rng.shuffle(qs)
    return [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}] for q in qs[:n]]


def _spec_metrics(base: str) -> dict:
    import httpx

    text = httpx.get(f"{base}/metrics", timeout=30).text
    out = {}
    for line in text.splitlines():
        if line.startswith("llama_demo_speculative_"):
            name, value = line.rsplit(" ", 1)
            out[name.removeprefix("llama_demo_speculative_")] = float(value)
    return out


def speculative_scenario(ckpt_dir: str, concurrency: list[int], n_requests: int, new_tokens: int, text: str,
                         threads: int, llama_server: str | None, gguf: Path | None, spec_tokens: int,
                         cache: Path, logs: Path, methods: tuple[str, ...] = ("ngram",),
                         draft_dir: str | None = None, rounds: int = 1) -> list[dict]:
    """Every server (ours plain and with each method; llama-server plain and with its modes) on
    each workload at 1 user and at the most, `rounds` times interleaved (bench_http.interleaved);
    the rows are the medians (bench_http.summarize)."""
    users = sorted({1, max(concurrency)})
    loads = [(w, u) for w in ("grounded", "open chat") for u in users]
    requests = {(load, rnd): (grounded(text, n_requests, seed=1 + i + rnd * len(loads)) if load[0] == "grounded"
                              else open_chat(n_requests, seed=1 + i + rnd * len(loads)))
                for rnd in range(rounds) for i, load in enumerate(loads)}
    warm_up = open_chat(max(users), seed=0)
    env = dict(os.environ, LLAMA_DEMO_TORCH_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    logs.mkdir(parents=True, exist_ok=True)
    slots = max(users)
    app = [sys.executable, str(Path(__file__).resolve().parents[2] / "app.py"), "--ckpt_dir", ckpt_dir,
           "--max_batch_size", str(slots), "--max_waiting", str(4 * n_requests)]
    servers = [("llama_demo", app, env)]
    for m in methods:
        extra = ["--draft_ckpt_dir", draft_dir] if m == "draft" else []
        servers.append((f"llama_demo {m}", app + ["--speculative", m, "--num_speculative_tokens", str(spec_tokens)]
                        + extra, env))
    if llama_server and gguf:
        path = peer_gguf(llama_server, gguf, "f32", cache)
        peer = [llama_server, "-m", str(path), "--host", "127.0.0.1", "-t", str(threads), "-tb", str(threads),
                "-np", str(slots), "-c", str(slots * 2048), "--no-webui"]
        servers.append(("llama-server", peer, None))
        if "ngram" in methods:
            servers.append(("llama-server ngram", peer + ["--spec-type", "ngram-simple", "--spec-draft-n-max",
                                                          str(spec_tokens)], None))
        for m, kind in (("int8", "q8_0"), ("int4", "q4_0")):
            if m in methods:  # the same model quantized, as llama.cpp's own draft model
                servers.append((f"llama-server {m}", peer + ["-md", str(peer_gguf(llama_server, gguf, kind, cache)),
                                                             "--spec-draft-n-max", str(spec_tokens)], None))

    def measure(name: str, base: str, load, rnd: int) -> dict:
        w, u = load
        ours = name.startswith("llama_demo")
        before = _spec_metrics(base) if ours else {}
        row = {"server": name, "workload": w, "users": u,
               **asyncio.run(drive(base, "m", requests[load, rnd], new_tokens, concurrency=u))}
        after = _spec_metrics(base) if ours else {}
        if after.get("verifications", 0) > before.get("verifications", 0):
            d = {k: after.get(k, 0) - before.get(k, 0) for k in ("verifications", "proposed_tokens", "accepted_tokens")}
            row["acceptance"] = d["accepted_tokens"] / max(1, d["proposed_tokens"])
            row["tokens_per_verification"] = (d["accepted_tokens"] + d["verifications"]) / d["verifications"]
        print_row(row, rnd if rounds > 1 else None)
        return row

    rows = interleaved(servers, loads, rounds, warm_up, new_tokens, slots, logs, measure)
    return summarize(rows, ("server", "workload", "users"))


def print_row(r: dict, rnd: int | None = None) -> None:
    spec = (f", acceptance {r['acceptance']:.2f}, {r['tokens_per_verification']:.2f} tokens/verification"
            if "acceptance" in r else "")
    print(f"{'' if rnd is None else f'round {rnd + 1}: '}{r['server']:>18} {r['workload']:>9} {r['users']:>2} users: "
          f"{r['tok_s']:6.1f} tok/s, TTFT p50 "
          f"{r['ttft_p50']:.2f} s, ITL p50 {1000 * r['itl_p50']:.0f} p99 {1000 * r['itl_p99']:.0f} ms{spec}", flush=True)


def print_ratios(rows: list[dict]) -> None:
    """Each server with speculation over the same server without it, per workload and load, and
    ours beside llama-server's same mode."""
    by = {(r["server"], r["workload"], r["users"]): r for r in rows}
    for (server, w, u), r in by.items():
        if " " not in server:
            continue
        name, method = server.split(" ", 1)
        plain = by.get((name, w, u))
        if plain:
            print(f"{'median ' if 'rounds' in r else ''}speed-up {server:>18} {w:>9} {u:>2} users: "
                  f"{r['tok_s'] / plain['tok_s']:.2f}x")
        if name == "llama_demo" and (f"llama-server {method}", w, u) in by:
            print(f"  vs llama-server {method}: {r['tok_s'] / by[f'llama-server {method}', w, u]['tok_s']:.2f}x")
