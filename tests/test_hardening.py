"""Hostile clients against a real 2-rank server: every bad request is a 4xx naming the problem,
none of them hurts the job, a big or slow request does not stall other users' streams, a full
queue answers 429 and the server recovers."""
from __future__ import annotations

import concurrent.futures as cf
import json
import socket
import time

import httpx
import pytest

import threading

from test_server import N_NEW, PROMPTS, Server
from test_server import reference  # noqa: F401  (a fixture the tests below take by name)

HUGE = 2**64


@pytest.fixture(scope="module")
def server(ckpts):
    s = Server(ckpts["mha-2"], 2, "--no-chat", "--max_seq_len", "1024", "--max_batch_size", "2", "--max_waiting", "2",
               "--max_request_bytes", "300000", "--heartbeat_interval", "1", "--prefill_chunk", "16")
    try:
        s.wait_healthy()
        yield s
    finally:
        s.stop()


def completion(server, timeout=60, **body) -> httpx.Response:
    body.setdefault("prompt", PROMPTS[0])
    # json.dumps escapes what httpx's encoder refuses (a lone surrogate is valid JSON: "\ud800")
    return httpx.post(server.url + "/v1/completions", content=json.dumps(body), timeout=timeout,
                      headers={"content-type": "application/json"})


def assert_serves_normally(server, reference):
    """Greedy tokens exactly as the CLI's: every rank is still in step."""
    r = completion(server, prompt=PROMPTS[4], max_tokens=N_NEW, temperature=0)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == reference[PROMPTS[4]]
    assert httpx.get(server.url + "/health", timeout=5).status_code == 200


HOSTILE = [  # (body fields, the param a 400 names (None: the body as a whole), words in the message)
    ({"top_k": -1}, "top_k", "top_k"),
    ({"top_k": 1.5}, "top_k", "integer"),
    ({"max_tokens": 0}, "max_tokens", "max_tokens"),
    ({"max_tokens": -(2**70)}, "max_tokens", "max_tokens"),
    ({"temperature": -0.0001}, "temperature", "temperature"),
    ({"temperature": "NaN"}, "temperature", "finite"),
    ({"temperature": "Infinity"}, "temperature", "finite"),
    ({"top_p": 0}, "top_p", "top_p"),
    ({"top_p": 1.0000001}, "top_p", "top_p"),
    ({"repetition_penalty": 0}, "repetition_penalty", "repetition_penalty"),
    ({"repetition_penalty": 1e300}, "repetition_penalty", "repetition_penalty"),
    ({"seed": 1.5}, "seed", "integer"),
    ({"seed": "abc"}, "seed", "integer"),
    ({"stop": [""]}, "stop", "non-empty"),
    ({"stop": ["x"] * 17}, "stop", "at most 16"),
    ({"stop": "s" * 5000}, "stop", "1024 characters"),
    ({"stop": [["nested"]]}, "stop", ""),
    ({"prompt": []}, "prompt", "empty"),
    ({"prompt": [-1, 5]}, "prompt", "outside the vocabulary"),
    ({"prompt": [5, 10**20]}, "prompt", ""),
    ({"prompt": [5, 400]}, "prompt", "outside the vocabulary"),
    ({"prompt": [1] * 2000}, "prompt", "context"),
    ({"prompt": "llama " * 20000}, "prompt", "context"),
    ({"prompt": "\ud800 lone surrogate"}, "prompt", "Unicode"),
    ({"prompt": {"not": "a prompt"}}, "prompt", ""),
    ({"prompt": "x", "n": 10**9}, "n", ""),
    ({"stream": "yes please"}, "stream", ""),
]


@pytest.mark.parametrize("fields,param,words", HOSTILE, ids=[f"{i}-{next(iter(f))}" for i, (f, _, _) in enumerate(HOSTILE)])
def test_hostile_values_are_a_400_naming_the_field(server, fields, param, words):
    r = completion(server, **fields)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err


@pytest.mark.parametrize("fields", [{"seed": HUGE}, {"seed": -1}, {"seed": 10**40}, {"top_k": 2**63},
                                    {"max_tokens": 2**63}, {"temperature": 1e-300}, {"temperature": 1e300},
                                    {"top_p": 5e-324}, {"stop": ["x"] * 16},
                                    {"prompt": ""}])  # an empty text is BOS alone, as OpenAI allows
