"""Sampling: distributions checked against hand-computed values; seeded draws reproduce. numpy only."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bitnet_train.runtime.sampling import Sampler, SamplingParams, apply_repetition_penalty, probabilities


def softmax(x):
    e = np.exp(np.asarray(x, np.float64) - np.max(x))
    return e / e.sum()


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-0.1), "temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_p=-0.2), "top_p"),
    (dict(top_k=-1), "top_k must be an integer >= 0"),
    (dict(top_k=2.5), "top_k"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be a finite number > 0"),
    (dict(repetition_penalty=-1.0), "repetition_penalty"),
    (dict(seed=-3), "seed must be an integer >= 0"),
])
def test_bad_values_are_value_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_greedy_is_argmax_and_the_lowest_id_wins_a_tie():
    s = Sampler(SamplingParams(temperature=0))
    assert s.sample(np.array([0.1, 3.0, -1.0, 2.9], np.float32)) == 1
    assert s.sample(np.array([1.0, 5.0, 5.0], np.float32)) == 1
    np.testing.assert_array_equal(probabilities(np.array([0.0, 2.0, 1.0]), SamplingParams()), [0, 1, 0])


def test_temperature_scales_the_logits():
    logits = np.array([1.0, 2.0, 3.0])
    # T = 2: softmax([0.5, 1, 1.5]) = e^{0.5 k} / (e^0.5 + e^1 + e^1.5)
    z = math.exp(0.5) + math.exp(1.0) + math.exp(1.5)
    want = [math.exp(0.5) / z, math.exp(1.0) / z, math.exp(1.5) / z]
    np.testing.assert_allclose(probabilities(logits, SamplingParams(temperature=2.0)), want, rtol=1e-12)
    np.testing.assert_allclose(probabilities(logits, SamplingParams(temperature=1.0)), softmax(logits), rtol=1e-12)


def test_top_k_keeps_the_k_largest_and_their_ties():
    logits = np.array([1.0, 4.0, 2.0, 3.0])
    z = math.exp(4) + math.exp(3)
    np.testing.assert_allclose(probabilities(logits, SamplingParams(temperature=1, top_k=2)),
                               [0, math.exp(4) / z, 0, math.exp(3) / z], rtol=1e-12)
    tied = probabilities(np.array([2.0, 1.0, 2.0, 0.0]), SamplingParams(temperature=1, top_k=1))
    np.testing.assert_allclose(tied, [0.5, 0, 0.5, 0])
    # k >= vocab is no filter
    np.testing.assert_allclose(probabilities(logits, SamplingParams(temperature=1, top_k=9)), softmax(logits))


def test_top_p_keeps_the_smallest_set_reaching_p():
    p = np.array([0.05, 0.5, 0.15, 0.3])
    logits = np.log(p)
    params = lambda top_p: SamplingParams(temperature=1, top_p=top_p)  # noqa: E731
    # sorted: 0.5, 0.3, 0.15, 0.05; mass before each: 0, 0.5, 0.8, 0.95
    np.testing.assert_allclose(probabilities(logits, params(0.79)), [0, 0.5 / 0.8, 0, 0.3 / 0.8], rtol=1e-9)
    np.testing.assert_allclose(probabilities(logits, params(0.81)), [0, 0.5 / 0.95, 0.15 / 0.95, 0.3 / 0.95], rtol=1e-9)
    np.testing.assert_allclose(probabilities(logits, params(0.5)), [0, 1, 0, 0])
    np.testing.assert_allclose(probabilities(logits, params(1e-6)), [0, 1, 0, 0])  # the top token always stays
    np.testing.assert_allclose(probabilities(logits, params(1.0)), p, rtol=1e-9)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = np.array([2.0, -2.0, 1.0, 0.5], np.float32)
    got = apply_repetition_penalty(logits, [0, 1, 1, 0], 2.0)  # each seen token penalized once
    np.testing.assert_allclose(got, [1.0, -4.0, 1.0, 0.5])
    np.testing.assert_array_equal(logits, [2.0, -2.0, 1.0, 0.5])  # input untouched
    # greedy follows the penalized logits: token 0 (2.0 -> 1.0) loses to token 2 (1.0); the lower id wins the tie
    assert Sampler(SamplingParams(repetition_penalty=2.0)).sample(logits, context=[0]) == 0
    assert Sampler(SamplingParams(repetition_penalty=2.5)).sample(logits, context=[0]) == 2


def test_processors_apply_in_order_penalty_temperature_top_k_top_p():
    logits = np.array([3.0, 2.0, 1.0, 0.0, -1.0])
    params = SamplingParams(temperature=0.5, top_k=3, top_p=0.9, repetition_penalty=1.5)
    # penalty on token 0 -> 2.0; /T -> [4, 4, 2, 0, -2]; top-3 -> tokens 0, 1, 2
    z = 2 * math.exp(4) + math.exp(2)
    p3 = [math.exp(4) / z, math.exp(4) / z, math.exp(2) / z]  # 0.4683, 0.4683, 0.0634
    # top-p 0.9: mass before the third token is 0.9366 >= 0.9 -> dropped
    np.testing.assert_allclose(probabilities(logits, params, context=[0]), [0.5, 0.5, 0, 0, 0], rtol=1e-9)
    assert p3[0] + p3[1] >= 0.9


def test_seeded_draws_reproduce_and_streams_differ():
    logits = np.random.default_rng(0).standard_normal(50)
    params = SamplingParams(temperature=1.0, seed=7)
    draw = lambda stream: [Sampler(params, stream).sample(logits) for _ in range(1)]  # noqa: E731
    a = Sampler(params, 0)
    b = Sampler(params, 0)
    seq_a = [a.sample(logits) for _ in range(200)]
    assert seq_a == [b.sample(logits) for _ in range(200)]
    c = Sampler(params, 1)
    assert seq_a != [c.sample(logits) for _ in range(200)]
    d = Sampler(SamplingParams(temperature=1.0, seed=8), 0)
    assert seq_a != [d.sample(logits) for _ in range(200)]
    assert draw(0) == draw(0)


def test_draws_follow_the_distribution_and_never_pick_a_filtered_token():
    logits = np.log(np.array([0.1, 0.2, 0.3, 0.4, 1e-9]))
    params = SamplingParams(temperature=1.0, top_k=4, seed=0)
    s = Sampler(params)
    n = 20000
    counts = np.bincount([s.sample(logits) for _ in range(n)], minlength=5)
    assert counts[4] == 0
    want = probabilities(logits, params)
    # 4 sigma of a binomial count
    assert np.all(np.abs(counts / n - want) <= 4 * np.sqrt(want * (1 - want) / n) + 1e-12), counts / n


def test_sample_wants_one_row():
    with pytest.raises(ValueError, match="1-D"):
        Sampler(SamplingParams()).sample(np.zeros((2, 3)))
