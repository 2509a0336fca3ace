"""CRD as an objective of the train step, with its memory banks as explicit state.

:func:`crd_objective` follows the objective protocol of :func:`jaxkd.make_train_step`
for objectives that own parameters and state:

* ``distill_params``: the two linear embedding heads (student and teacher), trained
  with the student;
* ``distill_state``: the two memory banks ``[N, D]``, the two normalizers :math:`Z`
  and whether they are set; returned updated by every call;
* ``rng``: the key that draws the negatives.

Data parallelism (``axis_name``). Every device holds the whole of both banks, and
they must stay identical. Each device scores its own examples against its copy of
the banks; the per-example losses are averaged over the global batch (sums and
counts reduced over the axis). The banks are then updated with the *gathered*
batch: the embeddings, dataset indices and mask of every device are all-gathered
(``B_global x (2 D + 2)`` numbers, small beside the banks) and every device applies
the same update, so the banks stay replicated and equal to those of one device
running the global batch. The negatives of an example are drawn from a key folded
with its dataset index (:func:`jaxkd.losses._crd.sample_negatives`), so the same
example gets the same negatives whichever device it lands on, and the loss of the
global batch is the one a single device computes. The normalizers are set from the
first global batch: the mean of its scores is a ratio of sums and counts reduced over
the axis, the same as the mean over the gathered batch.

The per-shard alternative, each device updating its bank with its own shard only,
needs no gather, but the copies then drift apart: an example's row is fresh on the
device that saw it and stale on the others, the state is no longer the same on every
device (as the protocol requires) and the result depends on the number of devices.
Sharding the banks over the devices instead (``N / devices`` rows each, negatives
fetched with collectives) would divide their memory, ``2 N D`` floats per device
(1.3 GB for ImageNet at ``D = 128``), but costs an all-to-all of ``B K D`` values a
step; replicated banks are the simple, exact choice at CIFAR and ImageNet scale.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd import _checks
from jaxkd.losses._crd import (
    check_count,
    check_negatives,
    crd_nce_loss,
    crd_scores,
    init_memory_bank,
    sample_negatives,
    update_memory_bank,
)
from jaxkd.losses._feature_losses import _HIGHEST, _safe_normalize
from jaxkd.parallel._reductions import gather_examples, masked_means, masked_sum_and_count
from jaxkd.train._feature_objective import call_base, features_of, init_base
from jaxkd.train._objectives import Objective, accepts_keyword

PyTree = Any

_SIDES = ("student", "teacher")


def _features(outputs, name: str, side: str, option: str) -> jax.Array:
    """``outputs["features"][name]`` flattened to ``[B, D]``, or a clear error."""
    try:
        array = features_of(outputs, name, role=side)
    except KeyError as error:
        raise KeyError(f"`{option}`={name!r}: {error.args[0]}") from None
    _checks.check_floating(f"{side}_out['features'][{name!r}]", array)
    if jnp.ndim(array) < 2:
        raise ValueError(
            f"`{option}`={name!r}: the {side}'s feature must be [B, ...] with at least two "
            f"dimensions (batch first), got shape {jnp.shape(array)}."
        )
    return jnp.reshape(array, (jnp.shape(array)[0], -1))


def _embed(head: Mapping, features: jax.Array, side: str) -> jax.Array:
    """``normalize(features @ kernel + bias)``: an L2-normalized embedding ``[B, D]``."""
    kernel, bias = head["kernel"], head["bias"]
    if jnp.shape(kernel)[0] != features.shape[1]:
        raise ValueError(
            f"The {side} embedding head has kernel {jnp.shape(kernel)} but the {side}'s "
            f"features flatten to {features.shape}: initialize the heads from these outputs."
        )
    dtype = jnp.promote_types(features.dtype, jnp.float32)
    projected = jnp.matmul(features.astype(dtype), kernel.astype(dtype), precision=_HIGHEST)
    return _safe_normalize(projected + bias.astype(dtype)[None, :])


def _linear_head(rng, in_dim: int, out_dim: int) -> dict[str, jax.Array]:
    """A linear layer initialized as PyTorch's ``nn.Linear`` (the reference's heads):
    kernel and bias uniform in ``[-1/sqrt(in_dim), 1/sqrt(in_dim)]``."""
    bound = float(1.0 / np.sqrt(in_dim))
    kernel_rng, bias_rng = jax.random.split(rng)
    return {
        "kernel": jax.random.uniform(kernel_rng, (in_dim, out_dim), minval=-bound, maxval=bound),
        "bias": jax.random.uniform(bias_rng, (out_dim,), minval=-bound, maxval=bound),
    }


def _batch_entries(batch: Mapping, index_key: str, mask_key: str, batch_size: int):
    """The dataset indices ``[B]`` and the optional bool mask ``[B]`` of the batch."""
    if index_key not in batch:
        raise KeyError(
            f"CRD needs each example's dataset index: the batch has no `index_key`="
            f"{index_key!r} entry (it has {sorted(batch)})."
        )
    indices = batch[index_key]
    _checks.check_integer(f"batch[{index_key!r}]", indices)
    if jnp.shape(indices) != (batch_size,):
        raise ValueError(
            f"`batch[{index_key!r}]` must be [B] = [{batch_size}] dataset indices, got "
            f"shape {jnp.shape(indices)}."
        )
    mask = batch.get(mask_key)
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.dtype != jnp.bool_ or mask.shape != (batch_size,):
            raise ValueError(
                f"`batch[{mask_key!r}]` must be a bool [{batch_size}] mask of real examples, "
                f"got {mask.dtype} {mask.shape}."
            )
    return jnp.asarray(indices, jnp.int32), mask


def _check_state(distill_state: Mapping, num_data: int, feature_dim: int) -> None:
    expected = (num_data, feature_dim)
    missing = [f"{side}_bank" for side in _SIDES if f"{side}_bank" not in distill_state]
    if missing:
        raise ValueError(
            f"`distill_state` lacks {missing}: create the state with the parts of "
            "jaxkd.init_distillation(objective, ...) (TrainState.create(..., distill_params=..., "
            "distill_state=...))."
        )
    for side in _SIDES:
        shape = jnp.shape(distill_state[f"{side}_bank"])
        if shape != expected:
            raise ValueError(
                f"`distill_state['{side}_bank']` has shape {shape}; this objective expects "
                f"[num_data, feature_dim] = {list(expected)}."
            )


def crd_objective(
    *,
    num_data: int,
    student_feature: str,
    teacher_feature: str,
    feature_dim: int = 128,
    num_negatives: int = 4096,
    nce_temperature: float = 0.07,
    momentum: float = 0.5,
    weight: float = 0.8,
    base: Objective | None = None,
    index_key: str = "index",
    mask_key: str = "mask",
) -> Objective:
    r"""Contrastive representation distillation, optionally added to a logit objective.

    The student's and the teacher's features (``outputs["features"][name]``,
    flattened to ``[B, D_s]`` and ``[B, D_t]``) go through linear heads to
    ``feature_dim`` and are L2-normalized: :math:`v^s_i`, :math:`v^t_i`. With the
    memory banks :math:`M^s, M^t` (``[N, D]``) and ``K`` negatives per example,

    .. math::
      \mathcal{L} = \text{base} + w \cdot \frac{1}{n}\sum_i \left[
        \ell\left(v^s_i; M^t\right) + \ell\left(v^t_i; M^s\right)\right]

    over the ``n`` real examples of the global batch, where :math:`\ell` is the NCE
    loss (:func:`jaxkd.losses._crd.crd_nce_loss`) of the scores
    :math:`\exp(\langle v, m_j \rangle / \tau) / Z` of the anchor against the bank
    rows of its own index and of its negatives
    (:func:`jaxkd.losses._crd.crd_scores`). Each normalizer :math:`Z` is set once,
    from the first batch: the mean of its ``B (K + 1)`` unnormalized scores
    (positives included, as in the reference) times ``N``. After scoring, both banks
    take the batch's embeddings with momentum
    (:func:`jaxkd.losses._crd.update_memory_bank`). The paper's default is
    ``K = 16384``; this one is smaller, for memory.

    The objective has an ``init(rng, student_out, teacher_out, batch) ->
    (distill_params, distill_state)`` attribute (:func:`jaxkd.init_distillation`):
    ``distill_params = {"student_embed": {"kernel" [D_s, D], "bias" [D]},
    "teacher_embed": ...}`` initialized as PyTorch's ``nn.Linear`` (the reference's
    heads), and ``distill_state = {"student_bank" [N, D], "teacher_bank" [N, D],
    "student_anchor_normalizer", "teacher_anchor_normalizer", "normalizers_set"}``
    with banks as in :func:`jaxkd.losses._crd.init_memory_bank`. Data parallelism:
    see the module docstring (banks updated with the gathered batch, negatives drawn
    per dataset index).

    Args:
      num_data: ``N``, the number of training examples; ``batch[index_key]`` holds
        each example's index in ``[0, N)``.
      student_feature: name of the student's feature (``student_out["features"]``),
        e.g. its penultimate layer's path.
      teacher_feature: name of the teacher's feature.
      feature_dim: ``D``, the embedding dimension (128 in the paper).
      num_negatives: ``K``, negatives per example, ``< num_data``.
      nce_temperature: :math:`\tau` (0.07).
      momentum: weight of the old bank row in the update (0.5).
      weight: :math:`w`, the CRD term's weight (0.8 in the paper, beside KD).
      base: optional objective ``(student_out, teacher_out, batch, step, *,
        axis_name) -> (loss, metrics)`` (e.g. :func:`jaxkd.hinton_objective`)
        whose loss is added; its metrics are reported, its ``loss`` as
        ``base_loss``.
      index_key: batch key of the int ``[B]`` dataset indices, in ``[0, num_data)``
        for real examples. Concrete indices out of range are refused; under ``jit``
        they cannot be checked, and an out-of-range index of a real example makes the
        loss (and so the update) NaN rather than silently wrong. Masked examples may
        hold any index.
      mask_key: batch key of an optional bool ``[B]`` mask of real examples:
        padding takes no part in the loss, the normalizers or the bank updates.

    Returns:
      An objective ``(student_out, teacher_out, batch, step, *, axis_name=None,
      distill_params, distill_state, rng) -> (loss, metrics, distill_state)`` with
      metrics ``loss`` and ``crd_loss`` (the unweighted, symmetric NCE loss), and
      the ``init`` attribute.

    References:
      Tian, Krishnan and Isola, "Contrastive Representation Distillation", ICLR
      2020. https://arxiv.org/abs/1911.10959
    """
    num_negatives, num_data = check_negatives(num_negatives, num_data)
    feature_dim = check_count("feature_dim", feature_dim)
    _checks.check_positive_scalar("nce_temperature", nce_temperature)
    _checks.check_unit_interval("momentum", momentum)
    _checks.check_non_negative("weight", weight)
    for option, value in (
        ("student_feature", student_feature),
        ("teacher_feature", teacher_feature),
        ("index_key", index_key),
        ("mask_key", mask_key),
    ):
        if not isinstance(value, str):
            raise TypeError(f"`{option}` must be a str, got {value!r}.")
    if base is not None and not callable(base):
        raise TypeError(f"`base` must be an objective (a callable) or None, got {type(base)}.")
    base_takes_axis = base is not None and accepts_keyword(base, "axis_name")

    def both_features(student_out, teacher_out):
        student = _features(student_out, student_feature, "student", "student_feature")
        teacher = _features(teacher_out, teacher_feature, "teacher", "teacher_feature")
        if student.shape[0] != teacher.shape[0]:
            raise ValueError(
                f"The student's features {student.shape} and the teacher's {teacher.shape} "
                "disagree on the batch size."
            )
        return student, jax.lax.stop_gradient(teacher)

    def init(rng, student_out, teacher_out, batch):
        features = both_features(student_out, teacher_out)
        keys = jax.random.split(rng, 4)
        distill_params = {
            f"{side}_embed": _linear_head(key, array.shape[1], feature_dim)
            for side, key, array in zip(_SIDES, keys[:2], features, strict=True)
        }
        distill_params.update(init_base(base, rng, student_out, teacher_out, batch))
        distill_state = {
            **{
                f"{side}_bank": init_memory_bank(key, num_data, feature_dim)
                for side, key in zip(_SIDES, keys[2:], strict=True)
            },
            "student_anchor_normalizer": jnp.ones((), jnp.float32),
            "teacher_anchor_normalizer": jnp.ones((), jnp.float32),
            "normalizers_set": jnp.zeros((), jnp.bool_),
        }
        return distill_params, distill_state

    def objective(
        student_out,
        teacher_out,
        batch,
        step,
        *,
        axis_name=None,
        distill_params,
        distill_state,
        rng,
    ):
        student_features, teacher_features = both_features(student_out, teacher_out)
        indices, mask = _batch_entries(batch, index_key, mask_key, student_features.shape[0])
        _check_state(distill_state, num_data, feature_dim)
        student = _embed(distill_params["student_embed"], student_features, "student")
        teacher = _embed(distill_params["teacher_embed"], teacher_features, "teacher")
        negatives = sample_negatives(rng, indices, num_negatives, num_data)

        # Unnormalized scores: the student anchor against the teacher bank, and back.
        score_kwargs = dict(temperature=nce_temperature, normalizer=1.0)
        student_scores = crd_scores(
            student, distill_state["teacher_bank"], indices, negatives, **score_kwargs
        )
        teacher_scores = crd_scores(
            teacher, distill_state["student_bank"], indices, negatives, **score_kwargs
        )

        # Z = mean score of the first global batch times N, kept afterwards.
        totals = []
        for positive, negative in (student_scores, teacher_scores):
            per_example = positive + jnp.sum(negative, axis=1)
            totals.append(masked_sum_and_count(jax.lax.stop_gradient(per_example), mask))
        sums = jnp.stack([totals[0][0], totals[1][0], totals[0][1]])
        if axis_name is not None:
            sums = jax.lax.psum(sums, axis_name)
        count = sums[2] * (num_negatives + 1)
        was_set = distill_state["normalizers_set"]
        normalizers = [
            jnp.where(was_set, distill_state[name], sums[k] / jnp.maximum(count, 1) * num_data)
            for k, name in enumerate(("student_anchor_normalizer", "teacher_anchor_normalizer"))
        ]

        per_example = sum(
            crd_nce_loss(positive / z, negative / z, num_data=num_data, where=mask)
            for (positive, negative), z in zip(
                (student_scores, teacher_scores), normalizers, strict=True
            )
        )
        # A real example's index out of range (unchecked under jit) poisons the loss.
        out_of_range = (indices < 0) | (indices >= num_data)
        out_of_range = out_of_range if mask is None else out_of_range & mask
        per_example = jnp.where(out_of_range, jnp.nan, per_example)
        crd = masked_means({"crd": (per_example, mask)}, axis_name=axis_name)["crd"]
        total = weight * crd
        metrics = {"crd_loss": crd}
        if base is not None:
            base_kwargs = {"axis_name": axis_name} if base_takes_axis else {}
            if axis_name is not None and not base_takes_axis:
                raise TypeError("The `base` objective takes no `axis_name`: it cannot run here.")
            base_loss, base_metrics = call_base(
                base, distill_params, student_out, teacher_out, batch, step, **base_kwargs
            )
            metrics = {**base_metrics, "base_loss": base_loss, **metrics}
            total = total + base_loss
        metrics["loss"] = total

        # The banks take the whole (gathered) batch, identically on every device.
        gathered_indices = gather_examples(indices, axis_name)
        gathered_mask = gather_examples(mask, axis_name)
        new_state = {
            "student_anchor_normalizer": normalizers[0],
            "teacher_anchor_normalizer": normalizers[1],
            "normalizers_set": was_set | (count > 0),
        }
        for side, embeddings in zip(_SIDES, (student, teacher), strict=True):
            new_state[f"{side}_bank"] = update_memory_bank(
                distill_state[f"{side}_bank"],
                gather_examples(jax.lax.stop_gradient(embeddings), axis_name),
                gathered_indices,
                momentum=momentum,
                where=gathered_mask,
            )
        return total, metrics, new_state

    objective.init = init
    return objective
