"""Trainable distillation parts and intermediate features: a hint regressor in the
state, trained with the student and left out of the exported student; features of
unmodified linen and NNX models by path; the feature objective (KD + hints)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxkd
from tests import toy

pytestmark = pytest.mark.usefixtures("fast_compilation")


class Staged(nn.Module):
    """Two hidden stages; the model sows the second stage's output as "pre"."""

    widths: tuple[int, int] = (6, 4)

    @nn.compact
    def __call__(self, x, *, train: bool):
        del train
        x = nn.relu(nn.Dense(self.widths[0], name="stage1")(x))
        h = nn.Dense(self.widths[1], name="stage2")(x)
        self.sow("intermediates", "pre", h)
        return nn.Dense(toy.NUM_CLASSES, name="head")(nn.relu(h))


def _hint_setup(optimizer):
    student, teacher = Staged((6, 3)), Staged((10, 8))
    student_vars, teacher_vars = toy.init(student, 0), toy.init(teacher, 1)
    objective = jaxkd.feature_objective(
        "hint",
        student_feature="stage2",
        teacher_feature="stage2",
        weight=0.5,
        projector="linear",
        base=jaxkd.hinton_objective(alpha=0.5, temperature=2.0),
    )
    student_apply = jaxkd.linen_apply(student, features=["stage2"])
    teacher_apply = jaxkd.linen_teacher_apply(teacher, features=["stage2"])
    batch = toy.batch(0, 8)
    student_out, _ = student_apply(student_vars["params"], {}, batch["image"], train=False)
    teacher_out = teacher_apply(teacher_vars, batch["image"])
    distill_params, distill_state = jaxkd.init_distillation(
        objective, jax.random.key(2), student_out, teacher_out, batch
    )
    state = jaxkd.TrainState.create(
        params=student_vars["params"],
        optimizer=optimizer,
        distill_params=distill_params,
        distill_state=distill_state,
    )
    step = jax.jit(jaxkd.make_train_step(student_apply, teacher_apply, objective, optimizer))
    return state, step, teacher_vars, batch, (student_out, teacher_out)


def test_a_hint_regressor_trains_with_the_student_and_is_not_exported():
    state, step, teacher_vars, batch, (student_out, teacher_out) = _hint_setup(optax.sgd(0.1))
    kernel = state.distill_params["projector"]["kernel"]
    assert kernel.shape == (3, 8)  # the student's stage2 width -> the teacher's
    new, metrics = step(state, teacher_vars, batch)
    for before, after in ((state.params, new.params), (state.distill_params, new.distill_params)):
        changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), before, after)
        assert all(jax.tree.leaves(changed)), changed
    # SGD: the regressor moved by -lr * d(loss)/d(kernel), with the loss written out.
    features = student_out["features"]["stage2"]
    target = teacher_out["features"]["stage2"]

    def hint_term(kernel):
        projected = features @ kernel + state.distill_params["projector"]["bias"][None, :]
        return 0.5 * jnp.mean(jnp.square(projected - target))

    expected = kernel - 0.1 * jax.grad(hint_term)(kernel)
    np.testing.assert_allclose(new.distill_params["projector"]["kernel"], expected, rtol=1e-5)
    np.testing.assert_allclose(
        metrics["loss"],
        metrics["kd_loss"] * 0.5 + metrics["ce_loss"] * 0.5 + hint_term(kernel),
        rtol=1e-5,
    )
    exported = jaxkd.export_student(new)
    assert set(exported) == {"params"}
    assert jax.tree.structure(exported["params"]) == jax.tree.structure(state.params)
    # The exported student runs alone, as a plain linen model.
    logits = Staged((6, 3)).apply(exported, batch["image"], train=False)
    assert logits.shape == (8, toy.NUM_CLASSES)


def test_distillation_optimizer_gives_the_regressor_its_own_transformation():
    optimizer = jaxkd.distillation_optimizer(optax.sgd(0.1), optax.set_to_zero())
    state, step, teacher_vars, batch, _ = _hint_setup(optimizer)
    new, _ = step(state, teacher_vars, batch)
    np.testing.assert_array_equal(
        new.distill_params["projector"]["kernel"], state.distill_params["projector"]["kernel"]
    )
    assert not np.array_equal(new.params["head"]["kernel"], state.params["head"]["kernel"])


def test_a_state_with_distill_params_needs_an_objective_that_trains_them():
    state, _, teacher_vars, batch, _ = _hint_setup(optax.sgd(0.1))
    step = jaxkd.make_train_step(
        jaxkd.linen_apply(Staged((6, 3))),
        jaxkd.linen_teacher_apply(Staged((10, 8))),
        jaxkd.hinton_objective(),
        optax.sgd(0.1),
    )
    with pytest.raises(ValueError, match="`distill_params`.*never be trained"):
        step(state, teacher_vars, batch)


