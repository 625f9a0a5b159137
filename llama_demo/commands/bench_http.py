"""`bench --scenario serve`: the HTTP server as users meet it, beside llama.cpp's llama-server.

Streamed clients send the same fixed list of chat requests (a system prompt, a 40-300-word passage
of the bench text and a question; greedy; up to --new_tokens tokens) through the OpenAI API, either
`c` at a time (each client sends its next request when its answer ends) or at a fixed request rate.
Per run: output tokens a second over the run's wall time, time to first token (request sent to
first content delta) and inter-token latency (between content deltas) at p50 and p99.

Every server is started by this module, one after another, on this machine, with the same thread
count, and then the loads run in interleaved rounds (`interleaved`; medians over `--rounds`): ours is `app.py` (one rank); the peer is `llama-server` (found on PATH, at $LLAMA_SERVER, or
given with --llama_server) on the same model's GGUF, with as many parallel slots as clients. How to
build llama-server from the llama-cpp-python sdist (package registries only) is in the README.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

SYSTEM = "You are a careful reading assistant. Answer briefly, using only the passage."
QUESTIONS = ["Who is speaking in this passage?", "Summarise the passage in one sentence.",
             "What does the passage say about marriage?", "Which characters are mentioned?",
             "What is the mood of this passage?", "What happens next, do you think?"]
HEALTH_TIMEOUT_S = 600.0  # a server's start-up (load, calibration) must end within this


def workload(text_path: str | Path, n: int, seed: int = 0) -> list[list[dict]]:
    """n chat requests' messages: the system prompt, a passage of 40-300 words, a question."""
    words = Path(text_path).read_text(encoding="utf-8").split()
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(40, 300)
        start = rng.randrange(0, max(1, len(words) - length))
        passage = " ".join(words[start:start + length])
        out.append([{"role": "system", "content": SYSTEM},
                    {"role": "user", "content": f"{passage}\n\n{QUESTIONS[i % len(QUESTIONS)]}"}])
    return out


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


