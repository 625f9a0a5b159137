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

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .sampler import draw, filtered_probs

# Each sequence's estimate of the chance that its next proposed token stands: a running average
# over its verifications, relaxing on every step it does not verify towards its record so far
# weighed with the proposer's prior (SpecState.settled)
# (so a sequence whose proposals failed tries again some steps later, when its text may have
# changed). The prior starts at PRIOR_ACCEPTANCE (a draft model's at DRAFT_PRIOR_ACCEPTANCE: a
# draft is chosen to agree with its target, and the served model's own int8 copy agrees on ~0.98
# of greedy tokens) and then rises with the verifications of every sequence (PRIOR_DECAY), so a
# new sequence starts from what this workload has shown: with a fixed prior, a self-draft that
# would have paid at 1 user never proposed, so never learned that it agrees. It never falls
# below its start: where proposals fail, each sequence's own estimate falls, and a prior that
# fell with them would stop every later sequence from ever trying again.
PRIOR_ACCEPTANCE = 0.5
DRAFT_PRIOR_ACCEPTANCE = 0.8
ACCEPTANCE_DECAY = 0.7  # weight of the past in a sequence's running average, per verification
PRIOR_DECAY = 0.98  # weight of the past in the proposer's prior, per verification
RELAX = 0.02  # share of the way back to SpecState.settled, per step without a verification
PRIOR_WEIGHT = 8.0  # tokens' worth of evidence the prior counts for beside a sequence's own (SpecState.settled)


@dataclass
class SpeculationConfig:
    """--speculative and its numbers (checked by the command line)."""
    method: str  # "ngram", or a draft model's: "draft" (--draft_ckpt_dir), "int8" / "int4" (the model's own)
    tokens: int  # --num_speculative_tokens: proposed tokens per sequence and verification, at most
    ngram_max: int = 4  # the longest suffix looked up in the sequence's earlier tokens
    ngram_min: int = 1


@dataclass
class SpecState:
    """One sequence's speculation record (every rank keeps the same)."""
    acceptance: float = PRIOR_ACCEPTANCE
    # a draft model's proposals (draft.DraftProposer): positions whose draft keys hold this
    # sequence's own tokens, and the tokens its last proposal fed the draft (first position, ids)
    draft_computed: int = 0
    fed: tuple[int, list[int]] | None = None
    ngrams: "NgramIndex | None" = None  # the n-gram proposer's table of its tokens
    # its verifications' evidence in all: proposed tokens tried (up to the first rejected) and
    # those that stood; what its estimate relaxes back to (Proposer.best_length)
    tried: int = 0
    stood: int = 0

    def settled(self, prior: float) -> float:
        """The estimate a sequence relaxes to between verifications: the prior weighed as
        PRIOR_WEIGHT tried tokens beside its own record, so a sequence whose proposals keep
        failing settles low and stays silent, where relaxing to the prior alone had it try again
        every few steps (at 8 users a failed proposal makes a step ~1.5x dearer: open chat with
        n-gram lookup ran at 0.72x of plain, proposals learned on grounded answers)."""
        return (self.stood + PRIOR_WEIGHT * prior) / (self.tried + PRIOR_WEIGHT)


class SpecCounters:
    """What /metrics and the bench report: verifications, proposed, accepted and emitted tokens."""

    def __init__(self):
        self.verifications = self.proposed = self.accepted = self.emitted = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_verification(self) -> float:
        return self.emitted / self.verifications if self.verifications else 0.0


class NgramIndex:
    """Prompt-lookup decoding's table for one sequence: for n = 1 .. max_n, each n-gram of its
    tokens followed by at least one more, with its most recent start. Kept up to date as the
    sequence grows (`extend`: each new token adds max_n entries), so a step's lookup costs max_n
    dictionary probes, not a scan of the whole prompt (a numpy scan per sequence and step cost
    ~0.2 ms: 5% of an 8-row step on the 2-core VM, paid whether or not anything was proposed)."""

    def __init__(self, max_n: int):
        self.max_n = max_n
        self.tokens: list[int] = []
        self.starts: list[dict[tuple[int, ...], int]] = [{} for _ in range(max_n + 1)]

    def extend(self, tokens) -> None:
        """Append tokens; the n-grams that now have a token after them enter the table."""
        toks, before = self.tokens, len(self.tokens)
        toks.extend(tokens)
        for end in range(max(0, before - 1), len(toks) - 1):  # n-grams ending at `end`, followed by end + 1
            for n in range(1, min(self.max_n, end + 1) + 1):
                self.starts[n][tuple(toks[end - n + 1: end + 1])] = end - n + 1

    def propose(self, k: int, min_n: int = 1) -> list[int]:
        """The longest suffix (max_n .. min_n tokens) seen before, at its most recent start,
        proposes the (up to) k tokens that followed it there."""
        toks = self.tokens
        if k <= 0:
            return []
        for n in range(min(self.max_n, len(toks) - 1), min_n - 1, -1):
            start = self.starts[n].get(tuple(toks[len(toks) - n:]))
            if start is not None:
                return toks[start + n: start + n + k]
        return []


def ngram_proposal(tokens: list[int], k: int, max_n: int = 4, min_n: int = 1) -> list[int]:
    """Prompt-lookup decoding over `tokens` at once (NgramIndex's answer for them)."""
    index = NgramIndex(max_n)
    index.extend(list(tokens))
    return index.propose(k, min_n)


def expected_tokens(acceptance: float, proposed: int) -> float:
    """Tokens a verification of `proposed` tokens emits on average when each stands with
    probability `acceptance` (independently): 1 + a + a^2 + ... + a^proposed."""
    return sum(acceptance ** i for i in range(proposed + 1))


