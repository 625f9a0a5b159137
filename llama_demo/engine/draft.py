"""Speculative decoding's model proposer: a draft model proposes each sequence's next k tokens,
greedily, one batched draft step per token, and the target verifies them in its own step
(speculative.py's acceptance rule; a greedy draft's proposal is a point mass, q = 1).

The draft is a smaller checkpoint with the same vocabulary (`--speculative draft --draft_ckpt_dir`,
e.g. Llama 3.2 1B for Llama 3.1 8B), or the served checkpoint itself quantized at load
(`--speculative int8` / `int4`): loaded by the same loader, split over the same ranks.

Its KV cache. A self-draft (int8 / int4: the target's own layers, quantized) reads and writes the
target's pool itself (Transformer.share_cache): the keys of every accepted position are the
target's, which the draft attends over as its context, so a sequence's first proposal costs one
draft step like every other (no prompt to read again: that catch-up once made grounded answers
slower than without speculation) and the draft needs no memory for keys. It writes only at the
positions it is fed (the sequence's last token, then k - 1 proposed ones), all in the sequence's
own blocks past its accepted tokens (a block is shared only once full of accepted tokens), and
the verification step feeds those very positions, so the target's keys replace the draft's
before any attention reads them (every step writes a part's keys before it attends).

A draft checkpoint of its own has a pool of its own with as many blocks as the target's, read
through the same block tables, so a sequence's draft keys sit in the same block and offset as its
target keys and need no allocation of their own. The draft's keys never decide an answer, only
proposals, so they are kept loosely: each sequence counts the positions whose draft keys hold its own tokens
(`SpecState.draft_computed`); a proposal first feeds the draft what it lacks (the prompt at a
sequence's first proposal, the tokens accepted since), then k - 1 proposed tokens one at a time.
Once the verification has spoken, the positions whose fed token stood stay counted, the rest are
written over next time. A preempted sequence starts from nothing (scheduler.preempt drops its
record: its blocks are new). A shared prefix block may be written by the draft of each sequence
that holds it: with the same tokens at the same positions, so with the same keys.

Every rank runs the same draft steps (the draft's layers are model-parallel: their collectives
must line up) and takes the argmax of the same gathered logits, so every rank proposes alike.
"""
from __future__ import annotations

import torch

from ..model.parts import Part, padded_tables
from ..model.transformer import Transformer
from .speculative import DRAFT_PRIOR_ACCEPTANCE, Proposer, SpecState, SpeculationConfig

# The drafts of a step's sequences catch up at most this many tokens in all (a long prompt over
# several steps, proposing once it is in): one draft step must not hold everyone's answers back.
CATCH_UP_TOKENS = 256


class DraftProposer(Proposer):
    """Proposals from a draft model. The number of tokens proposed is chosen as the n-gram
    proposer's is, by tokens expected a second, here with the draft's own steps in the cost:
    k tokens cost k draft steps of the batch's rows beside the target's wider step
    (`costs.draft`, measured at start-up by Engine.calibrate_speculation)."""

    def __init__(self, config: SpeculationConfig, draft: Transformer, device: torch.device | str,
                 shares_cache: bool = False):
        super().__init__(config, DRAFT_PRIOR_ACCEPTANCE)
        self.draft, self.device = draft, torch.device(device)
        self.shares_cache = shares_cache  # a self-draft on the target's pool (module docstring)

    def propose(self, seqs: list, limits: list[int], room=None) -> list[list[int]]:
        for s in seqs:
            if s.spec is None:
                s.spec = SpecState(self.prior)
            if self.shares_cache:  # the target's keys of every position but the last token's
                s.spec.draft_computed, s.spec.fed = s.length - 1, None
            else:
                self._settle(s)
        wants = [min(self.config.tokens, limit) for limit in limits]
        best_k = self.best_length(seqs, wants, self.costs.draft(len(seqs)))
        if best_k == 0:
            return [[] for _ in seqs]
        lens = [min(best_k, w) for w in wants]
        if room is not None:  # positions with blocks (the draft writes where the target will)
            lens = [room(s, n) if n else 0 for s, n in zip(seqs, lens)]
        return self._run(seqs, lens)

    @staticmethod
    def _settle(s) -> None:
        """After a verification: the draft's keys stand where the token it was fed stood."""
        spec = s.spec
        if spec.fed is None:
            return
        start, fed = spec.fed
        have = s.tokens(start, min(start + len(fed), s.length))
        same = 0
        while same < len(have) and have[same] == fed[same]:
            same += 1
        spec.draft_computed = min(spec.draft_computed, start + same)
        spec.fed = None

    @torch.inference_mode()
    def _run(self, seqs: list, lens: list[int]) -> list[list[int]]:
        """The draft's steps: each sequence's missing tokens up to its last one (logits at the last
        give the first proposal), then one token per step for those that want more."""
        dev, bs = self.device, self.draft.block_size
        tokens, pos, parts, at, going = [], [], [], [], []
        budget = CATCH_UP_TOKENS
        for s, n in zip(seqs, lens):
            start = s.spec.draft_computed
            if n == 0 or budget <= 0:
                continue  # it proposes nothing this step: catching up can wait
            stop = min(s.length, start + budget)
            budget -= stop - start
            parts.append(Part.of(len(tokens), torch.tensor([s.blocks], device=dev),
                                 torch.arange(start, stop, device=dev)[None], bs, kv_len=stop))
            tokens += s.tokens(start, stop)
            pos += range(start, stop)
            s.spec.draft_computed = stop
            if stop == s.length:
                at.append(len(tokens) - 1)
                going.append((s, n))
        proposals: dict[int, list[int]] = {}
        if not going:
            if parts:  # catching up only: no logits wanted (no output layer)
                self.draft.step(torch.tensor(tokens, device=dev), torch.tensor(pos, device=dev), parts,
                                torch.zeros(0, dtype=torch.long, device=dev), every_rank=True)
            return [[] for _ in seqs]
        logits = self.draft.step(torch.tensor(tokens, device=dev), torch.tensor(pos, device=dev), parts,
                                 torch.tensor(at, device=dev), every_rank=True)
        for (s, _), tok in zip(going, logits.argmax(-1).tolist()):
            proposals[s.req.id] = [tok]
            s.spec.fed = (s.length - 1, [s.out_ids[-1]])
        for r in range(1, max(n for _, n in going)):
            more = [s for s, n in going if n > r]
            p = torch.tensor([[s.length - 1 + r] for s in more], device=dev)
            part = Part.of(0, padded_tables([s.blocks for s in more], dev), p, bs,
                           kv_len=max(s.length for s in more) + r)
            fed = [proposals[s.req.id][-1] for s in more]
            logits = self.draft.step(torch.tensor(fed, device=dev), p[:, 0], [part],
                                     torch.arange(len(more), device=dev), every_rank=True)
            for s, tok, last in zip(more, logits.argmax(-1).tolist(), fed):
                proposals[s.req.id].append(tok)
                s.spec.fed[1].append(last)
                s.spec.draft_computed = s.length + r
        return [proposals.get(s.req.id, []) for s in seqs]
