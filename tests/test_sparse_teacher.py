"""Distillation from a sparse (top-k) teacher: ``jaxkd.losses._sparse_teacher`` and its objective.

References are float64 numpy written from the formulas, with ``p = softmax(z / T)`` and
``K`` the teacher's ``k`` largest classes:

* sparse teacher: ``log p_i`` for ``i`` in ``K`` (sorted descending) and the log tail
  mass ``log sum_{i not in K} p_i``;
* tail-bucket KL: ``T^2 KL`` between the distributions on ``k + 1`` bins (each class of
  ``K``, and everything else), the student's bins summed from its full softmax;
* renormalized top-k KL: ``T^2 KL(p_t|K / p_t(K) || p_s|K / p_s(K))`` (Anshumann et
  al., "Sparse Logit Sampling: Accelerating Knowledge Distillation in LLMs", 2025).
"""

from __future__ import annotations

import _reference as ref
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from toy import TinyLM, init_lm, token_batch

import jaxkd
from jaxkd.losses._sparse_teacher import SparseTeacher, tail_bucket_kl, top_k_kl, top_k_teacher
from jaxkd.train._sparse_objective import sparse_distillation_objective

V = 7
SHAPE = (2, 3, V)
WHERE = ref.TOKEN_WHERE  # [2, 3], 4 kept tokens
STUDENT = ref.random_logits(0, SHAPE)
TEACHER = ref.random_logits(1, SHAPE)
TOLERANCE = dict(rtol=1e-5, atol=1e-6)

# Each compile costs about a second: one per teacher shape (k) for both losses at once,
# with the temperature traced; top_k_teacher always gets a full-shape mask.


@jax.jit
def both_losses(student, teacher, temperature, where):
    """``(tail_bucket_kl, top_k_kl)``, one program per input shape."""
    kwargs = dict(temperature=temperature, where=where)
    return tail_bucket_kl(student, teacher, **kwargs), top_k_kl(student, teacher, **kwargs)


TOP_K = jax.jit(top_k_teacher, static_argnames=("k", "axis"))
ALL_CLASSES = np.ones(SHAPE, bool)


# References.


def _logsumexp(x, keep):
    """``log sum_{keep} exp(x)`` over the last axis in float64; ``-inf`` when empty."""
    x = np.where(keep, np.asarray(x, np.float64), -np.inf)
    shift = np.max(x, axis=-1, keepdims=True)
    shift = np.where(np.isfinite(shift), shift, 0.0)
    with np.errstate(divide="ignore"):
        return np.log(np.sum(np.exp(x - shift), axis=-1)) + shift[..., 0]


def _in_top(indices, num_classes=V):
    return (np.arange(num_classes) == np.asarray(indices)[..., None]).any(axis=-2)


def top_k_reference(logits, k, temperature):
    """``(log_probs, indices, log_tail)``: the teacher's top k and its log tail mass."""
    log_p = ref.log_softmax(logits, temperature)
    indices = np.argsort(-log_p, axis=-1, kind="stable")[..., :k]
    scaled = np.asarray(logits, np.float64) / temperature
    everything = np.ones(scaled.shape, bool)
    log_tail = _logsumexp(scaled, ~_in_top(indices, scaled.shape[-1])) - _logsumexp(
        scaled, everything
    )
    return np.take_along_axis(log_p, indices, -1), indices, log_tail


def tail_kl_reference(student, log_probs, indices, log_tail, temperature):
    p_s = ref.softmax(student, temperature)
    q = np.take_along_axis(p_s, indices, -1)
    q_tail = np.sum(np.where(_in_top(indices, p_s.shape[-1]), 0.0, p_s), axis=-1)
    p = np.concatenate([np.exp(log_probs), np.exp(log_tail)[..., None]], axis=-1)
    q = np.concatenate([q, q_tail[..., None]], axis=-1)
    return temperature**2 * ref.kl(p, q)


def top_k_kl_reference(student, log_probs, indices, temperature):
    p = np.exp(np.asarray(log_probs, np.float64))
    q = np.take_along_axis(ref.softmax(student, temperature), indices, -1)
    return temperature**2 * ref.kl(p / p.sum(-1, keepdims=True), q / q.sum(-1, keepdims=True))


def _garbage_indices(k):
    row = np.array([99, -3, V, 12345])
    return np.resize(row, k)


