r"""Online distillation without a fixed teacher: deep mutual learning.

``K >= 2`` students learn together from one batch. Each is trained on the labels
and, as a student, on the softened distributions of its peers, which act as
teachers whose outputs are constants (``stop_gradient``):

.. math::
  L_k = \mathrm{CE}(y, p_k) + \frac{w}{K - 1} \sum_{j \ne k} T^2\,
  \mathrm{KL}\left(p_j^T \,\|\, p_k^T\right)

The train step reuses :func:`jaxkd.make_train_step` with no teacher: a joint
``apply`` runs the ``K`` students (which may have different architectures) and the
objective returns :math:`\sum_k L_k`. Because every peer term is a constant, the
gradient of that sum with respect to student ``k``'s parameters is the gradient of
:math:`L_k` alone, so one optimizer update moves every student by its own loss.

Difference from the paper: Zhang et al. (Algorithm 1) update the students in turn,
recomputing the already-updated students' predictions before the next student's
update. Here all ``K`` distributions come from one forward pass with the
parameters before the step and all students are updated at once: one forward and
backward per student per step, and one step body that runs unchanged under
``jax.jit``, ``jax.pmap`` and ``jax.shard_map``.

Born-again networks (Furlanello et al., 2018) need no code of their own: generation
``g`` is :func:`jaxkd.make_train_step` with the student's own architecture as the
teacher (``jaxkd.linen_teacher_apply(module)``) and generation ``g - 1``'s
variables as ``teacher_params`` (see ``tests/test_mutual.py``).

References:
  Zhang, Xiang, Hospedales and Lu, "Deep Mutual Learning", CVPR 2018.
  https://arxiv.org/abs/1706.00384

  Furlanello, Lipton, Tschannen, Itti and Anandkumar, "Born-Again Neural
  Networks", ICML 2018. https://arxiv.org/abs/1805.04770
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxkd import _checks
from jaxkd.losses._kd_losses import cross_entropy_with_integer_labels
from jaxkd.parallel._reductions import masked_means
from jaxkd.train._objectives import (
    Objective,
    Scalar,
    _check_hyper_parameter,
    _KdTerm,
    _positive,
    _scheduled,
    example_mask,
    logits_of,
    value_at,
)
from jaxkd.train._state import TrainState
from jaxkd.train._step import StudentApply, make_train_step

PyTree = Any
# The key of the joint apply's output mapping that holds the K students' outputs.
STUDENTS_KEY = "students"


def _non_negative(value: jax.Array) -> jax.Array:
    return (value >= 0) & jnp.isfinite(value)


def _per_student(name: str, values, num_students: int) -> tuple:
    """``values`` as a tuple of one entry per student, or a clear error."""
    if isinstance(values, list | tuple) and len(values) == num_students:
        return tuple(values)
    got = f"{len(values)} entries" if isinstance(values, list | tuple) else type(values).__name__
    raise ValueError(
        f"`{name}` must be a tuple of {num_students} entries, one per student; got {got}."
    )


def _student_logits(student_out) -> tuple[jax.Array, ...]:
    """The ``K`` students' logits from the joint output, checked for ``K >= 2`` and shapes."""
    outputs = student_out[STUDENTS_KEY] if isinstance(student_out, Mapping) else student_out
    if not isinstance(outputs, list | tuple):
        raise TypeError(
            f"`student_out` must be a sequence of the students' outputs (or a mapping with "
            f"{STUDENTS_KEY!r}), got {type(outputs).__name__}."
        )
    if len(outputs) < 2:
        raise ValueError(
            f"Mutual learning needs K >= 2 students; `student_out` has {len(outputs)}."
        )
    logits = tuple(logits_of(out) for out in outputs)
    names = [f"student_out[{k}] logits" for k in range(len(logits))]
    _checks.check_same_shape(names, logits)
    return logits


