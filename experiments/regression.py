"""Regression distillation: a wide autoencoder teacher compressed into a narrow student.

On scikit-learn's 8x8 digits scaled to [0, 1], for every seed the experiment trains

* a teacher autoencoder 64-256-128-16-128-256-64 on the reconstruction error;
* a student autoencoder 64-32-8-32-64 from scratch on the same error;
* the same student (same initialization, data order, steps and optimizer)
  distilled from the frozen teacher with

  .. math::
    \\alpha \\, \\mathrm{MSE}(\\hat x_s, \\hat x_t) + (1 - \\alpha) \\, \\mathrm{MSE}(\\hat x_s, x)
    + \\beta \\, \\mathrm{MSE}(W z_s + b, z_t)

  where :math:`\\hat x_s, \\hat x_t` are the student's and the teacher's
  reconstructions of :math:`x` and the last term is a FitNets hint (Romero et al.,
  2015): a trainable linear regressor :math:`(W, b)` maps the student's 8-dim latent
  code :math:`z_s` to the teacher's 16-dim code :math:`z_t`. The regressor lives in
  ``TrainState.distill_params``: the optimizer trains it with the student, and
  :func:`jaxkd.export_student` leaves it out of the exported student.

It reports the test reconstruction error (MSE per pixel) as mean ± std over seeds,
beside the parameters and FLOPs of each model, in ``WORKDIR/results.md``::

    .venv/bin/python -m experiments.regression --workdir=/tmp/regression
    .venv/bin/python -m experiments.regression --workdir=/tmp/regression --seeds=0 --steps=200

Each step runs data-parallel over all devices (:func:`jaxkd.shard_step`). The
validation split (a seeded 10% of the training split, as in
:mod:`experiments.train`) is what hyper-parameters were chosen on; the test split
is read only for the report. A finished run (``WORKDIR/seed_<s>/<run>/``) is
reused when the settings it depends on are unchanged, and trained again otherwise.

Result (the defaults, seeds 0-2, about a minute on a 2-core CPU): the distilled
student does **not** beat the one from scratch. Test MSE/pixel 0.01477 ± 0.00041
distilled against 0.01471 ± 0.00049 from scratch, better on 1 of 3 seeds (validation:
0.01397 against 0.01418). The settings were tuned on the validation split only, never
on the test split: first on seeds 0 and 1, then the final choice on seeds 10-12, which
the report does not use. Tried: student learning rates 3e-3 and 1e-2 (and 1e-3 for
the deeper student; 1e-2 was best), alpha in {0, 0.3, 0.5, 0.7, 1}, beta in {0,
0.001, 0.003, 0.01, 0.03, 0.1, 0.3}, a hint weight decayed to 0 over the first half
of training, 1000 instead of 3000 steps, and a deeper 64-32-16-8-16-32-64 student
(FitNets' thin and deep case; worse than this one from scratch). The best, alpha=0.5
and beta=0.001, gained 0.0005 validation MSE/pixel on average over seeds 10-12,
within the spread between seeds; hint weights of 0.01 and more hurt on average. A
likely reason: the teacher reconstructs the inputs much better than the student can
(0.006 against 0.014), so its reconstruction is nearly the input itself and carries
little that the target does not; the student's error is set by its 8-dimensional
code, and the hint pulls that code towards a linear image of the teacher's, which is
not what its own decoder needs.

References:
  FitNets: Hints for Thin Deep Nets. Adriana Romero, Nicolas Ballas, Samira Ebrahimi
  Kahou, Antoine Chassang, Carlo Gatta, Yoshua Bengio, ICLR 2015.
  https://arxiv.org/abs/1412.6550
  Distilling the Knowledge in a Neural Network. Geoffrey Hinton, Oriol Vinyals,
  Jeff Dean, 2015. https://arxiv.org/abs/1503.02531
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization
from tqdm.auto import tqdm

import jaxkd
from experiments import data, jsonfiles, models, report
from experiments.models.autoencoder import Autoencoder, describe

RUN_TITLES = {
    "teacher": "teacher",
    "scratch": "student from scratch",
    "distilled": "distilled student (hint + teacher's reconstruction)",
}
COLUMNS = (
    ("validation MSE/pixel", "validation_mse", "{:.5f}"),
    ("test MSE/pixel", "mse", "{:.5f}"),
    ("test MSE to teacher's reconstruction", "teacher_mse", "{:.5f}"),
    ("params", "params", "{:,.0f}"),
    ("FLOPs/example", "flops_per_example", "{:,.0f}"),
    ("train time (s)", "train_time_s", "{:.1f}"),
)


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the experiment trains, and how.

    Attributes:
      seeds: run seeds: initialization, data order, regressor init.
      teacher_steps: optimizer steps of each teacher.
      steps: optimizer steps of each student.
      batch_size: global batch size, divisible by the device count.
      teacher_learning_rate: the teachers' peak Adam learning rate (cosine decay to 0).
      learning_rate: the students' peak Adam learning rate (cosine decay to 0).
      alpha: weight of the student-to-teacher reconstruction error, in [0, 1].
      beta: weight of the latent hint, >= 0.
      teacher_encoder: the teacher's encoder widths (the decoder mirrors them).
      teacher_latent: the teacher's latent width.
      student_encoder: the student's encoder widths.
      student_latent: the student's latent width.
      validation_fraction: share of the training split held out for validation.
      validation_seed: the seed of that split (the same for every run seed).
      eval_batch_size: global batch size of evaluation.
      data_dir: TFDS data directory; None for TFDS's default.
    """

    seeds: tuple[int, ...] = (0, 1, 2)
    teacher_steps: int = 3000
    steps: int = 3000
    batch_size: int = 64
    teacher_learning_rate: float = 3e-3
    learning_rate: float = 1e-2
    alpha: float = 0.5
    beta: float = 0.001
    teacher_encoder: tuple[int, ...] = (256, 128)
    teacher_latent: int = 16
    student_encoder: tuple[int, ...] = (32,)
    student_latent: int = 8
    validation_fraction: float = 0.1
    validation_seed: int = 0
    eval_batch_size: int = 512
    data_dir: str | None = None

    def __post_init__(self):
        if not self.seeds:
            raise ValueError("`seeds` is empty: give at least one seed.")
        for name in ("teacher_steps", "steps", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}.")
        distillation_objective(alpha=self.alpha, beta=self.beta)  # checks both

    def fields(self, kind: str, seed: int) -> dict[str, Any]:
        """The settings run ``kind`` of ``seed`` depends on (a finished run is reused
        only while they stay the same)."""
        teacher = {
            "seed": seed,
            "teacher_steps": self.teacher_steps,
            "teacher_learning_rate": self.teacher_learning_rate,
            "teacher_encoder": list(self.teacher_encoder),
            "teacher_latent": self.teacher_latent,
        }
        shared = {
            "batch_size": self.batch_size,
            "validation_fraction": self.validation_fraction,
            "validation_seed": self.validation_seed,
        }
        if kind == "teacher":
            return {**teacher, **shared}
        student = {
            "seed": seed,
            "steps": self.steps,
            "student_encoder": list(self.student_encoder),
            "student_latent": self.student_latent,
            "learning_rate": self.learning_rate,
            **shared,
        }
        if kind == "scratch":
            return student
        return {
            **student,
            "teacher": self.fields("teacher", seed),
            "alpha": self.alpha,
            "beta": self.beta,
        }


