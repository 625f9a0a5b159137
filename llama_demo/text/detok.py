"""Rank 0's view of an answer as text: streaming detokenization and stop strings.

StreamDecoder turns a stream of ids into text pieces: it holds back incomplete UTF-8 and keeps
SentencePiece's leading spaces by decoding each new id together with a few preceding ids and
emitting only the difference (the prefix/read offsets of text-generation-inference).

Only rank 0 runs this (engine.Engine consults it after sampling, and the stop decision travels
with the step's token broadcast), so follower ranks never detokenize.

Costs are bounded per token: the decoder keeps a window of a few ids, and stop strings are matched
by one Knuth-Morris-Pratt automaton per stop string fed only the new characters, so a step's work
is proportional to the new text times the number of stop strings, never to everything generated.
"""
from __future__ import annotations

from collections.abc import Sequence

from .tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"  # what a decoder yields for an incomplete UTF-8 byte sequence


class StreamDecoder:
    """Incremental detokenisation: push ids one at a time, get the text each one completes.

    The concatenation of every push() and the final flush() equals
    decode(context + generated)[len(decode(context)):], which is decode(generated) for byte-level
    tokenizers. Two things make a per-token decode wrong, and the window fixes both:
    - a character split over several byte tokens decodes to U+FFFD until complete: hold it back;
    - SentencePiece drops the space (U+2581) of a text's first piece: decode each new id after
      already-emitted ids (the prefix) and emit only what the new ids added.
    Ids decode() never renders are dropped on arrival, so the window holds at most a few ids
    (one character's bytes plus the prefix) and each push costs O(window), not O(length).
    """

    CONTEXT_IDS = 4  # prompt ids kept as the first prefix
    MAX_HELD_IDS = 8  # a valid UTF-8 character needs at most 4 byte tokens; beyond this, emit anyway

    def __init__(self, tokenizer: Tokenizer, context_ids: Sequence[int] = ()):
        self._tok = tokenizer
        context = [i for i in context_ids if i not in tokenizer.special_ids]
        self._ids = context[-self.CONTEXT_IDS :] if self.CONTEXT_IDS else []
        self._read = len(self._ids)  # ids before this offset are emitted; they are the prefix
        self._prefix_text = tokenizer.decode(self._ids)

    def push(self, token_id: int) -> str:
        if token_id in self._tok.special_ids:
            return ""
        self._ids.append(token_id)
        text = self._tok.decode(self._ids)
        held = len(self._ids) - self._read
        if (len(text) > len(self._prefix_text) and not text.endswith(REPLACEMENT_CHAR)) or held > self.MAX_HELD_IDS:
            return self._emit(text)
        return ""

    def flush(self) -> str:
        """Whatever is still held (an incomplete character at the end of the stream)."""
        if len(self._ids) == self._read:
            return ""
        return self._emit(self._tok.decode(self._ids))

    def _emit(self, text: str) -> str:
        new = text[len(self._prefix_text) :]
        # The ids just emitted become the prefix for the next ones; older ids are no longer needed.
        del self._ids[: self._read]
        self._read = len(self._ids)
        self._prefix_text = self._tok.decode(self._ids)
        return new


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