def mutual_learning_objective(
    *,
    temperature: Scalar = 1.0,
    kd_weight: Scalar = 1.0,
    label_key: str = "label",
    mask_key: str = "mask",
    loss: str | Callable = "kl",
    loss_kwargs: Mapping[str, Any] | None = None,
) -> Objective:
    r"""Deep mutual learning: each student fits the labels and its peers' predictions.

    For ``K`` students with logits :math:`z_1, \dots, z_K` (``[B, C]``, or
    ``[B, L, V]`` for tokens):

    .. math::
      L_k = \mathrm{CE}(y, p_k) + \frac{w}{K - 1} \sum_{j \ne k}
        T^2\, \mathrm{KL}\left(\mathrm{sg}(p_j^T) \,\|\, p_k^T\right),
      \qquad \mathcal{L} = \sum_{k=1}^{K} L_k

    where :math:`p^T = \mathrm{softmax}(z / T)` and :math:`\mathrm{sg}` stops the
    gradient: a peer is a teacher for student ``k``, so :math:`\partial L_k /
    \partial z_j = 0` for ``j != k`` and :math:`\partial \mathcal{L} / \partial z_k
    = \partial L_k / \partial z_k`. Each term is a masked mean over the real
    examples (``batch[mask_key]``) of the global batch, reduced over ``axis_name``
    as sums and counts, so eight devices with uneven masks equal one device. The
    paper's objective is ``temperature=1``, ``kd_weight=1``.

    Args:
      temperature: positive temperature ``T`` of the peer terms (a number or a
        schedule ``step -> value``).
      kd_weight: non-negative weight ``w`` of the peer terms (number or schedule).
      label_key: batch key of the integer labels ``[B]`` (or ``[B, L]``).
      mask_key: batch key of an optional bool mask of real examples (or tokens).
      loss: the divergence between a student (first argument) and a peer (second):
        a jaxkd loss name (``"kl"``, ``"reverse_kl"``, ``"jsd"``, ...) or a callable
        with jaxkd's loss signature, as in :func:`jaxkd.distillation_objective`.
      loss_kwargs: the loss's own options, as in :func:`jaxkd.distillation_objective`.

    Returns:
      ``objective(student_out, teacher_out, batch, step, *, axis_name=None) ->
      (loss, metrics)``. ``student_out`` holds the ``K`` students' outputs (logits
      or mappings with ``"logits"``), as a sequence or as ``{"students": (...)}``
      (what :func:`make_mutual_learning_step`'s joint apply returns);
      ``teacher_out`` must be ``None``. Metrics, of the global batch: ``loss``
      (the sum), and for each student ``k`` (from 0) ``loss_k``, ``ce_k``,
      ``kd_k`` (its mean peer term, weight excluded) and ``accuracy_k``; the mean
      top-1 ``agreement`` over pairs of students; ``temperature``, ``kd_weight``.

    Raises:
      ValueError: a non-positive ``temperature``, a negative ``kd_weight``, an
        unknown ``loss``; when called, fewer than two students or students whose
        logits differ in shape (batch size, classes).

    Examples:
      >>> objective = mutual_learning_objective(temperature=2.0, kd_weight=1.0)
      >>> mutual_learning_objective(temperature=0.0)
      Traceback (most recent call last):
      ...
      ValueError: `temperature` must be a positive finite number, got 0.0.

    References:
      Zhang, Xiang, Hospedales and Lu, "Deep Mutual Learning", CVPR 2018.
      https://arxiv.org/abs/1706.00384
    """
    _check_hyper_parameter("temperature", temperature, _checks.check_positive_scalar)
    _check_hyper_parameter("kd_weight", kd_weight, _checks.check_non_negative)
    if not isinstance(label_key, str):
        raise TypeError(
            f"`label_key` must be a string (mutual learning uses labels), got {label_key!r}."
        )
    temperature_at_0 = float(value_at(temperature, jnp.zeros((), jnp.int32)))
    kd_term = _KdTerm(loss, loss_kwargs or {}, temperature_at_0)

    def objective(student_out, teacher_out, batch, step, *, axis_name=None):
        if teacher_out is not None:
            raise ValueError(
                "Mutual learning has no teacher, but `teacher_out` is not None (a cached "
                "'teacher_logits' entry in the batch?): the students teach each other."
            )
        logits = _student_logits(student_out)
        num_students = len(logits)
        frozen = [jax.lax.stop_gradient(z) for z in logits]
        labels, mask = batch[label_key], batch.get(mask_key)
        temperature_now = _scheduled(
            "temperature", temperature, step, _checks.check_positive_scalar, _positive
        )
        weight_now = _scheduled(
            "kd_weight", kd_weight, step, _checks.check_non_negative, _non_negative
        )
        kept = example_mask(mask, logits[0])
        if kd_term.batch_level and axis_name is not None and not kd_term.takes_axis_name:
            raise ValueError(
                f"The batch-level loss {kd_term.name!r} takes no `axis_name`: under data "
                "parallelism it would see one shard only."
            )
        means, batch_level_kd = {}, {}
        for k in range(num_students):
            ce = cross_entropy_with_integer_labels(logits[k], labels, where=mask)
            means[f"ce_{k}"] = (ce, kept)
            peers = [
                kd_term(logits[k], frozen[j], labels, mask, temperature_now, axis_name, step)
                for j in range(num_students)
                if j != k
            ]
            kd = sum(peers[1:], peers[0]) / (num_students - 1)
            if kd_term.batch_level:
                batch_level_kd[f"kd_{k}"] = kd
            else:
                means[f"kd_{k}"] = (kd, kept)
            correct = jnp.argmax(frozen[k], axis=-1) == labels
            means[f"accuracy_{k}"] = (correct.astype(jnp.float32), kept)
        pairs = [(j, k) for j in range(num_students) for k in range(j + 1, num_students)]
        agreement = sum(
            (jnp.argmax(frozen[j], axis=-1) == jnp.argmax(frozen[k], axis=-1)).astype(jnp.float32)
            for j, k in pairs
        ) / len(pairs)
        means["agreement"] = (agreement, kept)
        metrics = {**masked_means(means, axis_name=axis_name), **batch_level_kd}
        for k in range(num_students):
            metrics[f"loss_{k}"] = metrics[f"ce_{k}"] + weight_now * metrics[f"kd_{k}"]
        student_losses = [metrics[f"loss_{k}"] for k in range(num_students)]
        metrics["loss"] = sum(student_losses[1:], student_losses[0])
        metrics["temperature"] = temperature_now
        metrics["kd_weight"] = weight_now
        for name in kd_term.scheduled:
            metrics[name] = value_at(kd_term.kwargs[name], step)
        return metrics["loss"], metrics

    return objective


