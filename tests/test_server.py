"""End to end: `torchrun --nproc_per_node 2 app.py` on a random checkpoint, driven by the official
openai client; idle periods longer than the collective timeout; a rank that dies."""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import ROOT, python_module, subprocess_env
from llama_demo.model.parallel import free_port

PROMPTS = ["Once upon a time", "The quick brown fox", "def main():", "Café in 東京", "a little llama",
           "lived in the mountains", "emoji 🦙", "return 42"]
N_NEW = 12
COMPLETION = ("--no-chat", "--max_seq_len", "128")


class Server:
    def __init__(self, ckpt: Path, nproc: int, *extra: str):
        self.port, self.zmq = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "app.py", "--ckpt_dir", str(ckpt), "--port", str(self.port),
               "--zmq_port", str(self.zmq), *extra]
        self.log = open(ckpt.parent / f"server-{self.port}.log", "w+")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_healthy(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited early:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"server not healthy within {timeout}s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def rank_pid(self, rank: int) -> int:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"app.py" in cmdline and str(self.port).encode() in cmdline and f"RANK={rank}".encode() in env:
                return int(pid)
        raise AssertionError(f"no process for rank {rank}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()


@pytest.fixture(scope="module")
def server(ckpts):
    s = Server(ckpts["mha-2"], 2, *COMPLETION, "--dist_timeout", "5", "--heartbeat_interval", "1")
    try:
        s.wait_healthy()
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def reference(ckpts) -> dict[str, str]:
    """What the engine's CLI generates greedily for each prompt (a batch, on one rank)."""
    args = ["llama_demo.generate", "--ckpt_dir", str(ckpts["mha-2"]), "--json", "--temperature", "0",
            "--max_new_tokens", str(N_NEW), "--max_seq_len", "128"]
    for p in PROMPTS:
        args += ["--prompt", p]
    proc = python_module(args)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    return {r["prompt"]: r["completion"] for r in rows}


def _client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="none", timeout=60, max_retries=0)


def test_completion_plain_and_streamed_equal_the_cli(server, reference):
    c = _client(server)
    prompt = PROMPTS[0]
    r = c.completions.create(model="x", prompt=prompt, max_tokens=N_NEW, temperature=0)
    assert r.choices[0].text == reference[prompt]
    assert r.usage.completion_tokens == N_NEW
    chunks = [ch.choices[0].text for ch in c.completions.create(model="x", prompt=prompt, max_tokens=N_NEW,
                                                                 temperature=0, stream=True)]
    assert "".join(chunks) == reference[prompt]
    assert len([x for x in chunks if x]) > 1  # really streamed, not one blob


def test_usage_counts_the_prompt_tokens_found_in_the_kv_cache(server):
    # OpenAI's usage.prompt_tokens_details.cached_tokens: the engine's prefix reuse, as it happened
    c = _client(server)
    prompt = "A prompt that no other test sends, about a llama and its long walk"
    first = c.completions.create(model="x", prompt=prompt, max_tokens=3, temperature=0).usage
    assert first.prompt_tokens_details.cached_tokens <= 1  # at most the BOS another prompt left
    again = c.completions.create(model="x", prompt=prompt, max_tokens=3, temperature=0).usage
    # every whole KV block (16 positions) of the prompt but the last token, whose logits start the
    # answer, was cached by the first request
    whole = (first.prompt_tokens - 1) // 16 * 16
    assert again.prompt_tokens == first.prompt_tokens and whole > 0
    assert again.prompt_tokens_details.cached_tokens == whole
    streamed = [ch.usage for ch in c.completions.create(model="x", prompt=prompt, max_tokens=3, temperature=0,
                                                        stream=True, stream_options={"include_usage": True})]
    assert streamed[-1].prompt_tokens_details.cached_tokens == whole
    # n = 2 answers of one prompt: the prompt is counted once, cached as much as both found
    both = c.completions.create(model="x", prompt=prompt, max_tokens=3, temperature=0, n=2).usage
    assert both.prompt_tokens == first.prompt_tokens
    assert both.prompt_tokens_details.cached_tokens == whole  # both choices took the cached blocks


def test_eight_concurrent_clients_get_their_own_answers(server, reference):
    c = _client(server)

    def ask(p):
        stream = c.completions.create(model="x", prompt=p, max_tokens=N_NEW, temperature=0, stream=True)
        return "".join(ch.choices[0].text for ch in stream)

    with cf.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, PROMPTS))
    assert answers == [reference[p] for p in PROMPTS]


