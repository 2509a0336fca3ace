"""Ready-made objectives for the train step, with scheduled hyper-parameters.

An objective has the signature
``objective(student_out, teacher_out, batch, step, *, axis_name=None) -> (loss, metrics)``:
it sees the student's and the teacher's outputs (logits ``[B, C]`` or ``[B, L, V]``,
or a mapping with a ``"logits"`` entry), the batch (for labels and masks) and the
step (for schedules), and returns a scalar loss and a dict of scalar metrics.

Under data parallelism the step passes its ``axis_name``, and the loss and every
metric are those of the *global* batch, the same on every device: masked means
are ratios of sums and counts reduced over the axis
(:func:`jaxkd.masked_means`), and batch-level losses gather their inputs. The
step then averages the gradients with ``pmean``, which gives the gradient of the
global loss (the transpose of ``psum`` is ``psum``), so one device and eight
agree exactly whatever the masks.

A hyper-parameter given as a number is constant; given as a callable (any Optax
schedule, ``step -> value``) it is evaluated at the state's step inside the jitted
step, so fixed, linear and exponential-decay schedules are just
``optax.constant_schedule``, ``optax.linear_schedule`` and
``optax.exponential_decay``.
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd import _checks
from jaxkd.losses._divergences import DIVERGENCES, logit_mse
from jaxkd.losses._kd_losses import cross_entropy_with_integer_labels, dist_loss, dkd_loss
from jaxkd.parallel._reductions import masked_means

Objective = Callable[..., tuple[jax.Array, dict]]
Scalar = float | Callable[[jax.Array], jax.Array]


def logits_of(outputs) -> jax.Array:
    """The logits of a model output: the array itself or ``outputs["logits"]``."""
    if outputs is None:
        raise ValueError(
            "This objective needs the teacher's outputs: pass a `teacher_apply` to "
            "make_train_step, or put cached teacher logits in the batch."
        )
    if isinstance(outputs, Mapping):
        if "logits" not in outputs:
            raise KeyError(f"Model output mapping has no 'logits' entry: {sorted(outputs)}.")
        return outputs["logits"]
    return outputs


def value_at(hyper_parameter: Scalar, step: jax.Array) -> jax.Array:
    """A constant, or a schedule evaluated at ``step``, as a float32 scalar."""
    value = hyper_parameter(step) if callable(hyper_parameter) else hyper_parameter
    return jnp.asarray(value, jnp.float32)


# Losses by name: a thin convenience over passing the function itself.
LOSSES: dict[str, Callable] = {
    **DIVERGENCES,
    "logit_mse": logit_mse,
    "dkd": dkd_loss,
    "dist": dist_loss,
}
# Arguments the objective sets itself (or, for vocab_axis_name, that have no place in a
# data-parallel objective); a loss's own options go in `loss_kwargs`.
_SET_BY_OBJECTIVE = ("labels", "temperature", "where", "axis", "axis_name", "vocab_axis_name")


def accepts_keyword(fn: Callable, name: str) -> bool:
    """Whether ``fn`` can be called with the keyword argument ``name``."""
    parameters = inspect.signature(fn).parameters.values()
    return any(
        p.kind is p.VAR_KEYWORD
        or (p.name == name and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
        for p in parameters
    )


def _is_real_scalar(value) -> bool:
    if isinstance(value, bool | np.bool_):
        return False
    if isinstance(value, numbers.Real):
        return True
    dtype = getattr(value, "dtype", None)
    return (
        dtype is not None
        and jnp.ndim(value) == 0
        and (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer))
    )


def _check_hyper_parameter(name: str, value: Scalar, check: Callable) -> None:
    """A number (Python, NumPy or JAX scalar) checked now, or a schedule checked at 0."""
    if callable(value):
        first = value(jnp.zeros((), jnp.int32))
        if jnp.ndim(first) != 0:
            raise ValueError(f"The `{name}` schedule must return a scalar, got {jnp.shape(first)}.")
        check(f"{name}(step=0)", first)
    elif _is_real_scalar(value):
        check(name, value)
    else:
        raise TypeError(f"`{name}` must be a real number or a schedule, got {type(value)}.")


def _scheduled(name: str, hyper_parameter: Scalar, step, check: Callable, valid: Callable):
    """The value at ``step``: checked when concrete, NaN when traced and out of range."""
    value = value_at(hyper_parameter, step)
    if _checks.is_concrete(value) and _checks.is_concrete(step):
        check(f"{name}(step={int(step)})" if callable(hyper_parameter) else name, value)
        return value
    return jnp.where(valid(value), value, jnp.nan)


def _in_unit_interval(value: jax.Array) -> jax.Array:
    return (value >= 0) & (value <= 1)


def _positive(value: jax.Array) -> jax.Array:
    return (value > 0) & jnp.isfinite(value)


def example_mask(mask, logits: jax.Array):
    """The per-example (per-token) form of a batch mask, for reductions.

    ``mask`` may take any shape a loss's ``where`` takes for ``logits`` ``[..., C]``
    (e.g. ``[B, L]``, ``[B, L, 1]`` or ``[B, L, V]``); the result is ``[B, L]``
    (an example with every class masked is masked), or ``None``.
    """
    if mask is None:
        return None
    logits_shape = jnp.shape(logits)
    mask = _checks.normalize_where(mask, logits_shape, len(logits_shape) - 1)
    return jnp.any(mask, axis=-1) if mask.shape == logits_shape else mask


class _KdTerm:
    """A distillation loss, resolved and validated once, when the objective is built.

    Which arguments it takes (labels, temperature, a mask, an axis name) is read
    from its signature; whether it is per example or batch-level from the shape it
    returns on a small probe batch, traced with the given ``loss_kwargs`` so that
    unknown or out-of-range options fail here rather than inside the step.
    """

    def __init__(self, loss, loss_kwargs: Mapping[str, Any], temperature_now):
        if isinstance(loss, str):
            if loss not in LOSSES:
                raise ValueError(f"Unknown `loss` {loss!r}; known: {sorted(LOSSES)}.")
            self.name, self.fn = loss, LOSSES[loss]
        elif callable(loss):
            self.name, self.fn = getattr(loss, "__name__", repr(loss)), loss
        else:
            raise TypeError(f"`loss` must be a name or a callable, got {type(loss)}.")
        self.kwargs = dict(loss_kwargs)
        self.scheduled = sorted(name for name, value in self.kwargs.items() if callable(value))
        self.initial = {}
        for name in self.scheduled:
            first = value_at(self.kwargs[name], jnp.zeros((), jnp.int32))
            if jnp.ndim(first) != 0:
                raise ValueError(
                    f"The `loss_kwargs` schedule {name!r} must return a scalar, got "
                    f"shape {jnp.shape(first)}."
                )
            self.initial[name] = float(first)
        reserved = sorted(set(self.kwargs) & set(_SET_BY_OBJECTIVE))
        if reserved:
            raise ValueError(
                f"`loss_kwargs` may not set {reserved}: the objective passes them "
                "(temperature as the objective's `temperature`, masks from the batch)."
            )
        try:
            parameters = inspect.signature(self.fn).parameters
        except ValueError as error:  # e.g. a functools.partial with unknown keywords
            raise ValueError(f"The loss {self.name!r} cannot be called: {error}") from None
        self.needs_labels = "labels" in parameters
        self.tempered = "temperature" in parameters
        self.takes_where = accepts_keyword(self.fn, "where")
        self.takes_axis_name = "axis_name" in parameters
        if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
            unknown = sorted(set(self.kwargs) - set(parameters))
            if unknown:
                options = [n for n in parameters if n not in _SET_BY_OBJECTIVE][2:]
                raise ValueError(
                    f"`loss_kwargs` {unknown} are not options of the loss {self.name!r}; "
                    f"its options: {options}."
                )
        probe_logits = jax.ShapeDtypeStruct((4, 3), jnp.float32)
        probe_labels = jnp.array([0, 1, 2, 0], jnp.int32)
        try:
            shape = jax.eval_shape(
                lambda s, t: self(s, t, probe_labels, None, temperature_now, None, None),
                probe_logits,
                probe_logits,
            ).shape
        except TypeError as error:
            raise ValueError(
                f"The loss {self.name!r} fails with `loss_kwargs`={self.kwargs} on [4, 3] "
                f"logits: {error}"
            ) from None
        if shape not in ((), (4,)):
            raise ValueError(
                f"The loss {self.name!r} returned shape {shape} for [4, 3] logits; a loss "
                "must return one value per example ([4]) or a scalar for the batch."
            )
        self.batch_level = shape == ()

    def options_at(self, step) -> dict[str, Any]:
        """The loss's options at ``step``: schedules (callables) evaluated there.

        ``step=None`` gives their values at step 0 as Python floats, so that the
        loss's own range checks run on them when the objective is built.
        """
        if step is None:
            return {**self.kwargs, **self.initial}
        return {
            name: value_at(value, step) if callable(value) else value
            for name, value in self.kwargs.items()
        }

    def __call__(self, student_logits, teacher_logits, labels, mask, temperature, axis_name, step):
        kwargs = self.options_at(step)
        if self.tempered:
            kwargs["temperature"] = temperature
        if mask is not None:
            if not self.takes_where:
                raise ValueError(f"The batch has a mask; the loss {self.name!r} takes no `where`.")
            kwargs["where"] = mask
        if axis_name is not None and self.takes_axis_name:
            kwargs["axis_name"] = axis_name
        args = (student_logits, teacher_logits) + ((labels,) if self.needs_labels else ())
        return self.fn(*args, **kwargs)


def kd_metrics(
    total, kd, ce, alpha, temperature, kd_term: _KdTerm | None = None, step=None, **extra
) -> dict[str, jax.Array]:
    """The metrics every distillation objective reports, and each scheduled loss option."""
    metrics = {
        "loss": total,
        "kd_loss": kd,
        "ce_loss": ce,
        "alpha": alpha,
        "temperature": temperature,
        **extra,
    }
    for name in () if kd_term is None else kd_term.scheduled:
        metrics[name] = jnp.asarray(value_at(kd_term.kwargs[name], step), jnp.float32)
    return metrics


def distillation_objective(
    loss: str | Callable = "kl",
    *,
    alpha: Scalar = 0.9,
    temperature: Scalar = 4.0,
    label_key: str | None = "label",
    mask_key: str = "mask",
    loss_kwargs: Mapping[str, Any] | None = None,
) -> Objective:
    r"""``alpha * distillation_loss + (1 - alpha) * cross_entropy(labels)``.

    With ``loss="kl"`` this is Hinton et al.'s objective,
    :math:`\alpha T^2 \mathrm{KL}(p_t^T \| p_s^T) + (1 - \alpha) \mathrm{CE}(y, p_s)`.
    Per-example (or per-token) terms are averaged over the real entries of the
    batch (where ``batch[mask_key]`` is True, when the batch has that key) across
    the data-parallel axis: ``sum / count`` of the global batch.

    Args:
      loss: a loss function with jaxkd's signature ``(student_logits,
        teacher_logits[, labels], *, [temperature], where, ...)`` returning one value
        per example or a scalar for the batch, e.g. ``jaxkd.generalized_jsd`` or
        ``functools.partial(jaxkd.dkd_loss, beta=8.0)``; or the name of a jaxkd loss:
        ``"kl"``, ``"reverse_kl"``, ``"soft_cross_entropy"``, ``"jsd"``,
        ``"skew_kl"``, ``"skew_reverse_kl"``, ``"total_variation"``,
        ``"logit_mse"``, ``"dkd"`` (needs labels), ``"dist"`` (batch-level).
      alpha: weight of the distillation term in ``[0, 1]``: a number or a schedule
        ``step -> value`` (a schedule leaving ``[0, 1]`` makes the loss NaN).
      temperature: positive temperature: a number or a schedule.
      label_key: batch key of the integer labels (``[B]``, or ``[B, L]`` for
        tokens); ``None`` for pure distillation without labels (then ``alpha`` must
        be 1).
      mask_key: batch key of an optional bool mask of real examples (or tokens).
      loss_kwargs: the loss's own options, e.g. ``{"beta": 0.5}`` for ``"jsd"``,
        ``{"alpha": 1.0, "beta": 8.0}`` for ``"dkd"``. Unknown or out-of-range
        options are rejected here, when the objective is built. A callable value
        is a schedule ``step -> value`` (e.g. GKD's ``beta`` annealed with
        ``optax.linear_schedule``): checked at step 0 here, evaluated at the
        state's step inside the step, and reported as a metric under its name.
        Inside a jitted step its range is the loss's business: ``generalized_jsd``
        gives NaN for a traced ``beta`` outside ``[0, 1]``.

    Returns:
      An objective ``(student_out, teacher_out, batch, step, *, axis_name=None) ->
      (loss, metrics)`` with metrics ``loss``, ``kd_loss``, ``ce_loss``, ``alpha``,
      ``temperature`` (and each scheduled loss option), all of the global batch.

    Examples:
      >>> import functools, jaxkd
      >>> objective = jaxkd.distillation_objective(
      ...     functools.partial(jaxkd.dkd_loss, beta=8.0), alpha=1.0, temperature=4.0)
      >>> jaxkd.distillation_objective("jsd", loss_kwargs={"betaa": 0.5})
      Traceback (most recent call last):
      ...
      ValueError: `loss_kwargs` ['betaa'] are not options of the loss 'jsd'; its options: ['beta'].
    """
    _check_hyper_parameter("alpha", alpha, _checks.check_unit_interval)
    _check_hyper_parameter("temperature", temperature, _checks.check_positive_scalar)
    if label_key is None and (callable(alpha) or float(alpha) != 1.0):
        raise ValueError("Without `label_key` there is no cross-entropy term: set alpha=1.0.")
    temperature_now = float(value_at(temperature, jnp.zeros((), jnp.int32)))
    kd_term = _KdTerm(loss, loss_kwargs or {}, temperature_now)
    if label_key is None and kd_term.needs_labels:
        raise ValueError(f"The loss {kd_term.name!r} needs labels: `label_key` must not be None.")

    def objective(student_out, teacher_out, batch, step, *, axis_name=None):
        student_logits = logits_of(student_out)
        teacher_logits = jax.lax.stop_gradient(logits_of(teacher_out))
        mask = batch.get(mask_key)
        labels = None if label_key is None else batch[label_key]
        alpha_now = _scheduled("alpha", alpha, step, _checks.check_unit_interval, _in_unit_interval)
        temperature_now = _scheduled(
            "temperature", temperature, step, _checks.check_positive_scalar, _positive
        )
        kd = kd_term(student_logits, teacher_logits, labels, mask, temperature_now, axis_name, step)
        kept = example_mask(mask, student_logits)
        means = {}
        if not kd_term.batch_level:
            means["kd"] = (kd, kept)
        elif axis_name is not None and not kd_term.takes_axis_name:
            raise ValueError(
                f"The batch-level loss {kd_term.name!r} takes no `axis_name`: under data "
                "parallelism it would see one shard only. Give it an `axis_name` argument "
                "that gathers the batch (see jaxkd.gather_examples)."
            )
        if labels is not None:
            ce = cross_entropy_with_integer_labels(student_logits, labels, where=mask)
            means["ce"] = (ce, kept)
        means = masked_means(means, axis_name=axis_name)
        kd = means.get("kd", kd)
        ce = means.get("ce", jnp.zeros((), kd.dtype))
        total = alpha_now * kd + (1.0 - alpha_now) * ce
        return total, kd_metrics(total, kd, ce, alpha_now, temperature_now, kd_term, step)

    return objective


def hinton_objective(
    *,
    alpha: Scalar = 0.9,
    temperature: Scalar = 4.0,
    label_key: str = "label",
    mask_key: str = "mask",
) -> Objective:
    """Hinton et al.'s ``alpha * T^2 KL + (1 - alpha) * CE``; see
    :func:`distillation_objective`.

    References:
      Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network",
      2015. https://arxiv.org/abs/1503.02531
    """
    return distillation_objective(
        "kl", alpha=alpha, temperature=temperature, label_key=label_key, mask_key=mask_key
    )


def cross_entropy_objective(*, label_key: str = "label", mask_key: str = "mask") -> Objective:
    """Plain supervised training: a teacher, or a student from scratch.

    The teacher output is ignored: use it with ``teacher_apply=None`` and batches
    without teacher logits, and :func:`jaxkd.make_train_step` runs no teacher.
    The loss is the mean cross entropy over the real examples (or tokens) of the
    global batch.
    """

    def objective(student_out, teacher_out, batch, step, *, axis_name=None):
        del teacher_out, step
        mask, logits = batch.get(mask_key), logits_of(student_out)
        ce = cross_entropy_with_integer_labels(logits, batch[label_key], where=mask)
        ce = masked_means({"ce": (ce, example_mask(mask, logits))}, axis_name=axis_name)["ce"]
        return ce, {"loss": ce, "ce_loss": ce}

    return objective
