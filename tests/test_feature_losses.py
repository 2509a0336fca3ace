"""Numerical tests of the feature losses and the relational losses.

References (float64 numpy, written from each paper's formula with explicit loops over
examples, pairs and triplets; ``huber`` is the smooth L1 loss with delta 1:
``x**2 / 2`` for ``|x| <= 1``, else ``|x| - 1/2``):

* ``hint_loss``: Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015: the mean
  of ``(student - teacher)**2`` over the non-batch axes, one value per example.
* ``attention_transfer_loss``: Zagoruyko and Komodakis, "Paying More Attention to
  Attention", ICLR 2017: ``Q = vec(sum_c |A_c|**p)`` over the ``H * W`` positions and
  ``|| Q_s / |Q_s| - Q_t / |Q_t| ||_2`` per example.
* ``rkd_distance_loss`` and ``rkd_angle_loss``: Park, Kim, Lu and Cho, "Relational
  Knowledge Distillation", CVPR 2019: distances ``|e_i - e_j|`` over the ordered pairs
  ``i != j``, divided by their mean, and cosines of the angle at ``e_j`` between
  ``e_i - e_j`` and ``e_k - e_j`` over the triplets of distinct ``i, j, k``; the mean of
  ``huber(student - teacher)`` over those pairs or triplets.
* ``similarity_preserving_loss``: Tung and Mori, "Similarity-Preserving Knowledge
  Distillation", ICCV 2019, Eq. 1-3: ``G = Q Q^T`` of the flattened features ``Q``,
  each row of ``G`` divided by its L2 norm, and ``|G_s - G_t|_F**2 / B**2``.
* ``pkt_loss``: Passalis and Tefas, "Learning Deep Representations with Probabilistic
  Knowledge Transfer", ECCV 2018: ``K(a, b) = (cos(a, b) + 1) / 2``,
  ``p(j|i) = K(e_i, e_j) / sum_k K(e_i, e_k)`` (the diagonal included) and
  ``mean_i sum_j p_t(j|i) log((p_t(j|i) + eps) / (p_s(j|i) + eps))``.
"""

import itertools
import re
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import (
    attention_transfer_loss,
    hint_loss,
    pkt_loss,
    rkd_angle_loss,
    rkd_distance_loss,
    similarity_preserving_loss,
)

# References, one per formula.


def huber(x):
    x = abs(x)
    return 0.5 * x**2 if x <= 1.0 else x - 0.5


def hint_reference(student, teacher):
    squared = (np.float64(student) - np.float64(teacher)) ** 2
    return np.array([np.mean(example) for example in squared])


def attention_reference(student, teacher, p=2):
    def unit_map(features):  # [H, W, C] -> [H * W]
        energy = np.array(
            [np.sum(np.abs(np.float64(position)) ** p) for row in features for position in row]
        )
        return energy / np.sqrt(np.sum(energy**2))

    return np.array(
        [np.linalg.norm(unit_map(s) - unit_map(t)) for s, t in zip(student, teacher, strict=True)]
    )


def _normalized_distances(embeddings):
    e = np.float64(embeddings)
    pairs = [(i, j) for i in range(len(e)) for j in range(len(e)) if i != j]
    distances = {(i, j): np.sqrt(np.sum((e[i] - e[j]) ** 2)) for i, j in pairs}
    mean = sum(distances.values()) / len(pairs)
    return {pair: distance / mean for pair, distance in distances.items()}


def rkd_distance_reference(student, teacher):
    s, t = _normalized_distances(student), _normalized_distances(teacher)
    return np.mean([huber(s[pair] - t[pair]) for pair in s])


def _cosine(u, v):
    return np.dot(u, v) / (np.sqrt(np.dot(u, u)) * np.sqrt(np.dot(v, v)))


def rkd_angle_reference(student, teacher):
    s, t = np.float64(student), np.float64(teacher)
    errors = [
        huber(_cosine(s[i] - s[j], s[k] - s[j]) - _cosine(t[i] - t[j], t[k] - t[j]))
        for i, j, k in itertools.permutations(range(len(s)), 3)
    ]
    return np.mean(errors)


