"""One step body, three runners: jit on one device, pmap and shard_map on 8.

Each data-parallel runner must give the same student params, model state and
metrics as the single-device step on the full global batch. The optimizer is
plain SGD: Adam normalizes its update and would hide a gradient off by a factor
of the device count. Masks are uneven across devices (device 0 holds most of the
real examples), so a mean of per-device means cannot pass.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from toy import MLP, batch, init

import jaxkd

NUM_DEVICES = 8
GLOBAL_BATCH = 32
STEPS = 3
TEACHER = MLP(hidden=(32,))
# 6 real examples: 4 on device 0, 1 on device 4, 1 on device 7; the others hold none.
UNEVEN_MASK = np.isin(np.arange(GLOBAL_BATCH), [0, 1, 2, 3, 17, 30])
TOLERANCE = dict(rtol=1e-5, atol=1e-6)


def _student(bn_axis_name=None, batch_norm=False):
    return MLP(hidden=(16,), batch_norm=batch_norm, bn_axis_name=bn_axis_name)


OBJECTIVES = {
    "hinton": lambda: jaxkd.hinton_objective(alpha=0.6, temperature=2.0),
    "dist": lambda: jaxkd.distillation_objective(
        "dist", alpha=0.5, temperature=2.0, loss_kwargs={"beta": 1.0, "gamma": 2.0}
    ),
    "reverse_kl": lambda: jaxkd.distillation_objective("reverse_kl", alpha=0.3, temperature=1.5),
}
# (objective, synchronized BatchNorm student, masked)
SCENARIOS = {
    "uneven_mask": ("hinton", False, True),
    "sync_batch_norm": ("reverse_kl", True, False),
    "batch_level_loss": ("dist", False, True),
}


def _batch(k, masked):
    data = batch(k, GLOBAL_BATCH)
    return {**data, "mask": UNEVEN_MASK} if masked else data


def _build(scenario, axis_name):
    objective, batch_norm, _ = SCENARIOS[scenario]
    optimizer = optax.sgd(0.5)
    bn_axis = axis_name if batch_norm else None
    student = _student(bn_axis, batch_norm)
    params, model_state = jaxkd.split_linen_variables(init(_student(None, batch_norm), seed=1))
    state = jaxkd.TrainState.create(params=params, optimizer=optimizer, model_state=model_state)
    step = jaxkd.make_train_step(
        jaxkd.linen_apply(student),
        jaxkd.linen_teacher_apply(TEACHER),
        OBJECTIVES[objective](),
        optimizer,
        axis_name=axis_name,
    )
    evaluate = jaxkd.make_eval_step(
        jaxkd.linen_apply(student), jaxkd.linen_teacher_apply(TEACHER), axis_name=axis_name
    )
    return state, step, evaluate


@pytest.fixture(scope="module", params=sorted(SCENARIOS))
def reference(request):
    """Single-device state, per-step metrics and final eval sums of a scenario."""
    assert jax.device_count() == NUM_DEVICES
    scenario = request.param
    masked = SCENARIOS[scenario][2]
    teacher = init(TEACHER, seed=0)
    state, step, evaluate = _build(scenario, None)
    step = jax.jit(step)
    history = []
    for k in range(STEPS):
        state, metrics = step(state, teacher, _batch(k, masked))
        history.append(metrics)
    sums = jax.jit(evaluate)(state, teacher, _batch(99, masked))
    return scenario, teacher, state, history, sums


def _assert_same_run(reference, history, final_state, sums):
    _, _, expected_state, expected_history, expected_sums = reference
    for metrics, expected in zip(history, expected_history, strict=True):
        assert set(metrics) == set(expected)
        chex.assert_trees_all_close(metrics, expected, **TOLERANCE)
    chex.assert_trees_all_close(final_state.params, expected_state.params, **TOLERANCE)
    chex.assert_trees_all_close(final_state.model_state, expected_state.model_state, **TOLERANCE)
    chex.assert_trees_all_close(sums, expected_sums, rtol=1e-5)


def test_pmap_step_matches_single_device(reference):
    scenario, teacher, *_ = reference
    masked = SCENARIOS[scenario][2]
    state, step, evaluate = _build(scenario, "batch")
    run = jaxkd.pmap_step(step, axis_name="batch")
    state, teacher = jaxkd.replicate(state), jaxkd.replicate(teacher)
    history = []
    for k in range(STEPS):
        state, metrics = run(state, teacher, jaxkd.split_for_pmap(_batch(k, masked)))
        history.append(jaxkd.unreplicate(metrics))
    sums = jaxkd.pmap_step(evaluate, axis_name="batch", donate=False)(
        state, teacher, jaxkd.split_for_pmap(_batch(99, masked))
    )
    _assert_same_run(reference, history, jaxkd.unreplicate(state), jaxkd.unreplicate(sums))


def test_shard_map_step_matches_single_device(reference):
    scenario, teacher, *_ = reference
    masked = SCENARIOS[scenario][2]
    mesh = jaxkd.data_mesh()
    state, step, evaluate = _build(scenario, "data")
    run = jaxkd.shard_step(step, mesh)
    state, teacher = jaxkd.replicate_on_mesh(state, mesh), jaxkd.replicate_on_mesh(teacher, mesh)
    history = []
    for k in range(STEPS):
        state, metrics = run(state, teacher, jaxkd.shard_batch(_batch(k, masked), mesh))
        history.append(metrics)
    sums = jaxkd.shard_step(evaluate, mesh, donate=False)(
        state, teacher, jaxkd.shard_batch(_batch(99, masked), mesh)
    )
    _assert_same_run(reference, history, state, sums)


def test_unsynchronized_batch_norm_statistics_are_averaged_over_devices():
    """Per-device BatchNorm: the state after a step is the mean of the shards' states.

    Its running means then equal one device's on the global batch (equal shards);
    without the averaging, device 0's statistics would be returned.
    """
    optimizer = optax.sgd(0.5)
    student = _student(None, batch_norm=True)
    params, model_state = jaxkd.split_linen_variables(init(student, seed=1))
    state = jaxkd.TrainState.create(params=params, optimizer=optimizer, model_state=model_state)
    objective = jaxkd.hinton_objective(alpha=0.6, temperature=2.0)
    teacher = init(TEACHER, seed=0)

    def build(axis_name):
        return jaxkd.make_train_step(
            jaxkd.linen_apply(student),
            jaxkd.linen_teacher_apply(TEACHER),
            objective,
            optimizer,
            axis_name=axis_name,
        )

    data = batch(0, GLOBAL_BATCH)
    single = jax.jit(build(None))
    shard_states = [
        single(state, teacher, {k: v[d * 4 : (d + 1) * 4] for k, v in data.items()})[0].model_state
        for d in range(NUM_DEVICES)
    ]
    expected = jax.tree.map(lambda *leaves: jnp.mean(jnp.stack(leaves), axis=0), *shard_states)
    global_state = single(state, teacher, data)[0].model_state

    mesh = jaxkd.data_mesh()
    sharded, _ = jaxkd.shard_step(build("data"), mesh)(
        jaxkd.replicate_on_mesh(state, mesh),
        jaxkd.replicate_on_mesh(teacher, mesh),
        jaxkd.shard_batch(data, mesh),
    )
    chex.assert_trees_all_close(sharded.model_state, expected, **TOLERANCE)
    for layer, statistics in global_state["batch_stats"].items():
        np.testing.assert_allclose(
            sharded.model_state["batch_stats"][layer]["mean"], statistics["mean"], **TOLERANCE
        )


def _sharded_run():
    """``(mesh, run, state, teacher)`` of the uneven-mask scenario under shard_map."""
    mesh = jaxkd.data_mesh()
    state, step, _ = _build("uneven_mask", "data")
    state = jaxkd.replicate_on_mesh(state, mesh)
    teacher = jaxkd.replicate_on_mesh(init(TEACHER, seed=0), mesh)
    return mesh, jaxkd.shard_step(step, mesh), state, teacher


def test_a_long_plain_loop_of_shard_steps_completes():
    """300 steps dispatched back to back, no blocking: the collectives never stall."""
    mesh, run, state, teacher = _sharded_run()
    data = jaxkd.shard_batch(_batch(0, masked=True), mesh)
    for _ in range(300):
        state, metrics = run(state, teacher, data)
    assert int(jax.device_get(state.step)) == 300
    chex.assert_tree_all_finite(metrics)


def test_shard_step_donates_the_state():
    mesh, run, state, teacher = _sharded_run()
    old_leaf = jax.tree.leaves(state.params)[0]
    run(state, teacher, jaxkd.shard_batch(batch(0, GLOBAL_BATCH), mesh))
    assert old_leaf.is_deleted()


def test_mismatched_axis_name_is_a_clear_error():
    _, step, _ = _build("uneven_mask", "batch")
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
