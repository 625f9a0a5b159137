"""Logits -> next token ids. Pure functions: no process group, no model."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


class SamplingError(ValueError):
    """A sampling value is out of range; the message names the field and the allowed range."""


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no limit
    repetition_penalty: float = 1.0  # CTRL-style; 1 = off
    max_new_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    def validate(self) -> "SamplingParams":
        def num(name: str) -> float:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise SamplingError(f"{name} must be a finite number, got {v!r}")
            return v

        if num("temperature") < 0:
            raise SamplingError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < num("top_p") <= 1:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise SamplingError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if num("repetition_penalty") <= 0:
            raise SamplingError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 1:
            raise SamplingError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise SamplingError("stop must be a list of non-empty strings")
        if len(self.stop) > 16:
            raise SamplingError("at most 16 stop strings")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise SamplingError(f"seed must be an integer, got {self.seed!r}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: torch.Tensor, previous: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty on one row (V,): seen tokens' positive logits divided, negative multiplied."""
    if penalty == 1.0 or previous.numel() == 0:
        return logits
    seen = torch.unique(previous)
    vals = logits[seen]
    logits = logits.clone()
    logits[seen] = torch.where(vals > 0, vals / penalty, vals * penalty)
    return logits


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) float32; per-row temperature, top_p (float) and top_k (int, 0 = off).
    Rows with temperature 0 take the argmax. Returns (B,) int64 ids."""
    argmax = logits.argmax(-1)
    greedy = temperature <= 0
    if bool(greedy.all()):
        return argmax
    t = torch.where(greedy, torch.ones_like(temperature), temperature)
    probs = torch.softmax(logits / t[:, None], dim=-1)
    if bool((top_p < 1).any() or (top_k > 0).any()):
        # nucleus and top-k filtering on the sorted distribution; the most likely token always stays
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass of strictly more likely tokens
        drop = before > top_p[:, None]
        ranks = torch.arange(logits.shape[-1], device=logits.device)[None, :]
        drop |= (top_k[:, None] > 0) & (ranks >= top_k[:, None])
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        picked = order.gather(-1, torch.multinomial(sorted_p, 1, generator=generator)).squeeze(-1)
    else:
        picked = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return torch.where(greedy, argmax, picked)
