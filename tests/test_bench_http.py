"""bench --scenario serve's client side (commands/bench_http.py) against a real 2-rank server:
the streamed workload is sent, timed and counted (llama-server is not in CI: only ours here)."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from llama_demo.commands import bench_http

TEXT = Path(__file__).resolve().parents[1] / "assets" / "pride_and_prejudice.txt"


def test_the_workload_is_fixed_per_seed_and_sized_as_documented():
    a, b, other = bench_http.workload(TEXT, 6, seed=1), bench_http.workload(TEXT, 6, seed=1), bench_http.workload(TEXT, 6, seed=2)
    assert a == b and a != other
    for messages in a:
        assert [m["role"] for m in messages] == ["system", "user"] and messages[0]["content"] == bench_http.SYSTEM
        passage = messages[1]["content"].rsplit("\n\n", 1)[0]
        assert 40 <= len(passage.split()) <= 300


def test_percentiles():
    assert bench_http.percentile([], 50) == 0.0
    assert bench_http.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert bench_http.percentile(list(map(float, range(101))), 99) == 99.0


@pytest.mark.parametrize("family_server", ["default"], indirect=True)
@pytest.mark.parametrize("load", [{"concurrency": 2}, {"rate": 20.0}])
def test_streamed_clients_are_timed_and_counted(family_server, load):
    requests = bench_http.workload(TEXT, 4, seed=3)
    r = asyncio.run(bench_http.drive(family_server.url, "m", requests, 4, **load))
    assert r["requests"] == 4 and r["lost"] == 0 and 4 <= r["output_tokens"] <= 16  # usage's completion tokens, at most 4 each
    assert r["tok_s"] > 0 and 0 < r["ttft_p50"] <= r["ttft_p99"] < r["wall_s"]
    assert 0 <= r["itl_p50"] <= r["itl_p99"]
