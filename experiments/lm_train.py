"""Language-model distillation: teacher, scratch, token-level KD and on-policy GKD.

For the config's corpus and tokenizer, the runner trains (or reuses) one teacher
and, for every seed, three students with the same initialization, data order,
steps and optimizer:

- ``scratch``: next-token cross-entropy only;
- ``kd``: token-level KD, ``alpha * divergence(teacher || student) + (1 - alpha) *
  cross-entropy`` on every real token;
- ``kd_cached``: KD from the teacher's cached outputs, with no teacher forward in
  the step: the teacher's top-``cache.k`` log-probabilities at ``kd.temperature``
  and its tail mass per token, computed once over every training window
  (:mod:`experiments.cache_teacher`) and read with the windows; the loss is
  ``alpha * tail_bucket_kl + (1 - alpha) * cross-entropy`` (``cache.loss``) with
  kd's ``alpha`` and temperature, so that it reads beside ``kd`` (``cache.k=0``
  caches the full logits and trains with kd's loss);
- ``gkd``: on-policy GKD: with probability ``lmbda`` the batch's continuations
  after its first ``prompt_length`` tokens are sampled from the current student
  (no gradient through sampling), and the loss counts continuation tokens only.

The config's ``student_runs`` says which students run (``quick`` leaves out
``kd_cached``). Every run is evaluated on the first ``eval_windows`` windows of the
validation and test splits (per-token cross-entropy, perplexity,
``KL(teacher || student)`` at T=1, top-1 agreement, entropies, mutual information of the
teacher's and the student's next-token argmaxes), and samples continuations of
``sample_prompts`` test prompts which the teacher scores (the teacher's per-token
NLL of the model's samples). Each run's step is compiled before its timer starts;
``tokens_per_s`` counts training tokens over training time (data loading,
sampling and the teacher's forward pass included).

Runs resume from their checkpoints (the Grain iterator's state is saved beside
the TrainState by Orbax) and record the config fields they depend on, including
the corpus's fingerprint; a changed field is refused unless ``overwrite``.

Workdir layout::

    WORKDIR/teacher/                  the teacher (seed ``teacher.seed``)
    WORKDIR/teacher_cache/k<k>/       its cached outputs (kd_cached)
    WORKDIR/seed_<s>/<scratch|kd|kd_cached|gkd>/
        run_config.json, checkpoints/, metrics.jsonl, result.json
    WORKDIR/results.md, results.json, training_curves.png
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

import jaxkd
from experiments import cache_teacher, jsonfiles, report, run_config
from experiments.checkpointing import RunCheckpointer
from experiments.checks import check_workdir
from experiments.data import lm_data, loader, text, tokenizer
from experiments.data.teacher_cache import DTYPES, TeacherCache, WithTeacherCache
from experiments.errors import ExperimentError
from experiments.interrupt import Interrupted, StopOnInterrupt
from experiments.interrupt import message as interrupt_message
from experiments.models import transformer
from experiments.train import make_optimizer
from jaxkd.train._sparse_objective import SPARSE_LOSSES, sparse_distillation_objective

# The runs of every config (``quick``'s), and the students a config may add.
RUNS = ("teacher", "scratch", "kd", "gkd")
RUN_TITLES = {
    "teacher": "teacher",
    "scratch": "student from scratch",
    "kd": "student, token-level KD",
    "gkd": "student, on-policy GKD",
}
STUDENT_RUNS = ("scratch", "kd", "kd_cached", "gkd")  # the results table's order
CACHED_RUN_TITLE = "student, KD from cached top-k"
# (column title, result key, format): mean +- std over seeds.
COLUMNS = (
    ("validation perplexity", "validation_perplexity", "{:.2f}"),
    ("test perplexity", "perplexity", "{:.2f}"),
    ("KL(teacher ‖ student) at T=1", "kl", "{:.4f}"),
    ("agreement w/ teacher", "agreement", "{:.4f}"),
    ("MI(teacher; student) (nats)", "mutual_information", "{:.4f}"),
    ("normalized MI", "normalized_mutual_information", "{:.4f}"),
    ("teacher NLL of samples", "teacher_nll_of_samples", "{:.3f}"),
    ("params", "params", "{:,.0f}"),
    ("FLOPs/token", "flops_per_token", "{:,.0f}"),
    ("compile time (s)", "compile_time_s", "{:.1f}"),
    ("train time (s)", "train_time_s", "{:.1f}"),
    ("train tokens/s", "tokens_per_s", "{:,.0f}"),
)
_KEYS = ("tokens", "mask")
# Config fields of a model size, passed to CausalTransformer.
_SIZE_FIELDS = ("d_model", "num_layers", "num_heads", "d_ff", "tie_embeddings")


def run_titles(kinds) -> dict[str, str]:
    """Titles of the run ``kinds``, in the table's order (``kd_cached`` beside ``kd``)."""
    titles = {**RUN_TITLES, "kd_cached": CACHED_RUN_TITLE}
    return {kind: titles[kind] for kind in ("teacher", *STUDENT_RUNS) if kind in kinds}


