"""Requests, their KV-cache rows, and which tokens each step feeds.

Every rank keeps the same scheduler state: it changes only through `add`/`cancel` (applied at the
same bus seal on every rank) and through the step's broadcast outcome, so all ranks plan the same
forward passes. Nothing here looks at logits or text.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from .sampler import SamplingParams


class PromptTooLong(ValueError):
    """A prompt does not fit the context; the message gives the limit, the count and what to do."""


@dataclass
class Request:
    id: int | str
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)


def check_prompt(prompt_len: int, max_seq_len: int) -> None:
    if prompt_len == 0:
        raise PromptTooLong("the prompt is empty: it needs at least one token")
    if prompt_len >= max_seq_len:
        raise PromptTooLong(
            f"the prompt is {prompt_len} tokens but this model's context (max_seq_len) is {max_seq_len} tokens, "
            f"including the answer: shorten the prompt to at most {max_seq_len - 1} tokens, or restart with a larger --max_seq_len")


def check_request(prompt_ids: list[int], params: SamplingParams, max_seq_len: int, vocab_size: int) -> SamplingParams:
    """The complete check of one request, done once before it is published (serve.gate, or a
    command's own arguments). Raises ValueError (SamplingError, PromptTooLong) naming the problem;
    returns the params reduced to what the engine runs (see SamplingParams.validate)."""
    params = params.validate(vocab_size)
    check_prompt(len(prompt_ids), max_seq_len)
    check_token_ids(prompt_ids, vocab_size, "prompt token id")
    return params


def check_token_ids(ids: list[int], vocab_size: int, what: str = "token id") -> None:
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            raise ValueError(f"{what} {t!r} is outside the vocabulary (0..{vocab_size - 1})")


@dataclass
class Sequence:
    req: Request
    row: int  # the KV-cache row it owns
    prefilled: int = 0  # prompt tokens already in the cache
    reused: int = 0  # of which were found in the row, left there by an earlier sequence
    out_ids: list[int] = field(default_factory=list)
    # rank 0 only: what sampling and stop decisions need (engine.Engine fills them in)
    rank0: Any = None

    @property
    def pos(self) -> int:
        """Tokens in the cache (the position the next fed token takes)."""
        return self.prefilled + max(0, len(self.out_ids) - 1)

    @property
    def prompt_left(self) -> int:
        return len(self.req.prompt_ids) - self.prefilled


class Scheduler:
    """The waiting queue and the KV rows. A request waits until a row is free, is prefilled in
    chunks (oldest first, within a per-step budget), then decodes one token per step.

    Prefix reuse (llama.cpp's cache_prompt, vLLM's prefix caching, on one KV row per sequence): a
    finished sequence's row keeps the tokens whose keys and values it holds until the row is
    needed. A new request takes the free row whose tokens share the longest prefix with its prompt
    and is prefilled only from the first differing token; with no such row, a row never used, else
    the least recently freed. Every input to that choice is state every rank already holds, so
    every rank places every request identically."""

    def __init__(self, rows: int, max_seq_len: int, prefix_cache: bool = True):
        self.max_seq_len = max_seq_len
        self.prefix_cache = prefix_cache
        self.waiting: deque[Request] = deque()
        self.running: dict[int | str, Sequence] = {}  # insertion order = admission order
        # free rows, least recently freed first; rows never used come first, lowest first, which
        # keeps a batch's rows together (consecutive rows are attended as one view of the cache)
        self.free_rows: list[int] = list(range(rows))
        self.cached: dict[int, list[int]] = {}  # row -> the tokens its KV holds (free rows only)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def add(self, req: Request) -> None:
        # the gate checked it; a violation here is our bug, and would differ from no rank to another
        assert 0 < len(req.prompt_ids) < self.max_seq_len, "request was not checked before it was added"
        self.waiting.append(req)

    def cancel(self, request_id) -> bool:
        """Drop a waiting or running request; False if it is unknown (already finished)."""
        for i, r in enumerate(self.waiting):
            if r.id == request_id:
                del self.waiting[i]
                return True
        seq = self.running.get(request_id)
        if seq is None:
            return False
        self.retire(seq)
        return True

    def admit(self) -> list[Sequence]:
        """Move waiting requests into free rows; returns the newly admitted sequences (their
        `prefilled` already counts the reused prefix)."""
        new = []
        while self.waiting and self.free_rows:
            req = self.waiting.popleft()
            # a request scoring its prompt (echo) needs the logits of every prompt position: no reuse
            row, reused = self._place(req.prompt_ids, reuse=req.params.prompt_logprobs is None)
            self.free_rows.remove(row)
            self.cached.pop(row, None)
            seq = Sequence(req, row, prefilled=reused, reused=reused)
            self.running[req.id] = seq
            new.append(seq)
        return new

    def _place(self, prompt: list[int], reuse: bool = True) -> tuple[int, int]:
        """(row, prompt tokens whose KV it already holds). At least the last prompt token is
        always prefilled again: its logits give the first answer token."""
        best_row, best = self.free_rows[0], 0
        if self.prefix_cache and reuse:
            for row in self.free_rows:
                n = common_prefix(self.cached.get(row, ()), prompt)
                if n > best:
                    best_row, best = row, n
        return best_row, min(best, len(prompt) - 1)

    def decoding(self) -> list[Sequence]:
        """Sequences with a token to feed, by cache row: consecutive rows are attended as one view."""
        return sorted((s for s in self.running.values() if s.out_ids), key=lambda s: s.row)

    def prefill_plan(self, budget: int) -> list[tuple[Sequence, int]]:
        """(sequence, tokens to prefill this step) within the budget (at least one token, so that
        prompts always advance), in arrival order. A prompt that does not fit what is left takes
        only half of it while another prompt waits behind it: a long prompt spreads over steps
        and cannot hold short ones back for all of them."""
        budget = max(1, budget)
        pending = [s for s in self.running.values() if not s.out_ids and s.prompt_left > 0]
        plan = []
        for i, s in enumerate(pending):
            if budget <= 0:
                break
            n = min(s.prompt_left, budget)
            if n < s.prompt_left and i + 1 < len(pending):
                n = max(1, budget // 2)
            plan.append((s, n))
            budget -= n
        return plan

    def length_reached(self, seq: Sequence, generated: int) -> bool:
        """Whether an answer of `generated` tokens has reached its max_new_tokens or the context."""
        return generated >= seq.req.params.max_new_tokens or len(seq.req.prompt_ids) + generated >= self.max_seq_len

    def retire(self, seq: Sequence) -> None:
        """Free the row; it keeps the tokens whose KV it holds (the last sampled token was never fed)."""
        del self.running[seq.req.id]
        self.free_rows.append(seq.row)  # most recently freed last
        if self.prefix_cache and seq.pos > 0:
            self.cached[seq.row] = (seq.req.prompt_ids[:seq.prefilled] + seq.out_ids)[:seq.pos]


def common_prefix(a, b) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def request_generator(params: SamplingParams) -> torch.Generator | None:
    """A request's own random stream when it names a seed: reproducible whatever shares its batch."""
    if params.seed is None:
        return None
    gen = torch.Generator(device="cpu")
    gen.manual_seed(params.seed)
    return gen