@dataclass
class StepCosts:
    """What steps cost on this machine, relative to a target step of one decode row: `target`
    (rows, proposed) for a step of `rows` decoding sequences carrying `proposed` tokens between
    them, `draft` (rows) for one draft-model step of `rows` rows. Measured at start-up
    (Engine.calibrate_speculation: the shapes a verification really has, since a step of 8
    sequences with 4 proposed tokens each costs more than one sequence's 40 tokens); until then
    a guess."""
    target: Callable[[int, int], float] = lambda rows, proposed: 1.0 + 0.15 * (rows + proposed - 1)
    draft: Callable[[int], float] = lambda rows: 0.3 + 0.05 * rows

    @classmethod
    def measured(cls, rows: list[int], target: list[list[float]], draft: list[float] | None = None) -> "StepCosts":
        """From timings at each of `rows`: target[i][k] for rows[i] sequences proposing k tokens
        each, draft[i] for a draft step of rows[i] rows; linear between the points measured (and
        beyond the last, in proportion to rows or to tokens)."""
        def between(values: list[float], r: float) -> float:
            if r >= rows[-1]:
                return values[-1] * r / rows[-1]
            hi = next(i for i, n in enumerate(rows) if n >= r)
            if hi == 0 or rows[hi] == r:
                return values[hi]
            return values[hi - 1] + (values[hi] - values[hi - 1]) * (r - rows[hi - 1]) / (rows[hi] - rows[hi - 1])

        def target_cost(r: int, proposed: int) -> float:
            by_k = [between([t[k] for t in target], r) for k in range(len(target[0]))]
            k = proposed / r  # tokens each sequence proposes, on average
            if k >= len(by_k) - 1:
                return by_k[-1] * (1 + k) / len(by_k)
            i = int(k)
            return by_k[i] + (by_k[i + 1] - by_k[i]) * (k - i)

        return cls(target_cost, (lambda r: between(draft, r)) if draft else (lambda r: 0.0))


class Proposer:
    """The step's proposals: a candidate per decoding sequence, cut to the length at which the
    step is expected to give the most tokens a second, given each sequence's acceptance and
    what steps cost on this machine (`costs`, measured at start-up by
    Engine.calibrate_speculation). With nothing to gain, nobody proposes: on a machine where a
    wider step costs about what its tokens do (a large batch, a compute-bound device) speculation
    switches itself off rather than slow the answers down. Identical on every rank."""

    def __init__(self, config: SpeculationConfig, prior: float = PRIOR_ACCEPTANCE):
        self.config = config
        self.counters = SpecCounters()
        self.first_prior = self.prior = prior  # a new sequence's acceptance (see PRIOR_DECAY)
        self.costs = StepCosts()

    def propose(self, seqs: list, limits: list[int], room=None) -> list[list[int]]:
        """Proposed tokens for each decoding sequence (maybe none), each within its limit. `room`
        (seq, n) -> how many of n proposed tokens get cache blocks (the scheduler cuts the
        proposals to it afterwards; a draft model, which writes keys, asks before)."""
        cands = []
        for s, limit in zip(seqs, limits):
            if s.spec is None:
                s.spec = SpecState(self.prior)
            index = s.spec.ngrams
            if index is None:
                index = s.spec.ngrams = NgramIndex(self.config.ngram_max)
            index.extend(s.tokens(len(index.tokens), s.length))  # the tokens accepted since
            k = min(self.config.tokens, limit)
            cands.append(index.propose(k, self.config.ngram_min))
        best_k = self.best_length(seqs, [len(c) for c in cands])
        return [c[:best_k] for c in cands]

    def best_length(self, seqs: list, longest: list[int], draft_step: float = 0.0) -> int:
        """The one proposal length k (0 = none) giving the most expected tokens per unit of step
        cost, for sequences that can propose up to longest[i] tokens each, with k draft steps of
        `draft_step` each (a draft model's); the sequences left proposing nothing relax their
        acceptance towards the prior."""
        rows = len(seqs)
        best_k, best = 0, rows / self.costs.target(rows, 0)
        for k in range(1, max(longest, default=0) + 1):
            lens = [min(k, n) for n in longest]
            gain = sum(expected_tokens(s.spec.acceptance, n) for s, n in zip(seqs, lens))
            rate = gain / (self.costs.target(rows, sum(lens)) + k * draft_step)
            if rate > best:
                best_k, best = k, rate
        for s, n in zip(seqs, longest):
            if best_k == 0 or n == 0:
                s.spec.acceptance += RELAX * (s.spec.settled(self.prior) - s.spec.acceptance)
        return best_k

    def verified(self, seq, proposed: int, accepted: int, emitted: int) -> None:
        """Every rank, after the broadcast: update seq's acceptance and the counters."""
        c = self.counters
        c.verifications += 1
        c.proposed += proposed
        c.accepted += accepted
        c.emitted += emitted
        # this verification's evidence on the chance a token stands: accepted ones were tried and
        # stood, the first rejected one (if any) was tried and failed
        tried = accepted + (accepted < proposed)
        seq.spec.tried += tried
        seq.spec.stood += accepted
        rate = accepted / tried
        seq.spec.acceptance = ACCEPTANCE_DECAY * seq.spec.acceptance + (1 - ACCEPTANCE_DECAY) * rate
        self.prior = max(self.first_prior, PRIOR_DECAY * self.prior + (1 - PRIOR_DECAY) * rate)


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
