"""Teacher, student from scratch and distilled student: ``train_and_evaluate``.

For every seed of the config, the runner trains (or, when its final checkpoint
exists, loads) a teacher, then trains the same student twice with the same
initialization, data order, steps and optimizer: once on the labels alone and
once with the distillation objective against the frozen teacher. The config's
``student_runs`` may add ``distilled_cached``: the distilled student trained from
the teacher's outputs cached once over the training split
(:mod:`experiments.cache_teacher`, written when missing), with no teacher forward
in the step; with the full float32 logits (``cache.k=0``, ``cache.dtype=float32``,
the defaults) it trains exactly as ``distilled`` does. Every run is
checkpointed with its data position and resumes exactly where it stopped; in a
single-process run Ctrl-C stops it at the next step with a checkpoint
(:mod:`experiments.interrupt`). A run records the config
fields it depends on (:mod:`experiments.run_config`) and is reused only while
they stay the same.

The training split loses a seeded ``validation_fraction`` of its examples to a
validation split (:func:`experiments.data.validation_split`), which no run trains
on; every run is evaluated on it and on the test split. Each run's train step is
compiled ahead of time, before the timer starts: ``compile_time_s`` is the
compilation, ``train_time_s`` the steps and their data loading (no evaluation or
checkpoints).

The step runs data-parallel over all devices with :func:`jaxkd.shard_step`; on a
multi-host system each process loads its own slice of every global batch.

Workdir layout::

    WORKDIR/seed_<s>/<run>/run_config.json  the config fields the run depends on
    WORKDIR/seed_<s>/<run>/checkpoints/     Orbax checkpoints (state + Grain iterator state)
    WORKDIR/seed_<s>/<run>/metrics.jsonl    train and eval records
    WORKDIR/seed_<s>/<run>/result.json      final evaluation, size, FLOPs, times
    WORKDIR/seed_<s>/teacher_cache/full/    the teacher's cached logits (distilled_cached)
    WORKDIR/results.md, results.json, training_curves.png
"""

from __future__ import annotations

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
from experiments import cache_teacher, data, jsonfiles, methods, models, run_config
from experiments.checkpointing import RunCheckpointer
from experiments.checks import check_workdir, validate_config
from experiments.data import augment
from experiments.data import loader as loaders
from experiments.data.teacher_cache import DTYPES, CachedTeacherLoader, TeacherCache
from experiments.errors import ExperimentError
from experiments.interrupt import Interrupted, StopOnInterrupt
from experiments.interrupt import message as interrupt_message
from jaxkd.train._sparse_objective import SPARSE_LOSSES, sparse_distillation_objective

RUNS = ("teacher", "scratch", "distilled")  # the teacher and the default student_runs
STUDENT_RUNS = ("scratch", "distilled", "distilled_cached", "distilled_dynamic")
# The runs that distill from the teacher online (its forward inside the step).
ONLINE_RUNS = ("distilled", "distilled_dynamic")


# Building blocks --------------------------------------------------------------


