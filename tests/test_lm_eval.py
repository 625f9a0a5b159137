"""Clients that score with log probabilities, against a real 2-rank server: lm-evaluation-harness's
`local-completions` model (loglikelihood through echo + logprobs on batches of token-id prompts,
generate_until) and the official openai client's logprobs and n, checked against transformers'
log-softmax on the same random weights."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import hf_greedy, hf_model
from test_server import COMPLETION, Server

CONTEXTS = ["Once upon a time", "The quick brown fox", "def main():", "Café in 東京", "a little llama lived"]
CONTINUATIONS = [" there was", " jumps over", " return 42", " and 北京", " in the mountains"]


@pytest.fixture(scope="module")
def served(ckpts):
    s = Server(ckpts["mha-2"], 2, *COMPLETION, "--max_batch_size", "4")
    try:
        s.wait_healthy()
        yield s, ckpts["mha-2"], hf_model(ckpts["mha-2"])
    finally:
        s.stop()


def reference_loglikelihood(ref, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logp = torch.log_softmax(ref(ids).logits[0].float(), -1)
    rows = logp[len(context) - 1: -1]
    target = torch.tensor(continuation)
    return rows.gather(-1, target[:, None]).sum().item(), bool((rows.argmax(-1) == target).all())


def test_lm_eval_local_completions_loglikelihood_and_generation_match_transformers(served):
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    server, ckpt, ref = served
    lm = LocalCompletionsAPI(base_url=f"{server.url}/v1/completions", model="x", tokenizer_backend="huggingface",
                             tokenizer=str(ckpt), batch_size=3, max_length=128, max_retries=1, timeout=120)
    pairs = list(zip(CONTEXTS, CONTINUATIONS))
    # a greedy continuation too, so that is_greedy is true at least once
    ctx_ids = lm.tok_encode(CONTEXTS[0])
    greedy_ids = hf_greedy(ref, ctx_ids, 3)
    pairs.append((CONTEXTS[0], lm.tokenizer.decode(greedy_ids)))
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    got = lm.loglikelihood(requests, disable_tqdm=True)
    worst = 0.0
    for (context, continuation), (ll, greedy) in zip(pairs, got):
        want_ll, want_greedy = reference_loglikelihood(ref, *lm._encode_pair(context, continuation))
        worst = max(worst, abs(ll - want_ll))
        assert greedy == want_greedy
    print(f"lm-eval loglikelihood vs transformers: max |difference| {worst:.1e} over {len(pairs)} requests")
    assert worst < 1e-3, worst
    assert got[-1][1] or lm._encode_pair(*pairs[-1])[1] != greedy_ids  # retokenizing may split differently

    until = ["zzz"]
    gens = lm.generate_until([Instance("generate_until", {}, (c, {"until": until, "max_gen_toks": 6}), i)
                              for i, c in enumerate(CONTEXTS[:3])], disable_tqdm=True)
    for context, text in zip(CONTEXTS[:3], gens):
        want = lm.tokenizer.decode(hf_greedy(ref, lm.tok_encode(context), 6)).split(until[0])[0]
        assert text == want


def test_openai_client_logprobs_top_logprobs_and_n(served):
    from openai import OpenAI

    server, ckpt, ref = served
    c = OpenAI(base_url=server.url + "/v1", api_key="none", timeout=60, max_retries=0)
    prompt = [1, 17, 250, 33, 8, 120]
    out = c.completions.create(model="x", prompt=prompt, max_tokens=4, temperature=0, logprobs=3, echo=True)
    lp = out.choices[0].logprobs
    full = prompt + hf_greedy(ref, prompt, 4)
    with torch.no_grad():
        logp = torch.log_softmax(ref(torch.tensor([full])).logits[0].float(), -1)
    want = [None] + [logp[j - 1, full[j]].item() for j in range(1, len(full))]
    assert lp.token_logprobs[0] is None
    assert max(abs(a - b) for a, b in zip(lp.token_logprobs[1:], want[1:])) < 1e-3
    for j in range(1, len(full)):  # the 3 best alternatives (plus the chosen one)
        best = set(logp[j - 1].topk(3).values.tolist())
        assert all(any(abs(v - b) < 1e-3 for b in best) or abs(v - want[j]) < 1e-3 for v in lp.top_logprobs[j].values())
    many = c.completions.create(model="x", prompt=prompt, max_tokens=5, temperature=1.0, n=3, seed=11)
    again = c.completions.create(model="x", prompt=prompt, max_tokens=5, temperature=1.0, n=3, seed=11)
    assert [ch.index for ch in many.choices] == [0, 1, 2]
    assert [ch.text for ch in many.choices] == [ch.text for ch in again.choices]  # seeded: reproducible
    single = c.completions.create(model="x", prompt=prompt, max_tokens=5, temperature=1.0, seed=12)
    assert single.choices[0].text == many.choices[1].text  # choice j draws from seed + j
    assert many.usage.completion_tokens == 15


def test_prompt_and_answer_logprobs_over_a_chunked_prefill_on_two_ranks(ckpts, tmp_path):
    """Rank 0 alone carries logprobs (followers' events have none); every prompt position's
    logprob equals transformers' log-softmax, across prefill chunks of 3 tokens."""
    from conftest import torchrun

    prompt = [1, 17, 250, 33, 8, 120, 64, 5, 9, 10, 11]
    torchrun(2, ["tests/workers/logprobs.py", str(ckpts["gqa-2"]), str(tmp_path), json.dumps(prompt)])
    rank0, rank1 = (json.loads((tmp_path / f"logprobs{r}.json").read_text()) for r in range(2))
    assert rank1["ids"] == rank0["ids"] and rank1["prompt"] is None and rank1["logprobs"] == [None] * 4
    full = prompt + rank0["ids"]
    with torch.no_grad():
        logp = torch.log_softmax(hf_model(ckpts["gqa-2"])(torch.tensor([full])).logits[0].float(), -1)
    assert [p[0] for p in rank0["prompt"]] == prompt and rank0["prompt"][0][1] is None
    got = [p[1] for p in rank0["prompt"][1:]] + rank0["logprobs"]
    want = [logp[j - 1, full[j]].item() for j in range(1, len(full))]
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4
    for j, (_, _, top) in enumerate(rank0["prompt"][1:], start=1):
        assert [t for t, _ in top] == logp[j - 1].topk(2).indices.tolist()
