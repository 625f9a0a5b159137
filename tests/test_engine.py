"""The engine against Hugging Face transformers on the same random weights, under real torchrun."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import hf_greedy, hf_model, torchrun

N_NEW = 24
PROMPTS = [[1, 17, 250, 33, 8, 120, 64, 5], [1, 300, 2, 19], [1, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 7]]


@pytest.mark.parametrize("ckpt,world", [("mha-1", 1), ("mha-2", 1), ("mha-1", 2), ("mha-2", 2),
                                        ("gqa-2", 1), ("gqa-1", 2), ("gqa-2", 2), ("mqa-1", 2)])
def test_logits_and_greedy_tokens_match_transformers(ckpts, tmp_path, ckpt, world):
    """Any shard count on any rank count: last-position logits to 1e-4, 24 greedy tokens equal,
    a batch of prompts of different lengths gives each prompt its tokens alone (also when requests
    leave and join mid-batch), all ranks agree."""
    folder = ckpts[ckpt]
    torchrun(world, ["tests/workers/dump_rank.py", str(folder), str(tmp_path), json.dumps(PROMPTS), str(N_NEW)])
    ref = hf_model(folder)
    with torch.no_grad():
        ref_logits = ref(torch.tensor([PROMPTS[0]])).logits[0, -1]
    ours = torch.load(tmp_path / "logits0.pt")
    assert (ours - ref_logits).abs().max().item() < 1e-4
    ranks = [json.loads((tmp_path / f"tokens{r}.json").read_text()) for r in range(world)]
    for r in ranks[1:]:
        assert r == ranks[0], "ranks disagree on generated tokens"
    for prompt, got in zip(PROMPTS, ranks[0]["batch"]):
        assert got == hf_greedy(ref, prompt, N_NEW)
    assert len(ranks[0]["sampled"]) == N_NEW
    assert ranks[0]["chunked"] == ranks[0]["batch"]  # prompts prefilled 3 tokens a step ...
    # ... which really happened: the 25 prompt tokens took ceil(25 / 3) = 9 steps instead of one
    assert ranks[0]["steps"]["chunked"] >= ranks[0]["steps"]["batch"] + 8, ranks[0]["steps"]
    with torch.no_grad():  # greedy under a repetition penalty of 1.3, as transformers applies it
        pen = ref.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False,
                           repetition_penalty=1.3, eos_token_id=None, pad_token_id=0)[0, len(PROMPTS[0]):].tolist()
    assert ranks[0]["penalized"] == pen and pen != ranks[0]["batch"][0]  # the penalty changed the answer
    churn = ranks[0]["churn"]  # requests finishing and joining mid-batch, leaving a gap in the cache rows
    assert churn["a"] == ranks[0]["batch"][0] and churn["c"] == ranks[0]["batch"][2]
    assert churn["b"] == ranks[0]["batch"][1][:3] and churn["d"] == ranks[0]["batch"][1]
