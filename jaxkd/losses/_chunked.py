"""Fused, chunked distillation losses: the ``[N, V]`` logits never exist whole.

A language model's last hidden states ``[N, d]`` and output projection ``[d, V]``
make logits of ``N * V`` floats (8,192 tokens of a 128k vocabulary: 4 GiB in
float32), and a distillation loss needs the student's and the teacher's, plus the
temporaries of the divergence and of its gradient. :func:`chunked_distillation_loss`
computes the loss ``chunk_size`` tokens at a time and, since the loss is a sum over
tokens, computes its gradients in the same pass: for each chunk, the logits, the
per-token losses and their gradient with respect to the logits, which the two
matmuls of the projection's derivative turn into the chunk's rows of
``d loss / d hidden`` and its share of ``d loss / d kernel`` (accumulated in
float32). A ``jax.custom_vjp`` returns these gradients times the incoming
cotangent, so that the backward pass recomputes nothing and holds no logits:
the peak memory is that of one chunk's logits and their temporaries, plus the
kernel's gradient, whatever ``N`` is.

The per-token values are exactly those of the whole-array losses (the same
functions, :func:`jaxkd.kl_divergence` and its family and
:func:`jaxkd.cross_entropy_with_integer_labels`, run on each chunk); only the sums
are added in another order.

References:
  Hsu et al., "Liger Kernel: Efficient Triton Kernels for LLM Training", 2024
  (fused linear cross-entropy and JSD with in-forward gradients).
  https://arxiv.org/abs/2410.10989
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxkd import _checks
from jaxkd.losses._distributions import entropy
from jaxkd.losses._divergences import DIVERGENCES
from jaxkd.losses._kd_losses import cross_entropy_with_integer_labels
from jaxkd.losses._projection import check_logit_options, check_projection

# Scalar options (alpha, temperature, scales, caps and the divergence's own,
# prefixed): concrete ones are compiled in as constants (so that, e.g., a Python
# ``beta=0.0`` picks generalized_jsd's forward-KL formula statically); traced ones
# (schedules inside a jitted step) are passed as arrays.
AUTO_CHUNK_FLOATS = 2**22  # logits per chunk for chunk_size="auto"
_LOSS_PREFIX = "loss_kwargs."  # the divergence's own options, e.g. skew KL's alpha
_METRICS = ("kd", "ce", "student_entropy", "teacher_entropy", "agreement")


def resolve_chunk_size(chunk_size, vocab: int) -> int | None:
    """``chunk_size`` checked, with ``"auto"`` resolved for a vocabulary of ``vocab``."""
    if chunk_size == "auto":
        return max(16, 2 ** max(0, (AUTO_CHUNK_FLOATS // max(vocab, 1)).bit_length() - 1))
    if chunk_size is not None and not (
        isinstance(chunk_size, int) and not isinstance(chunk_size, bool) and chunk_size > 0
    ):
        raise ValueError(
            f"`chunk_size` must be a positive int, 'auto' or None, got {chunk_size!r}."
        )
    return chunk_size


class ChunkedSums(NamedTuple):
    """Sums over the real tokens of a chunked loss (see :func:`chunked_distillation_loss`).

    Attributes:
      loss: ``sum(alpha * kd + (1 - alpha) * ce)``; the only differentiable field.
      kd: sum of the distillation divergence (``T^2`` included).
      ce: sum of the hard-label cross-entropy (0 without labels).
      count: the number of real tokens.
      student_entropy, teacher_entropy: sums of the entropies at ``T = 1`` (0 unless
        ``with_metrics``).
      agreement: number of real tokens whose student and teacher top-1 agree (0
        unless ``with_metrics``).
    """

    loss: jax.Array
    kd: jax.Array
    ce: jax.Array
    count: jax.Array
    student_entropy: jax.Array
    teacher_entropy: jax.Array
    agreement: jax.Array


@dataclasses.dataclass(frozen=True)
class _Config:
    """What the compiled computation depends on statically (hashable)."""

    loss: str
    chunk_size: int | None
    teacher_from_hidden: bool
    has_labels: bool
    has_mask: bool
    with_metrics: bool
    static_options: tuple[tuple[str, float], ...]


def _check_rows(name: str, array, rows: int, ndim: int, kind) -> None:
    if array is None:
        return
    kind(name, array)
    if jnp.ndim(array) != ndim or jnp.shape(array)[0] != rows:
        described = "[tokens]" if ndim == 1 else "[tokens, ...]"
        raise ValueError(
            f"`{name}` must be {described} with {rows} tokens (`student_hidden`.shape[0]); "
            f"got shape {jnp.shape(array)}."
        )


def _check_bool(name: str, array) -> None:
    if jnp.result_type(array) != jnp.bool_:
        raise TypeError(f"`{name}` must be a boolean mask, got dtype {jnp.result_type(array)}.")


def _split_options(options: Mapping[str, Any]):
    """``(static, dynamic)``: concrete scalars as sorted ``(name, float)``, traced as arrays."""
    static, dynamic = [], {}
    for name, value in options.items():
        if value is None:
            continue
        if jnp.ndim(value) != 0:
            raise ValueError(f"`{name}` must be a scalar, got shape {jnp.shape(value)}.")
        if _checks.is_concrete(value):
            static.append((name, float(value)))
        else:
            dynamic[name] = jnp.asarray(value, jnp.float32)
    return tuple(sorted(static)), dynamic


def _chunk_values(config: _Config, options, raw_logits, teacher_logits, labels, mask):
    """Loss sum and metric sums of one chunk, from the student's pre-activation logits.

    ``raw_logits`` is ``hidden @ kernel + bias`` (float32); the scale and the
    soft-cap are applied here, so that the gradient with respect to ``raw_logits``
    is the one the projection's matmuls need.
    """
    logits = raw_logits
    if options.get("logit_scale") is not None:
        logits = logits * options["logit_scale"]
    if options.get("softcap") is not None:
        logits = options["softcap"] * jnp.tanh(logits / options["softcap"])
    loss_kwargs = {
        name.removeprefix(_LOSS_PREFIX): value
        for name, value in options.items()
        if name.startswith(_LOSS_PREFIX)
    }
    kd = DIVERGENCES[config.loss](
        logits,
        teacher_logits,
        temperature=options["temperature"],
        where=mask,
        **loss_kwargs,
    )
    zero = jnp.zeros((), jnp.float32)
    sums = dict.fromkeys(_METRICS, zero)
    sums["kd"] = jnp.sum(kd)
    alpha = options["alpha"]
    total = alpha * sums["kd"]
    if config.has_labels:
        ce = cross_entropy_with_integer_labels(logits, labels, where=mask)
        sums["ce"] = jnp.sum(ce)
        total = total + (1.0 - alpha) * sums["ce"]
    if config.with_metrics:
        kept = jnp.ones(logits.shape[:1], bool) if mask is None else mask
        frozen = jax.lax.stop_gradient(logits)
        sums["student_entropy"] = jnp.sum(jnp.where(kept, entropy(frozen), 0.0))
        sums["teacher_entropy"] = jnp.sum(jnp.where(kept, entropy(teacher_logits), 0.0))
        same = jnp.argmax(frozen, axis=-1) == jnp.argmax(teacher_logits, axis=-1)
        sums["agreement"] = jnp.sum(kept & same).astype(jnp.float32)
    return total, sums


def _chunk(config: _Config, options, start: int | jax.Array, size: int, arrays, with_grads):
    """Values (and gradients) of the ``size`` tokens from ``start``.

    Returns ``(sums, grads)``, ``grads`` ``(d_hidden [size, d], d_kernel [d, V] f32,
    d_bias [V] f32)`` or ``None``.
    """
    hidden, kernel, bias, teacher, labels, mask = arrays

    def rows(x):
        return None if x is None else jax.lax.dynamic_slice_in_dim(x, start, size)

    h = rows(hidden)
    dot_dtype = jnp.promote_types(h.dtype, kernel.dtype)
    raw = jnp.matmul(
        h.astype(dot_dtype), kernel.astype(dot_dtype), preferred_element_type=jnp.float32
    )
    if bias is not None:
        raw = raw + bias.astype(jnp.float32)[None, :]
    if config.teacher_from_hidden:
        t_hidden, t_kernel, t_bias = teacher
        t_h = rows(t_hidden)
        t_dtype = jnp.promote_types(t_h.dtype, t_kernel.dtype)
        teacher_logits = jnp.matmul(
            t_h.astype(t_dtype), t_kernel.astype(t_dtype), preferred_element_type=jnp.float32
        )
        if t_bias is not None:
            teacher_logits = teacher_logits + t_bias.astype(jnp.float32)[None, :]
        if options.get("teacher_logit_scale") is not None:
            teacher_logits = teacher_logits * options["teacher_logit_scale"]
        if options.get("teacher_softcap") is not None:
            cap = options["teacher_softcap"]
            teacher_logits = cap * jnp.tanh(teacher_logits / cap)
    else:
        teacher_logits = rows(teacher).astype(jnp.float32)
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    chunk_labels, chunk_mask = rows(labels), rows(mask)

    def values(raw_logits):
        return _chunk_values(config, options, raw_logits, teacher_logits, chunk_labels, chunk_mask)

    if not with_grads:
        total, sums = values(raw)
        return {**sums, "loss": total}, None
    (total, sums), d_raw = jax.value_and_grad(values, has_aux=True)(raw)
    d_dot = d_raw.astype(dot_dtype)
    d_hidden = jnp.matmul(d_dot, kernel.astype(dot_dtype).T, preferred_element_type=jnp.float32)
    d_kernel = jnp.matmul(h.astype(dot_dtype).T, d_dot, preferred_element_type=jnp.float32)
    d_bias = None if bias is None else jnp.sum(d_raw, axis=0)
    return {**sums, "loss": total}, (d_hidden.astype(hidden.dtype), d_kernel, d_bias)


def _add(a, b):
    return jax.tree.map(jnp.add, a, b)


def _run(config: _Config, dynamic, arrays, with_grads: bool):
    """All chunks: a ``lax.scan`` over the full ones, then the remainder."""
    hidden, kernel, bias = arrays[:3]
    options = {**dict(config.static_options), **dynamic}
    num_tokens = hidden.shape[0]
    size = num_tokens if config.chunk_size is None else min(config.chunk_size, num_tokens)
    full, rest = (num_tokens // size, num_tokens % size) if size else (0, 0)
    zero = jnp.zeros((), jnp.float32)
    sums = dict.fromkeys(("loss", *_METRICS), zero)
    grads = None
    if with_grads:
        grads = (
            jnp.zeros((0, hidden.shape[1]), hidden.dtype),
            jnp.zeros(kernel.shape, jnp.float32),
            None if bias is None else jnp.zeros(bias.shape, jnp.float32),
        )
    if full == 1:
        sums, grads = _chunk(config, options, 0, size, arrays, with_grads)
    elif full > 1:

        def body(carry, index):
            chunk_sums, chunk_grads = _chunk(
                config, options, index * size, size, arrays, with_grads
            )
            if not with_grads:
                return _add(carry, chunk_sums), None
            d_hidden, d_kernel, d_bias = chunk_grads
            carry_sums, (acc_kernel, acc_bias) = carry
            accumulated = (acc_kernel + d_kernel, None if d_bias is None else acc_bias + d_bias)
            return (_add(carry_sums, chunk_sums), accumulated), d_hidden

        init = (sums, grads[1:]) if with_grads else sums
        carry, d_hidden = jax.lax.scan(body, init, jnp.arange(full))
        if with_grads:
            sums, (d_kernel, d_bias) = carry
            grads = (d_hidden.reshape(full * size, hidden.shape[1]), d_kernel, d_bias)
        else:
            sums = carry
    if rest:
        rest_sums, rest_grads = _chunk(config, options, full * size, rest, arrays, with_grads)
        sums = _add(sums, rest_sums)
        if with_grads:
            grads = (
                jnp.concatenate([grads[0], rest_grads[0]]),
                grads[1] + rest_grads[1],
                None if bias is None else grads[2] + rest_grads[2],
            )
    return sums, grads


@jax.custom_vjp
def _fused(config_box, dynamic, arrays):
    sums, _ = _run(config_box.config, dynamic, arrays, with_grads=False)
    return sums


def _fused_fwd(config_box, dynamic, arrays):
    sums, grads = _run(config_box.config, dynamic, arrays, with_grads=True)
    return sums, (grads, arrays)


def _fused_bwd(residuals, cotangent):
    (d_hidden, d_kernel, d_bias), arrays = residuals
    hidden, kernel, bias = arrays[:3]
    scale = cotangent["loss"]
    arrays_cotangent = (
        (scale * d_hidden.astype(jnp.float32)).astype(hidden.dtype),
        (scale * d_kernel).astype(kernel.dtype),
        None if bias is None else (scale * d_bias).astype(bias.dtype),
        None,  # the teacher is frozen
        None,
        None,
    )
    return None, None, arrays_cotangent


_fused.defvjp(_fused_fwd, _fused_bwd)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class _ConfigBox:
    """Carries the static config through ``custom_vjp`` as a leafless pytree."""

    config: _Config


def chunked_distillation_loss(
    student_hidden,
    student_kernel,
    labels=None,
    *,
    teacher_logits=None,
    teacher_hidden=None,
    teacher_kernel=None,
    student_bias=None,
    teacher_bias=None,
    loss: str = "kl",
    alpha=1.0,
    temperature=1.0,
    loss_kwargs: Mapping[str, Any] | None = None,
    logit_scale=None,
    softcap=None,
    teacher_logit_scale=None,
    teacher_softcap=None,
    where=None,
    chunk_size: int | str | None = "auto",
    with_metrics: bool = False,
) -> ChunkedSums:
    r"""A distillation loss from hidden states and output projections, a chunk at a time.

    For every real token :math:`n` (``where[n]`` True), with student logits
    :math:`z_s = c \tanh(s (h W + b) / c)` (scale ``s`` and soft-cap ``c`` optional,
    see :func:`jaxkd.losses._projection.output_logits`) and teacher logits given or
    computed the same way from the teacher's hidden states and projection:

    .. math::
      \ell_n = \alpha\, D_T(z_t^{(n)}, z_s^{(n)}) + (1 - \alpha)\, \mathrm{CE}(y_n, z_s^{(n)})

    where :math:`D_T` is the divergence ``loss`` at temperature ``T`` (``T^2``
    included, as in :func:`jaxkd.kl_divergence`). The function returns sums over
    real tokens, not a mean: divide by ``count`` (summed over the data axis first,
    under data parallelism) for the token mean, as
    :func:`jaxkd.chunked_distillation_objective` does.

    Only ``chunk_size`` tokens' logits exist at any time, in the forward pass and
    in the backward pass: the gradients with respect to ``student_hidden``,
    ``student_kernel`` and ``student_bias`` are computed in the forward pass, chunk
    by chunk (float32 accumulation for the kernel and bias), and scaled by the
    cotangent in the backward pass. No gradient flows to the teacher's arrays (it is
    frozen, as under ``stop_gradient``), nor to ``alpha``, ``temperature`` and the
    other options. ``chunk_size=None`` computes the whole ``[N, V]`` at once with
    plain autodiff (the naive reference, same values).

    Args:
      student_hidden: float array ``[N, d]``, e.g. ``[B, L, d]`` reshaped; bfloat16
        is multiplied in bfloat16 with float32 accumulation.
      student_kernel: float array ``[d, V]``, the output projection (for tied
        embeddings, the embedding table transposed).
      labels: optional int array ``[N]`` of target ids in ``[0, V)``; ``None`` for
        pure distillation (then ``alpha`` must be 1).
      teacher_logits: float array ``[N, V]``; or, instead, ``teacher_hidden``
        ``[N, d_t]`` and ``teacher_kernel`` ``[d_t, V]`` (and ``teacher_bias``), so
        that the teacher's logits are made a chunk at a time too.
      student_bias, teacher_bias: optional float arrays ``[V]``.
      loss: ``"kl"``, ``"reverse_kl"``, ``"soft_cross_entropy"``, ``"jsd"``,
        ``"skew_kl"``, ``"skew_reverse_kl"`` or ``"total_variation"``.
      alpha: weight of the divergence in ``[0, 1]``; scalar, may be traced.
      temperature: positive scalar ``T``; may be traced.
      loss_kwargs: the divergence's own options, e.g. ``{"beta": 0.5}`` for
        ``"jsd"``, ``{"alpha": 0.1}`` for ``"skew_kl"``; scalars, may be traced.
      logit_scale, softcap: the student's logit scale and soft-cap (``None``: none).
      teacher_logit_scale, teacher_softcap: the same for a teacher given by hidden
        states (ignored with ``teacher_logits``).
      where: optional bool mask ``[N]`` of real tokens; masked tokens change
        neither the sums nor any gradient, whatever their hidden states or labels.
      chunk_size: tokens per chunk (the last chunk holds the remainder); ``"auto"``:
        the power of two that makes a chunk's logits about ``2**22`` floats (16 MiB
        in float32; 64 tokens of a 65,536 vocabulary), at least 16 tokens.
      with_metrics: also sum the entropies (``T = 1``) and the top-1 agreement.

    Returns:
      :class:`ChunkedSums` of float32 scalars.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxkd
      >>> keys = jax.random.split(jax.random.key(0), 3)
      >>> hidden = jax.random.normal(keys[0], (10, 4))
      >>> kernel = jax.random.normal(keys[1], (4, 32))
      >>> teacher = jax.random.normal(keys[2], (10, 32))
      >>> sums = jaxkd.chunked_distillation_loss(
      ...     hidden, kernel, teacher_logits=teacher, temperature=2.0, chunk_size=4)
      >>> dense = jaxkd.kl_divergence(hidden @ kernel, teacher, temperature=2.0).sum()
      >>> bool(jnp.allclose(sums.loss, dense, rtol=1e-5)), int(sums.count)
      (True, 10)
    """
    check_projection("student", student_hidden, student_kernel, student_bias)
    num_tokens, vocab = jnp.shape(student_hidden)[0], jnp.shape(student_kernel)[1]
    if loss not in DIVERGENCES:
        raise ValueError(f"Unknown `loss` {loss!r}; known: {sorted(DIVERGENCES)}.")
    if (teacher_logits is None) == (teacher_kernel is None):
        raise ValueError(
            "Give the teacher either as `teacher_logits` [N, V] or as `teacher_hidden` "
            "[N, d_t] with `teacher_kernel` [d_t, V], not both and not neither."
        )
    if teacher_logits is not None:
        _check_rows("teacher_logits", teacher_logits, num_tokens, 2, _checks.check_floating)
        teacher_vocab = jnp.shape(teacher_logits)[1]
        teacher = teacher_logits
    else:
        if teacher_hidden is None:
            raise ValueError("`teacher_kernel` needs `teacher_hidden` [N, d_t].")
        check_projection("teacher", teacher_hidden, teacher_kernel, teacher_bias)
        _check_rows("teacher_hidden", teacher_hidden, num_tokens, 2, _checks.check_floating)
        teacher_vocab = jnp.shape(teacher_kernel)[1]
        teacher = (teacher_hidden, teacher_kernel, teacher_bias)
    if teacher_vocab != vocab:
        raise ValueError(
            f"The teacher's vocabulary ({teacher_vocab}) differs from the student's "
            f"(`student_kernel` {jnp.shape(student_kernel)})."
        )
    _check_rows("labels", labels, num_tokens, 1, _checks.check_integer)
    _check_rows("where", where, num_tokens, 1, _check_bool)
    chunk_size = resolve_chunk_size(chunk_size, vocab)
    _checks.check_unit_interval("alpha", alpha)
    _checks.check_positive_scalar("temperature", temperature)
    check_logit_options(logit_scale, softcap)
    check_logit_options(teacher_logit_scale, teacher_softcap)
    if labels is None and not (_checks.is_concrete(alpha) and float(alpha) == 1.0):
        raise ValueError("Without `labels` there is no cross-entropy term: set alpha=1.0.")
    loss_kwargs = dict(loss_kwargs or {})
    clashes = sorted(set(loss_kwargs) & {"temperature", "where", "axis"})
    if clashes:
        raise ValueError(f"`loss_kwargs` may not set {clashes}: they are arguments of their own.")
    probe = jax.ShapeDtypeStruct((1, 2), jnp.float32)
    try:  # unknown or out-of-range divergence options fail here, by name
        jax.eval_shape(lambda s: DIVERGENCES[loss](s, s, **loss_kwargs), probe)
    except TypeError as error:
        raise ValueError(
            f"`loss_kwargs` {loss_kwargs} do not fit the loss {loss!r}: {error}"
        ) from None
    options = dict(
        alpha=alpha,
        temperature=temperature,
        logit_scale=logit_scale,
        softcap=softcap,
        teacher_logit_scale=teacher_logit_scale if teacher_logits is None else None,
        teacher_softcap=teacher_softcap if teacher_logits is None else None,
    )
    options.update({_LOSS_PREFIX + name: value for name, value in loss_kwargs.items()})
    static, dynamic = _split_options(options)
    config = _Config(
        loss=loss,
        chunk_size=chunk_size,
        teacher_from_hidden=teacher_logits is None,
        has_labels=labels is not None,
        has_mask=where is not None,
        with_metrics=with_metrics,
        static_options=static,
    )
    arrays = (student_hidden, student_kernel, student_bias, teacher, labels, where)
    arrays = jax.tree.map(jnp.asarray, arrays)
    if chunk_size is None:
        sums, _ = _run(config, dynamic, arrays, with_grads=False)
    else:
        sums = _fused(_ConfigBox(config), dynamic, arrays)
    loss_sum = sums["loss"]
    metric_sums = jax.lax.stop_gradient({k: sums[k] for k in _METRICS})
    count = (
        jnp.asarray(num_tokens, jnp.float32)
        if where is None
        else jnp.sum(jnp.asarray(where)).astype(jnp.float32)
    )
    return ChunkedSums(loss=loss_sum, count=count, **metric_sums)
