"""Vocabulary-parallel losses under ``jax.shard_map`` equal the full-vocabulary ones.

The specification: on a mesh whose ``model`` axis splits the vocabulary (8 devices,
or 2 x 4 with tokens also split over ``data``), every loss's per-token value and its
gradients with respect to the student's hidden states, output kernel and bias equal
those of the naive jaxkd function on the gathered logits, at rtol 1e-5 in float32,
with a token mask (masked tokens with garbage logits and out-of-range labels), at
temperatures 1 and 2, with soft-capped logits and with a ``-inf`` padded vocabulary
tail; the values also equal a float64 numpy reference written from the formulas, and
keep that relative precision (rtol 1e-5) when the two distributions are nearly equal
and the divergences tiny, as the full-vocabulary functions do.
"""

from __future__ import annotations

import functools

import _reference as ref
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jaxkd
from jaxkd.losses._projection import output_logits
from jaxkd.losses._vocab_parallel import (
    vocab_parallel_cross_entropy,
    vocab_parallel_divergence,
    vocab_parallel_log_softmax,
)

TOKENS, HIDDEN, VOCAB = 6, 5, 32
SOFTCAP = 8.0
REAL_VOCAB = 25  # the padded run: classes [25, 32) are -inf, the last 8-way shard entirely
WHERE = np.array([True, True, False, True, False, True])
LABELS = np.array([3, 31, -1, 17, VOCAB + 3, 24])  # masked tokens hold out-of-range labels
OPTIONS = {"beta_lo": 0.0, "beta_mid": 0.3, "beta_hi": 1.0, "alpha": 0.2}

# (divergence, loss_kwargs from the traced OPTIONS or None for the defaults).
DIVERGENCES = (
    ("kl", None),
    ("reverse_kl", None),
    ("soft_cross_entropy", None),
    ("jsd", "beta_lo"),
    ("jsd", "beta_mid"),
    ("jsd", "beta_hi"),
    ("jsd", None),  # static default beta = 0.5
    ("skew_kl", "alpha"),
    ("skew_reverse_kl", None),  # static default alpha = 0.1
    ("total_variation", None),
)
NAMES = [f"{name}:{option}" for name, option in DIVERGENCES] + ["cross_entropy"]


def _loss_kwargs(name, option, options):
    if option is None:
        return None
    return {"alpha" if name.startswith("skew") else "beta": options[option]}


def _params(seed):
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((TOKENS, HIDDEN)).astype(np.float32)
    hidden[~WHERE] *= 1e3  # garbage on masked tokens
    kernel = (rng.standard_normal((HIDDEN, VOCAB)) * 1.5).astype(np.float32)
    bias = rng.standard_normal(VOCAB).astype(np.float32)
    return hidden, kernel, bias


def _logits(params, where, valid):
    """Soft-capped logits; masked tokens scaled to garbage, padded classes -inf."""
    logits = output_logits(*params, softcap=SOFTCAP)
    logits = logits * jnp.where(where, 1.0, 1e4)[:, None]
    return jnp.where(valid[None, :], logits, -jnp.inf)


def _parallel_values(student, teacher, where, valid, labels, temperature, options):
    """All losses on this device's shards: ``[K, tokens]``."""
    s, t = _logits(student, where, valid), _logits(teacher, where, valid)
    kwargs = dict(axis_name="model", temperature=temperature, where=where)
    values = [
        vocab_parallel_divergence(
            s, t, loss=name, loss_kwargs=_loss_kwargs(name, option, options), **kwargs
        )
        for name, option in DIVERGENCES
    ]
    values.append(vocab_parallel_cross_entropy(s, labels, axis_name="model", where=where))
    return jnp.stack(values)


_NAIVE = {
    "kl": jaxkd.kl_divergence,
    "reverse_kl": jaxkd.reverse_kl_divergence,
    "soft_cross_entropy": jaxkd.soft_cross_entropy,
    "jsd": jaxkd.generalized_jsd,
    "skew_kl": jaxkd.skew_kl_divergence,
    "skew_reverse_kl": jaxkd.skew_reverse_kl_divergence,
    "total_variation": jaxkd.total_variation,
}


def _naive_values(student, teacher, where, valid, labels, temperature):
    """The jaxkd full-vocabulary functions on the gathered logits (static options)."""
    s, t = _logits(student, where, valid), _logits(teacher, where, valid)
    values = [
        _NAIVE[name](
            s,
            t,
            temperature=temperature,
            where=where,
            **(_loss_kwargs(name, option, OPTIONS) or {}),
        )
        for name, option in DIVERGENCES
    ]
    values.append(jaxkd.cross_entropy_with_integer_labels(s, labels, where=where))
    return jnp.stack(values)


