"""Numerical tests of the composite objectives in ``jaxkd.losses._kd_losses``.

References (float64 numpy, ``p = softmax(z / T)`` from ``_reference.py``):

* ``cross_entropy_with_integer_labels``: ``-log softmax(z)_y``.
* ``hinton_loss``: Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural
  Network", 2015: ``alpha T^2 KL(p_t || p_s) + (1 - alpha) CE(y, softmax(z_s))``, the hard
  term at temperature 1.
* ``dkd_loss``: Zhao, Cui, Song, Qiu and Liang, "Decoupled Knowledge Distillation", CVPR
  2022, as in the authors' implementation: ``b = (p_y, 1 - p_y)`` is the binary target /
  non-target split of ``p`` and ``p_hat`` the non-target probabilities renormalized to sum
  to 1; the loss is ``T^2 [alpha KL(b_t || b_s) + beta KL(p_hat_t || p_hat_s)]``
  (TCKD and NCKD), one value per example. Classic KD decomposes as
  ``KL(p_t || p_s) = KL(b_t || b_s) + (1 - p_t,y) KL(p_hat_t || p_hat_s)`` (their Eq. 1).
* ``dist_loss``: Huang, You, Wang, Qian and Xu, "Knowledge Distillation from A Stronger
  Teacher", NeurIPS 2022, as in the authors' implementation: with ``Y = softmax(Z / T)`` of
  shape ``[B, C]`` and ``d(u, v) = 1 - <u - mean u, v - mean v> / (|u - mean u| |v - mean v|
  + 1e-8)`` (one minus the Pearson correlation), the scalar
  ``T^2 [beta mean_i d(Y_s,i:, Y_t,i:) + gamma mean_j d(Y_s,:j, Y_t,:j)]``.
* ``masked_mean``: the arithmetic mean of the entries where the mask is True.
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


def cross_entropy_reference(logits, labels):
    log_p = ref.log_softmax(logits)
    return -np.take_along_axis(log_p, np.asarray(labels)[..., None], axis=-1)[..., 0]


def hinton_reference(student, teacher, labels, temperature, alpha):
    soft = temperature**2 * ref.kl(
        ref.softmax(teacher, temperature), ref.softmax(student, temperature)
    )
    return alpha * soft + (1.0 - alpha) * cross_entropy_reference(student, labels)


def _decoupled(probs, labels):
    """(b, p_hat): the binary target/non-target split and the renormalized non-targets."""
    is_target = np.arange(probs.shape[-1]) == np.asarray(labels)[..., None]
    p_target = np.sum(np.where(is_target, probs, 0.0), axis=-1)
    p_rest = np.sum(np.where(is_target, 0.0, probs), axis=-1)
    binary = np.stack([p_target, p_rest], axis=-1)
    non_target = np.where(is_target, 0.0, probs)
    return binary, non_target / np.sum(non_target, axis=-1, keepdims=True)


def dkd_reference(student, teacher, labels, temperature, alpha, beta):
    b_s, hat_s = _decoupled(ref.softmax(student, temperature), labels)
    b_t, hat_t = _decoupled(ref.softmax(teacher, temperature), labels)
    tckd = ref.kl(b_t, b_s)
    nckd = ref.kl(hat_t, hat_s)
    return temperature**2 * (alpha * tckd + beta * nckd)


def _pearson_distance_rows(a, b, eps=1e-8):
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return 1.0 - np.sum(a * b, axis=1) / (norms + eps)


def dist_reference(student, teacher, temperature, beta=1.0, gamma=1.0):
    y_s = ref.softmax(student, temperature)
    y_t = ref.softmax(teacher, temperature)
    inter = np.mean(_pearson_distance_rows(y_s, y_t))
    intra = np.mean(_pearson_distance_rows(y_s.T, y_t.T))
    return temperature**2 * (beta * inter + gamma * intra)


def _labels(seed, shape, num_classes):
    return np.random.default_rng(seed).integers(0, num_classes, shape).astype(np.int32)


def _triple(seed, shape, dtype=np.float32):
    """(student_logits, teacher_logits, labels) with logits of scale 3."""
    return (
        ref.random_logits(seed, shape, dtype=dtype),
        ref.random_logits(seed + 1000, shape, dtype=dtype),
        _labels(seed + 2000, shape[:-1], shape[-1]),
    )


class Case(NamedTuple):
    """A per-example loss with labels, with its static options."""

    name: str
    loss: object  # (student, teacher, labels, *, temperature, axis, where) -> values


def _cross_entropy(student, teacher, labels, *, temperature=1.0, axis=-1, where=None):
    del teacher, temperature
    return jaxkd.cross_entropy_with_integer_labels(student, labels, axis=axis, where=where)


CASES = [
    Case("cross_entropy", _cross_entropy),
    Case("hinton", functools.partial(jaxkd.hinton_loss, alpha=0.7)),
    Case("dkd", functools.partial(jaxkd.dkd_loss, alpha=1.0, beta=8.0)),
]
IDS = [case.name for case in CASES]


# 1. Reference agreement.


@pytest.mark.parametrize("shape", ref.SHAPES, ids=str)
def test_cross_entropy_matches_reference_and_optax(shape):
    student, _, labels = _triple(0, shape)
    got = jaxkd.cross_entropy_with_integer_labels(student, labels)
    assert got.shape == labels.shape
    np.testing.assert_allclose(got, cross_entropy_reference(student, labels), rtol=1e-5, atol=1e-6)
    optax_values = optax.losses.softmax_cross_entropy_with_integer_labels(student, labels)
    np.testing.assert_allclose(got, optax_values, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.9, 1.0])
@pytest.mark.parametrize("temperature", ref.TEMPERATURES)
@pytest.mark.parametrize("shape", ref.SHAPES, ids=str)
def test_hinton_loss_matches_reference(shape, temperature, alpha):
    student, teacher, labels = _triple(1, shape)
    got = jaxkd.hinton_loss(student, teacher, labels, alpha=alpha, temperature=temperature)
    assert got.shape == labels.shape
    want = hinton_reference(student, teacher, labels, temperature, alpha)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * temperature**2)


@pytest.mark.parametrize("alpha, beta", [(1.0, 8.0), (1.0, 0.0), (0.0, 1.0), (0.5, 2.0)])
@pytest.mark.parametrize("temperature", ref.TEMPERATURES)
@pytest.mark.parametrize("shape", ref.SHAPES, ids=str)
def test_dkd_loss_matches_reference(shape, temperature, alpha, beta):
    student, teacher, labels = _triple(2, shape)
    got = jaxkd.dkd_loss(student, teacher, labels, alpha=alpha, beta=beta, temperature=temperature)
    assert got.shape == labels.shape
    want = dkd_reference(student, teacher, labels, temperature, alpha, beta)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * temperature**2)


def test_dkd_loss_default_options_are_those_of_the_paper():
    # alpha=1, beta=8, T=4: the CIFAR-100 setting of Zhao et al. (2022).
    student, teacher, labels = _triple(3, (4, 7))
    want = dkd_reference(student, teacher, labels, 4.0, 1.0, 8.0)
    np.testing.assert_allclose(jaxkd.dkd_loss(student, teacher, labels), want, rtol=1e-5)


@pytest.mark.parametrize("beta, gamma", [(1.0, 1.0), (2.0, 0.0), (0.0, 2.0), (1.0, 2.0)])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_dist_loss_matches_reference(temperature, beta, gamma):
    student = ref.random_logits(4, (4, 7))
    teacher = ref.random_logits(5, (4, 7))
    got = jaxkd.dist_loss(student, teacher, beta=beta, gamma=gamma, temperature=temperature)
    assert got.shape == ()
    want = dist_reference(student, teacher, temperature, beta, gamma)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_masked_mean_matches_reference():
    values = ref.random_logits(6, (2, 3))
    where = np.array([[True, False, True], [False, False, True]])
    np.testing.assert_allclose(jaxkd.masked_mean(values), np.mean(values), rtol=1e-6)
    np.testing.assert_allclose(jaxkd.masked_mean(values, where), np.mean(values[where]), rtol=1e-6)
    np.testing.assert_array_equal(jaxkd.masked_mean(values, np.zeros((2, 3), bool)), 0.0)
    grad = jax.grad(lambda v: jaxkd.masked_mean(v, np.zeros((2, 3), bool)))(values)
    np.testing.assert_array_equal(grad, 0.0)


# 2. Identities.


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_hinton_loss_at_alpha_one_is_kl_and_at_alpha_zero_ignores_the_teacher(temperature):
    student, teacher, labels = _triple(7, (4, 7))
    kwargs = dict(temperature=temperature)
    np.testing.assert_allclose(
        jaxkd.hinton_loss(student, teacher, labels, alpha=1.0, **kwargs),
        jaxkd.kl_divergence(student, teacher, **kwargs),
        rtol=1e-6,
    )
    hard = jaxkd.hinton_loss(student, teacher, labels, alpha=0.0, **kwargs)
    np.testing.assert_allclose(
        hard, jaxkd.cross_entropy_with_integer_labels(student, labels), rtol=1e-6
    )
    other_teacher = ref.random_logits(8, (4, 7))
    np.testing.assert_array_equal(
        jaxkd.hinton_loss(student, other_teacher, labels, alpha=0.0, **kwargs), hard
    )


@pytest.mark.parametrize("temperature", ref.TEMPERATURES)
@pytest.mark.parametrize("shape", ref.SHAPES, ids=str)
def test_dkd_pieces_recompose_classic_kd(shape, temperature):
    # Zhao et al. (2022), Eq. (1): KL(p_t || p_s) = TCKD + (1 - p_t,y) NCKD.
    student, teacher, labels = _triple(9, shape)
    kwargs = dict(temperature=temperature)
    tckd = jaxkd.dkd_loss(student, teacher, labels, alpha=1.0, beta=0.0, **kwargs)
    nckd = jaxkd.dkd_loss(student, teacher, labels, alpha=0.0, beta=1.0, **kwargs)
    p_teacher = jaxkd.softmax(teacher, **kwargs)
    p_target = np.take_along_axis(np.asarray(p_teacher), labels[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(
        tckd + (1.0 - p_target) * nckd,
        jaxkd.kl_divergence(student, teacher, **kwargs),
        rtol=1e-5,
        atol=1e-6 * temperature**2,
    )


def test_dkd_loss_is_nonnegative_and_zero_at_equality():
    student, teacher, labels = _triple(10, (2, 3, 7))
    for temperature in (1.0, 4.0):
        values = np.asarray(jaxkd.dkd_loss(student, teacher, labels, temperature=temperature))
        assert np.all(values > 0)
        at_equality = jaxkd.dkd_loss(teacher, teacher, labels, temperature=temperature)
        np.testing.assert_allclose(at_equality, 0.0, atol=1e-6 * temperature**2)


def test_dkd_loss_with_two_classes_has_no_non_target_term():
    # With one non-target class p_hat = (1,) for both models: NCKD is 0 and TCKD is the KL.
    student, teacher, labels = _triple(11, (4, 2))
    nckd = jaxkd.dkd_loss(student, teacher, labels, alpha=0.0, beta=1.0)
    np.testing.assert_allclose(nckd, 0.0, atol=1e-6)
    tckd = jaxkd.dkd_loss(student, teacher, labels, alpha=1.0, beta=0.0, temperature=2.0)
    kl = jaxkd.kl_divergence(student, teacher, temperature=2.0)
    np.testing.assert_allclose(tckd, kl, rtol=1e-5, atol=1e-6)


def test_dist_loss_is_zero_at_equality_and_bounded():
    student = ref.random_logits(12, (4, 7))
    teacher = ref.random_logits(13, (4, 7))
    for temperature in (1.0, 4.0):
        kwargs = dict(beta=1.0, gamma=2.0, temperature=temperature)
        np.testing.assert_allclose(
            jaxkd.dist_loss(teacher, teacher, **kwargs), 0.0, atol=1e-5 * temperature**2
        )
        # 1 - pearson lies in [0, 2] for each term.
        value = float(jaxkd.dist_loss(student, teacher, **kwargs))
        assert 0.0 < value <= 2.0 * 3.0 * temperature**2
        # Pearson correlation is symmetric, so is DIST.
        np.testing.assert_allclose(jaxkd.dist_loss(teacher, student, **kwargs), value, rtol=1e-5)


def test_dist_loss_where_equals_slicing():
    student = ref.random_logits(14, (4, 7))
    teacher = ref.random_logits(15, (4, 7))
    where = np.array([True, False, True, True])
    got = jaxkd.dist_loss(student, teacher, temperature=2.0, where=where)
    want = jaxkd.dist_loss(student[where], teacher[where], temperature=2.0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        got, dist_reference(student[where], teacher[where], 2.0), rtol=1e-5, atol=1e-6
    )


def test_dist_loss_fully_masked_batch_gives_zero_with_finite_gradient():
    # Like every other loss (and masked_mean): nothing kept, nothing to distill.
    student = ref.random_logits(16, (4, 7))
    teacher = ref.random_logits(17, (4, 7))
    where = np.zeros(4, bool)
    np.testing.assert_array_equal(
        jaxkd.dist_loss(student, teacher, temperature=2.0, where=where), 0.0
    )
    grad = jax.grad(lambda s: jaxkd.dist_loss(s, teacher, temperature=2.0, where=where))(student)
    chex.assert_tree_all_finite(grad)


# 3. Gradients.


_SCALAR_LOSSES = {
    "cross_entropy": lambda s, t, y, w: jnp.sum(w * jaxkd.cross_entropy_with_integer_labels(s, y)),
    "hinton": lambda s, t, y, w: jnp.sum(
        w * jaxkd.hinton_loss(s, t, y, alpha=0.6, temperature=2.5)
    ),
    "dkd": lambda s, t, y, w: jnp.sum(w * jaxkd.dkd_loss(s, t, y, alpha=0.7, beta=3.0)),
    "dist": lambda s, t, y, w: jaxkd.dist_loss(s, t, beta=1.0, gamma=2.0, temperature=1.5),
}


@pytest.mark.parametrize("name", list(_SCALAR_LOSSES))
def test_gradients_match_finite_differences(name):
    with jax.enable_x64(True):
        student, teacher, labels = _triple(18, (4, 7), dtype=np.float64)
        weights = jnp.asarray(ref.random_logits(19, (4,), dtype=np.float64))
        loss = _SCALAR_LOSSES[name]
        check_grads(
            lambda s, t: loss(s, t, labels, weights),
            (jnp.asarray(student), jnp.asarray(teacher)),
            order=1,
            modes=["rev"],
            atol=1e-5,
            rtol=1e-5,
        )


def test_tckd_gradient_is_temperature_times_target_probability_gap():
    # TCKD depends on the student only through b_s = (p_y, 1 - p_y), and d p_y / d z_j =
    # p_y (delta_jy - p_j) / T, so d TCKD / d z_j = T (p_s,y - p_t,y) for j = y and
    # -T (p_s,y - p_t,y) p_s,j / (1 - p_s,y) for the other classes.
    student, teacher, labels = _triple(20, (4, 7))
    temperature = 3.0
    grad = jax.grad(
        lambda s: jnp.sum(
            jaxkd.dkd_loss(s, teacher, labels, alpha=1.0, beta=0.0, temperature=temperature)
        )
    )(student)
    p_s = ref.softmax(student, temperature)
    p_t = ref.softmax(teacher, temperature)
    rows = np.arange(4)
    gap = temperature * (p_s[rows, labels] - p_t[rows, labels])[:, None]
    is_target = np.arange(7) == labels[:, None]
    want = np.where(is_target, gap, -gap * p_s / (1.0 - p_s[rows, labels][:, None]))
    np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-6)


# 4. Masks, axes and transformations.


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_per_example_mask_equals_slicing(case):
    # Token-level logits [B, T, V] with a per-token mask [B, T] give [B, T] values: the
    # kept tokens' values computed alone, exact zeros elsewhere, and `masked_mean` of them
    # is the mean over the kept tokens. Padding tokens may carry any label (here -100).
    student, teacher, labels = _triple(21, (2, 3, 7))
    where = ref.TOKEN_WHERE
    padded_labels = np.where(where, labels, -100).astype(np.int32)
    values = case.loss(student, teacher, padded_labels, temperature=2.0, where=where)
    assert values.shape == where.shape
    kept = case.loss(student[where], teacher[where], labels[where], temperature=2.0)
    np.testing.assert_allclose(values[where], kept, rtol=1e-6)
    np.testing.assert_array_equal(values[~where], 0.0)
    np.testing.assert_allclose(jaxkd.masked_mean(values, where), np.mean(kept), rtol=1e-6)


def _slice_classes(student, teacher, labels, keep):
    """Drops the classes where ``keep`` is False and renumbers the labels."""
    new_index = np.cumsum(keep) - 1
    return student[..., keep], teacher[..., keep], new_index[labels].astype(np.int32)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_per_class_mask_equals_slicing(case):
    student, teacher, _ = _triple(22, (4, 7))
    keep = np.array([True, False, True, True, False, True, True])
    labels = np.array([0, 3, 6, 2], np.int32)  # all on kept classes
    where = np.broadcast_to(keep, student.shape)
    got = case.loss(student, teacher, labels, temperature=2.0, where=where)
    want = case.loss(*_slice_classes(student, teacher, labels, keep), temperature=2.0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_neg_inf_padding_equals_slicing(case):
    student, teacher, _ = _triple(23, (4, 7))
    keep = np.array([True, True, False, True, True, True, False])
    labels = np.array([0, 5, 3, 1], np.int32)
    padded_student = np.where(keep, student, -np.inf).astype(np.float32)
    padded_teacher = np.where(keep, teacher, -np.inf).astype(np.float32)
    got = case.loss(padded_student, padded_teacher, labels, temperature=2.0)
    want = case.loss(*_slice_classes(student, teacher, labels, keep), temperature=2.0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    chex.assert_tree_all_finite(_grads(case, padded_student, padded_teacher, labels, None))


def _grads(case, student, teacher, labels, where):
    def total(s, t):
        return jnp.sum(case.loss(s, t, labels, temperature=2.0, where=where))

    return jax.grad(total, argnums=(0, 1))(student, teacher)


@pytest.mark.parametrize("mask_kind", ["per_example", "per_class"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fully_masked_row_gives_zero_with_finite_gradient(case, mask_kind):
    student, teacher, labels = _triple(25, (4, 7))
    if mask_kind == "per_example":
        where = np.array([True, False, True, True])
    else:
        where = np.ones((4, 7), bool)
        where[1] = False
    values = case.loss(student, teacher, labels, temperature=2.0, where=where)
    np.testing.assert_array_equal(values[1], 0.0)
    # The other rows do not see the mask: examples are independent.
    kept = np.array([True, False, True, True])
    unmasked = case.loss(student, teacher, labels, temperature=2.0)
    np.testing.assert_allclose(values[kept], unmasked[kept], rtol=1e-6)
    grads = _grads(case, student, teacher, labels, where)
    chex.assert_tree_all_finite(grads)
    for grad in grads:
        np.testing.assert_array_equal(grad[1], 0.0)


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_axis_equals_moveaxis(case, axis):
    student, teacher, labels = _triple(26, (2, 3, 7))
    got = case.loss(
        np.moveaxis(student, -1, axis),
        np.moveaxis(teacher, -1, axis),
        labels,
        temperature=2.0,
        axis=axis,
    )
    want = case.loss(student, teacher, labels, temperature=2.0)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_jit_vmap_and_grad_agree_with_eager(case):
    student, teacher, labels = _triple(27, (4, 7))

    def values_and_grads(s, t, y):
        def total(s, t):
            return jnp.sum(case.loss(s, t, y, temperature=2.0))

        return case.loss(s, t, y, temperature=2.0), jax.grad(total, argnums=(0, 1))(s, t)

    eager = values_and_grads(student, teacher, labels)
    chex.assert_trees_all_close(
        jax.jit(values_and_grads)(student, teacher, labels), eager, rtol=1e-5, atol=1e-7
    )
    mapped = jax.vmap(lambda s, t, y: case.loss(s, t, y, temperature=2.0))(student, teacher, labels)
    chex.assert_trees_all_close(mapped, eager[0], rtol=1e-6, atol=1e-7)


def test_dist_loss_jit_and_grad_agree_with_eager():
    student = ref.random_logits(28, (4, 7))
    teacher = ref.random_logits(29, (4, 7))
    where = np.array([True, True, False, True])

    def value_and_grad(s, t):
        return jax.value_and_grad(lambda s: jaxkd.dist_loss(s, t, temperature=2.0, where=where))(s)

    chex.assert_trees_all_close(
        jax.jit(value_and_grad)(student, teacher),
        value_and_grad(student, teacher),
        rtol=1e-5,
        atol=1e-7,
    )


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bfloat16_inputs_give_float32_close_to_float32(case):
    student, teacher, labels = _triple(30, (4, 7))
    high = np.asarray(case.loss(student, teacher, labels, temperature=2.0))
    low = case.loss(
        jnp.asarray(student, jnp.bfloat16),
        jnp.asarray(teacher, jnp.bfloat16),
        labels,
        temperature=2.0,
    )
    assert low.dtype == jnp.float32
    chex.assert_tree_all_finite(low)
    np.testing.assert_allclose(low, high, rtol=0.05, atol=0.05 * np.max(np.abs(high)))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_extreme_logits_give_finite_values_and_gradients(case):
    student = ref.extreme_logits(31)
    teacher = ref.extreme_logits(32)
    teacher[-1] = student[-1]
    labels = _labels(33, (4,), 7)
    values = case.loss(student, teacher, labels, temperature=2.0)
    chex.assert_tree_all_finite(values)
    assert np.all(np.asarray(values) >= 0)
    chex.assert_tree_all_finite(_grads(case, student, teacher, labels, None))


def test_dist_loss_extreme_logits_and_bfloat16():
    student = ref.extreme_logits(34)
    teacher = ref.extreme_logits(35)
    value, grad = jax.value_and_grad(jaxkd.dist_loss)(student, teacher)
    chex.assert_tree_all_finite((value, grad))
    student = ref.random_logits(36, (4, 7))
    teacher = ref.random_logits(37, (4, 7))
    low = jaxkd.dist_loss(jnp.asarray(student, jnp.bfloat16), jnp.asarray(teacher, jnp.bfloat16))
    assert low.dtype == jnp.float32
    np.testing.assert_allclose(low, jaxkd.dist_loss(student, teacher), rtol=0.05, atol=0.05)


# 5. Properties over random shapes, temperatures and weights.


_PROPERTY_LOSSES = {
    "hinton": jax.jit(jaxkd.hinton_loss),
    "dkd": jax.jit(functools.partial(jaxkd.dkd_loss, beta=8.0)),
    "dist": jax.jit(jaxkd.dist_loss),
}


# Nearly every example has a new shape, hence a new compilation: 15 examples still
# draw each loss about 5 times.
@settings(max_examples=15, deadline=None)
@given(
    name=st.sampled_from(sorted(_PROPERTY_LOSSES)),
    batch=st.integers(1, 5),
    classes=st.integers(2, 12),
    seed=st.integers(0, 2**31),
    temperature=st.floats(0.5, 10.0),
    alpha=st.floats(0.0, 1.0),
)
def test_property_losses_match_reference_and_are_nonnegative(
    name, batch, classes, seed, temperature, alpha
):
    student, teacher, labels = _triple(seed, (batch, classes))
    loss = _PROPERTY_LOSSES[name]
    atol = 1e-6 * temperature**2
    if name == "hinton":
        got = loss(student, teacher, labels, alpha=alpha, temperature=temperature)
        want = hinton_reference(student, teacher, labels, temperature, alpha)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol)
    elif name == "dkd":
        got = loss(student, teacher, labels, alpha=alpha, temperature=temperature)
        want = dkd_reference(student, teacher, labels, temperature, alpha, 8.0)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=8 * atol)
        at_equality = loss(teacher, teacher, labels, alpha=alpha, temperature=temperature)
        np.testing.assert_allclose(at_equality, 0.0, atol=8 * atol)
    else:
        got = loss(student, teacher, temperature=temperature)
        want = dist_reference(student, teacher, temperature)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=100 * atol)
        # At equality each correlation is 1 up to the 1e-8 added to the product of norms,
        # which matters for classes whose probability barely varies across the batch.
        at_equality = loss(teacher, teacher, temperature=temperature)
        want = dist_reference(teacher, teacher, temperature)
        np.testing.assert_allclose(at_equality, want, rtol=1e-4, atol=100 * atol)
    assert np.all(np.asarray(got) >= -8 * atol)


@pytest.mark.parametrize("loss", ["cross_entropy", "hinton", "dkd"])
def test_labelled_losses_take_broadcastable_masks(loss):
    rng = np.random.default_rng(7)
    student = rng.normal(size=(2, 3, 4)).astype(np.float32)
    teacher = rng.normal(size=(2, 3, 4)).astype(np.float32)
    labels = rng.integers(0, 4, size=(2, 3)).astype(np.int32)
    mask = np.array([[True, False, True], [False, True, True]])
    labels = np.where(mask, labels, -100)  # padding labels on masked tokens
    fns = {
        "cross_entropy": lambda w: jaxkd.cross_entropy_with_integer_labels(
            student, labels, where=w
        ),
        "hinton": lambda w: jaxkd.hinton_loss(
            student, teacher, labels, alpha=0.5, temperature=2.0, where=w
        ),
        "dkd": lambda w: jaxkd.dkd_loss(student, teacher, labels, where=w),
    }
    per_token = fns[loss](mask)
    np.testing.assert_array_equal(fns[loss](mask[..., None]), per_token)
    np.testing.assert_array_equal(per_token[~mask], 0.0)
    assert np.isfinite(per_token).all()
