"""Sampling functions on logits: each filter, penalty and the seeded draw."""

from __future__ import annotations

import math

import pytest
import torch

from fmforge.errors import UserError
from fmforge.generate.sampling import (
    SamplingParams,
    apply_logit_bias,
    apply_penalties,
    apply_temperature,
    greedy,
    min_p_filter,
    sample_from_logits,
    sample_next,
    top_k_filter,
    top_p_filter,
)

INF = float("-inf")


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 3.0, -1.0], [5.0, 4.0, 4.5]])
    assert greedy(logits).tolist() == [1, 0]


def test_temperature_divides():
    logits = torch.tensor([[2.0, 4.0]])
    assert torch.equal(apply_temperature(logits, 2.0), torch.tensor([[1.0, 2.0]]))


def test_top_k_keeps_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    out = top_k_filter(logits, 2)
    assert out.tolist() == [[INF, 5.0, INF, 4.0, INF]]


def test_top_k_keeps_ties_at_threshold():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.5]])
    out = top_k_filter(logits, 2)
    # Three tokens tie at the 2nd value: keeping any two of them would depend on sort order.
    assert out.tolist() == [[INF, 3.0, 3.0, 3.0, INF]]


def test_top_k_larger_than_vocab_is_identity():
    logits = torch.randn(2, 4)
    assert torch.equal(top_k_filter(logits, 10), logits)


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    out = top_p_filter(logits, 0.75)
    kept = torch.isfinite(out)[0].tolist()
    assert kept == [True, True, False, False]
    # p below the top token's mass keeps just that token.
    assert torch.isfinite(top_p_filter(logits, 0.1))[0].tolist() == [True, False, False, False]
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_top_p_keeps_ties_with_last_kept():
    logits = torch.tensor([[2.0, 1.0, 1.0, -5.0]])
    out = top_p_filter(logits, 0.6)
    assert torch.isfinite(out)[0].tolist() == [True, True, True, False]


def test_min_p_keeps_tokens_near_the_best():
    logits = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.15), math.log(0.05)]])
    kept = min_p_filter(logits, 0.2).isfinite()  # keep p >= 0.2 * 0.5 = 0.1
    assert kept.tolist() == [[True, True, True, False]]
    assert min_p_filter(logits, 1.0).isfinite().tolist() == [[True, False, False, False]]
    assert torch.equal(min_p_filter(logits, 0.0), logits)
    params = SamplingParams(temperature=1.0, min_p=0.5)  # only 0.5 and 0.3 may be drawn
    draws = {int(sample_next(logits, params, torch.Generator().manual_seed(s))) for s in range(40)}
    assert draws == {0, 1}
    with pytest.raises(UserError):
        SamplingParams(min_p=1.5)


def test_logit_bias_adds():
    logits = torch.zeros(2, 4)
    out = apply_logit_bias(logits, {1: 2.0, 3: -1.0})
    assert out[0].tolist() == [0.0, 2.0, 0.0, -1.0]
    assert logits.abs().sum() == 0  # input untouched


def test_penalties():
    logits = torch.tensor([[2.0, -2.0, 1.0, 1.0]])
    seen = torch.tensor([[True, True, False, True]])
    counts = torch.tensor([[0, 0, 0, 3]])
    out = apply_penalties(logits, seen, counts, repetition_penalty=2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5]]
    out = apply_penalties(logits, seen, counts, presence_penalty=0.5, frequency_penalty=0.1)
    assert out[0, :3].tolist() == [2.0, -2.0, 1.0]
    assert math.isclose(out[0, 3].item(), 1.0 - 0.5 - 0.3, rel_tol=1e-6)


def test_seeded_sampling_reproducible():
    logits = torch.randn(3, 50)
    draws = []
    for _ in range(2):
        g = torch.Generator().manual_seed(7)
        draws.append([sample_from_logits(logits, g).tolist() for _ in range(5)])
    assert draws[0] == draws[1]


def test_sampling_respects_filters():
    logits = torch.randn(1, 100)
    params = SamplingParams(temperature=1.5, top_k=3)
    allowed = set(torch.topk(logits, 3).indices[0].tolist())
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        assert sample_next(logits, params, g).item() in allowed


def test_sample_next_greedy_with_bias():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    assert sample_next(logits, SamplingParams(logit_bias={0: 10.0})).item() == 0


@pytest.mark.parametrize(
    "kwargs", [dict(temperature=-1), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)]
)
def test_bad_params_are_user_errors(kwargs):
    with pytest.raises(UserError):
        SamplingParams(**kwargs)