def similarity_reference(student, teacher):
    def row_normalized_gram(features):
        q = np.float64(features).reshape(len(features), -1)
        gram = q @ q.T
        return gram / np.sqrt(np.sum(gram**2, axis=1, keepdims=True))

    difference = row_normalized_gram(student) - row_normalized_gram(teacher)
    return np.sum(difference**2) / len(student) ** 2


def pkt_reference(student, teacher, eps=1e-7):
    def conditional(embeddings):
        e = np.float64(embeddings)
        kernel = np.array([[(_cosine(a, b) + 1.0) / 2.0 for b in e] for a in e])
        return kernel / np.sum(kernel, axis=1, keepdims=True)

    p_s, p_t = conditional(student), conditional(teacher)
    return np.mean(np.sum(p_t * np.log((p_t + eps) / (p_s + eps)), axis=1))


# One case per loss: the function, its reference and the shapes it is tested on.


def _summed_with_values(function):
    """``(s, t, where) -> (sum of the loss, the loss)``, for ``value_and_grad`` with aux."""

    def total(student, teacher, where=None):
        values = function(student, teacher, where=where)
        return jnp.sum(values), values

    return total


class Case(NamedTuple):
    name: str
    function: object  # (student, teacher, *, where=None) -> [B] or a scalar
    reference: object  # (student, teacher) -> float64 values
    student_shape: tuple
    teacher_shape: tuple
    per_example: bool

    def evaluate(self, student, teacher, where=None):
        """``(values, (grad_student, grad_teacher))`` of the summed loss, jitted.

        Compilation dominates the time of this file, so one compiled function per case
        serves most tests; the gradients are those of the sum over examples.
        """
        (_, values), grads = _EVALUATE[self.name](student, teacher, where)
        return values, grads

    def value(self, student, teacher, where=None):
        """The loss alone, jitted: for shapes used once, where no gradient is needed."""
        return _VALUE[self.name](student, teacher, where=where)


CASES = [
    Case("hint", hint_loss, hint_reference, (4, 3, 3, 5), (4, 3, 3, 5), True),
    Case(
        "attention", attention_transfer_loss, attention_reference, (4, 3, 3, 5), (4, 3, 3, 6), True
    ),
    Case("rkd_distance", rkd_distance_loss, rkd_distance_reference, (5, 6), (5, 4), False),
    Case("rkd_angle", rkd_angle_loss, rkd_angle_reference, (5, 6), (5, 4), False),
    Case(
        "similarity",
        similarity_preserving_loss,
        similarity_reference,
        (4, 3, 3, 5),
        (4, 2, 7),
        False,
    ),
    Case("pkt", pkt_loss, pkt_reference, (5, 6), (5, 4), False),
]
IDS = [case.name for case in CASES]
_EVALUATE = {
    case.name: jax.jit(
        jax.value_and_grad(_summed_with_values(case.function), argnums=(0, 1), has_aux=True)
    )
    for case in CASES
}
_VALUE = {case.name: jax.jit(case.function) for case in CASES}
HINT, ATTENTION, RKD_DISTANCE, RKD_ANGLE, SIMILARITY, PKT = CASES
WHERE = {4: np.array([True, False, True, True]), 5: np.array([True, True, False, True, True])}


def _random(seed, shape, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _pair(case, seed, dtype=np.float32):
    return _random(seed, case.student_shape, dtype), _random(seed + 1, case.teacher_shape, dtype)


def _loss(case, student, teacher, where=None):
    return case.evaluate(student, teacher, where)[0]


# 1. Reference agreement.


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_matches_reference(case):
    student, teacher = _pair(case, 0)
    got = _loss(case, student, teacher)
    assert got.shape == ((case.student_shape[0],) if case.per_example else ())
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, case.reference(student, teacher), rtol=1e-5, atol=1e-6)


_ATTENTION_WITH_STATIC_P = jax.jit(attention_transfer_loss, static_argnames="p")