# The objectives -------------------------------------------------------------------


def reconstruction_error(reconstruction: jax.Array, target: jax.Array) -> jax.Array:
    r"""Mean squared error per example, averaged over the features.

    .. math::
      \frac1D \sum_{k=1}^{D} (\hat x_k - x_k)^2

    Args:
      reconstruction: float ``[B, D]``.
      target: float ``[B, D]``, the same shape.

    Returns:
      float ``[B]``: the error per pixel of every example.
    """
    if jnp.ndim(reconstruction) != 2:
        raise ValueError(f"`reconstruction` must be [B, D], got shape {jnp.shape(reconstruction)}.")
    if jnp.shape(reconstruction) != jnp.shape(target):
        raise ValueError(
            "`reconstruction` and `target` must have the same shape, got "
            f"{jnp.shape(reconstruction)} and {jnp.shape(target)}."
        )
    return jnp.mean(jnp.square(reconstruction - target), axis=-1)


def flat_inputs(batch: Mapping[str, Any], *, input_key: str = "image") -> jax.Array:
    """The batch's inputs ``[B, ...]`` flattened to the targets ``[B, D]``."""
    inputs = jnp.asarray(batch[input_key], jnp.float32)
    return inputs.reshape((inputs.shape[0], -1))


def reconstruction_objective(*, input_key: str = "image", mask_key: str = "mask"):
    """The plain autoencoder objective: MSE per pixel between reconstruction and input.

    Returns:
      ``objective(student_out, teacher_out, batch, step, *, axis_name=None) -> (loss,
      metrics)`` for :func:`jaxkd.make_train_step`; ``student_out`` is a mapping with a
      ``"reconstruction"`` ``[B, D]``; ``teacher_out`` is unused. The loss is the mean
      over the global batch's real examples (``batch[mask_key]`` when present).
    """

    def objective(student_out, teacher_out, batch, step, *, axis_name=None):
        del teacher_out, step
        targets = flat_inputs(batch, input_key=input_key)
        errors = reconstruction_error(student_out["reconstruction"], targets)
        means = jaxkd.masked_means(
            {"input_mse": (errors, batch.get(mask_key))}, axis_name=axis_name
        )
        return means["input_mse"], {"loss": means["input_mse"], **means}

    return objective