def describe(model: transformer.CausalTransformer) -> str:
    """A model's size in a table cell, e.g. ``d256 x4 h4``."""
    return f"d{model.d_model} x{model.num_layers} h{model.num_heads}"


def shift_windows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Token windows ``[B, L + 1]`` to next-token ``inputs``, ``targets``, ``mask``."""
    return jaxkd.lm.shift_tokens(batch["tokens"], batch["mask"])


def shift_with_teacher(batch: dict[str, np.ndarray], *, keys: tuple[str, ...]) -> dict:
    """:func:`shift_windows`, keeping the cached teacher's ``keys`` (``[B, L, ...]``)."""
    return {**shift_windows(batch), **{key: batch[key] for key in keys}}


@dataclasses.dataclass
class LmData:
    """The tokenizer, the training windows and the evaluation batches of a config."""

    tokenizer: Any
    fingerprint: str
    train: lm_data.PackedWindows
    eval_batches: dict[str, list[dict[str, np.ndarray]]]
    prompts: np.ndarray  # int32 [sample_prompts, prompt_length]
    tokens: dict[str, int]  # tokens per split (evaluated tokens for validation and test)


def load_data(config: ml_collections.ConfigDict) -> LmData:
    """Builds the corpus (once), trains the tokenizer (once), tokenizes (once)."""
    builder = text.prepare_text(config.corpus, config.data_dir)
    metadata = text.corpus_metadata(config.data_dir, config=config.corpus)
    cache_dir = os.path.join(str(builder.data_dir), "jaxkd_tokens")
    if config.tokenizer == "bytes":
        tok = tokenizer.ByteTokenizer()
    else:
        tok = tokenizer.load_or_train_tokenizer(
            config.tokenizer,
            vocab_size=config.vocab_size,
            directory=cache_dir,
            corpus_fingerprint=metadata["fingerprint"],
            documents_fn=lambda: text.read_documents(
                "train", data_dir=config.data_dir, config=config.corpus
            ),
        )
    streams = {
        split: lm_data.token_stream(
            split,
            data_dir=config.data_dir,
            config=config.corpus,
            tokenizer=tok,
            cache_dir=cache_dir,
        )
        for split in ("train", "validation", "test")
    }
    train = lm_data.PackedWindows(streams["train"], config.seq_len)
    eval_batches, tokens = {}, {"train": len(train) * config.seq_len}
    for split in ("validation", "test"):
        windows = lm_data.PaddedWindows(streams[split], config.seq_len, tok.pad_id)
        count = min(len(windows), config.eval_windows)
        arrays = shift_windows(loader.read(windows, np.arange(count), keys=_KEYS))
        eval_batches[split] = _padded_batches(arrays, config.eval_batch_size)
        tokens[split] = int(arrays["mask"].sum())
    test = lm_data.PackedWindows(streams["test"], config.seq_len)
    if len(test) < config.sample_prompts:
        raise ExperimentError(
            f"sample_prompts={config.sample_prompts} exceeds the {len(test)} full test windows."
        )
    prompts = loader.read(test, np.arange(config.sample_prompts), keys=("tokens",))["tokens"]
    return LmData(
        tokenizer=tok,
        fingerprint=metadata["fingerprint"],
        train=train,
        eval_batches=eval_batches,
        prompts=np.asarray(prompts[:, : config.prompt_length], np.int32),
        tokens=tokens,
    )