def _values_and_gradient(values_fn):
    """jit of ``(values [K, N], d sum(weights[:, None] * values) / d student params)``.

    A one-hot ``weights [K]`` gives one loss's gradient: one compile serves every
    loss (``jax.jacrev`` over the K losses compiles several times slower).
    """

    def run(student, weights, *rest):
        values, pull = jax.vjp(lambda p: values_fn(p, *rest), student)
        (grad,) = pull(jnp.broadcast_to(weights[:, None], values.shape))
        return values, grad

    return jax.jit(run)


_naive_run = _values_and_gradient(_naive_values)


@functools.cache
def _expected(temperature, real_vocab):
    """Naive values ``[K, N]`` and, per loss, its gradient (hidden, kernel, bias)."""
    valid = np.arange(VOCAB) < real_vocab
    args = (_params(1), WHERE, valid, LABELS, jnp.float32(temperature))
    grads = []
    for weights in np.eye(len(NAMES), dtype=np.float32):
        values, grad = _naive_run(_params(0), weights, *args)
        grads.append(grad)
    return values, grads


def _parallel_run(mesh_shape):
    devices = np.array(jax.devices()[:8])
    if mesh_shape == (8,):
        mesh, tokens = Mesh(devices, ("model",)), None
    else:
        mesh, tokens = Mesh(devices.reshape(mesh_shape), ("data", "model")), "data"
    param_specs = (P(tokens), P(None, "model"), P("model"))
    mapped = jax.shard_map(
        _parallel_values,
        mesh=mesh,
        in_specs=(param_specs, param_specs, P(tokens), P("model"), P(tokens), P(), P()),
        out_specs=P(None, tokens),
    )
    return _values_and_gradient(mapped)


def _reference_divergences(s, t, temperature):
    """Float64 numpy values ``[len(DIVERGENCES), N]`` of the divergences, from the formulas.

    ``s``, ``t``: float64 logits ``[N, V]`` (``tests/_reference.py``); options as in
    :data:`DIVERGENCES` with :data:`OPTIONS`.
    """
    p_s, p_t = ref.softmax(s, temperature), ref.softmax(t, temperature)
    log_p_s = ref.log_softmax(s, temperature)

    def jsd(beta):
        if beta == 0.0:
            return ref.kl(p_t, p_s)
        if beta == 1.0:
            return ref.kl(p_s, p_t)
        m = beta * p_t + (1 - beta) * p_s
        return beta * ref.kl(p_t, m) + (1 - beta) * ref.kl(p_s, m)

    alpha = OPTIONS["alpha"]
    divergences = [
        ref.kl(p_t, p_s),
        ref.kl(p_s, p_t),
        -np.sum(np.where(p_t > 0, p_t * np.where(p_t > 0, log_p_s, 0.0), 0.0), axis=-1),
        jsd(OPTIONS["beta_lo"]),
        jsd(OPTIONS["beta_mid"]),
        jsd(OPTIONS["beta_hi"]),
        jsd(0.5),
        ref.kl(p_t, alpha * p_t + (1 - alpha) * p_s),
        ref.kl(p_s, 0.1 * p_s + 0.9 * p_t),
        0.5 * np.sum(np.abs(p_t - p_s), axis=-1),
    ]
    return np.stack([temperature**2 * d for d in divergences])


def _reference_values(student, teacher, valid, temperature):
    """Float64 numpy values of every loss (the divergences, then the cross entropy)."""

    def logits(hidden, kernel, bias):
        z = np.asarray(hidden, np.float64) @ np.asarray(kernel, np.float64) + bias
        return np.where(valid, SOFTCAP * np.tanh(z / SOFTCAP), -np.inf)

    s, t = logits(*student), logits(*teacher)
    values = list(_reference_divergences(s, t, temperature))
    log_p = ref.log_softmax(s)
    safe_labels = np.clip(LABELS, 0, VOCAB - 1)
    values.append(-np.take_along_axis(log_p, safe_labels[:, None], axis=-1)[:, 0])
    return np.where(WHERE, np.stack(values), 0.0)


@pytest.fixture
def unoptimized_compiles():
    """Most XLA optimizations off while compiling the programs of every loss and gradient.

    Compiling them is most of this file's time, and what the test checks (equal
    values and gradients) does not depend on XLA's optimizations; the precision
    test below compiles as usual.
    """
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", False)