def teacher_for(k, temperature, garbage=True):
    log_probs, indices, log_tail = top_k_reference(TEACHER, k, temperature)
    log_probs, indices = log_probs.astype(np.float32), indices.astype(np.int32)
    log_tail = log_tail.astype(np.float32)
    if garbage:  # padding tokens of a cache may hold anything
        log_probs[~WHERE], log_tail[~WHERE] = np.nan, np.nan
        indices[~WHERE] = _garbage_indices(k)
    return SparseTeacher(jnp.asarray(log_probs), jnp.asarray(indices), jnp.asarray(log_tail))


# top_k_teacher.


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_top_k_teacher_matches_reference(temperature):
    log_probs, indices, log_tail = top_k_reference(TEACHER, 3, temperature)
    out = TOP_K(TEACHER, k=3, temperature=temperature, where=ALL_CLASSES)
    assert out.log_probs.dtype == jnp.float32 and out.indices.dtype == jnp.int32
    assert out.log_probs.shape == (2, 3, 3) and out.log_tail.shape == (2, 3)
    np.testing.assert_array_equal(out.indices, indices)
    np.testing.assert_allclose(out.log_probs, log_probs, **TOLERANCE)
    np.testing.assert_allclose(out.log_tail, log_tail, **TOLERANCE)
    assert np.all(np.diff(np.asarray(out.log_probs), axis=-1) <= 0)  # sorted descending
    # The k + 1 bins form a distribution.
    total = np.exp(out.log_probs).sum(-1) + np.exp(out.log_tail)
    np.testing.assert_allclose(total, 1.0, rtol=1e-6)


def test_top_k_teacher_at_full_k_has_an_empty_tail_and_its_class_axis_last():
    out = TOP_K(np.moveaxis(TEACHER, -1, 0), k=V, axis=0)
    assert out.log_probs.shape == SHAPE
    assert np.all(np.isneginf(out.log_tail))
    np.testing.assert_allclose(
        np.exp(out.log_probs), np.sort(ref.softmax(TEACHER), axis=-1)[..., ::-1], rtol=1e-6
    )


def test_top_k_teacher_log_tail_is_accurate_when_the_tail_is_tiny():
    # Tail mass ~ 1e-31 of the total: log1p(-sum p_K) gives 0 or -inf (float32 cancels).
    logits = np.broadcast_to(
        np.array([20.0, 19.0, -50.0, -51.0, -52.0, -53.0, -54.0], np.float32), SHAPE
    )
    out = TOP_K(logits, k=3, where=ALL_CLASSES)
    keep = np.arange(V) >= 3
    expected = _logsumexp(logits, keep) - _logsumexp(logits, np.ones(V, bool))
    assert np.all(expected < np.log(1e-30))
    np.testing.assert_allclose(out.log_tail, expected, rtol=1e-6)
    with np.errstate(divide="ignore"):
        naive = np.log1p(-np.exp(np.asarray(out.log_probs, np.float32)).sum(-1))
    assert np.all(np.abs(naive - expected) > 10)  # what the masked logsumexp avoids


def test_top_k_teacher_masks_classes_and_tokens():
    per_class = ALL_CLASSES.copy()
    per_class[..., 2] = False
    per_class[0, 0, int(np.argmax(TEACHER[0, 0]))] = False  # the top class of token (0, 0)
    out = TOP_K(TEACHER, k=3, where=per_class)
    log_probs, indices, log_tail = top_k_reference(np.where(per_class, TEACHER, -np.inf), 3, 1.0)
    np.testing.assert_array_equal(out.indices, indices)
    np.testing.assert_allclose(out.log_probs, log_probs, **TOLERANCE)
    np.testing.assert_allclose(out.log_tail, log_tail, **TOLERANCE)
    # A masked token (here as a full-shape mask, one compile) is empty: all -inf.
    per_token = TOP_K(TEACHER, k=3, where=np.broadcast_to(WHERE[..., None], SHAPE))
    assert np.all(np.isneginf(per_token.log_probs[~WHERE]))
    assert np.all(np.isneginf(per_token.log_tail[~WHERE]))
    expected = top_k_reference(TEACHER, 3, 1.0)[2][WHERE]
    np.testing.assert_allclose(per_token.log_tail[WHERE], expected, **TOLERANCE)


