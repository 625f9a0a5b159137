"""Logits -> next token ids. Pure functions: no process group, no model."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..config import (API_SAMPLING, GREEDY_BELOW_TEMPERATURE, MAX_LOGIT_BIAS, MAX_LOGIT_BIAS_ENTRIES,
                      MAX_PRESENCE_PENALTY, MAX_REPETITION_PENALTY, MAX_SEED, MAX_STOP_CHARS, MAX_STOP_STRINGS,
                      MAX_TOP_LOGPROBS, REPEAT_GUARD_MAX_PERIOD, REPEAT_GUARD_MIN_REPEATS)


class SamplingError(ValueError):
    """A sampling value is out of range; the message names the field and the allowed range."""


@dataclass
class SamplingParams:
    temperature: float = API_SAMPLING.temperature  # 0 = greedy
    top_p: float = API_SAMPLING.top_p
    top_k: int = 0  # 0 = no limit
    repetition_penalty: float = 1.0  # CTRL-style; 1 = off
    max_new_tokens: int = API_SAMPLING.max_new_tokens
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    # OpenAI's penalties, per sequence over its generated tokens: logit -= frequency * count + presence * (count > 0)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one; 0 = off
    # [[token id, bias], ...] added to the logits before sampling. Pairs, not a dict: the params
    # travel as JSON, whose object keys would come back as strings.
    logit_bias: list = field(default_factory=list)
    # Log probabilities (rank 0 computes them only for requests that ask): None = off, k = the
    # chosen token's logprob plus the k most likely alternatives, for each generated token ...
    logprobs: int | None = None
    # ... and for each prompt token (completions' echo); the first prompt token has none.
    prompt_logprobs: int | None = None
    repeat_guard: int = 0  # the chat page's: end an answer that loops over >= this many tokens (0 = off)
    grammar: str | None = None  # structured output: an llguidance grammar the answer must follow (engine.grammar)

    def validate(self, vocab_size: int | None = None) -> "SamplingParams":
        """Check every field (SamplingError naming the first bad one) and return the values the
        engine runs: a near-zero temperature is greedy, any integer seed is reduced into the
        generator's range, top_k beyond the vocabulary is no limit. Pure: the result is what
        travels on the bus, so every rank runs the same values."""
        def num(name: str) -> float:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise SamplingError(f"{name} must be a finite number, got {v!r}")
            return float(v)

        def integer(name: str) -> int:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise SamplingError(f"{name} must be an integer, got {v!r}")
            return v

        temperature = num("temperature")
        if temperature < 0:
            raise SamplingError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        top_p = num("top_p")
        if not 0 < top_p <= 1:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}")
        top_k = integer("top_k")
        if top_k < 0:
            raise SamplingError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        penalty = num("repetition_penalty")
        if not 0 < penalty <= MAX_REPETITION_PENALTY:
            raise SamplingError(f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY:g}] (1 = off), "
                                f"got {self.repetition_penalty}")
        if integer("max_new_tokens") < 1:
            raise SamplingError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise SamplingError("stop must be a string or a list of non-empty strings")
        if len(stop) > MAX_STOP_STRINGS:
            raise SamplingError(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stop)}")
        if any(len(s) > MAX_STOP_CHARS for s in stop):
            raise SamplingError(f"stop strings may be at most {MAX_STOP_CHARS} characters long")
        if any(not _encodable(s) for s in stop):
            raise SamplingError("stop strings must be valid Unicode text (no lone surrogates)")
        presence, frequency = num("presence_penalty"), num("frequency_penalty")
        for name, v in (("presence_penalty", presence), ("frequency_penalty", frequency)):
            if not -MAX_PRESENCE_PENALTY <= v <= MAX_PRESENCE_PENALTY:
                raise SamplingError(f"{name} must be in [-{MAX_PRESENCE_PENALTY:g}, {MAX_PRESENCE_PENALTY:g}] (0 = off), got {v}")
        min_p = num("min_p")
        if not 0 <= min_p <= 1:
            raise SamplingError(f"min_p must be in [0, 1] (0 = off), got {self.min_p}")
        bias = _logit_bias(self.logit_bias, vocab_size)
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_TOP_LOGPROBS):
                raise SamplingError(f"{name} must be an integer in [0, {MAX_TOP_LOGPROBS}], got {v!r}")
        if self.grammar is not None and not isinstance(self.grammar, str):
            raise SamplingError("grammar must be a compiled grammar (text) or None")
        if integer("repeat_guard") < 0:
            raise SamplingError(f"repeat_guard must be an integer >= 0 (0 = off), got {self.repeat_guard!r}")
        seed = self.seed
        if seed is not None:
            seed = integer("seed") % MAX_SEED  # negative and huge integers alike: one generator state each
        if vocab_size is not None and top_k >= vocab_size:
            top_k = 0  # keeping every token is no limit
        return SamplingParams(temperature=0.0 if temperature < GREEDY_BELOW_TEMPERATURE else temperature,
                              top_p=top_p, top_k=top_k, repetition_penalty=penalty,
                              max_new_tokens=self.max_new_tokens, stop=list(dict.fromkeys(stop)), seed=seed,
                              presence_penalty=presence, frequency_penalty=frequency, min_p=min_p, logit_bias=bias,
                              logprobs=self.logprobs, prompt_logprobs=self.prompt_logprobs,
                              repeat_guard=self.repeat_guard, grammar=self.grammar)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def repeat_window(min_tokens: int, max_period: int = REPEAT_GUARD_MAX_PERIOD,
                  min_repeats: int = REPEAT_GUARD_MIN_REPEATS) -> int:
    """The most trailing tokens repeats_itself looks at: callers pass no more than this."""
    return max(min_tokens, max_period * min_repeats)


def repeats_itself(ids: list[int], min_tokens: int, max_period: int = REPEAT_GUARD_MAX_PERIOD,
                   min_repeats: int = REPEAT_GUARD_MIN_REPEATS) -> bool:
    """Whether `ids` ends with one cycle of p <= max_period tokens repeated at least min_repeats
    times over at least min_tokens tokens. Most periods fail at their first comparison."""
    for p in range(1, max_period + 1):
        span = max(min_tokens, p * min_repeats)
        if span > len(ids):
            break
        tail = ids[-span:]
        if all(tail[i] == tail[i - p] for i in range(span - 1, p - 1, -1)):
            return True
    return False


def _logit_bias(bias, vocab_size: int | None) -> list[list]:
    """{id: bias} (ids as ints or the strings JSON makes of them) or [[id, bias], ...] -> sorted pairs."""
    if bias is None:
        return []
    pairs = bias.items() if isinstance(bias, dict) else bias
    out = {}
    try:
        pairs = [(k, v) for k, v in pairs]
    except (TypeError, ValueError):
        raise SamplingError("logit_bias must map token ids to numbers") from None
    if len(pairs) > MAX_LOGIT_BIAS_ENTRIES:
        raise SamplingError(f"logit_bias may bias at most {MAX_LOGIT_BIAS_ENTRIES} tokens, got {len(pairs)}")
    for k, v in pairs:
        try:
            tid = int(k) if isinstance(k, str) and k.strip().lstrip("-").isdigit() else k
        except ValueError:
            tid = k
        if isinstance(tid, bool) or not isinstance(tid, int) or not (0 <= tid < (vocab_size or 2**62)):
            top = f"0..{vocab_size - 1}" if vocab_size else ">= 0"
            raise SamplingError(f"logit_bias token id {k!r} is outside the vocabulary ({top})")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not -MAX_LOGIT_BIAS <= v <= MAX_LOGIT_BIAS:
            raise SamplingError(f"logit_bias values must be numbers in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], "
                                f"got {v!r} for token {tid}")
        out[tid] = float(v)
    return [[k, out[k]] for k in sorted(out)]


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def apply_repetition_penalty(logits: torch.Tensor, previous: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty on one row (V,): seen tokens' positive logits divided, negative multiplied.
    `previous`: the seen token ids, or a (V,) bool mask of them."""
    if penalty == 1.0 or previous.numel() == 0:
        return logits
    if previous.dtype == torch.bool:
        return torch.where(previous, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
    seen = torch.unique(previous)
    vals = logits[seen]
    logits = logits.clone()
    logits[seen] = torch.where(vals > 0, vals / penalty, vals * penalty)
    return logits


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's presence and frequency penalties on one row (V,): `counts` (V,) how often each
    token occurs in the answer so far (the prompt does not count)."""
    if not presence and not frequency:
        return logits
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def apply_logit_bias(logits: torch.Tensor, bias: list) -> torch.Tensor:
    """Add [[id, bias], ...] to one row (V,) of logits (ids checked by SamplingParams.validate)."""
    if not bias:
        return logits
    ids = torch.tensor([b[0] for b in bias], device=logits.device)
    return logits.index_add(0, ids, torch.tensor([float(b[1]) for b in bias], device=logits.device, dtype=logits.dtype))


def top_logprobs(logits: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-softmax of float32 logits (N, V): the logprob of each row's `ids` (N,), and the k most
    likely ids and their logprobs, (N, k) each (k may be 0)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, ids[:, None].to(logp.device)).squeeze(-1)
    top, top_ids = logp.topk(k, dim=-1) if k else (logp[:, :0], ids.new_zeros((len(ids), 0)))
    return chosen, top_ids, top


# Nucleus / top-k filtering looks at the most likely CANDIDATES tokens first and sorts the whole
# vocabulary only when the kept set may be larger: sorting 8 x 49152 probabilities takes ~14 ms
# on 2 CPU cores, a top-256 ~0.5 ms.
CANDIDATES = 256


@dataclass(frozen=True)
class SamplingBatch:
    """A batch's sampling values on the device, and what `sample`'s branches need to know about
    them on the host: built once per change of the batch (Engine keeps them by the batch's
    sequence ids), so a step neither rebuilds them nor reads a device tensor to choose a branch."""
    temperature: torch.Tensor  # (B,) float
    top_p: torch.Tensor  # (B,) float
    top_k: torch.Tensor  # (B,) long, 0 = off
    min_p: torch.Tensor  # (B,) float, 0 = off
    all_greedy: bool  # every row takes the argmax
    any_min_p: bool
    filter_rows: torch.Tensor | None  # (R,) long: the rows with a top-p or top-k filter; None: none has
    # every filtering row keeps at most CANDIDATES tokens by its top-k: the candidates are exact
    # whatever the probabilities (else sample() checks their mass, or sorts, see there)
    candidates_exact: bool

    @classmethod
    def of(cls, params: list[SamplingParams], device: torch.device | str = "cpu") -> "SamplingBatch":
        return cls.from_values([p.temperature for p in params], [p.top_p for p in params],
                               [p.top_k for p in params], [p.min_p for p in params], device)

    @classmethod
    def from_values(cls, temperature: list[float], top_p: list[float], top_k: list[int], min_p: list[float],
                    device: torch.device | str = "cpu") -> "SamplingBatch":
        rows = [i for i, (p, k) in enumerate(zip(top_p, top_k)) if p < 1 or k > 0]
        return cls(torch.tensor(temperature, dtype=torch.float32, device=device),
                   torch.tensor(top_p, dtype=torch.float32, device=device),
                   torch.tensor(top_k, dtype=torch.long, device=device),
                   torch.tensor(min_p, dtype=torch.float32, device=device),
                   all(t <= 0 for t in temperature), any(m > 0 for m in min_p),
                   torch.tensor(rows, dtype=torch.long, device=device) if rows else None,
                   all(0 < top_k[i] <= CANDIDATES for i in rows))

    @classmethod
    def from_tensors(cls, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
                     min_p: torch.Tensor | None) -> "SamplingBatch":
        """For callers holding tensors only (tests, one-off draws): the flags read from them once."""
        min_p = torch.zeros_like(top_p) if min_p is None else min_p
        return cls.from_values(temperature.tolist(), top_p.tolist(), top_k.tolist(), min_p.tolist(),
                               temperature.device)


def sample(logits: torch.Tensor, temperature: torch.Tensor | None = None, top_p: torch.Tensor | None = None,
           top_k: torch.Tensor | None = None, generator: torch.Generator | None = None,
           uniform: torch.Tensor | None = None, min_p: torch.Tensor | None = None,
           batch: SamplingBatch | None = None) -> torch.Tensor:
    """logits (B, V) float32; per-row temperature, top_p (float), top_k (int, 0 = off) and min_p
    (float, 0 = off: tokens below min_p times the row's most likely probability are dropped first),
    as tensors or as a `batch` (SamplingBatch: the same values with their host-side flags; no
    device read chooses a branch then). Rows with temperature 0 take the argmax; the others draw
    by inverting their (filtered) distribution's CDF at `uniform` (B,) values in [0, 1), one per
    row (default: drawn from `generator`): one batched search, where torch.multinomial took ~8 ms
    for 8 x 49152 on CPU. Returns (B,) int64 ids."""
    if batch is None:
        batch = SamplingBatch.from_tensors(temperature, top_p, top_k, min_p)
    temperature, top_p, top_k, min_p = batch.temperature, batch.top_p, batch.top_k, batch.min_p
    argmax = logits.argmax(-1)
    if batch.all_greedy:
        return argmax
    greedy = temperature <= 0
    B, V = logits.shape
    u = uniform if uniform is not None else torch.rand(B, generator=generator, device=logits.device)
    t = torch.where(greedy, torch.ones_like(temperature), temperature)
    probs = torch.softmax(logits / t[:, None], dim=-1)
    if batch.any_min_p:
        probs = probs.masked_fill(probs < min_p[:, None] * probs.amax(-1, keepdim=True), 0.0)
        probs = probs / probs.sum(-1, keepdim=True)  # top-p below compares against a total of 1
    picked = _invert_cdf(probs, u)
    rows = batch.filter_rows
    if rows is not None:
        # nucleus and top-k filtering on the sorted distribution; the most likely token always stays
        p, tp, tk = probs[rows], top_p[rows], top_k[rows]
        if batch.candidates_exact or p.device.type == "cpu":
            sorted_p, order = p.topk(min(CANDIDATES, V), dim=-1)  # sorted, most likely first
        # exact when every token past the candidates is dropped: by top-k (known on the host), or
        # by top-p because the candidates already hold more than top_p of the mass. That check
        # reads the probabilities: on a CPU they are host memory (read through numpy, no device
        # to wait for); on a GPU it would stall the stream, so there a row with top-p alone sorts
        # the whole vocabulary (microseconds on a GPU), which gives the same ids
        if not batch.candidates_exact and (
                p.device.type != "cpu"
                or not ((sorted_p.sum(-1) > tp) | ((tk > 0) & (tk <= sorted_p.shape[-1]))).numpy().all()):
            sorted_p, order = p.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass of strictly more likely tokens
        drop = before > tp[:, None]
        ranks = torch.arange(sorted_p.shape[-1], device=logits.device)[None, :]
        drop |= (tk[:, None] > 0) & (ranks >= tk[:, None])
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        picked[rows] = order.gather(-1, _invert_cdf(sorted_p, u[rows])[:, None]).squeeze(-1)
    return torch.where(greedy, argmax, picked)


def _invert_cdf(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index drawn from each row of unnormalised non-negative weights p (B, n) at u (B,) in [0, 1):
    the first index whose cumulative weight exceeds u * total (a zero-weight index never is)."""
    cdf = p.cumsum(-1)
    at = (u.to(cdf.dtype) * cdf[:, -1])[:, None]
    return torch.searchsorted(cdf, at, right=True).squeeze(-1).clamp_(max=p.shape[-1] - 1)


def filtered_probs(logits: torch.Tensor, temperature: float, top_p: float, top_k: int, min_p: float) -> torch.Tensor:
    """The distribution `sample` draws one row from: logits (V,) float32 -> probabilities (V,)
    after temperature, min_p, top-k and top-p, renormalised (a one-hot of the argmax when
    temperature is 0). Speculative decoding (engine.speculative) accepts a proposed token with
    this probability, so it must be exactly what `sample` draws from."""
    if temperature <= 0:
        return torch.zeros_like(logits).scatter_(0, logits.argmax()[None], 1.0)
    probs = torch.softmax(logits / temperature, dim=-1)
    if min_p > 0:
        probs = probs.masked_fill(probs < min_p * probs.max(), 0.0)
        probs = probs / probs.sum()
    if top_p < 1 or top_k > 0:
        sorted_p, order = probs.sort(descending=True)
        drop = (sorted_p.cumsum(-1) - sorted_p) > top_p  # the mass of strictly more likely tokens
        if top_k > 0:
            drop[top_k:] = True
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p.masked_fill(drop, 0.0))
    return probs / probs.sum()


def draw(probs: torch.Tensor, u: float) -> int:
    """The id drawn from unnormalised non-negative weights (V,) at the uniform u in [0, 1)."""
    return int(_invert_cdf(probs[None], torch.tensor([u]))[0])
