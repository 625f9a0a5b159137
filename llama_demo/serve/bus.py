"""The request bus: a ZeroMQ PUB socket on rank 0, a SUB socket on every rank (rank 0 included).

Messages are JSON objects with a sequence number `seq` that rank 0 assigns under a lock, so all
ranks see one totally ordered stream. No pickle ever crosses the wire.

ZeroMQ's PUB/SUB drops what is published before a subscriber's subscription has propagated (the
"late joiner" gap), so `handshake` repeats a hello until every rank has heard one and confirmed
it in a barrier; rank 0 publishes real traffic only after that.
"""
from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any

import torch.distributed as dist
import zmq


class BusError(RuntimeError):
    pass


def bus_address(master_addr: str) -> str:
    """The IP address rank 0 binds and every rank connects to: the job's master address, resolved."""
    if master_addr in ("localhost", ""):
        return "127.0.0.1"
    try:
        return socket.gethostbyname(master_addr)
    except OSError as e:
        raise BusError(f"cannot resolve MASTER_ADDR {master_addr!r} for the request bus: {e}") from None


class Bus:
    # Messages a socket may queue. Finite, so a stuck subscriber cannot grow rank 0 without bound;
    # far above what the bounded request queue (--max_waiting) can put in flight, so nothing that
    # matters is dropped (a dropped message would desynchronise the ranks).
    HIGH_WATER_MARK = 100_000

    def __init__(self, rank: int, master_addr: str, port: int):
        self.rank = rank
        self.ctx = zmq.Context.instance()
        self._lock = threading.Lock()
        self._seq = 0
        self.pub = None
        addr = bus_address(master_addr)
        if rank == 0:
            self.pub = self.ctx.socket(zmq.PUB)
            self.pub.setsockopt(zmq.SNDHWM, self.HIGH_WATER_MARK)
            self.pub.setsockopt(zmq.LINGER, 0)
            try:  # rank 0's own address (the job's master address), never every interface
                self.pub.bind(f"tcp://{addr}:{port}")
            except zmq.ZMQError as e:
                raise BusError(f"cannot bind the request bus on {addr}:{port} ({e}): pass another --zmq_port, "
                               "or run rank 0 on the host MASTER_ADDR names") from None
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.RCVHWM, self.HIGH_WATER_MARK)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(f"tcp://{addr}:{port}")

    # ------------------------------------------------------------------ rank 0
    def publish(self, kind: str, **payload: Any) -> int:
        """Send one message to every rank; returns its sequence number. Thread-safe."""
        if self.pub is None:
            raise BusError("only rank 0 publishes")
        with self._lock:
            self._seq += 1
            msg = {"seq": self._seq, "kind": kind, **payload}
            self.pub.send(json.dumps(msg).encode())
            return self._seq

    # ------------------------------------------------------------------ every rank
    def recv(self, timeout_s: float | None) -> dict | None:
        """Next message, or None when nothing arrives within timeout_s (None: non-blocking)."""
        ms = 0 if timeout_s is None else int(timeout_s * 1000)
        if not self.sub.poll(ms):
            return None
        msg = json.loads(self.sub.recv())
        if msg.get("kind") == "hello":
            return self.recv(timeout_s if timeout_s is None else 0.0)
        return msg

    def handshake(self, timeout_s: float = 120.0) -> None:
        """Return once every rank's SUB socket receives rank 0's messages."""
        stop = threading.Event()

        def hello_loop():
            while not stop.is_set():
                with self._lock:
                    self.pub.send(json.dumps({"seq": 0, "kind": "hello"}).encode())
                stop.wait(0.05)

        t = None
        if self.rank == 0:
            t = threading.Thread(target=hello_loop, daemon=True, name="bus-hello")
            t.start()
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not self.sub.poll(int(left * 1000)):
                    raise BusError(f"rank {self.rank} heard nothing from rank 0's request bus within {timeout_s:.0f}s: "
                                   "is the --zmq_port reachable from every node?")
                if json.loads(self.sub.recv()).get("kind") == "hello":
                    break
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.barrier()  # every rank has heard a hello: nothing published from now on is lost
        finally:
            stop.set()
            if t is not None:
                t.join()
        # drain the hellos still in flight so the first real message is next
        while self.recv(None) is not None:
            raise BusError("unexpected message during the bus handshake")

    def close(self) -> None:
        for s in (self.pub, self.sub):
            if s is not None:
                s.close(0)