def test_overlong_prompt_is_a_400_and_the_server_keeps_answering(server, reference):
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "llama " * 400, "max_tokens": 4}, timeout=30)
    assert r.status_code == 400
    assert "context" in r.json()["error"]["message"]
    c = _client(server)
    assert c.completions.create(model="x", prompt=PROMPTS[1], max_tokens=N_NEW, temperature=0).choices[0].text == reference[PROMPTS[1]]


def test_heartbeat_keeps_an_idle_job_healthy_and_in_step(server, reference):
    """Idle ranks wait on the bus, not in a collective, so --dist_timeout (5 s) cannot fire; what
    can fail is health: /health is 503 once no collective ran for 10 s, so 16 s of idling stays
    healthy only because heartbeat ticks (every 1 s) keep every rank's all-reduce going."""
    for _ in range(4):
        time.sleep(4)
        assert httpx.get(server.url + "/health", timeout=5).status_code == 200
    c = _client(server)
    assert c.completions.create(model="x", prompt=PROMPTS[2], max_tokens=N_NEW, temperature=0).choices[0].text == reference[PROMPTS[2]]


def test_job_exits_promptly_naming_the_rank_that_died(ckpts):
    s = Server(ckpts["mha-1"], 2, *COMPLETION, "--heartbeat_interval", "1")
    try:
        s.wait_healthy()
        os.kill(s.rank_pid(1), signal.SIGKILL)
        t0 = time.monotonic()
        s.proc.wait(timeout=30)
        assert time.monotonic() - t0 < 15
        out = s.output()
        assert s.proc.returncode != 0
        assert "rank: 1" in out or "rank 1" in out, out[-3000:]
    finally:
        s.stop()


def test_gradio_client_drives_the_chat_endpoint(server, reference):
    from gradio_client import Client

    client = Client(server.url + "/", verbose=False)
    answer, stats = client.predict(PROMPTS[3], "", 0.0, 1.0, N_NEW, api_name="/chat")
    assert answer == reference[PROMPTS[3]]
    assert "tokens/s" in stats


def test_metrics_show_the_kv_pool(server):
    """/metrics on the real server: the pool's size, the blocks held now and the prefixes kept."""
    c = _client(server)
    c.completions.create(model="x", prompt="Another prompt no other test sends, long enough to fill one block", max_tokens=2)
    text = httpx.get(f"{server.url}/metrics").text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line.startswith("llama_demo_kv_") or line.startswith("llama_demo_preemptions")}
    assert values["llama_demo_kv_blocks"] > 0 and values["llama_demo_kv_blocks_cached"] >= 1
    assert values["llama_demo_kv_blocks_used"] == 0 and values["llama_demo_preemptions"] == 0  # nothing runs now


def test_metrics_show_where_a_tokens_time_goes(server):
    """/metrics times the engine's decode steps, the loop's gaps between them and the web side's work on
    each token (what `bench --scenario serve` prints per load); a streamed answer moves every one."""
    def samples() -> dict[str, float]:
        text = httpx.get(f"{server.url}/metrics").text
        return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
                if line.startswith("llama_demo_") and not line.startswith("#") and "{" not in line.split(" ")[0]}

    before = samples()
    stream = _client(server).completions.create(model="x", prompt="A stream timed token by token", max_tokens=8,
                                               temperature=0, stream=True, stream_options={"include_usage": True})
    n = [c for c in stream if c.usage][0].usage.completion_tokens
    assert n >= 4
    after = samples()
    grew = {name: after[name] - before.get(name, 0.0) for name in (
        "llama_demo_decode_steps", "llama_demo_decode_step_seconds", "llama_demo_decode_forward_seconds",
        "llama_demo_step_gaps", "llama_demo_step_gap_seconds", "llama_demo_token_handoff_seconds_count",
        "llama_demo_token_write_seconds_count")}
    # the prompt's step makes the first token; each later one comes from a decode step, all but the first of
    # them following another at once
    assert grew["llama_demo_decode_steps"] >= n - 1 and grew["llama_demo_step_gaps"] >= n - 2
    assert grew["llama_demo_token_handoff_seconds_count"] >= n and grew["llama_demo_token_write_seconds_count"] >= n
    step = grew["llama_demo_decode_step_seconds"] / grew["llama_demo_decode_steps"]
    assert 0 < grew["llama_demo_decode_forward_seconds"] < grew["llama_demo_decode_step_seconds"]
    gap = grew["llama_demo_step_gap_seconds"] / grew["llama_demo_step_gaps"]
    assert 0 < gap < step * 10 and step < 5  # seconds: a tiny model's step, and a gap that is the loop's own work
