"""Numerical tests of the divergences in ``jaxkd.losses._divergences``.

Every reference below is float64 numpy written from the formula, with
``p_t = softmax(teacher / T)`` and ``p_s = softmax(student / T)`` (``_reference.py``):

* ``kl_divergence``: Hinton, Vinyals and Dean (2015), ``T^2 KL(p_t || p_s)``.
* ``reverse_kl_divergence``: Gu et al., MiniLLM (ICLR 2024), ``T^2 KL(p_s || p_t)``.
* ``soft_cross_entropy``: ``T^2 H(p_t, p_s) = -T^2 sum_i p_t,i log p_s,i``.
* ``generalized_jsd``: Agarwal et al., GKD (ICLR 2024), for ``0 < beta < 1``
  ``T^2 [beta KL(p_t || m) + (1 - beta) KL(p_s || m)]``, ``m = beta p_t + (1 - beta) p_s``;
  ``beta = 0`` is the forward and ``beta = 1`` the reverse KL.
* ``skew_kl_divergence``: Ko et al., DistiLLM (ICML 2024),
  ``T^2 KL(p_t || a p_t + (1 - a) p_s)``; ``skew_reverse_kl_divergence``:
  ``T^2 KL(p_s || a p_s + (1 - a) p_t)``.
* ``total_variation``: Wen et al. (ACL 2023), ``T^2 * 0.5 sum_i |p_t,i - p_s,i|``.
* ``logit_mse``: Ba and Caruana (NeurIPS 2014), ``mean_i (z_s,i - z_t,i)^2`` over classes.

The references are float64 and follow the formulas term by term; at T = 100 their own
rounding is about 1e-14 relative, far below the 1e-5 asked of the float32 losses.
"""

import functools
from typing import NamedTuple

import _reference as ref
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import jaxkd

# References, one per formula.


def _probs(student, teacher, temperature):
    return ref.softmax(student, temperature), ref.softmax(teacher, temperature)


def kl_reference(student, teacher, temperature):
    p_s, p_t = _probs(student, teacher, temperature)
    return temperature**2 * ref.kl(p_t, p_s)


def reverse_kl_reference(student, teacher, temperature):
    p_s, p_t = _probs(student, teacher, temperature)
    return temperature**2 * ref.kl(p_s, p_t)


def soft_cross_entropy_reference(student, teacher, temperature):
    p_s, p_t = _probs(student, teacher, temperature)
    return -(temperature**2) * np.sum(p_t * np.log(p_s), axis=-1)


def generalized_jsd_reference(student, teacher, temperature, beta):
    p_s, p_t = _probs(student, teacher, temperature)
    if beta == 0.0:
        return temperature**2 * ref.kl(p_t, p_s)
    if beta == 1.0:
        return temperature**2 * ref.kl(p_s, p_t)
    m = beta * p_t + (1.0 - beta) * p_s
    return temperature**2 * (beta * ref.kl(p_t, m) + (1.0 - beta) * ref.kl(p_s, m))


def skew_kl_reference(student, teacher, temperature, alpha):
    p_s, p_t = _probs(student, teacher, temperature)
    return temperature**2 * ref.kl(p_t, alpha * p_t + (1.0 - alpha) * p_s)


def skew_reverse_kl_reference(student, teacher, temperature, alpha):
    p_s, p_t = _probs(student, teacher, temperature)
    return temperature**2 * ref.kl(p_s, alpha * p_s + (1.0 - alpha) * p_t)


def total_variation_reference(student, teacher, temperature):
    p_s, p_t = _probs(student, teacher, temperature)
    return temperature**2 * 0.5 * np.sum(np.abs(p_t - p_s), axis=-1)


def logit_mse_reference(student, teacher):
    diff = np.asarray(student, np.float64) - np.asarray(teacher, np.float64)
    return np.mean(diff**2, axis=-1)


class Case(NamedTuple):
    """A divergence with its static options, and the reference it must match."""

    name: str
    loss: object  # (student, teacher, *, temperature, axis, where) -> values
    reference: object  # (student, teacher, temperature) -> float64 values
    is_divergence: bool = True  # zero iff the distributions are equal


