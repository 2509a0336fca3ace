"""Feature and relational distillation in the step: ``feature_objective``.

The student and the teacher are called with ``features=...`` (see
:func:`jaxkd.linen_apply`), so that their outputs carry ``{"features": {name:
array}}``; this objective compares one student feature with one teacher feature
through a feature or relational loss, optionally after a trainable projector of
the student's feature (FitNets' regressor), and adds the result to a logit
objective (KD + hints, say). The projector is a distillation parameter: it lives in
``TrainState.distill_params``, is trained with the student and is not part of the
exported student.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxkd import _checks
from jaxkd.losses._feature_losses import attention_transfer_loss, hint_loss
from jaxkd.losses._relational_losses import (
    pkt_loss,
    rkd_angle_loss,
    rkd_distance_loss,
    similarity_preserving_loss,
)
from jaxkd.parallel._reductions import masked_means
from jaxkd.train._objectives import Objective, Scalar, _check_hyper_parameter, value_at

PyTree = Any

# Per-example losses ([B] values, averaged over the global batch) and batch-level ones
# (a scalar of the gathered batch: they take `axis_name`).
FEATURE_LOSSES: dict[str, Callable] = {
    "hint": hint_loss,
    "attention": attention_transfer_loss,
    "sp": similarity_preserving_loss,
    "rkd_distance": rkd_distance_loss,
    "rkd_angle": rkd_angle_loss,
    "pkt": pkt_loss,
}
PROJECTORS = ("none", "linear")


def features_of(outputs, name: str, *, role: str) -> jax.Array:
    """``outputs["features"][name]``, or an error saying how to ask for it."""
    features = outputs.get("features") if isinstance(outputs, Mapping) else None
    if features is None:
        raise ValueError(
            f"The {role}'s outputs carry no features: build its apply with "
            f"features=[{name!r}] (jaxkd.linen_apply / linen_teacher_apply / nnx_apply)."
        )
    if name not in features:
        raise KeyError(
            f"The {role}'s outputs have no feature {name!r}; they have {sorted(features)}."
        )
    return features[name]


def init_distillation(
    objective: Objective, rng: jax.Array, student_out, teacher_out, batch: Mapping
) -> tuple[PyTree, PyTree]:
    """``(distill_params, distill_state)`` of an objective, from example outputs.

    Objectives with trainable parts or state (projectors, embedding heads, memory
    banks, a learned temperature) have an ``init(rng, student_out, teacher_out,
    batch)`` method that sizes them from the outputs; for the others this returns
    ``({}, {})``. Pass both to :meth:`jaxkd.TrainState.create`.
    """
    init = getattr(objective, "init", None)
    if init is None:
        return {}, {}
    return init(rng, student_out, teacher_out, batch)


def init_base(base: Objective | None, rng, student_out, teacher_out, batch) -> dict:
    """``{"base": params}`` of a wrapped objective with trainable parts, else ``{}``.

    Objectives that wrap another (``base``) keep its parameters under ``"base"``;
    a base with a ``distill_state`` (a memory bank) must be the outermost one.
    """
    if base is None or getattr(base, "init", None) is None:
        return {}
    params, state = base.init(jax.random.fold_in(rng, 1), student_out, teacher_out, batch)
    if jax.tree.leaves(state):
        raise ValueError(
            "A `base` objective with a distill_state (e.g. CRD's memory banks) must be the "
            "outermost objective: wrap the others in it instead."
        )
    return {"base": params}


def call_base(base: Objective, distill_params, *args, **kwargs):
    """The base objective's ``(loss, metrics)``, given its distillation params if any."""
    if getattr(base, "init", None) is not None:
        kwargs["distill_params"] = distill_params["base"]
    return base(*args, **kwargs)


