"""The serving loop every rank runs, and rank 0's handle on it for the web layer.

Order of events, identical on every rank:
  1. wait (idle) for a bus message, or not at all while sequences are running;
  2. seal: rank 0 broadcasts the sequence number N of the last bus message it has read; every
     rank then applies exactly the messages up to N (requests, cancels, heartbeat ticks);
  3. one engine step (prefill chunk + decode), whose collectives therefore line up.
A heartbeat tick is just a bus message that every rank turns into an all-reduce at step 2, so it
can never interleave with a generation collective.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from dataclasses import asdict, dataclass
from typing import AsyncIterator

import torch

from .bus import Bus, BusError
from ..model.parallel import all_reduce_sum, broadcast_from_first
from ..engine.engine import Engine, Request, TokenEvent, check_prompt
from ..engine.sampler import SamplingParams

log = logging.getLogger("llama_demo")


class RankLost(RuntimeError):
    pass


@dataclass
class Health:
    started: float
    last_collective: float  # monotonic time of the last collective every rank completed
    heartbeat_interval: float
    running: int = 0
    waiting: int = 0
    loop_alive: bool = True
    error: str | None = None

    def ok(self) -> bool:
        # while busy every step is a collective; while idle the heartbeat ticks are
        stale = time.monotonic() - self.last_collective > max(3 * self.heartbeat_interval, 10.0)
        return self.loop_alive and self.error is None and not stale


class EngineClient:
    """Rank 0's thread-safe front door to the serving loop, used by the web layer."""

    def __init__(self, bus: Bus, engine: Engine, model_name: str):
        self.bus = bus
        self.tokenizer = engine.tokenizer
        self.max_seq_len = engine.max_seq_len
        self.vocab_size = engine.model.args.vocab_size
        self.model_name = model_name
        self.health = Health(time.time(), time.monotonic(), 60.0)
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.last_stats: dict = {}

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raises ValueError (SamplingError, PromptTooLong) with a message for the user."""
        params.validate()
        check_prompt(len(prompt_ids), self.max_seq_len)

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[TokenEvent]:
        """Publish a request to every rank and yield its events. Leaving early (a client that
        disconnects, a stop button) cancels the request on every rank."""
        self.validate(prompt_ids, params)
        if not self.health.loop_alive:
            raise RuntimeError(f"the model is not serving: {self.health.error}")
        rid = f"r{next(self._ids)}"
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self._queues[rid] = (asyncio.get_running_loop(), queue)
        finished = False
        try:
            self.bus.publish("req", id=rid, prompt_ids=list(prompt_ids), params=asdict(params))
            while True:
                ev = await queue.get()
                if isinstance(ev, Exception):
                    raise ev
                finished = ev.finished
                yield ev
                if finished:
                    return
        finally:
            with self._lock:
                self._queues.pop(rid, None)
            if not finished:
                self.bus.publish("cancel", id=rid)

    # called from the serving loop (main thread of rank 0)
    def deliver(self, events: list[TokenEvent]) -> None:
        with self._lock:
            targets = [(self._queues.get(ev.request_id), ev) for ev in events]
        for target, ev in targets:
            if target is not None:
                loop, queue = target
                loop.call_soon_threadsafe(queue.put_nowait, ev)

    def fail_all(self, error: Exception) -> None:
        with self._lock:
            targets = list(self._queues.values())
        for loop, queue in targets:
            loop.call_soon_threadsafe(queue.put_nowait, error)


class ServingLoop:
    def __init__(self, engine: Engine, bus: Bus, heartbeat_interval: float, client: EngineClient | None = None,
                 bus_timeout: float = 60.0):
        self.engine = engine
        self.bus = bus
        self.rank = engine.rank
        self.world = engine.world_size
        self.device = engine.device
        self.client = client
        self.heartbeat_interval = heartbeat_interval
        self.bus_timeout = bus_timeout
        self.applied = 0  # seq of the last bus message applied
        self.inbox: list[dict] = []
        self.stopping = False
        self.health = client.health if client else Health(time.time(), time.monotonic(), heartbeat_interval)
        self.health.heartbeat_interval = heartbeat_interval
        self._stats: dict[str, list] = {}

    # ------------------------------------------------------------------ the loop
    def run(self) -> None:
        try:
            while not self.stopping:
                if self.engine.idle:
                    self._wait_for_message()
                self._seal_and_apply()
                if self.stopping:
                    break
                events = self.engine.step()
                self.health.running, self.health.waiting = len(self.engine.running), len(self.engine.waiting)
                if events:
                    self._mark_collective()
                    if self.client is not None:
                        self._record_stats(events)
                        self.client.deliver(events)
        except Exception as e:
            self.health.loop_alive = False
            self.health.error = str(e)
            if self.client is not None:
                self.client.fail_all(RuntimeError(f"the model stopped serving: {e}"))
            raise
        finally:
            self.health.loop_alive = False

    def _wait_for_message(self) -> None:
        while not self.inbox:
            msg = self.bus.recv(1.0)
            if msg is not None:
                self.inbox.append(msg)

    def _seal_and_apply(self) -> None:
        if self.rank == 0:  # read what has arrived, without waiting
            while (msg := self.bus.recv(None)) is not None:
                self.inbox.append(msg)
        upto = self.inbox[-1]["seq"] if self.inbox else self.applied
        if self.world > 1:
            t = torch.tensor([upto], dtype=torch.long, device=self.device)
            broadcast_from_first(t, None)
            upto = int(t.item())
            # followers may not have received everything rank 0 has: wait for it (bounded)
            deadline = time.monotonic() + self.bus_timeout
            while (self.inbox[-1]["seq"] if self.inbox else self.applied) < upto:
                msg = self.bus.recv(max(0.0, deadline - time.monotonic()) or 0.001)
                if msg is None and time.monotonic() > deadline:
                    raise BusError(f"rank {self.rank} is missing bus messages up to {upto} after {self.bus_timeout:.0f}s")
                if msg is not None:
                    self.inbox.append(msg)
            self._mark_collective()
        todo = [m for m in self.inbox if m["seq"] <= upto]
        self.inbox = [m for m in self.inbox if m["seq"] > upto]
        for msg in todo:
            self._apply(msg)
            self.applied = msg["seq"]
        self.health.running, self.health.waiting = len(self.engine.running), len(self.engine.waiting)

    def _apply(self, msg: dict) -> None:
        kind = msg["kind"]
        if kind == "req":
            req = Request(msg["id"], msg["prompt_ids"], SamplingParams(**msg["params"]))
            try:
                self.engine.add(req)
            except ValueError as e:  # every rank refuses it identically; rank 0 tells the client
                if self.client is not None:
                    self.client.deliver([TokenEvent(req.id, None, "", True, "error", error=str(e))])
        elif kind == "cancel":
            events = self.engine.cancel(msg["id"])
            if self.client is not None:
                self.client.deliver(events)
        elif kind == "tick":
            self._heartbeat()
        elif kind == "stop":
            self.stopping = True

    def _heartbeat(self) -> None:
        """An all-reduce every rank reaches at the same point of the message stream."""
        if self.world > 1:
            t = torch.ones(1, device=self.device)
            all_reduce_sum(t, None)
            if int(t.item()) != self.world:
                raise RankLost(f"heartbeat all-reduce gave {t.item()} instead of {self.world}")
        self._mark_collective()

    def _mark_collective(self) -> None:
        self.health.last_collective = time.monotonic()

    def _record_stats(self, events: list[TokenEvent]) -> None:
        now = time.monotonic()
        for ev in events:
            st = self._stats.setdefault(ev.request_id, [now, 0])
            if ev.token_id is not None:
                st[1] += 1
            if ev.finished:
                start, n = self._stats.pop(ev.request_id)
                if self.client is not None:
                    self.client.last_stats = {"tokens": n, "seconds": now - start,
                                              "tokens_per_s": n / (now - start) if now > start else 0.0}


class Heartbeat:
    """Rank 0 thread: publishes a tick every `interval` seconds while the engine is idle (a busy
    engine's steps are collectives already)."""

    def __init__(self, bus: Bus, engine: Engine, interval: float):
        self.bus, self.engine, self.interval = bus, engine, interval
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="heartbeat")

    def start(self) -> "Heartbeat":
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if self.engine.idle:
                self.bus.publish("tick")

    def stop(self) -> None:
        self._stop.set()
