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


def test_a_failed_batched_draw_keeps_a_seeded_request_reproducible(monkeypatch):
    """When another row's sampling fails, the batch is retried row by row (engine._sample_rows):
    the seeded request's retry must draw what the batch would have, so it gives the tokens it
    gives alone (its generator was advanced twice a step before)."""
    from llama_demo.engine import engine as engine_module
    from llama_demo.engine.engine import Engine, _Rank0State
    from llama_demo.engine.sampler import SamplingParams
    from llama_demo.engine.scheduler import Request, Sequence, request_generator

    real = engine_module.sample

    def failing_sample(logits, temperature, *args, **kw):  # fails on the batch holding the bad row, after the draw
        if bool((temperature == 7.0).any()):
            raise RuntimeError("this row cannot be sampled")
        return real(logits, temperature, *args, **kw)

    monkeypatch.setattr(engine_module, "sample", failing_sample)
    engine = Engine.__new__(Engine)  # _sample_rows needs only rank 0's generator
    engine.generator = torch.Generator().manual_seed(0)

    def seq(i: int, params: SamplingParams) -> Sequence:
        s = Sequence(Request(i, PROMPT, params))
        s.rank0 = _Rank0State(None, request_generator(params))
        return s

    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=42)
    g = torch.Generator().manual_seed(1)
    steps = [torch.randn(2, 64, generator=g) for _ in range(8)]
    alone, a = [], seq(0, seeded)
    for logits in steps:
        alone += engine._sample_rows(logits[:1], [a])
    beside, bad = seq(0, seeded), seq(1, SamplingParams(temperature=7.0))
    together = [engine._sample_rows(logits, [beside, bad])[0] for logits in steps]
    assert together == alone and "sampling failed" in bad.rank0.error
