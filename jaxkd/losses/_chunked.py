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
import functools
import numbers
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxkd import _checks
from jaxkd.losses._distributions import entropy
from jaxkd.losses._divergences import DIVERGENCES
from jaxkd.losses._kd_losses import cross_entropy_with_integer_labels
from jaxkd.losses._projection import (
    check_logit_options,
    check_projection,
    output_logits,
    projected_logits,
    scale_and_cap,
)

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
    if chunk_size is None:
        return None
    integral = isinstance(chunk_size, numbers.Integral) and not isinstance(chunk_size, bool)
    if not (integral and chunk_size > 0):
        raise ValueError(
            f"`chunk_size` must be a positive int, 'auto' or None, got {chunk_size!r}."
        )
    return int(chunk_size)


class ChunkedSums(NamedTuple):
    """Sums over the real tokens of a chunked loss (see :func:`chunked_distillation_loss`).

    Attributes:
      loss: ``sum(alpha * kd + (1 - alpha) * ce)``; the only field with gradients.
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
    logits = scale_and_cap(
        raw_logits, logit_scale=options.get("logit_scale"), softcap=options.get("softcap")
    )
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


def _teacher_logits(options, teacher_rows, teacher_shared):
    """The teacher's float32 logits of a chunk: given, or from its hidden states."""
    t_kernel, t_bias = teacher_shared
    if t_kernel is None:
        return jax.lax.stop_gradient(teacher_rows.astype(jnp.float32))
    logits = output_logits(
        teacher_rows,
        t_kernel,
        t_bias,
        logit_scale=options.get("teacher_logit_scale"),
        softcap=options.get("teacher_softcap"),
    )
    return jax.lax.stop_gradient(logits)


def _chunk(config: _Config, dynamic, rows, shared, with_grads: bool):
    """Sums (and gradients) of one chunk of tokens.

    Args:
      rows: ``(hidden [c, d], teacher rows [c, ...], labels [c] | None, mask [c] | None)``.
      shared: ``(kernel [d, V], bias [V] | None, teacher kernel | None, teacher bias | None)``.

    Returns:
      ``(sums, grads)``; ``grads`` is ``None`` or ``(d_hidden [c, d] f32, d_kernel
      [d, V] f32, d_bias [V] f32 | None, d_dynamic)``.
    """
    hidden, teacher_rows, labels, mask = rows
    kernel, bias = shared[:2]
    if mask is not None:  # a masked row's hidden state (even NaN) reaches no matmul
        hidden = jnp.where(mask[:, None], hidden, jnp.zeros((), hidden.dtype))
        if config.teacher_from_hidden:
            teacher_rows = jnp.where(mask[:, None], teacher_rows, jnp.zeros((), teacher_rows.dtype))
    dot_dtype = jnp.promote_types(hidden.dtype, kernel.dtype)
    raw = projected_logits(hidden, kernel, bias)  # scaled and capped in _chunk_values

    def values(raw_logits, dynamic):
        options = {**dict(config.static_options), **dynamic}
        teacher_logits = _teacher_logits(options, teacher_rows, shared[2:])
        total, sums = _chunk_values(config, options, raw_logits, teacher_logits, labels, mask)
        return total, {**sums, "loss": total}

    if not with_grads:
        return values(raw, dynamic)[1], None
    (_, sums), (d_raw, d_dynamic) = jax.value_and_grad(values, argnums=(0, 1), has_aux=True)(
        raw, dynamic
    )
    d_dot = d_raw.astype(dot_dtype)
    d_hidden = jnp.matmul(d_dot, kernel.astype(dot_dtype).T, preferred_element_type=jnp.float32)
    d_kernel = jnp.matmul(hidden.astype(dot_dtype).T, d_dot, preferred_element_type=jnp.float32)
    d_bias = None if bias is None else jnp.sum(d_raw, axis=0)
    return sums, (d_hidden, d_kernel, d_bias, d_dynamic)


def _add(a, b):
    return jax.tree.map(jnp.add, a, b)