def test_linen_features_by_module_path_and_sown_name_equal_the_computation():
    model = Staged()
    variables = toy.init(model, 0)
    x = toy.batch(1, 4)["image"]
    apply = jaxkd.linen_apply(model, features={"s1": "stage1", "s2": "stage2", "pre": "pre"})
    out, model_state = apply(variables["params"], {}, x, train=True)
    p = variables["params"]
    stage1 = x @ p["stage1"]["kernel"] + p["stage1"]["bias"][None, :]
    stage2 = jax.nn.relu(stage1) @ p["stage2"]["kernel"] + p["stage2"]["bias"][None, :]
    np.testing.assert_allclose(out["features"]["s1"], stage1, rtol=1e-6)
    np.testing.assert_allclose(out["features"]["s2"], stage2, rtol=1e-6)
    np.testing.assert_allclose(out["features"]["pre"], stage2, rtol=1e-6)
    np.testing.assert_allclose(out["logits"], model.apply(variables, x, train=False), rtol=1e-6)
    assert model_state == {}  # the recorded intermediates are not model state
    with pytest.raises(KeyError, match=r"path 'stage3'; the model's paths: \['head', 'pre', "):
        jaxkd.linen_apply(model, features=["stage3"])(p, {}, x, train=False)


def test_nnx_features_by_module_path_equal_the_computation():
    model = toy.NnxMLP(hidden=6, dropout_rate=0.0, rngs=nnx.Rngs(0))
    graphdef, params, rest = jaxkd.nnx_split(model)
    x = toy.batch(2, 4)["image"]
    out, _ = jaxkd.nnx_apply(graphdef, features=["hidden"])(params, rest, x, train=True, rng=None)
    expected = x @ params["hidden"]["kernel"][...] + params["hidden"]["bias"][...][None, :]
    np.testing.assert_allclose(out["features"]["hidden"], expected, rtol=1e-6)
    teacher_out = jaxkd.nnx_teacher_apply(graphdef, features={"h": "hidden"})(
        nnx.split(model)[1], x
    )
    np.testing.assert_allclose(teacher_out["features"]["h"], expected, rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(loss="fitnet"), ValueError, "Unknown feature `loss`"),
        (dict(projector="conv3x3"), ValueError, "Unknown `projector`"),
        (dict(student_feature=""), ValueError, "`student_feature` must name a feature"),
        (dict(weight=-1.0), ValueError, "`weight` must be a non-negative"),
        (dict(loss_kwargs={"p": 2}), ValueError, r"`loss_kwargs` \['p'\] are not options"),
    ],
)
def test_feature_objective_rejects_bad_settings(kwargs, error, match):
    settings = {**dict(loss="hint", student_feature="a", teacher_feature="b"), **kwargs}
    with pytest.raises(error, match=match):
        jaxkd.feature_objective(settings.pop("loss"), **settings)


def test_an_output_without_the_feature_is_a_clear_error():
    objective = jaxkd.feature_objective("sp", student_feature="a", teacher_feature="b")
    batch = toy.batch(0, 4)
    logits = jnp.zeros((4, toy.NUM_CLASSES))
    with pytest.raises(ValueError, match=r"student's outputs carry no features.*features=\['a'\]"):
        objective(logits, logits, batch, 0, distill_params={})
    with pytest.raises(KeyError, match="teacher's outputs have no feature 'b'"):
        objective(
            {"logits": logits, "features": {"a": logits}},
            {"logits": logits, "features": {"c": logits}},
            batch,
            0,
            distill_params={},
        )


def test_relational_feature_term_under_shard_step_equals_one_device():
    """SP on the gathered batch plus KD, 8 devices with an uneven mask vs one device."""
    student, teacher = Staged((6, 3)), Staged((10, 8))
    teacher_vars = toy.init(teacher, 1)
    objective_args = dict(student_feature="stage2", teacher_feature="stage1", weight=2.0)

    def build(axis_name):
        objective = jaxkd.feature_objective("sp", base=jaxkd.hinton_objective(), **objective_args)
        return jaxkd.make_train_step(
            jaxkd.linen_apply(student, features=["stage2"]),
            jaxkd.linen_teacher_apply(teacher, features=["stage1"]),
            objective,
            optax.sgd(0.5),
            axis_name=axis_name,
        )

    batch = toy.batch(3, 16)
    batch["mask"] = np.arange(16) % 5 != 0
    batch["mask"][:2] = False  # the first device holds no real example
    state = jaxkd.TrainState.create(params=toy.init(student, 0)["params"], optimizer=optax.sgd(0.5))
    single, single_metrics = jax.jit(build(None))(state, teacher_vars, batch)
    mesh = jaxkd.data_mesh()
    sharded, metrics = jaxkd.shard_step(build("data"), mesh, donate=False)(
        jaxkd.replicate_on_mesh(state, mesh), teacher_vars, jaxkd.shard_batch(batch, mesh)
    )
    for key in ("loss", "feature_loss", "kd_loss"):
        np.testing.assert_allclose(metrics[key], single_metrics[key], rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
        jax.device_get(sharded.params),
        single.params,
    )


def test_a_state_without_the_objectives_parts_is_a_clear_error():
    state, step, teacher_vars, batch, _ = _hint_setup(optax.sgd(0.1))
    bare = jaxkd.TrainState.create(params=state.params, optimizer=optax.sgd(0.1))
    with pytest.raises(ValueError, match="projector is not in `distill_params`.*init_distillation"):
        step(bare, teacher_vars, batch)
    with pytest.raises(ValueError, match="distillation_optimizer needs a state with"):
        jaxkd.TrainState.create(
            params=state.params,
            optimizer=jaxkd.distillation_optimizer(optax.sgd(0.1), optax.sgd(1.0)),
        )
