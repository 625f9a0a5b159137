"""Rank 0's view of an answer as text: streaming detokenization and stop strings.

Only rank 0 runs this (engine.Engine consults it after sampling, and the stop decision travels
with the step's token broadcast), so follower ranks never detokenize.

Costs are bounded per token: the decoder keeps a window of a few ids, and stop strings are matched
by one Knuth-Morris-Pratt automaton per stop string fed only the new characters, so a step's work
is proportional to the new text times the number of stop strings, never to everything generated.
"""
from __future__ import annotations

from collections.abc import Sequence

from .tokenizer import StreamDecoder, Tokenizer


class StopMatcher:
    """Finds the first place where any stop string completes in a stream of text.

    Each stop string has a KMP automaton whose state is the length of the longest suffix of the
    text so far that is a proper prefix of that stop string: it is also how much text must be held
    back (it might still grow into the stop string)."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self._fail = [self._failure(s) for s in self.stops]
        self._state = [0] * len(self.stops)

    @staticmethod
    def _failure(p: str) -> list[int]:
        fail, k = [0] * len(p), 0
        for i in range(1, len(p)):
            while k and p[i] != p[k]:
                k = fail[k - 1]
            if p[i] == p[k]:
                k += 1
            fail[i] = k
        return fail

    def feed(self, text: str) -> int | None:
        """Feed new text; returns where the first stop string to complete starts, as an offset
        into `text` (negative: it began in text fed earlier, held back by the caller), or None."""
        for j, ch in enumerate(text):
            for n, (stop, fail) in enumerate(zip(self.stops, self._fail)):
                k = self._state[n]
                while k and stop[k] != ch:
                    k = fail[k - 1]
                if stop[k] == ch:
                    k += 1
                if k == len(stop):
                    return j + 1 - k
                self._state[n] = k
        return None

    @property
    def held(self) -> int:
        """Characters at the end of the text that may still be the start of a stop string."""
        return max(self._state, default=0)


class TextStream:
    """One answer's text: push each sampled id, get the text that is safe to hand out.

    `push` returns (text, stopped): `text` never contains a stop string nor anything after it;
    while a suffix could still grow into a stop string it is held back, and `finish` hands it out
    when the answer ends for another reason."""

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str] = (), context_ids: Sequence[int] = ()):
        self.decoder = StreamDecoder(tokenizer, context_ids)
        self.matcher = StopMatcher(stops)
        self._pending = ""  # decoded, not yet handed out (could be the start of a stop string)

    def push(self, token_id: int) -> tuple[str, bool]:
        return self._take(self.decoder.push(token_id))

    def finish(self) -> str:
        """The rest of the text, at the end of the answer (the decoder's held bytes included)."""
        text, stopped = self._take(self.decoder.flush())
        if stopped:
            return text
        rest, self._pending = self._pending, ""
        return text + rest

    def _take(self, new: str) -> tuple[str, bool]:
        if not new:
            return "", False
        start = self.matcher.feed(new)
        buf = self._pending + new
        if start is not None:  # cut before the stop string; whatever follows it is dropped
            cut = len(self._pending) + start  # >= 0: a partial stop string is always held back
            self._pending = ""
            return buf[:cut], True
        keep = min(self.matcher.held, len(buf))
        self._pending = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False