@pytest.mark.usefixtures("unoptimized_compiles")
@pytest.mark.parametrize("mesh_shape", [(8,), (2, 4)], ids=["model8", "data2xmodel4"])
def test_matches_full_vocabulary_losses(mesh_shape):
    student, teacher = _params(0), _params(1)
    parallel = _parallel_run(mesh_shape)
    options = {k: jnp.float32(v) for k, v in OPTIONS.items()}  # traced beta and alpha
    for temperature in (1.0, 2.0):
        for real_vocab in (VOCAB, REAL_VOCAB):
            case = f"T={temperature}, vocab={real_vocab}"
            valid = np.arange(VOCAB) < real_vocab
            args = (teacher, WHERE, valid, LABELS, jnp.float32(temperature), options)
            expected_values, expected_grads = _expected(temperature, real_vocab)
            for k, name in enumerate(NAMES):
                values, grads = parallel(student, np.eye(len(NAMES), dtype=np.float32)[k], *args)
                for label, grad, expected in zip(
                    ("hidden", "kernel", "bias"), grads, expected_grads[k], strict=True
                ):
                    np.testing.assert_allclose(
                        grad,
                        expected,
                        rtol=1e-5,
                        atol=1e-6 * np.max(np.abs(expected)),
                        err_msg=f"{case}: d {name} / d student {label}",
                    )
                    assert np.all(np.isfinite(grad)), (case, name, label)
                # Masked tokens (garbage logits): exactly zero gradient into their hidden states.
                assert np.all(np.asarray(grads[0])[~WHERE] == 0.0), (case, name)
            np.testing.assert_allclose(
                values, expected_values, rtol=1e-5, atol=1e-6, err_msg=f"{case} {NAMES}"
            )
            np.testing.assert_allclose(
                values,
                _reference_values(student, teacher, valid, temperature),
                rtol=2e-5,
                atol=1e-6,
                err_msg=f"{case}: float64 reference",
            )
            assert np.all(np.asarray(values)[:, ~WHERE] == 0.0)  # masked tokens: exactly 0
            assert np.all(np.asarray(values)[:, WHERE] > 0.0)


def _model_mesh():
    return Mesh(np.array(jax.devices()[:8]), ("model",))


def _divergence_values(student_logits, teacher_logits, temperature, options):
    """Every divergence of :data:`DIVERGENCES` on this device's shards: ``[K, tokens]``."""
    return jnp.stack(
        [
            vocab_parallel_divergence(
                student_logits,
                teacher_logits,
                loss=name,
                axis_name="model",
                temperature=temperature,
                loss_kwargs=_loss_kwargs(name, option, options),
            )
            for name, option in DIVERGENCES
        ]
    )


def test_nearly_equal_distributions_keep_relative_precision():
    """Teacher = student + 1e-3 noise: each divergence within rtol 1e-5 of float64.

    The divergences are tiny (KL about 5e-7, total variation 1e-4 at T = 1) and the
    log-ratios 1e-3 / T: plain terms ``p_t (log p_t - log p_s)`` from two rounded
    log-probabilities would be off by about ``T**2 * 2e-7`` absolute, i.e. by tens of
    percent here. Vocabulary 8 x 16 with a ``-inf`` tail filling the last shard and
    part of the one before; each loss's options as in the main test (traced).
    """
    rng = np.random.default_rng(10)
    tokens, vocab, real_vocab = 6, 128, 108
    student = (3.0 * rng.standard_normal((tokens, vocab))).astype(np.float32)
    teacher = (student + 1e-3 * rng.standard_normal((tokens, vocab))).astype(np.float32)
    student[:, real_vocab:] = teacher[:, real_vocab:] = -np.inf
    spec = P(None, "model")
    mapped = jax.jit(
        jax.shard_map(
            _divergence_values,
            mesh=_model_mesh(),
            in_specs=(spec, spec, P(), P()),
            out_specs=P(),
        )
    )
    options = {k: jnp.float32(v) for k, v in OPTIONS.items()}
    s64, t64 = student.astype(np.float64), teacher.astype(np.float64)
    for temperature in (1.0, 4.0):
        values = mapped(student, teacher, jnp.float32(temperature), options)
        expected = _reference_divergences(s64, t64, temperature)
        assert np.all(expected[NAMES.index("kl:None")] < 3e-6)  # tiny, as intended
        np.testing.assert_allclose(
            values, expected, rtol=1e-5, atol=0, err_msg=f"T={temperature} {NAMES[:-1]}"
        )


