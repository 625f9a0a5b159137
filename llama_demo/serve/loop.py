"""The serving loop every rank runs, and rank 0's handle on it for the web layer.

Order of events, identical on every rank:
  1. wait (idle) for a bus message, or not at all while sequences are running;
  2. seal: rank 0 broadcasts the sequence number N of the last bus message it has read; every
     rank then applies exactly the messages up to N (requests, cancels, heartbeat ticks);
  3. one engine step (prefill chunk + decode), whose collectives therefore line up.
While sequences are running, the seal of step 2 rides in the previous step's outcome broadcast
(Engine.seal_source / carried_seal: rank 0 reads the bus just before broadcasting the sampled
ids and appends the seq), so a decode step costs one collective for both; the loop broadcasts a
seal of its own only after a step that broadcast nothing (idle, or prompt chunks alone).
A heartbeat tick is just a bus message that every rank turns into an all-reduce at step 2, so it
can never interleave with a generation collective. So is the stop (serve.shutdown): every rank
leaves the loop at the seal that applies it, before the next step, so all take the same last
collective.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import math
import threading
import time
from dataclasses import asdict, dataclass, field

import torch

from ..config import BUS_TIMEOUT, DEFAULT_HEARTBEAT_INTERVAL
from .bus import Bus, BusError
from ..model.parallel import all_reduce_sum, broadcast_from_first
from ..engine.engine import Engine, Request, TokenEvent
from ..engine.sampler import SamplingParams

log = logging.getLogger("llama_demo")


class RankLost(RuntimeError):
    pass


@dataclass
class StepClock:
    """Rank 0's account of a decoding loop's time (GET /metrics): the engine's steps of decodes
    alone (no prompt chunk), and the loop's own work from the end of one such step to the start of
    the next (applying bus messages, handing the events to the web thread). At one user a token
    takes one step plus that, so it is what serving adds on this side of the web thread."""
    decode_steps: int = 0
    decode_step_s: float = 0.0
    decode_forward_s: float = 0.0  # of which the model's forward (the rest: sampling, the outcome's broadcast, events)
    gaps: int = 0  # decode steps that followed a decode step at once (the gap measured)
    gap_s: float = 0.0


@dataclass
class Health:
    started: float
    last_collective: float  # monotonic time of the last collective every rank completed
    heartbeat_interval: float
    running: int = 0
    waiting: int = 0
    loop_alive: bool = True
    error: str | None = None
    draining_until: float | None = None  # monotonic end of the drain once a stop signal came (serve.shutdown)
    clock: StepClock = field(default_factory=StepClock)

    def ok(self) -> bool:
        # while busy every step is a collective; while idle the heartbeat ticks are
        stale = time.monotonic() - self.last_collective > max(3 * self.heartbeat_interval, 10.0)
        return self.loop_alive and self.error is None and not stale


class QueueFull(RuntimeError):
    """More requests are waiting than --max_waiting allows: the client should retry later (429)."""


class Draining(RuntimeError):
    """The server is stopping and takes nothing new (503): retry after `retry_after` seconds, when
    this server is gone and a restarted one or another replica answers."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class EngineClient:
    """Rank 0's thread-safe front door to the serving loop, used by the web layer. It takes Jobs
    the gate has checked; it only publishes them and routes their events back."""

    def __init__(self, bus: Bus, engine: Engine, model_name: str, max_batch_size: int, max_waiting: int):
        self.bus = bus
        self.tokenizer = engine.tokenizer
        self.max_seq_len = engine.max_seq_len
        self.vocab_size = engine.vocab_size
        self.model_name = model_name
        # requests in flight beyond those running wait; beyond this many in flight, refuse (429)
        self.capacity = max_batch_size + max_waiting
        self.max_batch_size = max_batch_size
        self.scheduler = engine.scheduler  # read (never changed) by /metrics: KV blocks, preemptions
        self.proposer = engine.proposer  # read by /metrics: speculative decoding's counters (None when off)
        self.health = Health(time.time(), time.monotonic(), DEFAULT_HEARTBEAT_INTERVAL)  # ServingLoop sets the real one
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    @property
    def in_flight(self) -> int:
        return len(self._queues)

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> "Submission":
        """Publish a checked request to every rank now (QueueFull when too many wait, RuntimeError
        when the model is not serving); its events come from the returned Submission."""
        return self.submit_many([(prompt_ids, params)])[0]

    def submit_many(self, requests: list[tuple[list[int], SamplingParams]]) -> list["Submission"]:
        """Publish several checked requests (a response's choices: n, a batch of prompts) all or
        none: QueueFull unless the queue has room for every one of them now."""
        if not self.health.loop_alive and self.health.draining_until is None:
            raise RuntimeError(f"the model is not serving: {self.health.error}")
        loop = asyncio.get_running_loop()
        with self._lock:  # under the lock: once begin_drain returns, nothing new is in flight
            if self.health.draining_until is not None:
                left = max(1, math.ceil(self.health.draining_until - time.monotonic()))
                raise Draining(f"the server is stopping: it finishes the requests it has (at most {left} s more) "
                               "and takes no new ones; retry on another server or once this one is back", left)
            if len(self._queues) + len(requests) > self.capacity:
                raise QueueFull(f"the server is busy: {len(self._queues)} requests are running or waiting and "
                                f"this one needs {len(requests)} more (limit {self.capacity}); retry shortly")
            subs = []
            for _ in requests:
                rid, queue = f"r{next(self._ids)}", asyncio.Queue()
                self._queues[rid] = (loop, queue)
                subs.append(Submission(self, rid, queue))
        for sub, (prompt_ids, params) in zip(subs, requests):
            self.bus.publish("req", id=sub.id, prompt_ids=list(prompt_ids), params=asdict(params))
        return subs

    def begin_drain(self, timeout_s: float) -> int:
        """Refuse new requests from now on (Draining); returns how many are in flight."""
        with self._lock:
            self.health.draining_until = time.monotonic() + timeout_s
            return len(self._queues)

    def _forget(self, rid: str, cancel: bool) -> None:
        with self._lock:
            known = self._queues.pop(rid, None) is not None
        if known and cancel:
            self.bus.publish("cancel", id=rid)

    # called from the serving loop (main thread of rank 0)
    def deliver(self, events: list[TokenEvent]) -> None:
        with self._lock:
            targets = [(self._queues.get(ev.request_id), ev) for ev in events]
        now = time.monotonic()
        for target, ev in targets:
            if target is not None:
                ev.delivered = now
                loop, queue = target
                loop.call_soon_threadsafe(queue.put_nowait, ev)

    def fail_all(self, error: Exception) -> None:
        with self._lock:
            targets = list(self._queues.values())
        for loop, queue in targets:
            loop.call_soon_threadsafe(queue.put_nowait, error)


