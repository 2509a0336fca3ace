"""The distillation train and eval steps: pure functions of (state, teacher, batch).

A student ``apply`` has the signature
``apply(params, model_state, inputs, *, train, rng) -> (outputs, model_state)``;
a ``teacher_apply`` has the signature ``teacher_apply(teacher_params, inputs) ->
outputs`` and runs in inference mode. Outputs are logits ``[B, C]`` or a mapping
with a ``"logits"`` entry. :mod:`jaxkd.train._adapters` builds both from Flax linen and
NNX models.

The same step body runs under plain ``jax.jit`` (``axis_name=None``), under
``jax.pmap`` and under ``jax.shard_map``. With an ``axis_name``, the objective
and the metrics reduce ``(sum, count)`` pairs over that axis, so that the loss
and every metric are those of the global batch whatever the masks, and the
gradients and the floating model state (BatchNorm statistics) are averaged with
one packed ``pmean``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxkd.losses._distributions import entropy
from jaxkd.losses._divergences import kl_divergence
from jaxkd.losses._kd_losses import cross_entropy_with_integer_labels
from jaxkd.parallel._reductions import masked_means, pmean_packed
from jaxkd.train._metrics import (
    DENSE_JOINT_MAX_CLASSES,
    accuracy,
    mutual_information,
    mutual_information_of_labels,
    prediction_joint_counts,
    prediction_pairs,
    top1_agreement,
)
from jaxkd.train._objectives import Objective, accepts_keyword, example_mask, logits_of
from jaxkd.train._state import TrainState

PyTree = Any
StudentApply = Callable[..., tuple[Any, PyTree]]
TeacherApply = Callable[[PyTree, Any], Any]


def _cast_floating(tree: PyTree, dtype) -> PyTree:
    """Casts the floating leaves of ``tree`` to ``dtype``; others are kept."""

    def cast(leaf):
        leaf = jnp.asarray(leaf)
        return leaf.astype(dtype) if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf

    return jax.tree.map(cast, tree)


def _check_batch(batch: Mapping, required: tuple[str, ...]) -> None:
    if not isinstance(batch, Mapping):
        raise TypeError(f"`batch` must be a mapping of arrays, got {type(batch)}.")
    missing = [key for key in required if key not in batch]
    if missing:
        raise KeyError(f"`batch` lacks {missing}; it has {sorted(batch)}.")
    sizes = {key: jnp.shape(value)[:1] for key, value in batch.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"Batch entries disagree on the leading (batch) dimension: {sizes}.")


def teacher_outputs(
    teacher_apply: TeacherApply | None,
    teacher_params: PyTree,
    batch: Mapping,
    *,
    input_key: str,
    teacher_key: str,
    teacher_dtype=None,
):
    """The teacher's outputs for ``batch``, without gradient.

    Online (``teacher_apply`` given): one forward pass, optionally in
    ``teacher_dtype`` (params and inputs cast; outputs returned in float32).
    Cached (``teacher_apply`` is None): ``batch[teacher_key]`` if present, else
    ``None`` (supervised training with no teacher).
    """
    if teacher_apply is None:
        return batch.get(teacher_key)
    inputs = batch[input_key]
    if teacher_dtype is not None:
        teacher_params = _cast_floating(teacher_params, teacher_dtype)
        inputs = _cast_floating(inputs, teacher_dtype)
        outputs = _cast_floating(teacher_apply(teacher_params, inputs), jnp.float32)
    else:
        outputs = teacher_apply(teacher_params, inputs)
    return jax.lax.stop_gradient(outputs)


def _output_metrics(student_out, teacher_out, mask, axis_name) -> dict[str, jax.Array]:
    """Entropies and top-1 agreement over the real entries of the global batch.

    Outputs without logits (hidden states for a chunked objective, which reports
    these metrics itself) are skipped: the step never builds their logits.
    """

    def without_logits(outputs):
        return isinstance(outputs, Mapping) and "logits" not in outputs

    if without_logits(student_out):
        return {}
    if without_logits(teacher_out):
        teacher_out = None
    student_logits = jax.lax.stop_gradient(logits_of(student_out))
    mask = example_mask(mask, student_logits)
    named = {"student_entropy": (entropy(student_logits), mask)}
    if teacher_out is not None:
        teacher_logits = logits_of(teacher_out)
        named["teacher_entropy"] = (entropy(teacher_logits), mask)
        named["agreement"] = (top1_agreement(student_logits, teacher_logits), mask)
    return masked_means(named, axis_name=axis_name)


def _check_distill_params(state: TrainState, objective_takes_them: bool) -> None:
    """A state with distillation parameters needs an objective that uses them."""
    if jax.tree.leaves(state.distill_params) and not objective_takes_them:
        raise ValueError(
            "The state has `distill_params` but the objective takes no `distill_params` "
            "argument: they would never be trained. Build the state without them, or use "
            "the objective they were initialized for (jaxkd.init_distillation)."
        )


def _returned_distill_state(state: TrainState, returned: list, objective_takes_it: bool):
    """The objective's new ``distill_state`` (its third output), checked."""
    if not objective_takes_it:
        if returned:
            raise ValueError(
                "The objective returned more than (loss, metrics) but takes no "
                "`distill_state` argument."
            )
        return state.distill_state
    if len(returned) != 1:
        raise ValueError(
            "An objective taking `distill_state` must return (loss, metrics, distill_state)."
        )
    new = jax.lax.stop_gradient(returned[0])
    before, after = jax.tree.structure(state.distill_state), jax.tree.structure(new)
    if before != after:
        raise ValueError(
            f"The objective changed the structure of `distill_state`: {before} -> {after}."
        )
    return new