# The losses.


def test_losses_match_references_and_bounds_with_a_mask():
    """k in {1, 3, V}, T in {1, 2}; masked tokens hold NaN and out-of-range indices."""
    for k in (1, 3, V):
        for temperature in (1.0, 2.0):
            clean = top_k_reference(TEACHER, k, temperature)
            tail, top = map(
                np.asarray, both_losses(STUDENT, teacher_for(k, temperature), temperature, WHERE)
            )
            expected_tail = tail_kl_reference(STUDENT, *clean, temperature)
            expected_top = top_k_kl_reference(STUDENT, *clean[:2], temperature)
            full = temperature**2 * ref.kl(
                ref.softmax(TEACHER, temperature), ref.softmax(STUDENT, temperature)
            )
            case = f"k={k}, T={temperature}"
            np.testing.assert_allclose(tail[WHERE], expected_tail[WHERE], **TOLERANCE, err_msg=case)
            np.testing.assert_allclose(top[WHERE], expected_top[WHERE], **TOLERANCE, err_msg=case)
            assert np.all(tail[~WHERE] == 0) and np.all(top[~WHERE] == 0), case
            assert np.all(tail >= 0) and np.all(top >= 0), case
            assert np.all(tail[WHERE] <= full[WHERE] * (1 + 1e-6)), case  # data processing
            if k == V:
                np.testing.assert_allclose(tail[WHERE], full[WHERE], **TOLERANCE, err_msg=case)
                np.testing.assert_allclose(top[WHERE], full[WHERE], **TOLERANCE, err_msg=case)
            else:
                assert np.all(tail[WHERE] < full[WHERE]), case  # k < V loses information
            if k == 1:
                np.testing.assert_array_equal(top, 0.0)  # one bin: nothing to compare


def test_tail_bucket_kl_is_never_negative_when_the_student_is_the_teacher():
    for temperature in (1.0, 2.0):
        teacher = TOP_K(TEACHER, k=3, temperature=temperature, where=ALL_CLASSES)
        tail, top = map(np.asarray, both_losses(TEACHER, teacher, temperature, WHERE))
        assert np.all(tail >= 0) and np.all(tail < 1e-6)
        assert np.all(top >= 0) and np.all(top < 1e-6)


def test_top_k_kl_ignores_the_students_tail_and_tail_bucket_kl_does_not():
    """The stated bias: matching the top-k shape gives 0, whatever the tail holds."""
    teacher = teacher_for(3, 1.0, garbage=False)
    outside = ~_in_top(teacher.indices)
    student = np.where(outside, TEACHER + 8.0, TEACHER).astype(np.float32)  # mass pushed out
    tail_mass = np.sum(np.where(outside, ref.softmax(student), 0.0), axis=-1)
    assert np.all(tail_mass > 0.9)
    tail, top = map(np.asarray, both_losses(student, teacher, 1.0, WHERE))
    np.testing.assert_allclose(top, 0.0, atol=1e-6)
    assert np.all(tail[WHERE] > 1.0)


def _naive_dense(student, teacher, temperature):
    """Textbook jnp versions (softmax, gather, ``1 - sum`` tail, plain KL), for gradients."""
    p_s = jax.nn.softmax(student / temperature)
    q = jnp.take_along_axis(p_s, teacher.indices, axis=-1)
    p = jnp.exp(teacher.log_probs)
    p_bins = jnp.concatenate([p, jnp.exp(teacher.log_tail)[..., None]], axis=-1)
    q_bins = jnp.concatenate([q, (1.0 - jnp.sum(q, axis=-1))[..., None]], axis=-1)
    p_top, q_top = p / jnp.sum(p, -1, keepdims=True), q / jnp.sum(q, -1, keepdims=True)
    tail = jnp.sum(p_bins * (jnp.log(p_bins) - jnp.log(q_bins)), axis=-1)
    top = jnp.sum(p_top * (jnp.log(p_top) - jnp.log(q_top)), axis=-1)
    return temperature**2 * tail, temperature**2 * top


