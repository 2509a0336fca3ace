"""Sampling from a causal language model with a KV cache: one prefill, then a scan.

The sampler is model-agnostic. It takes a pure ``decode`` function

    decode(params, tokens_BxT, positions_BxT, key_mask_BxS, cache, index)
        -> (logits_BxTxV, cache)

that writes the T new tokens' keys/values into cache slots ``[index, index + T)``
and lets the query in slot ``index + t`` attend to slots ``s <= index + t`` where
``key_mask[b, s]`` is True; ``positions`` are the tokens' position ids. Every leaf
of ``cache`` is shaped ``[B, S, ...]`` (S slots). The reference transformer in
``experiments/models/transformer.py`` provides ``decode_fn`` and ``init_cache``.

Randomness: new token i (i = 0 .. N-1) is drawn with ``jax.random.fold_in(rng, i)``,
so a loop that recomputes the logits of every step without a cache and calls
``sample_token(logits, jax.random.fold_in(rng, i), ...)`` draws the same tokens.
Under data parallelism pass each device its own ``rng``; the sampler uses no
collectives.

References:
  The Curious Case of Neural Text Degeneration. Ari Holtzman, Jan Buys, Li Du,
  Maxwell Forbes, Yejin Choi, 2020. https://arxiv.org/abs/1904.09751
  Hierarchical Neural Story Generation. Angela Fan, Mike Lewis, Yann Dauphin, 2018.
  https://arxiv.org/abs/1805.04833 (top-k sampling)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
DecodeFn = Callable[..., tuple[jax.Array, PyTree]]


class SampleOutput(NamedTuple):
    """What :func:`sample` returns (B rows, P prompt columns, N new tokens).

    Attributes:
      tokens: int32 [B, P + N], the prompt as given, then the completion; completion
        tokens after a row's EOS are ``pad_id``.
      mask: bool [B, P + N], real tokens: the real prompt tokens and the completion
        up to and including EOS.
      completion_mask: bool [B, P + N], the completion part of ``mask`` (False over
        the prompt).
      logprobs: float32 [B, N], log-probability of each new token under the
        distribution it was drawn from (after temperature, top-k and top-p; 0 for
        greedy decoding, a point mass); 0 where ``completion_mask`` is False.
    """

    tokens: jax.Array
    mask: jax.Array
    completion_mask: jax.Array
    logprobs: jax.Array


def _check_sampling_args(vocab_size: float, temperature, top_k, top_p) -> None:
    """Raises ValueError for out-of-range sampling arguments (they are static).

    ``vocab_size`` may be ``inf`` where V is not known yet (before ``decode`` runs).
    """
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and not (isinstance(top_k, int | np.integer) and 1 <= top_k <= vocab_size):
        bound = "" if vocab_size == np.inf else f" <= {vocab_size} (the vocab size)"
        raise ValueError(f"top_k must be an int >= 1{bound}, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def filter_logits(
    logits_BxV: jax.Array,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> jax.Array:
    """The logits of the distribution :func:`sample_token` draws from.

    ``logits / temperature`` in float32, then top-k (keep the k largest; ties are
    broken towards the lower token id), then top-p (Holtzman et al. 2020) over the
    distribution that top-k left: keep the smallest set of most probable tokens
    whose probability mass reaches ``top_p``, i.e. token j of the descending order
    is kept when the mass of the tokens before it is below ``top_p`` (the most
    probable token is always kept). Dropped tokens get -inf. At temperature 0 the
    result is a point mass: 0 at the argmax (the lowest id among ties), -inf elsewhere.

    Args:
      logits_BxV: logits [B, V] (entries of -inf are never drawn).
      temperature: >= 0.
      top_k: None, or an int in [1, V].
      top_p: None, or a float in (0, 1].

    Returns:
      float32 filtered logits [B, V].
    """
    vocab_size = logits_BxV.shape[-1]
    _check_sampling_args(vocab_size, temperature, top_k, top_p)
    logits = logits_BxV.astype(jnp.float32)
    if temperature == 0:
        best = jnp.argmax(logits, axis=-1)
        hit = jnp.arange(vocab_size)[None, :] == best[:, None]
        return jnp.where(hit, 0.0, -jnp.inf)
    logits = logits / temperature
    if top_k is None and top_p is None:
        return logits
    if top_k is not None:  # the k largest, descending; ties go to the lower id
        sorted_logits, order = jax.lax.top_k(logits, top_k)
    else:
        order = jnp.argsort(-logits, axis=-1, stable=True)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    keep_sorted = jnp.ones(sorted_logits.shape, bool)
    if top_p is not None:
        probs = jax.nn.softmax(sorted_logits, axis=-1)  # renormalized over the top k
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep_sorted = (mass_before < top_p).at[:, 0].set(True)
    rows = jnp.arange(logits.shape[0])[:, None]
    keep = jnp.zeros(logits.shape, bool).at[rows, order].set(keep_sorted)
    return jnp.where(keep, logits, -jnp.inf)


def _sample_with_logprob(logits_BxV, rng, *, temperature, top_k, top_p):
    """``(tokens int32 [B], log-probs float32 [B])`` under the filtered distribution."""
    filtered = filter_logits(logits_BxV, temperature=temperature, top_k=top_k, top_p=top_p)
    if temperature == 0:
        tokens = jnp.argmax(filtered, axis=-1)
    else:
        tokens = jax.random.categorical(rng, filtered, axis=-1)
    log_probs = jax.nn.log_softmax(filtered, axis=-1)
    logprob = jnp.take_along_axis(log_probs, tokens[:, None], axis=-1)[:, 0]
    return tokens.astype(jnp.int32), logprob


def sample_token(
    logits_BxV: jax.Array,
    rng: jax.Array,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> jax.Array:
    """One token per row from ``filter_logits(logits_BxV, ...)``.

    Temperature 0 is greedy (argmax; ``rng`` unused). Otherwise a categorical draw
    with ``rng`` from the logits after temperature, top-k and top-p (see
    :func:`filter_logits`).

    Args:
      logits_BxV: logits [B, V].
      rng: a PRNG key.
      temperature: >= 0.
      top_k: None, or an int in [1, V].
      top_p: None, or a float in (0, 1].

    Returns:
      int32 token ids [B].

    Examples:
      >>> logits = jnp.array([[0.0, 2.0, 1.0]])
      >>> sample_token(logits, jax.random.key(0), temperature=0.0)
      Array([1], dtype=int32)
    """
    tokens, _ = _sample_with_logprob(
        logits_BxV, rng, temperature=temperature, top_k=top_k, top_p=top_p
    )
    return tokens


def _cache_slots(cache: PyTree, batch: int) -> int:
    """S, the common second dimension of every cache leaf [B, S, ...]."""
    shapes = {tuple(leaf.shape[:2]) for leaf in jax.tree.leaves(cache)}
    if len(shapes) != 1 or next(iter(shapes))[0] != batch:
        raise ValueError(f"every cache leaf must be [B={batch}, S, ...]; got leading dims {shapes}")
    return next(iter(shapes))[1]


def sample(
    decode: DecodeFn,
    params: PyTree,
    prompt_tokens_BxP: jax.Array,
    prompt_mask_BxP: jax.Array,
    *,
    rng: jax.Array,
    max_new_tokens: int,
    cache: PyTree,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    pad_id: int = 0,
) -> SampleOutput:
    """Samples ``max_new_tokens`` tokens after left-padded prompts, with a KV cache.

    One prefill call runs ``decode`` over the P prompt columns at cache index 0
    with positions counting each row's real tokens from 0 (padding gets 0) and
    ``key_mask = [prompt_mask, True ...]`` [B, S]; token 0 is drawn from the last
    column's logits. A ``lax.scan`` then makes N - 1 single-token calls: step i
    feeds token i - 1 into slot ``P + i - 1`` and draws token i. Token i uses the
    key ``jax.random.fold_in(rng, i)``. Once a row draws ``eos_id``, its later
    tokens are ``pad_id`` and masked out (the EOS itself is real).

    The work is one jitted function whose static arguments are ``decode`` (hashed
    by identity: build it once), ``max_new_tokens``, ``temperature``, ``top_k``,
    ``top_p``, ``eos_id`` and ``pad_id``; calls with new params, prompts, masks,
    keys or caches of the same shapes reuse the compiled program. ``sample`` itself
    may be called inside ``jax.jit`` (or ``shard_map``) with those arguments static.

    Args:
      decode: ``decode(params, tokens_BxT, positions_BxT, key_mask_BxS, cache,
        index) -> (logits_BxTxV, cache)`` (see the module docstring).
      params: the model parameters ``decode`` takes.
      prompt_tokens_BxP: int prompt ids [B, P], LEFT-padded.
      prompt_mask_BxP: bool [B, P], False on the left padding. Every row's last
        column must be real, and a row's real tokens contiguous; checked when the
        mask is concrete.
      rng: a PRNG key (per device under data parallelism).
      max_new_tokens: N >= 1.
      cache: an empty cache for B rows and S >= P + N slots (every leaf
        [B, S, ...]), e.g. ``init_cache(model, B, P + N)``.
      temperature: >= 0; 0 is greedy.
      top_k: None, or keep the k most probable tokens, k in [1, V].
      top_p: None, or nucleus sampling with mass p in (0, 1].
      eos_id: the end-of-sequence id, or None to always sample N tokens.
      pad_id: the id written after EOS.

    Returns:
      :class:`SampleOutput` with ``tokens``/``mask``/``completion_mask`` [B, P + N]
      and ``logprobs`` [B, N].
    """
    batch, prompt_len = prompt_tokens_BxP.shape
    if prompt_mask_BxP.shape != (batch, prompt_len):
        raise ValueError(
            f"prompt_mask_BxP {prompt_mask_BxP.shape} must match prompt_tokens_BxP "
            f"{prompt_tokens_BxP.shape}"
        )
    if not (isinstance(max_new_tokens, int | np.integer) and max_new_tokens >= 1):
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens}")
    if not isinstance(pad_id, int | np.integer) or not (
        eos_id is None or isinstance(eos_id, int | np.integer)
    ):
        raise ValueError(f"pad_id and eos_id must be ints, got {pad_id} and {eos_id}")
    num_slots = _cache_slots(cache, batch)
    if num_slots < prompt_len + max_new_tokens:
        raise ValueError(
            f"cache has S={num_slots} slots; need S >= P + max_new_tokens = "
            f"{prompt_len} + {max_new_tokens}"
        )
    _check_sampling_args(np.inf, temperature, top_k, top_p)
    try:
        mask = np.asarray(prompt_mask_BxP, bool)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        mask = None
    if mask is not None:
        if not mask[:, -1].all() or (mask[:, 1:] < mask[:, :-1]).any():
            raise ValueError(
                "prompt_mask_BxP must describe LEFT-padded prompts: False then True in "
                "every row, with the last column True"
            )
    return _sample(
        decode,
        params,
        prompt_tokens_BxP,
        prompt_mask_BxP,
        rng,
        cache,
        max_new_tokens=int(max_new_tokens),
        temperature=temperature,
        top_k=None if top_k is None else int(top_k),
        top_p=top_p,
        eos_id=None if eos_id is None else int(eos_id),
        pad_id=int(pad_id),
    )


@functools.partial(
    jax.jit,
    static_argnames=(
        "decode",
        "max_new_tokens",
        "temperature",
        "top_k",
        "top_p",
        "eos_id",
        "pad_id",
    ),
)
def _sample(
    decode,
    params,
    prompt_tokens_BxP,
    prompt_mask_BxP,
    rng,
    cache,
    *,
    max_new_tokens,
    temperature,
    top_k,
    top_p,
    eos_id,
    pad_id,
):
    """The jitted body of :func:`sample` (arguments already checked)."""
    batch, prompt_len = prompt_tokens_BxP.shape
    num_slots = _cache_slots(cache, batch)
    prompt_mask = prompt_mask_BxP.astype(bool)
    prompt_tokens = prompt_tokens_BxP.astype(jnp.int32)
    num_real_B = jnp.sum(prompt_mask, axis=-1, dtype=jnp.int32)
    positions_BxP = jnp.maximum(jnp.cumsum(prompt_mask, axis=-1, dtype=jnp.int32) - 1, 0)
    new_slots = jnp.ones((batch, num_slots - prompt_len), bool)
    key_mask_BxS = jnp.concatenate([prompt_mask, new_slots], axis=-1)
    draw = functools.partial(
        _sample_with_logprob, temperature=temperature, top_k=top_k, top_p=top_p
    )

    def finish(token_B, logprob_B, done_B):
        """Masks a drawn token of rows that had already ended; updates ``done``."""
        real_B = ~done_B
        token_B = jnp.where(real_B, token_B, pad_id)
        logprob_B = jnp.where(real_B, logprob_B, 0.0)
        if eos_id is not None:
            done_B = done_B | (token_B == eos_id)
        return token_B, logprob_B, real_B, done_B

    logits_BxPxV, cache = decode(
        params, prompt_tokens, positions_BxP, key_mask_BxS, cache, jnp.int32(0)
    )
    token, logprob = draw(logits_BxPxV[:, -1], jax.random.fold_in(rng, 0))
    first = finish(token, logprob, jnp.zeros((batch,), bool))

    def step(carry, i):
        cache, token_B, done_B = carry
        positions_Bx1 = (num_real_B + i - 1)[:, None]
        logits_Bx1xV, cache = decode(
            params, token_B[:, None], positions_Bx1, key_mask_BxS, cache, prompt_len + i - 1
        )
        token, logprob = draw(logits_Bx1xV[:, 0], jax.random.fold_in(rng, i))
        token_B, logprob_B, real_B, done_B = finish(token, logprob, done_B)
        return (cache, token_B, done_B), (token_B, logprob_B, real_B)

    token_0, logprob_0, real_0, done = first
    steps = jnp.arange(1, max_new_tokens, dtype=jnp.int32)
    _, (tokens_NxB, logprobs_NxB, real_NxB) = jax.lax.scan(step, (cache, token_0, done), steps)
    new_tokens = jnp.concatenate([token_0[:, None], tokens_NxB.T], axis=-1)
    logprobs = jnp.concatenate([logprob_0[:, None], logprobs_NxB.T], axis=-1)
    completion = jnp.concatenate([real_0[:, None], real_NxB.T], axis=-1)
    no_prompt = jnp.zeros((batch, prompt_len), bool)
    return SampleOutput(
        tokens=jnp.concatenate([prompt_tokens, new_tokens], axis=-1),
        mask=jnp.concatenate([prompt_mask, completion], axis=-1),
        completion_mask=jnp.concatenate([no_prompt, completion], axis=-1),
        logprobs=logprobs.astype(jnp.float32),
    )
