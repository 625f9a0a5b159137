"""Structured output: a grammar (from a JSON schema) constrains which tokens rank 0 may sample.

llguidance (Microsoft's Rust engine behind Guidance, also used by vLLM and llama.cpp) compiles the
grammar and computes each step's allowed-token mask in well under a millisecond for a small
vocabulary; it was chosen over xgrammar, which pulls triton and a TVM runtime onto CPU hosts, and
outlines-core, whose index is built per schema over the whole vocabulary up front. The grammar
text travels with the request's params (every rank sees it); only rank 0 builds a matcher.
"""
from __future__ import annotations

import logging
from functools import lru_cache

import torch

from ..text.tokenizer import Tokenizer

# Compact JSON: a grammar that allows any whitespace lets a small model pad an answer with
# newlines until it runs out of tokens.
JSON_OPTIONS = {"whitespace_flexible": False}


class GrammarError(ValueError):
    """A response_format that cannot be compiled; the message says why."""


def json_schema_grammar(schema: dict) -> str:
    """The llguidance grammar for answers that are JSON documents valid under `schema`."""
    import llguidance

    if not isinstance(schema, dict):
        raise GrammarError("the JSON schema must be an object")
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except ValueError as e:
        raise GrammarError(f"not a usable JSON schema: {e}") from None
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise GrammarError(f"the JSON schema cannot be enforced: {messages[0]}")
    return grammar


class _Wrapper:
    """Our Tokenizer as llguidance's TokenizerWrapper wants it, for every backend alike (SentencePiece,
    tiktoken, Hugging Face): each id's bytes exactly as our detokenizer renders it after other text
    (SentencePiece's "\u2581" as a space, "<0xE6>" as that byte), ids that are never text (control
    pieces, <unk>, which decodes to " \u2047 ") marked special by a leading 0xFF so that no grammar
    admits them, and an encoder of text fragments: llguidance tokenizes the bytes a grammar forces,
    and a SentencePiece encode() would put a space before them ("{" as "\u2581{"), a token the
    grammar then refuses."""

    def __init__(self, tok: Tokenizer, n_vocab: int, eos: int):
        self.eos_token_id, self.bos_token_id = eos, tok.bos_id
        n = min(n_vocab, tok.vocab_size)
        specials = {i for i in (*tok.special_ids, *tok._special_tokens().values()) if i < n}
        self.special_token_ids = sorted(specials)
        self.tokens = [(b"\xff" + tok.token_bytes(i)) if i in specials else tok.token_bytes(i) for i in range(n)]
        self.tokens += [b""] * (n_vocab - len(self.tokens))  # ids the output layer has beyond the tokenizer
        self._tok = tok
        self.is_tokenizer_wrapper = True

    def __call__(self, text) -> list[int]:
        # llguidance hands over a valid UTF-8 prefix of what it tokenizes (it cuts the rest greedily)
        text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
        return self._tok.encode_fragment(text)


@lru_cache(maxsize=4)
def ll_tokenizer(tok: Tokenizer, n_vocab: int, stop_ids: frozenset[int]):
    """llguidance's view of the vocabulary (built once per tokenizer: ~0.1 s for 50k tokens, ~1 s for
    Llama 3's 128k)."""
    import llguidance

    stops = sorted(stop_ids) or [tok.eos_id or 0]
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Wrapper(tok, n_vocab, stops[0])), n_vocab=n_vocab,
                                  eos_token=stops)


class Matcher:
    """One answer's grammar state on rank 0.

    If the parser ever refuses a token its own mask allowed (a bug of ours: the vocabulary handed
    to llguidance and the detokenizer disagree, as Llama 2's once did), the answer ends there, as
    at a complete document (finish_reason "stop"), and the log says why: the user gets what was
    generated, not a 500 (`fault`; tests/test_grammar_tokenizers.py walks the masks to keep it
    from happening)."""

    def __init__(self, grammar: str, tok: Tokenizer, n_vocab: int, stop_ids: frozenset[int]):
        import llguidance

        self.n_vocab = n_vocab
        self.stop_ids = frozenset(stop_ids)
        self.fault: str | None = None
        self._m = llguidance.LLMatcher(ll_tokenizer(tok, n_vocab, self.stop_ids), grammar, log_level=0)
        self._check()

    def _check(self) -> None:
        if self._m.is_error():  # llguidance's report continues with a dump of its state: the first line says it
            raise GrammarError((self._m.get_error().splitlines() or ["grammar error"])[0])

    def allowed(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """(V,) bool: the tokens the grammar allows next (the stop ids once the answer is complete,
        or once the parser failed: then the answer ends with the next token)."""
        words = torch.frombuffer(bytearray(self._m.compute_bitmask()), dtype=torch.int32)
        if self._m.is_error():
            self._failed(self._m.get_error())
        if self.fault is not None:
            mask = torch.zeros(self.n_vocab, dtype=torch.bool)
            mask[[i for i in self.stop_ids if i < self.n_vocab]] = True
            return mask.to(device)
        bits = (words[:, None] >> torch.arange(32, dtype=torch.int32)) & 1
        return bits.flatten()[: self.n_vocab].bool().to(device)

    @property
    def done(self) -> bool:
        return self.fault is not None or self._m.is_stopped()

    def consume(self, token_id: int) -> None:
        if self.fault is not None:
            return  # the answer ends with this token (the mask held only the stop ids)
        accepted = self._m.consume_token(token_id)
        if not accepted or self._m.is_error():
            self._failed(self._m.get_error() or f"token {token_id} refused")

    def _failed(self, report: str) -> None:
        if self.fault is None:
            self.fault = (report.splitlines() or ["parser error"])[0]
            logging.getLogger("llama_demo").error(
                "llama_demo: structured output: the grammar's parser refused a token its mask allowed (%s); "
                "the answer ends here. This is a bug: please report it with the model's tokenizer", self.fault)


def response_format_grammar(response_format: dict | None) -> str | None:
    """OpenAI's response_format -> a grammar (None for plain text); GrammarError if unusable."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise GrammarError("must be an object such as {\"type\": \"json_object\"}")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_schema_grammar({"type": "object"})
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise GrammarError("json_schema needs {\"name\": ..., \"schema\": {...}}")
        return json_schema_grammar(spec.get("schema") or {})
    raise GrammarError(f"type {kind!r} is not supported: use \"text\", \"json_object\" or \"json_schema\"")
