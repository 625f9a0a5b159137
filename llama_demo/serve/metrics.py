"""Prometheus metrics for rank 0's web front (`GET /metrics`, text exposition format).

Every answer the API or the chat page streams passes through Metrics.track, which counts its
outcome and tokens and times its first token and the gaps between tokens; refusals (4xx, 429)
are counted where the error response is made. Gauges read the serving loop's health at scrape
time. One registry per app, so several apps (tests) never share counters.
"""
from __future__ import annotations

import time
from typing import AsyncIterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..engine.engine import TokenEvent

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

# Seconds: from tens of milliseconds (a small model on a GPU) to minutes (a long queue on a CPU).
TTFT_BUCKETS = (0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
# Seconds of the web side's work on one token: tens of microseconds when idle, milliseconds when
# its thread waits for a core the model's threads hold.
WEB_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)


class Metrics:
    def __init__(self, client):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("llama_demo_requests", "Engine requests by endpoint and outcome "
                                "(stop, length, error, cancelled); refused requests by status (400, 429, ...)",
                                ["endpoint", "outcome"], registry=r)
        self.prompt_tokens = Counter("llama_demo_prompt_tokens", "Prompt tokens of the requests run", registry=r)
        self.generation_tokens = Counter("llama_demo_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("llama_demo_time_to_first_token_seconds", "From submission to the first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("llama_demo_inter_token_latency_seconds", "Between successive tokens of one answer",
                             buckets=ITL_BUCKETS, registry=r)
        # Where a token's time goes at one user (bench --scenario serve prints it): the engine's step,
        # the loop's gap between steps (StepClock), the hand-off to this thread, its chunk's writing.
        self.handoff = Histogram("llama_demo_token_handoff_seconds", "From the serving loop handing a token to "
                                 "the web thread to the answer's coroutine taking it", buckets=WEB_BUCKETS, registry=r)
        self.web_work = Histogram("llama_demo_token_write_seconds", "The web thread's work on one token: its "
                                  "chunk built and written, until the answer asks for the next", buckets=WEB_BUCKETS,
                                  registry=r)
        health = client.health
        clock = health.clock
        for name, what, read in (
                ("decode_steps", "Engine steps of decodes alone (no prompt chunk) since start", lambda: clock.decode_steps),
                ("decode_step_seconds", "Seconds in those steps", lambda: clock.decode_step_s),
                ("decode_forward_seconds", "Seconds of those steps in the model's forward (the rest: sampling, "
                 "the outcome's broadcast, the token events)", lambda: clock.decode_forward_s),
                ("step_gaps", "Decode steps that followed a decode step at once", lambda: clock.gaps),
                ("step_gap_seconds", "Seconds of the serving loop between those steps (bus, hand-off to the web "
                 "thread)", lambda: clock.gap_s)):
            Gauge(f"llama_demo_{name}", what, registry=r).set_function(read)
        Gauge("llama_demo_requests_running", "Requests running (holding KV blocks), at most --max_batch_size",
              registry=r).set_function(lambda: health.running)
        Gauge("llama_demo_requests_waiting", "Requests admitted and waiting to run (the queue, preempted ones first)",
              registry=r).set_function(lambda: health.waiting)
        sched = getattr(client, "scheduler", None)  # a fake engine client (tests) may have none
        if sched is not None:
            pool = sched.pool
            Gauge("llama_demo_kv_blocks", f"KV-cache blocks ({pool.block_size} positions each)",
                  registry=r).set_function(lambda: pool.num_blocks)
            Gauge("llama_demo_kv_blocks_used", "KV-cache blocks held by running requests",
                  registry=r).set_function(lambda: pool.used)
            Gauge("llama_demo_kv_blocks_cached", "KV-cache blocks held by nobody that keep a named prefix for reuse",
                  registry=r).set_function(lambda: len(pool.cached))
            Gauge("llama_demo_preemptions", "Requests preempted (KV blocks ran out) since start",
                  registry=r).set_function(lambda: sched.preempted_total)
        proposer = getattr(client, "proposer", None)
        if proposer is not None:  # speculative decoding (--speculative)
            c = proposer.counters
            for name, what, read in (
                    ("verifications", "Steps' verifications of proposed tokens (one per sequence with a proposal)",
                     lambda: c.verifications),
                    ("proposed_tokens", "Tokens proposed for verification", lambda: c.proposed),
                    ("accepted_tokens", "Proposed tokens the model agreed with", lambda: c.accepted),
                    ("acceptance_rate", "Accepted / proposed tokens since start", lambda: c.acceptance_rate),
                    ("tokens_per_verification", "Tokens emitted per verification (accepted + the model's own)",
                     lambda: c.tokens_per_verification)):
                Gauge(f"llama_demo_speculative_{name}", what, registry=r).set_function(read)
        Gauge("llama_demo_in_flight", "Requests submitted and not finished (running + waiting + being published)",
              registry=r).set_function(lambda: client.in_flight)

    def refused(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    async def track(self, events: AsyncIterator[TokenEvent], endpoint: str, prompt_tokens: int,
                    started: float | None = None) -> AsyncIterator[TokenEvent]:
        """Pass a request's events through, counting and timing them."""
        started = time.monotonic() if started is None else started
        last, outcome = None, "cancelled"  # an answer abandoned midway (client gone, Stop) was cancelled
        self.prompt_tokens.inc(prompt_tokens)
        try:
            async for ev in events:
                taken = time.monotonic()
                if ev.delivered is not None:
                    self.handoff.observe(taken - ev.delivered)
                if ev.token_id is not None:
                    (self.ttft.observe(taken - started) if last is None else self.itl.observe(taken - last))
                    last = taken
                    self.generation_tokens.inc()
                if ev.finished:
                    outcome = ev.finish_reason or "stop"
                yield ev
                self.web_work.observe(time.monotonic() - taken)  # the answer asks for the next once this one is out
        except Exception:
            outcome = "error"
            raise
        finally:
            self.requests.labels(endpoint, outcome).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