def test_gradients_match_a_naive_dense_implementation():
    """T = 2, k = 3; ours sees garbage at masked tokens, the naive version a clean cache."""
    temperature = 2.0
    weights = np.random.default_rng(5).uniform(0.5, 1.5, WHERE.shape).astype(np.float32)
    weights = jnp.asarray(np.where(WHERE, weights, 0.0))

    def ours(student, teacher):
        tail, top = both_losses(student, teacher, temperature, WHERE)
        return jnp.stack([jnp.sum(weights * tail), jnp.sum(weights * top)])

    def naive(student, teacher):
        tail, top = _naive_dense(student, teacher, temperature)
        return jnp.stack([jnp.sum(weights * tail), jnp.sum(weights * top)])

    got = jax.jit(jax.jacrev(ours))(STUDENT, teacher_for(3, temperature))
    expected = jax.jit(jax.jacrev(naive))(STUDENT, teacher_for(3, temperature, garbage=False))
    assert np.all(np.isfinite(got))
    np.testing.assert_array_equal(np.asarray(got)[:, ~WHERE], 0.0)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    assert np.abs(np.asarray(got)).max() > 0.1


def test_bfloat16_student_logits_are_computed_in_float32():
    teacher = teacher_for(3, 2.0)
    student = jnp.asarray(STUDENT, jnp.bfloat16)
    values = both_losses(student, teacher, 2.0, WHERE)
    expected = both_losses(student.astype(jnp.float32), teacher, 2.0, WHERE)
    for value, reference in zip(values, expected, strict=True):
        assert value.dtype == jnp.float32
        np.testing.assert_allclose(value, reference, rtol=1e-6, atol=1e-7)


def test_an_out_of_range_index_at_a_kept_token_is_nan_under_jit():
    teacher = teacher_for(3, 1.0, garbage=False)
    teacher = teacher._replace(indices=teacher.indices.at[1, 1, 2].set(V))  # a kept token
    for value in map(np.asarray, both_losses(STUDENT, teacher, 1.0, WHERE)):
        assert np.isnan(value[1, 1])
        assert np.all(np.isfinite(np.delete(value.reshape(-1), 4)))


def test_concrete_checks_pass_garbage_at_masked_tokens():
    """Concrete inputs are checked at trace time (here closed over in jit: one compile)."""
    teacher = teacher_for(3, 1.0)
    value = jax.jit(lambda s: tail_bucket_kl(s, teacher, where=WHERE))(STUDENT)
    assert np.all(np.isfinite(value)) and np.all(np.asarray(value)[~WHERE] == 0)
    with pytest.raises(ValueError, match="teacher.indices"):  # the same garbage, kept
        jax.jit(lambda s: tail_bucket_kl(s, teacher))(STUDENT)


def _eager_teacher():
    return teacher_for(3, 1.0, garbage=False)


BAD_LOSS_INPUTS = {
    "tuple_teacher": (lambda t: (STUDENT, tuple(t), {}), TypeError, "SparseTeacher"),
    "float_indices": (
        lambda t: (STUDENT, t._replace(indices=t.indices.astype(jnp.float32)), {}),
        TypeError,
        "teacher.indices",
    ),
    "integer_log_probs": (
        lambda t: (STUDENT, t._replace(log_probs=t.indices), {}),
        TypeError,
        "teacher.log_probs",
    ),
    "leading_shape": (lambda t: (STUDENT[:1], t, {}), ValueError, "teacher.log_probs"),
    "log_tail_shape": (
        lambda t: (STUDENT, t._replace(log_tail=t.log_tail[..., None]), {}),
        ValueError,
        "teacher.log_tail",
    ),
    "k_above_vocabulary": (lambda t: (STUDENT[..., :2], t, {}), ValueError, "k=3"),
    "index_out_of_range": (
        lambda t: (STUDENT, t._replace(indices=t.indices.at[0, 0, 1].set(V)), {}),
        ValueError,
        r"teacher.indices. must lie in \[0, 7\)",
    ),
    "repeated_index": (
        lambda t: (STUDENT, t._replace(indices=t.indices.at[0, 0, 1].set(t.indices[0, 0, 0])), {}),
        ValueError,
        "distinct",
    ),
    "per_class_where": (lambda t: (STUDENT, t, {"where": ALL_CLASSES}), ValueError, "per-token"),
    "integer_where": (lambda t: (STUDENT, t, {"where": WHERE.astype(int)}), TypeError, "boolean"),
    "zero_temperature": (lambda t: (STUDENT, t, {"temperature": 0.0}), ValueError, "temperature"),
    "integer_student": (
        lambda t: (STUDENT.astype(np.int32), t, {}),
        TypeError,
        "student_logits",
    ),
}


