"""One step body, three runners: jit on one device, pmap and shard_map on 8.

Each data-parallel runner must give the same student params and metrics as the
single-device step on the full global batch.
"""

from __future__ import annotations

import chex
import jax
import numpy as np
import optax
import pytest
from toy import MLP, batch, init

import jaxkd

NUM_DEVICES = 8
GLOBAL_BATCH = 32
STEPS = 3
TEACHER = MLP(hidden=(32,))
STUDENT = MLP(hidden=(16,))


def _build(axis_name):
    optimizer = optax.adam(0.05)
    params, model_state = jaxkd.split_linen_variables(init(STUDENT, seed=1))
    state = jaxkd.TrainState.create(params=params, optimizer=optimizer, model_state=model_state)
    step = jaxkd.make_train_step(
        jaxkd.linen_apply(STUDENT),
        jaxkd.linen_teacher_apply(TEACHER),
        jaxkd.hinton_objective(alpha=0.6, temperature=2.0),
        optimizer,
        axis_name=axis_name,
    )
    evaluate = jaxkd.make_eval_step(
        jaxkd.linen_apply(STUDENT), jaxkd.linen_teacher_apply(TEACHER), axis_name=axis_name
    )
    return state, step, evaluate


@pytest.fixture(scope="module")
def reference():
    """Single-device params, per-step metrics and final eval sums."""
    assert jax.device_count() == NUM_DEVICES
    teacher = init(TEACHER, seed=0)
    state, step, evaluate = _build(None)
    step = jax.jit(step)
    history = []
    for k in range(STEPS):
        state, metrics = step(state, teacher, batch(k, GLOBAL_BATCH))
        history.append(metrics)
    sums = jax.jit(evaluate)(state, teacher, batch(99, GLOBAL_BATCH))
    return teacher, state, history, sums


def test_pmap_step_matches_single_device(reference):
    teacher, expected_state, expected_history, expected_sums = reference
    state, step, evaluate = _build("batch")
    run = jaxkd.pmap_step(step, axis_name="batch")
    state = jaxkd.replicate(state)
    teacher_replicated = jaxkd.replicate(teacher)
    for k in range(STEPS):
        state, metrics = run(
            state, teacher_replicated, jaxkd.split_for_pmap(batch(k, GLOBAL_BATCH))
        )
        chex.assert_trees_all_close(
            jaxkd.unreplicate(metrics), expected_history[k], rtol=1e-5, atol=1e-6
        )
    chex.assert_trees_all_close(
        jaxkd.unreplicate(state.params), expected_state.params, rtol=1e-5, atol=1e-6
    )
    sums = jaxkd.pmap_step(evaluate, axis_name="batch", donate=False)(
        state, teacher_replicated, jaxkd.split_for_pmap(batch(99, GLOBAL_BATCH))
    )
    chex.assert_trees_all_close(jaxkd.unreplicate(sums), expected_sums, rtol=1e-5)


def test_shard_map_step_matches_single_device(reference):
    teacher, expected_state, expected_history, expected_sums = reference
    mesh = jaxkd.data_mesh()
    state, step, evaluate = _build("data")
    run = jaxkd.shard_step(step, mesh)
    state = jaxkd.replicate_on_mesh(state, mesh)
    teacher_on_mesh = jaxkd.replicate_on_mesh(teacher, mesh)
    for k in range(STEPS):
        state, metrics = run(
            state, teacher_on_mesh, jaxkd.shard_batch(batch(k, GLOBAL_BATCH), mesh)
        )
        chex.assert_trees_all_close(metrics, expected_history[k], rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(state.params, expected_state.params, rtol=1e-5, atol=1e-6)
    sums = jaxkd.shard_step(evaluate, mesh, donate=False)(
        state, teacher_on_mesh, jaxkd.shard_batch(batch(99, GLOBAL_BATCH), mesh)
    )
    chex.assert_trees_all_close(sums, expected_sums, rtol=1e-5)


def test_shard_step_donates_the_state():
    mesh = jaxkd.data_mesh()
    state, step, _ = _build("data")
    run = jaxkd.shard_step(step, mesh)
    state = jaxkd.replicate_on_mesh(state, mesh)
    teacher = jaxkd.replicate_on_mesh(init(TEACHER, seed=0), mesh)
    old_leaf = jax.tree.leaves(state.params)[0]
    run(state, teacher, jaxkd.shard_batch(batch(0, GLOBAL_BATCH), mesh))
    assert old_leaf.is_deleted()


def test_mismatched_axis_name_is_a_clear_error():
    _, step, _ = _build("batch")
    with pytest.raises(ValueError, match="axis_name='batch'"):
        jaxkd.shard_step(step, jaxkd.data_mesh())
    with pytest.raises(ValueError, match="axis_name='batch'"):
        jaxkd.pmap_step(step, axis_name="data")


def test_indivisible_batch_is_a_clear_error():
    with pytest.raises(ValueError, match="30 examples, not divisible by 8"):
        jaxkd.split_for_pmap(batch(0, 30))
    with pytest.raises(ValueError, match="not divisible"):
        jaxkd.shard_batch(batch(0, 30), jaxkd.data_mesh())


def test_replicate_and_unreplicate_round_trip():
    tree = {"w": np.arange(6.0).reshape(2, 3), "b": np.float32(2.0)}
    replicated = jaxkd.replicate(tree)
    assert replicated["w"].shape == (NUM_DEVICES, 2, 3)
    chex.assert_trees_all_equal(jaxkd.unreplicate(replicated), jax.tree.map(np.asarray, tree))