def make_train_step(
    student_apply: StudentApply,
    teacher_apply: TeacherApply | None,
    objective: Objective,
    optimizer: optax.GradientTransformation,
    *,
    axis_name: str | None = None,
    input_key: str = "image",
    teacher_input_key: str | None = None,
    teacher_key: str = "teacher_logits",
    mask_key: str = "mask",
    teacher_dtype=None,
    extra_metrics: bool = True,
    batch_transform: Callable | None = None,
) -> Callable[[TrainState, PyTree, Mapping], tuple[TrainState, dict]]:
    """Builds ``step(state, teacher_params, batch) -> (state, metrics)``.

    Only the student is differentiated: the teacher's outputs are computed outside
    the differentiated function, under ``stop_gradient``, and ``teacher_params``
    are neither updated nor returned. The step is pure; jit it (donating the
    state), or run it data-parallel with :func:`jaxkd.pmap_step` /
    :func:`jaxkd.shard_step`.

    Args:
      student_apply: ``apply(params, model_state, inputs, *, train, rng) ->
        (outputs, model_state)``.
      teacher_apply: ``teacher_apply(teacher_params, inputs) -> outputs``; or
        ``None`` to read precomputed teacher logits from ``batch[teacher_key]``
        (cached teacher), or to train without a teacher when that key is absent.
      objective: ``objective(student_out, teacher_out, batch, step, *,
        axis_name=None) -> (loss, metrics)``, e.g. :func:`jaxkd.hinton_objective`,
        returning the loss and metrics of the global batch (reduce with
        :func:`jaxkd.masked_means` over ``axis_name``). An objective without an
        ``axis_name`` keyword is accepted on one device only. An objective may
        also name the keywords ``distill_params`` (it then gets
        ``state.distill_params``, differentiated and updated beside the
        student's params), ``distill_state`` (it gets ``state.distill_state``
        and returns ``(loss, metrics, new_distill_state)``, the same on every
        device) and ``rng`` (a key, the same on every device); see
        :func:`jaxkd.init_distillation`.
      optimizer: any Optax transformation (``optax.MultiSteps`` for gradient
        accumulation).
      axis_name: the data-parallel axis (of ``jax.pmap`` or ``jax.shard_map``), or
        ``None`` on one device. The same name must be given to the runner
        (:func:`jaxkd.pmap_step`, :func:`jaxkd.shard_step`).
      input_key: batch key of the model inputs ``[B, ...]``.
      teacher_input_key: batch key of the teacher's inputs, default ``input_key``
        (the same view, as function matching wants); another key gives the
        teacher its own view, e.g. an independently augmented one.
      teacher_key: batch key of cached teacher logits ``[B, C]``.
      mask_key: batch key of an optional bool mask of real examples ``[B]`` (or
        tokens ``[B, L]``) used by the metrics.
      teacher_dtype: e.g. ``jnp.bfloat16`` to run the teacher forward in lower
        precision (its outputs are cast back to float32).
      extra_metrics: also report entropies, agreement and gradient/parameter
        norms. Each is a few small reductions per step: negligible for large
        models, measurable (kernel launches) for tiny ones.
      batch_transform: optional ``transform(student_params, teacher_params, batch,
        rng, *, axis_name) -> batch`` run first, without gradient, e.g. sampling
        continuations for on-policy distillation
        (:func:`jaxkd.lm.generation_transform`). ``rng`` is the same on every
        device; the transform folds in the device index where it needs to.

    Returns:
      The step. Its metrics: the objective's (``loss``, ``kd_loss``, ``ce_loss``,
      ...) and, with ``extra_metrics``, ``student_entropy``, ``teacher_entropy``
      and ``agreement`` (top-1 with the teacher) when there is a teacher,
      ``grad_norm`` and ``param_norm``; all of the global batch, the same on
      every device.
    """
    objective_takes_axis = accepts_keyword(objective, "axis_name")
    if axis_name is not None and not objective_takes_axis:
        raise TypeError(
            f"make_train_step(axis_name={axis_name!r}) needs an objective that accepts "
            "`axis_name` and reduces its loss over it (e.g. with jaxkd.masked_means); "
            "a per-device mean would weigh devices equally whatever their masks."
        )
    objective_kwargs = {"axis_name": axis_name} if objective_takes_axis else {}
    # Named explicitly (a **kwargs objective is not taken to want them).
    parameters = inspect.signature(objective).parameters
    takes = {name: name in parameters for name in ("distill_params", "distill_state", "rng")}

    def step(state: TrainState, teacher_params: PyTree, batch: Mapping):
        _check_batch(batch, (input_key,))
        rng = state.rng
        if batch_transform is not None:
            rng, transform_rng = jax.random.split(rng)
            batch = batch_transform(
                state.params, teacher_params, batch, transform_rng, axis_name=axis_name
            )
        teacher_out = teacher_outputs(
            teacher_apply,
            teacher_params,
            batch,
            input_key=input_key if teacher_input_key is None else teacher_input_key,
            teacher_key=teacher_key,
            teacher_dtype=teacher_dtype,
        )
        kwargs = dict(objective_kwargs)
        if takes["rng"]:  # the same key on every device
            rng, kwargs["rng"] = jax.random.split(rng)
        rng, step_rng = jax.random.split(rng)
        if axis_name is not None:
            step_rng = jax.random.fold_in(step_rng, jax.lax.axis_index(axis_name))
        if takes["distill_state"]:
            kwargs["distill_state"] = state.distill_state
        _check_distill_params(state, takes["distill_params"])

        def loss_fn(trainable):
            params, distill_params = state.split_trainable(trainable)
            extra = {"distill_params": distill_params} if takes["distill_params"] else {}
            student_out, model_state = student_apply(
                params, state.model_state, batch[input_key], train=True, rng=step_rng
            )
            loss, metrics, *distill_state = objective(
                student_out, teacher_out, batch, state.step, **kwargs, **extra
            )
            distill_state = _returned_distill_state(state, distill_state, takes["distill_state"])
            return loss, (metrics, model_state, student_out, distill_state)

        grads, (metrics, model_state, student_out, distill_state) = jax.grad(loss_fn, has_aux=True)(
            state.trainable()
        )
        metrics = dict(metrics)
        if extra_metrics:
            metrics.update(
                _output_metrics(student_out, teacher_out, batch.get(mask_key), axis_name)
            )
        if axis_name is not None:
            # Every device differentiated the global loss: the mean of their
            # gradients is its gradient. One all-reduce for gradients and state.
            grads, model_state = pmean_packed((grads, model_state), axis_name)
        trainable = state.trainable()
        updates, opt_state = optimizer.update(grads, state.opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        new_state = state.with_trainable(trainable).replace(
            step=state.step + 1,
            opt_state=opt_state,
            model_state=model_state,
            rng=rng,
            distill_state=distill_state,
        )
        if extra_metrics:
            metrics["grad_norm"] = optax.tree.norm(grads)
            metrics["param_norm"] = optax.tree.norm(new_state.params)
        return new_state, metrics

    step.axis_name = axis_name
    return step


def make_eval_step(
    student_apply: StudentApply,
    teacher_apply: TeacherApply | None = None,
    *,
    axis_name: str | None = None,
    temperature: float = 1.0,
    input_key: str = "image",
    label_key: str = "label",
    teacher_key: str = "teacher_logits",
    mask_key: str = "mask",
    teacher_dtype=None,
    prediction_joint: str | None = "auto",
) -> Callable[[TrainState, PyTree, Mapping], dict]:
    """Builds ``eval_step(state, teacher_params, batch) -> sums``.

    The step returns sums over the batch's real examples (``batch[mask_key]``, when
    present, marks padding as False), summed over ``axis_name`` too, so that sums
    over many batches add up; :func:`summarize_eval` turns them into means.

    Args:
      student_apply: as in :func:`make_train_step`; called with ``train=False``.
      teacher_apply: as in :func:`make_train_step`; ``None`` reads
        ``batch[teacher_key]`` if present, else evaluates the student alone.
      axis_name: the data-parallel axis to sum over, or ``None``.
      temperature: temperature of the reported ``T^2 KL(teacher || student)``.
      input_key: batch key of the inputs.
      label_key: batch key of the integer labels ``[B]`` (or targets ``[B, L]``).
      teacher_key: batch key of cached teacher logits.
      mask_key: batch key of an optional bool ``[B]`` (or ``[B, L]``) mask.
      teacher_dtype: lower-precision teacher forward, as in the train step.
      prediction_joint: how the (teacher top-1, student top-1) pairs are kept for
        the mutual information of the two models' predictions, with a teacher:
        ``"dense"``: ``sums["prediction_joint"]``, the float32 ``[C, C]`` counts of
        :func:`jaxkd.prediction_joint_counts` (row: teacher), summed like the
        others; ``"labels"``: ``sums["prediction_pairs"]``, int32 ``[N, 2]`` of
        :func:`jaxkd.prediction_pairs` (``-1`` at padding), gathered over
        ``axis_name``: **not a sum**, concatenate it over batches (axis 0) and
        count on the host, for vocabularies whose ``[V, V]`` joint is too large;
        ``None``: neither; ``"auto"``: ``"dense"`` up to
        ``DENSE_JOINT_MAX_CLASSES`` (1024) classes (a 4 MiB joint), else ``None``.

    Returns:
      The eval step. Its sums: ``count``, ``correct``, ``cross_entropy``,
      ``student_entropy``; with a teacher also ``teacher_correct``,
      ``teacher_cross_entropy``, ``agreement``, ``kl``, ``teacher_entropy`` and
      ``prediction_joint`` or ``prediction_pairs`` (see ``prediction_joint``).
    """
    if prediction_joint not in ("auto", "dense", "labels", None):
        raise ValueError(
            f"`prediction_joint`={prediction_joint!r}; expected 'auto', 'dense', 'labels' or None."
        )

    def eval_step(state: TrainState, teacher_params: PyTree, batch: Mapping):
        _check_batch(batch, (input_key, label_key))
        student_out, _ = student_apply(
            state.params, state.model_state, batch[input_key], train=False, rng=None
        )
        student_logits = logits_of(student_out)
        labels = batch[label_key]
        mask = batch.get(mask_key)
        weights = jnp.ones(labels.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)

        def total(values):
            return jnp.sum(jnp.where(weights > 0, values, 0.0))

        valid = None if mask is None else mask.astype(bool)
        sums = {
            "count": jnp.sum(weights),
            "correct": total(accuracy(student_logits, labels)),
            "cross_entropy": total(
                cross_entropy_with_integer_labels(student_logits, labels, where=valid)
            ),
            "student_entropy": total(entropy(student_logits)),
        }
        teacher_out = teacher_outputs(
            teacher_apply,
            teacher_params,
            batch,
            input_key=input_key,
            teacher_key=teacher_key,
            teacher_dtype=teacher_dtype,
        )
        if teacher_out is not None:
            teacher_logits = logits_of(teacher_out)
            sums["teacher_correct"] = total(accuracy(teacher_logits, labels))
            sums["teacher_cross_entropy"] = total(
                cross_entropy_with_integer_labels(teacher_logits, labels, where=valid)
            )
            sums["agreement"] = total(top1_agreement(student_logits, teacher_logits))
            sums["kl"] = total(
                kl_divergence(student_logits, teacher_logits, temperature=temperature)
            )
            sums["teacher_entropy"] = total(entropy(teacher_logits))
            joint = prediction_joint
            if joint == "auto":
                dense = jnp.shape(teacher_logits)[-1] <= DENSE_JOINT_MAX_CLASSES
                joint = "dense" if dense else None
            if joint == "dense":
                sums["prediction_joint"] = prediction_joint_counts(
                    student_logits, teacher_logits, where=valid
                )
        if axis_name is not None:
            sums = jax.lax.psum(sums, axis_name)
        if teacher_out is not None and prediction_joint == "labels":
            pairs = prediction_pairs(student_logits, logits_of(teacher_out), where=valid)
            if axis_name is not None:
                pairs = jax.lax.all_gather(pairs, axis_name, tiled=True)
            sums["prediction_pairs"] = pairs
        return sums

    eval_step.axis_name = axis_name
    return eval_step


def summarize_eval(sums: Mapping[str, Any]) -> dict[str, float]:
    """Means from summed eval metrics (one batch's, or many batches' added up).

    Args:
      sums: scalar sums from an eval step, plus its ``prediction_joint`` (a
        ``[C, C]`` sum) or ``prediction_pairs`` (``[N, 2]``, concatenated over
        batches). Under ``pmap`` every device holds the same (already summed)
        values: pass ``jaxkd.unreplicate(sums)``.

    Returns:
      ``count``, ``accuracy``, ``cross_entropy``, ``student_entropy`` and, with a
      teacher, ``teacher_accuracy``, ``teacher_cross_entropy``, ``agreement``,
      ``kl`` and ``teacher_entropy``; with ``prediction_joint`` or
      ``prediction_pairs``, ``mutual_information`` (nats) and
      ``normalized_mutual_information`` of the two models' top-1 predictions
      (:func:`jaxkd.mutual_information`). Over tokens (``[B, L]`` labels and mask)
      every mean is per real token: see :func:`jaxkd.lm.summarize_token_eval`.
    """
    expected = {"prediction_joint": "[C, C]", "prediction_pairs": "[N, 2]"}

    def well_formed(key, shape):
        if key == "prediction_joint":
            return len(shape) == 2 and shape[0] == shape[1]
        if key == "prediction_pairs":
            return len(shape) == 2 and shape[1] == 2
        return shape == ()

    shapes = {key: jnp.shape(value) for key, value in sums.items()}
    bad = {key: shape for key, shape in shapes.items() if not well_formed(key, shape)}
    if bad:
        raise ValueError(
            f"`sums` must hold scalars, and {expected} for the keys named (unreplicate pmap "
            f"outputs); got {bad}."
        )
    count = float(sums["count"])
    if count == 0:
        raise ValueError("No examples were evaluated (`count` is 0).")
    names = {"correct": "accuracy", "teacher_correct": "teacher_accuracy"}
    summary = {"count": count}
    for key, value in sums.items():
        if key == "prediction_joint":
            mi, normalized = mutual_information(value)
            summary["mutual_information"] = float(mi)
            summary["normalized_mutual_information"] = float(normalized)
        elif key == "prediction_pairs":
            pairs = jax.device_get(value)
            mi, normalized = mutual_information_of_labels(
                pairs[:, 0], pairs[:, 1], where=pairs[:, 0] >= 0
            )
            summary["mutual_information"] = mi
            summary["normalized_mutual_information"] = normalized
        elif key != "count":
            summary[names.get(key, key)] = float(value) / count
    return summary
