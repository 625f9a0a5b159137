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


def test_loads_run_interleaved_on_every_server_and_figures_are_medians(tmp_path, monkeypatch):
    # every server is started before any load; each round sends each load to every server in turn
    from contextlib import contextmanager

    started, sent = [], []

    @contextmanager
    def fake_running(cmd, base, env=None, log=None):
        started.append(cmd[0])
        yield None

    async def fake_drive(base, model, requests, new_tokens, concurrency=None, rate=None, seed=0):
        return {}

    monkeypatch.setattr(bench_http, "running", fake_running)
    monkeypatch.setattr(bench_http, "drive", fake_drive)
    speeds = iter([10.0, 20.0, 30.0, 40.0, 14.0, 26.0, 33.0, 44.0, 12.0, 24.0, 31.0, 48.0])

    def measure(name, base, load, rnd):
        assert started == ["a", "b"]  # both up before the first load
        sent.append((rnd, load, name))
        return {"server": name, "load": load, "tok_s": next(speeds), "ttft_p50": float(rnd)}

    rows = bench_http.interleaved([("a", ["a"], None), ("b", ["b"], None)], ["x", "y"], 3, [], 8, 1, tmp_path, measure)
    assert sent[:4] == [(0, "x", "a"), (0, "x", "b"), (0, "y", "a"), (0, "y", "b")] and len(sent) == 12
    summary = {(r["server"], r["load"]): r for r in bench_http.summarize(rows, ("server", "load"))}
    assert summary["a", "x"]["tok_s"] == 12.0 and summary["a", "x"]["rounds"] == [10.0, 14.0, 12.0]
    assert summary["b", "y"]["tok_s"] == 44.0 and summary["b", "y"]["ttft_p50"] == 1.0
    assert bench_http.summarize(rows[:4], ("server", "load"))[0]["tok_s"] == 10.0  # one round passes through
