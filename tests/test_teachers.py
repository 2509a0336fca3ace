"""Multi-teacher aggregation against numpy references, and the teacher applies.

References (float64 numpy, written from the formulas):

* ``mean_logits`` / ``mean_probs``: You, Xu, Xu and Tao, "Learning from Multiple Teacher
  Networks", KDD 2017: ``sum_k w_k z_k`` and ``log sum_k w_k softmax(z_k)``.
* ``entropy``: ``w_k(x) = softmax_k(-H(softmax(z_k(x) / T)))``, then
  ``log sum_k w_k(x) softmax(z_k(x))``.
* ``ca_mkd``: Zhang, Chen and Wang, "Confidence-Aware Multi-Teacher Knowledge
  Distillation", ICASSP 2022, eq. (2): with ``L_k = -log softmax(z_k)[y]`` per example,
  ``w_k = (1 - exp(L_k) / sum_j exp(L_j)) / (K - 1)``; the KD term is
  ``sum_k w_k T^2 KL(softmax(z_k / T) || softmax(s / T))``.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy import MLP, batch, init

import jaxkd
from jaxkd.train._teachers import ca_mkd_weights


def np_softmax(z, axis=-1):
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def np_entropy(p, axis=-1):
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=axis)


def np_kl(p, q, axis=-1):
    return np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p / q, 1.0)), 0.0), axis=axis)


def ca_mkd_weights_reference(stacked, labels):
    """Eq. (2) of CA-MKD: ``[K, ...]`` weights from the teachers' cross entropies."""
    z = np.asarray(stacked, np.float64)
    log_p = z - z.max(-1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(-1, keepdims=True))
    cross_entropy = -np.take_along_axis(log_p, np.asarray(labels)[None, ..., None], -1)[..., 0]
    num_teachers = z.shape[0]
    share = np.exp(cross_entropy) / np.exp(cross_entropy).sum(0, keepdims=True)
    return (1.0 - share) / (num_teachers - 1)


@pytest.fixture
def stacked():
    return np.random.default_rng(0).normal(size=(3, 4, 6)).astype(np.float32) * 2


LABELS = np.array([0, 5, 2, 2], np.int32)


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


def test_entropy_weights_favour_low_entropy_teachers(stacked):
    temperature = 2.0
    p = np_softmax(stacked.astype(np.float64))
    h = np_entropy(np_softmax(stacked.astype(np.float64) / temperature))  # [K, B]
    w = np_softmax(-h, axis=0)
    expected = np.log(np.einsum("kb,kbc->bc", w, p))
    got = jaxkd.aggregate_teacher_logits(stacked, method="entropy", temperature=temperature)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # A confident teacher dominates a uniform one.
    sharp = np.array([[10.0, 0.0, 0.0]], np.float32)
    flat = np.zeros((1, 3), np.float32)
    mixed = jaxkd.aggregate_teacher_logits(np.stack([sharp, flat]), method="entropy")
    assert np.exp(mixed)[0, 0] > 0.5 * (np_softmax(sharp)[0, 0] + 1 / 3)


def test_the_misleading_confidence_name_is_gone(stacked):
    with pytest.raises(ValueError, match="Unknown `method` 'confidence'"):
        jaxkd.aggregate_teacher_logits(stacked, method="confidence")


# CA-MKD.


def test_ca_mkd_weights_match_the_paper(stacked):
    got = ca_mkd_weights(stacked, LABELS)
    want = ca_mkd_weights_reference(stacked, LABELS)
    assert got.shape == (3, 4)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.sum(got, axis=0), 1.0, rtol=1e-6)
    assert np.all(np.asarray(got) >= 0)
    # Per example: the teacher with the smallest cross entropy weighs the most.
    cross_entropy = -np.log(np_softmax(stacked.astype(np.float64)))[:, np.arange(4), LABELS]
    np.testing.assert_array_equal(np.argmax(got, 0), np.argmin(cross_entropy, 0))


