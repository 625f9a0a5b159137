"""How a serving job stops: SIGTERM (systemd, Kubernetes, torchrun forwarding either) or Ctrl-C.

The first signal drains. Rank 0 decides: it refuses new requests (503 with Retry-After; /health
says draining), tells the other ranks on the bus, gives the running and waiting requests up to
--drain_timeout seconds to finish, then publishes `stop`. Every rank applies `stop` at the same
seal and leaves the serving loop there (serve.loop), so all of them stop after the same last
collective, and exit 0. The other ranks do nothing on their own signal but wait for rank 0's drain
(torchrun signals every rank at once); when none comes, rank 0 is gone, and they exit.

A second signal ends the rank at once. Signals are read from Python's wakeup pipe by a thread,
not acted on in the main thread's handler: the main thread may be inside a collective (C++, where
Python handlers wait) when that second signal comes.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Callable

from .bus import Bus
from .loop import EngineClient, Health

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Ctrl-C under torchrun reaches every rank twice, from the terminal and again forwarded by torchrun
# (as does a SIGTERM to the whole process group): a signal this soon after the first is the same stop
SAME_STOP_S = 1.0
# A rank other than 0 that got a stop signal and no drain from rank 0 within this: rank 0 is gone
# (a failed job: torchrun signals the survivors), and waiting longer only delays the exit
RANK0_SILENT_S = 10.0


class StopSignals:
    """SIGTERM and SIGINT on this rank: `on_first(signal name)` runs, in a thread, at the first
    one; one after that (later than SAME_STOP_S) ends the process at once, with 128 + its number.
    Install it from the main thread (Python's rule for signal handlers)."""

    def __init__(self, rank: int, on_first: Callable[[str], None]):
        self.rank, self.on_first = rank, on_first
        self.first_at: float | None = None
        self._read, write = os.pipe()
        os.set_blocking(write, False)  # written by the C-level handler, which must never block
        signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        for sig in STOP_SIGNALS:  # the handler has nothing to do: the thread reads the pipe
            signal.signal(sig, lambda signum, frame: None)
        threading.Thread(target=self._watch, daemon=True, name="stop-signals").start()

    def _watch(self) -> None:
        while data := os.read(self._read, 64):  # one byte per signal: its number
            for signum in data:
                if signum in STOP_SIGNALS:
                    self._got(signal.Signals(signum))

    def _got(self, sig: signal.Signals) -> None:
        now = time.monotonic()
        if self.first_at is None:
            self.first_at = now
            self.on_first(sig.name)
        elif now - self.first_at > SAME_STOP_S:
            print(f"llama_demo: rank {self.rank}: a second stop signal ({sig.name}): stopping at once, unfinished "
                  "requests are lost",
                  file=sys.stderr, flush=True)
            os._exit(128 + sig)


class Drain:
    """Rank 0's side of the stop: refuse new requests, wait (bounded) for those in flight, then
    publish `stop` for every rank."""

    def __init__(self, client: EngineClient, bus: Bus, timeout_s: float):
        self.client, self.bus, self.timeout_s = client, bus, timeout_s

    def begin(self, why: str) -> None:
        in_flight = self.client.begin_drain(self.timeout_s)
        self.bus.publish("drain", timeout=self.timeout_s)
        print(f"llama_demo: {why}: draining: {in_flight} request(s) in flight get up to {self.timeout_s:g} s "
              "(--drain_timeout) to finish, new ones are refused (503); signal again to stop at once",
              file=sys.stderr, flush=True)
        threading.Thread(target=self._finish, daemon=True, name="drain").start()

    def _finish(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while self.client.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.client.in_flight:
            print(f"llama_demo: the drain's {self.timeout_s:g} s are over: {self.client.in_flight} unfinished "
                  "request(s) end with an error", file=sys.stderr, flush=True)
        self.bus.publish("stop")


def follow_rank0(rank: int, health: Health) -> Callable[[str], None]:
    """A follower's reaction to its own stop signal: none, but to check that rank 0 drains (the
    `drain` message, applied by the serving loop, sets health.draining_until); else exit."""

    def on_first(why: str) -> None:
        def wait() -> None:
            deadline = time.monotonic() + RANK0_SILENT_S
            while time.monotonic() < deadline:
                if health.draining_until is not None:
                    return
                time.sleep(0.1)
            print(f"error: rank {rank} got {why} but rank 0 began no drain within {RANK0_SILENT_S:g} s "
                  "(is rank 0 gone? see torchrun's report); this rank stops", file=sys.stderr, flush=True)
            os._exit(1)

        threading.Thread(target=wait, daemon=True, name="await-drain").start()

    return on_first
