"""Dynamic distillation: CTKD's reversed, curriculum-scaled temperature gradient; a
per-example temperature from the teacher's confidence; alpha from the teacher-student
gap; each against float64 numpy written from its rule."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxkd
from tests import _reference as ref
from tests import toy

B, C = 6, 5


pytestmark = pytest.mark.usefixtures("fast_compilation")


def _data():
    student = ref.random_logits(0, (B, C))
    teacher = ref.random_logits(1, (B, C), scale=5.0)
    labels = np.array([0, 1, 2, 3, 4, 0], np.int32)
    mask = np.array([True, True, False, True, True, True])
    return student, teacher, {"label": labels, "mask": mask}


def _hinton_reference(student, teacher, labels, mask, temperatures, alpha):
    """alpha * mean_i T_i^2 KL(p_t^Ti || p_s^Ti) + (1 - alpha) * mean_i CE_i over kept i."""
    s, t = student.astype(np.float64), teacher.astype(np.float64)
    temperatures = np.broadcast_to(np.asarray(temperatures, np.float64), (len(s),))[:, None]
    kd = temperatures[:, 0] ** 2 * ref.kl(
        ref.softmax(t / temperatures), ref.softmax(s / temperatures)
    )
    ce = -ref.log_softmax(s)[np.arange(len(s)), labels]
    kd, ce = kd[mask].mean(), ce[mask].mean()
    return alpha * kd + (1 - alpha) * ce, kd, ce


def test_ctkd_reverses_the_temperature_gradient_by_the_curriculum_strength():
    student, teacher, batch = _data()
    objective = jaxkd.ctkd_objective(alpha=0.7, initial_temperature=4.0, curriculum_steps=10)
    params, state = jaxkd.init_distillation(objective, jax.random.key(0), student, teacher, batch)
    assert state == {}
    theta = params["temperature"]

    def loss(student, theta, step):
        return objective(student, teacher, batch, step, distill_params={"temperature": theta})

    value, metrics = loss(student, theta, 0)
    np.testing.assert_allclose(metrics["temperature"], 4.0, rtol=1e-6)
    expected, _, _ = _hinton_reference(student, teacher, batch["label"], batch["mask"], 4.0, 0.7)
    np.testing.assert_allclose(value, expected, rtol=1e-5)

    def plain(theta):  # the same loss, the temperature without the reversal
        temperature = 1.0 + 20.0 * jax.nn.sigmoid(theta)
        kd = jaxkd.kl_divergence(student, teacher, temperature=temperature)
        return 0.7 * jnp.mean(kd[batch["mask"]])

    grad_theta = jax.jit(jax.grad(lambda t, step: loss(student, t, step)[0]))
    strength_at = jax.jit(lambda step: loss(student, theta, step)[1]["reversal_strength"])
    plain_grad = jax.grad(plain)(theta)
    for step, strength in ((0, 0.0), (5, 0.5), (10, 1.0), (50, 1.0)):
        step = jnp.asarray(step, jnp.int32)
        np.testing.assert_allclose(grad_theta(theta, step), -strength * plain_grad, atol=1e-7)
        np.testing.assert_allclose(strength_at(step), strength, atol=1e-7)
    # The student's gradient is Hinton's at the learned temperature.
    grad_student = jax.grad(lambda s: loss(s, theta, 5)[0])(student)
    hinton = jaxkd.hinton_objective(alpha=0.7, temperature=4.0)
    expected = jax.grad(lambda s: hinton(s, teacher, batch, 0)[0])(student)
    np.testing.assert_allclose(grad_student, expected, rtol=1e-5, atol=1e-7)


def test_ctkd_in_the_step_moves_the_temperature_up_the_loss():
    """With the reversal on, SGD raises the KD term through the temperature."""
    model = toy.MLP()
    teacher_vars = toy.init(toy.MLP(hidden=(32,)), 1)
    objective = jaxkd.ctkd_objective(alpha=1.0, curriculum_steps=1)
    batch = toy.batch(0, 8)
    logits = model.apply(toy.init(model, 0), batch["image"], train=False)
    distill_params, _ = jaxkd.init_distillation(objective, jax.random.key(0), logits, None, batch)
    state = jaxkd.TrainState.create(
        params=toy.init(model, 0)["params"], optimizer=optax.sgd(1.0), distill_params=distill_params
    )
    state = state.replace(step=jnp.ones((), jnp.int32))  # full strength from here
    step = jax.jit(
        jaxkd.make_train_step(
            jaxkd.linen_apply(model),
            jaxkd.linen_teacher_apply(toy.MLP(hidden=(32,))),
            objective,
            optax.sgd(1.0),
        )
    )
    new, metrics = step(state, teacher_vars, batch)
    theta, new_theta = state.distill_params["temperature"], new.distill_params["temperature"]
    teacher_logits = toy.MLP(hidden=(32,)).apply(teacher_vars, batch["image"], train=False)

    def kd_at(theta):
        temperature = 1.0 + 20.0 * jax.nn.sigmoid(theta)
        return jnp.mean(jaxkd.kl_divergence(logits, teacher_logits, temperature=temperature))

    np.testing.assert_allclose(new_theta, theta + jax.grad(kd_at)(theta), rtol=1e-4)
    assert metrics["reversal_strength"] == 1.0


def test_confidence_temperatures_and_their_objective_match_numpy():
    student, teacher, batch = _data()
    temperatures = jaxkd.confidence_temperatures(teacher, min_temperature=1.0, max_temperature=9.0)
    p = ref.softmax(teacher.astype(np.float64))
    expected = 1.0 + 8.0 * (1.0 - ref.entropy(p) / math.log(C))
    np.testing.assert_allclose(temperatures, expected, rtol=1e-5)
    assert np.all((temperatures >= 1.0) & (temperatures <= 9.0))
    # A one-hot teacher gets the maximum, a uniform one the minimum.
    extremes = np.array([[50.0, 0, 0, 0, 0], [0.0, 0, 0, 0, 0]], np.float32)
    np.testing.assert_allclose(
        jaxkd.confidence_temperatures(extremes, min_temperature=1.0, max_temperature=9.0),
        [9.0, 1.0],
        atol=1e-4,
    )
    objective = jaxkd.confidence_temperature_objective(
        alpha=0.6, min_temperature=1.0, max_temperature=9.0
    )
    value, metrics = objective(student, teacher, batch, 0)
    total, kd, ce = _hinton_reference(
        student, teacher, batch["label"], batch["mask"], expected, 0.6
    )
    np.testing.assert_allclose(
        [value, metrics["kd_loss"], metrics["ce_loss"]], [total, kd, ce], rtol=1e-5
    )
    np.testing.assert_allclose(metrics["temperature"], expected[batch["mask"]].mean(), rtol=1e-5)
    # No gradient reaches the teacher through its temperatures.
    grad_teacher = jax.grad(lambda t: objective(student, t, batch, 0)[0])(teacher)
    np.testing.assert_array_equal(grad_teacher, np.zeros_like(teacher))


def test_gap_alpha_follows_its_rule_and_is_the_global_batch_gap():
    student, teacher, batch = _data()
    objective = jaxkd.gap_alpha_objective(temperature=2.0, max_alpha=0.8, scale=0.5)
    value, metrics = objective(student, teacher, batch, 0)
    p_t, p_s = ref.softmax(teacher.astype(np.float64)), ref.softmax(student.astype(np.float64))
    gap = ref.kl(p_t, p_s)[batch["mask"]].mean()
    alpha = 0.8 * (1.0 - math.exp(-gap / 0.5))
    total, _, _ = _hinton_reference(student, teacher, batch["label"], batch["mask"], 2.0, alpha)
    np.testing.assert_allclose(
        [metrics["gap"], metrics["alpha"], value], [gap, alpha, total], rtol=1e-5
    )
    # Equal distributions: no gap, alpha 0, the labels alone.
    _, same = objective(teacher, teacher, batch, 0)
    np.testing.assert_allclose([same["gap"], same["alpha"]], [0.0, 0.0], atol=1e-6)
    # alpha is a constant of the step: the gradient is alpha * dKD + (1 - alpha) * dCE.
    hinton = jaxkd.hinton_objective(alpha=float(alpha), temperature=2.0)
    np.testing.assert_allclose(
        jax.grad(lambda s: objective(s, teacher, batch, 0)[0])(student),
        jax.grad(lambda s: hinton(s, teacher, batch, 0)[0])(student),
        rtol=1e-4,
        atol=1e-7,
    )


def test_gap_alpha_under_shard_step_equals_one_device():
    model, teacher = toy.MLP(), toy.MLP(hidden=(32,))
    teacher_vars = toy.init(teacher, 1)
    batch = toy.batch(4, 16)
    batch["mask"] = np.arange(16) % 3 != 0
    batch["mask"][:2] = False
    mesh = jaxkd.data_mesh()
    # The gap is a mean over the global batch (the confidence temperatures are per example).
    for objective in (jaxkd.gap_alpha_objective(),):
        distill_params, _ = jaxkd.init_distillation(objective, None, None, None, batch)
        state = jaxkd.TrainState.create(
            params=toy.init(model, 0)["params"],
            optimizer=optax.sgd(0.5),
            distill_params=distill_params,
        ).replace(step=jnp.ones((), jnp.int32))

        def build(axis_name, objective=objective):
            return jaxkd.make_train_step(
                jaxkd.linen_apply(model),
                jaxkd.linen_teacher_apply(teacher),
                objective,
                optax.sgd(0.5),
                axis_name=axis_name,
            )

        single, expected = jax.jit(build(None))(state, teacher_vars, batch)
        sharded, metrics = jaxkd.shard_step(build("data"), mesh, donate=False)(
            jaxkd.replicate_on_mesh(state, mesh), teacher_vars, jaxkd.shard_batch(batch, mesh)
        )
        for key in ("loss", "alpha", "temperature"):
            np.testing.assert_allclose(metrics[key], expected[key], rtol=1e-5)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
            jax.device_get((sharded.params, sharded.distill_params)),
            (single.params, single.distill_params),
        )


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: jaxkd.ctkd_objective(initial_temperature=30.0), "`initial_temperature`=30.0"),
        (lambda: jaxkd.ctkd_objective(curriculum_steps=0), "`curriculum_steps`"),
        (lambda: jaxkd.ctkd_objective(alpha=1.5), "`alpha` must lie in"),
        (
            lambda: jaxkd.confidence_temperature_objective(
                min_temperature=4.0, max_temperature=2.0
            ),
            "`max_temperature`=2.0",
        ),
        (lambda: jaxkd.confidence_temperature_objective(min_temperature=0.0), "`min_temperature`"),
        (lambda: jaxkd.gap_alpha_objective(scale=0.0), "`scale`"),
        (lambda: jaxkd.gap_alpha_objective(max_alpha=2.0), "`max_alpha`"),
    ],
)
def test_bad_settings_are_refused_by_name(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_one_class_has_no_confidence():
    with pytest.raises(ValueError, match="needs >= 2 classes"):
        jaxkd.confidence_temperatures(np.zeros((3, 1)), min_temperature=1.0, max_temperature=2.0)
