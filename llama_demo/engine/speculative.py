"""Speculative decoding: who proposes tokens, when a sequence should, and the exact acceptance rule.

A decoding sequence with a proposal of k tokens feeds its last token and the k proposed ones in
one step (a part of the ragged batch, like a prompt chunk); the target model's logits at those
k + 1 positions then decide, on rank 0, how many proposed tokens stand and which token follows
them (engine.Engine._verify). Every proposal here is a point mass (a token, not a distribution),
so the speculative-sampling rule (Leviathan et al. 2023; Chen et al. 2023) reduces to: accept the
proposed token d with probability p(d), the target's filtered probability of it, else draw from
the residual, p with d taken out, renormalised. The tokens that come out follow the target's
distribution exactly, and a greedy answer (p one-hot) is token for token the answer without
speculation. The keys written for rejected tokens are not rolled back by copying: the sequence's
`computed` count stays at its accepted tokens, so the next step writes over those positions, and
a block is named for reuse only once its positions are accepted (scheduler.Scheduler.computed).

Proposals must be identical on every rank (all ranks run the verification step): the n-gram
proposer reads only the sequence's tokens, which every rank holds, and a sequence's pausing
depends only on accepted counts, which the step's broadcast gives every rank.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .sampler import draw, filtered_probs

# After a verification that accepted less than this share of its proposal (a running average),
# a sequence stops proposing for PAUSE_STEPS steps: a wrong proposal costs a wider step for nothing.
MIN_ACCEPTANCE = 0.25
PAUSE_STEPS = 8
ACCEPTANCE_DECAY = 0.5  # weight of the past in the running average of a sequence's acceptance


@dataclass
class SpeculationConfig:
    """--speculative and its numbers (validated by the command line)."""
    method: str  # "ngram"
    tokens: int  # --num_speculative_tokens: proposed tokens per verification, at most
    max_batch_tokens: int  # speculate only while a step's decode rows and proposals stay within this many tokens
    ngram_max: int = 4  # the longest suffix looked up in the sequence's earlier tokens
    ngram_min: int = 1


@dataclass
class SpecState:
    """One sequence's speculation record (every rank keeps the same)."""
    acceptance: float = 1.0  # running average of accepted / proposed
    paused: int = 0  # steps left without proposing


class SpecCounters:
    """What /metrics and the bench report: verifications, proposed and accepted tokens."""

    def __init__(self):
        self.verifications = self.proposed = self.accepted = self.emitted = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_verification(self) -> float:
        return self.emitted / self.verifications if self.verifications else 0.0


def ngram_proposal(tokens: list[int] | np.ndarray, k: int, max_n: int = 4, min_n: int = 1) -> list[int]:
    """Prompt-lookup decoding: the longest suffix of `tokens` (max_n .. min_n tokens) found earlier
    in them, its most recent occurrence, proposes the (up to) k tokens that followed it there."""
    arr = np.asarray(tokens, dtype=np.int64)
    L = len(arr)
    for n in range(min(max_n, L - 1), min_n - 1, -1):
        # windows starting at 0 .. L - n - 1: an earlier occurrence, with at least one token after it
        windows = np.lib.stride_tricks.sliding_window_view(arr[:L - 1], n)
        hits = np.flatnonzero((windows == arr[L - n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return arr[start: start + k].tolist()
    return []


class Proposer:
    """Proposals for decoding sequences, and the pausing rule; identical on every rank."""

    def __init__(self, config: SpeculationConfig):
        self.config = config
        self.counters = SpecCounters()

    def wants(self, rows: int) -> bool:
        """Whether a step of `rows` decodes may speculate at all: only while the step, proposals
        included, stays small enough to be bound by reading the weights (beyond, a wider step costs
        about what its tokens do, and rejected tokens are a loss)."""
        return rows * (1 + self.config.tokens) <= self.config.max_batch_tokens

    def propose(self, seq, limit: int) -> list[int]:
        """Up to `limit` proposed tokens for seq (fewer, or none while it is paused)."""
        st = seq.spec
        if st is None:
            st = seq.spec = SpecState()
        if st.paused:
            st.paused -= 1
            return []
        k = min(self.config.tokens, limit)
        if k <= 0:
            return []
        tokens = seq.req.prompt_ids + seq.out_ids
        return ngram_proposal(tokens, k, self.config.ngram_max, self.config.ngram_min)

    def verified(self, seq, proposed: int, accepted: int, emitted: int) -> None:
        """Every rank, after the broadcast: update seq's acceptance and the counters."""
        c = self.counters
        c.verifications += 1
        c.proposed += proposed
        c.accepted += accepted
        c.emitted += emitted
        st = seq.spec
        st.acceptance = ACCEPTANCE_DECAY * st.acceptance + (1 - ACCEPTANCE_DECAY) * accepted / proposed
        if st.acceptance < MIN_ACCEPTANCE:
            st.paused, st.acceptance = PAUSE_STEPS, MIN_ACCEPTANCE  # then a fresh chance, not a life sentence


def accept_or_replace(logits: torch.Tensor, proposed: int, temperature: float, top_p: float, top_k: int,
                      min_p: float, u_accept: float, u_draw: float) -> tuple[int, bool]:
    """Rank 0: the token at a proposed position, from the target's (adjusted) logits row (V,).
    Returns (token, accepted): the proposed token with probability p(proposed), else a draw from
    the residual distribution (p without the proposed token), which makes the result distributed
    exactly as p. Greedy (temperature 0): accepted iff it is the argmax, else the argmax."""
    if temperature <= 0:
        best = int(logits.argmax())
        return best, best == proposed
    p = filtered_probs(logits, temperature, top_p, top_k, min_p)
    if u_accept < float(p[proposed]):
        return proposed, True
    residual = p.clone()
    residual[proposed] = 0.0
    if float(residual.sum()) <= 0:  # p was all on the proposed token: u_accept < 1 accepted it already
        return proposed, True
    return draw(residual, u_draw), False
