"""Teacher, student from scratch and distilled student: ``train_and_evaluate``.

For every seed of the config, the runner trains (or, when its final checkpoint
exists, loads) a teacher, then trains the same student twice with the same
initialization, data order, steps and optimizer: once on the labels alone and
once with the distillation objective against the frozen teacher. Every run is
checkpointed with its data position and resumes exactly where it stopped.

The step runs data-parallel over all devices with :func:`jaxkd.shard_step`; on a
multi-host system each process loads its own slice of every global batch.

Workdir layout::

    WORKDIR/seed_<s>/<run>/checkpoints/   Orbax checkpoints (state + loader position)
    WORKDIR/seed_<s>/<run>/metrics.jsonl  train and eval records
    WORKDIR/seed_<s>/<run>/result.json    final evaluation, size, FLOPs, times
    WORKDIR/results.md, results.json, training_curves.png
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from tqdm.auto import tqdm

import jaxkd
from experiments import data, models
from experiments.checkpointing import RunCheckpointer

RUNS = ("teacher", "scratch", "distilled")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "constant")


# Configuration checks ---------------------------------------------------------


def validate_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Raises ``ValueError`` naming the field for any value the run cannot use.

    Runs before any data is built or any model trained.
    """

    def fail(message):
        raise ValueError(f"Bad config: {message}")

    if config.dataset not in data.DATASETS:
        fail(f"dataset={config.dataset!r} is unknown; known: {sorted(data.DATASETS)}.")
    for role in ("teacher", "student"):
        name = config[role].model
        if name not in models.MODEL_NAMES:
            fail(f"{role}.model={name!r} is unknown; known: {list(models.MODEL_NAMES)}.")
    for field in ("batch_size", "eval_batch_size"):
        size = config[field]
        if size <= 0 or size % num_devices:
            fail(f"{field}={size} must be a positive multiple of the {num_devices} devices.")
        if size % jax.process_count():
            fail(f"{field}={size} must divide over {jax.process_count()} processes.")
    for field in ("steps", "teacher.steps"):
        value = config.teacher.steps if field == "teacher.steps" else config.steps
        if value <= 0:
            fail(f"{field}={value} must be positive.")
    for field in ("eval_every", "log_every"):
        if config[field] <= 0:
            fail(f"{field}={config[field]} must be positive.")
    if config.checkpoint_every < 0:
        fail(f"checkpoint_every={config.checkpoint_every} must be >= 0 (0: final only).")
    if not config.distill.temperature > 0:
        fail(f"distill.temperature={config.distill.temperature} must be > 0.")
    if not 0.0 <= config.distill.alpha <= 1.0:
        fail(f"distill.alpha={config.distill.alpha} must lie in [0, 1].")
    if config.optimizer not in OPTIMIZERS:
        fail(f"optimizer={config.optimizer!r} is unknown; known: {OPTIMIZERS}.")
    if config.schedule not in SCHEDULES:
        fail(f"schedule={config.schedule!r} is unknown; known: {SCHEDULES}.")
    if not config.seeds:
        fail("seeds is empty.")
    # The objective checks its own loss name and arguments.
    jaxkd.distillation_objective(
        config.distill.loss,
        alpha=config.distill.alpha,
        temperature=config.distill.temperature,
        **config.distill.loss_kwargs,
    )


# Building blocks --------------------------------------------------------------


def make_optimizer(config, *, steps: int, learning_rate: float) -> optax.GradientTransformation:
    """The configured optimizer with a cosine (or constant) schedule and warmup."""
    if config.schedule == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(
            0.0 if config.warmup_steps else learning_rate,
            learning_rate,
            warmup_steps=config.warmup_steps,
            decay_steps=steps,
        )
    else:
        schedule = optax.constant_schedule(learning_rate)
    if config.optimizer == "sgd":
        optimizer = optax.sgd(schedule, momentum=0.9, nesterov=True)
        if config.weight_decay:
            optimizer = optax.chain(optax.add_decayed_weights(config.weight_decay), optimizer)
        return optimizer
    if config.optimizer == "adamw":
        return optax.adamw(schedule, weight_decay=config.weight_decay)
    return optax.adam(schedule)


def inference_costs(
    apply: Callable, params, model_state, inputs: np.ndarray, *, repeats: int = 5
) -> tuple[float, float]:
    """FLOPs per example and examples per second of the jitted inference forward.

    One compiled forward pass on ``inputs`` (one device) serves both figures: XLA's
    FLOP count divided by the batch size, and the batch size over the median time.
    """
    forward = jax.jit(lambda p, s, x: apply(p, s, x, train=False)[0])
    device = jax.local_devices()[0]
    params, model_state, inputs = jax.device_put((params, model_state, inputs), device)
    compiled = forward.lower(params, model_state, inputs).compile()
    compiled(params, model_state, inputs).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        compiled(params, model_state, inputs).block_until_ready()
        times.append(time.perf_counter() - start)
    flops = jaxkd.compiled_flops(compiled)
    flops = float("nan") if flops is None else flops
    return flops / len(inputs), len(inputs) / float(np.median(times))