def _case(name, loss, reference, *, is_divergence=True, **options):
    label = name + "".join(f"-{k}={v}" for k, v in options.items())
    return Case(
        label,
        functools.partial(loss, **options),
        functools.partial(reference, **options),
        is_divergence,
    )


CASES = [
    _case("kl", jaxkd.kl_divergence, kl_reference),
    _case("reverse_kl", jaxkd.reverse_kl_divergence, reverse_kl_reference),
    # Soft cross entropy is minimal, not zero, at equality: T^2 times the teacher's entropy.
    _case("soft_ce", jaxkd.soft_cross_entropy, soft_cross_entropy_reference, is_divergence=False),
    *[
        _case("jsd", jaxkd.generalized_jsd, generalized_jsd_reference, beta=beta)
        for beta in (0.0, 0.1, 0.5, 0.9, 1.0)
    ],
    *[
        _case("skew_kl", jaxkd.skew_kl_divergence, skew_kl_reference, alpha=alpha)
        for alpha in (0.0, 0.1, 0.5)
    ],
    *[
        _case("skew_rkl", jaxkd.skew_reverse_kl_divergence, skew_reverse_kl_reference, alpha=a)
        for a in (0.0, 0.1, 0.5)
    ],
    _case("tvd", jaxkd.total_variation, total_variation_reference),
]

# One case per function for the behaviour that does not depend on the options.
CORE_NAMES = ("kl", "reverse_kl", "soft_ce", "jsd-beta=0.5", "skew_kl-alpha=0.1")
CORE_NAMES += ("skew_rkl-alpha=0.1", "tvd")
CORE = [case for case in CASES if case.name in CORE_NAMES]
DIVERGENCES = [case for case in CASES if case.is_divergence]

# logit_mse has no temperature; it joins the mask and transform tests through this wrapper.
LOGIT_MSE = Case(
    "logit_mse",
    lambda s, t, *, temperature=1.0, **kw: jaxkd.logit_mse(s, t, **kw),
    lambda s, t, temperature: logit_mse_reference(s, t),
    True,
)
WITH_MSE = [*CORE, LOGIT_MSE]


def _ids(cases):
    return [case.name for case in cases]


def _pair(seed, shape, scale=3.0, dtype=np.float32):
    """(student_logits, teacher_logits) of the given shape."""
    return (
        ref.random_logits(seed, shape, scale=scale, dtype=dtype),
        ref.random_logits(seed + 1000, shape, scale=scale, dtype=dtype),
    )


# 1. Reference agreement.


@pytest.mark.parametrize("temperature", ref.TEMPERATURES)
@pytest.mark.parametrize("shape", ref.SHAPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_matches_reference(case, shape, temperature):
    student, teacher = _pair(0, shape)
    got = case.loss(student, teacher, temperature=temperature)
    assert got.shape == shape[:-1]
    assert got.dtype == jnp.float32
    want = case.reference(student, teacher, temperature)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * temperature**2)
    assert np.all(np.asarray(got) >= 0)


@pytest.mark.parametrize("shape", ref.SHAPES, ids=str)
def test_logit_mse_matches_reference(shape):
    student, teacher = _pair(1, shape)
    got = jaxkd.logit_mse(student, teacher)
    assert got.shape == shape[:-1]
    np.testing.assert_allclose(got, logit_mse_reference(student, teacher), rtol=1e-5)


# At a large temperature p_t and p_s are close and a divergence is a small difference of
# large terms; T^2 times it is O(1), so its relative error is meaningful. float32 inputs,
# float64 references from the formulas above.
HIGH_TEMPERATURE_CASES = [
    case
    for case in CASES
    if case.name
    in (
        "kl",
        "reverse_kl",
        "soft_ce",
        "jsd-beta=0.1",
        "jsd-beta=0.5",
        "jsd-beta=0.9",
        "skew_kl-alpha=0.1",
        "skew_rkl-alpha=0.1",
        "tvd",
    )
]


@pytest.mark.parametrize("num_classes", [10, 1000])
@pytest.mark.parametrize("case", HIGH_TEMPERATURE_CASES, ids=_ids(HIGH_TEMPERATURE_CASES))
def test_relative_precision_up_to_temperature_100(case, num_classes):
    loss = jax.jit(case.loss)
    for scale in (1.0, 3.0, 10.0):
        student, teacher = _pair(30, (16, num_classes), scale=scale)
        for temperature in (1.0, 10.0, 50.0, 100.0):
            got = np.asarray(loss(student, teacher, temperature=temperature), np.float64)
            want = case.reference(student, teacher, temperature)
            np.testing.assert_allclose(
                got, want, rtol=1e-5, err_msg=f"scale={scale}, T={temperature}"
            )