def chunk_layout(num_tokens: int, chunk_size: int | None) -> tuple[int, int, int]:
    """``(steps, rows, rest)`` with ``steps * rows + rest == num_tokens``.

    Step ``s`` of the scan takes the *strided* rows ``s, s + steps, s + 2 steps,
    ...`` of the first ``steps * rows`` tokens, so that under data parallelism
    (tokens split in contiguous blocks over devices, by ``jit``'s partitioner)
    every step touches every device's block equally and no device gathers
    another's tokens. ``rows`` is the largest divisor of ``num_tokens`` up to
    ``chunk_size`` when one above ``chunk_size / 2`` exists (then ``rest`` is 0);
    otherwise ``rows = chunk_size`` and the last ``rest`` tokens form one more,
    smaller chunk.
    """
    if chunk_size is None or chunk_size >= num_tokens:
        return 1, num_tokens, 0
    for rows in range(chunk_size, (chunk_size - 1) // 2, -1):
        if num_tokens % rows == 0:
            return num_tokens // rows, rows, 0
    steps = num_tokens // chunk_size
    return steps, chunk_size, num_tokens - steps * chunk_size


def _varying(leaf) -> frozenset[str]:
    """The ``shard_map`` axes over which ``leaf`` varies (empty outside, or unchecked)."""
    aval = jax.typeof(leaf)
    manual = getattr(aval, "manual_axis_type", None)  # JAX >= 0.9
    if manual is not None:
        return frozenset(manual.varying)
    return frozenset(getattr(aval, "vma", ()))


def _varying_axes(tree) -> tuple[str, ...]:
    """The ``shard_map`` axes over which some leaf of ``tree`` varies (``check_vma``)."""
    axes = set()
    for leaf in jax.tree.leaves(tree):
        axes |= _varying(leaf)
    return tuple(sorted(axes))


def _vary(tree, axes: tuple[str, ...]):
    """Every leaf of ``tree`` marked as varying over ``axes`` (a no-op outside ``shard_map``).

    Inside ``jax.shard_map`` with ``check_vma=True``, a replicated input (the
    kernel) used with per-device ones (the hidden states) must be cast to varying
    before entering the custom VJP: the transpose of that cast then sums its
    per-device gradients over the axes, as autodiff does for the unchunked loss.
    """
    if not axes:
        return tree
    cast = getattr(jax.lax, "pcast", None)

    def vary(leaf):
        missing = tuple(a for a in axes if a not in _varying(leaf))
        if not missing:
            return leaf
        if cast is not None:
            return cast(leaf, missing, to="varying")
        return jax.lax.pvary(leaf, missing)

    return jax.tree.map(vary, tree)


def _run(config: _Config, dynamic, rows, shared, with_grads: bool):
    """All chunks: a ``lax.scan`` over the strided ones, then the remainder."""
    hidden = rows[0]
    num_tokens = hidden.shape[0]
    steps, size, rest = chunk_layout(num_tokens, config.chunk_size)
    if steps == 1:
        return _chunk(config, dynamic, rows, shared, with_grads)
    axes = _varying_axes((rows, shared, dynamic))
    main = steps * size

    def strided(x):  # [steps * size, ...] -> [size, steps, ...]
        return None if x is None else x[:main].reshape(size, steps, *x.shape[1:])

    views = jax.tree.map(strided, rows, is_leaf=lambda x: x is None)

    def body(carry, index):
        chunk_rows = jax.tree.map(
            lambda view: jax.lax.dynamic_index_in_dim(view, index, axis=1, keepdims=False),
            views,
        )
        sums, grads = _chunk(config, dynamic, chunk_rows, shared, with_grads)
        if not with_grads:
            return _add(carry, sums), None
        d_hidden, *accumulated = grads
        return _add(carry, (sums, *accumulated)), d_hidden

    zeros = dict.fromkeys(("loss", *_METRICS), jnp.zeros((), jnp.float32))
    if with_grads:
        kernel, bias = shared[:2]
        zeros = (
            zeros,
            jnp.zeros(kernel.shape, jnp.float32),
            None if bias is None else jnp.zeros(bias.shape, jnp.float32),
            jax.tree.map(jnp.zeros_like, dynamic),
        )
    carry, d_hidden = jax.lax.scan(body, _vary(zeros, axes), jnp.arange(steps))
    if with_grads:
        sums, d_kernel, d_bias, d_dynamic = carry
        d_hidden = jnp.swapaxes(d_hidden, 0, 1).reshape(main, hidden.shape[1])
        grads = (d_hidden, d_kernel, d_bias, d_dynamic)
    else:
        sums, grads = carry, None
    if rest:
        tail = jax.tree.map(
            lambda x: None if x is None else x[main:], rows, is_leaf=lambda x: x is None
        )
        tail_sums, tail_grads = _chunk(config, dynamic, tail, shared, with_grads)
        sums = _add(sums, tail_sums)
        if with_grads:
            grads = (
                jnp.concatenate([grads[0], tail_grads[0]]),
                *_add(grads[1:], tail_grads[1:]),
            )
    return sums, grads


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(box, dynamic, rows, shared):
    sums, _ = _run(box.config, dynamic, rows, shared, with_grads=False)
    return sums


def _fused_fwd(box, dynamic, rows, shared):
    sums, grads = _run(box.config, dynamic, rows, shared, with_grads=True)
    return sums, grads


def _fused_bwd(box, grads, cotangent):
    d_hidden, d_kernel, d_bias, d_dynamic = grads
    scale = cotangent["loss"]
    d_bias = None if d_bias is None else (scale * d_bias).astype(box.bias_dtype)
    return (
        jax.tree.map(lambda d: scale * d, d_dynamic),
        ((scale * d_hidden).astype(box.hidden_dtype), None, None, None),  # the teacher is frozen
        ((scale * d_kernel).astype(box.kernel_dtype), d_bias, None, None),
    )


_fused.defvjp(_fused_fwd, _fused_bwd)


@dataclasses.dataclass(frozen=True)
class _Static:
    """What the custom VJP needs statically: the config and the cotangents' dtypes."""

    config: _Config
    hidden_dtype: Any
    kernel_dtype: Any
    bias_dtype: Any


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
    see :func:`jaxkd.output_logits`) and teacher logits given or
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
    ``student_kernel``, ``student_bias`` and the traced scalar options (a learned
    temperature or logit scale, say) are computed in the forward pass, chunk by
    chunk (float32 accumulation), and scaled by the cotangent in the backward pass.
    Only ``loss`` carries gradients: ``kd``, ``ce`` and the metric sums are
    returned under ``stop_gradient`` (weigh the two terms with ``alpha``). No
    gradient flows to the teacher's arrays (it is frozen, as under
    ``stop_gradient``). ``chunk_size=None`` computes the whole ``[N, V]`` at once
    with plain autodiff: the naive reference, with the same values and gradients.

    Chunks are strided: with ``s`` chunks, chunk ``i`` holds tokens ``i, i + s,
    i + 2 s, ...`` (:func:`chunk_layout`), so that under ``jax.jit`` over a mesh
    whose data axis splits the tokens, each device computes its own tokens and
    gathers none. Inside ``jax.shard_map`` it works with ``check_vma`` on or off:
    replicated inputs are cast to varying before the custom VJP, whose transpose
    then sums their gradients over the axis, as autodiff of the unchunked loss does.

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
        neither the sums nor any gradient, whatever their hidden states (even NaN)
        or labels. A kept token's out-of-range label raises when the labels are
        concrete, and makes the loss and its gradients NaN under ``jit``.
      chunk_size: the most tokens per chunk (see :func:`chunk_layout`); ``"auto"``:
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
    if teacher_logits is not None and (teacher_hidden is not None or teacher_bias is not None):
        raise ValueError(
            "With `teacher_logits`, `teacher_hidden` and `teacher_bias` have no use: give "
            "the teacher as logits or as hidden states + kernel (+ bias)."
        )
    if teacher_logits is not None:
        _check_rows("teacher_logits", teacher_logits, num_tokens, 2, _checks.check_floating)
        teacher_vocab = jnp.shape(teacher_logits)[1]
    else:
        if teacher_hidden is None:
            raise ValueError("`teacher_kernel` needs `teacher_hidden` [N, d_t].")
        check_projection("teacher", teacher_hidden, teacher_kernel, teacher_bias)
        _check_rows("teacher_hidden", teacher_hidden, num_tokens, 2, _checks.check_floating)
        teacher_vocab = jnp.shape(teacher_kernel)[1]
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
        with_metrics=with_metrics,
        static_options=static,
    )
    if labels is not None:  # eagerly, as cross_entropy_with_integer_labels does
        _checks.check_labels(labels, (num_tokens, vocab), 1, where)
    if teacher_logits is not None:
        teacher_rows, teacher_shared = teacher_logits, (None, None)
    else:
        teacher_rows, teacher_shared = teacher_hidden, (teacher_kernel, teacher_bias)
    as_array = functools.partial(jax.tree.map, jnp.asarray)
    rows = as_array((student_hidden, teacher_rows, labels, where))
    shared = as_array((student_kernel, student_bias, *teacher_shared))
    axes = _varying_axes((rows, shared, dynamic))
    rows, shared, dynamic = _vary((rows, shared, dynamic), axes)
    if chunk_size is None:
        sums, _ = _run(config, dynamic, rows, shared, with_grads=False)
    else:
        dtypes = [None if x is None else x.dtype for x in (rows[0], *shared[:2])]
        sums = _fused(_Static(config, *dtypes), dynamic, rows, shared)
    loss_sum = sums["loss"]
    metric_sums = jax.lax.stop_gradient({k: sums[k] for k in _METRICS})
    count = (
        jnp.asarray(num_tokens, jnp.float32)
        if where is None
        else jnp.sum(jnp.asarray(where)).astype(jnp.float32)
    )
    return ChunkedSums(loss=loss_sum, count=count, **metric_sums)
