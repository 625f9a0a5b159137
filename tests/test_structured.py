"""Structured output: answers constrained by a JSON schema's grammar (llguidance) on rank 0, on 2
ranks of a random-weight model, where free text is anything but JSON."""
from __future__ import annotations

import json

from conftest import torchrun

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
