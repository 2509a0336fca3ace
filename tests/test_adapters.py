"""Flax linen and Flax NNX students train under the same step."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from toy import MLP, NUM_CLASSES, NUM_FEATURES, batch, init

import jaxkd

TEACHER = MLP(hidden=(32,))
STEPS = 25


class NnxStudent(nnx.Module):
    """Dense -> BatchNorm -> ReLU -> Dropout -> Dense, in NNX."""

    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(NUM_FEATURES, 16, rngs=rngs)
        self.norm = nnx.BatchNorm(16, momentum=0.9, rngs=rngs)
        self.dropout = nnx.Dropout(0.1, rngs=rngs)
        self.out = nnx.Linear(16, NUM_CLASSES, rngs=rngs)

    def __call__(self, x):
        return self.out(self.dropout(nnx.relu(self.norm(self.hidden(x)))))


def _train(student_apply, params, model_state, teacher_variables):
    optimizer = optax.adam(0.03)
    state = jaxkd.TrainState.create(
        params=params, optimizer=optimizer, model_state=model_state, rng=0
    )
    step = jax.jit(
        jaxkd.make_train_step(
            student_apply,
            jaxkd.linen_teacher_apply(TEACHER),
            jaxkd.hinton_objective(alpha=0.5, temperature=2.0),
            optimizer,
        )
    )
    data = batch(0, size=64)
    losses = []
    for _ in range(STEPS):
        state, metrics = step(state, teacher_variables, data)
        losses.append(float(metrics["loss"]))
    return state, losses


def test_linen_student_with_batchnorm_and_dropout_trains():
    student = MLP(hidden=(16,), batch_norm=True, dropout_rate=0.1)
    params, model_state = jaxkd.split_linen_variables(init(student, seed=1))
    assert set(model_state) == {"batch_stats"}
    state, losses = _train(jaxkd.linen_apply(student), params, model_state, init(TEACHER, 0))
    assert losses[-1] < 0.7 * losses[0], losses
    # BatchNorm statistics moved away from their initial values.
    start = jax.tree.leaves(model_state)
    end = jax.tree.leaves(state.model_state)
    assert any(not np.allclose(a, b) for a, b in zip(start, end, strict=True))


def test_nnx_student_with_batchnorm_and_dropout_trains():
    graphdef, params, model_state = jaxkd.nnx_split(NnxStudent(nnx.Rngs(1)))
    state, losses = _train(jaxkd.nnx_apply(graphdef), params, model_state, init(TEACHER, 0))
    assert losses[-1] < 0.7 * losses[0], losses
    means_before = model_state["norm"]["mean"][...]
    means_after = state.model_state["norm"]["mean"][...]
    assert not np.allclose(means_before, means_after)


def test_linen_eval_mode_leaves_batch_stats_and_ignores_dropout():
    student = MLP(hidden=(16,), batch_norm=True, dropout_rate=0.5)
    params, model_state = jaxkd.split_linen_variables(init(student, seed=1))
    apply = jaxkd.linen_apply(student)
    x = jnp.asarray(batch(0)["image"])
    out1, state1 = apply(params, model_state, x, train=False, rng=jax.random.key(0))
    out2, _ = apply(params, model_state, x, train=False, rng=jax.random.key(1))
    chex.assert_trees_all_equal(out1, out2)
    assert state1 is model_state
    train1, _ = apply(params, model_state, x, train=True, rng=jax.random.key(0))
    train2, _ = apply(params, model_state, x, train=True, rng=jax.random.key(1))
    assert not np.allclose(train1, train2)


def test_nnx_teacher_matches_the_module_in_eval_mode():
    model = NnxStudent(nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    x = jnp.asarray(batch(0)["image"])
    model.eval()
    chex.assert_trees_all_close(jaxkd.nnx_teacher_apply(graphdef)(state, x), model(x))


def test_count_params():
    params, _ = jaxkd.split_linen_variables(init(MLP(hidden=(16,)), seed=0))
    assert jaxkd.count_params(params) == NUM_FEATURES * 16 + 16 + 16 * NUM_CLASSES + NUM_CLASSES
