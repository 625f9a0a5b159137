"""A soak of the paged KV cache on a real 2-rank server: more users at once than its blocks hold.
Every request must be answered, and exactly as it is answered alone (greedy): the youngest are
preempted as answers grow and prefilled again from their tokens, with their streams kept open."""
from __future__ import annotations

import concurrent.futures as cf

import httpx
import pytest

from test_server import Server, _client

PROMPTS = ["Once upon a time", "The quick brown fox", "def main():", "Café in 東京", "a little llama",
           "lived in the mountains", "emoji 🦙", "return 42", "jumps over the lazy dog", "naïve résumé",
           "北京 and 東京", "There was a little llama who"]
N_NEW = 40


@pytest.fixture(scope="module")
def tight_server(ckpts):
    # 8 blocks of 16 positions (one max_seq_len sequence) for up to 8 running answers of ~50 tokens
    s = Server(ckpts["mha-2"], 2, "--no-chat", "--max_seq_len", "128", "--kv_cache_tokens", "128",
               "--max_batch_size", "8", "--max_waiting", "64")
    try:
        s.wait_healthy()
        yield s
    finally:
        s.stop()


def _preemptions(server) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    return next(float(line.split(" ")[1]) for line in text.splitlines() if line.startswith("llama_demo_preemptions "))


def test_more_users_than_blocks_lose_nothing_and_get_their_own_answers(tight_server):
    c = _client(tight_server)
    alone = {p: c.completions.create(model="x", prompt=p, max_tokens=N_NEW, temperature=0).choices[0].text
             for p in PROMPTS}
    assert _preemptions(tight_server) == 0  # one at a time fits

    def ask(p: str) -> tuple[str, str | None]:
        stream = c.completions.create(model="x", prompt=p, max_tokens=N_NEW, temperature=0, stream=True)
        text, reason = [], None
        for ch in stream:
            text.append(ch.choices[0].text)
            reason = ch.choices[0].finish_reason or reason
        return "".join(text), reason

    with cf.ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(ask, PROMPTS))
    assert _preemptions(tight_server) > 0  # the pool really ran out
    assert [reason for _, reason in together] == ["length"] * len(PROMPTS)
    assert [text for text, _ in together] == [alone[p] for p in PROMPTS]