@pytest.mark.parametrize("p", [1, 2.5])
def test_attention_transfer_matches_reference_for_other_exponents(p):
    student, teacher = _pair(ATTENTION, 1)
    got = _ATTENTION_WITH_STATIC_P(student, teacher, p=p)
    np.testing.assert_allclose(got, attention_reference(student, teacher, p), rtol=1e-5, atol=1e-6)


def test_attention_transfer_traced_exponent_equals_the_integer_one():
    student, teacher = _pair(ATTENTION, 2)
    traced = jax.jit(lambda p: attention_transfer_loss(student, teacher, p=p))(2.0)
    np.testing.assert_allclose(traced, _loss(ATTENTION, student, teacher), rtol=1e-6)


@pytest.mark.parametrize("eps", [1e-3, 1e-7])
def test_pkt_loss_eps_enters_as_in_the_reference(eps):
    student, teacher = _pair(PKT, 3)
    got = jax.jit(pkt_loss)(student, teacher, eps=eps)
    np.testing.assert_allclose(got, pkt_reference(student, teacher, eps), rtol=1e-5, atol=1e-7)


# 2. Identities and invariances.


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_zero_when_student_equals_teacher(case):
    teacher = _random(4, case.teacher_shape)
    np.testing.assert_allclose(_loss(case, teacher, teacher), 0.0, atol=1e-6)
    assert np.all(np.asarray(_loss(case, *_pair(case, 5))) > 0)


def test_rkd_distance_is_invariant_to_scaling_the_student():
    student, teacher = _pair(RKD_DISTANCE, 6)
    want = _loss(RKD_DISTANCE, student, teacher)
    np.testing.assert_allclose(_loss(RKD_DISTANCE, 7.5 * student, teacher), want, rtol=1e-5)
    np.testing.assert_allclose(_loss(RKD_DISTANCE, student, 0.2 * teacher), want, rtol=1e-5)


def test_rkd_angle_is_invariant_to_scale_and_translation():
    student, teacher = _pair(RKD_ANGLE, 7)
    shift = _random(8, (1, student.shape[1]))
    want = _loss(RKD_ANGLE, student, teacher)
    np.testing.assert_allclose(_loss(RKD_ANGLE, 0.3 * student + shift, teacher), want, rtol=1e-5)
    np.testing.assert_allclose(_loss(RKD_ANGLE, student, 4.0 * teacher - 1.0), want, rtol=1e-5)


def test_similarity_preserving_invariances_follow_the_row_normalized_gram_matrix():
    # The paper normalizes the rows of G = Q Q^T, so a global rescaling and an orthogonal
    # map of the flattened features leave the loss unchanged; rescaling one example does
    # not (it rescales one column of every row of G).
    student, teacher = _pair(SIMILARITY, 9)
    want = _loss(SIMILARITY, student, teacher)
    np.testing.assert_allclose(_loss(SIMILARITY, 3.0 * student, teacher), want, rtol=1e-5)
    flat = student.reshape(4, -1)
    rotation, _ = np.linalg.qr(_random(10, (flat.shape[1], flat.shape[1]), np.float64))
    rotated = (flat @ rotation).astype(np.float32).reshape(student.shape)
    np.testing.assert_allclose(_loss(SIMILARITY, rotated, teacher), want, rtol=1e-4)
    per_example = student * np.array([0.5, 1.0, 2.0, 4.0], np.float32)[:, None, None, None]
    assert abs(float(_loss(SIMILARITY, per_example, teacher)) - float(want)) > 1e-3


def test_attention_transfer_is_invariant_to_positive_per_example_scaling_and_channel_order():
    student, teacher = _pair(ATTENTION, 11)
    scales = np.array([0.1, 1.0, 3.0, 20.0], np.float32)[:, None, None, None]
    want = _loss(ATTENTION, student, teacher)
    np.testing.assert_allclose(_loss(ATTENTION, scales * student, teacher), want, rtol=1e-5)
    flipped = -scales * teacher[..., ::-1]  # |A|**p ignores the sign
    np.testing.assert_allclose(_loss(ATTENTION, student, flipped), want, rtol=1e-5)