def test_log_softmax_shard_is_global_log_softmax_with_padded_tail():
    logits = ref.random_logits(2, (3, VOCAB))
    logits[:, REAL_VOCAB:] = -np.inf
    logits[2] = -np.inf  # a row without any class: all -inf, never NaN
    mapped = jax.shard_map(
        functools.partial(vocab_parallel_log_softmax, axis_name="model", temperature=2.0),
        mesh=_model_mesh(),
        in_specs=P(None, "model"),
        out_specs=P(None, "model"),
    )
    log_p = np.asarray(jax.jit(mapped)(logits))
    assert log_p.dtype == np.float32
    np.testing.assert_allclose(log_p[:2], ref.log_softmax(logits[:2], 2.0), rtol=1e-6)
    assert np.all(log_p[2] == -np.inf)


def test_bfloat16_inputs_are_computed_in_float32():
    student = ref.random_logits(3, (4, VOCAB))
    teacher = ref.random_logits(4, (4, VOCAB))
    labels = np.array([0, 9, 20, 31])

    def losses(s, t):
        kl = vocab_parallel_divergence(s, t, axis_name="model", temperature=2.0)
        return jnp.stack([kl, vocab_parallel_cross_entropy(s, labels, axis_name="model")])

    def both(s16, t16, s32, t32):
        return (
            losses(s16, t16),
            losses(s16.astype(jnp.float32), t16.astype(jnp.float32)),
            losses(s32, t32),
        )

    spec = P(None, "model")
    mapped = jax.shard_map(both, mesh=_model_mesh(), in_specs=(spec,) * 4, out_specs=P())
    s16, t16 = jnp.asarray(student, jnp.bfloat16), jnp.asarray(teacher, jnp.bfloat16)
    from_bf16, upcast, from_f32 = jax.jit(mapped)(s16, t16, student, teacher)
    assert from_bf16.dtype == jnp.float32
    np.testing.assert_allclose(from_bf16, upcast, rtol=1e-6)  # the same float32 computation
    np.testing.assert_allclose(from_bf16, from_f32, rtol=3e-2, atol=1e-3)  # bf16 rounding only
    assert not np.allclose(from_bf16, from_f32, rtol=1e-7, atol=0)  # the inputs were rounded


def test_gradients_under_each_check_vma_mode():
    """check_vma=True: right from outside and inside the body; False: from outside only.

    Inside a ``check_vma=False`` body the transpose of ``psum`` is a ``psum``: the
    gradient is the axis size (8) times too large. This pins the documented behaviour.
    (check_vma=True from outside is the main test above.)
    """
    student = ref.random_logits(5, (4, 16))
    teacher = ref.random_logits(6, (4, 16))
    kl = functools.partial(vocab_parallel_divergence, axis_name="model", temperature=2.0)
    spec = P(None, "model")

    def inside_body(s, t):
        grad = jax.grad(lambda s: jnp.sum(kl(s, t)))(s)
        return grad, kl(s, t)[None]  # each device's own copy of the value

    def inside(check_vma):
        return jax.shard_map(
            inside_body,
            mesh=_model_mesh(),
            in_specs=(spec, spec),
            out_specs=(spec, P("model")),
            check_vma=check_vma,
        )

    unchecked = jax.shard_map(
        kl, mesh=_model_mesh(), in_specs=(spec, spec), out_specs=P(), check_vma=False
    )

    @jax.jit
    def run(s, t):
        expected = jax.grad(lambda s: jnp.sum(jaxkd.kl_divergence(s, t, temperature=2.0)))(s)
        outside_unchecked = jax.grad(lambda s: jnp.sum(unchecked(s, t)))(s)
        return expected, outside_unchecked, inside(True)(s, t), inside(False)(s, t)

    expected, outside_unchecked, (grad, copies), (grad_unchecked, _) = run(student, teacher)
    np.testing.assert_allclose(outside_unchecked, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grad_unchecked, 8.0 * expected, rtol=1e-5, atol=1e-7)
    assert np.all(copies == copies[:1])  # identical on every device of the axis


