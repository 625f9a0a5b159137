"""OpenAI's sampling fields and the page's repeat guard in the real engine, on 2 ranks."""
from __future__ import annotations

import json

import torch

from conftest import hf_model, torchrun

PROMPT = [1, 17, 250, 33, 8, 120]


def test_penalties_bias_and_the_repeat_guard_on_two_ranks(ckpts, tmp_path):
    torchrun(2, ["tests/workers/sampling.py", str(ckpts["mha-2"]), str(tmp_path), json.dumps(PROMPT)])
    got = json.loads((tmp_path / "sampling.json").read_text())
    # greedy under logit - frequency * count - presence * (count > 0) + bias, counts over the answer
    ref, ids, counts = hf_model(ckpts["mha-2"]), list(PROMPT), torch.zeros(400)
    for _ in range(12):
        with torch.no_grad():
            logits = ref(torch.tensor([ids])).logits[0, -1].float()
        logits = logits - 2.0 * counts - 1.5 * (counts > 0).float()
        logits[9] += 3.0
        logits[5] -= 100.0
        tok = int(logits.argmax())
        ids.append(tok)
        counts[tok] += 1
    assert got["penalized"][0] == ids[len(PROMPT):]
    loop_ids, reason, note = got["loop"]
    assert loop_ids == [7] * 16 and reason == "stop" and "repeating" in note  # not 100 tokens of it
