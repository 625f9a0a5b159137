"""Structured output: answers constrained by a JSON schema's grammar (llguidance) on rank 0, on 2
ranks of a random-weight model, where free text is anything but JSON: with the suite's small
byte-level tokenizer, and with the real tokenizers of Llama 2 (SentencePiece), Llama 3.1 (Meta's
tiktoken) and the default model (byte-level BPE) after each one's chat prompt."""
from __future__ import annotations

import json

import pytest

from conftest import torchrun
from families import FAMILIES, family_checkpoint
from test_grammar_tokenizers import SCHEMA as RICH_SCHEMA
from test_grammar_tokenizers import check_document

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6}, "ok": {"type": "boolean"},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "ok", "n"], "additionalProperties": False}


def test_answers_follow_the_json_schema_on_two_ranks(ckpts, tmp_path):
    torchrun(2, ["tests/workers/structured.py", str(ckpts["mha-2"]), str(tmp_path), json.dumps(SCHEMA)])
    ranks = [json.loads((tmp_path / f"structured{r}.json").read_text()) for r in range(2)]
    assert all(ranks[1][k][0] == ranks[0][k][0] for k in ranks[0])  # the followers took rank 0's ids
    for key in ("greedy", "hot"):
        ids, text, reason = ranks[0][key]
        doc = json.loads(text)  # complete, valid JSON, ended by the grammar rather than by length
        assert reason == "stop" and set(doc) == {"name", "ok", "n"}
        assert isinstance(doc["name"], str) and len(doc["name"]) <= 6 and isinstance(doc["ok"], bool)
        assert isinstance(doc["n"], int) and 0 <= doc["n"] <= 99
    ids, text, reason = ranks[0]["object"]
    assert reason == "stop" and isinstance(json.loads(text), dict)
    free = ranks[0]["free"][1]
    try:
        json.loads(free)
        raise AssertionError(f"the unconstrained answer is JSON by chance: {free!r}")
    except ValueError:
        pass


@pytest.mark.parametrize("family", FAMILIES)
def test_every_tokenizer_family_gives_complete_documents_on_two_ranks(family, tmp_path):
    """Issue 22: Llama 2's SentencePiece vocabulary made json_object a 400 (an llguidance panic) and
    json_schema a 500 (the grammar refused the token its own mask allowed)."""
    ckpt = family_checkpoint(tmp_path, family)
    torchrun(2, ["tests/workers/structured.py", str(ckpt), str(tmp_path), json.dumps(RICH_SCHEMA)], timeout=300)
    ranks = [json.loads((tmp_path / f"structured{r}.json").read_text()) for r in range(2)]
    assert all(ranks[1][k][0] == ranks[0][k][0] for k in ranks[0])
    for key, kind in (("greedy", "json_schema"), ("hot", "json_schema"), ("object", "json_object"),
                      ("object-greedy", "json_object")):
        ids, text, reason = ranks[0][key]
        assert reason == "stop", (key, text, reason)
        check_document(json.loads(text), kind)


def test_a_mask_the_parser_disagrees_with_ends_the_answer_not_the_request(ckpts, tmp_path):
    """Issue 22: such a disagreement (our bug) was a 500. Now the answer ends at the refused token
    with finish_reason "stop" on every rank alike, and the request beside it runs on."""
    proc = torchrun(2, ["tests/workers/grammar_fault.py", str(ckpts["mha-2"]), str(tmp_path)])
    ranks = [json.loads((tmp_path / f"fault{r}.json").read_text()) for r in range(2)]
    assert ranks[1]["lying-mask"][0] == ranks[0]["lying-mask"][0]  # the followers ended it at the same token
    ids, text, reason = ranks[0]["lying-mask"]
    assert reason == "stop" and 0 < len(ids) < 40
    assert ranks[0]["free"][2] == "length" and len(ranks[0]["free"][0]) == 20
    assert "the grammar's parser refused a token its mask allowed" in proc.stdout + proc.stderr
