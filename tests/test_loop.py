"""The serving loop's collectives without a process group."""
from types import SimpleNamespace

import pytest
import torch

import llama_demo.serve.loop as loop


def test_a_heartbeat_that_misses_a_rank_raises_rank_lost(monkeypatch):
    monkeypatch.setattr(loop, "all_reduce_sum", lambda t, group: t)  # only this rank's 1 came back
    engine = SimpleNamespace(rank=0, world_size=2, device=torch.device("cpu"))
    with pytest.raises(loop.RankLost, match="instead of 2"):
        loop.ServingLoop(engine, bus=None, heartbeat_interval=1.0)._heartbeat()


def test_health_turns_unavailable_without_collectives():
    h = loop.Health(started=0.0, last_collective=0.0, heartbeat_interval=1.0)
    assert not h.ok()
    h.last_collective = __import__("time").monotonic()
    assert h.ok()
