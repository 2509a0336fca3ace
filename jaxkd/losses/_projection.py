"""A language model's output layer as the fused and vocabulary-parallel losses see it.

Real output layers are more than ``hidden @ kernel``: some add a bias, some scale the
logits (e.g. by ``1 / sqrt(d)`` or a width multiplier) and some soft-cap them with
``cap * tanh(logits / cap)`` (Gemma 2). :func:`output_logits` is that layer, in one
place, so that a loss that computes logits a chunk (or a vocabulary shard) at a time
computes exactly what the model computes whole.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxkd import _checks


def check_projection(prefix: str, hidden, kernel, bias=None) -> None:
    """Validates ``hidden [N, d]``, ``kernel [d, V]`` and ``bias [V]`` (or ``None``).

    ``prefix`` names the side (``"student"``, ``"teacher"``) in the messages.
    """
    names = (f"{prefix}_hidden", f"{prefix}_kernel", f"{prefix}_bias")
    for name, array in zip(names, (hidden, kernel, bias), strict=True):
        if array is not None:
            _checks.check_floating(name, array)
    if jnp.ndim(hidden) != 2:
        raise ValueError(f"`{names[0]}` must be [tokens, d], got shape {jnp.shape(hidden)}.")
    if jnp.ndim(kernel) != 2 or jnp.shape(kernel)[0] != jnp.shape(hidden)[1]:
        raise ValueError(
            f"`{names[1]}` must be [d, V] with d = `{names[0]}`.shape[1]; got "
            f"`{names[0]}` {jnp.shape(hidden)} and `{names[1]}` {jnp.shape(kernel)}."
        )
    if bias is not None and jnp.shape(bias) != jnp.shape(kernel)[1:]:
        raise ValueError(
            f"`{names[2]}` must be [V] = {jnp.shape(kernel)[1:]}, got {jnp.shape(bias)}."
        )


def check_logit_options(logit_scale, softcap) -> None:
    """``logit_scale``: a positive scalar or ``None``; ``softcap``: the same."""
    if logit_scale is not None:
        _checks.check_positive_scalar("logit_scale", logit_scale)
    if softcap is not None:
        _checks.check_positive_scalar("softcap", softcap)


def output_logits(hidden, kernel, bias=None, *, logit_scale=None, softcap=None) -> jax.Array:
    r"""Logits of an output layer, in float32.

    .. math::
      z = c \tanh\left(\frac{s\,(h W + b)}{c}\right)

    with the scale ``s`` and the cap ``c`` left out when ``None``. The matmul takes
    the inputs' dtype (e.g. bfloat16) and accumulates in float32
    (``preferred_element_type``); everything after it is float32.

    Args:
      hidden: float array ``[N, d]``.
      kernel: float array ``[d, V]`` (or a vocabulary shard ``[d, V/m]``).
      bias: optional float array ``[V]`` (or its shard).
      logit_scale: optional positive scalar multiplying the logits.
      softcap: optional positive scalar: logits are soft-capped to ``(-c, c)``.

    Returns:
      float32 array ``[N, V]``.

    References:
      Gemma Team, "Gemma 2: Improving Open Language Models at a Practical Size",
      2024 (logit soft-capping). https://arxiv.org/abs/2408.00118
    """
    return scale_and_cap(
        projected_logits(hidden, kernel, bias), logit_scale=logit_scale, softcap=softcap
    )


def projected_logits(hidden, kernel, bias=None) -> jax.Array:
    """``hidden @ kernel + bias`` in float32: the matmul in the inputs' promoted dtype
    with float32 accumulation; :func:`output_logits` before its scale and cap."""
    dtype = jnp.promote_types(jnp.result_type(hidden), jnp.result_type(kernel))
    logits = jnp.matmul(
        jnp.asarray(hidden, dtype), jnp.asarray(kernel, dtype), preferred_element_type=jnp.float32
    )
    if bias is not None:
        logits = logits + jnp.asarray(bias, jnp.float32)[..., None, :]
    return logits


def scale_and_cap(logits, *, logit_scale=None, softcap=None) -> jax.Array:
    """``c * tanh(s * logits / c)``, each step left out when its option is ``None``."""
    if logit_scale is not None:
        logits = logits * jnp.asarray(logit_scale, jnp.float32)
    if softcap is not None:
        cap = jnp.asarray(softcap, jnp.float32)
        logits = cap * jnp.tanh(logits / cap)
    return logits