def _padded_batches(arrays: dict[str, np.ndarray], batch_size: int) -> list[dict]:
    """Fixed batches of ``batch_size`` rows; the last padded with fully masked rows."""
    count = len(arrays["mask"])
    padded = -(-count // batch_size) * batch_size
    arrays = {
        key: np.concatenate([value, np.zeros((padded - count, *value.shape[1:]), value.dtype)])
        for key, value in arrays.items()
    }
    return [
        {key: value[start : start + batch_size] for key, value in arrays.items()}
        for start in range(0, padded, batch_size)
    ]


def run_fields(config, kind: str, seed: int, fingerprint: str) -> dict[str, Any]:
    """The config fields (and corpus fingerprint) a run's results depend on."""
    names = [
        "corpus",
        "tokenizer",
        "vocab_size",
        "seq_len",
        "prompt_length",
        "eval_windows",
        "sample_prompts",
        "sampling_temperature",
        "batch_size",
        "optimizer",
        "schedule",
        "warmup_steps",
        "teacher",
    ]
    if config.optimizer == "sgd":
        names.append("momentum")
    if config.optimizer in ("sgd", "adamw"):
        names.append("weight_decay")
    if kind != "teacher":
        names += ["student", "steps", "learning_rate"]
    if kind in ("kd", "gkd"):
        names.append(kind)
    fields = {"seed": int(seed), "corpus_fingerprint": fingerprint}
    for name in names:
        value = config[name]
        if isinstance(value, ml_collections.ConfigDict):  # one field per leaf: "kd.alpha"
            for key, leaf in value.to_dict().items():
                fields[f"{name}.{key}"] = leaf
        else:
            fields[name] = value
    if kind == "kd_cached":  # kd's weight and temperature; the cache's contents and loss
        for name in ("kd.alpha", "kd.temperature", "cache.k", "cache.dtype", "cache.loss"):
            node, leaf = name.split(".")
            fields[name] = config[node][leaf]
        if not config.cache.k:
            fields["kd.loss"] = config.kd.loss
            fields.update(
                {f"kd.loss_kwargs.{k}": v for k, v in config.kd.loss_kwargs.to_dict().items()}
            )
    return jsonfiles.strict(fields)


class LmExperiment:
    """Data, models and mesh shared by the runs of one config."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        self.config = config
        self.workdir = workdir
        self.data = load_data(config)
        self.mesh = jaxkd.data_mesh()
        self.is_chief = jax.process_index() == 0
        self._eval_steps = {}
        self._teacher_cache = None
        vocab_size = self.data.tokenizer.vocab_size
        self.models = {
            role: transformer.CausalTransformer(
                vocab_size=vocab_size,
                max_length=config.seq_len + 1,
                **{k: config[role][k] for k in _SIZE_FIELDS},
            )
            for role in ("teacher", "student")
        }

    def rundir(self, kind: str, seed: int) -> str:
        if kind == "teacher":
            return os.path.join(self.workdir, "teacher")
        return os.path.join(self.workdir, f"seed_{seed}", kind)

    def fields(self, kind: str, seed: int) -> dict[str, Any]:
        return run_fields(self.config, kind, seed, self.data.fingerprint)

    def _objective(self, kind: str):
        config = self.config
        if kind in ("teacher", "scratch"):
            return jaxkd.cross_entropy_objective(label_key="targets")
        if kind == "kd_cached" and config.cache.k:
            return sparse_distillation_objective(
                config.cache.loss,
                alpha=config.kd.alpha,
                temperature=config.kd.temperature,
                cache_temperature=config.kd.temperature,
                label_key="targets",
            )
        settings = config["kd" if kind == "kd_cached" else kind]
        return jaxkd.distillation_objective(
            settings.loss,
            alpha=settings.alpha,
            temperature=settings.temperature,
            label_key="targets",
            loss_kwargs=settings.loss_kwargs.to_dict(),
        )

    def generate(self, model, *, temperature: float):
        """``generate(params, prompts, prompt_mask, rng)``: continuations to ``seq_len + 1``."""
        config = self.config
        return jaxkd.lm.make_generate(
            transformer.decode_fn(model),
            functools.partial(transformer.init_cache, model),
            max_new_tokens=config.seq_len + 1 - config.prompt_length,
            temperature=temperature,
            eos_id=self.data.tokenizer.eos_id,
            pad_id=self.data.tokenizer.pad_id,
        )

    def train_step(self, kind: str, model, teacher_apply, optimizer):
        transform = None
        if kind == "gkd":
            transform = jaxkd.lm.generation_transform(
                self.generate(model, temperature=self.config.gkd.sampling_temperature),
                prompt_length=self.config.prompt_length,
                lmbda=self.config.gkd.lmbda,
                policy="student",
            )
        step = jaxkd.make_train_step(
            jaxkd.linen_apply(model),
            teacher_apply if kind in ("kd", "gkd") else None,
            self._objective(kind),
            optimizer,
            axis_name="data",
            input_key="inputs",
            batch_transform=transform,
        )
        return jaxkd.shard_step(step, self.mesh)

    def teacher_cache(self, teacher) -> TeacherCache:
        """The cache of ``teacher``'s outputs on the training windows: opened or written once."""
        if self._teacher_cache is None:
            _, teacher_variables = teacher
            self._teacher_cache = cache_teacher.experiment_cache(
                self, jax.device_get(teacher_variables)
            )
        return self._teacher_cache

    def train_source(self, kind: str, teacher):
        """``(source, keys, transform)`` of a run's training batches."""
        if kind != "kd_cached":
            return self.data.train, _KEYS, shift_windows
        if teacher is None:
            raise ValueError("The kd_cached run needs the teacher (to find or build its cache).")
        cache = self.teacher_cache(teacher)
        return (
            WithTeacherCache(self.data.train, cache),
            _KEYS + cache.keys,
            functools.partial(shift_with_teacher, keys=cache.keys),
        )

    def evaluate(self, model, state, teacher) -> dict[str, Any]:
        """Per-token metrics of every evaluated split, and the teacher's NLL of samples."""
        teacher_apply, teacher_variables = teacher if teacher else (None, None)
        key = (model, teacher_apply)
        if key not in self._eval_steps:  # compiled once per (model, teacher)
            self._eval_steps[key] = jaxkd.shard_step(
                jaxkd.make_eval_step(
                    jaxkd.linen_apply(model),
                    teacher_apply,
                    axis_name="data",
                    temperature=1.0,
                    input_key="inputs",
                    label_key="targets",
                    # The [V, V] joint is too large to sum per batch: the step
                    # gathers the tokens' (teacher, student) argmax pairs instead,
                    # counted here on the host (only the pairs that occur).
                    prediction_joint="labels",
                ),
                self.mesh,
                donate=False,
            )
        evaluate = self._eval_steps[key]
        # Each process feeds its contiguous slice of every global batch.
        local = loader.process_slice(
            self.config.eval_batch_size, jax.process_index(), jax.process_count()
        )
        results = {}
        for split, batches in self.data.eval_batches.items():
            totals, pairs = None, []
            for batch in batches:
                batch = {key: value[local] for key, value in batch.items()}
                sums = evaluate(state, teacher_variables, jaxkd.shard_batch(batch, self.mesh))
                sums = jax.device_get(sums)
                if "prediction_pairs" in sums:  # concatenated, not summed
                    pairs.append(sums.pop("prediction_pairs"))
                totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
            if pairs:
                totals["prediction_pairs"] = np.concatenate(pairs)
            results[split] = jaxkd.lm.summarize_token_eval(totals)
        return results

    def teacher_nll_of_samples(self, model, params, teacher, seed: int) -> float:
        """The teacher's per-token NLL of ``model``'s continuations of the test prompts."""
        teacher_apply, teacher_variables = teacher
        generate = self.generate(model, temperature=self.config.sampling_temperature)
        prompts = self.data.prompts

        @jax.jit
        def score(params, teacher_variables, rng):
            output = generate(params, prompts, np.ones(prompts.shape, bool), rng)
            batch = jaxkd.lm.generated_batch(output)
            logits = teacher_apply(teacher_variables, batch["inputs"])
            return jaxkd.lm.sequence_nll(logits, batch["targets"], batch["mask"])

        rng = jax.random.fold_in(jax.random.key(seed), 12345)
        total, count = jax.device_get(score(params, teacher_variables, rng))
        return float(total) / float(count)

    def run(self, kind: str, seed: int, teacher=None) -> tuple[dict[str, Any], Any]:
        """Trains one run to its steps, resuming from its last checkpoint."""
        config = self.config
        role = "teacher" if kind == "teacher" else "student"
        model = self.models[role]
        steps = config.teacher.steps if kind == "teacher" else config.steps
        learning_rate = config.teacher.learning_rate if kind == "teacher" else config.learning_rate
        rundir = self.rundir(kind, seed)
        fields = self.fields(kind, seed)
        name = os.path.relpath(rundir, self.workdir)
        run_config.check_runs({rundir: fields}, self.workdir, overwrite=False)
        result_path = os.path.join(rundir, "result.json")
        metrics_path = os.path.join(rundir, "metrics.jsonl")
        optimizer = make_optimizer(config, steps=steps, learning_rate=learning_rate)
        teacher_apply, teacher_variables = teacher if teacher else (None, None)
        train_step = self.train_step(kind, model, teacher_apply, optimizer)
        # Every student of a seed starts from the same initialization.
        init_key = jax.random.fold_in(jax.random.key(seed), 0 if kind == "teacher" else 1)
        example = shift_windows(loader.read(self.data.train, np.arange(2), keys=_KEYS))
        params = model.init(init_key, example["inputs"])["params"]
        # Recorded once the run's step and model are built: a config that fails to
        # build leaves nothing that would refuse its correction.
        os.makedirs(rundir, exist_ok=True)
        if self.is_chief:
            run_config.record(rundir, fields)
        state = jaxkd.TrainState.create(params=params, optimizer=optimizer, rng=seed)
        state = jaxkd.replicate_on_mesh(state, self.mesh)
        if teacher_variables is not None:
            teacher_variables = jaxkd.replicate_on_mesh(teacher_variables, self.mesh)
        source, keys, transform = self.train_source(kind, teacher)
        dataset = loader.train_dataset(
            source, global_batch_size=config.batch_size, seed=seed, keys=keys, transform=transform
        )
        batches = iter(dataset.to_iter_dataset(loader.default_read_options(source)))
        checkpointer = RunCheckpointer(os.path.join(rundir, "checkpoints"))
        elapsed = 0.0
        restored = checkpointer.restore(state, batches)
        if restored is not None:
            state, batches, extra = restored
            elapsed = extra["elapsed"]
        start_step = int(jax.device_get(state.step))
        if 0 < start_step < steps and self.is_chief:
            tqdm.write(f"{name}: resuming from step {start_step}")
        if start_step == steps and os.path.exists(result_path):
            checkpointer.close()
            return jsonfiles.read(result_path), state
        if self.is_chief:
            jsonfiles.truncate_lines(metrics_path, last_step=start_step)

        def save(step):
            checkpointer.save(step, state, batches, {"elapsed": elapsed})

        def log(record):
            if self.is_chief:
                jsonfiles.append_line(metrics_path, jsonfiles.strict(record))

        progress = tqdm(
            total=steps, initial=start_step, desc=name, disable=not self.is_chief, leave=False
        )
        teacher_arg = teacher_variables if kind in ("kd", "gkd") else None
        try:
            with StopOnInterrupt(enabled=jax.process_count() == 1) as stop:
                tick = time.perf_counter()
                compiled = train_step.lower(
                    state, teacher_arg, jaxkd.shard_batch(dataset[0], self.mesh)
                ).compile()
                compile_time = time.perf_counter() - tick
                for step in range(start_step + 1, steps + 1):
                    if stop.requested:
                        if step - 1 > start_step:
                            save(step - 1)
                        raise Interrupted(interrupt_message(step - 1, name))
                    tick = time.perf_counter()
                    batch = jaxkd.shard_batch(next(batches), self.mesh)
                    state, metrics = compiled(state, teacher_arg, batch)
                    jax.block_until_ready(state)
                    elapsed += time.perf_counter() - tick
                    if step % config.log_every == 0 or step == steps:
                        log({"step": step, "split": "train", **jax.device_get(metrics)})
                    if step % config.eval_every == 0 or step == steps:
                        evaluated = self.evaluate(model, state, teacher)
                        for split, summary in evaluated.items():
                            log({"step": step, "split": split, **summary})
                    if step == steps or (
                        config.checkpoint_every and step % config.checkpoint_every == 0
                    ):
                        save(step)
                    progress.update(1)
                if start_step == steps:  # killed after the last checkpoint, before the result
                    evaluated = self.evaluate(model, state, teacher)
                result = self._result(kind, seed, model, state, teacher, steps, evaluated)
                result.update(
                    compile_time_s=compile_time,
                    train_time_s=elapsed,
                    tokens_per_s=steps * config.batch_size * config.seq_len / elapsed,
                )
                if kind == "kd_cached":
                    cache = self.teacher_cache(teacher)
                    result.update(cache_k=cache.spec.k, cache_bytes_per_token=cache.bytes_per_token)
                if self.is_chief:
                    jsonfiles.write(result_path, result)
                if stop.requested:
                    raise Interrupted(interrupt_message(steps, name))
        finally:
            progress.close()
            checkpointer.close()
        return result, state

    def _result(self, kind, seed, model, state, teacher, steps, final) -> dict[str, Any]:
        """The result record: the final evaluation, size, FLOPs, the samples' NLL."""
        params = jax.device_get(state.params)
        if teacher is None:  # the teacher scores its own samples
            teacher = (jaxkd.linen_teacher_apply(model, train_kwarg=None), {"params": params})
        return {
            "run": kind,
            "seed": seed,
            "model": describe(model),
            "vocab_size": self.data.tokenizer.vocab_size,
            "steps": steps,
            "params": jaxkd.count_params(params),
            "flops_per_token": transformer.flops_per_token(model, self.config.seq_len),
            "teacher_nll_of_samples": self.teacher_nll_of_samples(model, params, teacher, seed),
            **final["test"],
            **{f"validation_{key}": value for key, value in final["validation"].items()},
        }


def validate_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Checks a config before anything is built or trained.

    Raises:
      ExperimentError: naming the first bad field and its value.
    """

    def fail(message: str):
        raise ExperimentError(f"Bad config: {message}")

    if config.corpus not in ("full", "small"):
        fail(f'corpus={config.corpus!r}; expected "full" or "small".')
    if config.tokenizer not in ("bpe", "bytes"):
        fail(f'tokenizer={config.tokenizer!r}; expected "bpe" or "bytes".')
    for name in ("seq_len", "steps", "eval_windows", "sample_prompts"):
        if int(config[name]) < 1:
            fail(f"{name}={config[name]} must be >= 1.")
    if int(config.teacher.steps) < 1:
        fail(f"teacher.steps={config.teacher.steps} must be >= 1.")
    for role in ("teacher", "student"):
        width, heads = config[role].d_model, config[role].num_heads
        if heads < 1 or width % heads or (width // heads) % 2:
            fail(
                f"{role}.d_model={width} must split into {role}.num_heads={heads} heads of "
                "even size (RoPE rotates pairs of channels)."
            )
    if not 1 <= config.prompt_length <= config.seq_len:
        fail(f"prompt_length={config.prompt_length} must be in [1, seq_len={config.seq_len}].")
    for name in ("batch_size", "eval_batch_size"):
        if config[name] < 1 or config[name] % num_devices:
            fail(f"{name}={config[name]} must be a positive multiple of the {num_devices} devices.")
    kinds = tuple(config.student_runs)
    if not kinds or len(set(kinds)) < len(kinds) or not set(kinds) <= set(STUDENT_RUNS):
        fail(f"student_runs={kinds}; expected distinct runs among {STUDENT_RUNS}.")
    cache = config.cache
    if int(cache.k) < 0:
        fail(f"cache.k={cache.k} must be >= 0 (0: the full logits).")
    if cache.dtype not in DTYPES:
        fail(f"cache.dtype={cache.dtype!r}; expected one of {sorted(DTYPES)}.")
    if int(cache.batch_size) < 1:
        fail(f"cache.batch_size={cache.batch_size} must be >= 1.")
    if cache.loss not in SPARSE_LOSSES:
        fail(f"cache.loss={cache.loss!r}; expected one of {sorted(SPARSE_LOSSES)}.")
    if "kd_cached" in kinds and cache.k:
        try:  # kd's alpha and temperature, with the cache's loss
            sparse_distillation_objective(
                cache.loss,
                alpha=config.kd.alpha,
                temperature=config.kd.temperature,
                cache_temperature=config.kd.temperature,
                label_key="targets",
            )
        except (TypeError, ValueError) as error:
            fail(f"kd_cached: {error}")
    for name in ("kd", "gkd"):
        settings = config[name]
        try:  # the objective checks the loss, its options, alpha and temperature
            jaxkd.distillation_objective(
                settings.loss,
                alpha=settings.alpha,
                temperature=settings.temperature,
                label_key="targets",
                loss_kwargs=settings.loss_kwargs.to_dict(),
            )
        except (TypeError, ValueError) as error:
            fail(f"{name}: {error}")
    if not 0.0 <= config.gkd.lmbda <= 1.0:
        fail(f"gkd.lmbda={config.gkd.lmbda} must lie in [0, 1].")
    for name, value in (
        ("gkd.sampling_temperature", config.gkd.sampling_temperature),
        ("sampling_temperature", config.sampling_temperature),
    ):
        if value < 0:
            fail(f"{name}={value} must be >= 0 (0 samples greedily).")


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, overwrite: bool = False
) -> list[dict[str, Any]]:
    """Runs the teacher, then every seed's students (``student_runs``); writes the report.

    Raises:
      ExperimentError: a bad config or workdir, or (without ``overwrite``) runs
        made with another config; nothing is trained.
      Interrupted: on SIGINT, after saving the running model's checkpoint.
    """
    validate_config(config, jax.device_count())
    check_workdir(workdir)
    os.makedirs(workdir, exist_ok=True)
    experiment = LmExperiment(config, workdir)
    seeds = [int(seed) for seed in config.seeds]
    planned = {experiment.rundir("teacher", 0): experiment.fields("teacher", config.teacher.seed)}
    kinds = tuple(config.student_runs)
    for seed in seeds:
        for kind in kinds:
            planned[experiment.rundir(kind, seed)] = experiment.fields(kind, seed)
    run_config.check_runs(planned, workdir, overwrite=overwrite)
    if experiment.is_chief:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    teacher_result, teacher_state = experiment.run("teacher", config.teacher.seed)
    teacher_model = experiment.models["teacher"]
    teacher = (
        jaxkd.linen_teacher_apply(teacher_model, train_kwarg=None),
        {"params": teacher_state.params},
    )
    results = [teacher_result]
    for seed in seeds:
        for kind in kinds:
            results.append(experiment.run(kind, seed, teacher)[0])
    if experiment.is_chief:
        write_report(results, config, workdir, experiment.data.tokens)
    return results


def _loss_name(settings) -> str:
    """``"jsd beta=0.1"``: a loss and its options, for a title."""
    options = " ".join(f"{k}={v}" for k, v in settings.loss_kwargs.to_dict().items())
    return f"{settings.loss} {options}".strip()


def write_report(results, config, workdir: str, tokens: dict[str, int]) -> str:
    """Writes results.md, results.json and training_curves.png; returns the text."""
    titles = run_titles({r["run"] for r in results})
    summary = report.summarize(results, columns=COLUMNS, run_titles=titles)
    table = report.markdown_table(summary, columns=COLUMNS, run_titles=titles)
    seeds = sorted({r["seed"] for r in results if r["run"] != "teacher"})
    title = (
        f"python_stdlib_source/{config.corpus}, {config.tokenizer} vocabulary "
        f"{results[0]['vocab_size']:,}: token-level KD "
        f"({_loss_name(config.kd)}, T={config.kd.temperature}, alpha={config.kd.alpha}) and "
        f"on-policy GKD ({_loss_name(config.gkd)}, alpha={config.gkd.alpha}, "
        f"lmbda={config.gkd.lmbda}), {config.steps} student steps, seeds {seeds}"
    )
    cached = [r for r in results if r["run"] == "kd_cached"]
    if cached:
        what = f"top-{config.cache.k} log-probs" if config.cache.k else "full logits"
        title += (
            f"; KD from the teacher's cached {what} ({config.cache.dtype}, "
            f"{cached[0]['cache_bytes_per_token']:.1f} bytes/token; "
            f"{config.cache.loss if config.cache.k else _loss_name(config.kd)}, kd's T and alpha)"
        )
    note = (
        "Tokens: "
        + " / ".join(f"{count:,} {split}" for split, count in tokens.items())
        + " (validation and test: the evaluated windows); perplexity, KL and agreement "
        "are per real token of the test windows (validation perplexity on validation); "
        "MI is the mutual information (nats) of the teacher's and the model's next-token "
        "argmaxes over the test tokens, normalized MI = MI / sqrt(H(teacher) H(student)); "
        "the teacher's NLL (nats/token) of each model's sampled continuations of "
        f"{config.sample_prompts} test prompts of {config.prompt_length} tokens."
    )
    text_out = "\n\n".join((title, note, table))
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(f"# {text_out}\n")
    record = {"title": title, "tokens": tokens, "summary": summary, "runs": list(results)}
    jsonfiles.write(os.path.join(workdir, "results.json"), record)
    curves = {
        kind: [
            os.path.join(workdir, "teacher" if kind == "teacher" else f"seed_{seed}/{kind}")
            for seed in (seeds if kind != "teacher" else [None])
        ]
        for kind in titles
    }
    report.plot_curves(
        curves,
        os.path.join(workdir, "training_curves.png"),
        metric="perplexity",
        run_titles=titles,
        log_metric=True,
    )
    return text_out