@pytest.mark.parametrize("loss", [tail_bucket_kl, top_k_kl], ids=["tail", "top_k"])
@pytest.mark.parametrize("case", sorted(BAD_LOSS_INPUTS))
def test_losses_reject_bad_input(loss, case):
    make, error, match = BAD_LOSS_INPUTS[case]
    student, teacher, kwargs = make(_eager_teacher())
    with pytest.raises(error, match=match):
        loss(student, teacher, **kwargs)


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((TEACHER, 0), ValueError, r"\[1, V\]"),
        ((TEACHER, V + 1), ValueError, r"\[1, V\]"),
        ((TEACHER, 2.0), TypeError, "`k` must be an int"),
        ((TEACHER, True), TypeError, "`k` must be an int"),
        ((TEACHER.astype(np.int32), 2), TypeError, "teacher_logits"),
    ],
)
def test_top_k_teacher_rejects_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        top_k_teacher(*args)


# The objective, in the train step with a cached teacher (teacher_apply=None).

NUM_DEVICES, GLOBAL_BATCH, LENGTH, STEPS, VOCAB = 8, 16, 4, 3, 11
K = 3
PREFIX = "teacher_top_k"


def _uneven_token_mask():
    mask = np.zeros((GLOBAL_BATCH, LENGTH), bool)
    mask[0] = mask[1, :3] = True  # device 0: 7 real tokens
    mask[9, 1:3] = True  # device 4: 2 tokens
    mask[15, 3] = True  # device 7: 1 token; the other devices none
    return mask


def _cached_batch(seed):
    """A token batch with a sparse teacher cache; padding tokens hold garbage."""
    data = token_batch(seed, GLOBAL_BATCH, LENGTH, VOCAB)
    mask = _uneven_token_mask()
    logits = ref.random_logits(100 + seed, (GLOBAL_BATCH, LENGTH, VOCAB))
    # The teacher mostly agrees with the targets, so the student has something to learn.
    logits += 4.0 * np.eye(VOCAB, dtype=np.float32)[data["targets"]]
    log_probs, indices, log_tail = top_k_reference(logits, K, 1.0)
    indices = indices.astype(np.int32)
    indices[~mask] = _garbage_indices(K)
    return {
        **data,
        "mask": mask,
        f"{PREFIX}_log_probs": log_probs.astype(np.float32),
        f"{PREFIX}_indices": indices,
        f"{PREFIX}_log_tail": log_tail.astype(np.float32),
    }


