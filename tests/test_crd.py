"""CRD: the NCE loss, scores, memory bank and negatives, and the objective with its state.

The references are float64 numpy, written from the formulas of Tian, Krishnan and
Isola, "Contrastive Representation Distillation" (ICLR 2020): embeddings
``normalize(f W + b)``, scores ``exp(<v, m> / tau) / Z`` with ``Z`` the mean score of
the first batch times ``N``, the NCE loss with noise ``P_n = 1 / N`` summed over the
two directions, and the momentum update of the banks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxkd
from jaxkd.losses._crd import (
    crd_nce_loss,
    crd_scores,
    init_memory_bank,
    sample_negatives,
    update_memory_bank,
)
from jaxkd.train._crd_objective import crd_objective

NUM_DATA = 24
FEATURE_DIM = 4
NUM_NEGATIVES = 5
TEMPERATURE = 0.07
MOMENTUM = 0.5
WEIGHT = 0.8


pytestmark = pytest.mark.usefixtures("fast_compilation")


# ----------------------------------------------------------------------------------------
# Float64 references, from the formulas.


def _normalize(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _nce(positive, negative, num_data):
    """-[log(P+ / (P+ + K Pn)) + sum_k log(K Pn / (P-_k + K Pn))], per example."""
    positive, negative = np.asarray(positive, np.float64), np.asarray(negative, np.float64)
    noise = negative.shape[1] / num_data
    return -(
        np.log(positive / (positive + noise)) + np.sum(np.log(noise / (negative + noise)), axis=1)
    )


def _raw_scores(anchor, bank, positive_index, negative_index, temperature):
    """exp(<v_i, m_j> / tau) for j = positive, then each negative: [B, K + 1]."""
    rows = np.concatenate([np.asarray(positive_index)[:, None], negative_index], axis=1)
    bank = np.asarray(bank, np.float64)[rows]
    return np.exp(np.einsum("bd,bkd->bk", np.asarray(anchor, np.float64), bank) / temperature)


def _update(bank, embeddings, indices, momentum, kept):
    """Each kept row from the old bank; a repeated index keeps its last kept update."""
    old = np.array(bank, np.float64)
    bank = old.copy()
    for row, index, keep in zip(embeddings, indices, kept, strict=True):
        if keep:
            bank[index] = _normalize(momentum * old[index] + (1 - momentum) * row)
    return bank


def _embed(head, features):
    features = np.asarray(features, np.float64).reshape(len(features), -1)
    return _normalize(
        features @ np.asarray(head["kernel"], np.float64) + np.asarray(head["bias"], np.float64)
    )


def _objective_reference(params, state, student_features, teacher_features, indices, kept, negs):
    """(crd loss of the batch, new state) of the whole objective, in float64."""
    student = _embed(params["student_embed"], student_features)
    teacher = _embed(params["teacher_embed"], teacher_features)
    raw = {
        "student_anchor": _raw_scores(student, state["teacher_bank"], indices, negs, TEMPERATURE),
        "teacher_anchor": _raw_scores(teacher, state["student_bank"], indices, negs, TEMPERATURE),
    }
    new_state, per_example = {}, 0.0
    for name, scores in raw.items():
        if state["normalizers_set"]:
            normalizer = float(state[f"{name}_normalizer"])
        else:
            normalizer = scores[kept].mean() * NUM_DATA
        new_state[f"{name}_normalizer"] = normalizer
        per_example = per_example + _nce(
            scores[:, 0] / normalizer, scores[:, 1:] / normalizer, NUM_DATA
        )
    new_state["student_bank"] = _update(state["student_bank"], student, indices, MOMENTUM, kept)
    new_state["teacher_bank"] = _update(state["teacher_bank"], teacher, indices, MOMENTUM, kept)
    return per_example[kept].mean(), new_state


def _assert_state_close(actual, expected, rtol=1e-5, atol=1e-6):
    for key in ("student_bank", "teacher_bank"):
        np.testing.assert_allclose(actual[key], expected[key], rtol=rtol, atol=atol, err_msg=key)
    for key in ("student_anchor_normalizer", "teacher_anchor_normalizer"):
        np.testing.assert_allclose(actual[key], expected[key], rtol=1e-5, err_msg=key)


# ----------------------------------------------------------------------------------------
# The pure functions.


def test_nce_loss_matches_reference_and_masks():
    rng = np.random.default_rng(0)
    positive = rng.uniform(0.01, 2.0, 6).astype(np.float32)
    negative = rng.uniform(0.0, 0.5, (6, 4)).astype(np.float32)
    where = np.array([True, True, False, True, True, False])
    loss_fn = jax.jit(lambda p, n, w: crd_nce_loss(p, n, num_data=30, where=w))

    np.testing.assert_allclose(
        crd_nce_loss(positive, negative, num_data=30), _nce(positive, negative, 30), rtol=1e-6
    )
    masked = loss_fn(positive, negative, where)
    np.testing.assert_allclose(masked, np.where(where, _nce(positive, negative, 30), 0.0), 1e-6)

    # Masked examples may hold anything, even NaN: no effect on values or gradients.
    poisoned_positive = np.where(where, positive, np.nan).astype(np.float32)
    poisoned_negative = np.where(where[:, None], negative, -1.0).astype(np.float32)
    np.testing.assert_array_equal(loss_fn(poisoned_positive, poisoned_negative, where), masked)
    grads = jax.grad(lambda p, n: jnp.sum(loss_fn(p, n, where)), argnums=(0, 1))(
        poisoned_positive, poisoned_negative
    )
    assert all(bool(jnp.isfinite(g).all()) for g in grads)
    np.testing.assert_array_equal(grads[0][~where], 0.0)
    # The NCE gradient: d/dP+ = -K Pn / (P+ (P+ + K Pn)), d/dP- = 1 / (P- + K Pn).
    noise = 4 / 30
    expected = -noise / (positive * (positive + noise))
    np.testing.assert_allclose(grads[0][where], expected[where], rtol=1e-5)
    np.testing.assert_allclose(grads[1][where], 1 / (negative[where] + noise), rtol=1e-5)


@pytest.mark.parametrize("num_negatives", [3, 40], ids=["gathered_rows", "dense_matmul"])
def test_scores_match_reference(num_negatives):
    rng = np.random.default_rng(1)
    anchor = _normalize(rng.normal(size=(3, FEATURE_DIM))).astype(np.float32)
    bank = _normalize(rng.normal(size=(NUM_DATA, FEATURE_DIM))).astype(np.float32)
    positive_index = np.array([4, 0, 23])
    negative_index = rng.integers(0, NUM_DATA, (3, num_negatives))
    positive, negative = crd_scores(
        anchor, bank, positive_index, negative_index, temperature=TEMPERATURE, normalizer=7.5
    )
    expected = _raw_scores(anchor, bank, positive_index, negative_index, TEMPERATURE) / 7.5
    np.testing.assert_allclose(positive, expected[:, 0], rtol=2e-5)
    np.testing.assert_allclose(negative, expected[:, 1:], rtol=2e-5)
    # The bank is memory: no gradient flows into it.
    bank_grad = jax.grad(
        lambda m: jnp.sum(
            crd_scores(anchor, m, positive_index, negative_index, temperature=0.1, normalizer=1)[0]
        )
    )(bank)
    np.testing.assert_array_equal(bank_grad, 0.0)


def test_update_memory_bank_matches_reference():
    rng = np.random.default_rng(2)
    bank = init_memory_bank(jax.random.key(0), NUM_DATA, FEATURE_DIM)
    embeddings = _normalize(rng.normal(size=(6, FEATURE_DIM))).astype(np.float32)
    # Index 7 is repeated (its last kept update wins); 11 and 3 are masked.
    indices = np.array([7, 11, 2, 7, 3, 20])
    where = np.array([True, False, True, True, False, True])
    update = jax.jit(lambda m, e, i, w: update_memory_bank(m, e, i, momentum=MOMENTUM, where=w))
    new = np.asarray(update(bank, embeddings, indices, where))

    np.testing.assert_allclose(new, _update(bank, embeddings, indices, MOMENTUM, where), 1e-6)
    untouched = np.setdiff1d(np.arange(NUM_DATA), [7, 2, 20])
    np.testing.assert_array_equal(new[untouched], np.asarray(bank)[untouched])  # bit for bit
    np.testing.assert_allclose(np.linalg.norm(new[[7, 2, 20]], axis=1), 1.0, rtol=1e-6)
    # Initialization as in the reference: uniform in +-sqrt(3 / D), not normalized.
    assert float(jnp.max(jnp.abs(bank))) <= np.sqrt(3 / FEATURE_DIM)


def test_negatives_never_the_positive_and_per_example():
    rng = jax.random.key(3)
    draw = jax.jit(lambda key, indices: sample_negatives(key, indices, 5, 12))
    indices = np.arange(6)
    negatives = np.asarray(draw(rng, indices))
    assert negatives.shape == (6, 5) and negatives.dtype == np.int32
    assert not (negatives == indices[:, None]).any()
    many = jax.vmap(draw, in_axes=(0, None))(jax.random.split(rng, 60), indices)
    many = np.moveaxis(np.asarray(many), 1, 0).reshape(6, -1)  # [6, 60 * 5] draws
    for row, positive in zip(many, indices, strict=True):  # every other index, never itself
        assert set(row.tolist()) == set(range(12)) - {positive}
    # The draw depends on the example's index, not on its place in the batch or on the
    # other examples of its batch (or shard).
    other = np.array([4, 1, 11, 0, 8, 2])
    np.testing.assert_array_equal(
        np.asarray(draw(rng, other))[[0, 1, 3, 5]], negatives[[4, 1, 0, 2]]
    )
    assert not (np.asarray(draw(jax.random.key(4), indices)) == negatives).all()


# ----------------------------------------------------------------------------------------
# The objective.


def _outputs(seed, batch_size=6):
    rng = np.random.default_rng(seed)
    student = {"features": {"s": rng.normal(size=(batch_size, 5)).astype(np.float32)}}
    teacher = {"features": {"t": rng.normal(size=(batch_size, 3, 2)).astype(np.float32)}}
    return student, teacher


def _objective(**kwargs):
    options = dict(
        num_data=NUM_DATA,
        student_feature="s",
        teacher_feature="t",
        feature_dim=FEATURE_DIM,
        num_negatives=NUM_NEGATIVES,
        nce_temperature=TEMPERATURE,
        momentum=MOMENTUM,
        weight=WEIGHT,
    )
    return crd_objective(**{**options, **kwargs})


def _call(objective):
    def call(params, state, student, teacher, batch, rng):
        return objective(
            student, teacher, batch, 0, distill_params=params, distill_state=state, rng=rng
        )

    return jax.jit(call)


def test_objective_matches_reference_for_two_steps():
    objective = _objective()
    call = _call(objective)
    student, teacher = _outputs(0)
    params, state = objective.init(jax.random.key(1), student, teacher, {})
    assert params["student_embed"]["kernel"].shape == (5, FEATURE_DIM)
    assert params["teacher_embed"]["kernel"].shape == (6, FEATURE_DIM)  # [B, 3, 2] flattened
    assert state["student_bank"].shape == (NUM_DATA, FEATURE_DIM)
    assert not state["normalizers_set"]
    rng = jax.random.key(2)
    batches = [  # step 1 sets Z (from its 5 kept examples); step 2 keeps it
        {"index": np.array([3, 17, 0, 9, 23, 12]), "mask": np.array([1, 1, 0, 1, 1, 1], bool)},
        {"index": np.array([17, 5, 9, 21, 1, 4]), "mask": np.array([1, 1, 1, 0, 1, 1], bool)},
    ]
    reference_state = jax.tree.map(np.asarray, state)
    for step, batch in enumerate(batches):
        student, teacher = _outputs(10 + step)
        loss, metrics, state = call(params, state, student, teacher, batch, rng)
        negatives = np.asarray(sample_negatives(rng, batch["index"], NUM_NEGATIVES, NUM_DATA))
        crd, reference_state = _objective_reference(
            params,
            reference_state,
            student["features"]["s"],
            teacher["features"]["t"],
            batch["index"],
            batch["mask"],
            negatives,
        )
        reference_state["normalizers_set"] = True
        np.testing.assert_allclose(metrics["crd_loss"], crd, rtol=2e-5)
        np.testing.assert_allclose(loss, WEIGHT * crd, rtol=2e-5)
        _assert_state_close(state, reference_state)
        assert bool(state["normalizers_set"])


def test_gradient_matches_finite_differences_of_the_reference():
    objective = _objective()
    student, teacher = _outputs(4)
    params, state = objective.init(jax.random.key(5), student, teacher, {})
    batch = {"index": np.array([2, 8, 19, 0, 13, 7]), "mask": np.array([1, 1, 1, 1, 0, 1], bool)}
    rng = jax.random.key(6)
    negatives = np.asarray(sample_negatives(rng, batch["index"], NUM_NEGATIVES, NUM_DATA))
    # A state whose normalizers are set (Z is a constant of the loss, as after step 1).
    reference_state = jax.tree.map(np.asarray, state)
    _, first = _objective_reference(
        params,
        reference_state,
        student["features"]["s"],
        teacher["features"]["t"],
        batch["index"],
        batch["mask"],
        negatives,
    )
    for name in ("student_anchor_normalizer", "teacher_anchor_normalizer"):
        reference_state[name] = np.float32(first[name])
    reference_state["normalizers_set"] = np.array(True)
    grads = jax.jit(
        jax.grad(
            lambda p, s: objective(
                student, teacher, batch, 0, distill_params=p, distill_state=s, rng=rng
            )[0]
        )
    )(params, reference_state)

    def reference_loss(flat):
        tree = jax.tree.unflatten(jax.tree.structure(params), flat)
        crd, _ = _objective_reference(
            tree,
            reference_state,
            student["features"]["s"],
            teacher["features"]["t"],
            batch["index"],
            batch["mask"],
            negatives,
        )
        return WEIGHT * crd

    flat = [np.asarray(leaf, np.float64) for leaf in jax.tree.leaves(params)]
    flat_grads = [np.asarray(g, np.float64) for g in jax.tree.leaves(grads)]
    assert all(np.abs(g).max() > 1e-3 for g in flat_grads)  # both heads are trained
    directions = np.random.default_rng(7)
    for _ in range(3):
        direction = [directions.normal(size=leaf.shape) for leaf in flat]
        eps = 1e-6
        plus = reference_loss([x + eps * d for x, d in zip(flat, direction, strict=True)])
        minus = reference_loss([x - eps * d for x, d in zip(flat, direction, strict=True)])
        numeric = (plus - minus) / (2 * eps)
        analytic = sum(np.sum(g * d) for g, d in zip(flat_grads, direction, strict=True))
        np.testing.assert_allclose(analytic, numeric, rtol=2e-4)


def test_bad_input_is_refused_naming_the_argument():
    with pytest.raises(ValueError, match="num_negatives"):
        _objective(num_negatives=NUM_DATA)
    with pytest.raises(ValueError, match="num_negatives"):
        sample_negatives(jax.random.key(0), np.array([1]), 6, 6)
    with pytest.raises(ValueError, match="indices"):
        sample_negatives(jax.random.key(0), np.array([6]), 2, 6)
    objective = _objective()
    student, teacher = _outputs(0)
    params, state = objective.init(jax.random.key(1), student, teacher, {})
    kwargs = dict(distill_params=params, distill_state=state, rng=jax.random.key(2))
    with pytest.raises(KeyError, match="index_key"):
        objective(student, teacher, {"mask": np.ones(6, bool)}, 0, **kwargs)
    flat_student = {"features": {"s": np.ones(6, np.float32)}}
    with pytest.raises(ValueError, match="student_feature"):
        objective(flat_student, teacher, {"index": np.arange(6)}, 0, **kwargs)
    with pytest.raises(KeyError, match="teacher_feature"):
        objective(student, {"features": {}}, {"index": np.arange(6)}, 0, **kwargs)
    with pytest.raises(ValueError, match="mask"):
        objective(student, teacher, {"index": np.arange(6), "mask": np.ones(5, bool)}, 0, **kwargs)


# ----------------------------------------------------------------------------------------
# Data parallel: 8 devices equal one.


def _student_apply(params, model_state, inputs, *, train, rng):
    del train, rng
    hidden = jnp.tanh(inputs @ params["w1"])
    return {"logits": hidden @ params["w2"], "features": {"s": hidden}}, model_state


def _teacher_apply(params, inputs):
    hidden = jnp.tanh(inputs @ params["w1"])
    return {"logits": hidden @ params["w2"], "features": {"t": hidden.reshape(-1, 3, 2)}}


def test_eight_devices_equal_one_device_for_two_steps():
    rng = np.random.default_rng(8)
    params = {"w1": rng.normal(size=(7, 5)) / 3, "w2": rng.normal(size=(5, 4))}
    teacher_params = {"w1": rng.normal(size=(7, 6)) / 3, "w2": rng.normal(size=(6, 4))}
    params, teacher_params = jax.tree.map(lambda x: x.astype(np.float32), (params, teacher_params))
    # Two examples a device; devices 2 and 5 hold padding only.
    mask = np.ones(16, bool)
    mask[[4, 5, 10, 11, 15]] = False
    batches = [
        {
            "image": rng.normal(size=(16, 7)).astype(np.float32),
            "label": rng.integers(0, 4, 16).astype(np.int32),
            "index": rng.permutation(NUM_DATA)[:16].astype(np.int32),
            "mask": mask,
        }
        for _ in range(2)
    ]
    objective = _objective(base=jaxkd.hinton_objective(alpha=0.5, temperature=2.0))
    first_student, _ = _student_apply(params, {}, batches[0]["image"], train=True, rng=None)
    first_teacher = _teacher_apply(teacher_params, batches[0]["image"])
    distill_params, distill_state = objective.init(
        jax.random.key(9), first_student, first_teacher, batches[0]
    )
    optimizer = optax.sgd(0.5)
    state = jaxkd.TrainState.create(
        params=params,
        optimizer=optimizer,
        rng=10,
        distill_params=distill_params,
        distill_state=distill_state,
    )

    def run(step, state, place=lambda b: b):
        losses = []
        for batch in batches:
            state, metrics = step(state, teacher_params, place(batch))
            losses.append(float(metrics["loss"]))
        return state, losses

    single = jaxkd.make_train_step(
        _student_apply, _teacher_apply, objective, optimizer, extra_metrics=False
    )
    single_state, single_losses = run(jax.jit(single), state)

    mesh = jaxkd.data_mesh(jax.devices()[:8])
    sharded = jaxkd.make_train_step(
        _student_apply,
        _teacher_apply,
        objective,
        optimizer,
        axis_name="data",
        extra_metrics=False,
    )
    sharded_state, sharded_losses = run(
        jaxkd.shard_step(sharded, mesh, donate=False),
        jaxkd.replicate_on_mesh(state, mesh),
        lambda batch: jaxkd.shard_batch(batch, mesh),
    )

    np.testing.assert_allclose(sharded_losses, single_losses, rtol=1e-5)
    assert single_losses[0] != single_losses[1]
    for name in ("params", "distill_params"):
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
            getattr(sharded_state, name),
            getattr(single_state, name),
        )
    _assert_state_close(sharded_state.distill_state, single_state.distill_state)
    # The banks moved (rows of kept examples only) and the heads were trained.
    kept_rows = np.concatenate([b["index"][b["mask"]] for b in batches])
    moved = np.any(single_state.distill_state["student_bank"] != distill_state["student_bank"], 1)
    assert set(np.flatnonzero(moved)) == set(kept_rows.tolist())
    assert not np.allclose(
        single_state.distill_params["student_embed"]["kernel"],
        distill_params["student_embed"]["kernel"],
    )


def test_a_missing_state_and_an_out_of_range_index_under_jit_are_not_silent():
    objective = _objective()
    student, teacher = _outputs(0)
    batch = {"index": np.array([0, 1, 2, 3, 4, NUM_DATA + 3], np.int32)}
    params, state = objective.init(jax.random.key(0), student, teacher, batch)
    with pytest.raises(
        ValueError, match=r"`distill_state` lacks \['student_bank', 'teacher_bank'\]"
    ):
        objective(student, teacher, batch, 0, distill_params=params, distill_state={}, rng=None)
    loss, _, _ = _call(objective)(params, state, student, teacher, batch, jax.random.key(1))
    assert np.isnan(loss)  # a real example's index past num_data: unchecked under jit
    batch["mask"] = np.array([True] * 5 + [False])  # masked: any index is fine
    loss, _, _ = _call(objective)(params, state, student, teacher, batch, jax.random.key(1))
    assert np.isfinite(loss)
