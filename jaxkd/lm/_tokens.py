"""Next-token targets: the one place where token sequences are shifted.

A window of ``L + 1`` tokens gives a causal language model ``L`` inputs and ``L``
targets: the model reads ``tokens[:, :L]`` and at position ``t`` predicts
``tokens[:, t + 1]``. Whether position ``t`` counts in a loss depends on both
tokens: the input token ``t`` must be real (not padding) and the target token
``t + 1`` must be real and one the loss trains on (a completion, not a prompt).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def _module_of(array):
    return np if isinstance(array, np.ndarray) else jnp


def shift_tokens(tokens, mask=None, *, target_mask=None) -> dict:
    """Splits ``[B, L + 1]`` token windows into next-token inputs and targets.

    Works on NumPy arrays (in an input pipeline) and on JAX arrays (inside a
    jitted step, e.g. on sampled sequences) alike, returning the same kind.

    Args:
      tokens: integer array ``[..., L + 1]``, ``L >= 1``.
      mask: optional bool array of the same shape, True on real tokens (False on
        padding); default all True.
      target_mask: optional bool array of the same shape, True on the tokens a
        loss should predict (e.g. completion tokens but not prompt tokens);
        default ``mask``.

    Returns:
      ``{"inputs": tokens[..., :-1], "targets": tokens[..., 1:], "mask": m}``, each
      ``[..., L]``, with ``m[..., t] = mask[..., t] & mask[..., t + 1] &
      target_mask[..., t + 1]``.

    Examples:
      >>> import numpy as np
      >>> batch = shift_tokens(np.array([[5, 6, 7, 0]]), np.array([[1, 1, 1, 0]], bool))
      >>> batch["inputs"].tolist(), batch["targets"].tolist(), batch["mask"].tolist()
      ([[5, 6, 7]], [[6, 7, 0]], [[True, True, False]])
    """
    if not isinstance(tokens, np.ndarray | jnp.ndarray):
        tokens = np.asarray(tokens)  # e.g. nested lists
    xp = _module_of(tokens)
    shape = np.shape(tokens)
    if len(shape) < 1 or shape[-1] < 2:
        raise ValueError(f"`tokens` must be [..., L + 1] with L >= 1, got shape {shape}.")
    if not xp.issubdtype(tokens.dtype, xp.integer):
        raise TypeError(f"`tokens` must hold integer ids, got dtype {tokens.dtype}.")
    for name, value in (("mask", mask), ("target_mask", target_mask)):
        if value is not None and np.shape(value) != shape:
            raise ValueError(
                f"`{name}` must have the shape of `tokens` {shape}, got {np.shape(value)}."
            )
    mask = xp.ones(shape, bool) if mask is None else xp.asarray(mask).astype(bool)
    target_mask = mask if target_mask is None else xp.asarray(target_mask).astype(bool)
    return {
        "inputs": tokens[..., :-1],
        "targets": tokens[..., 1:],
        "mask": mask[..., :-1] & mask[..., 1:] & target_mask[..., 1:],
    }


def completion_mask_after(prompt_length: int, shape) -> jnp.ndarray:
    """Bool ``[L]``: True at the (shifted) positions whose target is not a prompt token.

    With the first ``prompt_length`` tokens of each ``L + 1`` window a prompt, the
    target of position ``t`` is token ``t + 1``, a completion when
    ``t >= prompt_length - 1``.
    """
    length = shape[-1]
    if not 1 <= prompt_length <= length:
        raise ValueError(f"`prompt_length` must be in [1, L] = [1, {length}], got {prompt_length}.")
    return jnp.arange(length) >= prompt_length - 1
