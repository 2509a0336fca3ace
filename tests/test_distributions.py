"""Numerical tests of the softened distributions in ``jaxkd.losses._distributions``.

References (float64 numpy, in ``_reference.py`` and below):

* ``softmax`` / ``log_softmax``: Hinton, Vinyals and Dean, "Distilling the Knowledge in a
  Neural Network", 2015: ``p_i = exp(z_i / T) / sum_j exp(z_j / T)``.
* ``entropy``: Shannon entropy in nats, ``H(p) = -sum_i p_i log p_i``, ``0 log 0 = 0``.
* ``standardize_logits``: Sun, Ren, Li, Wang and Cao, "Logit Standardization in Knowledge
  Distillation", CVPR 2024: ``Z(z) = (z - mean(z)) / (std(z) + eps)`` per row, with
  ``std(z) = sqrt(sum((z - mean(z))**2) / (n - ddof))`` over the ``n`` kept classes.
  ``ddof=1`` (the default) is the Bessel-corrected sample standard deviation of the
  authors' PyTorch code (``Tensor.std``); ``ddof=0`` the population standard deviation,
  with which each row has mean 0 and standard deviation 1. The two differ by the factor
  ``sqrt((n - 1) / n)``, the same as a slightly different base temperature.
"""

import _reference as ref
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import jaxkd

EPSILON = 1e-7  # standardize_logits' default epsilon


def standardize_reference(
    logits, epsilon: float = EPSILON, axis: int = -1, ddof: int = 1
) -> np.ndarray:
    """Sun et al. (2024), the Z-score: ``(z - mean) / (std + eps)`` along ``axis``."""
    z = np.asarray(logits, np.float64)
    n = z.shape[axis]
    mean = np.sum(z, axis=axis, keepdims=True) / n
    std = np.sqrt(np.sum((z - mean) ** 2, axis=axis, keepdims=True) / (n - ddof))
    return (z - mean) / (std + epsilon)


# Reference agreement.


@pytest.mark.parametrize("temperature", ref.TEMPERATURES)
@pytest.mark.parametrize("shape", ref.SHAPES, ids=str)
def test_softmax_matches_reference(shape, temperature):
    logits = ref.random_logits(0, shape)
    got = jaxkd.softmax(logits, temperature=temperature)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, ref.softmax(logits, temperature), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("temperature", ref.TEMPERATURES)
