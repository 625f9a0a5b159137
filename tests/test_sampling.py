"""Sampling is pure: logits in, ids out."""
import re

import pytest
import torch

from llama_demo.engine.sampler import SamplingError, SamplingParams, apply_repetition_penalty, sample


def _row(n=4):
    return torch.tensor([[0.1, 3.0, 2.9, -1.0]])[:, :n]


def test_temperature_zero_is_greedy():
    assert sample(_row(), torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([0])).tolist() == [1]


def test_tiny_top_p_keeps_only_the_most_likely_token():
    g = torch.Generator().manual_seed(0)
    ids = [sample(_row(), torch.tensor([5.0]), torch.tensor([1e-6]), torch.tensor([0]), g).item() for _ in range(50)]
    assert set(ids) == {1}


def test_top_k_two_never_picks_the_others():
    g = torch.Generator().manual_seed(0)
    ids = {sample(_row(), torch.tensor([50.0]), torch.tensor([1.0]), torch.tensor([2]), g).item() for _ in range(200)}
    assert ids == {1, 2}


def test_rows_sample_with_their_own_settings():
    """Each row's logits go with its own settings: rows differ, so a swap would show."""
    logits = torch.cat([_row(), torch.tensor([[2.0, -1.0, 0.5, 4.0]]), torch.tensor([[5.0, 0.0, 4.9, 0.0]])])
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        ids = sample(logits, torch.tensor([0.0, 1.0, 50.0]), torch.tensor([1.0, 1e-6, 1.0]), torch.tensor([0, 0, 2]), g)
        assert ids[0] == 1 and ids[1] == 3 and ids[2] in (0, 2)
    drawn = {sample(logits, torch.tensor([0.0, 1.0, 50.0]), torch.tensor([1.0, 1e-6, 1.0]), torch.tensor([0, 0, 2]),
                    g)[2].item() for _ in range(100)}
    assert drawn == {0, 2}  # row 3 really samples between its top two


def test_repetition_penalty_lowers_seen_tokens():
    out = apply_repetition_penalty(_row()[0], torch.tensor([1, 3]), 2.0)
    assert out.tolist() == pytest.approx([0.1, 1.5, 2.9, -2.0])


@pytest.mark.parametrize("field,value", [("temperature", -1), ("top_p", 0), ("top_p", 1.5), ("top_k", -1),
                                         ("max_new_tokens", 0), ("repetition_penalty", 0), ("temperature", float("nan")),
                                         ("top_k", 2.0), ("seed", 1.5), ("seed", True), ("stop", ["a", ""]),
                                         ("stop", ["x"] * 17), ("stop", ["x" * 1025]), ("repetition_penalty", float("inf"))])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(SamplingError, match=field):
        SamplingParams(**{field: value}).validate()


def test_validate_reduces_to_what_the_engine_runs():
    p = SamplingParams(temperature=1e-9, top_k=10**30, seed=2**64 + 3, stop="end").validate(vocab_size=400)
    assert (p.temperature, p.top_k, p.seed, p.stop) == (0.0, 0, 3, ["end"])
    assert SamplingParams(seed=-1).validate().seed == 2**64 - 1
    assert SamplingParams(top_k=399).validate(vocab_size=400).top_k == 399


def test_draws_follow_the_distribution():
    """Inverting the CDF at an even grid of uniform values gives each token its probability."""
    n = 4000
    logits = torch.tensor([[0.5, 2.0, -1.0, 1.0, 0.0]]).repeat(n, 1)
    u = (torch.arange(n) + 0.5) / n
    ones = torch.ones(n)
    for temp in (1.0, 0.7):
        ids = sample(logits, ones * temp, ones, torch.zeros(n, dtype=torch.long), uniform=u)
        freq = torch.bincount(ids, minlength=5).float() / n
        assert torch.allclose(freq, torch.softmax(logits[0] / temp, -1), atol=2 / n)


def _nucleus_by_full_sort(logits, temp, top_p, top_k, u):
    """Reference: sort the whole distribution, drop past top_p / top_k, invert the CDF."""
    probs = torch.softmax(logits / temp, -1)
    sp, order = probs.sort(descending=True)
    drop = sp.cumsum(-1) - sp > top_p
    if top_k:
        drop[top_k:] = True
    sp = sp.masked_fill(drop, 0.0)
    cdf = sp.cumsum(-1)
    return int(order[torch.searchsorted(cdf, u * cdf[-1], right=True).clamp(max=len(cdf) - 1)])


@pytest.mark.parametrize("top_p,top_k,temp", [(0.5, 0, 1.0), (0.9, 0, 0.7), (0.999, 0, 2.0), (1.0, 40, 1.0),
                                              (0.95, 300, 1.0)])