def feature_objective(
    loss: str,
    *,
    student_feature: str,
    teacher_feature: str,
    weight: Scalar = 1.0,
    projector: str = "none",
    base: Objective | None = None,
    loss_kwargs: Mapping[str, Any] | None = None,
    mask_key: str = "mask",
) -> Objective:
    r"""``base loss + weight * feature loss`` between one student and one teacher feature.

    Args:
      loss: ``"hint"`` (FitNets' mean squared error; the shapes must match after the
        projector), ``"attention"`` (attention transfer; the spatial sizes must
        match), or a relational loss on the gathered global batch: ``"sp"``
        (similarity-preserving), ``"rkd_distance"``, ``"rkd_angle"``, ``"pkt"``.
      student_feature: name of the student's feature (a key of
        ``student_out["features"]``), e.g. ``[B, H, W, C_s]`` or ``[B, D_s]``.
      teacher_feature: name of the teacher's feature; never differentiated.
      weight: the feature term's weight: a number or a schedule ``step -> value``.
      projector: ``"none"``, or ``"linear"``: a trainable map ``x W + b`` of the
        student feature's last (channel) axis to the teacher's width, applied at
        every position (a 1x1 convolution on feature maps; FitNets' regressor), held
        in ``distill_params["projector"]``.
      base: a logit objective whose loss and metrics are kept (e.g.
        :func:`jaxkd.hinton_objective`); ``None`` for the feature term alone.
      loss_kwargs: the feature loss's own options (e.g. ``{"p": 2}`` for attention).
      mask_key: batch key of an optional bool ``[B]`` mask of real examples.

    Returns:
      An objective with an ``init(rng, student_out, teacher_out, batch)`` method
      (see :func:`init_distillation`) whose metrics are the base's plus
      ``feature_loss`` and ``feature_weight``, and whose ``loss`` is the total.

    References:
      Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015.
      https://arxiv.org/abs/1412.6550
    """
    if loss not in FEATURE_LOSSES:
        raise ValueError(f"Unknown feature `loss` {loss!r}; known: {sorted(FEATURE_LOSSES)}.")
    if projector not in PROJECTORS:
        raise ValueError(f"Unknown `projector` {projector!r}; known: {list(PROJECTORS)}.")
    for name, value in (("student_feature", student_feature), ("teacher_feature", teacher_feature)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"`{name}` must name a feature, got {value!r}.")
    _check_hyper_parameter("weight", weight, _checks.check_non_negative)
    fn = FEATURE_LOSSES[loss]
    batch_level = loss in ("sp", "rkd_distance", "rkd_angle", "pkt")
    options = dict(loss_kwargs or {})
    known = [
        name
        for name, p in inspect.signature(fn).parameters.items()
        if p.kind is p.KEYWORD_ONLY and name not in ("where", "axis_name")
    ]
    if set(options) - set(known):
        raise ValueError(
            f"`loss_kwargs` {sorted(set(options) - set(known))} are not options of the "
            f"{loss!r} loss; its options: {known}."
        )

    def project(params, features):
        if projector == "none":
            return features
        if "projector" not in params:
            raise ValueError(
                "This objective's projector is not in `distill_params` (it has "
                f"{sorted(params)}): create the state with the parts of "
                "jaxkd.init_distillation(objective, ...) (TrainState.create(..., "
                "distill_params=...))."
            )
        kernel, bias = params["projector"]["kernel"], params["projector"]["bias"]
        projected = jnp.einsum("...i,ij->...j", features, kernel, precision="highest")
        return projected + jnp.broadcast_to(bias, projected.shape)

    def init(rng, student_out, teacher_out, batch):
        params = {}
        if projector == "linear":
            student = features_of(student_out, student_feature, role="student")
            teacher = features_of(teacher_out, teacher_feature, role="teacher")
            shape = (jnp.shape(student)[-1], jnp.shape(teacher)[-1])
            params["projector"] = {
                "kernel": jax.nn.initializers.lecun_normal()(rng, shape, jnp.float32),
                "bias": jnp.zeros(shape[-1:], jnp.float32),
            }
        params.update(init_base(base, rng, student_out, teacher_out, batch))
        return params, {}

    def objective(student_out, teacher_out, batch, step, *, axis_name=None, distill_params):
        student = project(distill_params, features_of(student_out, student_feature, role="student"))
        teacher = jax.lax.stop_gradient(features_of(teacher_out, teacher_feature, role="teacher"))
        mask = batch.get(mask_key)
        kwargs = dict(options, where=mask)
        if batch_level:
            value = fn(student, teacher, axis_name=axis_name, **kwargs)
        else:
            value = masked_means({"f": (fn(student, teacher, **kwargs), mask)}, axis_name=axis_name)
            value = value["f"]
        weight_now = value_at(weight, step)
        if base is None:
            base_loss, metrics = jnp.zeros((), value.dtype), {}
        else:
            base_loss, metrics = call_base(
                base, distill_params, student_out, teacher_out, batch, step, axis_name=axis_name
            )
        total = base_loss + weight_now * value
        metrics = {**metrics, "loss": total, "feature_loss": value, "feature_weight": weight_now}
        return total, metrics

    objective.init = init
    return objective
