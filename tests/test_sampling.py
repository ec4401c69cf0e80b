"""Sampler: greedy, seeded reproducibility, top-k/top-p support, repetition penalty, bad parameters."""

from __future__ import annotations

import numpy as np
import pytest

from stepaudio2.engines.sampling import Sampler, SamplingParams
from stepaudio2.errors import InvalidInputError


def test_greedy_picks_argmax() -> None:
    logits = np.array([0.1, 3.0, 2.9, -1.0])
    assert Sampler(SamplingParams())(logits) == 1


def test_repetition_penalty_moves_greedy_choice() -> None:
    logits = np.array([0.1, 3.0, 2.9, -1.0])
    assert Sampler(SamplingParams(repetition_penalty=1.5))(logits, previous_ids=[1]) == 2


def test_seeded_sampling_is_reproducible_and_seed_dependent() -> None:
    logits = np.random.default_rng(0).normal(size=500)
    p = dict(temperature=1.0, top_p=0.95)
    a = [Sampler(SamplingParams(seed=7, **p))(logits) for _ in range(1)]
    s1, s2, s3 = Sampler(SamplingParams(seed=7, **p)), Sampler(SamplingParams(seed=7, **p)), Sampler(SamplingParams(seed=8, **p))
    seq1 = [s1(logits) for _ in range(50)]
    assert seq1 == [s2(logits) for _ in range(50)]
    assert seq1 != [s3(logits) for _ in range(50)]
    assert a[0] == seq1[0]


def test_top_k_and_top_p_restrict_support() -> None:
    logits = np.array([5.0, 4.0, 3.0, 0.0, -2.0])
    s = Sampler(SamplingParams(temperature=1.0, top_k=2, seed=1))
    assert {s(logits) for _ in range(200)} == {0, 1}
    probs = np.exp(logits) / np.exp(logits).sum()  # p0 ≈ 0.66, p0+p1 ≈ 0.90
    assert probs[0] < 0.7 < probs[0] + probs[1]
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.7, seed=1))
    assert {s(logits) for _ in range(200)} == {0, 1}


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 1e6}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 10**9}, "max_new_tokens"),
        ({"seed": -3}, "seed"),
        ({"top_k": 2.5}, "top_k"),
        ({"temprature": 1.0}, "temprature"),
    ],
)
def test_bad_sampling_parameters_are_named(values: dict, field: str) -> None:
    with pytest.raises(InvalidInputError, match=field):
        SamplingParams.from_dict(values)
