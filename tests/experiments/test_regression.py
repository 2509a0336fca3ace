"""The regression distillation experiment: the objective against a float64 NumPy
reference, the distilled step training the student and the hint regressor, the
exported student, and a few-step run's report."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxkd
from experiments import regression
from experiments.models.autoencoder import Autoencoder, describe, layer_sizes

pytestmark = pytest.mark.usefixtures("fast_compilation")

# Tiny models and a few steps: the run's plumbing, not its numbers.
TINY = dict(
    seeds=(0,),
    teacher_steps=4,
    steps=4,
    batch_size=16,
    teacher_encoder=(12,),
    teacher_latent=6,
    student_encoder=(8,),
    student_latent=3,
    eval_batch_size=256,
    beta=0.5,
)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """``(experiment, results, workdir)`` of a finished few-step run."""
    workdir = str(tmp_path_factory.mktemp("regression"))
    settings = regression.Settings(data_dir=str(tmp_path_factory.mktemp("tfds")), **TINY)
    # The fast_compilation fixture is per test, and this one is set up before it.
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        results = regression.run_experiment(settings, workdir)
    finally:
        jax.config.update("jax_disable_most_optimizations", False)
    return regression.Experiment(settings, workdir), results, workdir


def _numpy_objective(student, teacher, inputs, regressor, mask, *, alpha, beta):
    """alpha MSE(x_s, x_t) + (1 - alpha) MSE(x_s, x) + beta MSE(z_s W + b, z_t), float64,
    each a mean over features, then over the kept examples."""
    f64 = {key: np.asarray(value, np.float64) for key, value in regressor.items()}
    x_s = np.asarray(student["reconstruction"], np.float64)
    x_t = np.asarray(teacher["reconstruction"], np.float64)
    x = np.asarray(inputs, np.float64).reshape(len(x_s), -1)
    hint = np.asarray(student["latent"], np.float64) @ f64["kernel"] + f64["bias"]
    z_t = np.asarray(teacher["latent"], np.float64)
    terms = {
        "teacher_mse": ((x_s - x_t) ** 2).mean(axis=1),
        "input_mse": ((x_s - x) ** 2).mean(axis=1),
        "hint_loss": ((hint - z_t) ** 2).mean(axis=1),
    }
    means = {name: values[mask].mean() for name, values in terms.items()}
    loss = alpha * means["teacher_mse"] + (1 - alpha) * means["input_mse"]
    return loss + beta * means["hint_loss"], means


def test_objective_equals_numpy_reference():
    rng = np.random.default_rng(0)
    batch_size, pixels = 4, 6
    student = {
        "reconstruction": rng.uniform(size=(batch_size, pixels)).astype(np.float32),
        "latent": rng.normal(size=(batch_size, 2)).astype(np.float32),
    }
    teacher = {
        "reconstruction": rng.uniform(size=(batch_size, pixels)).astype(np.float32),
        "latent": rng.normal(size=(batch_size, 3)).astype(np.float32),
    }
    inputs = rng.uniform(size=(batch_size, 2, 3, 1)).astype(np.float32)
    mask = np.array([True, False, True, True])
    objective = regression.distillation_objective(alpha=0.3, beta=0.7)
    regressor, state = jaxkd.init_distillation(
        objective, jax.random.key(0), student, teacher, {"image": inputs}
    )
    assert state == {}
    assert regressor["kernel"].shape == (2, 3) and regressor["bias"].shape == (3,)
    regressor = {**regressor, "bias": jnp.asarray([0.1, -0.2, 0.3], jnp.float32)}

    @jax.jit
    def losses(student, teacher, inputs, mask, regressor):
        masked = objective(
            student, teacher, {"image": inputs, "mask": mask}, 0, distill_params=regressor
        )
        unmasked = objective(student, teacher, {"image": inputs}, 0, distill_params=regressor)
        plain = regression.reconstruction_objective()(
            student, None, {"image": inputs, "mask": mask}, 0
        )
        return masked, unmasked[0], plain[0]

    (loss, metrics), unmasked, plain = losses(student, teacher, inputs, mask, regressor)
    expected, means = _numpy_objective(
        student, teacher, inputs, regressor, mask, alpha=0.3, beta=0.7
    )
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    for name, value in means.items():
        np.testing.assert_allclose(metrics[name], value, rtol=1e-5)
    # The masked example counts nowhere; without a mask every example counts.
    everything = np.ones(batch_size, bool)
    np.testing.assert_allclose(
        unmasked,
        _numpy_objective(student, teacher, inputs, regressor, everything, alpha=0.3, beta=0.7)[0],
        rtol=1e-5,
    )
    assert abs(float(unmasked) - float(loss)) > 1e-3
    # The scratch objective is the input term alone.
    np.testing.assert_allclose(plain, means["input_mse"], rtol=1e-5)


def test_objective_rejects_bad_input():
    with pytest.raises(ValueError, match="alpha"):
        regression.distillation_objective(alpha=1.5, beta=0.1)
    with pytest.raises(ValueError, match="beta"):
        regression.distillation_objective(alpha=0.5, beta=-1.0)
    with pytest.raises(ValueError, match="steps"):
        regression.Settings(steps=0)
    with pytest.raises(ValueError, match="alpha"):
        regression.Settings(alpha=-0.1)
    with pytest.raises(ValueError, match=r"\(2, 4\) and \(2, 5\)"):
        regression.reconstruction_error(jnp.zeros((2, 4)), jnp.zeros((2, 5)))
    with pytest.raises(ValueError, match=r"\[B, 3\]"):
        regression.apply_regressor(
            regression.init_regressor(jax.random.key(0), 3, 2), jnp.ones((2, 4))
        )


def test_autoencoder_outputs_and_sizes():
    model = Autoencoder((256, 128), 16)
    assert layer_sizes(model, 64) == (64, 256, 128, 16, 128, 256, 64)
    assert describe(Autoencoder((32,), 8), 64) == "autoencoder 64-32-8-32-64"
    small = Autoencoder((5,), 2, decoder_sizes=(4, 3))
    x = jnp.linspace(0, 1, 2 * 8 * 8).reshape(2, 8, 8, 1)

    @jax.jit
    def init_and_apply(x):
        variables = small.init(jax.random.key(0), x, train=False)
        return variables, small.apply(variables, x, train=False)

    variables, out = init_and_apply(x)
    assert out["reconstruction"].shape == (2, 64) and out["latent"].shape == (2, 2)
    assert bool(jnp.all((out["reconstruction"] > 0) & (out["reconstruction"] < 1)))
    assert jaxkd.count_params(variables["params"]) == (64 * 5 + 5) + (5 * 2 + 2) + (2 * 4 + 4) + (
        4 * 3 + 3
    ) + (3 * 64 + 64)


def test_distilled_step_trains_student_and_regressor(finished):
    experiment, _, _ = finished
    _, teacher_variables = experiment.run("teacher", 0)  # finished: loaded
    state = experiment.initial_state("distilled", 0, teacher_variables)
    assert set(state.distill_params) == {"kernel", "bias"}
    state = jaxkd.replicate_on_mesh(state, experiment.mesh)
    teacher_variables = jaxkd.replicate_on_mesh(teacher_variables, experiment.mesh)
    batch = {"image": experiment.train_arrays["image"][:16]}
    before = jax.device_get((state.params, state.distill_params))

    # The regressor's gradient, through the teacher's and the student's outputs.
    model = experiment.models["student"]
    objective = experiment.objectives["distilled"]

    @jax.jit
    def regressor_grads(params, teacher_variables, distill_params, batch):
        student_out = model.apply({"params": params}, batch["image"], train=False)
        teacher_out = experiment.teacher_apply(teacher_variables, batch["image"])
        return jax.grad(
            lambda d: objective(student_out, teacher_out, batch, 0, distill_params=d)[0]
        )(distill_params)

    grads = regressor_grads(before[0], jax.device_get(teacher_variables), before[1], batch)
    for name, grad in grads.items():
        assert float(jnp.abs(grad).max()) > 0, name

    _, train_step = experiment.train_step("distilled")
    state, metrics = train_step(state, teacher_variables, jaxkd.shard_batch(batch, experiment.mesh))
    after = jax.device_get((state.params, state.distill_params))
    for part, old, new in zip(("student", "regressor"), before, after, strict=True):
        changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), old, new)
        assert all(jax.tree.leaves(changed)), (part, changed)
    assert {"teacher_mse", "input_mse", "hint_loss", "loss"} <= set(metrics)

    exported = jaxkd.export_student(state)
    assert set(exported) == {"params"}
    assert jax.tree.structure(exported["params"]) == jax.tree.structure(before[0])
    assert "kernel" not in exported["params"]  # the regressor's, at the top level


def test_few_step_run_writes_the_table(finished):
    experiment, results, workdir = finished
    assert [(r["run"], r["seed"]) for r in results] == [
        ("teacher", 0),
        ("scratch", 0),
        ("distilled", 0),
    ]
    table = open(os.path.join(workdir, "results.md")).read()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 4, table  # header + teacher, scratch, distilled
    for title in regression.RUN_TITLES.values():
        assert f"| {title} |" in table
    assert "| test MSE/pixel |" in table and "| FLOPs/example |" in table
    by_run = {r["run"]: r for r in results}
    assert by_run["scratch"]["params"] == by_run["distilled"]["params"]
    assert by_run["teacher"]["params"] > by_run["scratch"]["params"]
    assert by_run["teacher"]["flops_per_example"] > by_run["scratch"]["flops_per_example"] > 0
    for result in results:
        assert 0 < result["mse"] < 1 and 0 < result["validation_mse"] < 1
    # The exported distilled student holds the student's parameters only.
    saved = regression._load_variables(
        os.path.join(workdir, "seed_0", "distilled", "variables.msgpack")
    )
    assert set(saved) == {"params"}
    assert jaxkd.count_params(saved["params"]) == by_run["distilled"]["params"]

    # A rerun reuses the finished runs (nothing trained again); other settings retrain.
    mtime = os.path.getmtime(os.path.join(workdir, "seed_0", "distilled", "result.json"))
    again = regression.run_experiment(experiment.settings, workdir)
    assert again == results
    assert os.path.getmtime(os.path.join(workdir, "seed_0", "distilled", "result.json")) == mtime
    changed = dataclasses.replace(experiment.settings, alpha=0.25)
    assert changed.fields("scratch", 0) == experiment.settings.fields("scratch", 0)
    assert changed.fields("distilled", 0) != experiment.settings.fields("distilled", 0)
