"""The lock-step generation loop: admit, prefill, decode, retire; the same order on every rank.

Every rank calls `Engine.step` with the same admissions and cancellations, so every rank runs the
same forward passes and their collectives line up. Rank 0 alone samples; the ids are broadcast,
so all ranks hold identical tokens by construction, whatever their random state.

Continuous batching: each sequence owns a row ("slot") of the static KV cache. A new request is
prefilled in chunks of at most `prefill_chunk` tokens per step, so running decodes are not
stalled for long by a long prompt; every step then decodes one token for every running sequence.
"""
from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field

import torch

from ..model.parallel import broadcast_from_first
from ..model.transformer import Transformer
from .sampler import SamplingParams, apply_repetition_penalty, sample
from ..text.tokenizer import StreamDecoder, Tokenizer


class PromptTooLong(ValueError):
    """A prompt does not fit the context; the message gives the limit, the count and what to do."""


@dataclass
class Request:
    id: int | str
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class TokenEvent:
    """One step's outcome for one request. `text` is the newly completed text (may be empty
    while a multi-byte character or a possible stop string is held back)."""
    request_id: int | str
    token_id: int | None
    text: str
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None  # why a request was refused, for finish_reason "error"


@dataclass
class _Sequence:
    req: Request
    slot: int
    decoder: StreamDecoder
    prefilled: int = 0  # prompt tokens already in the cache
    out_ids: list[int] = field(default_factory=list)
    text: str = ""  # decoded completion so far
    emitted: int = 0  # characters of `text` already handed out
    generator: torch.Generator | None = None
    seen: torch.Tensor | None = None  # rank 0, with a repetition penalty: (V,) mask of tokens so far

    @property
    def pos(self) -> int:
        """Tokens in the cache (the position the next fed token takes)."""
        return self.prefilled + max(0, len(self.out_ids) - 1)


def check_prompt(prompt_len: int, max_seq_len: int) -> None:
    if prompt_len == 0:
        raise PromptTooLong("the prompt is empty: it needs at least one token")
    if prompt_len >= max_seq_len:
        raise PromptTooLong(
            f"the prompt is {prompt_len} tokens but this model's context (max_seq_len) is {max_seq_len} tokens, "
            f"including the answer: shorten the prompt to at most {max_seq_len - 1} tokens, or restart with a larger --max_seq_len")