def init_regressor(rng: jax.Array, in_features: int, out_features: int) -> dict[str, jax.Array]:
    """A linear regressor ``{"kernel": [in, out], "bias": [out]}``: LeCun-normal
    kernel, zero bias."""
    kernel = jax.nn.initializers.lecun_normal()(rng, (in_features, out_features), jnp.float32)
    return {"kernel": kernel, "bias": jnp.zeros((out_features,), jnp.float32)}


def apply_regressor(params: Mapping[str, jax.Array], features: jax.Array) -> jax.Array:
    """``features @ kernel + bias``: ``[B, in]`` to ``[B, out]``."""
    kernel, bias = params["kernel"], params["bias"]
    if jnp.ndim(features) != 2 or features.shape[-1] != kernel.shape[0]:
        raise ValueError(
            f"`features` must be [B, {kernel.shape[0]}] for a regressor kernel "
            f"{kernel.shape}, got shape {jnp.shape(features)}."
        )
    return features @ kernel + bias[None, :]


def distillation_objective(
    *,
    alpha: float,
    beta: float,
    input_key: str = "image",
    mask_key: str = "mask",
):
    r"""Reconstruction distillation with a FitNets hint on the latent code.

    .. math::
      \alpha \, \mathrm{MSE}(\hat x_s, \hat x_t) + (1 - \alpha) \, \mathrm{MSE}(\hat x_s, x)
      + \beta \, \mathrm{MSE}(W z_s + b, z_t)

    each term a mean over the features, then over the global batch's real
    examples. The regressor :math:`(W, b)` is the objective's ``distill_params``,
    trained with the student; ``objective.init`` builds it from the latent widths.

    Args:
      alpha: weight of the error to the teacher's reconstruction, in [0, 1].
      beta: weight of the hint, >= 0.
      input_key: batch key of the inputs ``[B, ...]`` (flattened to the targets).
      mask_key: batch key of an optional bool ``[B]`` mask of real examples.

    Returns:
      ``objective(student_out, teacher_out, batch, step, *, axis_name=None,
      distill_params) -> (loss, metrics)``, with ``student_out`` and ``teacher_out``
      mappings ``{"reconstruction": [B, D], "latent": [B, d]}`` (the teacher's latent
      may be wider), and ``objective.init(rng, student_out, teacher_out, batch) ->
      (distill_params, {})`` (see :func:`jaxkd.init_distillation`). Metrics: ``loss``,
      ``teacher_mse``, ``input_mse`` and ``hint_loss``.

    Raises:
      ValueError: ``alpha`` outside [0, 1] or ``beta`` negative.

    References:
      Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015.
      https://arxiv.org/abs/1412.6550
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"`alpha` must lie in [0, 1], got {alpha}.")
    if not beta >= 0.0:
        raise ValueError(f"`beta` must be >= 0, got {beta}.")

    def objective(student_out, teacher_out, batch, step, *, axis_name=None, distill_params):
        del step
        if teacher_out is None:
            raise ValueError("The distillation objective needs the teacher's outputs.")
        mask = batch.get(mask_key)
        reconstruction = student_out["reconstruction"]
        hint = jaxkd.hint_loss(
            apply_regressor(distill_params, student_out["latent"]),
            teacher_out["latent"],
            where=mask,
        )
        means = jaxkd.masked_means(
            {
                "teacher_mse": (
                    reconstruction_error(reconstruction, teacher_out["reconstruction"]),
                    mask,
                ),
                "input_mse": (
                    reconstruction_error(reconstruction, flat_inputs(batch, input_key=input_key)),
                    mask,
                ),
                "hint_loss": (hint, mask),
            },
            axis_name=axis_name,
        )
        loss = (
            alpha * means["teacher_mse"]
            + (1.0 - alpha) * means["input_mse"]
            + beta * means["hint_loss"]
        )
        return loss, {"loss": loss, **means}

    def init(rng, student_out, teacher_out, batch):
        del batch
        regressor = init_regressor(
            rng, student_out["latent"].shape[-1], teacher_out["latent"].shape[-1]
        )
        return regressor, {}

    objective.init = init
    return objective


# Training and evaluation ----------------------------------------------------------


def make_eval_step(model: Autoencoder, teacher_apply: Callable | None, *, axis_name: str | None):
    """``eval_step(variables, teacher_variables, batch) -> sums`` of the reconstruction error.

    ``variables`` are the evaluated model's (:func:`jaxkd.export_student`). Sums over
    the real examples (``batch["mask"]``), over ``axis_name`` too: ``count``, ``mse``
    (of the model's reconstruction to the input) and, with a teacher,
    ``teacher_mse`` (to the teacher's reconstruction).
    """

    def eval_step(variables, teacher_variables, batch):
        reconstruction = model.apply(variables, batch["image"], train=False)["reconstruction"]
        weights = batch["mask"].astype(jnp.float32)
        errors = reconstruction_error(reconstruction, flat_inputs(batch))
        sums = {"count": jnp.sum(weights), "mse": jnp.sum(weights * errors)}
        if teacher_apply is not None:
            teacher = teacher_apply(teacher_variables, batch["image"])
            errors = reconstruction_error(reconstruction, teacher["reconstruction"])
            sums["teacher_mse"] = jnp.sum(weights * errors)
        if axis_name is not None:
            sums = jax.lax.psum(sums, axis_name)
        return sums

    eval_step.axis_name = axis_name
    return eval_step


def forward_flops(model: Autoencoder, variables, inputs: np.ndarray) -> float:
    """FLOPs per example of the compiled inference forward (reconstruction only)."""
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False)["reconstruction"])
    flops = jaxkd.compiled_flops(forward.lower(variables, inputs).compile())
    return float("nan") if flops is None else flops / len(inputs)


def _save_variables(path: str, variables) -> None:
    with open(path + ".tmp", "wb") as f:
        f.write(serialization.msgpack_serialize(jax.device_get(variables)))
    os.replace(path + ".tmp", path)


def _load_variables(path: str):
    with open(path, "rb") as f:
        return serialization.msgpack_restore(f.read())


class Experiment:
    """The data, mesh, models and compiled steps shared by every run.

    Args:
      settings: what to train.
      workdir: where runs and the report go.
    """

    def __init__(self, settings: Settings, workdir: str):
        self.settings = settings
        self.workdir = workdir
        self.mesh = jaxkd.data_mesh()
        loaded = {
            split: data.load_split("digits", split, settings.data_dir)
            for split in ("train", "test")
        }
        train, validation = data.validation_split(
            len(loaded["train"]["label"]),
            fraction=settings.validation_fraction,
            seed=settings.validation_seed,
        )
        self.train_arrays = data.take(loaded["train"], train)
        self.eval_arrays = {
            "validation": data.take(loaded["train"], validation),
            "test": loaded["test"],
        }
        self.data_sizes = {
            name: len(arrays["label"])
            for name, arrays in {"train": self.train_arrays, **self.eval_arrays}.items()
        }
        self.input_size = int(np.prod(self.train_arrays["image"].shape[1:]))
        self.models = {
            "teacher": Autoencoder(settings.teacher_encoder, settings.teacher_latent),
            "student": Autoencoder(settings.student_encoder, settings.student_latent),
        }
        self.teacher_apply = jaxkd.linen_teacher_apply(self.models["teacher"])
        self.objectives = {
            "teacher": reconstruction_objective(),
            "scratch": reconstruction_objective(),
            "distilled": distillation_objective(alpha=settings.alpha, beta=settings.beta),
        }
        self._steps: dict[str, tuple[optax.GradientTransformation, Callable]] = {}
        self._eval_steps: dict[str, Callable] = {}
        self._flops: dict[str, float] = {}

    def model(self, kind: str) -> Autoencoder:
        """The model of run ``kind``: the teacher's, or the students' (both kinds)."""
        return self.models["teacher" if kind == "teacher" else "student"]

    def train_step(self, kind: str) -> tuple[optax.GradientTransformation, Callable]:
        """``(optimizer, data-parallel train step)`` of run ``kind``; built once."""
        if kind not in self._steps:
            settings = self.settings
            steps, learning_rate = (
                (settings.teacher_steps, settings.teacher_learning_rate)
                if kind == "teacher"
                else (settings.steps, settings.learning_rate)
            )
            optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, max(steps, 1)))
            step = jaxkd.make_train_step(
                jaxkd.linen_apply(self.model(kind)),
                self.teacher_apply if kind == "distilled" else None,
                self.objectives[kind],
                optimizer,
                axis_name="data",
            )
            self._steps[kind] = (optimizer, jaxkd.shard_step(step, self.mesh))
        return self._steps[kind]

    def eval_step(self, role: str) -> Callable:
        """The data-parallel eval step of ``"teacher"`` or ``"student"``; built once."""
        if role not in self._eval_steps:
            teacher_apply = None if role == "teacher" else self.teacher_apply
            step = make_eval_step(self.models[role], teacher_apply, axis_name="data")
            self._eval_steps[role] = jaxkd.shard_step(step, self.mesh, donate=False)
        return self._eval_steps[role]

    def evaluate(self, role: str, variables, teacher_variables, arrays) -> dict[str, float]:
        """Means over a whole split of the eval step's sums; ``variables`` and
        ``teacher_variables`` replicated on the mesh."""
        totals = None
        for batch in data.eval_batches(arrays, global_batch_size=self.settings.eval_batch_size):
            batch = jaxkd.shard_batch(batch, self.mesh)
            sums = self.eval_step(role)(variables, teacher_variables, batch)
            totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        totals = jax.device_get(totals)
        count = float(totals.pop("count"))
        return {key: float(value) / count for key, value in totals.items()}

    def flops_per_example(self, role: str, variables) -> float:
        """:func:`forward_flops` of ``"teacher"`` or ``"student"``; measured once."""
        if role not in self._flops:
            inputs = self.eval_arrays["test"]["image"][:64]
            self._flops[role] = forward_flops(self.models[role], variables, inputs)
        return self._flops[role]

    def initial_state(self, kind: str, seed: int, teacher_variables) -> jaxkd.TrainState:
        """The run's first state: the same student initialization for both students,
        and for ``distilled`` the regressor (:func:`jaxkd.init_distillation`)."""
        optimizer, _ = self.train_step(kind)
        model = self.model(kind)
        key = jax.random.fold_in(jax.random.key(seed), 0 if kind == "teacher" else 1)
        sample = self.train_arrays["image"][:2]
        params, _ = models.init_model(model, key, sample)  # compiled once per model
        distill_params = None
        if kind == "distilled":  # the regressor is sized from the outputs' shapes
            student_out = jax.eval_shape(
                lambda p, x: model.apply({"params": p}, x, train=False), params, sample
            )
            teacher_out = jax.eval_shape(self.teacher_apply, teacher_variables, sample)
            distill_params, _ = jaxkd.init_distillation(
                self.objectives[kind],
                jax.random.fold_in(jax.random.key(seed), 2),
                student_out,
                teacher_out,
                {"image": sample},
            )
        return jaxkd.TrainState.create(
            params=params, optimizer=optimizer, rng=seed, distill_params=distill_params
        )

    def run(self, kind: str, seed: int, teacher_variables=None) -> tuple[dict[str, Any], Any]:
        """Trains run ``kind`` of ``seed`` (or reuses it when finished with the same
        settings); returns ``(result, exported variables)``."""
        settings = self.settings
        rundir = os.path.join(self.workdir, f"seed_{seed}", kind)
        result_path = os.path.join(rundir, "result.json")
        variables_path = os.path.join(rundir, "variables.msgpack")
        fields = jsonfiles.strict(settings.fields(kind, seed))
        if os.path.exists(result_path) and os.path.exists(variables_path):
            result = jsonfiles.read(result_path)
            if result.get("fields") == fields:
                return result, _load_variables(variables_path)
            print(f"{os.path.relpath(rundir, self.workdir)}: settings changed, training again")
        os.makedirs(rundir, exist_ok=True)
        steps = settings.teacher_steps if kind == "teacher" else settings.steps
        _, train_step = self.train_step(kind)
        state = jaxkd.replicate_on_mesh(
            self.initial_state(kind, seed, teacher_variables), self.mesh
        )
        if teacher_variables is not None:
            teacher_variables = jaxkd.replicate_on_mesh(teacher_variables, self.mesh)
        loader = data.TrainLoader(
            self.train_arrays, global_batch_size=settings.batch_size, seed=seed
        )
        records = []
        elapsed = 0.0
        name = os.path.relpath(rundir, self.workdir)
        try:
            # Compiled before the timer starts, on a batch like those to come.
            example = jaxkd.shard_batch({"image": loader.dataset[0]["image"]}, self.mesh)
            compiled = train_step.lower(state, teacher_variables, example).compile()
            for step in tqdm(range(1, steps + 1), desc=name, leave=False):
                tick = time.perf_counter()
                batch = jaxkd.shard_batch({"image": next(loader)["image"]}, self.mesh)
                state, metrics = compiled(state, teacher_variables, batch)
                # Waited for: simulated CPU devices must not run many steps ahead
                # (see jaxkd.parallel._runners).
                jax.block_until_ready(state)
                elapsed += time.perf_counter() - tick
                if step % 100 == 0 or step == steps:
                    records.append({"step": step, **jax.device_get(metrics)})
        finally:
            loader.close()
        exported = jaxkd.export_student(state)  # the student alone: no regressor
        role = "teacher" if kind == "teacher" else "student"
        final = {
            split: self.evaluate(role, exported, teacher_variables, arrays)
            for split, arrays in self.eval_arrays.items()
        }
        variables = jax.device_get(exported)
        model = self.models[role]
        result = {
            "run": kind,
            "seed": seed,
            "model": describe(model, self.input_size),
            "steps": steps,
            "params": jaxkd.count_params(variables["params"]),
            "flops_per_example": self.flops_per_example(role, variables),
            "train_time_s": elapsed,
            **final["test"],
            **{f"validation_{key}": value for key, value in final["validation"].items()},
            "fields": fields,
        }
        jsonfiles.write(os.path.join(rundir, "metrics.json"), records)
        _save_variables(variables_path, variables)
        jsonfiles.write(result_path, result)
        return result, variables


def paired_gain(results: Sequence[dict[str, Any]], key: str = "mse") -> np.ndarray:
    """Scratch minus distilled ``key`` per seed (positive: the distilled student is
    better), in the order of the seeds."""
    by_seed = {(r["run"], r["seed"]): r[key] for r in results}
    seeds = sorted({r["seed"] for r in results if r["run"] == "distilled"})
    return np.asarray([by_seed["scratch", s] - by_seed["distilled", s] for s in seeds])


def write_report(
    results: Sequence[dict[str, Any]], settings: Settings, experiment: Experiment
) -> str:
    """Writes ``results.md`` and ``results.json`` to the workdir; returns the markdown."""
    summary = report.summarize(results, columns=COLUMNS, run_titles=RUN_TITLES)
    table = report.markdown_table(summary, columns=COLUMNS, run_titles=RUN_TITLES)
    seeds = list(settings.seeds)
    title = (
        f"digits autoencoders: distillation with alpha={settings.alpha}, "
        f"beta={settings.beta} (hint), {settings.teacher_steps} teacher / {settings.steps} "
        f"student steps, seeds {seeds}"
    )
    sizes = " / ".join(f"{size:,} {split}" for split, size in experiment.data_sizes.items())
    note = (
        f"Examples: {sizes}; the validation split is a seeded "
        f"{settings.validation_fraction:.0%} of the training split. MSE/pixel is the "
        "mean squared error per pixel of images scaled to [0, 1]; mean ± std over seeds."
    )
    gains = paired_gain(results)
    verdict = (
        f"Scratch minus distilled test MSE/pixel, paired by seed: {gains.mean():.5f}"
        + (f" ± {gains.std():.5f}" if len(gains) > 1 else "")
        + f"; the distilled student is better on {int(np.sum(gains > 0))} of {len(gains)} seeds."
    )
    text = "\n\n".join((title, note, table, verdict))
    with open(os.path.join(experiment.workdir, "results.md"), "w") as f:
        f.write(f"# {text}\n")
    jsonfiles.write(
        os.path.join(experiment.workdir, "results.json"),
        {"title": title, "examples": experiment.data_sizes, "summary": summary, "runs": results},
    )
    return text


def run_experiment(settings: Settings, workdir: str) -> list[dict[str, Any]]:
    """Trains (or reuses) the teacher and both students of every seed; writes the report.

    Returns:
      One result record per (seed, run), teacher first.
    """
    os.makedirs(workdir, exist_ok=True)
    experiment = Experiment(settings, workdir)
    results = []
    for seed in settings.seeds:
        teacher_result, teacher_variables = experiment.run("teacher", seed)
        results.append(teacher_result)
        for kind in ("scratch", "distilled"):
            result, _ = experiment.run(kind, seed, teacher_variables)
            results.append(result)
    write_report(results, settings, experiment)
    return results


def parse_settings(argv: Sequence[str] | None = None) -> tuple[Settings, str]:
    """``(settings, workdir)`` from command-line arguments."""
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="directory for runs and results")
    parser.add_argument("--seeds", default=",".join(map(str, defaults.seeds)))
    parser.add_argument("--steps", type=int, default=defaults.steps, help="student steps")
    parser.add_argument("--teacher_steps", type=int, default=defaults.teacher_steps)
    parser.add_argument("--alpha", type=float, default=defaults.alpha)
    parser.add_argument("--beta", type=float, default=defaults.beta)
    parser.add_argument("--learning_rate", type=float, default=defaults.learning_rate)
    parser.add_argument(
        "--teacher_learning_rate", type=float, default=defaults.teacher_learning_rate
    )
    parser.add_argument("--batch_size", type=int, default=defaults.batch_size)
    parser.add_argument("--data_dir", default=None, help="TFDS data directory")
    args = parser.parse_args(argv)
    seeds = tuple(int(seed) for seed in args.seeds.split(",") if seed.strip())
    settings = dataclasses.replace(
        defaults,
        seeds=seeds,
        steps=args.steps,
        teacher_steps=args.teacher_steps,
        alpha=args.alpha,
        beta=args.beta,
        learning_rate=args.learning_rate,
        teacher_learning_rate=args.teacher_learning_rate,
        batch_size=args.batch_size,
        data_dir=args.data_dir,
    )
    return settings, args.workdir


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    settings, workdir = parse_settings(argv)
    start = time.perf_counter()
    results = run_experiment(settings, workdir)
    with open(os.path.join(workdir, "results.md")) as f:
        print(f.read())
    print(f"total time {time.perf_counter() - start:.1f}s on {jax.devices()[0].platform}")
    return results


if __name__ == "__main__":
    main()