def make_optimizer(config, *, steps: int, learning_rate: float) -> optax.GradientTransformation:
    """The configured optimizer with a cosine (with warmup), step or constant schedule.

    ``schedule="step"`` multiplies the learning rate by ``config.decay_factor`` at
    each of ``config.decay_steps`` (the step counts from which the decayed rate
    applies, as the epoch milestones of the CRD recipe: 0.1 at epochs 150, 180 and
    210 of 240); it has no warmup. SGD uses Nesterov momentum unless
    ``config.nesterov`` is False (CRD's recipe uses plain momentum).
    """
    if config.schedule == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(
            0.0 if config.warmup_steps else learning_rate,
            learning_rate,
            warmup_steps=config.warmup_steps,
            decay_steps=steps,
        )
    elif config.schedule == "step":
        boundaries = [int(step) for step in config.get("decay_steps", ())]
        factor = float(config.get("decay_factor", 0.1))
        if not boundaries or boundaries != sorted(set(boundaries)) or boundaries[0] <= 0:
            raise ValueError(
                "schedule='step' needs decay_steps, increasing positive step counts; "
                f"got {config.get('decay_steps')!r}."
            )
        if not factor >= 0.0:
            raise ValueError(f"decay_factor={factor} must be >= 0.")
        schedule = optax.piecewise_constant_schedule(
            learning_rate, {step: factor for step in boundaries}
        )
    else:
        schedule = optax.constant_schedule(learning_rate)
    if config.optimizer == "sgd":
        momentum = config.momentum or None  # 0: plain SGD
        nesterov = momentum is not None and bool(config.get("nesterov", True))
        optimizer = optax.sgd(schedule, momentum=momentum, nesterov=nesterov)
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


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """:func:`validate_config`, then ``student_runs`` and ``cache``; raises
    ``ExperimentError`` naming the field."""
    validate_config(config, num_devices)

    def fail(message):
        raise ExperimentError(f"Bad config: {message}")

    kinds = tuple(config.student_runs)
    if not kinds or len(set(kinds)) < len(kinds) or not set(kinds) <= set(STUDENT_RUNS):
        fail(f"student_runs={kinds}; expected distinct runs among {STUDENT_RUNS}.")
    cache = config.cache
    num_classes = data.get_spec(config.dataset).num_classes
    if not 0 <= int(cache.k) <= num_classes:
        fail(f"cache.k={cache.k} must lie in [0, {num_classes}] (0: the full logits).")
    if cache.dtype not in DTYPES:
        fail(f"cache.dtype={cache.dtype!r}; expected one of {sorted(DTYPES)}.")
    if int(cache.batch_size) < 0:
        fail(f"cache.batch_size={cache.batch_size} must be >= 0 (0: batch_size).")
    if cache.loss not in SPARSE_LOSSES:
        fail(f"cache.loss={cache.loss!r}; expected one of {sorted(SPARSE_LOSSES)}.")
    methods.check(config, kinds, fail)
    try:
        augment.check_config(config, data.get_spec(config.dataset).input_shape)
    except ValueError as error:
        fail(str(error))


def cached_objective(config: ml_collections.ConfigDict):
    """The ``distilled_cached`` objective: the distilled one on the cached full logits,
    or ``cache.loss`` (with distill's alpha and temperature) on a top-k cache."""
    if not config.cache.k:
        return methods.logit_objective(config)
    return sparse_distillation_objective(
        config.cache.loss,
        alpha=config.distill.alpha,
        temperature=config.distill.temperature,
        cache_temperature=config.distill.temperature,
        label_key="label",
    )


