"""The engine against Hugging Face transformers on the same random weights, under real torchrun."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import hf_greedy, hf_model, torchrun

N_NEW = 24
PROMPTS = [[1, 17, 250, 33, 8, 120, 64, 5], [1, 300, 2, 19], [1, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 7]]


@pytest.mark.parametrize("ckpt,world", [("mha-1", 1), ("mha-2", 1), ("mha-1", 2), ("mha-2", 2),
                                        ("gqa-2", 1), ("gqa-1", 2), ("gqa-2", 2), ("mqa-1", 2), ("llama31-2", 2)])
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
    # sampled at temperature 1 / top_p 0.9: as long as asked, and not the greedy answer
    assert len(ranks[0]["sampled"]) == N_NEW and ranks[0]["sampled"] != ranks[0]["batch"][0]
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


CASE_PROMPTS = PROMPTS + [[1, 9, 99, 199, 299], [1, 250, 251]]


@pytest.fixture(scope="module")
def engine_cases(ckpts, tmp_path_factory):
    """One torchrun of tests/workers/engine_cases.py on two ranks: what each rank saw, per case."""
    out = tmp_path_factory.mktemp("engine_cases")
    torchrun(2, ["tests/workers/engine_cases.py", str(ckpts["gqa-2"]), str(out), json.dumps(CASE_PROMPTS), str(N_NEW)])
    return [json.loads((out / f"cases{r}.json").read_text()) for r in range(2)]


def test_lock_step_cases_on_two_ranks(ckpts, engine_cases):
    """Two running at most, on two ranks: more requests than that, a cancel mid-answer whose blocks are reused,
    a per-request seed, a stop string, and a fault in one request's text: each request gets
    transformers' greedy tokens or ends where it should, and both ranks agree on every token."""
    folder, (r0, r1) = ckpts["gqa-2"], engine_cases
    for name in ("more_than_rows", "cancel", "seed_alone", "seed_batched", "stop", "fault"):
        assert r0[name]["tokens"] == r1[name]["tokens"] and r0[name]["reasons"] == r1[name]["reasons"], name
        assert all(t == "" for t in r1[name]["texts"].values()), "a follower rank produced text"
    ref = hf_model(folder)
    solo = r0["more_than_rows"]
    for i, p in enumerate(CASE_PROMPTS):
        assert solo["tokens"][f"p{i}"] == hf_greedy(ref, p, N_NEW) and solo["reasons"][f"p{i}"] == "length"
    cancel = r0["cancel"]
    assert cancel["reasons"]["b"] == "cancelled" and 0 < len(cancel["tokens"]["b"]) < N_NEW
    assert cancel["tokens"]["a"] == solo["tokens"]["p0"] and cancel["tokens"]["c"] == solo["tokens"]["p2"]
    # the seeded request's draws do not depend on what shares its batch
    assert r0["seed_alone"]["tokens"]["s"] == r0["seed_batched"]["tokens"]["s"]
    assert r0["seed_alone"]["tokens"]["s"] != solo["tokens"]["p0"]  # it really sampled
    # the stop string ends the answer at the token that completes it; the text stops before it
    stop, full = r0["stop"], solo["texts"]["p0"]
    n = len(stop["tokens"]["t"])
    assert stop["reasons"]["t"] == "stop" and stop["tokens"]["t"] == solo["tokens"]["p0"][:n] and n < N_NEW
    assert stop["texts"]["t"] == full[:full.index(r0["stop_text"])]
    # a fault in one request's text ends it alone, on both ranks at the same token
    fault = r0["fault"]
    assert fault["reasons"] == {"ok": "length", "bad": "error"}
    assert fault["tokens"]["ok"] == solo["tokens"]["p0"]
    assert r0["bad_id"] not in fault["tokens"]["bad"] and fault["tokens"]["bad"] == solo["tokens"]["p1"][:len(fault["tokens"]["bad"])]


def test_prefix_reuse_gives_the_tokens_of_a_full_prefill(ckpts, engine_cases):
    """A conversation's next turns reuse the KV blocks of its earlier turns (a prefix ending inside
    the answer, blocks kept while other conversations ran, a cancelled request's blocks) and get
    exactly transformers' greedy tokens, as an engine without reuse does, on both ranks."""
    folder, (r0, r1) = ckpts["gqa-2"], engine_cases
    for mode in ("reuse_on", "reuse_off"):  # both ranks placed and reused identically
        assert [(x["tokens"], x["reused"]) for x in r0[mode]["runs"]] == [(x["tokens"], x["reused"]) for x in r1[mode]["runs"]]
    on, off = r0["reuse_on"], r0["reuse_off"]
    assert [x["tokens"] for x in on["runs"]] == [x["tokens"] for x in off["runs"]]
    ref = hf_model(folder)
    first, second, others, third, cancelled, resumed = on["runs"]
    for name, run in (("t2", second), ("t3", third), ("c2", resumed)):
        assert run["tokens"][name] == hf_greedy(ref, on["prompts"][name], N_NEW), name
    # what was reused, in whole KV blocks: turn 2 all but its new tokens; turn 3 all but its new
    # token (the other conversations left its blocks cached); after the cancel, the cancelled
    # prompt and its answer so far
    t2, t3, c2, bs = on["prompts"]["t2"], on["prompts"]["t3"], on["prompts"]["c2"], r0["block"]
    assert second["reused"]["t2"] == (len(t2) - 3) // bs * bs > 0
    assert third["reused"]["t3"] == (len(t3) - 1) // bs * bs > 0
    assert resumed["reused"]["c2"] == (len(c2) - 2) // bs * bs > 0
    assert all(v == 0 for run in off["runs"] for v in run["reused"].values())


def test_preempted_sequences_resume_with_their_own_tokens(ckpts, engine_cases):
    """Four answers growing in a KV pool too small for all of them (20 blocks of 4 positions): the
    youngest are preempted and prefilled again from their tokens, and every request still gets
    transformers' greedy tokens, on both ranks alike (the worker of the lock-step cases runs it)."""
    folder, (r0, r1) = ckpts["gqa-2"], engine_cases
    assert r0["preemptions"] > 0 and r0["preemptions"] == r1["preemptions"]
    assert r0["preempt"]["tokens"] == r1["preempt"]["tokens"]
    ref = hf_model(folder)
    for i in range(4):
        assert r0["preempt"]["tokens"][f"p{i}"] == hf_greedy(ref, CASE_PROMPTS[i], N_NEW), i