def test_top_p_and_top_k_equal_a_full_sort(top_p, top_k, temp):
    """The candidate shortcut (top 256 first) picks what sorting the whole vocabulary would,
    including when the nucleus is wider than the candidates (temperature 2, top_p 0.999)."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 5000, generator=g) * 3
    u = torch.rand(64, generator=g)
    ones = torch.ones(64)
    got = sample(logits, ones * temp, ones * top_p, torch.full((64,), top_k), uniform=u).tolist()
    want = [_nucleus_by_full_sort(logits[i], temp, top_p, top_k, u[i]) for i in range(64)]
    assert got == want


def test_repetition_penalty_by_mask_equals_by_ids():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(50, generator=g)
    ids = torch.tensor([3, 7, 7, 49, 0])
    mask = torch.zeros(50, dtype=torch.bool)
    mask[ids] = True
    assert torch.equal(apply_repetition_penalty(logits, mask, 1.3), apply_repetition_penalty(logits, ids, 1.3))


def test_presence_and_frequency_penalties_follow_openais_formula():
    from llama_demo.engine.sampler import apply_penalties

    logits, counts = torch.zeros(4), torch.tensor([0.0, 1.0, 3.0, 0.0])
    out = apply_penalties(logits, counts, presence=0.5, frequency=0.25)
    assert out.tolist() == [0.0, -0.75, -1.25, 0.0]


def test_min_p_drops_tokens_below_its_share_of_the_most_likely():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = {int(sample(logits, torch.ones(1), torch.ones(1), torch.zeros(1, dtype=torch.long),
                       uniform=torch.tensor([u]), min_p=torch.tensor([0.5]))) for u in torch.linspace(0, 0.999, 50)}
    assert seen == {0, 1}  # 0.15 and 0.05 are below half of 0.5


def test_logit_bias_is_checked_and_applied():
    from llama_demo.engine.sampler import apply_logit_bias

    p = SamplingParams(logit_bias={"3": 100, 1: -100.0}).validate(vocab_size=8)
    assert p.logit_bias == [[1, -100.0], [3, 100.0]]
    assert int(sample(apply_logit_bias(torch.zeros(8), p.logit_bias)[None], torch.zeros(1), torch.ones(1),
                      torch.zeros(1, dtype=torch.long))) == 3
    for bad, words in (({"8": 1}, "outside the vocabulary"), ({"x": 1}, "outside the vocabulary"),
                       ({"1": 101}, "[-100, 100]")):
        with pytest.raises(SamplingError, match=re.escape(words)):
            SamplingParams(logit_bias=bad).validate(vocab_size=8)


@pytest.mark.parametrize("field, value", [("presence_penalty", 2.5), ("frequency_penalty", -3), ("min_p", 1.5),
                                          ("logprobs", 21), ("prompt_logprobs", -1), ("logprobs", True)])
def test_new_fields_out_of_range_name_the_field(field, value):
    with pytest.raises(SamplingError, match=field):
        SamplingParams(**{field: value}).validate(vocab_size=8)


def test_top_logprobs_are_log_softmax_of_the_logits():
    from llama_demo.engine.sampler import top_logprobs

    logits = torch.randn(3, 50)
    chosen, ids, top = top_logprobs(logits, torch.tensor([4, 5, 6]), 2)
    ref = torch.log_softmax(logits, -1)
    assert torch.allclose(chosen, ref[torch.arange(3), torch.tensor([4, 5, 6])])
    assert torch.equal(ids[:, 0], ref.argmax(-1)) and torch.allclose(top[:, 0], ref.amax(-1))


def test_repeat_guard_stops_a_loop_not_an_answer():
    from llama_demo.engine.sampler import repeats_itself

    loop = [5, 9, 11, 3, 8, 2] * 11  # "la femme de France, " over and over: 66 tokens
    assert repeats_itself([1, 2, 3] + loop, 64)
    assert not repeats_itself([1, 2, 3] + loop[:60], 64)  # not yet 64 tokens of it
    assert not repeats_itself(list(range(200)), 64)
    assert repeats_itself([7] * 64, 64) and not repeats_itself([7] * 63, 64)
    assert not repeats_itself(list(range(40)) * 3, 64)  # a cycle longer than 32 tokens is left alone


def test_page_defaults_come_from_the_models_generation_config(tmp_path):
    import json

    from llama_demo.config import PAGE_SAMPLING, page_sampling

    assert page_sampling(tmp_path) == PAGE_SAMPLING
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "repetition_penalty": 1.05}))
    page = page_sampling(tmp_path)
    assert (page.temperature, page.top_p, page.top_k, page.repetition_penalty) == (0.6, 0.95, 20, 1.05)
    assert page_sampling(tmp_path, temperature=0.1).temperature == 0.1  # the flag wins
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    assert page_sampling(tmp_path).temperature == 0.0
