"""Sampling is pure: logits in, ids out."""
import pytest
import torch

from llama_demo.sampling import SamplingError, SamplingParams, apply_repetition_penalty, sample


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
    logits = torch.cat([_row(), _row()])
    g = torch.Generator().manual_seed(0)
    ids = sample(logits, torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1e-6]), torch.tensor([0, 0]), g)
    assert ids.tolist() == [1, 1]


def test_repetition_penalty_lowers_seen_tokens():
    out = apply_repetition_penalty(_row()[0], torch.tensor([1, 3]), 2.0)
    assert out.tolist() == pytest.approx([0.1, 1.5, 2.9, -2.0])


@pytest.mark.parametrize("field,value", [("temperature", -1), ("top_p", 0), ("top_p", 1.5), ("top_k", -1),
                                         ("max_new_tokens", 0), ("repetition_penalty", 0), ("temperature", float("nan"))])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(SamplingError, match=field):
        SamplingParams(**{field: value}).validate()