class Submission:
    """One published request's events, in order, ending with a finished one. close() before the
    end cancels the request on every rank."""

    def __init__(self, client: EngineClient, rid: str, queue: asyncio.Queue):
        self.client, self.id, self._queue, self._done = client, rid, queue, False

    def __aiter__(self) -> "Submission":
        return self

    async def __anext__(self) -> TokenEvent:
        if self._done:
            raise StopAsyncIteration
        ev = await self._queue.get()
        if isinstance(ev, Exception):
            self.close()
            raise ev
        if ev.finished:
            self._done = True
            self.client._forget(self.id, cancel=False)
        return ev

    def close(self) -> None:
        if not self._done:
            self._done = True
            self.client._forget(self.id, cancel=True)


class ServingLoop:
    def __init__(self, engine: Engine, bus: Bus, heartbeat_interval: float, client: EngineClient | None = None,
                 bus_timeout: float = BUS_TIMEOUT):
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
        self.stopped = False  # a `stop` was applied: every rank leaves the loop at this same seal
        self.health = client.health if client else Health(time.time(), time.monotonic(), heartbeat_interval)
        self.health.heartbeat_interval = heartbeat_interval

    # ------------------------------------------------------------------ the loop
    def run(self) -> None:
        try:
            self.engine.seal_source = self._read_bus if self.rank == 0 else None
            carried = None  # the seal the last step's outcome broadcast carried
            clock, last_decode_end = self.health.clock, None
            while True:
                if carried is not None:
                    self._apply_upto(carried)
                else:
                    if self.engine.idle:
                        self._wait_for_message()
                    self._seal_and_apply()
                if self.stopped:
                    break
                self.engine.carried_seal = None
                started = time.perf_counter()
                events = self.engine.step()
                ended = time.perf_counter()
                carried = self.engine.carried_seal
                self.health.running, self.health.waiting = len(self.engine.running), len(self.engine.waiting)
                if events:
                    self._mark_collective()
                    if self.client is not None:
                        self.client.deliver(events)
                if events and not self.engine.last_prefill_tokens:
                    clock.decode_steps += 1
                    clock.decode_step_s += ended - started
                    clock.decode_forward_s += self.engine.last_forward_s
                    if last_decode_end is not None:
                        clock.gaps += 1
                        clock.gap_s += started - last_decode_end
                    last_decode_end = ended
                else:
                    last_decode_end = None
            if self.client is not None:  # the drain's time ran out with these unfinished
                self.client.fail_all(RuntimeError("the server stopped before this answer was finished "
                                                  "(its --drain_timeout ran out)"))
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

    def _read_bus(self) -> int:
        """Rank 0: read what has arrived, without waiting; the seq of the last message read."""
        while (msg := self.bus.recv(None)) is not None:
            self.inbox.append(msg)
        return self.inbox[-1]["seq"] if self.inbox else self.applied

    def _seal_and_apply(self) -> None:
        """The seal of its own, when no step's outcome carried one: rank 0 broadcasts the last bus
        seq it has read; every rank applies the messages up to it."""
        upto = self._read_bus() if self.rank == 0 else self.applied
        if self.world > 1:
            t = torch.tensor([upto], dtype=torch.long, device=self.device)
            broadcast_from_first(t, None)
            upto = int(t.item())
            self._mark_collective()
        self._apply_upto(upto)

    def _apply_upto(self, upto: int) -> None:
        """Every rank: apply the bus messages up to seq `upto` (a seal, its own or carried by a
        step's outcome), in order."""
        if self.world > 1:
            # followers may not have received everything rank 0 has: wait for it (bounded)
            deadline = time.monotonic() + self.bus_timeout
            while (self.inbox[-1]["seq"] if self.inbox else self.applied) < upto:
                msg = self.bus.recv(max(0.0, deadline - time.monotonic()) or 0.001)
                if msg is None and time.monotonic() > deadline:
                    raise BusError(f"rank {self.rank} is missing bus messages up to {upto} after {self.bus_timeout:.0f}s")
                if msg is not None:
                    self.inbox.append(msg)
        todo = [m for m in self.inbox if m["seq"] <= upto]
        self.inbox = [m for m in self.inbox if m["seq"] > upto]
        for msg in todo:
            self._apply(msg)
            self.applied = msg["seq"]
        self.health.running, self.health.waiting = len(self.engine.running), len(self.engine.waiting)

    def _apply(self, msg: dict) -> None:
        kind = msg["kind"]
        if kind == "req":
            try:  # the gate checked it; should it still not fit, every rank drops it the same way
                self.engine.add(Request(msg["id"], msg["prompt_ids"], SamplingParams(**msg["params"])))
            except Exception as e:
                if self.client is not None:
                    self.client.deliver([TokenEvent(msg.get("id"), None, "", True, "error",
                                                    error=f"the request could not be queued: {e}")])
        elif kind == "cancel":
            events = self.engine.cancel(msg["id"])
            if self.client is not None:
                self.client.deliver(events)
        elif kind == "tick":
            self._heartbeat()
        elif kind == "drain":  # rank 0 began a drain (serve.shutdown); the stop follows
            if self.health.draining_until is None:
                self.health.draining_until = time.monotonic() + msg["timeout"]
        elif kind == "stop":
            self.stopped = True

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