def test_ca_mkd_weights_of_two_teachers_are_a_softmax_of_minus_cross_entropy():
    # K = 2: w_1 = 1 - e^L1 / (e^L1 + e^L2) = e^L2 / (e^L1 + e^L2).
    stacked = np.random.default_rng(1).normal(size=(2, 5, 4)).astype(np.float32)
    labels = np.array([0, 1, 2, 3, 0], np.int32)
    cross_entropy = -np.log(np_softmax(stacked.astype(np.float64)))[:, np.arange(5), labels]
    np.testing.assert_allclose(
        ca_mkd_weights(stacked, labels), np_softmax(-cross_entropy, axis=0), rtol=1e-5
    )


def test_ca_mkd_aggregate_is_the_weighted_mixture_at_the_temperature(stacked):
    temperature = 4.0
    w = ca_mkd_weights_reference(stacked, LABELS)  # [K, B]
    mixture = np.einsum("kb,kbc->bc", w, np_softmax(stacked.astype(np.float64) / temperature))
    got = jaxkd.aggregate_teacher_logits(
        stacked, method="ca_mkd", labels=LABELS, temperature=temperature
    )
    np.testing.assert_allclose(got, temperature * np.log(mixture), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jaxkd.softmax(got, temperature=temperature), mixture, rtol=1e-5)


def test_ca_mkd_kl_has_the_gradient_of_the_papers_weighted_loss(stacked):
    # sum_k w_k T^2 KL(p_k || p_s) = T^2 KL(p || p_s) + T^2 (H(p) - sum_k w_k H(p_k)) with
    # p = sum_k w_k p_k: the same gradient in the student, and a student-independent gap.
    temperature = 4.0
    student = np.random.default_rng(2).normal(size=(4, 6)).astype(np.float32)
    w = ca_mkd_weights_reference(stacked, LABELS)
    p_k = np_softmax(stacked.astype(np.float64) / temperature)
    p_s = np_softmax(student.astype(np.float64) / temperature)
    papers = temperature**2 * np.sum(w * np_kl(p_k, p_s[None]), axis=0)
    mixture = np.einsum("kb,kbc->bc", w, p_k)
    spread = np_entropy(mixture) - np.sum(w * np_entropy(p_k), axis=0)
    assert np.all(spread >= 0)

    aggregated = jaxkd.aggregate_teacher_logits(
        stacked, method="ca_mkd", labels=LABELS, temperature=temperature
    )
    ours = jaxkd.kl_divergence(student, aggregated, temperature=temperature)
    np.testing.assert_allclose(ours, papers - temperature**2 * spread, rtol=1e-5, atol=1e-6)
    grad = jax.grad(lambda s: jnp.sum(jaxkd.kl_divergence(s, aggregated, temperature=temperature)))(
        student
    )
    # d/ds of sum_k w_k T^2 KL(p_k || p_s) = T (p_s - sum_k w_k p_k).
    np.testing.assert_allclose(grad, temperature * (p_s - mixture), rtol=1e-4, atol=1e-6)


def test_ca_mkd_on_tokens_with_masks_and_padding_labels():
    # [K, B, L, V] logits, [B, L] labels with -100 on padding, and a [B, L, 1] mask:
    # kept tokens match the unmasked reference, padding gets uniform weights.
    rng = np.random.default_rng(3)
    stacked = rng.normal(size=(3, 2, 4, 5)).astype(np.float32) * 2
    labels = rng.integers(0, 5, size=(2, 4)).astype(np.int32)
    keep = np.array([[True, True, True, False], [True, False, True, True]])
    padded = np.where(keep, labels, -100).astype(np.int32)
    for where in (keep, keep[..., None]):
        weights = ca_mkd_weights(stacked, padded, where=where)
        np.testing.assert_allclose(
            weights[:, keep], ca_mkd_weights_reference(stacked, labels)[:, keep], rtol=1e-5
        )
        np.testing.assert_allclose(weights[:, ~keep], 1 / 3)
        jitted = jax.jit(
            lambda z, y, m: jaxkd.aggregate_teacher_logits(
                z, method="ca_mkd", labels=y, temperature=2.0, where=m
            )
        )
        aggregated = jitted(stacked, padded, where)
        assert aggregated.shape == (2, 4, 5)
        np.testing.assert_array_equal(aggregated[~keep], -np.inf)
        kept_reference = jaxkd.aggregate_teacher_logits(
            stacked[:, keep], method="ca_mkd", labels=labels[keep], temperature=2.0
        )
        np.testing.assert_allclose(aggregated[keep], kept_reference, rtol=1e-6)


