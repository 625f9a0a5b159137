"""A graceful stop on a real 2-rank job (issue 21, item 6): SIGTERM drains. The stream in flight
finishes with its whole answer, a new request meanwhile is a 503 with Retry-After, /health says
draining, and then every rank exits 0; a second signal stops the job at once."""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import threading
import time

import httpx
import pytest

from test_server import PROMPTS, Server

ANSWER_TOKENS = 600  # a stream long enough to be mid-answer while the test probes the drain


@pytest.fixture
def job(ckpts, monkeypatch):
    # torchrun kills its ranks TORCH_ELASTIC_SHUTDOWN_TIMEOUT (30) s after it forwards a signal:
    # room for the test's 60 s drain on a slow machine
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "90")
    s = Server(ckpts["mha-2"], 2, "--no-chat", "--max_seq_len", "1024", "--heartbeat_interval", "1",
               "--drain_timeout", "60")
    try:
        s.wait_healthy()
        yield s
    finally:
        s.stop()


def body(stream: bool) -> dict:
    return {"prompt": PROMPTS[0], "max_tokens": ANSWER_TOKENS, "temperature": 0, "stream": stream}


def stream_answer(url: str, started: threading.Event, chunk_times: list[float]) -> tuple[str, str | None]:
    """The streamed completion's text and finish reason; `started` is set at its first text."""
    text, reason = [], None
    with httpx.stream("POST", url + "/v1/completions", json=body(True), timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            choice = json.loads(line[6:])["choices"][0]
            text.append(choice["text"])
            reason = choice["finish_reason"] or reason
            chunk_times.append(time.monotonic())
            started.set()
    return "".join(text), reason


def refused_while_draining(url: str, timeout: float = 15) -> tuple[httpx.Response, float]:
    """The first 503 a new request gets once the stop signal has reached rank 0, and when."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1}, timeout=30)
        if r.status_code == 503:
            return r, time.monotonic()
        time.sleep(0.05)
    raise AssertionError(f"no 503 within {timeout} s of the stop signal (last: {r.status_code} {r.text})")


def test_sigterm_drains_the_stream_in_flight_and_every_rank_exits_0(job):
    whole = httpx.post(job.url + "/v1/completions", json=body(False), timeout=120).json()["choices"][0]["text"]
    started, chunk_times = threading.Event(), []
    with cf.ThreadPoolExecutor(1) as pool:
        streaming = pool.submit(stream_answer, job.url, started, chunk_times)
        assert started.wait(60)
        # every rank, as `kill` or a service manager signals them; torchrun itself is not told, so
        # its exit status is the ranks' (it is 0 only when every rank exits 0)
        for rank in (0, 1):
            os.kill(job.rank_pid(rank), signal.SIGTERM)
        refused, refused_at = refused_while_draining(job.url)
        assert refused.headers["retry-after"].isdigit() and int(refused.headers["retry-after"]) >= 1
        err = refused.json()["error"]
        assert err["code"] == "server_stopping" and "stopping" in err["message"]
        health = httpx.get(job.url + "/health", timeout=10)
        assert health.status_code == 503 and health.json()["status"] == "draining", health.text
        text, reason = streaming.result(timeout=90)
    assert chunk_times[-1] > refused_at  # the stream went on after the drain began...
    assert text == whole and reason == "length"  # ...to its whole answer
    job.proc.wait(timeout=60)
    out = job.output()
    assert job.proc.returncode == 0, out[-3000:]
    assert "draining" in out and "rank 0 stopped" in out and "rank 1 stopped" in out, out[-3000:]


def test_ctrl_c_drains_and_a_second_signal_stops_the_job_at_once(job):
    started, chunk_times = threading.Event(), []
    with cf.ThreadPoolExecutor(1) as pool:
        streaming = pool.submit(stream_answer, job.url, started, chunk_times)
        assert started.wait(60)
        # Ctrl-C: SIGINT to the whole process group, so every rank gets it twice (from the terminal,
        # then forwarded by torchrun): once, for a drain
        os.killpg(job.proc.pid, signal.SIGINT)
        refused_while_draining(job.url)
        assert httpx.get(job.url + "/health", timeout=10).json()["status"] == "draining"
        time.sleep(1.5)  # past the window in which a signal counts as the same stop
        job.proc.send_signal(signal.SIGTERM)  # torchrun forwards it to every rank: they stop now
        t0 = time.monotonic()
        job.proc.wait(timeout=30)
        assert time.monotonic() - t0 < 10
        try:  # the stream in flight is cut short, with no answer to its end
            text, reason = streaming.result(timeout=30)
            assert reason is None
        except httpx.HTTPError:
            pass
    out = job.output()
    assert "SIGINT: draining" in out and "second stop signal (SIGTERM): stopping at once" in out, out[-3000:]
    assert "rank 0 stopped" not in out