class Engine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu", seed: int | None = None, prefill_chunk: int | None = None,
                 group=None):
        self.model = model
        self.tokenizer = tokenizer
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.group = group
        self.max_seq_len = model.args.max_seq_len
        self.max_batch = model.args.max_batch_size
        # Prompt tokens prefilled per step. On CPU a 128-token chunk of a 110M model takes ~0.1 s
        # and is as efficient per token as 512 (measured: oneDNN at 128 rows >= 512 rows), so
        # running decodes wait 4x less; GPUs want bigger chunks to fill the device.
        self.prefill_chunk = prefill_chunk if prefill_chunk is not None else 512 if self.device.type == "cuda" else 128
        if self.prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1, got {prefill_chunk}")
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed if seed is not None else torch.seed())
        self.waiting: deque[Request] = deque()
        self.running: dict[int | str, _Sequence] = {}  # insertion order = admission order
        self.free_slots = list(range(self.max_batch))
        self.steps = 0
        # ids that end a generation: EOS, plus e.g. a chat format's end-of-turn token. Every rank
        # must use the same set, so it is derived from the model folder, never from rank 0 alone.
        self.stop_ids = frozenset(tokenizer.stop_ids)

    # ----------------------------------------------------------------- bookkeeping
    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def validate(self, req: Request) -> None:
        req.params.validate()
        check_prompt(len(req.prompt_ids), self.max_seq_len)
        bad = [t for t in req.prompt_ids if not 0 <= t < self.model.args.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary (0..{self.model.args.vocab_size - 1})")

    def add(self, req: Request) -> None:
        self.validate(req)
        self.waiting.append(req)

    def cancel(self, request_id) -> list[TokenEvent]:
        for i, r in enumerate(self.waiting):
            if r.id == request_id:
                del self.waiting[i]
                return [TokenEvent(request_id, None, "", True, "cancelled")]
        seq = self.running.pop(request_id, None)
        if seq is None:
            return []
        heapq.heappush(self.free_slots, seq.slot)
        return [TokenEvent(request_id, None, "", True, "cancelled")]

    def _admit(self) -> None:
        while self.waiting and self.free_slots:
            req = self.waiting.popleft()
            slot = heapq.heappop(self.free_slots)  # the lowest free row keeps the batch's rows together
            gen = None
            if req.params.seed is not None:
                gen = torch.Generator(device="cpu")
                gen.manual_seed(req.params.seed)
            ctx = req.prompt_ids[-4:]
            self.running[req.id] = _Sequence(req, slot, StreamDecoder(self.tokenizer, ctx), generator=gen)

    # ----------------------------------------------------------------- the step
    def step(self) -> list[TokenEvent]:
        """One lock-step iteration: prefill (a chunk of) waiting prompts, decode one token for
        every running sequence, sample on rank 0, broadcast, retire finished sequences."""
        self._admit()
        if not self.running:
            return []
        self.steps += 1
        sampled_seqs: list[_Sequence] = []
        logits: list[torch.Tensor] = []

        # Decode first: sequences that already have a token to feed.
        # ordered by cache row: consecutive rows are attended to as one view of the cache
        decoding = sorted((s for s in self.running.values() if s.out_ids), key=lambda s: s.slot)
        if decoding:
            logits.append(self._forward_decode(decoding))
            sampled_seqs += decoding

        # Then prefill within the chunk budget, oldest first.
        budget = self.prefill_chunk
        for s in self.running.values():
            if budget <= 0:
                break
            left = len(s.req.prompt_ids) - s.prefilled
            if s.out_ids or left <= 0:
                continue
            n = min(left, budget)
            chunk = s.req.prompt_ids[s.prefilled: s.prefilled + n]
            out = self._forward(torch.tensor([chunk]), s.prefilled, [s.slot], logits_at=n - 1)
            s.prefilled += n
            budget -= n
            if s.prefilled == len(s.req.prompt_ids):
                logits.append(out)
                sampled_seqs.append(s)

        if not sampled_seqs:
            return []
        ids = self._sample(torch.cat(logits), sampled_seqs)
        return self._advance(sampled_seqs, ids)

    def _forward_decode(self, seqs: list[_Sequence]) -> torch.Tensor:
        tokens = torch.tensor([[s.out_ids[-1]] for s in seqs])
        pos = torch.tensor([[s.pos] for s in seqs])
        slots = [s.slot for s in seqs]
        kv_len = max(s.pos for s in seqs) + 1
        return self._forward(tokens, pos, slots, kv_len=kv_len)

    def _forward(self, tokens: torch.Tensor, pos, slots: list[int], logits_at: int | None = None,
                 kv_len: int | None = None) -> torch.Tensor:
        dev = self.device
        B, T = tokens.shape
        if isinstance(pos, int):  # one sequence, a run of consecutive positions
            kv_len = pos + T
            pos = torch.arange(pos, pos + T)[None]
        at = None if logits_at is None else torch.full((B,), logits_at, device=dev)
        out = self.model(tokens.to(dev), pos.to(dev), slots, kv_len, logits_at=at)
        return out[:, -1] if at is None else out  # (B, V)

    def _sample(self, logits: torch.Tensor, seqs: list[_Sequence]) -> list[int]:
        """Rank 0 samples; the ids are broadcast so every rank continues with the same tokens."""
        ids = torch.empty(len(seqs), dtype=torch.long, device=self.device)
        if self.rank == 0:
            logits = logits.float()
            for i, s in enumerate(seqs):
                p = s.req.params.repetition_penalty
                if p != 1.0:
                    if s.seen is None:  # built once, then kept up to date token by token (_advance)
                        s.seen = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
                        s.seen[torch.tensor(s.req.prompt_ids + s.out_ids, device=logits.device)] = True
                    logits[i] = apply_repetition_penalty(logits[i], s.seen, p)
            params = [s.req.params for s in seqs]
            temp = torch.tensor([p.temperature for p in params], device=logits.device)
            top_p = torch.tensor([p.top_p for p in params], device=logits.device)
            top_k = torch.tensor([p.top_k for p in params], device=logits.device)
            # one uniform draw per row; a request with its own seed draws from its own generator,
            # so it is reproducible whatever else shares the batch
            u = torch.rand(len(seqs), generator=self.generator)
            for i, s in enumerate(seqs):
                if s.generator is not None:
                    u[i] = torch.rand(1, generator=s.generator)[0]
            ids.copy_(sample(logits, temp, top_p, top_k, uniform=u.to(logits.device)))
        if self.world_size > 1:
            broadcast_from_first(ids, self.group)
        return ids.tolist()

    def _advance(self, seqs: list[_Sequence], ids: list[int]) -> list[TokenEvent]:
        events = []
        for s, tok in zip(seqs, ids):
            s.out_ids.append(tok)
            if s.seen is not None:
                s.seen[tok] = True
            p = s.req.params
            reason = None
            if tok in self.stop_ids:
                reason = "stop"
            else:
                s.text += s.decoder.push(tok)
                if len(s.out_ids) >= p.max_new_tokens or len(s.req.prompt_ids) + len(s.out_ids) >= self.max_seq_len:
                    reason = "length"
            if reason is not None:
                s.text += s.decoder.flush()
            text, hit = self._emit(s, final=reason is not None)
            if hit:
                reason = "stop"
            events.append(TokenEvent(s.req.id, tok, text, reason is not None, reason))
            if reason is not None:
                del self.running[s.req.id]
                heapq.heappush(self.free_slots, s.slot)
        return events

    @staticmethod
    def _emit(s: _Sequence, final: bool) -> tuple[str, bool]:
        """New text to hand out, cut at the first stop string; while a suffix of the text could
        still grow into a stop string it is held back."""
        stops = s.req.params.stop
        if stops:
            search_from = max(0, s.emitted - max(map(len, stops)))
            hits = [i for i in (s.text.find(st, search_from) for st in stops) if i >= 0]
            if hits:
                cut = min(hits)
                out = s.text[s.emitted:cut]
                s.emitted = cut
                return out, True
            if not final:
                hold = 0
                for st in stops:
                    for k in range(min(len(st) - 1, len(s.text)), 0, -1):
                        if s.text.endswith(st[:k]):
                            hold = max(hold, k)
                            break
                end = max(s.emitted, len(s.text) - hold)
                out = s.text[s.emitted:end]
                s.emitted = end
                return out, False
        out = s.text[s.emitted:]
        s.emitted = len(s.text)
        return out, False

    # ----------------------------------------------------------------- batch convenience
    def generate(self, requests: list[Request], on_event=None) -> dict:
        """Run the given requests to completion. Returns {id: (token ids, text, finish_reason)}."""
        for r in requests:
            self.add(r)
        toks = {r.id: [] for r in requests}
        texts = {r.id: [] for r in requests}
        reasons = {}
        while not self.idle:
            for ev in self.step():
                if ev.token_id is not None and ev.token_id not in self.stop_ids:
                    toks[ev.request_id].append(ev.token_id)
                texts[ev.request_id].append(ev.text)
                if ev.finished:
                    reasons[ev.request_id] = ev.finish_reason
                if on_event:
                    on_event(ev)
        return {k: (toks[k], "".join(texts[k]), reasons.get(k)) for k in toks}