def test_ca_mkd_teacher_ruling_out_the_label_gets_weight_zero():
    # Teacher 0 gives the label probability 0 (a -inf logit): infinite cross entropy.
    right = np.array([[3.0, 0.0, 1.0]], np.float32)
    blind = np.array([[-np.inf, 2.0, 0.0]], np.float32)
    weights = ca_mkd_weights(np.stack([blind, right, right]), np.array([0], np.int32))
    chex.assert_tree_all_finite(weights)
    np.testing.assert_allclose(weights[:, 0], [0.0, 0.5, 0.5], atol=1e-7)
    # A label that every teacher rules out: no teacher is better, uniform weights.
    weights = ca_mkd_weights(np.stack([blind, blind, blind]), np.array([0], np.int32))
    np.testing.assert_allclose(weights[:, 0], 1 / 3, rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="median"), "Unknown `method`"),
        (dict(weights=np.ones(2) / 2), r"shape \(3,\)"),
        (dict(weights=np.array([0.5, 0.5, 0.5])), "sum to 1"),
        (dict(method="entropy", weights=np.ones(3) / 3), "cannot be combined"),
        (dict(method="ca_mkd", labels=LABELS, weights=np.ones(3) / 3), "cannot be combined"),
        (dict(method="ca_mkd"), "pass `labels`"),
        (dict(method="mean_probs", labels=LABELS), "only used by method='ca_mkd'"),
        (dict(method="ca_mkd", labels=LABELS[:3]), r"`labels` has shape \(3,\)"),
        (dict(method="ca_mkd", labels=np.array([0, 6, 1, 1])), r"`labels` must lie in \[0, 6\)"),
        (dict(method="ca_mkd", labels=LABELS, where=np.ones((4, 2), bool)), "`where` has shape"),
        (dict(axis=0), "teacher axis"),
    ],
)
def test_bad_aggregation_arguments(stacked, kwargs, match):
    with pytest.raises(ValueError, match=match):
        jaxkd.aggregate_teacher_logits(stacked, **kwargs)


def test_ca_mkd_needs_two_teachers(stacked):
    with pytest.raises(ValueError, match="at least 2 teachers"):
        ca_mkd_weights(stacked[:1], LABELS)


def test_stacked_and_sequence_teacher_applies_agree():
    module = MLP(hidden=(8,))
    teachers = [init(module, seed) for seed in range(3)]
    x = jnp.asarray(batch(0)["image"])
    single = jaxkd.linen_teacher_apply(module)
    logits = np.stack([single(v, x) for v in teachers])
    for method in ("mean_logits", "mean_probs", "entropy"):
        stacked_apply = jaxkd.stacked_teacher_apply(single, method=method)
        sequence_apply = jaxkd.multi_teacher_apply([single] * 3, method=method)
        expected = jaxkd.aggregate_teacher_logits(logits, method=method)
        chex.assert_trees_all_close(
            jax.jit(stacked_apply)(jaxkd.stack_params(teachers), x), expected, rtol=1e-5
        )
        chex.assert_trees_all_close(sequence_apply(teachers, x), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="2 teacher params for 3 teachers"):
        jaxkd.multi_teacher_apply([single] * 3)(teachers[:2], x)
    # CA-MKD needs the batch's labels, which a teacher apply does not see.
    for make in (
        lambda: jaxkd.stacked_teacher_apply(single, method="ca_mkd"),
        lambda: jaxkd.multi_teacher_apply([single] * 3, method="ca_mkd"),
    ):
        with pytest.raises(ValueError, match="needs the batch's labels"):
            make()