@pytest.mark.parametrize("case", HIGH_TEMPERATURE_CASES, ids=_ids(HIGH_TEMPERATURE_CASES))
def test_relative_precision_in_float64(case):
    with jax.enable_x64(True):
        student, teacher = _pair(31, (8, 50), scale=3.0, dtype=np.float64)
        for temperature in (1.0, 100.0):
            got = case.loss(student, teacher, temperature=temperature)
            assert got.dtype == jnp.float64
            want = case.reference(student, teacher, temperature)
            np.testing.assert_allclose(got, want, rtol=1e-11)


# 2. Identities.


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("case", DIVERGENCES, ids=_ids(DIVERGENCES))
def test_zero_if_and_only_if_the_distributions_are_equal(case, temperature):
    student, teacher = _pair(2, (4, 7))
    # The divergence itself (without the T^2 factor) is 0 to 1e-6 at equality.
    atol = 1e-6 * temperature**2
    np.testing.assert_allclose(case.loss(teacher, teacher, temperature=temperature), 0.0, atol=atol)
    # Softmax ignores a per-row shift: shifted logits give the same distribution.
    shift = ref.random_logits(3, (4, 1))
    np.testing.assert_allclose(
        case.loss(teacher + shift, teacher, temperature=temperature), 0.0, atol=atol
    )
    # ...and different distributions give a clearly positive value.
    values = np.asarray(case.loss(student, teacher, temperature=temperature))
    assert np.all(values > 1e-3), values


@pytest.mark.parametrize("temperature", ref.TEMPERATURES)
def test_soft_cross_entropy_minus_kl_is_scaled_teacher_entropy(temperature):
    student, teacher = _pair(4, (2, 3, 7))
    cross = jaxkd.soft_cross_entropy(student, teacher, temperature=temperature)
    kl = jaxkd.kl_divergence(student, teacher, temperature=temperature)
    entropy = jaxkd.entropy(teacher, temperature=temperature)
    np.testing.assert_allclose(
        cross - kl, temperature**2 * entropy, rtol=1e-5, atol=1e-5 * temperature**2
    )


@pytest.mark.parametrize("temperature", ref.TEMPERATURES)
def test_jsd_at_half_is_symmetric_and_at_most_log_two(temperature):
    student, teacher = _pair(5, (4, 7))
    forward = jaxkd.generalized_jsd(student, teacher, beta=0.5, temperature=temperature)
    swapped = jaxkd.generalized_jsd(teacher, student, beta=0.5, temperature=temperature)
    np.testing.assert_allclose(forward, swapped, rtol=1e-5, atol=1e-7 * temperature**2)
    assert np.all(np.asarray(forward) <= temperature**2 * np.log(2.0))


def test_jsd_reaches_log_two_for_disjoint_supports():
    # One-hot distributions on different classes: m = (1/2, 1/2) on the two supports.
    student = ref.one_hot_logits([0, 1, 2, 6])
    teacher = ref.one_hot_logits([1, 0, 6, 3])
    got = jaxkd.generalized_jsd(student, teacher, beta=0.5)
    np.testing.assert_allclose(got, np.log(2.0), rtol=1e-6)


def _relative_error(got, want):
    return float(np.max(np.abs(np.asarray(got) - want) / np.abs(want)))


def test_jsd_over_beta_tends_to_forward_kl_as_beta_goes_to_zero():
    with jax.enable_x64(True):
        student, teacher = _pair(6, (4, 7), dtype=np.float64)
        want = kl_reference(student, teacher, 2.0)
        errors = [
            _relative_error(
                jaxkd.generalized_jsd(student, teacher, beta=beta, temperature=2.0) / beta, want
            )
            for beta in (1e-2, 1e-3, 1e-4, 1e-5)
        ]
    assert np.all(np.diff(errors) < 0), errors
    assert errors[-1] < 1e-4, errors