async def _one(client, url: str, model: str, messages: list[dict], new_tokens: int) -> dict:
    """One streamed chat request: its first-token time, its token times, its output tokens."""
    body = {"model": model, "messages": messages, "stream": True, "temperature": 0.0, "max_tokens": new_tokens,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    times, usage = [], None
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url} answered {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    times.append(time.perf_counter())
    tokens = (usage or {}).get("completion_tokens") or len(times)
    return {"ttft": times[0] - t0 if times else None, "itl": [b - a for a, b in zip(times, times[1:])],
            "tokens": tokens, "end": time.perf_counter()}


async def drive(base: str, model: str, requests: list[list[dict]], new_tokens: int, concurrency: int | None = None,
                rate: float | None = None, seed: int = 0) -> dict:
    """Send every request, `concurrency` clients at a time, or at `rate` requests a second (Poisson
    arrivals); returns output tok/s and TTFT / ITL percentiles (seconds)."""
    import httpx

    url = f"{base}/v1/chat/completions"
    results = []
    # a new connection per request, for both servers alike: llama-server may close a kept-alive
    # connection between two requests of a client, which httpx only learns when it reuses it
    limits = httpx.Limits(max_connections=len(requests) + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        t0 = time.perf_counter()
        if rate:
            rng = random.Random(seed)
            tasks = []
            for messages in requests:
                tasks.append(asyncio.create_task(_one(client, url, model, messages, new_tokens)))
                await asyncio.sleep(rng.expovariate(rate))
            results = await asyncio.gather(*tasks)
        else:
            todo = list(requests)

            async def user():
                while todo:
                    results.append(await _one(client, url, model, todo.pop(0), new_tokens))

            await asyncio.gather(*(user() for _ in range(concurrency or 1)))
        wall = max(r["end"] for r in results) - t0
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    itl = [x for r in results for x in r["itl"]]
    tokens = sum(r["tokens"] for r in results)
    return {"requests": len(results), "lost": sum(1 for r in results if not r["tokens"]), "output_tokens": tokens, "tok_s": tokens / wall, "wall_s": wall,
            "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
            "itl_p50": percentile(itl, 50), "itl_p99": percentile(itl, 99),
            "itl_mean": sum(itl) / len(itl) if itl else 0.0}


def scrape(base: str) -> dict[str, float]:
    """Our server's /metrics as {sample name: value} (a histogram's _sum and _count among them)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base}/metrics", timeout=10).text
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples if not s.labels}


def serving_costs(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Where a token's time went in our server over one load (seconds, means): the engine's decode
    steps, the loop's gap between two of them, the hand-off to the web thread, the web thread's
    work on the token (serve/metrics.py and serve/loop.StepClock measure them)."""
    def d(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    def mean(total: str, count: str) -> float:
        return d(total) / d(count) if d(count) else 0.0

    return {"step": mean("llama_demo_decode_step_seconds", "llama_demo_decode_steps"),
            "forward": mean("llama_demo_decode_forward_seconds", "llama_demo_decode_steps"),
            "gap": mean("llama_demo_step_gap_seconds", "llama_demo_step_gaps"),
            "handoff": mean("llama_demo_token_handoff_seconds_sum", "llama_demo_token_handoff_seconds_count"),
            "write": mean("llama_demo_token_write_seconds_sum", "llama_demo_token_write_seconds_count")}


@contextmanager
def running(cmd: list[str], base: str, env: dict | None = None, log: Path | None = None):
    """Start a server, wait for its /health to answer 200 (bounded), stop it at the end."""
    import httpx

    out = open(log, "w") if log else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited with {proc.returncode} before serving" + (f" (see {log})" if log else ""))
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{cmd[0]} did not serve within {HEALTH_TIMEOUT_S:.0f}s")
            time.sleep(0.5)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if log:
            out.close()


def interleaved(servers: list[tuple[str, list[str], dict | None]], loads: list, rounds: int, warm_up: list[list[dict]],
                new_tokens: int, slots: int, logs: Path, measure) -> list[dict]:
    """Every server started (one after another, each ready before the next starts: a start-up's
    probes time an otherwise idle machine) and warmed up, then `rounds` rounds of every load, each
    load on every server in turn: a slow minute of a shared machine then falls on all the servers
    of one load alike, not on whichever server ran in it (on the 2-core VM one server's figures
    moved by 15-30% between runs minutes apart). servers: (name, command without its port flags,
    env: ours when given, which then takes --zmq_port); measure(name, base, load, round) -> the
    load's row. Returns every round's rows, in order (summarize gives the medians)."""
    from contextlib import ExitStack

    from ..model.parallel import free_port

    rows = []
    with ExitStack() as stack:
        bases = {}
        for name, cmd, env in servers:
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            cmd = cmd + ["--port", str(port)] + (["--zmq_port", str(free_port())] if env is not None else [])
            stack.enter_context(running(cmd, base, env, logs / f"{name.replace(' ', '-')}.log"))
            asyncio.run(drive(base, "m", warm_up, new_tokens, concurrency=slots))
            bases[name] = base
        for rnd in range(rounds):
            for load in loads:
                for name, base in bases.items():
                    rows.append({**measure(name, base, load, rnd), "round": rnd})
    return rows


FIGURES = ("tok_s", "ttft_p50", "ttft_p99", "itl_p50", "itl_p99", "itl_mean", "acceptance", "tokens_per_verification")


def summarize(rows: list[dict], keys: tuple[str, ...]) -> list[dict]:
    """One row per `keys` (server, load, ...): each figure's median over its rounds (the middle
    round's for an odd count, the mean of the middle two for an even one), and every round's
    tok/s under "rounds"; rows of one round pass through as they are."""
    from statistics import median

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    out = []
    for group in groups.values():
        row = dict(group[0])
        row.pop("round", None)
        if len(group) > 1:
            for f in FIGURES:
                values = [r[f] for r in group if f in r]
                if values:
                    row[f] = median(values)
            row["rounds"] = [r["tok_s"] for r in group]
        out.append(row)
    return out


def find_llama_server(given: str | None) -> str | None:
    path = given or os.environ.get("LLAMA_SERVER") or shutil.which("llama-server")
    return path if path and Path(path).is_file() else None


def peer_gguf(llama_server: str, source: Path, kind: str, cache: Path) -> Path:
    """`source` as llama.cpp's `kind` (f32, q8_0, q4_0), made once by the llama-quantize built beside
    llama-server (from a quantized source with --allow-requantize: what our float32 model holds)."""
    path = cache / f"{source.stem}.{kind}.gguf"
    if not path.is_file():
        quantize = Path(llama_server).with_name("llama-quantize")
        if not quantize.is_file():
            raise RuntimeError(f"{quantize} not found: build the llama-quantize target beside llama-server")
        cache.mkdir(parents=True, exist_ok=True)
        src = source if kind == "f32" else peer_gguf(llama_server, source, "f32", cache)
        tmp = path.with_suffix(".tmp")
        subprocess.run([str(quantize), "--allow-requantize", str(src), str(tmp), kind.upper()], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        tmp.rename(path)
    return path


def serve_scenario(ckpt_dir: str, weights: list[str], concurrency: list[int], rates: list[float], n_requests: int,
                   new_tokens: int, text: str, threads: int, llama_server: str | None, gguf: Path | None,
                   extra_args: list[str], cache: Path, logs: Path, rounds: int = 1) -> list[dict]:
    """Each weight kind (float32, int8, int4), ours and llama-server's, at each concurrency and
    rate, `rounds` times interleaved (interleaved); the rows are the medians (summarize)."""
    # every load of every round gets requests of its own (the same for all servers): a server must
    # not find an earlier load's prompts in its cache (llama-server keeps prompts in host memory,
    # we keep blocks)
    loads = [(w, kind, x) for w in weights for kind, x in [("c", n) for n in concurrency] + [("r", r) for r in rates]]
    requests = {(load, rnd): workload(text, n_requests, seed=1 + i + rnd * len(loads))
                for rnd in range(rounds) for i, load in enumerate(loads)}
    warm_up = workload(text, max(concurrency + [8]), seed=0)
    peer_kind = {"float32": "f32", "int8": "q8_0", "int4": "q4_0"}
    env = dict(os.environ, LLAMA_DEMO_TORCH_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    logs.mkdir(parents=True, exist_ok=True)
    slots = max(concurrency + [8 if rates else 1])
    servers = []
    for w in weights:
        cmd = [sys.executable, str(Path(__file__).resolve().parents[2] / "app.py"), "--ckpt_dir", ckpt_dir,
               "--max_batch_size", str(slots), "--max_waiting", str(4 * n_requests), *extra_args]
        servers.append((f"llama_demo {w}", cmd + (["--quantize", w] if w != "float32" else []), env))
        if llama_server and gguf:
            path = peer_gguf(llama_server, gguf, peer_kind[w], cache)
            servers.append((f"llama-server {w}", [llama_server, "-m", str(path), "--host", "127.0.0.1", "-t", str(threads),
                                                  "-tb", str(threads), "-np", str(slots), "-c", str(slots * 2048),
                                                  "--no-webui"], None))

    def measure(name: str, base: str, load, rnd: int) -> dict:
        w, kind, x = load
        server, served = name.split(" ")
        if served != w:
            return {}
        before = scrape(base) if server == "llama_demo" else None
        figures = asyncio.run(drive(base, "m", requests[load, rnd], new_tokens,
                                    **({"concurrency": x} if kind == "c" else {"rate": x})))
        row = {"server": server, "weights": w, "load": f"{x} users" if kind == "c" else f"{x:g} req/s", **figures}
        if before is not None:
            row["costs"] = serving_costs(before, scrape(base))
        print_row(row, rnd if rounds > 1 else None)
        return row

    rows = [r for r in interleaved(servers, loads, rounds, warm_up, new_tokens, slots, logs, measure) if "server" in r]
    return summarize(rows, ("server", "weights", "load"))


def print_row(r: dict, rnd: int | None = None) -> None:
    print(f"{'' if rnd is None else f'round {rnd + 1}: '}{r['server']:>12} {r['weights']:>7} {r['load']:>10}: "
          f"{r['tok_s']:6.1f} tok/s  TTFT p50 {r['ttft_p50']:.2f} "
          f"p99 {r['ttft_p99']:.2f} s  ITL p50 {1000 * r['itl_p50']:.0f} p99 {1000 * r['itl_p99']:.0f} ms "
          f"({r['requests']} requests, {r['output_tokens']} tokens, {r['lost']} without an answer)", flush=True)
    if "costs" in r:
        c = r["costs"]
        print(f"{'':>12} a token's time, ms: ITL mean {1000 * r['itl_mean']:.2f} = decode step {1000 * c['step']:.2f} "
              f"(forward {1000 * c['forward']:.2f}, sampling and the rest {1000 * (c['step'] - c['forward']):.2f}) "
              f"+ {1000 * (r['itl_mean'] - c['step']):.2f} beyond it (the loop's gap between steps "
              f"{1000 * c['gap']:.2f}; overlapping the next step: hand-off to the web thread {1000 * c['handoff']:.2f}, "
              f"its work on the token {1000 * c['write']:.2f})", flush=True)


def print_ratios(rows: list[dict]) -> None:
    """Ours over llama-server's, per weight kind and load, from the same run."""
    peer = {(r["weights"], r["load"]): r for r in rows if r["server"] == "llama-server"}
    for r in rows:
        p = peer.get((r["weights"], r["load"]))
        if r["server"] != "llama_demo" or p is None:
            continue
        print(f"{'median ' if 'rounds' in r else ''}ratio {r['weights']:>7} {r['load']:>10}: tok/s {r['tok_s'] / p['tok_s']:.2f}x, "
              f"TTFT p50 {r['ttft_p50']:.2f} vs {p['ttft_p50']:.2f} s, ITL p99 {r['itl_p99'] / max(p['itl_p99'], 1e-9):.2f}x")
