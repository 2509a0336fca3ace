"""The distillation objectives of a config: logit term, feature terms, dynamic rules.

``config.distill`` holds the logit term (``loss``, ``alpha``, ``temperature``,
``loss_kwargs``: :func:`jaxkd.distillation_objective`), an optional feature term
``distill.feature`` and, for the ``distilled_dynamic`` run, ``distill.dynamic``.

A feature term compares intermediate values of the two unmodified models, at module
paths or sown names (``distill.feature.student`` and ``.teacher``), with one of
``hint``, ``attention``, ``sp``, ``rkd_distance``, ``rkd_angle``, ``pkt`` (through
:func:`jaxkd.feature_objective`, with a trained ``linear`` projector or none) or
``crd`` (:func:`jaxkd.crd_objective`, its memory banks sized to the training split).
Several terms are written comma-separated, one entry per term in ``loss``,
``student`` and ``teacher`` (e.g. attention transfer at three stages, or RKD's
distance and angle losses), with relative weights ``loss_kwargs.term_weights``
multiplying ``weight``; the terms are added to the logit term. Each other entry of
``loss_kwargs`` goes to every term whose loss takes it (CRD's ``num_negatives`` to
the CRD term, attention's ``p`` to the attention terms); one that no term takes is
refused. A CRD term, whose memory banks are state, wraps all the others.

``loss_kwargs`` has no fields of its own, so its entries are set in a config file
(see ``experiments/configs/cifar100_pairs.py``), not from the command line.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import ml_collections

import jaxkd
from jaxkd.train._dynamic import DYNAMIC_OBJECTIVES
from jaxkd.train._feature_objective import FEATURE_LOSSES, PROJECTORS

FEATURE_TERMS = (*FEATURE_LOSSES, "crd")


def _options_taken(loss: str) -> set[str]:
    """The option names a feature term of ``loss`` accepts."""
    fn = jaxkd.crd_objective if loss == "crd" else FEATURE_LOSSES[loss]
    return {
        name
        for name, p in inspect.signature(fn).parameters.items()
        if p.kind is p.KEYWORD_ONLY
        and name not in ("where", "axis_name", "base", "weight", "num_data")
        and not name.endswith("_feature")
    }


def feature_terms(feature: ml_collections.ConfigDict) -> list[dict[str, Any]]:
    """``config.distill.feature`` as one dict per term, in order.

    Each dict has ``loss``, ``weight`` (``weight`` times the term's entry of
    ``loss_kwargs.term_weights``), ``student`` and ``teacher`` (feature paths),
    ``projector`` and ``loss_kwargs`` (without ``term_weights``).

    Raises:
      ValueError: lists of different lengths, or ``term_weights`` of another length.
    """
    if not feature.loss:
        return []
    fields = {name: str(feature[name]).split(",") for name in ("loss", "student", "teacher")}
    count = len(fields["loss"])
    for name, values in fields.items():
        if len(values) != count:
            raise ValueError(
                f"distill.feature.{name} has {len(values)} entries for {count} losses "
                f"({feature.loss!r}): one per term."
            )
    options = dict(feature.loss_kwargs)
    term_weights = tuple(options.pop("term_weights", (1.0,) * count))
    if len(term_weights) != count:
        raise ValueError(
            f"distill.feature.loss_kwargs.term_weights has {len(term_weights)} entries for "
            f"{count} terms."
        )
    losses = [loss.strip() for loss in fields["loss"]]
    unknown = [loss for loss in losses if loss not in FEATURE_TERMS]
    if unknown:
        raise ValueError(
            f"distill.feature.loss={feature.loss!r}: {unknown} not among {sorted(FEATURE_TERMS)} "
            "(or '' for none)."
        )
    taken = [_options_taken(loss) for loss in losses]
    unused = sorted(set(options) - set().union(*taken))
    if unused:
        raise ValueError(
            f"distill.feature.loss_kwargs {unused} are options of none of the terms {losses}."
        )
    return [
        {
            "loss": losses[i],
            "weight": float(feature.weight) * float(term_weights[i]),
            "student": fields["student"][i].strip(),
            "teacher": fields["teacher"][i].strip(),
            "projector": feature.projector,
            "loss_kwargs": {name: value for name, value in options.items() if name in taken[i]},
        }
        for i in range(count)
    ]


def uses_crd(config: ml_collections.ConfigDict) -> bool:
    """Whether the distilled student has a CRD term (its batches then carry indices)."""
    return any(term["loss"] == "crd" for term in feature_terms(config.distill.feature))


def feature_paths(config: ml_collections.ConfigDict) -> tuple[dict[str, str], dict[str, str]]:
    """``({name: path}, {name: path})`` of the student's and the teacher's features
    that the feature terms read: term ``i`` reads ``student_i`` and ``teacher_i``."""
    terms = feature_terms(config.distill.feature)
    return (
        {f"student_{i}": term["student"] for i, term in enumerate(terms)},
        {f"teacher_{i}": term["teacher"] for i, term in enumerate(terms)},
    )


def check(config: ml_collections.ConfigDict, kinds: tuple[str, ...], fail: Callable) -> None:
    """Refuses, through ``fail(message)``, a feature term or dynamic method the runner
    cannot build."""
    feature = config.distill.feature
    try:
        terms = feature_terms(feature)
    except ValueError as error:
        fail(str(error))
    for term in terms:
        if not term["weight"] > 0:
            fail(
                f"distill.feature.weight={feature.weight} gives the {term['loss']!r} term weight "
                f"{term['weight']}: a feature term needs a positive weight."
            )
        if not (term["student"] and term["teacher"]):
            fail(
                f"distill.feature.loss={feature.loss!r} needs the feature paths "
                "distill.feature.student and distill.feature.teacher."
            )
    if terms and feature.projector not in PROJECTORS:
        fail(f"distill.feature.projector={feature.projector!r}; expected one of {PROJECTORS}.")
    if terms and "distilled_cached" in kinds:
        fail("distill.feature.loss needs the teacher's features: not with distilled_cached.")
    if sum(term["loss"] == "crd" for term in terms) > 1:
        fail(f"distill.feature.loss={feature.loss!r}: at most one crd term.")
    method = config.distill.dynamic.method
    if ("distilled_dynamic" in kinds) != bool(method):
        fail(
            f"distill.dynamic.method={method!r} and student_runs={kinds}: the "
            f"distilled_dynamic run needs a method among {sorted(DYNAMIC_OBJECTIVES)}, and a "
            "method needs that run."
        )
    if method and method not in DYNAMIC_OBJECTIVES:
        fail(f"distill.dynamic.method={method!r}; expected one of {sorted(DYNAMIC_OBJECTIVES)}.")


def logit_objective(config: ml_collections.ConfigDict):
    """The logit term of ``config.distill`` (loss, alpha, temperature, loss_kwargs)."""
    return jaxkd.distillation_objective(
        config.distill.loss,
        alpha=config.distill.alpha,
        temperature=config.distill.temperature,
        loss_kwargs=config.distill.loss_kwargs.to_dict(),
    )


def distillation_objective(config: ml_collections.ConfigDict, num_train: int | None = None):
    """The ``distilled`` objective: the logit term plus each feature term in order
    (CRD needs ``num_train``, the size of its memory banks)."""
    objective = logit_objective(config)
    terms = list(enumerate(feature_terms(config.distill.feature)))
    # CRD's banks are state: its objective wraps the others.
    for i, term in sorted(terms, key=lambda pair: pair[1]["loss"] == "crd"):
        names = dict(student_feature=f"student_{i}", teacher_feature=f"teacher_{i}")
        if term["loss"] == "crd":
            objective = jaxkd.crd_objective(
                num_data=num_train,
                weight=term["weight"],
                base=objective,
                **names,
                **term["loss_kwargs"],
            )
        else:
            objective = jaxkd.feature_objective(
                term["loss"],
                weight=term["weight"],
                projector=term["projector"],
                loss_kwargs=term["loss_kwargs"],
                base=objective,
                **names,
            )
    return objective


def dynamic_objective(config: ml_collections.ConfigDict):
    """The ``distilled_dynamic`` objective: ``distill.dynamic.method`` with its
    ``kwargs``, starting from ``distill``'s alpha and temperature where it has them."""
    method = config.distill.dynamic.method
    defaults = {
        "ctkd": dict(alpha=config.distill.alpha, initial_temperature=config.distill.temperature),
        "confidence_temperature": dict(alpha=config.distill.alpha),
        "gap_alpha": dict(temperature=config.distill.temperature),
    }[method]
    return DYNAMIC_OBJECTIVES[method](**{**defaults, **config.distill.dynamic.kwargs.to_dict()})