def _host(tree) -> dict[str, float]:
    return {key: float(value) for key, value in jax.device_get(tree).items()}


def _truncate_jsonl(path: str, last_step: int) -> None:
    """Drops records written after ``last_step`` (they will be written again)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    with open(path, "w") as f:
        for record in records:
            if record["step"] <= last_step:
                f.write(json.dumps(record) + "\n")


class Experiment:
    """Data, mesh and settings shared by the runs of one config.

    Args:
      config: a validated experiment config.
      workdir: the output directory.
    """

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        self.config = config
        self.workdir = workdir
        self.spec = data.get_spec(config.dataset)
        self.mesh = jaxkd.data_mesh()
        self.is_chief = jax.process_index() == 0
        self._eval_steps: dict[tuple, Callable] = {}
        self._train_steps: dict[tuple, tuple] = {}
        dataset_kwargs = dict(config.dataset_kwargs)
        self.train_arrays = data.load_split(
            config.dataset, self.spec.train_split, config.data_dir, **dataset_kwargs
        )
        self.test_arrays = data.load_split(
            config.dataset, self.spec.eval_split, config.data_dir, **dataset_kwargs
        )

    def model(self, role: str):
        kwargs = dict(self.config[role].model_kwargs)
        if "hidden_sizes" in kwargs:
            kwargs["hidden_sizes"] = tuple(kwargs["hidden_sizes"])
        return models.get_model(self.config[role].model, self.spec.num_classes, **kwargs)

    def loader(self, seed: int) -> data.TrainLoader:
        return data.TrainLoader(
            self.train_arrays, global_batch_size=self.config.batch_size, seed=seed
        )

    def train_step(self, kind, model, objective, teacher_apply, *, steps, learning_rate):
        """``(optimizer, compiled train step)`` of a run kind, built once for all seeds."""
        key = (kind, model, objective, teacher_apply, steps, learning_rate)
        if key not in self._train_steps:
            optimizer = make_optimizer(self.config, steps=steps, learning_rate=learning_rate)
            # Only the distilled student runs the teacher while training; the others
            # see it in evaluation alone (agreement, KL).
            train_teacher = teacher_apply if kind == "distilled" else None
            step = jaxkd.make_train_step(
                jaxkd.linen_apply(model), train_teacher, objective, optimizer, axis_name="data"
            )
            self._train_steps[key] = (optimizer, jaxkd.shard_step(step, self.mesh))
        return self._train_steps[key]

    def eval_step(self, model, teacher_apply, temperature: float) -> Callable:
        """The (compiled once, then reused) eval step of ``model`` against a teacher.

        ``temperature`` is that of the reported ``T^2 KL(teacher || student)``.
        """
        key = (model, teacher_apply, float(temperature))
        if key not in self._eval_steps:
            self._eval_steps[key] = jaxkd.shard_step(
                jaxkd.make_eval_step(
                    jaxkd.linen_apply(model),
                    teacher_apply,
                    axis_name="data",
                    temperature=temperature,
                ),
                self.mesh,
                donate=False,
            )
        return self._eval_steps[key]

    def evaluate(self, evaluate: Callable, state, teacher_params) -> dict[str, float]:
        """Summed eval metrics over the whole test split, as means."""
        totals = None
        for batch in data.eval_batches(
            self.test_arrays, global_batch_size=self.config.eval_batch_size
        ):
            sums = evaluate(state, teacher_params, jaxkd.shard_batch(batch, self.mesh))
            totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
        return jaxkd.summarize_eval(jax.device_get(totals))

    def run(
        self,
        kind: str,
        seed: int,
        model,
        objective,
        *,
        steps: int,
        learning_rate: float,
        teacher: tuple[Any, Any] | None = None,
        rundir: str | None = None,
        eval_temperature: float | None = None,
    ) -> tuple[dict[str, Any], jaxkd.TrainState]:
        """Trains one model to ``steps``, resuming from its last checkpoint.

        Args:
          kind: ``"teacher"``, ``"scratch"`` or ``"distilled"`` (names the run directory).
          seed: the seed of initialization, data order and dropout.
          model: a linen module from :mod:`experiments.models`.
          objective: a jaxkd objective.
          steps: number of optimizer steps.
          learning_rate: peak learning rate.
          teacher: ``(teacher_apply, teacher_variables)`` for distillation, or None.
          rundir: the run's directory; default ``WORKDIR/seed_<seed>/<kind>``.
          eval_temperature: temperature of the reported KL; default the config's.

        Returns:
          ``(result, state)``: the final result record and TrainState.
        """
        config = self.config
        rundir = rundir or os.path.join(self.workdir, f"seed_{seed}", kind)
        result_path = os.path.join(rundir, "result.json")
        os.makedirs(rundir, exist_ok=True)
        metrics_path = os.path.join(rundir, "metrics.jsonl")
        apply = jaxkd.linen_apply(model)
        teacher_apply, teacher_variables = teacher if teacher else (None, None)

        optimizer, train_step = self.train_step(
            kind, model, objective, teacher_apply, steps=steps, learning_rate=learning_rate
        )
        # Both students share this initialization: only the objective differs.
        init_key = jax.random.fold_in(jax.random.key(seed), 0 if kind == "teacher" else 1)
        params, model_state = models.init_model(model, init_key, self.train_arrays["image"][:2])
        state = jaxkd.TrainState.create(
            params=params, optimizer=optimizer, model_state=model_state, rng=seed
        )
        state = jaxkd.replicate_on_mesh(state, self.mesh)
        if teacher_variables is not None:
            teacher_variables = jaxkd.replicate_on_mesh(teacher_variables, self.mesh)
        if eval_temperature is None:
            eval_temperature = config.distill.temperature
        eval_step = self.eval_step(model, teacher_apply, eval_temperature)

        checkpointer = RunCheckpointer(os.path.join(rundir, "checkpoints"))
        loader = self.loader(seed)
        elapsed = 0.0
        restored = checkpointer.restore(state)
        if restored is not None:
            state, extra = restored
            loader.set_state(extra["loader"])
            elapsed = extra["elapsed"]
        start_step = int(jax.device_get(state.step))
        if start_step == steps and os.path.exists(result_path):
            with open(result_path) as f:  # finished earlier: nothing to train or measure
                return json.load(f), state
        if self.is_chief:
            _truncate_jsonl(metrics_path, start_step)

        def save(step):
            checkpointer.save(step, state, {"loader": loader.get_state(), "elapsed": elapsed})

        def log(record):
            if self.is_chief:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")

        progress = tqdm(
            total=steps,
            initial=start_step,
            desc=f"seed {seed} {kind}",
            disable=not self.is_chief,
            leave=False,
        )
        for step in range(start_step + 1, steps + 1):
            tick = time.perf_counter()
            state, metrics = train_step(
                state, teacher_variables, jaxkd.shard_batch(next(loader), self.mesh)
            )
            if step % config.log_every == 0 or step == steps:
                log({"step": step, "split": "train", **_host(metrics)})
            jax.block_until_ready(state)
            elapsed += time.perf_counter() - tick
            if step % config.eval_every == 0 or step == steps:
                log(
                    {
                        "step": step,
                        "split": "test",
                        **self.evaluate(eval_step, state, teacher_variables),
                    }
                )
            if step == steps or (config.checkpoint_every and step % config.checkpoint_every == 0):
                save(step)
            progress.update(1)
        progress.close()
        checkpointer.close()

        final = self.evaluate(eval_step, state, teacher_variables)
        host_params = jax.device_get(state.params)
        flops, throughput = inference_costs(
            apply,
            host_params,
            jax.device_get(state.model_state),
            self.test_arrays["image"][: config.throughput_batch_size],
        )
        result = {
            "run": kind,
            "seed": seed,
            "model": config.teacher.model if kind == "teacher" else config.student.model,
            "steps": steps,
            "params": jaxkd.count_params(host_params),
            "flops_per_example": flops,
            "train_time_s": elapsed,
            "throughput": throughput,
            **final,
        }
        if self.is_chief:
            with open(result_path, "w") as f:
                json.dump(result, f, indent=2)
        return result, state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, Any]]:
    """Runs teacher, scratch and distilled student for every seed; writes the report.

    Returns:
      One result record per (seed, run).
    """
    from experiments import report  # matplotlib only where a report is written

    validate_config(config, jax.device_count())
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    experiment = Experiment(config, workdir)
    supervised = jaxkd.cross_entropy_objective()
    distill = jaxkd.distillation_objective(
        config.distill.loss,
        alpha=config.distill.alpha,
        temperature=config.distill.temperature,
        **config.distill.loss_kwargs,
    )
    teacher_model = experiment.model("teacher")
    teacher_apply = jaxkd.linen_teacher_apply(teacher_model)
    student_model = experiment.model("student")
    results = []
    for seed in _as_ints(config.seeds):
        teacher_result, teacher_state = experiment.run(
            "teacher",
            seed,
            teacher_model,
            supervised,
            steps=config.teacher.steps,
            learning_rate=config.teacher.learning_rate,
        )
        teacher_variables = {"params": teacher_state.params, **teacher_state.model_state}
        teacher = (teacher_apply, teacher_variables)
        results.append(teacher_result)
        for kind, objective in (("scratch", supervised), ("distilled", distill)):
            result, _ = experiment.run(
                kind,
                seed,
                student_model,
                objective,
                steps=config.steps,
                learning_rate=config.learning_rate,
                teacher=teacher,
            )
            results.append(result)
    if jax.process_index() == 0:
        report.write_report(results, config, workdir)
    return results


def _as_ints(seeds: Iterable) -> list[int]:
    return [int(seed) for seed in seeds]