class Experiment:
    """Data, mesh and settings shared by the runs of one config.

    Loading the data checks that every label lies in ``[0, num_classes)`` and
    carves the validation split out of the training split.

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
        self._teacher = None  # (model, teacher_apply): one compiled eval step per student
        splits = {"train": self.spec.train_split, "test": self.spec.eval_split}
        loaded = {
            name: data.load_split(
                config.dataset, split, config.data_dir, **dict(config.dataset_kwargs)
            )
            for name, split in splits.items()
        }
        for name, arrays in loaded.items():
            data.check_labels(
                arrays["label"], self.spec.num_classes, split=f"{config.dataset}/{splits[name]}"
            )
        train, validation = data.validation_split(
            len(loaded["train"]["label"]),
            fraction=config.validation_fraction,
            seed=config.validation_seed,
        )
        self.train_arrays = data.take(loaded["train"], train)
        # Evaluated splits, by report name; validation first, as it is read first.
        self.eval_arrays = {"test": loaded["test"]}
        if len(validation):
            self.eval_arrays = {
                "validation": data.take(loaded["train"], validation),
                **self.eval_arrays,
            }
        self.data_sizes = {
            name: len(arrays["label"])
            for name, arrays in {"train": self.train_arrays, **self.eval_arrays}.items()
        }

    def model(self, role: str):
        kwargs = dict(self.config[role].model_kwargs)
        if "hidden_sizes" in kwargs:
            kwargs["hidden_sizes"] = tuple(kwargs["hidden_sizes"])
        return models.get_model(self.config[role].model, self.spec.num_classes, **kwargs)

    def loader(
        self, seed: int, teacher_cache: TeacherCache | None = None, *, kind: str | None = None
    ) -> data.TrainLoader:
        """This process's training batches of run seed ``seed``: a Grain ``DatasetIterator``.

        With ``teacher_cache`` (one record per training example), each example also
        carries its record: a :class:`CachedTeacherLoader`. ``config.augment``'s views
        of run ``kind`` (:func:`augment.for_run`: crop and flip for every run, mixup and
        the teacher's own view for ``distilled`` alone) are drawn per (seed, step).
        """
        augmentation = augment.for_run(self.config, kind, input_shape=self.spec.input_shape)
        if teacher_cache is None:
            return data.TrainLoader(
                self.train_arrays,
                global_batch_size=self.config.batch_size,
                seed=seed,
                augmentation=augmentation,
                with_index=self.uses_features(kind) and methods.uses_crd(self.config),
            )
        teacher = teacher_cache.read(np.arange(len(teacher_cache)))
        return CachedTeacherLoader(
            self.train_arrays, teacher, global_batch_size=self.config.batch_size, seed=seed
        )

    def train_inputs(self, indices: np.ndarray) -> np.ndarray:
        """The model inputs float32 [K, ...] of training examples ``indices`` [K], as the
        loader feeds them (what the teacher cache is computed from)."""
        return loaders.gather(self.train_arrays, indices)["image"]

    def teacher_model(self):
        """``(model, teacher_apply)`` of the teacher, built once."""
        if self._teacher is None:
            model = self.model("teacher")
            self._teacher = (model, jaxkd.linen_teacher_apply(model))
        return self._teacher

    def check_features(self) -> None:
        """Refuses, before anything trains, feature paths the models do not record:
        each model is traced once (no compilation) on two training inputs."""
        student_paths, teacher_paths = methods.feature_paths(self.config)
        inputs = self.train_arrays["image"][:2]
        for role, paths in (("student", student_paths), ("teacher", teacher_paths)):
            if not paths:
                continue
            model = self.model(role)

            def capture(model=model, paths=paths):
                params, model_state = models.init_model(model, jax.random.key(0), inputs)
                apply = jaxkd.linen_teacher_apply(model, features=paths)
                return apply({"params": params, **model_state}, inputs)

            try:
                jax.eval_shape(capture)
            except KeyError as error:
                raise ExperimentError(
                    f"Bad config: distill.feature.{role}: {error.args[0]}"
                ) from None

    def teacher(self, seed: int) -> tuple[dict[str, Any], tuple[Callable, Any]]:
        """``(result, (teacher_apply, teacher_variables))`` of seed ``seed``'s teacher:
        trained, resumed or loaded (:meth:`run`)."""
        model, teacher_apply = self.teacher_model()
        result, state = self.run(
            "teacher",
            seed,
            model,
            jaxkd.cross_entropy_objective(),
            steps=self.config.teacher.steps,
            learning_rate=self.config.teacher.learning_rate,
        )
        return result, (teacher_apply, {"params": state.params, **state.model_state})

    def rundir(self, kind: str, seed: int) -> str:
        return os.path.join(self.workdir, f"seed_{seed}", kind)

    def run_fields(
        self, kind: str, seed: int, config: ml_collections.ConfigDict | None = None
    ) -> dict[str, Any]:
        """The fields run ``kind`` of ``seed`` depends on (of ``config``, default the
        experiment's); see :mod:`experiments.run_config`. ``distilled_cached``:
        ``distilled``'s and the cache's contents (and its loss, for top-k)."""
        config = config or self.config
        # Every distilled student depends on distilled's fields (and its own below).
        base_kind = kind if kind in ("teacher", "scratch") else "distilled"
        fields = run_config.run_fields(config, base_kind, seed, self.data_sizes)
        fields.update(jsonfiles.strict(augment.run_fields(config, kind)))
        if self.uses_features(kind, config):
            fields["distill.feature"] = config.distill.feature.to_dict()
        if kind == "distilled_dynamic":
            fields["distill.dynamic"] = config.distill.dynamic.to_dict()
        if kind == "distilled_cached":
            fields.update({"cache.k": int(config.cache.k), "cache.dtype": config.cache.dtype})
            if config.cache.k:
                fields["cache.loss"] = config.cache.loss
        return fields

    def uses_features(self, kind: str | None, config=None) -> bool:
        """Whether run ``kind`` compares intermediate features (``distill.feature``)."""
        return kind == "distilled" and bool((config or self.config).distill.feature.loss)

    def applies(self, kind: str, model, teacher_apply):
        """``(student apply, teacher apply)`` of run ``kind``'s train step: with the
        ``distill.feature`` paths recorded (as ``"student"``, ``"teacher"``) when it
        compares features; the teacher's only for the runs that distill online."""
        if kind not in ONLINE_RUNS:
            return jaxkd.linen_apply(model), None
        if not self.uses_features(kind):
            return jaxkd.linen_apply(model), teacher_apply
        student, teacher = methods.feature_paths(self.config)
        teacher_model, _ = self.teacher_model()
        return (
            jaxkd.linen_apply(model, features=student),
            jaxkd.linen_teacher_apply(teacher_model, features=teacher),
        )

    def check_runs(self, planned: dict[str, dict[str, Any]], *, overwrite: bool) -> None:
        """Refuses (or, with ``overwrite``, deletes) planned ``{rundir: fields}`` runs
        that were made with other fields; see :func:`run_config.check_runs`."""
        run_config.check_runs(planned, self.workdir, overwrite=overwrite)

    def train_step(self, kind, model, objective, teacher_apply, *, steps, learning_rate):
        """``(optimizer, jitted train step)`` of one run.

        Built afresh for every run, so that every run compiles its own step and
        reports what compiling it cost.
        """
        optimizer = make_optimizer(self.config, steps=steps, learning_rate=learning_rate)
        # Only the online distilled students run the teacher while training; the
        # others see it in evaluation alone (agreement, KL); distilled_cached reads
        # it from the batch (teacher_apply=None).
        student_apply, train_teacher = self.applies(kind, model, teacher_apply)
        step = jaxkd.make_train_step(
            student_apply,
            train_teacher,
            objective,
            optimizer,
            axis_name="data",
            teacher_input_key=augment.teacher_input_key(self.config, kind),
        )
        return optimizer, jaxkd.shard_step(step, self.mesh)

    def init_distillation(self, kind, model, objective, teacher, student, key):
        """The objective's ``(distill_params, distill_state)`` (projectors, embedding
        heads, memory banks, a learned temperature), sized from two training examples."""
        if getattr(objective, "init", None) is None:
            return {}, {}
        (params, model_state), (teacher_apply, teacher_variables) = student, teacher
        student_apply, teacher_apply = self.applies(kind, model, teacher_apply)
        batch = loaders.gather(self.train_arrays, np.arange(2))
        student_out, _ = student_apply(params, model_state, batch["image"], train=False)
        teacher_out = teacher_apply(teacher_variables, batch["image"])
        return jaxkd.init_distillation(
            objective, jax.random.fold_in(key, 2), student_out, teacher_out, batch
        )

    def eval_step(self, model, teacher_apply) -> Callable:
        """The (compiled once, then reused) eval step of ``model`` against a teacher.

        Its ``kl`` is ``KL(teacher || student)`` of the plain (T=1) distributions,
        whatever temperature the run trained with.
        """
        key = (model, teacher_apply)
        if key not in self._eval_steps:
            self._eval_steps[key] = jaxkd.shard_step(
                jaxkd.make_eval_step(
                    jaxkd.linen_apply(model), teacher_apply, axis_name="data", temperature=1.0
                ),
                self.mesh,
                donate=False,
            )
        return self._eval_steps[key]

    def evaluate(self, evaluate: Callable, state, teacher_params, arrays) -> dict[str, float]:
        """Summed eval metrics over a whole split's ``arrays``, as means."""
        totals = None
        for batch in data.eval_batches(arrays, global_batch_size=self.config.eval_batch_size):
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
        fields: dict[str, Any] | None = None,
        teacher_cache: TeacherCache | None = None,
    ) -> tuple[dict[str, Any], jaxkd.TrainState]:
        """Trains one model to ``steps``, resuming from its last checkpoint.

        Args:
          kind: ``"teacher"``, ``"scratch"``, ``"distilled"`` or ``"distilled_cached"``
            (names the run directory).
          seed: the seed of initialization, data order and dropout.
          model: a linen module from :mod:`experiments.models`.
          objective: a jaxkd objective.
          steps: number of optimizer steps.
          learning_rate: peak learning rate.
          teacher: ``(teacher_apply, teacher_variables)`` for distillation, or None.
          rundir: the run's directory; default ``WORKDIR/seed_<seed>/<kind>``.
          fields: the config fields the run depends on; default :meth:`run_fields`.
          teacher_cache: for ``distilled_cached``, the teacher's outputs on the
            training examples, read with them (``teacher`` is then evaluated only).

        Returns:
          ``(result, state)``: the final result record and TrainState.

        Raises:
          run_config.StaleRunError: ``rundir`` holds a run made with other fields.
          Interrupted: on SIGINT, after saving a checkpoint at the last finished step.
        """
        config = self.config
        rundir = rundir or self.rundir(kind, seed)
        fields = fields or self.run_fields(kind, seed)
        name = os.path.relpath(rundir, self.workdir)
        self.check_runs({rundir: fields}, overwrite=False)
        os.makedirs(rundir, exist_ok=True)
        if self.is_chief:
            run_config.record(rundir, fields)
        result_path = os.path.join(rundir, "result.json")
        metrics_path = os.path.join(rundir, "metrics.jsonl")
        apply = jaxkd.linen_apply(model)
        teacher_apply, teacher_variables = teacher if teacher else (None, None)

        optimizer, train_step = self.train_step(
            kind, model, objective, teacher_apply, steps=steps, learning_rate=learning_rate
        )
        # Both students share this initialization: only the objective differs.
        init_key = jax.random.fold_in(jax.random.key(seed), 0 if kind == "teacher" else 1)
        params, model_state = models.init_model(model, init_key, self.train_arrays["image"][:2])
        distill_params, distill_state = self.init_distillation(
            kind, model, objective, teacher, (params, model_state), init_key
        )
        state = jaxkd.TrainState.create(
            params=params,
            optimizer=optimizer,
            model_state=model_state,
            rng=seed,
            distill_params=distill_params,
            distill_state=distill_state,
        )
        state = jaxkd.replicate_on_mesh(state, self.mesh)
        if teacher_variables is not None:
            teacher_variables = jaxkd.replicate_on_mesh(teacher_variables, self.mesh)
        eval_step = self.eval_step(model, teacher_apply)

        checkpointer = RunCheckpointer(os.path.join(rundir, "checkpoints"))
        loader = self.loader(seed, teacher_cache, kind=kind)
        elapsed = 0.0
        restored = checkpointer.restore(state, loader)
        if restored is not None:
            state, loader, extra = restored
            elapsed = extra["elapsed"]
        start_step = int(jax.device_get(state.step))
        if start_step == steps and os.path.exists(result_path):
            checkpointer.close()  # finished earlier: nothing to train or measure
            loader.close()
            return jsonfiles.read(result_path), state
        if restored is not None and "loader" in extra:
            # Saved by the loader before Grain, whose order this one keeps: skip to its position.
            position = extra["loader"]["epoch"] * loader.batches_per_epoch
            for _ in range(position + extra["loader"]["index_in_epoch"]):
                next(loader)
        if self.is_chief:  # records after the checkpoint will be written again
            jsonfiles.truncate_lines(metrics_path, last_step=start_step)

        def save(step):
            checkpointer.save(step, state, loader, {"elapsed": elapsed})

        def log(record):
            if self.is_chief:
                jsonfiles.append_line(metrics_path, record)

        progress = tqdm(
            total=steps, initial=start_step, desc=name, disable=not self.is_chief, leave=False
        )
        try:
            # One process alone may stop between steps: the processes of a multi-host
            # job would stop at different steps, so there SIGINT raises at once (the
            # last checkpoint, committed atomically, survives).
            with StopOnInterrupt(enabled=jax.process_count() == 1) as stop:
                # Compiled here, before the timer starts, on a batch like those to come.
                example = jaxkd.shard_batch(loader.dataset[0], self.mesh)
                tick = time.perf_counter()
                compiled = train_step.lower(state, teacher_variables, example).compile()
                compile_time = time.perf_counter() - tick
                for step in range(start_step + 1, steps + 1):
                    if stop.requested:  # between steps: save, then stop
                        if step - 1 > start_step:
                            save(step - 1)
                        raise Interrupted(interrupt_message(step - 1, name))
                    tick = time.perf_counter()
                    batch = jaxkd.shard_batch(next(loader), self.mesh)
                    state, metrics = compiled(state, teacher_variables, batch)
                    jax.block_until_ready(state)
                    elapsed += time.perf_counter() - tick
                    if step % config.log_every == 0 or step == steps:
                        log({"step": step, "split": "train", **_host(metrics)})
                    if step % config.eval_every == 0 or step == steps:
                        for split, arrays in self.eval_arrays.items():
                            evaluated = self.evaluate(eval_step, state, teacher_variables, arrays)
                            log({"step": step, "split": split, **evaluated})
                    if step == steps or (
                        config.checkpoint_every and step % config.checkpoint_every == 0
                    ):
                        save(step)
                    progress.update(1)
                result = self._result(kind, seed, steps, apply, state, teacher_variables, eval_step)
                result.update(compile_time_s=compile_time, train_time_s=elapsed)
                if teacher_cache is not None:
                    result.update(
                        cache_k=teacher_cache.spec.k,
                        cache_dtype=teacher_cache.spec.dtype,
                        cache_bytes_per_example=teacher_cache.bytes_per_record,
                    )
                if self.is_chief:
                    jsonfiles.write(result_path, result)
                if stop.requested:  # during the final evaluation: the run is complete
                    raise Interrupted(interrupt_message(steps, name))
        finally:
            progress.close()
            checkpointer.close()
            loader.close()
        return result, state

    def _result(self, kind, seed, steps, apply, state, teacher_variables, eval_step) -> dict:
        """The result record of a trained run: every split's metrics, size, FLOPs, speed."""
        config = self.config
        final = {
            split: self.evaluate(eval_step, state, teacher_variables, arrays)
            for split, arrays in self.eval_arrays.items()
        }
        host_params = jax.device_get(state.params)
        flops, throughput = inference_costs(
            apply,
            host_params,
            jax.device_get(state.model_state),
            self.eval_arrays["test"]["image"][: config.throughput_batch_size],
        )
        return {
            "run": kind,
            "seed": seed,
            "model": config.teacher.model if kind == "teacher" else config.student.model,
            "steps": steps,
            "params": jaxkd.count_params(host_params),
            "flops_per_example": flops,
            "throughput": throughput,
            **final["test"],
            **{f"validation_{key}": value for key, value in final.get("validation", {}).items()},
        }


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, overwrite: bool = False
) -> list[dict[str, Any]]:
    """Runs the teacher and the students of ``student_runs`` for every seed; writes the report.

    Args:
      config: the experiment config.
      workdir: the output directory; its finished runs are reused, unfinished
        ones resumed.
      overwrite: delete and train again the workdir's runs that were made with
        other values of the fields they depend on, and rebuild teacher caches
        made for another teacher or setting, instead of refusing.

    Returns:
      One result record per (seed, run).

    Raises:
      ExperimentError: a bad config, dataset or workdir, or (without ``overwrite``)
        runs made with another config; nothing is trained.
      Interrupted: on SIGINT, after saving the running model's checkpoint.
    """
    from experiments import report

    validate(config, jax.device_count())
    check_workdir(workdir)
    os.makedirs(workdir, exist_ok=True)
    experiment = Experiment(config, workdir)
    seeds = _as_ints(config.seeds)
    kinds = tuple(config.student_runs)
    experiment.check_runs(
        {
            experiment.rundir(kind, seed): experiment.run_fields(kind, seed)
            for seed in seeds
            for kind in ("teacher", *kinds)
        },
        overwrite=overwrite,
    )
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    builders = {
        "scratch": jaxkd.cross_entropy_objective,
        "distilled": lambda: methods.distillation_objective(config, experiment.data_sizes["train"]),
        "distilled_cached": lambda: cached_objective(config),
        "distilled_dynamic": lambda: methods.dynamic_objective(config),
    }
    try:
        objectives = {kind: builders[kind]() for kind in kinds}
    except (ValueError, TypeError) as error:
        raise ExperimentError(f"Bad config: {error}") from None
    experiment.check_features()
    student_model = experiment.model("student")
    results = []
    for seed in seeds:
        teacher_result, teacher = experiment.teacher(seed)
        results.append(teacher_result)
        for kind in kinds:
            cache = None
            if kind == "distilled_cached":
                cache = cache_teacher.classification_cache(
                    experiment, seed, teacher, overwrite=overwrite
                )
            result, _ = experiment.run(
                kind,
                seed,
                student_model,
                objectives[kind],
                steps=config.steps,
                learning_rate=config.learning_rate,
                teacher=teacher,
                teacher_cache=cache,
            )
            results.append(result)
    if jax.process_index() == 0:
        report.write_report(results, config, workdir, experiment.data_sizes)
    return results


def _as_ints(seeds: Iterable) -> list[int]:
    return [int(seed) for seed in seeds]