def _joint_apply(student_applies: tuple[StudentApply, ...]) -> StudentApply:
    """One student ``apply`` over the tuple of the ``K`` students' params and states.

    Returns ``({"students": (out_1, ..., out_K)}, model_states)``. The output has no
    ``"logits"`` entry, so :func:`jaxkd.make_train_step` leaves the per-student
    metrics to the objective. A ``model_state`` of ``{}`` (``TrainState.create``'s
    default) means that no student has state. Each student draws from its own key.
    """
    num_students = len(student_applies)

    def apply(params, model_state, inputs, *, train: bool, rng=None):
        params = _per_student("state.params", params, num_students)
        stateless = isinstance(model_state, Mapping) and not model_state
        states = ({},) * num_students if stateless else model_state
        states = _per_student("state.model_state", states, num_students)
        rngs = (None,) * num_students if rng is None else tuple(jax.random.split(rng, num_students))
        results = [
            student_apply(p, s, inputs, train=train, rng=r)
            for student_apply, p, s, r in zip(student_applies, params, states, rngs, strict=True)
        ]
        outputs = tuple(out for out, _ in results)
        new_states = tuple(state for _, state in results)
        if stateless:
            if jax.tree.leaves(new_states):
                raise ValueError(
                    "A student returned model state (e.g. BatchNorm statistics) but "
                    "`state.model_state` is {}: pass a tuple of the students' states."
                )
            return {STUDENTS_KEY: outputs}, model_state
        return {STUDENTS_KEY: outputs}, new_states

    return apply


