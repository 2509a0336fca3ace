"""Multi-teacher aggregation against numpy references, and the teacher applies."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy import MLP, batch, init

import jaxkd


def np_softmax(z, axis=-1):
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def np_entropy(p, axis=-1):
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=axis)


@pytest.fixture
def stacked():
    return np.random.default_rng(0).normal(size=(3, 4, 6)).astype(np.float32) * 2


def test_mean_logits(stacked):
    np.testing.assert_allclose(
        jaxkd.aggregate_teacher_logits(stacked), stacked.mean(0), rtol=1e-6, atol=1e-6
    )


def test_fixed_weights(stacked):
    w = np.array([0.5, 0.3, 0.2], np.float32)
    np.testing.assert_allclose(
        jaxkd.aggregate_teacher_logits(stacked, weights=w),
        np.einsum("k,kbc->bc", w, stacked),
        rtol=1e-5,
        atol=1e-6,
    )
    expected = np.log(np.einsum("k,kbc->bc", w, np_softmax(stacked.astype(np.float64))))
    np.testing.assert_allclose(
        jaxkd.aggregate_teacher_logits(stacked, method="mean_probs", weights=w),
        expected,
        rtol=1e-5,
    )


def test_mean_probs_is_a_distribution(stacked):
    log_p = jaxkd.aggregate_teacher_logits(stacked, method="mean_probs")
    np.testing.assert_allclose(np.exp(log_p).sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(
        np.exp(log_p), np_softmax(stacked.astype(np.float64)).mean(0), rtol=1e-5
    )


def test_confidence_weights_favour_low_entropy_teachers(stacked):
    temperature = 2.0
    p = np_softmax(stacked.astype(np.float64))
    h = np_entropy(np_softmax(stacked.astype(np.float64) / temperature))  # [K, B]
    w = np_softmax(-h, axis=0)
    expected = np.log(np.einsum("kb,kbc->bc", w, p))
    got = jaxkd.aggregate_teacher_logits(stacked, method="confidence", temperature=temperature)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # A confident teacher dominates a uniform one.
    sharp = np.array([[10.0, 0.0, 0.0]], np.float32)
    flat = np.zeros((1, 3), np.float32)
    mixed = jaxkd.aggregate_teacher_logits(np.stack([sharp, flat]), method="confidence")
    assert np.exp(mixed)[0, 0] > 0.5 * (np_softmax(sharp)[0, 0] + 1 / 3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="median"), "Unknown `method`"),
        (dict(weights=np.ones(2) / 2), r"shape \(3,\)"),
        (dict(weights=np.array([0.5, 0.5, 0.5])), "sum to 1"),
        (dict(method="confidence", weights=np.ones(3) / 3), "cannot be combined"),
        (dict(axis=0), "teacher axis"),
    ],
)
def test_bad_aggregation_arguments(stacked, kwargs, match):
    with pytest.raises(ValueError, match=match):
        jaxkd.aggregate_teacher_logits(stacked, **kwargs)


def test_stacked_and_sequence_teacher_applies_agree():
    module = MLP(hidden=(8,))
    teachers = [init(module, seed) for seed in range(3)]
    x = jnp.asarray(batch(0)["image"])
    single = jaxkd.linen_teacher_apply(module)
    logits = np.stack([single(v, x) for v in teachers])
    for method in ("mean_logits", "mean_probs", "confidence"):
        stacked_apply = jaxkd.stacked_teacher_apply(single, method=method)
        sequence_apply = jaxkd.multi_teacher_apply([single] * 3, method=method)
        expected = jaxkd.aggregate_teacher_logits(logits, method=method)
        chex.assert_trees_all_close(
            jax.jit(stacked_apply)(jaxkd.stack_params(teachers), x), expected, rtol=1e-5
        )
        chex.assert_trees_all_close(sequence_apply(teachers, x), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="2 teacher params for 3 teachers"):
        jaxkd.multi_teacher_apply([single] * 3)(teachers[:2], x)