def test_masked_garbage_is_zero_and_bad_labels_or_beta_give_nan():
    """Masked NaN/inf logits: 0 with zero gradient. Kept token with label >= V, or a
    traced beta outside [0, 1]: NaN (in the gradient too), never a silent value."""
    student = ref.random_logits(7, (3, VOCAB))
    teacher = ref.random_logits(8, (3, VOCAB))
    for logits in (student, teacher):
        logits[2, ::3], logits[2, 1::3], logits[2, 2::3] = np.nan, np.inf, 1e30  # masked
    where = np.array([True, True, False])
    labels = np.array([VOCAB, 5, -7])  # kept token 0 names no class; token 2 is masked

    def body(s, t, beta):
        ce = vocab_parallel_cross_entropy(s, labels, axis_name="model", where=where)
        jsd = vocab_parallel_divergence(
            s, t, loss="jsd", axis_name="model", where=where, loss_kwargs={"beta": beta}
        )
        return ce, jsd

    spec = P(None, "model")
    mapped = jax.shard_map(body, mesh=_model_mesh(), in_specs=(spec, spec, P()), out_specs=P())

    @jax.jit
    def run(s, t, beta):
        grad = jax.grad(lambda s: sum(jnp.sum(v) for v in mapped(s, t, beta)))(s)
        return mapped(s, t, beta), grad

    (ce, jsd), grad = run(student, teacher, jnp.float32(0.5))
    assert np.isnan(ce[0]) and np.isfinite(ce[1]) and ce[2] == 0.0
    assert np.all(np.isfinite(jsd[:2])) and jsd[2] == 0.0
    assert np.all(np.isnan(grad[0])) and np.all(np.isfinite(grad[1]))
    assert np.all(grad[2] == 0.0)
    (_, jsd), _ = run(student, teacher, jnp.float32(1.5))
    assert np.all(np.isnan(jsd[:2])) and jsd[2] == 0.0


def test_bad_input_raises_naming_the_argument():
    s = jnp.zeros((4, 8))
    kw = dict(axis_name="model")
    with pytest.raises(ValueError, match=r"student_logits.*\(4, 8\).*teacher_logits.*\(4, 9\)"):
        vocab_parallel_divergence(s, jnp.zeros((4, 9)), **kw)
    with pytest.raises(TypeError, match="teacher_logits"):
        vocab_parallel_divergence(s, jnp.zeros((4, 8), jnp.int32), **kw)
    with pytest.raises(ValueError, match="scalar"):
        vocab_parallel_divergence(jnp.zeros(()), jnp.zeros(()), **kw)
    for temperature in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            vocab_parallel_divergence(s, s, temperature=temperature, **kw)
    with pytest.raises(ValueError, match="must be one of.*'jsd'.*'total_variation'"):
        vocab_parallel_divergence(s, s, loss="kld", **kw)
    with pytest.raises(ValueError, match="'kl' accepts no options; got unknown \\['alpha'\\]"):
        vocab_parallel_divergence(s, s, loss="kl", loss_kwargs={"alpha": 0.1}, **kw)
    with pytest.raises(ValueError, match="accepts \\['beta'\\]; got unknown \\['gamma'\\]"):
        vocab_parallel_divergence(s, s, loss="jsd", loss_kwargs={"gamma": 1.0}, **kw)
    with pytest.raises(TypeError, match="loss_kwargs"):
        vocab_parallel_divergence(s, s, loss="jsd", loss_kwargs=[("beta", 0.5)], **kw)
    with pytest.raises(ValueError, match="beta"):
        vocab_parallel_divergence(s, s, loss="jsd", loss_kwargs={"beta": 1.5}, **kw)
    with pytest.raises(ValueError, match="alpha"):
        vocab_parallel_divergence(s, s, loss="skew_kl", loss_kwargs={"alpha": -0.1}, **kw)
    with pytest.raises(ValueError, match=r"`where` has shape \(4, 1\).*\(4,\)"):
        vocab_parallel_divergence(s, s, where=jnp.ones((4, 1), bool), **kw)
    with pytest.raises(TypeError, match="where"):
        vocab_parallel_divergence(s, s, where=jnp.ones(4), **kw)
    labels = jnp.zeros(4, jnp.int32)
    with pytest.raises(TypeError, match="labels"):
        vocab_parallel_cross_entropy(s, labels.astype(jnp.float32), **kw)
    with pytest.raises(ValueError, match=r"`labels` has shape \(4, 1\).*\(4,\)"):
        vocab_parallel_cross_entropy(s, labels[:, None], **kw)
    with pytest.raises(TypeError, match="logits"):
        vocab_parallel_cross_entropy(labels[:, None], labels, **kw)
    with pytest.raises(ValueError, match="where"):
        vocab_parallel_cross_entropy(s, labels, where=jnp.ones(3, bool), **kw)
    with pytest.raises(TypeError, match="logits"):
        vocab_parallel_log_softmax(labels, **kw)
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_log_softmax(s, temperature=-1.0, **kw)