def test_jsd_over_one_minus_beta_tends_to_reverse_kl_as_beta_goes_to_one():
    with jax.enable_x64(True):
        student, teacher = _pair(7, (4, 7), dtype=np.float64)
        want = reverse_kl_reference(student, teacher, 2.0)
        errors = [
            _relative_error(
                jaxkd.generalized_jsd(student, teacher, beta=1.0 - gap, temperature=2.0) / gap,
                want,
            )
            for gap in (1e-2, 1e-3, 1e-4, 1e-5)
        ]
    assert np.all(np.diff(errors) < 0), errors
    assert errors[-1] < 1e-4, errors


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_generalized_jsd_endpoints_are_forward_and_reverse_kl(temperature):
    student, teacher = _pair(8, (4, 7))
    kwargs = dict(temperature=temperature)
    np.testing.assert_array_equal(
        jaxkd.generalized_jsd(student, teacher, beta=0.0, **kwargs),
        jaxkd.kl_divergence(student, teacher, **kwargs),
    )
    np.testing.assert_array_equal(
        jaxkd.generalized_jsd(student, teacher, beta=1.0, **kwargs),
        jaxkd.reverse_kl_divergence(student, teacher, **kwargs),
    )


@pytest.mark.parametrize("shape", ref.SHAPES, ids=str)
def test_kl_at_temperature_one_equals_optax_kl_with_log_targets(shape):
    student, teacher = _pair(9, shape)
    want = optax.losses.kl_divergence_with_log_targets(
        jaxkd.log_softmax(student), jaxkd.log_softmax(teacher)
    )
    np.testing.assert_allclose(jaxkd.kl_divergence(student, teacher), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_skew_divergences_at_alpha_zero_and_one(temperature):
    student, teacher = _pair(10, (4, 7))
    kwargs = dict(temperature=temperature)
    np.testing.assert_allclose(
        jaxkd.skew_kl_divergence(student, teacher, alpha=0.0, **kwargs),
        jaxkd.kl_divergence(student, teacher, **kwargs),
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        jaxkd.skew_reverse_kl_divergence(student, teacher, alpha=0.0, **kwargs),
        jaxkd.reverse_kl_divergence(student, teacher, **kwargs),
        rtol=1e-6,
    )
    for loss in (jaxkd.skew_kl_divergence, jaxkd.skew_reverse_kl_divergence):
        np.testing.assert_allclose(loss(student, teacher, alpha=1.0, **kwargs), 0.0, atol=1e-7)


@pytest.mark.parametrize("alpha", [0.01, 0.1, 0.5])
def test_skew_kl_is_bounded_by_minus_log_alpha(alpha):
    # KL(p || a p + (1 - a) q) <= -log a, approached when p and q have disjoint supports.
    student, teacher = _pair(11, (4, 7), scale=30.0)
    for loss in (jaxkd.skew_kl_divergence, jaxkd.skew_reverse_kl_divergence):
        values = np.asarray(loss(student, teacher, alpha=alpha, temperature=2.0))
        assert np.all(values <= 4.0 * -np.log(alpha) * (1 + 1e-6))
    disjoint = jaxkd.skew_kl_divergence(
        ref.one_hot_logits([0, 1, 2, 6]), ref.one_hot_logits([1, 0, 6, 3]), alpha=alpha
    )
    np.testing.assert_allclose(disjoint, -np.log(alpha), rtol=1e-6)


@pytest.mark.parametrize("temperature", ref.TEMPERATURES)
def test_total_variation_lies_between_zero_and_t_squared(temperature):
    student, teacher = _pair(12, (4, 7), scale=10.0)
    values = np.asarray(jaxkd.total_variation(student, teacher, temperature=temperature))
    assert np.all(values >= 0)
    assert np.all(values <= temperature**2 * (1 + 1e-5))  # float32 rounding of the sum
    disjoint = jaxkd.total_variation(
        ref.one_hot_logits([0, 1, 2, 6]), ref.one_hot_logits([1, 0, 6, 3]), temperature=0.5
    )
    np.testing.assert_allclose(disjoint, 0.25, rtol=1e-6)


# 3. Gradients.


@pytest.mark.parametrize("temperature", ref.TEMPERATURES)
def test_kl_gradient_is_temperature_times_probability_gap(temperature):
    # d/ds [T^2 KL(p_t || p_s)] = T (softmax(s / T) - softmax(t / T)), per example.
    student, teacher = _pair(13, (4, 7))
    grad = _kl_grad(student, teacher, temperature)
    p_s, p_t = _probs(student, teacher, temperature)
    np.testing.assert_allclose(grad, temperature * (p_s - p_t), rtol=1e-4, atol=1e-6 * temperature)


@jax.jit
def _kl_grad(student, teacher, temperature):
    def total(s):
        return jnp.sum(jaxkd.kl_divergence(s, teacher, temperature=temperature))

    return jax.grad(total)(student)


@pytest.mark.parametrize("temperature", [50.0, 100.0])
def test_kl_gradient_stays_accurate_at_high_temperature(temperature):
    student, teacher = _pair(32, (8, 1000))
    grad = _kl_grad(student, teacher, temperature)
    p_s, p_t = _probs(student, teacher, temperature)
    want = temperature * (p_s - p_t)
    np.testing.assert_allclose(grad, want, rtol=0, atol=1e-6 * np.max(np.abs(want)))


def test_high_temperature_kl_tends_to_half_logit_mse():
    # T^2 KL(p_t || p_s) = mean_i (s_i - t_i)^2 / 2 + O(1/T) for zero-mean logits
    # (Hinton et al. 2015, section 2.1): distillation becomes logit matching.
    with jax.enable_x64(True):
        student, teacher = _pair(14, (4, 7), scale=1.0, dtype=np.float64)
        student -= student.mean(axis=-1, keepdims=True)
        teacher -= teacher.mean(axis=-1, keepdims=True)
        half_mse = np.asarray(jaxkd.logit_mse(student, teacher)) / 2
        np.testing.assert_allclose(half_mse, logit_mse_reference(student, teacher) / 2, rtol=1e-12)
        errors = [
            _relative_error(jaxkd.kl_divergence(student, teacher, temperature=t), half_mse)
            for t in (1.0, 10.0, 100.0, 1000.0)
        ]
    assert np.all(np.diff(errors) < 0), errors
    assert errors[-1] < 1e-3, errors


@pytest.mark.parametrize("case", WITH_MSE, ids=_ids(WITH_MSE))
def test_gradients_match_finite_differences(case):
    with jax.enable_x64(True):
        student, teacher = (jnp.asarray(x) for x in _pair(15, (4, 7), dtype=np.float64))
        weights = jnp.asarray(ref.random_logits(16, (4,), dtype=np.float64))

        def weighted(s, t):
            return jnp.sum(weights * case.loss(s, t, temperature=1.7))

        check_grads(weighted, (student, teacher), order=1, modes=["rev"], atol=1e-5, rtol=1e-5)


# 4. Masks, axes and transformations.


@pytest.mark.parametrize("case", WITH_MSE, ids=_ids(WITH_MSE))
def test_per_example_mask_equals_slicing(case):
    # Token-level logits [B, T, V] with a per-token mask [B, T] give [B, T] values: the
    # kept tokens' values computed alone, exact zeros elsewhere, and `masked_mean` of them
    # is the mean over the kept tokens.
    student, teacher = _pair(17, (2, 3, 7))
    where = ref.TOKEN_WHERE
    values = case.loss(student, teacher, temperature=2.0, where=where)
    assert values.shape == where.shape
    kept = case.loss(student[where], teacher[where], temperature=2.0)
    np.testing.assert_allclose(values[where], kept, rtol=1e-6)
    np.testing.assert_array_equal(values[~where], 0.0)
    np.testing.assert_allclose(jaxkd.masked_mean(values, where), np.mean(kept), rtol=1e-6)


@pytest.mark.parametrize("case", WITH_MSE, ids=_ids(WITH_MSE))
def test_per_class_mask_equals_slicing(case):
    student, teacher = _pair(18, (4, 7))
    keep = np.array([True, False, True, True, False, True, True])
    where = np.broadcast_to(keep, student.shape)
    got = case.loss(student, teacher, temperature=2.0, where=where)
    want = case.loss(student[:, keep], teacher[:, keep], temperature=2.0)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("case", WITH_MSE, ids=_ids(WITH_MSE))
def test_broadcast_masks_equal_their_full_shape(case):
    # As optax takes masks: [B, L, 1] == [B, L] (per token) == the [B, L, V] broadcast, and
    # [1, 1, V] == its [B, L, V] broadcast (per class); same values, same gradients.
    student, teacher = _pair(40, (2, 3, 7))
    token = ref.TOKEN_WHERE
    keep = np.array([True, False, True, True, False, True, True])
    equivalent = [
        (token[..., None], token, np.broadcast_to(token[..., None], student.shape)),
        (keep[None, None], np.broadcast_to(keep, student.shape)),
    ]
    for masks in equivalent:
        results = [
            (
                case.loss(student, teacher, temperature=2.0, where=m),
                _grads(case, student, teacher, m),
            )
            for m in masks
        ]
        for other in results[1:]:
            chex.assert_trees_all_equal(other, results[0])
    # Masked tokens give exactly 0, with exactly zero (finite) gradients.
    values, grads = (
        case.loss(student, teacher, temperature=2.0, where=token[..., None]),
        _grads(case, student, teacher, token[..., None]),
    )
    np.testing.assert_array_equal(values[~token], 0.0)
    for grad in grads:
        np.testing.assert_array_equal(grad[~token], 0.0)


@pytest.mark.parametrize("case", WITH_MSE, ids=_ids(WITH_MSE))
def test_neg_inf_padding_equals_slicing(case):
    student, teacher = _pair(19, (4, 7))
    keep = np.array([True, True, False, True, True, True, False])
    padded_student = np.where(keep, student, -np.inf).astype(np.float32)
    padded_teacher = np.where(keep, teacher, -np.inf).astype(np.float32)
    got = case.loss(padded_student, padded_teacher, temperature=2.0)
    want = case.loss(student[:, keep], teacher[:, keep], temperature=2.0)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    grads = _grads(case, padded_student, padded_teacher, None)
    chex.assert_tree_all_finite(grads)


def test_one_sided_neg_inf_matches_the_formulas():
    # The teacher rules out classes the student keeps (finite KL, JSD, skew KL, TVD), in
    # some rows at a high temperature; rows where one model rules out everything follow
    # 0 log 0 = 0: forward and skew KL of an empty teacher are 0.
    student, teacher = _pair(41, (4, 7))
    teacher[:, [1, 4]] = -np.inf
    for temperature in (2.0, 50.0):
        for name in ("kl", "jsd-beta=0.5", "skew_kl-alpha=0.1", "skew_rkl-alpha=0.1", "tvd"):
            case = next(c for c in CASES if c.name == name)
            np.testing.assert_allclose(
                case.loss(student, teacher, temperature=temperature),
                case.reference(student, teacher, temperature),
                rtol=1e-5,
                err_msg=f"{name}, T={temperature}",
            )
        values = jaxkd.reverse_kl_divergence(student, teacher, temperature=temperature)
        np.testing.assert_array_equal(values, np.inf)
    empty = np.full_like(teacher, -np.inf)
    np.testing.assert_array_equal(jaxkd.kl_divergence(student, empty), 0.0)
    np.testing.assert_array_equal(jaxkd.skew_kl_divergence(student, empty), 0.0)
    np.testing.assert_array_equal(jaxkd.reverse_kl_divergence(empty, teacher), 0.0)
    np.testing.assert_allclose(
        jaxkd.skew_kl_divergence(empty, student, alpha=0.25), -np.log(0.25), rtol=1e-6
    )


def _grads(case, student, teacher, where):
    def total(s, t):
        return jnp.sum(case.loss(s, t, temperature=2.0, where=where))

    return jax.grad(total, argnums=(0, 1))(student, teacher)


@pytest.mark.parametrize("mask_kind", ["per_example", "per_class", "neg_inf"])
@pytest.mark.parametrize("case", WITH_MSE, ids=_ids(WITH_MSE))
def test_fully_masked_row_gives_zero_with_finite_gradient(case, mask_kind):
    # Row 1 is masked: by a [B] mask, by a [B, C] mask, or by -inf logits in both models.
    student, teacher = _pair(21, (4, 7))
    where = None
    if mask_kind == "per_example":
        where = np.array([True, False, True, True])
    elif mask_kind == "per_class":
        where = np.ones((4, 7), bool)
        where[1] = False
    else:
        student[1] = teacher[1] = -np.inf
    values = case.loss(student, teacher, temperature=2.0, where=where)
    np.testing.assert_array_equal(values[1], 0.0)
    # The other rows do not see the mask: examples are independent.
    kept = np.array([True, False, True, True])
    unmasked = case.loss(student, teacher, temperature=2.0)
    np.testing.assert_allclose(values[kept], unmasked[kept], rtol=1e-6)
    grads = _grads(case, student, teacher, where)
    chex.assert_tree_all_finite(grads)
    for grad in grads:
        np.testing.assert_array_equal(grad[1], 0.0)


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("case", WITH_MSE, ids=_ids(WITH_MSE))
def test_axis_equals_moveaxis(case, axis):
    student, teacher = _pair(22, (2, 3, 7))
    got = case.loss(
        np.moveaxis(student, -1, axis), np.moveaxis(teacher, -1, axis), temperature=2.0, axis=axis
    )
    want = case.loss(student, teacher, temperature=2.0)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("case", WITH_MSE, ids=_ids(WITH_MSE))
def test_jit_vmap_and_grad_agree_with_eager(case):
    student, teacher = _pair(23, (4, 7))

    def values_and_grads(s, t):
        def total(s, t):
            return jnp.sum(case.loss(s, t, temperature=2.0))

        return case.loss(s, t, temperature=2.0), jax.grad(total, argnums=(0, 1))(s, t)

    eager = values_and_grads(student, teacher)
    chex.assert_trees_all_close(
        jax.jit(values_and_grads)(student, teacher), eager, rtol=1e-5, atol=1e-7
    )
    mapped = jax.vmap(lambda s, t: case.loss(s, t, temperature=2.0))(student, teacher)
    chex.assert_trees_all_close(mapped, eager[0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("case", WITH_MSE, ids=_ids(WITH_MSE))
def test_bfloat16_inputs_give_float32_close_to_float32(case):
    student, teacher = _pair(24, (4, 7))
    high = np.asarray(case.loss(student, teacher, temperature=2.0))
    low = case.loss(
        jnp.asarray(student, jnp.bfloat16), jnp.asarray(teacher, jnp.bfloat16), temperature=2.0
    )
    assert low.dtype == jnp.float32
    chex.assert_tree_all_finite(low)
    np.testing.assert_allclose(low, high, rtol=0.05, atol=0.05 * np.max(np.abs(high)))


@pytest.mark.parametrize("case", WITH_MSE, ids=_ids(WITH_MSE))
def test_extreme_logits_give_finite_values_and_gradients(case):
    # Random signs, a tie between two maxima in some rows, and exact equality in the last.
    student = ref.extreme_logits(25)
    teacher = ref.extreme_logits(26)
    teacher[-1] = student[-1]
    values = case.loss(student, teacher, temperature=2.0)
    chex.assert_tree_all_finite(values)
    assert np.all(np.asarray(values) >= 0)
    chex.assert_tree_all_finite(_grads(case, student, teacher, None))


# 5. Properties over random shapes, temperatures and divergences.


@functools.cache
def _jitted(case_index):
    return jax.jit(CASES[case_index].loss)


@settings(max_examples=25, deadline=None)
@given(
    case_index=st.integers(0, len(CASES) - 1),
    batch=st.integers(1, 5),
    classes=st.integers(2, 12),
    seed=st.integers(0, 2**31),
    temperature=st.floats(0.5, 10.0),
)
def test_property_nonnegative_matches_reference_and_zero_at_equality(
    case_index, batch, classes, seed, temperature
):
    case = CASES[case_index]
    loss = _jitted(case_index)
    student, teacher = _pair(seed, (batch, classes))
    values = np.asarray(loss(student, teacher, temperature=temperature))
    np.testing.assert_allclose(
        values,
        case.reference(student, teacher, temperature),
        rtol=1e-5,
        atol=1e-6 * temperature**2,
    )
    assert np.all(values >= -1e-6 * temperature**2)
    if case.is_divergence:
        at_equality = loss(teacher, teacher, temperature=temperature)
        np.testing.assert_allclose(at_equality, 0.0, atol=1e-6 * temperature**2)