def test_pkt_loss_is_invariant_to_positive_per_example_scaling():
    student, teacher = _pair(PKT, 12)
    scales = np.array([0.1, 1.0, 3.0, 20.0, 0.5], np.float32)[:, None]
    want = _loss(PKT, student, teacher)
    np.testing.assert_allclose(_loss(PKT, scales * student, teacher), want, rtol=1e-5, atol=1e-7)


def test_hint_loss_is_the_papers_half_squared_distance_times_two_over_n():
    student, teacher = _pair(HINT, 13)
    n = np.prod(student.shape[1:])
    paper = 0.5 * np.sum((np.float64(student) - teacher) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(_loss(HINT, student, teacher), paper * 2.0 / n, rtol=1e-5)


# 3. Masks.


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_where_equals_slicing_and_ignores_nan_padding(case):
    student, teacher = _pair(case, 14)
    where = WHERE[case.student_shape[0]]
    student[~where] = np.nan  # padding may hold anything
    teacher[~where] = np.inf
    values, grads = case.evaluate(student, teacher, where)
    kept = case.value(student[where], teacher[where])
    want = case.reference(student[where], teacher[where])
    if case.per_example:
        np.testing.assert_array_equal(values[~where], 0.0)
        values = values[where]
    np.testing.assert_allclose(values, kept, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(values, want, rtol=1e-5, atol=1e-6)
    chex.assert_tree_all_finite(grads)
    for grad in grads:
        np.testing.assert_array_equal(np.asarray(grad)[~where], 0.0)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fully_masked_batch_gives_zero_with_finite_gradients(case):
    student, teacher = _pair(case, 15)
    values, grads = case.evaluate(student, teacher, np.zeros(case.student_shape[0], bool))
    np.testing.assert_array_equal(values, 0.0)
    chex.assert_tree_all_finite(grads)
    np.testing.assert_array_equal(grads[0], 0.0)
    np.testing.assert_array_equal(grads[1], 0.0)


def test_relational_losses_need_two_or_three_kept_examples():
    student, teacher = _pair(RKD_ANGLE, 16)
    one = np.array([False, False, True, False, False])
    two = np.array([True, False, True, False, False])
    np.testing.assert_array_equal(_loss(RKD_DISTANCE, student, teacher, one), 0.0)
    np.testing.assert_allclose(_loss(RKD_DISTANCE, student, teacher, two), 0.0, atol=1e-6)
    np.testing.assert_array_equal(_loss(RKD_ANGLE, student, teacher, two), 0.0)
    # PKT with one example: p(i|i) = 1 for both models.
    np.testing.assert_allclose(_loss(PKT, student, teacher, one), 0.0, atol=1e-7)


# 4. Gradients.


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradients_match_finite_differences(case):
    # Central differences in float64 along random directions, for both arguments: the
    # derivative of the summed loss along (u, v) is <grad_student, u> + <grad_teacher, v>.
    # One compiled function gives the gradients and every finite-difference value.
    with jax.enable_x64(True):
        student, teacher = _pair(case, 17, np.float64)
        values, grads = case.evaluate(student, teacher)

        def total(s, t):
            return float(np.sum(case.evaluate(s, t)[0]))

        step = 1e-6
        for seed in (30, 31, 32):
            u, v = _pair(case, seed, np.float64)
            slope = np.sum(grads[0] * u) + np.sum(grads[1] * v)
            plus = total(student + step * u, teacher + step * v)
            minus = total(student - step * u, teacher - step * v)
            np.testing.assert_allclose((plus - minus) / (2 * step), slope, rtol=1e-6, atol=1e-8)
        assert values.dtype == jnp.float64


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradients_are_finite_at_coincident_and_zero_inputs(case):
    # Rows 0 and 1 coincide and row 2 is all zeros, in both models; then a student whose
    # examples all coincide; then the student equals the teacher (zero differences).
    student, teacher = _pair(case, 18)
    for array in (student, teacher):
        array[1] = array[0]
        array[2] = 0.0
    for s, t in [(student, teacher), (np.ones_like(student), teacher), (teacher, teacher)]:
        chex.assert_tree_all_finite(case.evaluate(s, t))


# 5. Transformations and precision.


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_jit_vmap_and_grad_agree_with_eager(case):
    student, teacher = _pair(case, 20)
    where = WHERE[case.student_shape[0]]
    total = _summed_with_values(case.function)
    eager = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(student, teacher, where)
    chex.assert_trees_all_close(
        case.evaluate(student, teacher, where), (eager[0][1], eager[1]), rtol=1e-5, atol=1e-6
    )
    stacked = [np.stack([student, 2.0 * student[::-1]]), np.stack([teacher, teacher[::-1]])]
    mapped = jax.jit(jax.vmap(case.function))(*stacked)
    looped = [_loss(case, s, t) for s, t in zip(*stacked, strict=True)]
    chex.assert_trees_all_close(mapped, jnp.stack(looped), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bfloat16_inputs_give_float32_close_to_float32(case):
    student, teacher = _pair(case, 21)
    low_student = jnp.asarray(student, jnp.bfloat16)
    low_teacher = jnp.asarray(teacher, jnp.bfloat16)
    low = case.value(low_student, low_teacher)
    assert low.dtype == jnp.float32
    # Computed in float32 from the rounded inputs, and close to the float32 result.
    exact = case.reference(np.float32(low_student), np.float32(low_teacher))
    np.testing.assert_allclose(low, exact, rtol=1e-4, atol=1e-6)
    high = np.asarray(_loss(case, student, teacher))
    np.testing.assert_allclose(low, high, rtol=0.05, atol=0.05 * np.max(np.abs(high)))


def test_mixed_precision_pair_is_computed_in_float32():
    student, teacher = _pair(RKD_DISTANCE, 22)
    value = jax.jit(rkd_distance_loss)(jnp.asarray(student, jnp.bfloat16), teacher)
    assert value.dtype == jnp.float32


# 6. Bad input: every call is wrong in exactly one way.


F = np.zeros((2, 3, 3, 4), np.float32)
E = np.zeros((4, 3), np.float32)


def _same_shape(student_shape, teacher_shape):
    return re.escape(f"`student_features` {student_shape}, `teacher_features` {teacher_shape}")


def _bad(name, call, error, match):
    return pytest.param(call, error, match, id=name)


BAD_INPUTS = [
    # hint_loss
    _bad(
        "hint-channels",
        lambda: hint_loss(F, F[..., :3]),
        ValueError,
        _same_shape(F.shape, (2, 3, 3, 3)),
    ),
    _bad("hint-batch", lambda: hint_loss(E, E[:1]), ValueError, _same_shape((4, 3), (1, 3))),
    _bad(
        "hint-rank-1",
        lambda: hint_loss(E[:, 0], E[:, 0]),
        ValueError,
        re.escape("`student_features` must be [batch, features, ...], got shape (4,)"),
    ),
    _bad(
        "hint-int-student",
        lambda: hint_loss(E.astype(np.int32), E),
        TypeError,
        re.escape("`student_features` must have a floating dtype, got int32 with shape (4, 3)"),
    ),
    _bad(
        "hint-float-where",
        lambda: hint_loss(E, E, where=np.ones(4, np.float32)),
        TypeError,
        "`where` must be a boolean mask, got dtype float32",
    ),
    _bad(
        "hint-where-shape",
        lambda: hint_loss(E, E, where=np.ones((4, 3), bool)),
        ValueError,
        re.escape("`where` must be a per-example mask of shape (4,), got (4, 3)"),
    ),
    # attention_transfer_loss
    _bad(
        "attention-rank-3",
        lambda: attention_transfer_loss(F[..., 0], F),
        ValueError,
        re.escape(
            "`student_features` must be [batch, height, width, channels], got shape (2, 3, 3)"
        ),
    ),
    _bad(
        "attention-height",
        lambda: attention_transfer_loss(F, F[:, :2]),
        ValueError,
        re.escape(
            "`student_features` (2, 3, 3, 4) and `teacher_features` (2, 2, 3, 4) must agree "
            "on [batch, height, width]"
        ),
    ),
    _bad(
        "attention-batch",
        lambda: attention_transfer_loss(F, F[:1]),
        ValueError,
        re.escape("`student_features` (2, 3, 3, 4) and `teacher_features` (1, 3, 3, 4) must have"),
    ),
    _bad(
        "attention-int-teacher",
        lambda: attention_transfer_loss(F, F.astype(np.int8)),
        TypeError,
        re.escape(
            "`teacher_features` must have a floating dtype, got int8 with shape (2, 3, 3, 4)"
        ),
    ),
    _bad(
        "attention-p-zero",
        lambda: attention_transfer_loss(F, F, p=0.0),
        ValueError,
        r"`p` must be a positive finite number, got 0\.0",
    ),
    _bad(
        "attention-p-vector",
        lambda: attention_transfer_loss(F, F, p=np.ones(2)),
        ValueError,
        re.escape("`p` must be a scalar, got shape (2,)"),
    ),
    _bad(
        "attention-where-shape",
        lambda: attention_transfer_loss(F, F, where=np.ones(3, bool)),
        ValueError,
        re.escape("`where` must be a per-example mask of shape (2,), got (3,)"),
    ),
    # rkd_distance_loss and rkd_angle_loss
    _bad(
        "rkd_distance-batch",
        lambda: rkd_distance_loss(E, E[:3]),
        ValueError,
        re.escape("`student_embeddings` (4, 3) and `teacher_embeddings` (3, 3) must have the same"),
    ),
    _bad(
        "rkd_distance-rank-3",
        lambda: rkd_distance_loss(E, E[..., None]),
        ValueError,
        re.escape("`teacher_embeddings` must be [batch, features], got shape (4, 3, 1)"),
    ),
    _bad(
        "rkd_angle-rank-1",
        lambda: rkd_angle_loss(E[0], E[0]),
        ValueError,
        re.escape("`student_embeddings` must be [batch, features], got shape (3,)"),
    ),
    _bad(
        "rkd_angle-bool-student",
        lambda: rkd_angle_loss(E.astype(bool), E),
        TypeError,
        re.escape("`student_embeddings` must have a floating dtype, got bool with shape (4, 3)"),
    ),
    _bad(
        "rkd_angle-int-where",
        lambda: rkd_angle_loss(E, E, where=np.ones(4, np.int32)),
        TypeError,
        "`where` must be a boolean mask, got dtype int32",
    ),
    # similarity_preserving_loss
    _bad(
        "similarity-batch",
        lambda: similarity_preserving_loss(F, E),
        ValueError,
        re.escape("`student_features` (2, 3, 3, 4) and `teacher_features` (4, 3) must have the"),
    ),
    _bad(
        "similarity-rank-1",
        lambda: similarity_preserving_loss(E, E[:, 0]),
        ValueError,
        re.escape("`teacher_features` must be [batch, features, ...], got shape (4,)"),
    ),
    _bad(
        "similarity-int-student",
        lambda: similarity_preserving_loss(E.astype(np.int32), E),
        TypeError,
        re.escape("`student_features` must have a floating dtype, got int32 with shape (4, 3)"),
    ),
    # pkt_loss
    _bad(
        "pkt-batch",
        lambda: pkt_loss(E, E[:2]),
        ValueError,
        re.escape("`student_embeddings` (4, 3) and `teacher_embeddings` (2, 3) must have the same"),
    ),
    _bad(
        "pkt-eps-zero",
        lambda: pkt_loss(E, E, eps=0.0),
        ValueError,
        r"`eps` must be a positive finite number, got 0\.0",
    ),
    _bad(
        "pkt-eps-negative",
        lambda: pkt_loss(E, E, eps=-1e-7),
        ValueError,
        r"`eps` must be a positive finite number, got -1e-07",
    ),
    _bad(
        "pkt-int-teacher",
        lambda: pkt_loss(E, E.astype(np.int32)),
        TypeError,
        re.escape("`teacher_embeddings` must have a floating dtype, got int32 with shape (4, 3)"),
    ),
]


@pytest.mark.parametrize("call, error, match", BAD_INPUTS)
def test_bad_input_raises_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_errors_are_raised_at_trace_time_under_jit():
    with pytest.raises(ValueError, match="must have the same batch size"):
        jax.jit(rkd_angle_loss)(E, E[:3])