def test_absurd_but_meaningful_values_are_served(server, fields):
    """Accepted and reduced to what the engine runs (seed modulo 2**64, top_k past the vocabulary
    is no limit, max_tokens clipped to the context, a temperature under 1e-5 is greedy)."""
    r = completion(server, max_tokens=fields.pop("max_tokens", 4), **fields)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("length", "stop")


def test_huge_seeds_are_reproducible(server):
    a = completion(server, seed=HUGE + 7, temperature=1.0, max_tokens=8).json()["choices"][0]["text"]
    b = completion(server, seed=7, temperature=1.0, max_tokens=8).json()["choices"][0]["text"]
    assert a == b  # reduced modulo 2**64: the same generator state


def test_malformed_bodies_are_4xx(server):
    url = server.url + "/v1/completions"
    assert httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}).status_code == 400
    assert httpx.post(url, content=b"[1, 2]", headers={"content-type": "application/json"}).status_code == 400
    assert httpx.post(url, content=b'{"prompt": NaN}', headers={"content-type": "application/json"}).status_code == 400
    r = httpx.post(url, content=b"x" * 400_000, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "max_request_bytes" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}] * 5000})
    assert r.status_code in (400, 413)
    r = httpx.get(server.url + "/v1/no/such/thing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_a_body_without_content_length_is_cut_at_the_limit(server):
    """A chunked upload that never ends is refused once it passes the limit, not buffered forever."""
    def chunks():
        for _ in range(100):
            yield b" " * 10_000
    r = httpx.post(server.url + "/v1/completions", content=chunks(), headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == 413


def test_after_every_hostile_request_the_server_answers_exactly(server, reference):
    assert_serves_normally(server, reference)


def test_a_client_that_vanishes_mid_request_loses_nothing_for_others(server, reference):
    body = json.dumps({"prompt": PROMPTS[1], "max_tokens": 100, "stream": True}).encode()
    for _ in range(5):  # connect, send, leave without reading
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    half = b'{"prompt": "never finished'
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:  # half a body, then gone
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n" + half)
    time.sleep(1)
    assert_serves_normally(server, reference)


def test_a_full_queue_is_a_429_and_the_server_recovers(server, reference):
    """2 KV rows + 2 waiting: the fifth concurrent request is told to retry later."""
    leave = threading.Event()

    def long_stream(i):
        with httpx.stream("POST", server.url + "/v1/completions", timeout=120,
                          json={"prompt": PROMPTS[i], "max_tokens": 900, "temperature": 0, "stream": True}) as r:
            for _ in r.iter_lines():
                if leave.is_set():
                    break  # leaving closes the connection: the request is cancelled
            return r.status_code

    with cf.ThreadPoolExecutor(4) as pool:
        running = [pool.submit(long_stream, i) for i in range(4)]
        time.sleep(1.5)  # all four published (streams answer at once)
        r = completion(server, max_tokens=2)
        leave.set()
        assert r.status_code == 429, r.text
        assert r.headers["retry-after"].isdigit()
        assert r.json()["error"]["type"] == "rate_limit_error"
        assert [f.result() for f in running] == [200] * 4
    time.sleep(0.5)  # the cancels reach every rank at the next seal
    assert_serves_normally(server, reference)


def test_a_huge_prompt_does_not_stall_other_streams(server):
    """While one client streams, another sends a prompt that fills the context (prefilled in chunks
    of 16 tokens) and others send bodies near the size limit: the stream's gaps stay bounded."""
    gaps = []

    def stream():
        last = time.monotonic()
        with httpx.stream("POST", server.url + "/v1/completions", timeout=120,
                          json={"prompt": PROMPTS[2], "max_tokens": 40, "temperature": 0, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    now = time.monotonic()
                    gaps.append(now - last)
                    last = now

    with cf.ThreadPoolExecutor(3) as pool:
        streaming = pool.submit(stream)
        time.sleep(0.5)
        big = pool.submit(completion, server, prompt=[5] * 120, max_tokens=4)
        near_limit = pool.submit(completion, server, prompt="llama " * 45_000, max_tokens=4)
        streaming.result()
        assert big.result().status_code == 200
        assert near_limit.result().status_code == 400  # refused by its length, without being tokenized
    assert len(gaps) >= 10
    assert max(gaps[1:]) < 3.0, gaps  # a 16-token prefill chunk per step, never the whole prompt at once