def _student_variables():
    """TinyLM variables drawn in numpy: Flax's eager init costs seconds, its shapes nothing."""
    shapes = jax.eval_shape(lambda: init_lm(TinyLM(vocab_size=VOCAB), seed=2))
    rng = np.random.default_rng(2)
    return jax.tree.map(lambda s: (0.5 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)


def _sparse_step(axis_name):
    optimizer = optax.sgd(0.5)
    params, model_state = jaxkd.split_linen_variables(_student_variables())
    state = jaxkd.TrainState.create(params=params, optimizer=optimizer, model_state=model_state)
    objective = sparse_distillation_objective(
        "tail_kl", alpha=optax.linear_schedule(0.9, 0.6, STEPS), temperature=1.0
    )
    step = jaxkd.make_train_step(
        jaxkd.linen_apply(TinyLM(vocab_size=VOCAB)),
        None,
        objective,
        optimizer,
        axis_name=axis_name,
        input_key="inputs",
    )
    return state, step


@pytest.fixture(scope="module")
def single_device_run():
    state, step = _sparse_step(None)
    step = jax.jit(step)
    history = []
    for k in range(STEPS):
        state, metrics = step(state, None, _cached_batch(k))
        history.append(metrics)
    return step, state, history


def test_sparse_objective_trains_a_toy_model(single_device_run):
    step, _, history = single_device_run
    state, _ = _sparse_step(None)
    data = _cached_batch(0)
    history_20 = []
    for _ in range(20):
        state, metrics = step(state, None, data)
        history_20.append(jax.device_get(metrics))
    losses, kd = ([float(m[key]) for m in history_20] for key in ("loss", "kd_loss"))
    assert losses[-1] < 0.7 * losses[0], losses
    assert kd[-1] < 0.6 * kd[0], kd  # the distillation term itself, whatever alpha does
    assert history_20[-1]["agreement"] > history_20[0]["agreement"]
    assert {"loss", "kd_loss", "ce_loss", "alpha", "temperature", "agreement"} <= set(metrics)
    np.testing.assert_allclose([float(m["alpha"]) for m in history], [0.9, 0.8, 0.7], rtol=1e-6)


def test_sparse_objective_on_8_devices_equals_one_device(single_device_run):
    assert jax.device_count() == NUM_DEVICES
    _, expected_state, expected_history = single_device_run
    mesh = jaxkd.data_mesh()
    state, step = _sparse_step("data")
    run = jaxkd.shard_step(step, mesh)
    state = jaxkd.replicate_on_mesh(state, mesh)
    history = []
    for k in range(STEPS):
        state, metrics = run(state, None, jaxkd.shard_batch(_cached_batch(k), mesh))
        history.append(metrics)
    chex.assert_trees_all_close(state.params, expected_state.params, **TOLERANCE)
    for metrics, expected in zip(history, expected_history, strict=True):
        assert set(metrics) == set(expected)
        chex.assert_trees_all_close(metrics, expected, **TOLERANCE)


def test_sparse_objective_metrics_match_references():
    data = _cached_batch(7)
    kept = data["mask"]
    student = ref.random_logits(8, (GLOBAL_BATCH, LENGTH, VOCAB))
    objectives = [
        sparse_distillation_objective(loss, alpha=0.7, temperature=1.5, cache_temperature=1.5)
        for loss in ("tail_kl", "top_k_kl")
    ]
    step = jnp.zeros((), jnp.int32)
    results = jax.jit(lambda s, b: [o(s, None, b, step) for o in objectives])(student, data)
    # The cache was built at T = 1; the references use it as if it were at T = 1.5.
    log_probs, indices = data[f"{PREFIX}_log_probs"][kept], data[f"{PREFIX}_indices"][kept]
    log_tail = data[f"{PREFIX}_log_tail"][kept]
    references = [
        tail_kl_reference(student[kept], log_probs, indices, log_tail, 1.5),
        top_k_kl_reference(student[kept], log_probs, indices, 1.5),
    ]
    ce = -np.take_along_axis(ref.log_softmax(student[kept]), data["targets"][kept][:, None], -1)
    agreement = np.argmax(student[kept], -1) == indices[:, 0]
    for (total, metrics), kd in zip(results, references, strict=True):
        np.testing.assert_allclose(metrics["kd_loss"], kd.mean(), **TOLERANCE)
        np.testing.assert_allclose(metrics["ce_loss"], ce.mean(), **TOLERANCE)
        np.testing.assert_allclose(metrics["agreement"], agreement.mean(), **TOLERANCE)
        np.testing.assert_allclose(total, 0.7 * kd.mean() + 0.3 * ce.mean(), **TOLERANCE)
        np.testing.assert_allclose(metrics["temperature"], 1.5)
        np.testing.assert_allclose(metrics["alpha"], 0.7, rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(loss="kl"), ValueError, "Unknown `loss`"),
        (dict(temperature=2.0), ValueError, "cache_temperature"),
        (dict(temperature=2.0, cache_temperature=2.0, alpha=1.5), ValueError, "alpha"),
        (dict(temperature=optax.constant_schedule(1.0)), TypeError, "schedule"),
        (dict(cache_temperature=-1.0, temperature=-1.0), ValueError, "positive"),
        (dict(label_key=None), ValueError, "alpha=1.0"),
    ],
)
def test_sparse_objective_rejects_bad_configs(kwargs, error, match):
    with pytest.raises(error, match=match):
        sparse_distillation_objective(**kwargs)


def test_sparse_objective_names_missing_cache_keys():
    objective = sparse_distillation_objective()
    data = _cached_batch(0)
    del data[f"{PREFIX}_log_tail"]
    with pytest.raises(KeyError, match=f"{PREFIX}_log_tail"):
        objective(jnp.zeros((GLOBAL_BATCH, LENGTH, VOCAB)), None, data, 0)
