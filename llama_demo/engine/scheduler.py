"""Requests, the KV-cache blocks they hold, and which tokens each step feeds.

Every rank keeps the same scheduler state: it changes only through `add`/`cancel` (applied at the
same bus seal on every rank) and through the step's broadcast outcome, so all ranks plan the same
forward passes. Nothing here looks at logits or text.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from .kv_blocks import ROOT, BlockPool, block_digest, prefix_digests
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
    computed: int = 0  # tokens whose keys and values are in the cache: positions 0 .. computed - 1
    reused: int = 0  # of the prompt, tokens found in the cache at its first admission (not prefilled)
    out_ids: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)  # its block table: the cache blocks of its positions, in order
    names: list[bytes] = field(default_factory=list)  # the names of its full blocks (kv_blocks.block_digest)
    admitted: bool = False  # it has been admitted once (a preempted one keeps its answer and rank 0's state)
    preemptions: int = 0
    # speculative decoding: this step's proposed tokens (fed after its last token, verified by the
    # step's logits), and its record (engine.speculative.SpecState); the same on every rank
    draft: list[int] = field(default_factory=list)
    spec: Any = None
    # rank 0 only: what sampling and stop decisions need (engine.Engine fills them in)
    rank0: Any = None

    @property
    def pos(self) -> int:
        """The position the next fed token takes."""
        return self.computed

    @property
    def length(self) -> int:
        """Tokens of the sequence so far: prompt and answer."""
        return len(self.req.prompt_ids) + len(self.out_ids)

    @property
    def target(self) -> int:
        """Tokens to have in the cache before the next decode: the prompt, or after a preemption,
        everything but the last sampled token (which the next decode feeds)."""
        return len(self.req.prompt_ids) if not self.out_ids else self.length - 1

    @property
    def prompt_left(self) -> int:
        """Tokens still to prefill before the sequence decodes."""
        return self.target - self.computed

    @property
    def decoding(self) -> bool:
        return bool(self.out_ids) and self.computed == self.length - 1

    def tokens(self, start: int, stop: int) -> list[int]:
        """Its tokens at positions start .. stop - 1 (prompt, then answer)."""
        prompt = self.req.prompt_ids
        if stop <= len(prompt):
            return prompt[start:stop]
        return (prompt[start:] if start < len(prompt) else []) + self.out_ids[max(0, start - len(prompt)): stop - len(prompt)]


@dataclass
class StepPlan:
    """What one step feeds: the sequences first admitted now, the running ones that decode a
    token, and (sequence, tokens) prompt chunks; every fed position already has its block."""
    admitted: list[Sequence]
    decoding: list[Sequence]
    prefill: list[tuple[Sequence, int]]


class Scheduler:
    """The waiting queue, the running sequences and the KV blocks they hold (kv_blocks.BlockPool).

    A request waits until it may run: at most `max_running` sequences run, and one is admitted
    only when the free blocks cover its prompt and a first answer token beyond what the running
    prompts still need. Each step decodes one token for every running sequence that has its
    prompt in, then fills the rest of the budget with prompt chunks in arrival order. A sequence
    takes a new block when its tokens cross into one; when none is left, the youngest running
    sequence is preempted: its blocks go back (their named prefix stays cached), and it waits at
    the head of the queue to be prefilled again from its tokens, prompt and answer so far, its
    stream and rank 0's state kept (vLLM's recompute preemption).

    Prefix reuse: at admission a sequence takes the cached blocks whose names its tokens' full
    blocks have (at least its last prompt token is prefilled again: its logits give the first
    answer token), and prefills only from there. A request whose next block is being prefilled by
    a running sequence right now (the `n` choices of one request, concurrent chats with one system
    prompt) waits until that block is in, then takes it. Every input to every decision is state
    every rank holds, so every rank plans the same steps and places every token alike."""

    def __init__(self, max_running: int, max_seq_len: int, num_blocks: int, block_size: int,
                 prefix_cache: bool = True):
        if num_blocks * block_size < max_seq_len:
            raise ValueError(f"a KV cache of {num_blocks * block_size} tokens cannot hold one sequence of "
                             f"max_seq_len {max_seq_len} tokens")
        self.max_running, self.max_seq_len = max_running, max_seq_len
        self.prefix_cache = prefix_cache
        self.pool = BlockPool(num_blocks, block_size)
        self.block_size = block_size
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int | str, Sequence] = {}  # insertion order = admission order (youngest last)
        self.preempted_total = 0

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def add(self, req: Request) -> None:
        # the gate checked it; a violation here is our bug, and would differ from no rank to another
        assert 0 < len(req.prompt_ids) < self.max_seq_len, "request was not checked before it was added"
        self.waiting.append(Sequence(req))

    def cancel(self, request_id) -> bool:
        """Drop a waiting or running request; False if it is unknown (already finished)."""
        for i, s in enumerate(self.waiting):
            if s.req.id == request_id:
                del self.waiting[i]
                return True
        seq = self.running.get(request_id)
        if seq is None:
            return False
        self.retire(seq)
        return True

    # ----------------------------------------------------------------- one step's plan
    def schedule(self, budget: int, proposer=None) -> StepPlan:
        """The next step: blocks for every decode (preempting the youngest when none is left),
        admissions into what remains, proposals (`proposer`: engine.speculative.Proposer) where
        free blocks hold them, then prompt chunks within `budget` tokens less the decodes."""
        decoding = []
        for seq in list(self.running.values()):  # oldest first: the youngest are preempted first
            if seq.req.id in self.running and seq.decoding and self._grow(seq, seq.computed + 1):
                decoding.append(seq)
        admitted = self._admit()
        decoding = [s for s in decoding if s.req.id in self.running]
        fed = len(decoding)
        for seq in decoding:
            seq.draft = []
        if proposer is not None and decoding:
            drafts = proposer.propose(decoding, [self._proposal_limit(s) for s in decoding], self._room)
            for seq, draft in zip(decoding, drafts):
                seq.draft = draft[:self._room(seq, len(draft))]
                fed += len(seq.draft)
        return StepPlan(admitted, decoding, self._prefill_plan(budget - fed, decoding))

    def _proposal_limit(self, seq: Sequence) -> int:
        """Proposed tokens that can matter: a verification emits up to one more than it proposes,
        within max_new_tokens and the context (the fed positions stay below max_seq_len)."""
        left = min(seq.req.params.max_new_tokens - len(seq.out_ids), self.max_seq_len - seq.length)
        return max(0, left - 1)

    def _room(self, seq: Sequence, proposed: int) -> int:
        """How many of `proposed` tokens after seq's next one get blocks for their positions,
        taken only from free ones: a proposal never preempts anyone nor evicts a cached prefix."""
        while len(seq.blocks) * self.block_size < seq.computed + 1 + proposed:
            block = self.pool.allocate(evict=False)
            if block is None:
                return len(seq.blocks) * self.block_size - seq.computed - 1
            seq.blocks.append(block)
        return proposed

    def _grow(self, seq: Sequence, tokens: int) -> bool:
        """Blocks for `tokens` positions of seq, preempting the youngest running sequence while the
        pool has none; False when seq itself was the one preempted."""
        while len(seq.blocks) * self.block_size < tokens:
            block = self.pool.allocate()
            if block is None:
                victim = next(reversed(self.running.values()))
                self.preempt(victim)
                if victim is seq:
                    return False
                continue
            seq.blocks.append(block)
        return True

    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def _admit(self) -> list[Sequence]:
        """Move waiting sequences in, oldest first, while they fit; returns those admitted for the
        first time (a preempted one resumes with its state)."""
        new = []
        # blocks the running prompts still need to get in, and their first answer token
        owed = sum(max(0, self._blocks_for(s.target + 1) - len(s.blocks)) for s in self.running.values()
                   if not s.decoding)
        for seq in list(self.waiting):
            if len(self.running) >= self.max_running:
                break
            names, hits = self._prefix(seq)
            if names is None:  # its next block is being prefilled by a running sequence: after it
                continue
            evicted_by_hits = sum(1 for b in hits if self.pool.holders[b] == 0)
            need = self._blocks_for(seq.target + 1) - len(hits)
            if self.pool.available - evicted_by_hits - owed < need:
                break  # arrival order: nobody overtakes a request that waits for memory
            self.waiting.remove(seq)
            for b in hits:
                self.pool.hold(b)
            seq.blocks, seq.names = list(hits), names[:len(hits)]
            seq.computed = len(hits) * self.block_size
            if not seq.admitted:
                seq.admitted, seq.reused = True, seq.computed
                new.append(seq)
            self.running[seq.req.id] = seq
            owed += need
        return new

    def _prefix(self, seq: Sequence) -> tuple[list[bytes] | None, list[int]]:
        """(names of seq's full blocks before its last token to prefill, the cached blocks of the
        longest run of them); (None, []) when the first block not cached is being prefilled by a
        running sequence now, which seq should wait for rather than compute again."""
        if not self.prefix_cache or (not seq.out_ids and seq.req.params.prompt_logprobs is not None):
            return [], []  # a request scoring its prompt (echo) needs the logits of every prompt position
        # the last prompt token is fed again for its logits (a preempted sequence needs none: it has
        # its next token)
        usable = seq.target - (0 if seq.out_ids else 1)
        names = prefix_digests(seq.tokens(0, usable), self.block_size, usable // self.block_size)
        hits = self.pool.find(names)
        if len(hits) < len(names):
            nxt, i = names[len(hits)], len(hits)
            if any(len(other.names) == i and self._will_name(other, i) == nxt for other in self.running.values()):
                return None, []
        return names, hits

    def _will_name(self, seq: Sequence, i: int) -> bytes | None:
        """The name seq's block i will have once full, if its tokens are known (its prompt)."""
        end = (i + 1) * self.block_size
        if end > seq.target:
            return None
        parent = seq.names[i - 1] if i else ROOT
        return block_digest(parent, seq.tokens(i * self.block_size, end))

    def _prefill_plan(self, budget: int, decoding: list[Sequence]) -> list[tuple[Sequence, int]]:
        """(sequence, tokens to prefill this step) within the budget (at least one token, so that
        prompts always advance), in arrival order, each chunk's blocks allocated. A prompt that does
        not fit what is left takes only half of it while another prompt waits behind it: a long
        prompt spreads over steps and cannot hold short ones back for all of them. A chunk shrinks
        to the blocks to be had; with no decode and no chunk able to run, the youngest other
        running sequence is preempted (else nothing would ever free a block)."""
        budget = max(1, budget)
        while True:
            pending = [s for s in self.running.values() if not s.decoding and s.prompt_left > 0]
            plan = []
            for i, s in enumerate(pending):
                if budget <= 0:
                    break
                n = min(s.prompt_left, budget)
                if n < s.prompt_left and i + 1 < len(pending):
                    n = max(1, budget // 2)
                room = len(s.blocks) * self.block_size - s.computed
                while room < n and (block := self.pool.allocate()) is not None:
                    s.blocks.append(block)
                    room += self.block_size
                n = min(n, room)
                if n > 0:
                    plan.append((s, n))
                    budget -= n
            if plan or decoding or not pending or len(self.running) < 2:
                return plan
            self.preempt(next(s for s in reversed(self.running.values()) if s is not pending[0]))

    def prefill_plan(self, budget: int) -> list[tuple[Sequence, int]]:
        """The prompt chunks of a step that decodes nothing else (the planner's rule on its own)."""
        return self._prefill_plan(budget, [s for s in self.running.values() if s.decoding])

    def admit(self) -> list[Sequence]:
        return self._admit()

    # ----------------------------------------------------------------- after the step
    def computed(self, seq: Sequence, n: int) -> None:
        """n more of seq's tokens are in the cache: name the blocks they filled. Blocks past the
        next decode's position (a verification's rejected proposals wrote there) go back: the
        positions are written again when the sequence reaches them."""
        seq.computed += n
        while len(seq.blocks) > 1 and (len(seq.blocks) - 1) * self.block_size > seq.computed:
            self.pool.release(seq.blocks.pop())
        if not self.prefix_cache:
            return
        while len(seq.names) < seq.computed // self.block_size:
            i = len(seq.names)
            name = block_digest(seq.names[-1] if seq.names else ROOT,
                                seq.tokens(i * self.block_size, (i + 1) * self.block_size))
            seq.names.append(name)
            self.pool.name(seq.blocks[i], name)

    def length_reached(self, seq: Sequence, generated: int) -> bool:
        """Whether an answer of `generated` tokens has reached its max_new_tokens or the context."""
        return generated >= seq.req.params.max_new_tokens or len(seq.req.prompt_ids) + generated >= self.max_seq_len

    def preempt(self, seq: Sequence) -> None:
        """Take seq's blocks back (named ones stay cached) and put it first in the queue, to be
        prefilled again from its tokens when blocks are free."""
        del self.running[seq.req.id]
        self._release(seq)
        seq.spec = None  # its speculation record starts again (a draft model's keys went with the blocks)
        seq.preemptions += 1
        self.preempted_total += 1
        self.waiting.appendleft(seq)

    def retire(self, seq: Sequence) -> None:
        """A finished sequence: its blocks go back; the full ones keep their names, for reuse."""
        del self.running[seq.req.id]
        self._release(seq)

    def _release(self, seq: Sequence) -> None:
        for block in reversed(seq.blocks):  # the deepest blocks first: evicted before the shared start
            self.pool.release(block)
        seq.blocks, seq.names, seq.computed = [], [], 0

    def forget_cached(self) -> None:
        """Drop every cached prefix (a benchmark's cold start)."""
        self.pool.forget()


def request_generator(params: SamplingParams) -> torch.Generator | None:
    """A request's own random stream when it names a seed: reproducible whatever shares its batch."""
    if params.seed is None:
        return None
    gen = torch.Generator(device="cpu")
    gen.manual_seed(params.seed)
    return gen
