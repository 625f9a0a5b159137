"""The lock-step step: plan, forward, sample and decide on rank 0, broadcast, advance.

Every rank calls `Engine.step` with the same admissions and cancellations (serve.loop applies them
at the same bus seal), so every rank runs the same forward passes and their collectives line up.
Rank 0 alone samples, detokenizes and matches stop strings; it broadcasts each sampled id with a
finish code, so follower ranks only run the model and advance their scheduler by the codes.

A fault that concerns one request (its sampling, its text, its stop strings) ends that request
with finish code ERROR on every rank alike; the other requests and the loop go on. Only a failed
collective or a dead rank ends the job; running out of device memory is reported as such.

Continuous batching with a token budget (vLLM's chunked prefill) over a paged KV cache: each
sequence holds the cache blocks its tokens fill, shared by prefix (scheduler.Scheduler,
kv_blocks). Every step decodes one token for every running sequence, then fills the rest of
`step_tokens` with waiting prompts in arrival order; a prompt is split over steps only when it
does not fit what is left of the budget. `calibrate` chooses the budget on this
machine: the prompt chunk that a full batch of decodes takes in with the most prompt tokens a
second, which is what both the time to first token and the throughput under load depend on.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..config import STEP_TOKEN_CANDIDATES
from ..model.parallel import broadcast_from_first
from ..model.parts import Part, padded_tables
from ..model.transformer import Transformer
from ..text.detok import TextStream
from ..text.tokenizer import Tokenizer
from .sampler import (apply_logit_bias, apply_penalties, apply_repetition_penalty, repeat_window, repeats_itself,
                      SamplingBatch, sample, top_logprobs)
from .grammar import Matcher
from .draft import DraftProposer
from .speculative import Proposer, SpeculationConfig, StepCosts, accept_or_replace
from .scheduler import PromptTooLong, Request, Scheduler, Sequence, check_prompt, check_request, request_generator

__all__ = ["Engine", "Request", "TokenEvent", "PromptTooLong", "StepOutOfMemory", "check_prompt", "check_request"]

PROBE_ROUNDS = 2  # calibrate's timings per candidate chunk
SPEC_COST_ROWS = (1, 2, 4, 8, 16, 32, 64)  # decoding sequences calibrate_speculation times (up to max_batch_size)

# Finish codes broadcast with each sampled id (one home for their meaning).
CONTINUE, STOP_ID, STOP_STRING, LENGTH, ERROR, REPEATING, GRAMMAR_END = 0, 1, 2, 3, 4, 5, 6
UNUSED = -1  # a verification's slot past the tokens it emitted (speculative decoding)
REASONS = {STOP_ID: "stop", STOP_STRING: "stop", LENGTH: "length", ERROR: "error", REPEATING: "stop", GRAMMAR_END: "stop"}
REPEATING_NOTE = "stopped: the answer kept repeating itself"


class StepOutOfMemory(RuntimeError):
    """A step ran out of device memory on this rank: not a lost rank; the message names the sizes."""


@dataclass
class TokenEvent:
    """One step's outcome for one request. `text` (rank 0 only) is the newly completed text: empty
    while a multi-byte character or a possible stop string is held back."""
    request_id: int | str
    token_id: int | None
    text: str
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None  # why the request ended, for finish_reason "error"
    stop_id: bool = False  # token_id is the end-of-answer id (EOS, end of turn) that finished it
    reused: int = 0  # prompt tokens whose KV was found in the cache row (prefix reuse), not prefilled
    # Rank 0 only, for requests that ask (SamplingParams.logprobs / prompt_logprobs); never broadcast.
    logprob: float | None = None  # token_id's log probability under the model (before any sampling filter)
    top_logprobs: list[tuple[int, float]] | None = None  # the most likely ids at this step, best first
    # on a request's first event with prompt_logprobs: one (id, logprob, top) per prompt token, the
    # first token's logprob None (nothing predicts it)
    prompt_logprobs: list[tuple[int, float | None, list[tuple[int, float]]]] | None = None
    note: str | None = None  # rank 0: why an answer ended early, when a person should know (the repeat guard)
    delivered: float | None = None  # rank 0: time.monotonic() when the serving loop handed it to the web thread


@dataclass
class _Rank0State:
    """What rank 0 keeps per sequence to sample it and decide when it ends."""
    text: TextStream
    generator: torch.Generator | None
    seen: torch.Tensor | None = None  # with a repetition penalty: (V,) mask of the tokens so far
    counts: torch.Tensor | None = None  # with presence/frequency penalties: (V,) counts of the answer's tokens
    logprobs: list = field(default_factory=list)  # this step's (logprob, top) per emitted token, for the events
    prompt_logprobs: list | None = None  # gathered chunk by chunk while the prompt is prefilled
    matcher: Matcher | None = None  # structured output: the grammar's state, masks each step's logits
    error: str | None = None  # set when something about this request failed: it ends at its next token
    texts: list[str] = field(default_factory=list)  # this step's text per emitted token, for the events


class Engine:
    # the serving loop's seal (serve.loop) rides in each step's outcome broadcast: rank 0 calls
    # seal_source() (the last bus message it has read) just before it; every rank finds the value
    # in carried_seal after the step (the loop sets it to None first: a step that broadcast
    # nothing leaves it so)
    seal_source = None
    carried_seal: int | None = None

    def __init__(self, model: Transformer, tokenizer: Tokenizer, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu", seed: int | None = None, step_tokens: int | None = None,
                 prefix_cache: bool = True, speculation: SpeculationConfig | None = None,
                 draft: Transformer | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.max_seq_len = model.args.max_seq_len
        self.vocab_size = model.args.vocab_size
        # Tokens one step feeds, decodes first, then prompt chunks (calibrate() measures the best
        # on this machine; until then a size that is efficient on CPUs and GPUs we measured)
        self.step_tokens = step_tokens if step_tokens is not None else 512 if self.device.type == "cuda" else 256
        if self.step_tokens < 1:
            raise ValueError(f"step_tokens must be at least 1, got {step_tokens}")
        self.calibration: dict[int, float] | None = None  # calibrate(): prompt tokens/s per candidate chunk
        self.scheduler = Scheduler(model.args.max_batch_size, self.max_seq_len, model.kv_blocks, model.block_size,
                                   prefix_cache)
        self.steps = 0
        self.last_prefill_tokens = 0  # prompt tokens the last step fed (0: a step of decodes alone)
        self.last_forward_s = 0.0  # seconds of the last step's forward (the rest: deciding, broadcasting, events)
        # speculative decoding (--speculative): proposals for decoding sequences, verified in the step
        # (`draft`: the draft model of --speculative draft / int8 / int4, its KV pool as the target's)
        self.proposer = None
        if speculation is not None and draft is not None:
            if (draft.kv_blocks, draft.block_size) != (model.kv_blocks, model.block_size):
                raise ValueError(f"the draft's KV pool ({draft.kv_blocks} blocks of {draft.block_size}) must be the "
                                 f"target's ({model.kv_blocks} of {model.block_size}): it is read through the same tables")
            if draft.args.vocab_size != model.args.vocab_size:
                raise ValueError(f"the draft model's vocabulary ({draft.args.vocab_size} tokens) is not the served "
                                 f"model's ({model.args.vocab_size}): a draft must share its tokenizer")
            self.proposer = DraftProposer(speculation, draft, self.device, shares_cache=draft.shares_cache_with(model))
        elif speculation is not None:
            self.proposer = Proposer(speculation)
        if rank == 0:
            self.generator = torch.Generator(device="cpu")
            self.generator.manual_seed(seed if seed is not None else torch.seed())
            self.sampling_batches: dict[tuple, tuple[list, SamplingBatch]] = {}  # _sampling_batch
        # ids that end an answer: EOS, plus e.g. a chat format's end-of-turn token (rank 0 decides)
        self.stop_ids = frozenset(tokenizer.stop_ids)

    # ----------------------------------------------------------------- requests in and out
    @property
    def idle(self) -> bool:
        return self.scheduler.idle

    @property
    def running(self) -> dict:
        return self.scheduler.running

    @property
    def waiting(self):
        return self.scheduler.waiting

    def check(self, req: Request) -> Request:
        """The full check of a request from a command's own arguments (the server's gate does the
        same through check_request); returns it with its params reduced."""
        req.params = check_request(req.prompt_ids, req.params, self.max_seq_len, self.vocab_size)
        return req

    def add(self, req: Request) -> None:
        self.scheduler.add(req)

    def cancel(self, request_id) -> list[TokenEvent]:
        if self.scheduler.cancel(request_id):
            return [TokenEvent(request_id, None, "", True, "cancelled")]
        return []

    def _start(self, admitted: list[Sequence]) -> None:
        """Rank 0's state of sequences admitted for the first time (a preempted one keeps its own)."""
        for seq in admitted:
            if self.rank != 0:
                continue
            p = seq.req.params
            try:
                seq.rank0 = _Rank0State(TextStream(self.tokenizer, p.stop, seq.req.prompt_ids[-4:]), request_generator(p))
                if p.grammar is not None:
                    seq.rank0.matcher = Matcher(p.grammar, self.tokenizer, self.vocab_size, self.stop_ids)
            except Exception as e:  # ends this request at its first token, on every rank (see _decide)
                seq.rank0 = _Rank0State(TextStream(self.tokenizer), None, error=f"could not start the request: {e}")

    def calibrate(self, candidates: tuple[int, ...] | None = None) -> int:
        """Choose step_tokens on this machine: for each candidate prompt chunk, time a step that
        carries it beside a full batch of decodes (max_batch_size - 1 rows), and keep the chunk
        that takes in the most prompt tokens a second: a waiting prompt's time to first token is
        its length over that rate, and under load the same rate bounds throughput. A candidate
        within 5% of the best but smaller wins (a shorter step: steadier token times for the
        decodes). Rank 0's choice is broadcast: every rank must plan the same steps. Uses the
        KV cache's first blocks (every timed row shares them), so it drops every cached prefix."""
        assert self.idle, "calibrate before serving"
        self.scheduler.forget_cached()
        dev = self.device
        rows = self.model.args.max_batch_size
        decodes = max(0, rows - 1)
        candidates = candidates or STEP_TOKEN_CANDIDATES[dev.type == "cuda"]
        candidates = [n for n in candidates if n < self.max_seq_len - 1] or [self.max_seq_len - 2]
        rates = {}
        # the first one once more, first: it warms caches and kernels up; then every candidate
        # twice, in turns, the best of each kept: one step timed once can lose 5x to a neighbour
        bs = self.model.block_size
        for n in [candidates[0]] + list(candidates) * PROBE_ROUNDS:
            at = n + 1  # decodes attend over n + 1 positions, as after a prompt of that length
            table = torch.arange(at // bs + 1, device=dev)[None]  # every row reads (and writes) the same blocks
            parts = [Part.of(0, table.expand(decodes, -1), torch.full((decodes, 1), at, device=dev), bs)] if decodes else []
            parts.append(Part.of(decodes, table, torch.arange(n, device=dev)[None], bs))
            pos = torch.cat([torch.full((decodes,), at, device=dev), torch.arange(n, device=dev)])
            logits_at = torch.arange(decodes + 1, device=dev)
            logits_at[-1] = decodes + n - 1
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            self.model.step(torch.zeros(decodes + n, dtype=torch.long, device=dev), pos, parts, logits_at)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            rates[n] = max(rates.get(n, 0.0), n / (time.perf_counter() - t0))
        best = max(rates.values())
        chunk = min(n for n, r in rates.items() if r >= 0.95 * best)
        out = torch.tensor([decodes + chunk], device=dev)
        if self.world_size > 1:
            broadcast_from_first(out, None)
        self.step_tokens = int(out.item())
        self.calibration = {n: round(r, 1) for n, r in rates.items()}
        return self.step_tokens

    def calibrate_speculation(self) -> StepCosts | None:
        """With speculative decoding: time the steps a verification makes, for SPEC_COST_ROWS
        decoding sequences (up to max_batch_size) each proposing 0 .. --num_speculative_tokens
        tokens (0: the plain decode part), and, with a draft model, its step of that many rows;
        relative to a target step of one row, they are the proposer's costs (StepCosts): it
        proposes only where a wider step pays for itself on this machine. Rank 0's times are
        broadcast: every rank must make the same proposals. Drops every cached prefix (the timed
        rows share the pool's first blocks)."""
        if self.proposer is None:
            return None
        assert self.idle, "calibrate before serving"
        self.scheduler.forget_cached()
        cap = self.model.args.max_batch_size
        rows = sorted({r for r in SPEC_COST_ROWS if r <= cap} | {cap})
        ks = range(self.proposer.config.tokens + 1)
        draft = self.proposer.draft if isinstance(self.proposer, DraftProposer) else None
        shapes = [(self.model, r, k) for r in rows for k in ks] + ([(draft, r, 0) for r in rows] if draft else [])
        times = [float("inf")] * len(shapes)
        for _ in range(PROBE_ROUNDS + 1):  # the first round warms up; the best of each kept
            for i, (model, r, k) in enumerate(shapes):
                times[i] = min(times[i], self._time_verification(model, r, k))
        one = times[0]  # the target's step of one row, proposing nothing
        measured = torch.tensor([t / one for t in times], device=self.device)
        if self.world_size > 1:
            broadcast_from_first(measured, None)
        ratio = measured.tolist()
        target = [ratio[i * len(ks):(i + 1) * len(ks)] for i in range(len(rows))]
        for by_k in target:  # never cheaper to carry more tokens
            for k in range(1, len(by_k)):
                by_k[k] = max(by_k[k], by_k[k - 1])
        self.proposer.costs = StepCosts.measured(rows, target, ratio[len(rows) * len(ks):] if draft else None)
        return self.proposer.costs

    def _time_verification(self, model: Transformer, rows: int, proposed: int) -> float:
        """Seconds of one step of `rows` sequences each feeding 1 + `proposed` tokens (logits at
        each), as a verification step has them: one part of `rows` decode rows when nothing is
        proposed, else a part per sequence. After a prompt of a typical length; every row reads
        and writes the pool's first blocks."""
        dev, bs = self.device, model.block_size
        n = 1 + proposed
        at = min(256, self.max_seq_len - n - 1)
        table = torch.arange(-(-(at + n) // bs), device=dev)[None]
        pos = torch.arange(at, at + n, device=dev)
        if proposed == 0:
            parts = [Part.of(0, table.expand(rows, -1), torch.full((rows, 1), at, device=dev), bs)]
        else:
            parts = [Part.of(i * n, table, pos[None], bs) for i in range(rows)]
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        model.step(torch.zeros(rows * n, dtype=torch.long, device=dev), pos.repeat(rows), parts,
                   torch.arange(rows * n, device=dev), every_rank=model is not self.model)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t0

    # ----------------------------------------------------------------- the step
    def step(self) -> list[TokenEvent]:
        """One lock-step iteration: prefill (a chunk of) waiting prompts, decode one token for
        every running sequence, sample and decide on rank 0, broadcast, retire finished sequences."""
        step = self.scheduler.schedule(self.step_tokens, self.proposer)
        self._start(step.admitted)
        decoding, plan = step.decoding, step.prefill
        if not decoding and not plan:
            return []
        self.steps += 1
        self.last_prefill_tokens = sum(n for _, n in plan)
        started = time.perf_counter()
        try:
            seqs, widths, logits = self._forward_step(decoding, plan)
        except torch.OutOfMemoryError as e:
            chunk = sum(n for _, n in plan)
            raise StepOutOfMemory(
                f"rank {self.rank} ran out of {self.device.type} memory in a step decoding {len(decoding)} sequence(s) "
                f"(longest {max((s.pos for s in decoding), default=0) + 1} tokens) with a {chunk}-token prompt chunk: "
                f"restart with a smaller --max_batch_size, --max_seq_len or --step_tokens "
                f"({str(e).splitlines()[0] if str(e) else 'out of memory'})") from None
        self.last_forward_s = time.perf_counter() - started
        if not seqs:
            return []
        ids, codes = self._decide(logits, seqs, widths)
        return self._advance(seqs, widths, ids, codes, len(decoding))

    def _forward_step(self, decoding: list[Sequence], plan: list[tuple[Sequence, int]]):
        """The step's one forward: decode rows and prefill chunks side by side in one ragged batch,
        so each weight is read once per step; logits only at the positions that are sampled (and,
        for a request scoring its prompt, at its chunk's every position). A decode with proposed
        tokens (speculative decoding) feeds them after its last token, as a part of its own, and
        has logits at each of those positions. Returns the sequences that get tokens (the decodes
        first, in order), how many logits rows each has, and those rows, in the same order."""
        dev, bs = self.device, self.model.block_size
        tokens, pos, parts, at = [], [], [], []
        seqs, picks = [], []  # sequences sampled this step, and their rows of the logits
        plain = [s for s in decoding if not s.draft]
        if plain:  # every decode row in one part: one batched attention over their block tables
            parts.append(Part.of(0, padded_tables([s.blocks for s in plain], dev),
                                 torch.tensor([[s.pos] for s in plain], device=dev), bs,
                                 kv_len=max(s.pos for s in plain) + 1))
            tokens += [s.out_ids[-1] for s in plain]
            pos += [s.pos for s in plain]
            picks += range(len(plain))
            at += range(len(plain))
        rows = {}  # a verified sequence's logits rows (its fed tokens, in order)
        for s in decoding:
            if not s.draft:
                continue
            n = 1 + len(s.draft)
            parts.append(Part.of(len(tokens), torch.tensor([s.blocks], device=dev),
                                 torch.arange(s.pos, s.pos + n, device=dev)[None], bs, kv_len=s.pos + n))
            rows[s.req.id] = range(len(at), len(at) + n)
            at += range(len(tokens), len(tokens) + n)
            tokens += [s.out_ids[-1]] + s.draft
            pos += range(s.pos, s.pos + n)
        if rows:  # the decodes' rows in `decoding` order: plain ones first in `picks`, so reorder
            plain_rows = iter(range(len(plain)))
            picks = [r for s in decoding for r in (rows[s.req.id] if s.draft else [next(plain_rows)])]
        seqs += decoding
        widths = [1 + len(s.draft) for s in decoding]
        scored = []  # (sequence, first row of its logits, chunk length): prompt logprobs (echo)
        for s, n in plan:
            start = s.computed
            # a prompt's last chunk is sampled (its last position gives the first answer token); a
            # preempted sequence's prefill ends before its last sampled token, which it decodes next
            sampled = not s.out_ids and start + n == len(s.req.prompt_ids)
            p = torch.arange(start, start + n, device=dev)[None]
            parts.append(Part.of(len(tokens), torch.tensor([s.blocks], device=dev), p, bs, kv_len=start + n))
            first = len(tokens)
            tokens += s.tokens(start, start + n)
            pos += range(start, start + n)
            if s.req.params.prompt_logprobs is not None and not s.out_ids:  # every rank: the same forward and gathers
                scored.append((s, len(at), n))
                at += range(first, first + n)
            elif sampled:
                at.append(first + n - 1)
            if sampled:
                picks.append(len(at) - 1)
                seqs.append(s)
                widths.append(1)
        logits = self.model.step(torch.tensor(tokens, device=dev), torch.tensor(pos, dtype=torch.long, device=dev), parts,
                                 torch.tensor(at, dtype=torch.long, device=dev))
        for s, row, n in scored:
            if self.rank == 0:
                self._note_prompt_logprobs(s, logits[row: row + n])
        for s, n in plan:  # a decode's tokens count once the step's outcome says which stand (_advance)
            self.scheduler.computed(s, n)
        return seqs, widths, logits[picks] if picks else logits[:0]

    def _note_prompt_logprobs(self, s: Sequence, logits: torch.Tensor) -> None:
        """Rank 0: logprobs of the prompt tokens this chunk's logits (n, V) predict. Position j's
        logits predict token j + 1; the chunk's last position predicts the next chunk's first token,
        or (last chunk) the first answer token, which _decide scores as usual."""
        st, start, ids = s.rank0, s.computed, s.req.prompt_ids
        try:
            if st.prompt_logprobs is None:
                st.prompt_logprobs = [(ids[0], None, [])]  # nothing predicts the first token
            targets = ids[start + 1: start + len(logits) + 1]
            chosen, top_ids, top = top_logprobs(logits[:len(targets)], torch.tensor(targets),
                                                s.req.params.prompt_logprobs)
            st.prompt_logprobs += [(t, lp, list(zip(ti, tl))) for t, lp, ti, tl in
                                   zip(targets, chosen.tolist(), top_ids.tolist(), top.tolist())]
        except Exception as e:  # ends this request at its first token (see _judge)
            st.error = st.error or f"prompt logprobs failed: {e}"

    def _decide(self, logits: torch.Tensor, seqs: list[Sequence], widths: list[int]) -> tuple[list[int], list[int]]:
        """Rank 0 samples each sequence's next id and decides whether it ends (finish code); ids
        and codes are broadcast together, so every rank advances identically. A verified sequence
        (width > 1 rows) has a slot per row: the tokens it emits, then UNUSED."""
        n = sum(widths)
        out = torch.zeros(2 * n + 1, dtype=torch.long, device=self.device)
        if self.rank == 0:
            single = [i for i, w in enumerate(widths) if w == 1]
            first = [sum(widths[:i]) for i in range(len(widths))]
            ids, codes = [0] * n, [UNUSED] * n
            if single:
                one = [seqs[i] for i in single]
                rows = logits[[first[i] for i in single]] if len(single) < len(seqs) else logits
                picked = self._sample_rows(rows, one)
                self._note_logprobs(rows, one, picked)
                for i, s, tok in zip(single, one, picked):
                    ids[first[i]], codes[first[i]] = tok, self._judge(s, tok)
            for i, w in enumerate(widths):
                if w > 1:
                    for j, (tok, code) in enumerate(self._verify(seqs[i], logits[first[i]: first[i] + w])):
                        ids[first[i] + j], codes[first[i] + j] = tok, code
            # the serving loop's seal rides along (seal_source): one collective a step
            flat = ids + codes + [self.seal_source() if self.seal_source is not None else 0]
            if self.world_size > 1:
                out.copy_(torch.tensor(flat))
        if self.world_size > 1:
            broadcast_from_first(out, None)
        if self.rank != 0:
            flat = out.tolist()  # a follower's one host read of the step (rank 0 has the values)
        self.carried_seal = flat[-1]
        return flat[:n], flat[n:2 * n]

    def _verify(self, s: Sequence, logits: torch.Tensor) -> list[tuple[int, int]]:
        """Rank 0: the tokens a verification emits, with their finish codes. Row i of logits (the
        target's, after the sequence's last token and i proposed ones) decides token i: the proposed
        one stands or is replaced (speculative.accept_or_replace), the last row gives one more; it
        stops at the first replaced token or the first that ends the answer. Penalties, biases
        and the grammar see each token before the next row is judged, exactly as step by step."""
        p, st, emitted = s.req.params, s.rank0, []
        out = []
        gen = st.generator if st.generator is not None else self.generator
        for i in range(len(logits)):
            try:
                row = self._adjusted(logits[i:i + 1], [s])[0]
                u_accept, u_draw = torch.rand(2, generator=gen).tolist()
                if i < len(s.draft):
                    tok, kept = accept_or_replace(row, s.draft[i], p.temperature, p.top_p, p.top_k, p.min_p,
                                                  u_accept, u_draw)
                else:
                    tok, kept = int(self._sample(row[None], [s], torch.tensor([u_draw]), adjusted=True)[0]), False
                self._note_logprobs(logits[i:i + 1], [s], [tok])
            except Exception as e:
                st.error = st.error or f"sampling failed: {e}"
                tok, kept = 0, False
            code = self._judge(s, tok, emitted)
            out.append((tok, code))
            emitted.append(tok)
            if code != CONTINUE or not kept:
                break
        return out

    def _note_logprobs(self, logits: torch.Tensor, seqs: list[Sequence], ids: list[int]) -> None:
        """Rank 0: for the rows that ask, the sampled ids' logprobs and their best alternatives,
        from the model's logits before any penalty or filter (one top-k over those rows)."""
        rows = [i for i, s in enumerate(seqs) if s.req.params.logprobs is not None]
        if not rows:
            return
        try:
            k = max(seqs[i].req.params.logprobs for i in rows)
            at = torch.tensor(rows, device=logits.device)
            chosen, top_ids, top = top_logprobs(logits.index_select(0, at), torch.tensor([ids[i] for i in rows]), k)
            for r, i in enumerate(rows):
                want = seqs[i].req.params.logprobs
                seqs[i].rank0.logprobs.append((chosen[r].item(), list(zip(top_ids[r, :want].tolist(), top[r, :want].tolist()))))
        except Exception as e:
            for i in rows:
                seqs[i].rank0.error = seqs[i].rank0.error or f"logprobs failed: {e}"

    def _sample_rows(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """One batched draw; if it fails, row by row, so that only the request at fault ends. The
        uniforms are drawn first, one a row, and the retry uses the same ones: a seeded request
        draws what it would have, whatever failed beside it (reproducible)."""
        # a request with its own seed draws from its own generator, so it is reproducible whatever
        # else shares the batch
        u = torch.rand(len(seqs), generator=self.generator)
        for i, s in enumerate(seqs):
            if s.rank0.generator is not None:
                u[i] = torch.rand(1, generator=s.rank0.generator)[0]
        try:
            return self._sample(logits, seqs, u).tolist()
        except Exception:
            ids = []
            for i, s in enumerate(seqs):
                try:
                    ids.append(int(self._sample(logits[i:i + 1], [s], u[i:i + 1])[0]))
                except Exception as e:
                    s.rank0.error = s.rank0.error or f"sampling failed: {e}"
                    ids.append(0)
            return ids

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], u: torch.Tensor, adjusted: bool = False) -> torch.Tensor:
        """Ids for `seqs` from their logits rows and uniforms `u` (_sample_rows draws them);
        `adjusted`: the rows already have their penalties, biases and grammar (_adjusted)."""
        logits = logits.float() if adjusted else self._adjusted(logits, seqs)
        return sample(logits, uniform=u.to(logits.device), batch=self._sampling_batch(seqs, logits.device))

    def _sampling_batch(self, seqs: list[Sequence], device: torch.device) -> SamplingBatch:
        """Rank 0: the sampling tensors of `seqs` and sample()'s host-side flags, built once per
        change of the batch (kept by its sequence ids, checked against their params)."""
        key, params = tuple(s.req.id for s in seqs), [s.req.params for s in seqs]
        hit = self.sampling_batches.get(key)
        if hit is not None and all(a is b for a, b in zip(hit[0], params)):
            return hit[1]
        if len(self.sampling_batches) >= 16:  # a few batches at a time: the step's, single rows
            self.sampling_batches.clear()
        batch = SamplingBatch.of(params, device)
        self.sampling_batches[key] = (params, batch)
        return batch

    def _adjusted(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """float32 logits rows of `seqs` with their penalties, biases and grammar mask applied (a
        copy when any applies: logprobs are reported from the model's own logits)."""
        params = [s.req.params for s in seqs]
        # penalties and biases change a copy: logprobs are reported from the model's own logits
        adjusted = [p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty or p.logit_bias
                    or s.rank0.matcher is not None for p, s in zip(params, seqs)]
        logits = logits.float().clone() if any(adjusted) else logits.float()
        for i, s in enumerate(seqs):
            if not adjusted[i]:
                continue
            p, st = params[i], s.rank0
            if p.repetition_penalty != 1.0:
                if st.seen is None:  # built once, then kept up to date token by token (_advance)
                    st.seen = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
                    st.seen[torch.tensor(s.req.prompt_ids + s.out_ids, device=logits.device)] = True
                logits[i] = apply_repetition_penalty(logits[i], st.seen, p.repetition_penalty)
            if p.presence_penalty or p.frequency_penalty:
                if st.counts is None:  # over the answer only (OpenAI), kept up to date in _advance
                    st.counts = torch.zeros(logits.shape[-1], device=logits.device)
                    if s.out_ids:
                        st.counts.index_add_(0, torch.tensor(s.out_ids, device=logits.device),
                                             torch.ones(len(s.out_ids), device=logits.device))
                logits[i] = apply_penalties(logits[i], st.counts, p.presence_penalty, p.frequency_penalty)
            logits[i] = apply_logit_bias(logits[i], p.logit_bias)
            if st.matcher is not None:  # last: the grammar has the final say over what may follow
                logits[i] = logits[i].masked_fill(~st.matcher.allowed(logits.device), float("-inf"))
        return logits

    def _judge(self, s: Sequence, tok: int, before: list[int] = ()) -> int:
        """Rank 0: does this token end the sequence? Detokenizes and matches stop strings, and
        keeps the penalties' counts. `before`: tokens this step emitted ahead of it (a verification)."""
        st = s.rank0
        code = self._finish_code(s, tok, list(before))
        if code != ERROR:
            if st.seen is not None:
                st.seen[tok] = True
            if st.counts is not None:
                st.counts[tok] += 1
        return code

    def _finish_code(self, s: Sequence, tok: int, before: list[int]) -> int:
        st = s.rank0
        try:
            if st.error is not None:
                return ERROR
            if tok in self.stop_ids:
                st.texts.append(st.text.finish())
                return STOP_ID
            text, stopped = st.text.push(tok)
            if stopped:
                st.texts.append(text)
                return STOP_STRING
            if st.matcher is not None:
                st.matcher.consume(tok)
                if st.matcher.done:  # the document is complete: nothing but the end may follow
                    st.texts.append(text + st.text.finish())
                    return GRAMMAR_END
            guard = s.req.params.repeat_guard
            answer = s.out_ids + before
            if guard and repeats_itself(answer[-repeat_window(guard):] + [tok], guard):
                st.texts.append(text + st.text.finish())
                return REPEATING
            if self.scheduler.length_reached(s, len(answer) + 1):
                st.texts.append(text + st.text.finish())
                return LENGTH
            st.texts.append(text)
            return CONTINUE
        except Exception as e:
            st.error = f"could not turn the answer into text: {e}"
            return ERROR

    def _advance(self, seqs: list[Sequence], widths: list[int], ids: list[int], codes: list[int],
                 decodes: int) -> list[TokenEvent]:
        """Every rank: the step's outcome applied. The first `decodes` sequences fed tokens this
        step that count once known to stand: their last token, and the proposed ones accepted."""
        events, at = [], 0
        for i, (s, w) in enumerate(zip(seqs, widths)):
            slots = list(zip(ids[at: at + w], codes[at: at + w]))
            at += w
            st, emitted, finished = s.rank0, [], False
            for tok, code in slots:
                if code == UNUSED:
                    break
                if code == ERROR:
                    events.append(TokenEvent(s.req.id, None, "", True, "error", error=st.error if st else None,
                                             reused=s.reused))
                    finished = True
                    break
                s.out_ids.append(tok)
                emitted.append(tok)
                ev = TokenEvent(s.req.id, tok, "", code != CONTINUE, REASONS.get(code), stop_id=code == STOP_ID,
                                reused=s.reused)
                if st is not None:
                    ev.text = st.texts.pop(0) if st.texts else ""
                    if st.logprobs:
                        ev.logprob, ev.top_logprobs = st.logprobs.pop(0)
                    if st.prompt_logprobs is not None:
                        ev.prompt_logprobs, st.prompt_logprobs = st.prompt_logprobs, None
                    if code == REPEATING:
                        ev.note = REPEATING_NOTE
                events.append(ev)
                if ev.finished:
                    finished = True
                    break
            if i < decodes and s.draft:  # a verification: its acceptance decides whether s goes on proposing
                accepted = next((j for j, (a, b) in enumerate(zip(emitted, s.draft)) if a != b),
                                min(len(emitted), len(s.draft)))
                self.proposer.verified(s, len(s.draft), accepted, len(emitted))
            if finished:
                self.scheduler.retire(s)
                continue
            if i < decodes:
                self.scheduler.computed(s, len(emitted))
            if st is not None:
                st.texts.clear()
                st.logprobs.clear()
        return events

    # ----------------------------------------------------------------- batch convenience
    def generate(self, requests: list[Request], on_event=None) -> dict:
        """Run the given requests to completion. Returns {id: (token ids, text, finish_reason)}
        (text on rank 0 only). Every request is checked before any runs: one bad one, one error."""
        for r in [self.check(r) for r in requests]:
            self.add(r)
        toks = {r.id: [] for r in requests}
        texts = {r.id: [] for r in requests}
        reasons = {}
        while not self.idle:
            for ev in self.step():
                if ev.token_id is not None and not ev.stop_id:
                    toks[ev.request_id].append(ev.token_id)
                texts[ev.request_id].append(ev.text)
                if ev.finished:
                    reasons[ev.request_id] = ev.finish_reason
                if on_event:
                    on_event(ev)
        return {k: (toks[k], "".join(texts[k]), reasons.get(k)) for k in toks}
