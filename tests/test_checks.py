"""Bad input fails at trace time with an error that names the argument and the shapes.

One table: every call below is wrong in exactly one way, and must raise the given
exception with a message matching ``match`` (the argument's name and the offending
shapes or values). The last tests list inputs that look unusual but are valid: traced
temperatures and weights (schedules under ``jit``), and padding labels on masked examples.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxkd

STUDENT = np.zeros((2, 3), np.float32)
TEACHER = np.ones((2, 3), np.float32)
LABELS = np.array([0, 2], np.int32)


def _kl(**kwargs):
    return lambda: jaxkd.kl_divergence(STUDENT, TEACHER, **kwargs)


def _hinton(student=STUDENT, teacher=TEACHER, labels=LABELS, **kwargs):
    options = dict(alpha=0.5, temperature=2.0) | kwargs
    return lambda: jaxkd.hinton_loss(student, teacher, labels, **options)


def _traced_beta(beta):
    return jax.jit(lambda beta: jaxkd.generalized_jsd(STUDENT, TEACHER, beta=beta))(beta)


def test_a_traced_beta_equals_the_static_one_and_is_nan_outside_the_unit_interval():
    for beta in (0.0, 0.3, 1.0):
        np.testing.assert_allclose(
            _traced_beta(beta), jaxkd.generalized_jsd(STUDENT, TEACHER, beta=beta), rtol=1e-6
        )
    assert np.all(np.isnan(_traced_beta(-0.5)))


def _shape_mismatch(student_shape, teacher_shape):
    return re.escape(f"`student_logits` {student_shape}, `teacher_logits` {teacher_shape}")


# Every pair loss refuses logits of different shapes, broadcastable or not.
PAIR_LOSSES = {
    "kl_divergence": jaxkd.kl_divergence,
    "reverse_kl_divergence": jaxkd.reverse_kl_divergence,
    "soft_cross_entropy": jaxkd.soft_cross_entropy,
    "generalized_jsd": jaxkd.generalized_jsd,
    "skew_kl_divergence": jaxkd.skew_kl_divergence,
    "skew_reverse_kl_divergence": jaxkd.skew_reverse_kl_divergence,
    "total_variation": jaxkd.total_variation,
    "logit_mse": jaxkd.logit_mse,
    "dist_loss": jaxkd.dist_loss,
    "hinton_loss": lambda s, t: jaxkd.hinton_loss(s, t, LABELS, alpha=0.5, temperature=1.0),
    "dkd_loss": lambda s, t: jaxkd.dkd_loss(s, t, LABELS),
}
SHAPE_CASES = [
    pytest.param(
        lambda f=f, shape=shape: f(STUDENT, np.zeros(shape, np.float32)),
        ValueError,
        _shape_mismatch((2, 3), shape),
        id=f"{name}-teacher-" + "x".join(map(str, shape)),
    )
    for name, f in PAIR_LOSSES.items()
    for shape in [(2, 4), (1, 3)]
]

TEMPERATURE_CASES = [
    pytest.param(
        call(temperature),
        ValueError,
        match,
        id=f"{name}-temperature={temperature!r}",
    )
    for name, call in {
        "softmax": lambda t: lambda: jaxkd.softmax(STUDENT, temperature=t),
        "kl_divergence": lambda t: _kl(temperature=t),
        "hinton_loss": lambda t: _hinton(temperature=t),
        "dkd_loss": lambda t: lambda: jaxkd.dkd_loss(STUDENT, TEACHER, LABELS, temperature=t),
        "dist_loss": lambda t: lambda: jaxkd.dist_loss(STUDENT, TEACHER, temperature=t),
    }.items()
    for temperature, match in [
        (0.0, r"`temperature` must be a positive finite number, got 0\.0"),
        (-1.0, r"`temperature` must be a positive finite number, got -1\.0"),
        (float("inf"), r"`temperature` must be a positive finite number, got inf"),
        (float("nan"), r"`temperature` must be a positive finite number, got nan"),
    ]
] + [
    pytest.param(
        _kl(temperature=jnp.ones(2)),
        ValueError,
        re.escape("`temperature` must be a scalar, got shape (2,)"),
        id="kl_divergence-temperature-vector",
    ),
    pytest.param(
        lambda: jaxkd.log_softmax(STUDENT, temperature=np.ones((1, 1))),
        ValueError,
        re.escape("`temperature` must be a scalar, got shape (1, 1)"),
        id="log_softmax-temperature-matrix",
    ),
]

DTYPE_CASES = [
    pytest.param(
        lambda: jaxkd.softmax(np.zeros((2, 3), np.int32)),
        TypeError,
        re.escape("`logits` must have a floating dtype, got int32 with shape (2, 3)"),
        id="softmax-int-logits",
    ),
    pytest.param(
        lambda: jaxkd.standardize_logits(np.zeros((2, 3), np.int32)),
        TypeError,
        re.escape("`logits` must have a floating dtype, got int32 with shape (2, 3)"),
        id="standardize_logits-int-logits",
    ),
    pytest.param(
        lambda: jaxkd.kl_divergence(np.zeros((2, 3), np.int32), TEACHER),
        TypeError,
        re.escape("`student_logits` must have a floating dtype, got int32 with shape (2, 3)"),
        id="kl_divergence-int-student",
    ),
    pytest.param(
        lambda: jaxkd.logit_mse(STUDENT, np.ones((2, 3), np.int32)),
        TypeError,
        re.escape("`teacher_logits` must have a floating dtype, got int32 with shape (2, 3)"),
        id="logit_mse-int-teacher",
    ),
    pytest.param(
        lambda: jaxkd.dist_loss(STUDENT, np.ones((2, 3), np.int32)),
        TypeError,
        re.escape("`teacher_logits` must have a floating dtype, got int32 with shape (2, 3)"),
        id="dist_loss-int-teacher",
    ),
    pytest.param(
        lambda: jaxkd.cross_entropy_with_integer_labels(np.zeros((2, 3), bool), LABELS),
        TypeError,
        re.escape("`logits` must have a floating dtype, got bool with shape (2, 3)"),
        id="cross_entropy-bool-logits",
    ),
]

LABEL_CASES = [
    pytest.param(
        _hinton(labels=np.array([0, 1, 2], np.int32)),
        ValueError,
        re.escape("`labels` has shape (3,); expected (2,)"),
        id="hinton_loss-labels-too-long",
    ),
    pytest.param(
        lambda: jaxkd.dkd_loss(STUDENT, TEACHER, LABELS[:, None]),
        ValueError,
        re.escape("`labels` has shape (2, 1); expected (2,)"),
        id="dkd_loss-labels-with-class-axis",
    ),
    pytest.param(
        lambda: jaxkd.cross_entropy_with_integer_labels(STUDENT, LABELS, axis=0),
        ValueError,
        re.escape("`labels` has shape (2,); expected (3,)"),
        id="cross_entropy-labels-for-the-other-axis",
    ),
    pytest.param(
        lambda: jaxkd.cross_entropy_with_integer_labels(STUDENT, LABELS.astype(np.float32)),
        TypeError,
        re.escape("`labels` must hold integer class indices, got dtype float32 with shape (2,)"),
        id="cross_entropy-float-labels",
    ),
    pytest.param(
        _hinton(labels=np.array([0.0, 1.0])),
        TypeError,
        r"`labels` must hold integer class indices, got dtype float",
        id="hinton_loss-float-labels",
    ),
    pytest.param(
        lambda: jaxkd.cross_entropy_with_integer_labels(STUDENT, np.array([0, 3], np.int32)),
        ValueError,
        re.escape("`labels` must lie in [0, 3) for logits with 3 classes along axis 1; "),
        id="cross_entropy-label-equal-to-num-classes",
    ),
    pytest.param(
        lambda: jaxkd.dkd_loss(STUDENT, TEACHER, np.array([-1, 0], np.int32)),
        ValueError,
        re.escape("`labels` must lie in [0, 3)") + r".*got values in \[-1, 0\]",
        id="dkd_loss-negative-label",
    ),
    pytest.param(
        _hinton(labels=np.array([1, 7], np.int32)),
        ValueError,
        re.escape("`labels` must lie in [0, 3)") + r".*got values in \[1, 7\]",
        id="hinton_loss-label-out-of-range",
    ),
    # A label on a class that the per-class mask removes has no probability to score.
    pytest.param(
        lambda: jaxkd.cross_entropy_with_integer_labels(
            STUDENT, LABELS, where=np.array([[True, True, True], [True, True, False]])
        ),
        ValueError,
        r"`labels`",
        id="cross_entropy-label-on-masked-class",
    ),
    pytest.param(
        lambda: jaxkd.dkd_loss(
            STUDENT, TEACHER, LABELS, where=np.array([[False, True, True], [True, True, True]])
        ),
        ValueError,
        r"`labels`",
        id="dkd_loss-label-on-masked-class",
    ),
]

WHERE_CASES = [
    # A mask of rank ndim - 1 must be exactly the per-example shape: (3,) is not (2,).
    pytest.param(
        _kl(where=np.ones((3,), bool)),
        ValueError,
        re.escape(
            "`where` has shape (3,); expected the logits' shape (2, 3) (a per-class mask), "
            "a shape of the same rank whose dimensions are those or 1 (broadcast, e.g. "
            "(2, 1) per example), or (2,) (a per-example mask)."
        ),
        id="kl_divergence-where-third-shape",
    ),
    # (1, 3) broadcasts and is accepted (below); (2, 2) and (3, 1) do not broadcast.
    pytest.param(
        lambda: jaxkd.softmax(STUDENT, where=np.ones((2, 2), bool)),
        ValueError,
        re.escape("`where` has shape (2, 2); expected the logits' shape (2, 3)"),
        id="softmax-where-unbroadcastable-shape",
    ),
    pytest.param(
        lambda: jaxkd.entropy(STUDENT, where=np.ones((3, 1), bool)),
        ValueError,
        re.escape("`where` has shape (3, 1); expected the logits' shape (2, 3)"),
        id="entropy-where-unbroadcastable-example-mask",
    ),
    pytest.param(
        lambda: jaxkd.standardize_logits(STUDENT, where=np.ones((1, 2, 3), bool)),
        ValueError,
        re.escape("`where` has shape (1, 2, 3); expected the logits' shape (2, 3)"),
        id="standardize_logits-where-extra-leading-axis",
    ),
    pytest.param(
        _hinton(where=np.ones((2, 3, 1), bool)),
        ValueError,
        re.escape("`where` has shape (2, 3, 1)"),
        id="hinton_loss-where-extra-axis",
    ),
    pytest.param(
        _kl(where=np.ones((2,), np.float32)),
        TypeError,
        re.escape("`where` must be a boolean mask, got dtype float32"),
        id="kl_divergence-float-where",
    ),
    pytest.param(
        lambda: jaxkd.standardize_logits(STUDENT, where=np.ones((2, 3), np.int32)),
        TypeError,
        re.escape("`where` must be a boolean mask, got dtype int32"),
        id="standardize_logits-int-where",
    ),
    pytest.param(
        lambda: jaxkd.dist_loss(STUDENT, TEACHER, where=np.ones((3,), bool)),
        ValueError,
        re.escape("`where` must be a per-example mask of shape (2,), got (3,)"),
        id="dist_loss-where-third-shape",
    ),
    pytest.param(
        lambda: jaxkd.dist_loss(STUDENT, TEACHER, where=np.array([0.5, 1.0], np.float32)),
        TypeError,
        r"`where` must be a boolean mask",
        id="dist_loss-float-where",
    ),
    pytest.param(
        lambda: jaxkd.masked_mean(np.zeros((2, 3)), np.ones((3,), bool)),
        ValueError,
        re.escape("`where` has shape (3,); expected the values' shape (2, 3)"),
        id="masked_mean-where-rank-change",
    ),
    pytest.param(
        lambda: jaxkd.masked_mean(np.zeros((2, 3)), np.ones((2, 3), np.float32)),
        TypeError,
        re.escape("`where` must be a boolean mask, got dtype float32"),
        id="masked_mean-float-where",
    ),
]

WEIGHT_CASES = [
    pytest.param(
        _hinton(alpha=1.5),
        ValueError,
        re.escape("`alpha` must lie in [0, 1], got 1.5"),
        id="hinton_loss-alpha-above-one",
    ),
    pytest.param(
        _hinton(alpha=-0.1),
        ValueError,
        re.escape("`alpha` must lie in [0, 1], got -0.1"),
        id="hinton_loss-alpha-negative",
    ),
    pytest.param(
        _hinton(alpha=np.array([0.5, 0.5])),
        ValueError,
        re.escape("`alpha` must be a scalar, got shape (2,)"),
        id="hinton_loss-alpha-vector",
    ),
    pytest.param(
        lambda: jaxkd.skew_kl_divergence(STUDENT, TEACHER, alpha=2.0),
        ValueError,
        re.escape("`alpha` must lie in [0, 1], got 2.0"),
        id="skew_kl_divergence-alpha-above-one",
    ),
    pytest.param(
        lambda: jaxkd.skew_reverse_kl_divergence(STUDENT, TEACHER, alpha=-1.0),
        ValueError,
        re.escape("`alpha` must lie in [0, 1], got -1.0"),
        id="skew_reverse_kl_divergence-alpha-negative",
    ),
    pytest.param(
        lambda: jaxkd.generalized_jsd(STUDENT, TEACHER, beta=1.5),
        ValueError,
        re.escape("`beta` must lie in [0, 1], got 1.5"),
        id="generalized_jsd-beta-above-one",
    ),
    pytest.param(
        lambda: jaxkd.generalized_jsd(STUDENT, TEACHER, beta=-0.5),
        ValueError,
        re.escape("`beta` must lie in [0, 1], got -0.5"),
        id="generalized_jsd-beta-negative",
    ),
    pytest.param(
        lambda: _traced_beta(np.full(2, 0.5, np.float32)),
        ValueError,
        re.escape("`beta` must be a scalar, got shape (2,)"),
        id="generalized_jsd-traced-beta-not-scalar",
    ),
]

RANK_AND_AXIS_CASES = [
    pytest.param(
        lambda: jaxkd.dist_loss(np.zeros((2, 3, 4), np.float32), np.zeros((2, 3, 4), np.float32)),
        ValueError,
        re.escape("`student_logits` must be [batch, classes], got shape (2, 3, 4)"),
        id="dist_loss-3d-logits",
    ),
    pytest.param(
        lambda: jaxkd.dist_loss(STUDENT, np.zeros((6,), np.float32)),
        ValueError,
        re.escape("`teacher_logits` must be [batch, classes], got shape (6,)"),
        id="dist_loss-1d-teacher",
    ),
    pytest.param(
        lambda: jaxkd.softmax(STUDENT, axis=2),
        ValueError,
        re.escape("`axis`=2 is out of range for an array of rank 2"),
        id="softmax-axis-2",
    ),
    pytest.param(
        _kl(axis=-3),
        ValueError,
        re.escape("`axis`=-3 is out of range for an array of rank 2"),
        id="kl_divergence-axis-minus-3",
    ),
    pytest.param(
        lambda: jaxkd.cross_entropy_with_integer_labels(STUDENT, LABELS, axis=5),
        ValueError,
        re.escape("`axis`=5 is out of range for an array of rank 2"),
        id="cross_entropy-axis-5",
    ),
    pytest.param(
        lambda: jaxkd.standardize_logits(STUDENT, axis=(0, 1)),
        TypeError,
        re.escape("`axis` must be a single int, got (0, 1)"),
        id="standardize_logits-axis-tuple",
    ),
    pytest.param(
        _kl(axis=1.0),
        TypeError,
        re.escape("`axis` must be a single int, got 1.0"),
        id="kl_divergence-float-axis",
    ),
]


@pytest.mark.parametrize(
    "call, error, match",
    SHAPE_CASES
    + TEMPERATURE_CASES
    + DTYPE_CASES
    + LABEL_CASES
    + WHERE_CASES
    + WEIGHT_CASES
    + RANK_AND_AXIS_CASES,
)
def test_bad_input_raises(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize(
    "call, error, match",
    [
        pytest.param(
            lambda: jax.jit(jaxkd.kl_divergence)(STUDENT, np.zeros((2, 4), np.float32)),
            ValueError,
            _shape_mismatch((2, 3), (2, 4)),
            id="shape-mismatch",
        ),
        pytest.param(
            lambda: jax.jit(jaxkd.hinton_loss, static_argnames="alpha")(
                STUDENT, TEACHER, LABELS, alpha=0.5, temperature=jnp.ones(2)
            ),
            ValueError,
            re.escape("`temperature` must be a scalar, got shape (2,)"),
            id="vector-temperature",
        ),
        pytest.param(
            lambda: jax.jit(jaxkd.dkd_loss)(STUDENT, TEACHER, LABELS[:1]),
            ValueError,
            re.escape("`labels` has shape (1,); expected (2,)"),
            id="labels-shape",
        ),
    ],
)
def test_bad_input_raises_at_trace_time_under_jit(call, error, match):
    with pytest.raises(error, match=match):
        call()


# Valid inputs that a stricter check could wrongly refuse.


def _losses_at(student, temperature):
    return {
        "softmax": jaxkd.softmax(student, temperature=temperature),
        "kl_divergence": jaxkd.kl_divergence(student, TEACHER, temperature=temperature),
        "generalized_jsd": jaxkd.generalized_jsd(
            student, TEACHER, beta=0.3, temperature=temperature
        ),
        "hinton_loss": jaxkd.hinton_loss(
            student, TEACHER, LABELS, alpha=0.5, temperature=temperature
        ),
        "dkd_loss": jaxkd.dkd_loss(student, TEACHER, LABELS, temperature=temperature),
        "dist_loss": jaxkd.dist_loss(student, TEACHER, temperature=temperature),
    }


def test_traced_temperature_is_accepted_under_jit():
    # E.g. a temperature schedule evaluated at a traced step: only its shape is checked.
    student = np.array([[0.5, -1.0, 2.0], [1.0, 0.0, -3.0]], np.float32)
    traced = jax.jit(_losses_at)(student, jnp.float32(2.5))
    eager = _losses_at(student, 2.5)
    for name, value in eager.items():
        np.testing.assert_allclose(traced[name], value, rtol=1e-6, err_msg=name)


def test_traced_alpha_is_accepted_under_jit():
    student = np.array([[0.5, -1.0, 2.0], [1.0, 0.0, -3.0]], np.float32)

    def losses(alpha):
        return (
            jaxkd.hinton_loss(student, TEACHER, LABELS, alpha=alpha, temperature=2.0),
            jaxkd.skew_kl_divergence(student, TEACHER, alpha=alpha),
        )

    got = jax.jit(losses)(jnp.float32(0.25))
    for traced, eager in zip(got, losses(0.25), strict=True):
        np.testing.assert_allclose(traced, eager, rtol=1e-6)


def test_padding_labels_of_masked_examples_are_accepted():
    # Out-of-range labels (e.g. -100, an ignore index) are fine where the example is masked.
    labels = np.array([1, -100], np.int32)
    where = np.array([True, False])
    for loss in (
        lambda: jaxkd.cross_entropy_with_integer_labels(STUDENT, labels, where=where),
        lambda: jaxkd.hinton_loss(
            STUDENT, TEACHER, labels, alpha=0.5, temperature=2.0, where=where
        ),
        lambda: jaxkd.dkd_loss(STUDENT, TEACHER, labels, where=where),
    ):
        values = np.asarray(loss())
        assert np.isfinite(values[0])
        assert values[1] == 0.0


@pytest.mark.parametrize(
    "where, kept",
    [
        # Same rank, dimensions equal or 1: broadcast as numpy does, without adding axes.
        (np.array([[True, False, True]]), np.array([[True, False, True], [True, False, True]])),
        (np.array([[True], [False]]), np.array([[True] * 3, [False] * 3])),
        (np.array([[False]]), np.zeros((2, 3), bool)),
    ],
    ids=["1xC-classes", "Bx1-examples", "1x1-everything"],
)
def test_broadcastable_where_is_accepted_and_equals_the_broadcast_mask(where, kept):
    student = np.array([[0.5, -1.0, 2.0], [1.0, 0.0, -3.0]], np.float32)
    for name, loss in {
        "softmax": lambda w: jaxkd.softmax(student, where=w),
        "entropy": lambda w: jaxkd.entropy(student, where=w),
        "standardize_logits": lambda w: jaxkd.standardize_logits(student, where=w),
        "kl_divergence": lambda w: jaxkd.kl_divergence(student, TEACHER, where=w),
        "logit_mse": lambda w: jaxkd.logit_mse(student, TEACHER, where=w),
    }.items():
        np.testing.assert_array_equal(loss(where), loss(kept), err_msg=name)


def test_traced_labels_are_accepted_under_jit():
    # Their range cannot be checked at trace time; the values stay those of eager mode.
    got = jax.jit(jaxkd.cross_entropy_with_integer_labels)(TEACHER, LABELS)
    want = jaxkd.cross_entropy_with_integer_labels(TEACHER, LABELS)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(got, np.log(3.0), rtol=1e-6)


def test_label_range_is_checked_for_numpy_constants_captured_under_jit():
    """Labels and mask closed over by a jitted function are concrete: still checked."""
    mask = np.array([True, False, True])
    logits = jnp.zeros((3, 4))
    padded = np.array([0, 9, 2])  # the out-of-range label is masked: fine
    values = jax.jit(lambda z: jaxkd.cross_entropy_with_integer_labels(z, padded, where=mask))(
        logits
    )
    np.testing.assert_allclose(values, [np.log(4), 0.0, np.log(4)], rtol=1e-6)
    bad = np.array([0, 1, 7])
    with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 4\)"):
        jax.jit(lambda z: jaxkd.cross_entropy_with_integer_labels(z, bad, where=mask))(logits)