@pytest.mark.parametrize("shape", ref.SHAPES, ids=str)
def test_log_softmax_matches_reference(shape, temperature):
    logits = ref.random_logits(1, shape)
    got = jaxkd.log_softmax(logits, temperature=temperature)
    np.testing.assert_allclose(got, ref.log_softmax(logits, temperature), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", ref.TEMPERATURES)
@pytest.mark.parametrize("shape", ref.SHAPES, ids=str)
def test_entropy_matches_reference(shape, temperature):
    logits = ref.random_logits(2, shape)
    got = jaxkd.entropy(logits, temperature=temperature)
    assert got.shape == shape[:-1]
    want = ref.entropy(ref.softmax(logits, temperature))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ddof", [0, 1])
@pytest.mark.parametrize("shape", ref.SHAPES, ids=str)
def test_standardize_logits_matches_reference(shape, ddof):
    logits = ref.random_logits(3, shape) + 5.0
    got = jaxkd.standardize_logits(logits, ddof=ddof)
    want = standardize_reference(logits, ddof=ddof)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_standardize_logits_default_is_the_sample_std_of_the_authors_code():
    # torch.Tensor.std is Bessel-corrected, numpy's std(ddof=1).
    logits = ref.random_logits(4, (4, 7)).astype(np.float64)
    centered = logits - logits.mean(-1, keepdims=True)
    want = centered / (np.std(logits, axis=-1, ddof=1, keepdims=True) + EPSILON)
    np.testing.assert_allclose(jaxkd.standardize_logits(logits), want, rtol=1e-5, atol=1e-6)
    population = jaxkd.standardize_logits(logits, ddof=0)
    np.testing.assert_allclose(
        jaxkd.standardize_logits(logits), np.sqrt(6 / 7) * population, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("epsilon", [1e-7, 0.5])
def test_standardize_logits_epsilon_is_added_to_the_std(epsilon):
    logits = ref.random_logits(4, (4, 7))
    got = jaxkd.standardize_logits(logits, epsilon=epsilon)
    np.testing.assert_allclose(got, standardize_reference(logits, epsilon), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ddof", [0, 1, 2])
def test_standardize_logits_with_masks_and_too_few_classes(ddof):
    # Each row keeps a different number n of classes (by where and by -inf): rows with
    # n > ddof match the reference on the kept classes; rows with n <= ddof (no defined
    # spread) give 0 there, finite values and finite gradients, never NaN or inf.
    logits = ref.random_logits(26, (5, 6))
    kept_counts = [6, 4, 3, 2, 1]
    where = np.arange(6) < np.array(kept_counts)[:, None]
    logits[2, 2] = -np.inf  # one kept class of row 2 is -inf: n = 2 there
    got = np.asarray(jaxkd.standardize_logits(logits, where=where, ddof=ddof))
    for row, kept in enumerate(where & np.isfinite(logits)):
        n = int(kept.sum())
        if n > ddof:
            want = standardize_reference(logits[row, kept], ddof=ddof)
            np.testing.assert_allclose(got[row, kept], want, rtol=1e-5, atol=1e-5)
        else:
            np.testing.assert_array_equal(got[row, kept], 0.0)
        np.testing.assert_array_equal(got[row, ~kept], logits[row, ~kept])
    weights = ref.random_logits(27, (5, 6))
    grad = jax.grad(
        lambda z: jnp.sum(weights * jaxkd.standardize_logits(z, where=where, ddof=ddof))
    )(logits)
    chex.assert_tree_all_finite(grad)


@pytest.mark.parametrize("ddof", [-1, 1.0, True, None])
def test_standardize_logits_refuses_a_bad_ddof(ddof):
    with pytest.raises(ValueError, match="`ddof` must be a non-negative int"):
        jaxkd.standardize_logits(np.zeros((2, 3), np.float32), ddof=ddof)


# Identities.


@pytest.mark.parametrize("temperature", ref.TEMPERATURES)
def test_softmax_is_a_distribution_invariant_to_row_shift(temperature):
    logits = ref.random_logits(5, (4, 7))
    shift = ref.random_logits(6, (4, 1), scale=10.0)
    probs = jaxkd.softmax(logits, temperature=temperature)
    assert np.all(np.asarray(probs) >= 0)
    np.testing.assert_allclose(np.sum(probs, axis=-1), 1.0, rtol=1e-6)
    shifted = jaxkd.softmax(logits + shift, temperature=temperature)
    np.testing.assert_allclose(shifted, probs, rtol=1e-4, atol=1e-7)


def test_log_softmax_is_log_of_softmax():
    logits = ref.random_logits(7, (4, 7))
    np.testing.assert_allclose(
        jnp.exp(jaxkd.log_softmax(logits, temperature=2.0)),
        jaxkd.softmax(logits, temperature=2.0),
        rtol=1e-6,
    )


@pytest.mark.parametrize("temperature", ref.TEMPERATURES)
def test_entropy_lies_between_zero_and_log_num_classes(temperature):
    logits = ref.random_logits(8, (4, 7))
    values = np.asarray(jaxkd.entropy(logits, temperature=temperature))
    assert np.all(values >= 0)
    assert np.all(values <= np.log(7) + 1e-6)
    uniform = jaxkd.entropy(np.zeros((4, 7), np.float32), temperature=temperature)
    np.testing.assert_allclose(uniform, np.log(7), rtol=1e-6)
    one_hot = ref.one_hot_logits([0, 6, 2, 2])
    one_hot[3, 0] = -np.inf
    np.testing.assert_array_equal(jaxkd.entropy(one_hot), 0.0)


def test_entropy_grows_with_temperature():
    logits = ref.random_logits(9, (4, 7))
    values = [np.asarray(jaxkd.entropy(logits, temperature=t)) for t in ref.TEMPERATURES]
    assert np.all(np.diff(np.stack(values), axis=0) > 0)


@pytest.mark.parametrize("ddof", [0, 1])
@pytest.mark.parametrize("shape", ref.SHAPES, ids=str)
def test_standardized_rows_have_zero_mean_and_unit_std(shape, ddof):
    logits = 7.0 * ref.random_logits(10, shape) - 3.0
    got = np.asarray(jaxkd.standardize_logits(logits, ddof=ddof), np.float64)
    np.testing.assert_allclose(np.mean(got, axis=-1), 0.0, atol=1e-6)
    np.testing.assert_allclose(np.std(got, axis=-1, ddof=ddof), 1.0, rtol=1e-5)


def test_standardize_logits_is_invariant_to_row_shift_and_positive_scale():
    logits = ref.random_logits(11, (4, 7))
    shift = ref.random_logits(12, (4, 1), scale=5.0)
    scale = np.exp(ref.random_logits(13, (4, 1), scale=1.0))
    base = jaxkd.standardize_logits(logits)
    transformed = jaxkd.standardize_logits(scale * logits + shift)
    np.testing.assert_allclose(transformed, base, rtol=1e-4, atol=1e-5)
    # A negative scale flips the sign: the ordering of the classes is what is kept.
    np.testing.assert_allclose(jaxkd.standardize_logits(-logits), -base, rtol=1e-5, atol=1e-6)


def test_standardize_logits_constant_row_gives_zeros_and_finite_gradient():
    logits = ref.random_logits(24, (4, 7))
    logits[0] = 2.0
    got = jaxkd.standardize_logits(logits)
    np.testing.assert_array_equal(got[0], 0.0)
    weights = ref.random_logits(25, (4, 7))
    grad = jax.grad(lambda z: jnp.sum(weights * jaxkd.standardize_logits(z)))(logits)
    chex.assert_tree_all_finite(grad)


# Masks: masking equals slicing.


def test_per_class_mask_equals_slicing():
    logits = ref.random_logits(14, (4, 7))
    keep = np.array([True, False, True, True, False, True, True])
    where = np.broadcast_to(keep, logits.shape)
    sliced = logits[:, keep]
    for temperature in (1.0, 3.0):
        probs = jaxkd.softmax(logits, temperature=temperature, where=where)
        np.testing.assert_allclose(
            probs[:, keep], jaxkd.softmax(sliced, temperature=temperature), rtol=1e-6
        )
        np.testing.assert_array_equal(probs[:, ~keep], 0.0)
        log_probs = jaxkd.log_softmax(logits, temperature=temperature, where=where)
        np.testing.assert_allclose(
            log_probs[:, keep], jaxkd.log_softmax(sliced, temperature=temperature), rtol=1e-6
        )
        np.testing.assert_array_equal(log_probs[:, ~keep], -np.inf)
        np.testing.assert_allclose(
            jaxkd.entropy(logits, temperature=temperature, where=where),
            jaxkd.entropy(sliced, temperature=temperature),
            rtol=1e-6,
        )
    standardized = jaxkd.standardize_logits(logits, where=where)
    np.testing.assert_allclose(
        standardized[:, keep], jaxkd.standardize_logits(sliced), rtol=1e-5, atol=1e-6
    )
    # Masked entries come back unchanged, so a later `where` still excludes them.
    np.testing.assert_array_equal(standardized[:, ~keep], logits[:, ~keep])


def test_per_example_mask_equals_slicing():
    logits = ref.random_logits(15, (2, 3, 7))
    where = ref.TOKEN_WHERE
    probs = jaxkd.softmax(logits, temperature=2.0, where=where)
    np.testing.assert_allclose(
        probs[where], jaxkd.softmax(logits[where], temperature=2.0), rtol=1e-6
    )
    np.testing.assert_array_equal(probs[~where], 0.0)
    np.testing.assert_array_equal(jaxkd.log_softmax(logits, where=where)[~where], -np.inf)
    values = jaxkd.entropy(logits, temperature=2.0, where=where)
    assert values.shape == where.shape
    np.testing.assert_allclose(
        values[where], jaxkd.entropy(logits[where], temperature=2.0), rtol=1e-6
    )
    np.testing.assert_array_equal(values[~where], 0.0)


@pytest.mark.parametrize(
    "function",
    [jaxkd.softmax, jaxkd.log_softmax, jaxkd.entropy, jaxkd.standardize_logits],
    ids=lambda f: f.__name__,
)
def test_broadcast_masks_equal_their_full_shape(function):
    # [B, L, 1] == [B, L] (per token) == the [B, L, V] broadcast; [1, 1, V] == its
    # broadcast (per class): the same values and gradients.
    logits = ref.random_logits(28, (2, 3, 7))
    token = ref.TOKEN_WHERE
    keep = np.array([True, False, True, True, False, True, True])
    weights = ref.random_logits(29, function(logits).shape)

    def value_and_grad(where):
        def total(z):
            values = function(z, where=where)
            return jnp.sum(jnp.where(jnp.isfinite(values), weights * values, 0.0))

        return function(logits, where=where), jax.grad(total)(logits)

    for masks in (
        (token[..., None], token, np.broadcast_to(token[..., None], logits.shape)),
        (keep[None, None], np.broadcast_to(keep, logits.shape)),
    ):
        first = value_and_grad(masks[0])
        for mask in masks[1:]:
            chex.assert_trees_all_equal(value_and_grad(mask), first)


def test_neg_inf_logits_equal_slicing():
    logits = ref.random_logits(16, (4, 7))
    keep = np.array([True, True, False, True, True, True, False])
    padded = np.where(keep, logits, -np.inf).astype(np.float32)
    sliced = logits[:, keep]
    probs = jaxkd.softmax(padded, temperature=2.0)
    np.testing.assert_allclose(probs[:, keep], jaxkd.softmax(sliced, temperature=2.0), rtol=1e-6)
    np.testing.assert_array_equal(probs[:, ~keep], 0.0)
    np.testing.assert_allclose(
        jaxkd.entropy(padded, temperature=2.0),
        jaxkd.entropy(sliced, temperature=2.0),
        rtol=1e-6,
    )
    standardized = jaxkd.standardize_logits(padded)
    np.testing.assert_allclose(
        standardized[:, keep], jaxkd.standardize_logits(sliced), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_array_equal(standardized[:, ~keep], -np.inf)
    grads = jax.grad(lambda z: jnp.sum(jaxkd.entropy(z, temperature=2.0)))(padded)
    chex.assert_tree_all_finite(grads)
    np.testing.assert_array_equal(grads[:, ~keep], 0.0)


@pytest.mark.parametrize("mask_kind", ["per_example", "per_class", "neg_inf"])
def test_fully_masked_row_gives_zero_with_finite_gradient(mask_kind):
    logits = ref.random_logits(17, (4, 7))
    where = None
    if mask_kind == "per_example":
        where = np.array([True, False, True, True])
    elif mask_kind == "per_class":
        where = np.ones((4, 7), bool)
        where[1] = False
    else:
        logits[1] = -np.inf

    probs = jaxkd.softmax(logits, where=where)
    np.testing.assert_array_equal(probs[1], 0.0)
    np.testing.assert_array_equal(jaxkd.log_softmax(logits, where=where)[1], -np.inf)
    np.testing.assert_array_equal(jaxkd.entropy(logits, where=where)[1], 0.0)
    np.testing.assert_allclose(np.sum(probs[0]), 1.0, rtol=1e-6)

    weights = ref.random_logits(25, (4, 7))
    for function in (
        lambda z: jnp.sum(weights * jaxkd.softmax(z, temperature=2.0, where=where)),
        lambda z: jnp.sum(jaxkd.entropy(z, temperature=2.0, where=where)),
        lambda z: jnp.sum(weights * jaxkd.standardize_logits(z, where=where)),
    ):
        chex.assert_tree_all_finite(jax.grad(function)(logits))


@pytest.mark.parametrize(
    "function",
    [jaxkd.softmax, jaxkd.log_softmax, jaxkd.entropy, jaxkd.standardize_logits],
    ids=lambda f: f.__name__,
)
@pytest.mark.parametrize("axis", [0, 1])
def test_axis_equals_moveaxis(function, axis):
    logits = ref.random_logits(18, (2, 3, 7))
    moved = np.moveaxis(logits, -1, axis)
    got = function(moved, axis=axis)
    want = function(logits)
    if got.ndim == logits.ndim:
        got = jnp.moveaxis(got, axis, -1)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "function",
    [jaxkd.softmax, jaxkd.log_softmax, jaxkd.entropy],
    ids=lambda f: f.__name__,
)
def test_jit_vmap_and_grad_agree_with_eager(function):
    logits = ref.random_logits(19, (4, 7))

    def values_and_grad(z):
        def total(z):
            return jnp.sum(jnp.cos(function(z, temperature=2.0)))

        return function(z, temperature=2.0), jax.grad(total)(z)

    eager = values_and_grad(logits)
    chex.assert_trees_all_close(jax.jit(values_and_grad)(logits), eager, rtol=1e-5, atol=1e-6)
    mapped = jax.vmap(lambda z: function(z, temperature=2.0))(logits)
    chex.assert_trees_all_close(mapped, eager[0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "function",
    [jaxkd.softmax, jaxkd.entropy, jaxkd.standardize_logits],
    ids=lambda f: f.__name__,
)
def test_bfloat16_inputs_give_float32_close_to_float32(function):
    logits = ref.random_logits(20, (4, 7))
    low = function(jnp.asarray(logits, jnp.bfloat16))
    assert low.dtype == jnp.float32
    chex.assert_tree_all_finite(low)
    high = function(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_allclose(low, high, rtol=1e-6, atol=1e-7)
    # Against the unrounded float32 logits only the bf16 rounding of the inputs remains.
    np.testing.assert_allclose(low, function(logits), atol=0.05)


@jax.jit
def _entropy_grad(logits, temperature):
    return jax.grad(lambda z: jnp.sum(jaxkd.entropy(z, temperature=temperature)))(logits)


def test_extreme_logits_give_finite_values_and_gradients():
    logits = ref.extreme_logits(0)
    for temperature in (0.5, 1.0, 10.0):
        chex.assert_tree_all_finite(jaxkd.softmax(logits, temperature=temperature))
        chex.assert_tree_all_finite(jaxkd.entropy(logits, temperature=temperature))
        chex.assert_tree_all_finite(_entropy_grad(logits, temperature))
    chex.assert_tree_all_finite(jaxkd.standardize_logits(logits))


def test_large_logits_keep_float32_precision():
    # Two tied maxima: p = 1/2 on classes 0 and 3 and 0 elsewhere, whatever the magnitude.
    # Subtracting the row maximum before the log-sum-exp keeps this exact in float32;
    # adding the maximum back to log(sum) first loses ulp(1e4 / T) of precision.
    logits = np.zeros((4, 7), np.float32)
    logits[:, [0, 3]] = 1e4
    logits[:, 1] = -1e4
    for temperature in (0.5, 1.0, 10.0):
        log_probs = jaxkd.log_softmax(logits, temperature=temperature)
        np.testing.assert_allclose(log_probs[:, [0, 3]], np.log(0.5), rtol=1e-6)
        probs = jaxkd.softmax(logits, temperature=temperature)
        np.testing.assert_allclose(np.sum(probs, axis=-1), 1.0, rtol=1e-6)


# Gradients against finite differences (float64).


def test_gradients_match_finite_differences():
    with jax.enable_x64(True):
        logits = jnp.asarray(ref.random_logits(21, (4, 7), dtype=np.float64))
        weights = jnp.asarray(ref.random_logits(22, (4, 7), dtype=np.float64))

        @jax.jit
        def scalar(z):
            return (
                jnp.sum(weights * jaxkd.log_softmax(z, temperature=1.7))
                + jnp.sum(weights * jaxkd.standardize_logits(z))
                + jnp.sum(jaxkd.entropy(z, temperature=2.5))
            )

        check_grads(scalar, (logits,), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


def test_log_softmax_gradient_is_identity_minus_softmax_over_temperature():
    # d log p_i / d z_j = (delta_ij - p_j) / T
    logits = ref.random_logits(23, (7,))
    temperature = 3.0
    jacobian = jax.jit(jax.jacobian(lambda z: jaxkd.log_softmax(z, temperature=temperature)))(
        logits
    )
    probs = ref.softmax(logits, temperature)
    want = (np.eye(7) - probs[None, :]) / temperature
    np.testing.assert_allclose(jacobian, want, rtol=1e-5, atol=1e-7)


# Properties over random shapes and temperatures.


@st.composite
def _logits(draw):
    """Logits of scale 3 with a random shape [1..5, 2..12]."""
    batch = draw(st.integers(1, 5))
    classes = draw(st.integers(2, 12))
    seed = draw(st.integers(0, 2**32 - 1))
    return ref.random_logits(seed, (batch, classes))


@jax.jit
def _distributions(logits, temperature):
    return (
        jaxkd.softmax(logits, temperature=temperature),
        jaxkd.log_softmax(logits, temperature=temperature),
        jaxkd.entropy(logits, temperature=temperature),
        jaxkd.standardize_logits(logits),
    )


@settings(max_examples=25, deadline=None)
@given(logits=_logits(), temperature=st.floats(0.5, 10.0))
def test_property_distributions_match_reference(logits, temperature):
    probs, log_probs, values, standardized = map(np.asarray, _distributions(logits, temperature))
    np.testing.assert_allclose(probs, ref.softmax(logits, temperature), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(
        log_probs, ref.log_softmax(logits, temperature), rtol=1e-5, atol=1e-6
    )
    assert np.all(values >= 0)
    assert np.all(values <= np.log(logits.shape[-1]) + 1e-6)
    np.testing.assert_allclose(
        values, ref.entropy(ref.softmax(logits, temperature)), rtol=1e-5, atol=1e-6
    )
    # Standardization is as accurate as float32 allows: a few ulps of max|z| / std(z).
    z = logits.astype(np.float64)
    conditioning = np.max(np.abs(z)) / np.min(np.std(z, axis=-1))
    atol = 1e-6 + 16 * np.finfo(np.float32).eps * conditioning
    np.testing.assert_allclose(standardized, standardize_reference(logits), rtol=1e-5, atol=atol)
    np.testing.assert_allclose(standardized.mean(axis=-1), 0.0, atol=atol)
    # The default ddof=1: unit sample standard deviation.
    np.testing.assert_allclose(standardized.std(axis=-1, ddof=1), 1.0, rtol=1e-5, atol=atol)
