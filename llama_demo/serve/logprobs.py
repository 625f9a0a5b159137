"""Log probabilities in OpenAI's two wire shapes, from the (id, logprob, top alternatives) entries
the engine's rank 0 attaches to TokenEvents: /v1/completions' parallel lists (echoed prompt tokens
first) and /v1/chat/completions' logprobs.content."""
from __future__ import annotations

import codecs

from ..text.tokenizer import Tokenizer
from . import protocol as p


class CompletionLogprobWriter:
    """/v1/completions' parallel lists, written a few tokens at a time (a stream's chunks continue
    the text offsets of the ones before)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok, self.offset = tokenizer, 0
        self._chars = codecs.getincrementaldecoder("utf-8")("replace")

    def write(self, entries) -> p.CompletionLogprobs:
        out = p.CompletionLogprobs()
        for tid, lp, top, *_ in entries:
            text = self.tok.token_text(tid)
            out.tokens.append(text)
            out.token_logprobs.append(lp)
            top_dict = None
            if lp is not None:  # as vLLM: the chosen token is among them (up to logprobs + 1 entries)
                top_dict = {self.tok.token_text(t): v for t, v in top}
                top_dict.setdefault(text, lp)
            out.top_logprobs.append(top_dict)
            out.text_offset.append(self.offset)
            if tid not in self.tok.special_ids:  # the answer's text does not spell special tokens
                self.offset += len(self._chars.decode(self.tok.token_bytes(tid)))
        return out


def chat_logprobs(tokenizer: Tokenizer, entries) -> p.ChatLogprobs:
    """/v1/chat/completions' logprobs.content; the end-of-turn token is not content and is left out."""
    def one(tid: int, lp: float) -> dict:
        return {"token": tokenizer.token_text(tid), "logprob": lp, "bytes": list(tokenizer.token_bytes(tid))}

    return p.ChatLogprobs(content=[p.ChatTokenLogprob(**one(tid, lp), top_logprobs=[p.TopLogprob(**one(t, v)) for t, v in top])
                                   for tid, lp, top, stop_id in entries if not stop_id])
