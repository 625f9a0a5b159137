"""The bridge from our tokenizers to llguidance (engine.grammar), with the real vocabularies we
serve: Llama 2's SentencePiece model, Meta's Llama 3 tiktoken model (llama-models' wheel) and the
default model's byte-level BPE tokenizer.json. Random walks through each step's mask check that
every token the mask allows is one the grammar's parser accepts (a disagreement is our bug: it
would end a user's answer with an error) and that the walk's text, as the detokenizer renders it
after a chat prompt, is a complete document valid under the schema."""
from __future__ import annotations

import json
import random
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from conftest import LLAMA2_TOKENIZER
from llama_demo.engine.grammar import Matcher, response_format_grammar
from llama_demo.text.detok import TextStream
from llama_demo.text.tokenizer import load_tokenizer

# strings, bounded integers, booleans, enums, nested objects, arrays: what issue 22 names
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "ok", "color", "pos", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": -5, "maximum": 120},
                         "ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "light blue"]},
                         "pos": {"type": "object", "additionalProperties": False, "required": ["x", "y"],
                                 "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 1000}, "y": {"type": "integer", "minimum": -9, "maximum": 9}}},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3}}}
FORMATS = {"json_object": {"type": "json_object"},
           "json_schema": {"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA}}}


def check_document(doc, kind: str) -> None:
    assert isinstance(doc, dict)
    if kind == "json_schema":
        assert set(doc) == set(SCHEMA["required"])
        assert isinstance(doc["name"], str) and len(doc["name"]) <= 8
        assert type(doc["age"]) is int and -5 <= doc["age"] <= 120 and isinstance(doc["ok"], bool)
        assert doc["color"] in ("red", "green", "light blue") and set(doc["pos"]) == {"x", "y"}
        assert type(doc["pos"]["x"]) is int and type(doc["pos"]["y"]) is int and -9 <= doc["pos"]["y"] <= 9
        assert isinstance(doc["tags"], list) and len(doc["tags"]) <= 3 and all(len(t) <= 5 for t in doc["tags"])


def llama3_tokenizer_path() -> Path:
    import llama_models

    return Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"


@pytest.fixture(scope="module", params=["sentencepiece", "tiktoken", "byte-level"])
def family(request):
    """(tokenizer, the ids of a chat prompt that the answer follows)."""
    if request.param == "sentencepiece":
        if not LLAMA2_TOKENIZER.is_file():
            pytest.skip(f"{LLAMA2_TOKENIZER} is absent")
        tok = load_tokenizer(LLAMA2_TOKENIZER)
        return tok, tok.encode("[INST] Answer in JSON. [/INST]")
    if request.param == "tiktoken":
        tok = load_tokenizer(llama3_tokenizer_path())
        return tok, tok.encode_with_special_tokens("<|start_header_id|>assistant<|end_header_id|>\n\n")
    from llama_demo.weights.default_model import default_model_dir

    tok = load_tokenizer(default_model_dir())
    return tok, tok.encode_with_special_tokens("<|im_start|>assistant\n")


def walk(matcher: Matcher, tok, rng: random.Random, max_steps: int = 400) -> list[int]:
    """Sample through the masks, checking a sample of each mask's tokens against the parser; leans
    towards closing tokens so that strings and containers end. Returns the ids of the document."""
    closers = closing_tokens(tok)
    stops = torch.zeros(tok.vocab_size, dtype=torch.bool)
    stops[list(tok.stop_ids)] = True
    ids = []
    for _ in range(max_steps):
        mask = matcher.allowed()
        allowed = mask.nonzero().flatten().tolist()
        assert allowed, "the mask allows nothing before the document is complete"
        for t in rng.sample(allowed, min(12, len(allowed))):
            assert matcher._m.validate_tokens([t]) == 1, f"mask allows {tok.token_bytes(t)!r}, the parser refuses it"
        if (mask & stops).any():
            return ids
        closing = (mask & closers).nonzero().flatten().tolist()
        t = rng.choice(closing if closing and rng.random() < 0.5 else allowed)
        matcher.consume(t)
        assert matcher.fault is None, f"mask allowed {tok.token_bytes(t)!r}, the parser refused it: {matcher.fault}"
        ids.append(t)
        if matcher.done:
            return ids
    raise AssertionError(f"no complete document in {max_steps} tokens: {tok.decode(ids)!r}")


@lru_cache(maxsize=3)
def closing_tokens(tok) -> torch.Tensor:
    """(V,) bool: tokens made only of the characters that end JSON strings, values and containers."""
    return torch.tensor([bool(b) and set(b) <= set(b'"}],') for b in map(tok.token_bytes, range(tok.vocab_size))])


@pytest.mark.parametrize("kind", FORMATS)
def test_masks_agree_with_the_parser_and_make_valid_documents(family, kind):
    tok, prompt = family
    grammar = response_format_grammar(FORMATS[kind])
    for seed in range(3):
        matcher = Matcher(grammar, tok, tok.vocab_size, tok.stop_ids)
        ids = walk(matcher, tok, random.Random(seed))
        stream = TextStream(tok, (), prompt[-4:])  # as the engine renders an answer after its prompt
        text = "".join(stream.push(i)[0] for i in ids) + stream.finish()
        assert text.encode() == b"".join(tok.token_bytes(i) for i in ids)  # what the grammar saw is what we send
        check_document(json.loads(text), kind)


def test_sentencepiece_fragments_encode_without_the_dummy_prefix_space():
    if not LLAMA2_TOKENIZER.is_file():
        pytest.skip(f"{LLAMA2_TOKENIZER} is absent")
    tok = load_tokenizer(LLAMA2_TOKENIZER)
    for text in ['{"', ' {"a"', "hello world", "  x", "\n{", "é"]:
        ids = tok.encode_fragment(text)
        assert b"".join(tok.token_bytes(i) for i in ids) == text.encode()
    assert tok.encode("{", bos=False) != tok.encode_fragment("{")  # plain encode keeps SentencePiece's own rule
