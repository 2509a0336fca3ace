"""CIFAR-100 teacher/student pairs of the CRD and DKD benchmarks, one method at a time.

The config argument is ``PAIR,METHOD`` or ``PAIR,METHOD,quick``::

    .venv/bin/python -m experiments.distill \\
        --config=experiments/configs/cifar100_pairs.py:resnet32x4-resnet8x4,kd --workdir=DIR
    .venv/bin/python -m experiments.distill \\
        --config=experiments/configs/cifar100_pairs.py:wrn_40_2-wrn_16_2,dkd,quick --workdir=DIR

Pairs (``PAIRS``; teacher-student by registry name): ``resnet32x4-resnet8x4``,
``wrn_40_2-wrn_16_2``, ``resnet56-resnet20`` (CRD Table 1, DKD) and
``resnet32x4-mobilenet_small``, a ResNet teacher for the half-width MobileNetV2
student in place of the papers' ResNet50 -> MobileNetV2 (this repository has no
bottleneck ResNet50, and ``mobilenet_small``'s layout differs from the papers' in
details: see ``Pair.note``); the published numbers of every pair are in
:mod:`experiments.configs.anchors`.

Methods (``METHODS``), with the hyper-parameters of CRD's code (RepDistiller) and
mdistiller, which use the same ones:

* ``none``: the student from scratch only (``student_runs=("scratch",)``).
* ``kd``: ``0.9 * T^2 KL + 0.1 * CE`` at T = 4 (Hinton et al.).
* ``dkd``: DKD with alpha 1, beta 8 (6 for wrn_40_2 -> wrn_16_2, 2 for resnet56 ->
  resnet20, mdistiller's per-pair configs), T = 4. mdistiller trains on
  ``CE + DKD``; the objective here is ``alpha * DKD + (1 - alpha) * CE``, so
  ``alpha = 0.5`` gives half of it: the same minimizer and gradient direction, half
  the gradient (an SGD step of half the learning rate, weight decay unchanged).
  mdistiller's linear warmup of the DKD term over the first 20 epochs is not
  expressed.
* Feature and relational methods add ``weight * feature loss`` to the plain cross
  entropy (``distill.alpha = 0``), on CRD's feature choices: ``fitnet`` (hint loss,
  weight 100, on the middle stage ``stage2`` through a trainable linear (1x1 conv)
  regressor; CRD's regressor adds BatchNorm + ReLU), ``at`` (attention transfer,
  1000, summed over ``stage1..stage3``), ``sp`` (similarity preserving, 3000, on the
  last stage), ``rkd`` (RKD distance 25 + angle 50 on the pooled embedding),
  ``pkt`` (30000, pooled embedding) and ``crd`` (0.8, pooled embedding, 128-d
  embeddings, 16384 negatives, NCE temperature 0.07, memory momentum 0.5).

``config.distill.feature`` holds the feature term. A method with several terms
(``at``: three stage pairs; ``rkd``: two losses) lists them comma-separated, one
entry per term, in ``loss``, ``student`` and ``teacher``, the terms to be summed;
their weights are ``weight``, or, when they differ, ``weight`` times
``loss_kwargs.term_weights``; the runner adds one feature objective per term
(:func:`experiments.methods.feature_terms`).

The weights are written in the scale of the reference code and converted where
jaxkd's loss differs from it by a constant: jaxkd's PKT is the mean over
examples of a KL divergence, the reference's the mean over all ``B * B`` terms
(``1/B`` of it), so its weight is ``30000 / B``; jaxkd's RKD losses average over
distinct pairs (triplets), the reference over all ``B**2`` (``B**3``) entries,
whose degenerate ones are 0, so the weights are ``25 (B-1)/B`` and
``50 (B-1)(B-2)/B**2``; hint and SP are the reference's. Attention transfer is
not: jaxkd's is the paper's norm of the difference of the normalized maps, the
reference's the mean of its square over the ``H*W`` positions, which no constant
converts; the weight 1000 is the reference's.

Training recipe (CRD, mdistiller): SGD with momentum 0.9 (not Nesterov), weight
decay 5e-4, batch 64, 240 epochs, learning rate 0.05 (0.01 for a MobileNetV2
student) multiplied by 0.1 at epochs 150, 180 and 210; random crop (padding 4)
and horizontal flip; teachers trained alike. The whole training split is trained
on (``validation_fraction = 0``), as in the papers, whose numbers are the best
test accuracy over the epochs (the report's is the final one).

References:
  Contrastive Representation Distillation. Yonglong Tian, Dilip Krishnan,
  Phillip Isola, 2020. https://arxiv.org/abs/1910.10699
  Decoupled Knowledge Distillation. Borui Zhao, Quan Cui, Renjie Song, Yiyu Qiu,
  Jiajun Liang, 2022. https://arxiv.org/abs/2203.08679
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from experiments.configs.base import TINY_RUN, finish, image_classification_config
from experiments.models.registry import FEATURE_LAYERS

CIFAR100_TRAIN_EXAMPLES = 50_000
EPOCHS = 240
DECAY_EPOCHS = (150, 180, 210)
DECAY_FACTOR = 0.1
BATCH_SIZE = 64


@dataclasses.dataclass(frozen=True)
class Pair:
    """A teacher/student pair and what differs between pairs.

    Attributes:
      teacher: registry name of the teacher.
      student: registry name of the student.
      learning_rate: the student's initial learning rate (teachers: 0.05).
      dkd_beta: DKD's non-target weight for the pair (mdistiller's configs).
      anchor: the key of the pair's published numbers in
        ``experiments.configs.anchors.PUBLISHED``.
      note: how the pair differs from the published one, if it does.
    """

    teacher: str
    student: str
    learning_rate: float
    dkd_beta: float
    anchor: str
    note: str = ""


PAIRS: dict[str, Pair] = {
    "resnet32x4-resnet8x4": Pair("resnet32x4", "resnet8x4", 0.05, 8.0, "resnet32x4-resnet8x4"),
    "wrn_40_2-wrn_16_2": Pair("wrn_40_2", "wrn_16_2", 0.05, 6.0, "wrn_40_2-wrn_16_2"),
    "resnet56-resnet20": Pair("resnet56", "resnet20", 0.05, 2.0, "resnet56-resnet20"),
    "resnet32x4-mobilenet_small": Pair(
        "resnet32x4",
        "mobilenet_small",
        0.01,
        8.0,
        "resnet32x4-mobilenet_small",
        note=(
            "Not a published pair: CRD and DKD distill ResNet50 into their half-width "
            "MobileNetV2 (stem stride 2, 2x2 final map, channels int(c/2), ReLU, an "
            "expansion convolution in the first block); mobilenet_small has the same "
            "width and 0.82M parameters (theirs 0.81M) but a stride-1 stem (4x4 final "
            "map), channels rounded to multiples of 8 and ReLU6. No published DKD beta: "
            "8, mdistiller's default."
        ),
    ),
}

METHODS = ("none", "kd", "dkd", "fitnet", "at", "sp", "rkd", "pkt", "crd")
LOGIT_METHODS = ("none", "kd", "dkd")

# CRD's contrastive head and memory (RepDistiller's defaults, also mdistiller's).
CRD_OPTIONS = {
    "feature_dim": 128,
    "num_negatives": 16384,
    "nce_temperature": 0.07,
    "momentum": 0.5,
}
QUICK_CRD_NEGATIVES = 64


@dataclasses.dataclass(frozen=True)
class FeatureTerm:
    """One feature or relational loss term between named features.

    Attributes:
      loss: a ``config.distill.feature.loss`` name.
      weight: the term's weight, in jaxkd's scale of the loss.
      student: the student's feature name (a key of ``FEATURE_LAYERS[model]``).
      teacher: the teacher's feature name.
      projector: ``"none"`` or ``"linear"`` (a trainable map of the student feature's
        channels to the teacher's).
      loss_kwargs: the loss's own options.
    """

    loss: str
    weight: float
    student: str
    teacher: str
    projector: str = "none"
    loss_kwargs: tuple[tuple[str, Any], ...] = ()


def last_stage(model: str) -> str:
    """The name of ``model``'s last stage feature (CRD's ``feat[-2]``)."""
    return [name for name in FEATURE_LAYERS[model] if name.startswith("stage")][-1]


def method_terms(method: str, pair: Pair, *, batch_size: int, quick: bool = False):
    """The feature terms of ``method`` for ``pair`` (none for logit methods).

    Args:
      method: one of ``METHODS``.
      pair: the teacher/student pair (for the stage features).
      batch_size: the global batch of the relational losses (their weights are
        converted from the reference's scale with it).
      quick: fewer CRD negatives, for a quick run.

    Returns:
      A tuple of :class:`FeatureTerm`.
    """
    b = float(batch_size)
    if method in LOGIT_METHODS:
        return ()
    if method == "fitnet":  # RepDistiller's hint_layer=2: the middle stage.
        return (FeatureTerm("hint", 100.0, "stage2", "stage2", projector="linear"),)
    if method == "at":  # feat[1:-1] of both, zipped: the teacher's three stages.
        return tuple(
            FeatureTerm("attention", 1000.0, f"stage{k}", f"stage{k}", loss_kwargs=(("p", 2.0),))
            for k in (1, 2, 3)
        )
    if method == "sp":  # feat[-2]: the last stage's map.
        return (FeatureTerm("sp", 3000.0, last_stage(pair.student), last_stage(pair.teacher)),)
    if method == "rkd":  # feat[-1]: the pooled embedding.
        return (
            FeatureTerm("rkd_distance", 25.0 * (b - 1) / b, "pooled", "pooled"),
            FeatureTerm("rkd_angle", 50.0 * (b - 1) * (b - 2) / b**2, "pooled", "pooled"),
        )
    if method == "pkt":
        return (FeatureTerm("pkt", 30000.0 / b, "pooled", "pooled"),)
    if method == "crd":
        options = dict(CRD_OPTIONS)
        if quick:
            options["num_negatives"] = QUICK_CRD_NEGATIVES
        return (FeatureTerm("crd", 0.8, "pooled", "pooled", loss_kwargs=tuple(options.items())),)
    raise ValueError(f"Unknown method {method!r}; known: {', '.join(METHODS)}.")


def _set_feature(config: ml_collections.ConfigDict, terms, pair: Pair) -> None:
    feature = config.distill.feature
    student_paths = [FEATURE_LAYERS[pair.student][t.student] for t in terms]
    teacher_paths = [FEATURE_LAYERS[pair.teacher][t.teacher] for t in terms]
    projectors = {t.projector for t in terms}
    kwargs = {tuple(t.loss_kwargs) for t in terms}
    if len(projectors) > 1 or len(kwargs) > 1:
        raise ValueError("Terms of one method must share the projector and the loss options.")
    weights = [t.weight for t in terms]
    loss_kwargs = dict(terms[0].loss_kwargs)
    feature.loss = ",".join(t.loss for t in terms)
    feature.student = ",".join(student_paths)
    feature.teacher = ",".join(teacher_paths)
    feature.projector = terms[0].projector
    if len(set(weights)) == 1:
        feature.weight = weights[0]
    else:
        feature.weight = 1.0
        loss_kwargs["term_weights"] = tuple(weights)
    feature.loss_kwargs = loss_kwargs


def schedule_steps(*, batch_size: int, epochs: int = EPOCHS) -> tuple[int, tuple[int, ...]]:
    """``(steps, decay_steps)`` of ``epochs`` over the whole CIFAR-100 training split
    (``50000 // batch_size`` full batches per epoch), decaying after ``DECAY_EPOCHS``."""
    per_epoch = CIFAR100_TRAIN_EXAMPLES // batch_size
    return epochs * per_epoch, tuple(epoch * per_epoch for epoch in DECAY_EPOCHS)


def parse_arg(arg: str | None) -> tuple[str, str, bool]:
    """``(pair, method, quick)`` of ``"PAIR,METHOD[,quick]"``."""
    parts = [] if not arg else [part.strip() for part in arg.split(",")]
    quick = len(parts) == 3 and parts[2] == "quick"
    if len(parts) not in (2, 3) or (len(parts) == 3 and not quick):
        raise ValueError(
            f"Config argument {arg!r}: expected 'PAIR,METHOD' or 'PAIR,METHOD,quick', e.g. "
            "'resnet32x4-resnet8x4,kd'."
        )
    pair, method = parts[:2]
    if pair not in PAIRS:
        raise ValueError(f"Unknown pair {pair!r}; known: {', '.join(PAIRS)}.")
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; known: {', '.join(METHODS)}.")
    return pair, method, quick


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The config of ``"PAIR,METHOD[,quick]"`` (see the module docstring)."""
    pair_name, method, quick = parse_arg(arg)
    pair = PAIRS[pair_name]
    steps, decay_steps = schedule_steps(batch_size=BATCH_SIZE)
    config = image_classification_config(
        "cifar100",
        teacher=pair.teacher,
        student=pair.student,
        steps=steps,
        batch_size=BATCH_SIZE,
        optimizer="sgd",
        learning_rate=pair.learning_rate,
        weight_decay=5e-4,
    )
    # Optimization: CRD's recipe (teachers at 0.05 whatever the student's rate).
    config.teacher.learning_rate = 0.05
    config.momentum = 0.9
    config.nesterov = False
    config.schedule = "step"
    config.decay_steps = decay_steps
    config.decay_factor = DECAY_FACTOR
    config.validation_fraction = 0.0
    per_epoch = CIFAR100_TRAIN_EXAMPLES // BATCH_SIZE
    config.eval_every = 10 * per_epoch
    config.checkpoint_every = 10 * per_epoch
    config.augment.crop_padding = 4
    config.augment.flip = True

    # The published numbers this run is compared with (experiments.report).
    config.anchor = ml_collections.ConfigDict({"pair": pair.anchor, "method": method})

    config = finish(config, "quick" if quick else None, **TINY_RUN, decay_steps=(2, 3))

    # Distillation: the logit term, then the feature term.
    config.distill.temperature = 4.0
    if method == "none":
        config.student_runs = ("scratch",)
    elif method == "kd":
        config.distill.loss = "kl"
        config.distill.alpha = 0.9
    elif method == "dkd":
        config.distill.loss = "dkd"
        config.distill.alpha = 0.5
        config.distill.loss_kwargs = {"alpha": 1.0, "beta": pair.dkd_beta}
    else:
        config.distill.loss = "kl"
        config.distill.alpha = 0.0  # cross entropy + the feature term
        terms = method_terms(method, pair, batch_size=config.batch_size, quick=quick)
        _set_feature(config, terms, pair)
    return config