def make_mutual_learning_step(
    student_applies: Sequence[StudentApply],
    objective: Objective,
    optimizer: optax.GradientTransformation,
    *,
    axis_name: str | None = None,
    input_key: str = "image",
    mask_key: str = "mask",
    extra_metrics: bool = True,
) -> Callable[[TrainState, None, Mapping], tuple[TrainState, dict]]:
    """Builds the deep-mutual-learning step ``step(state, None, batch) -> (state, metrics)``.

    The students are trained together, from one batch, by
    :func:`jaxkd.make_train_step` with no teacher: ``state.params`` is the tuple of
    the ``K`` students' params, ``state.model_state`` the tuple of their states
    (or ``{}`` when none has any), and ``state.opt_state`` is the optimizer's
    state for that tuple:

    .. code-block:: python

      state = jaxkd.TrainState.create(params=(params_a, params_b),
                                      model_state=(state_a, state_b), optimizer=tx)
      state, metrics = jax.jit(step)(state, None, batch)

    The second argument stands where the distillation step takes the teacher's
    params, so that :func:`jaxkd.pmap_step` and :func:`jaxkd.shard_step` run this
    step as they run any other; it must be ``None``. To evaluate or export student
    ``k``, use ``state.params[k]`` and ``state.model_state[k]`` with
    ``student_applies[k]`` (e.g. in :func:`jaxkd.make_eval_step` with
    ``state.replace(params=state.params[k], model_state=state.model_state[k])``).

    Args:
      student_applies: ``K >= 2`` student ``apply`` functions (``apply(params,
        model_state, inputs, *, train, rng) -> (outputs, model_state)``), whose
        architectures may differ but whose logits share one shape.
      objective: usually :func:`mutual_learning_objective`; it receives
        ``{"students": (out_1, ..., out_K)}`` as the student output.
      optimizer: any Optax transformation, applied to the tuple of params.
      axis_name: the data-parallel axis, or ``None`` on one device (as in
        :func:`jaxkd.make_train_step`).
      input_key: batch key of the inputs, given to every student.
      mask_key: batch key of the optional mask of real examples (the objective
        takes its own ``mask_key``).
      extra_metrics: also report ``grad_norm`` and ``param_norm`` (of all students).

    Returns:
      The step; its metrics are the objective's and, with ``extra_metrics``,
      ``grad_norm`` and ``param_norm``; all of the global batch.

    Raises:
      ValueError: fewer than two ``student_applies``; when called, a non-``None``
        second argument or ``state.params`` that is not a tuple of ``K``.

    References:
      Zhang, Xiang, Hospedales and Lu, "Deep Mutual Learning", CVPR 2018.
      https://arxiv.org/abs/1706.00384
    """
    if isinstance(student_applies, Mapping) or not isinstance(student_applies, Sequence):
        raise TypeError(
            f"`student_applies` must be a sequence of apply functions, got "
            f"{type(student_applies).__name__}."
        )
    student_applies = tuple(student_applies)
    if len(student_applies) < 2:
        raise ValueError(
            f"Mutual learning needs K >= 2 students; `student_applies` has {len(student_applies)}."
        )
    not_callable = [k for k, fn in enumerate(student_applies) if not callable(fn)]
    if not_callable:
        raise TypeError(f"`student_applies` entries {not_callable} are not callable.")
    train_step = make_train_step(
        _joint_apply(student_applies),
        None,
        objective,
        optimizer,
        axis_name=axis_name,
        input_key=input_key,
        mask_key=mask_key,
        extra_metrics=extra_metrics,
    )

    def step(state: TrainState, teacher_params: None, batch: Mapping):
        if teacher_params is not None:
            raise ValueError(
                "Mutual learning has no teacher: pass None as the step's second argument "
                f"(`teacher_params`), got {type(teacher_params).__name__}."
            )
        _per_student("state.params", state.params, len(student_applies))
        return train_step(state, None, batch)

    step.axis_name = axis_name
    return step
