"""Defaults shared by every experiment config; each config overrides a few fields."""

from __future__ import annotations

import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
    """The full set of fields the runner reads, with CPU-friendly defaults."""
    config = ml_collections.ConfigDict()

    # Data.
    config.dataset = "digits"
    config.dataset_kwargs = ml_collections.ConfigDict()  # e.g. num_samples for mnist1d
    config.data_dir = ml_collections.FieldReference(None, field_type=str)  # None: TFDS default
    # Held out of the training split (a seeded subset, the same for every run seed):
    # hyper-parameters are chosen on it, and the test split is read only for the report.
    config.validation_fraction = 0.1
    config.validation_seed = 0

    # Models: names from experiments.models.MODEL_NAMES, kwargs to their constructors.
    config.teacher = ml_collections.ConfigDict()
    config.teacher.model = "mlp"
    config.teacher.model_kwargs = ml_collections.ConfigDict({"hidden_sizes": (256, 256)})
    config.teacher.steps = 1000
    config.teacher.learning_rate = 3e-3
    config.student = ml_collections.ConfigDict()
    config.student.model = "mlp"
    config.student.model_kwargs = ml_collections.ConfigDict({"hidden_sizes": (16,)})

    # Optimization of both students: same steps, optimizer and data order.
    config.steps = 1000
    config.batch_size = 128  # global, divisible by the device count
    config.optimizer = "adam"  # adam | adamw | sgd
    config.momentum = 0.9  # sgd only (Nesterov); 0 for plain SGD
    config.learning_rate = 3e-3
    config.weight_decay = 0.0
    config.warmup_steps = 0
    config.schedule = "cosine"  # cosine | constant

    # Distillation objective (see jaxkd.distillation_objective).
    config.distill = ml_collections.ConfigDict()
    config.distill.loss = "kl"
    config.distill.alpha = 0.9
    config.distill.temperature = 4.0
    config.distill.loss_kwargs = ml_collections.ConfigDict()
    # A feature or relational term added to the logit term (jaxkd.feature_objective):
    # loss "" (none) | hint | attention | sp | rkd_distance | rkd_angle | pkt | crd, on the
    # intermediate values at paths `student` and `teacher` (module paths or sown names),
    # through a trainable projector of the student's features (none | linear),
    # which lives in the train state and is not part of the exported student.
    config.distill.feature = ml_collections.ConfigDict()
    config.distill.feature.loss = ""
    config.distill.feature.weight = 1.0
    config.distill.feature.student = ""
    config.distill.feature.teacher = ""
    config.distill.feature.projector = "none"
    config.distill.feature.loss_kwargs = ml_collections.ConfigDict()
    # Dynamic distillation (the distilled_dynamic run): "" (none) | ctkd | confidence_temperature
    # | gap_alpha, with its options; see jaxkd.dynamic objectives.
    config.distill.dynamic = ml_collections.ConfigDict()
    config.distill.dynamic.method = ""
    config.distill.dynamic.kwargs = ml_collections.ConfigDict()

    # Training-time augmentation (experiments.data.augment). The step feeds the same
    # augmented inputs to the teacher and the student (function matching, Beyer et al.
    # 2022) unless consistent=False, where the teacher sees an independent view.
    config.augment = ml_collections.ConfigDict()
    config.augment.crop_padding = 0
    config.augment.flip = False
    config.augment.mixup_alpha = 0.0
    config.augment.padding_mode = "zero"  # zero | reflect
    config.augment.consistent = True

    # Cached teacher (experiments/cache_teacher.py): the teacher's outputs on every
    # training example, written once under WORKDIR/seed_<s>/teacher_cache/ (full/, or
    # k<k>/), for the distilled_cached student, which runs no teacher forward. Full
    # float32 logits (k=0) train exactly as the online teacher does; k > 0 keeps the
    # top-k log-probs at distill.temperature and trains with cache.loss.
    config.cache = ml_collections.ConfigDict()
    config.cache.k = 0  # 0: the full logits (few classes)
    config.cache.dtype = "float32"  # float32 | bfloat16 | float16
    # Examples per teacher forward while caching; 0: batch_size, the online teacher's
    # batch shape, so that the cached logits equal its logits bit for bit (a matmul's
    # rounding may depend on its batch size).
    config.cache.batch_size = 0
    config.cache.loss = "tail_kl"  # tail_kl | top_k_kl (k > 0 only)

    # Seeds: one teacher and the students of student_runs per seed; mean +- std over
    # seeds. Add "distilled_cached" (the distilled student, from the cached teacher):
    # --config.student_runs="('scratch', 'distilled', 'distilled_cached')".
    config.student_runs = ("scratch", "distilled")
    config.seeds = (0, 1, 2)

    # Evaluation, logging and checkpoints (steps; 0 disables checkpoints).
    config.eval_batch_size = 512
    config.eval_every = 250
    config.log_every = 50
    config.checkpoint_every = 250
    config.throughput_batch_size = 256
    return config


def finish(
    config: ml_collections.ConfigDict, arg: str | None, **quick
) -> ml_collections.ConfigDict:
    """Applies the config argument: ``quick`` overrides fields with ``quick``.

    Args:
      config: the full-size config.
      arg: the text after ``:`` in ``--config=path.py:arg``; ``None`` or ``"quick"``.
      **quick: field overrides for the quick run; dotted names as ``teacher__steps``.
    """
    if arg == "quick":
        config.seeds = (0,)
        for name, value in quick.items():
            node = config
            *parents, leaf = name.split("__")
            for parent in parents:
                node = node[parent]
            node[leaf] = value
    elif arg:
        raise ValueError(f"Unknown config argument {arg!r}; use 'quick' or nothing.")
    return config


def image_classification_config(
    dataset: str,
    *,
    teacher: str,
    student: str,
    steps: int,
    batch_size: int,
    optimizer: str,
    learning_rate: float,
    weight_decay: float = 0.0,
) -> ml_collections.ConfigDict:
    """A config for a TFDS image dataset with reference models from the registry."""
    config = get_base_config()
    config.dataset = dataset
    config.teacher.model = teacher
    config.teacher.model_kwargs = {}
    config.teacher.steps = steps
    config.teacher.learning_rate = learning_rate
    config.student.model = student
    config.student.model_kwargs = {}
    config.steps = steps
    config.batch_size = batch_size
    config.optimizer = optimizer
    config.learning_rate = learning_rate
    config.weight_decay = weight_decay
    config.eval_every = 1000
    config.checkpoint_every = 1000
    config.log_every = 100
    return config


# A few steps on tiny batches: enough to run every code path of a config.
TINY_RUN = dict(
    teacher__steps=4,
    steps=4,
    batch_size=16,
    eval_batch_size=16,
    throughput_batch_size=16,
    eval_every=2,
    log_every=2,
    checkpoint_every=2,
)
