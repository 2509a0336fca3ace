"""A decoder-only causal transformer for the language-model distillation experiments.

One module, :class:`CausalTransformer`, serves training and decoding:

    model = CausalTransformer(**config_for("student"))
    params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    logits_BxLxV = model.apply({"params": params}, tokens_BxL, train=False)

    cache = init_cache(model, batch_size=B, max_length=S)
    decode = decode_fn(model)
    logits_BxTxV, cache = decode(params, tokens_BxT, positions_BxT, key_mask_BxS, cache, index)

The KV cache is a plain pytree passed in and returned, not a Flax mutable
collection, so decoding is a pure function of its arguments and a sampler built
on it (``jaxkd.lm._sampling.sample``) can be jitted and scanned.

Architecture: token embedding; ``num_layers`` pre-norm blocks, each
``x + attn(rms_norm(x))`` then ``x + mlp(rms_norm(x))``; a final RMSNorm; a head
tied to the embedding (``logits = h @ E^T``) or an untied ``[d, V]`` matrix. No
biases, no dropout (``train`` is accepted and ignored).

References:
  Attention Is All You Need. Ashish Vaswani, Noam Shazeer, Niki Parmar, Jakob
  Uszkoreit, Llion Jones, Aidan N. Gomez, Lukasz Kaiser, Illia Polosukhin, 2017.
  https://arxiv.org/abs/1706.03762
  RoFormer: Enhanced Transformer with Rotary Position Embedding. Jianlin Su, Yu Lu,
  Shengfeng Pan, Ahmed Murtadha, Bo Wen, Yunfeng Liu, 2021.
  https://arxiv.org/abs/2104.09864
  Root Mean Square Layer Normalization. Biao Zhang, Rico Sennrich, 2019.
  https://arxiv.org/abs/1910.07467
  Gaussian Error Linear Units (GELUs). Dan Hendrycks, Kevin Gimpel, 2016.
  https://arxiv.org/abs/1606.08415
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from experiments.models._common import Dtype

# Plain (not truncated) normal with variance 1/fan_in for every projection.
kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "normal")

Cache = tuple[dict[str, jax.Array], ...]
"""Per layer ``{"key": [B, S, H, Dh], "value": [B, S, H, Dh]}``; keys stored after RoPE."""

PRESETS: dict[str, dict[str, Any]] = {
    "teacher": dict(
        vocab_size=8192, num_layers=4, d_model=256, num_heads=4, d_ff=1024, max_length=256
    ),
    "student": dict(
        vocab_size=8192, num_layers=2, d_model=128, num_heads=2, d_ff=512, max_length=256
    ),
    "tiny": dict(vocab_size=64, num_layers=2, d_model=32, num_heads=2, d_ff=64, max_length=32),
}
"""Constructor arguments of the experiment's model sizes (``d_ff = 4 d`` for the LM pair)."""


def config_for(size: str, **overrides: Any) -> dict[str, Any]:
    """Constructor arguments for ``CausalTransformer(**config_for(size))``.

    Args:
      size: a key of :data:`PRESETS` (``"teacher"``, ``"student"``, ``"tiny"``).
      **overrides: fields replacing the preset's (e.g. ``vocab_size=...``).
    """
    if size not in PRESETS:
        raise ValueError(f"unknown size {size!r}; expected one of {sorted(PRESETS)}")
    return {**PRESETS[size], **overrides}


def apply_rope(x_BxTxHxD: jax.Array, positions_BxT: jax.Array, *, base: float = 10000.0):
    """Rotary position embedding (Su et al. 2021) of queries or keys.

    Channel ``i < D/2`` is paired with channel ``i + D/2`` and the pair is rotated by
    the angle ``position * base^(-2i/D)``. Computed in float32, returned in the
    input's dtype.

    Args:
      x_BxTxHxD: queries or keys [B, T, H, D], D even.
      positions_BxT: integer positions [B, T].
      base: the wavelength base.

    Returns:
      The rotated array [B, T, H, D].
    """
    half = x_BxTxHxD.shape[-1] // 2
    inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions_BxT.astype(jnp.float32)[:, :, None] * inv_freq[None, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x = x_BxTxHxD.astype(jnp.float32)
    x1, x2 = x[..., :half], x[..., half:]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_BxTxHxD.dtype)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with RoPE on queries and keys and an optional KV cache.

    Attributes:
      num_heads: number of heads H; the head size is ``d_model // H``.
      dtype: computation dtype (scores and softmax in float32).
    """

    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxTxD, positions_BxT, mask_Bx1xTxS, layer_cache=None, cache_index=None):
        """Attends from the T new positions to the keys allowed by the mask.

        Args:
          x_BxTxD: normalized inputs [B, T, d].
          positions_BxT: RoPE positions [B, T].
          mask_Bx1xTxS: bool, True where query t may attend to key slot s; S = T
            without a cache, the cache length with one.
          layer_cache: ``{"key", "value"}`` [B, S, H, Dh] or None.
          cache_index: slot of the first new token in the cache (scalar int).

        Returns:
          ``(outputs [B, T, d], layer_cache)``; the cache (None without one) holds the
          new keys and values in slots ``[cache_index, cache_index + T)``.
        """
        d_model = x_BxTxD.shape[-1]
        head_dim = d_model // self.num_heads
        qkv = nn.DenseGeneral(
            (3, self.num_heads, head_dim),
            use_bias=False,
            dtype=self.dtype,
            kernel_init=kernel_init,
            name="qkv",
        )
        q, k, v = jnp.moveaxis(qkv(x_BxTxD), 2, 0)  # each [B, T, H, Dh]
        q = apply_rope(q, positions_BxT)
        k = apply_rope(k, positions_BxT)
        if layer_cache is not None:
            start = (0, cache_index, 0, 0)
            keys = jax.lax.dynamic_update_slice(
                layer_cache["key"], k.astype(layer_cache["key"].dtype), start
            )
            values = jax.lax.dynamic_update_slice(
                layer_cache["value"], v.astype(layer_cache["value"].dtype), start
            )
            layer_cache = {"key": keys, "value": values}
            k, v = keys.astype(self.dtype), values.astype(self.dtype)
        scores = jnp.einsum(
            "bthd,bshd->bhts", q * head_dim**-0.5, k, preferred_element_type=jnp.float32
        )
        scores = jnp.where(mask_Bx1xTxS, scores, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhts,bshd->bthd", weights, v)
        out = nn.DenseGeneral(
            d_model,
            axis=(-2, -1),
            use_bias=False,
            dtype=self.dtype,
            kernel_init=kernel_init,
            name="out",
        )(out)
        return out, layer_cache


class MLP(nn.Module):
    """``Dense(d_ff) -> GELU (tanh approximation) -> Dense(d)``, no biases."""

    d_ff: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxTxD):
        dense = functools.partial(
            nn.Dense, use_bias=False, dtype=self.dtype, kernel_init=kernel_init
        )
        h = nn.gelu(dense(self.d_ff, name="up")(x_BxTxD))
        return dense(x_BxTxD.shape[-1], name="down")(h)


class Block(nn.Module):
    """A pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    num_heads: int
    d_ff: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxTxD, positions_BxT, mask_Bx1xTxS, layer_cache=None, cache_index=None):
        h = nn.RMSNorm(epsilon=1e-6, dtype=self.dtype, name="attention_norm")(x_BxTxD)
        h, layer_cache = CausalSelfAttention(self.num_heads, self.dtype, name="attention")(
            h, positions_BxT, mask_Bx1xTxS, layer_cache, cache_index
        )
        x_BxTxD = x_BxTxD + h
        h = nn.RMSNorm(epsilon=1e-6, dtype=self.dtype, name="mlp_norm")(x_BxTxD)
        return x_BxTxD + MLP(self.d_ff, self.dtype, name="mlp")(h), layer_cache


class CausalTransformer(nn.Module):
    """A decoder-only transformer language model (pre-norm, RoPE, GELU MLP, RMSNorm).

    Attributes:
      vocab_size: V.
      num_layers: number of blocks.
      d_model: residual width d, divisible by ``num_heads`` into an even head size.
      num_heads: H.
      d_ff: MLP hidden width.
      max_length: the longest sequence (or KV cache) the model accepts; checked
        against static shapes at trace time.
      tie_embeddings: logits ``h @ E^T`` with the input embedding E [V, d]; else an
        untied ``head`` [d, V] (V*d more parameters).
      dtype: computation dtype; params stay float32 and logits are float32 (the head
        accumulates in float32).
    """

    vocab_size: int
    num_layers: int
    d_model: int
    num_heads: int
    d_ff: int
    max_length: int
    tie_embeddings: bool = True
    dtype: Dtype = jnp.float32

    def setup(self):
        if self.d_model % self.num_heads or (self.d_model // self.num_heads) % 2:
            raise ValueError(
                f"d_model={self.d_model} must split into num_heads={self.num_heads} heads "
                "of even size (RoPE rotates channel pairs)"
            )
        self.embed = nn.Embed(
            self.vocab_size,
            self.d_model,
            embedding_init=nn.initializers.normal(self.d_model**-0.5),
            dtype=self.dtype,
        )
        self.blocks = [
            Block(self.num_heads, self.d_ff, self.dtype, name=f"block_{i}")
            for i in range(self.num_layers)
        ]
        self.final_norm = nn.RMSNorm(epsilon=1e-6, dtype=self.dtype)
        if not self.tie_embeddings:
            self.head = self.param(
                "head", nn.initializers.normal(self.d_model**-0.5), (self.d_model, self.vocab_size)
            )

    def __call__(
        self,
        tokens_BxT: jax.Array,
        train: bool = False,
        *,
        positions: jax.Array | None = None,
        key_mask: jax.Array | None = None,
        cache: Cache | None = None,
        cache_index: jax.Array | int | None = None,
        return_hidden: bool = False,
    ):
        """Next-token logits, over a whole sequence or for new tokens given a KV cache.

        Without a cache, query t attends to positions ``s <= t`` where ``key_mask``
        is True. With a cache of S slots, the T new keys/values go into slots
        ``[cache_index, cache_index + T)`` and the query in slot ``cache_index + t``
        attends to slots ``s <= cache_index + t`` where ``key_mask[b, s]``.

        Args:
          tokens_BxT: int token ids [B, T].
          train: accepted for the step's adapters and ignored (no dropout).
          positions: RoPE positions [B, T]; default ``arange(T)`` (offset by
            ``cache_index`` with a cache). Left-padded rows pass positions counting
            their real tokens from 0.
          key_mask: bool [B, T] without a cache, [B, S] with one; default all True.
          cache: from :func:`init_cache`, or None.
          cache_index: first cache slot written (scalar int, may be traced); default 0.
          return_hidden: without a cache, return ``{"hidden": [B, T, d], "kernel":
            [d, V]}`` (the final-norm states and the head, both in ``dtype``) instead
            of logits, for :func:`jaxkd.chunked_distillation_objective`, which never
            builds the whole ``[B, T, V]``.

        Returns:
          float32 logits [B, T, V] without a cache; ``(logits, cache)`` with one. A
          query with no allowed key (a left-padding position) gets finite,
          meaningless logits.
        """
        if return_hidden and cache is not None:
            raise ValueError("return_hidden=True is for whole sequences, not a KV cache")
        del train
        batch, length = tokens_BxT.shape
        if cache is not None:
            if len(cache) != self.num_layers:
                raise ValueError(f"cache has {len(cache)} layers, model has {self.num_layers}")
            num_slots = cache[0]["key"].shape[1]
            cache_index = jnp.asarray(0 if cache_index is None else cache_index, jnp.int32)
            query_slots = cache_index + jnp.arange(length, dtype=jnp.int32)
        else:
            num_slots = length
            query_slots = jnp.arange(length, dtype=jnp.int32)
        if num_slots > self.max_length:
            raise ValueError(f"sequence/cache length {num_slots} > max_length={self.max_length}")
        if positions is None:
            positions = jnp.broadcast_to(query_slots[None, :], (batch, length))
        if key_mask is None:
            key_mask = jnp.ones((batch, num_slots), bool)
        if positions.shape != (batch, length) or key_mask.shape != (batch, num_slots):
            raise ValueError(
                f"positions {positions.shape} must be {(batch, length)} and key_mask "
                f"{key_mask.shape} must be {(batch, num_slots)}"
            )
        key_slots = jnp.arange(num_slots, dtype=jnp.int32)
        causal_TxS = key_slots[None, :] <= query_slots[:, None]
        mask = causal_TxS[None, None, :, :] & key_mask.astype(bool)[:, None, None, :]

        x = self.embed(tokens_BxT)
        new_cache = []
        for i, block in enumerate(self.blocks):
            layer_cache = None if cache is None else cache[i]
            x, layer_cache = block(x, positions, mask, layer_cache, cache_index)
            new_cache.append(layer_cache)
        h = self.final_norm(x)
        head = self.embed.embedding.T if self.tie_embeddings else self.head
        if return_hidden:
            return {"hidden": h.astype(self.dtype), "kernel": head.astype(self.dtype)}
        logits = jnp.einsum(
            "btd,dv->btv",
            h.astype(self.dtype),
            head.astype(self.dtype),
            preferred_element_type=jnp.float32,
        )
        return logits if cache is None else (logits, tuple(new_cache))


def init_cache(
    model: CausalTransformer,
    batch_size: int,
    max_length: int | None = None,
    dtype: Dtype = jnp.float32,
) -> Cache:
    """An empty KV cache: per layer ``{"key", "value"}`` zeros [B, S, H, Dh].

    Args:
      model: the transformer.
      batch_size: B.
      max_length: S, the number of slots (prompt plus new tokens); default
        ``model.max_length``.
      dtype: storage dtype of keys and values.
    """
    num_slots = model.max_length if max_length is None else max_length
    head_dim = model.d_model // model.num_heads
    shape = (batch_size, num_slots, model.num_heads, head_dim)
    return tuple(
        {"key": jnp.zeros(shape, dtype), "value": jnp.zeros(shape, dtype)}
        for _ in range(model.num_layers)
    )


def decode_fn(model: CausalTransformer) -> Callable[..., tuple[jax.Array, Cache]]:
    """``decode(params, tokens_BxT, positions_BxT, key_mask_BxS, cache, index)``.

    A pure function returning ``(logits [B, T, V] float32, cache)``: it writes the T
    new keys/values into cache slots ``[index, index + T)`` and attends from slot
    ``index + t`` to slots ``s <= index + t`` with ``key_mask[b, s]`` True. ``params``
    is the model's ``"params"`` collection. Build it once and reuse it: the sampler
    treats it as a static (hashed by identity) argument.
    """

    def decode(params, tokens_BxT, positions_BxT, key_mask_BxS, cache, index):
        return model.apply(
            {"params": params},
            tokens_BxT,
            positions=positions_BxT,
            key_mask=key_mask_BxS,
            cache=cache,
            cache_index=index,
        )

    return decode


def flops_per_token(model: CausalTransformer, seq_len: int, *, causal: bool = True) -> int:
    """Analytic forward FLOPs per token (2 per multiply-add, matrix products only).

    With ``n`` layers, width ``d``, MLP width ``f``, vocabulary ``V`` and ``K`` keys
    attended per query:

    .. math::

        \\text{FLOPs/token} = n\\,(8 d^2 + 4 d f + 4 d K) + 2 d V

    ``8 d^2``: the q, k, v and output projections; ``4 d f``: the two MLP matrices;
    ``4 d K``: attention scores ``q k^T`` and the weighted sum of values; ``2 d V``:
    the head (the embedding lookup is free). Causally, the query at position i
    attends to i + 1 keys, so on average ``K = (L + 1) / 2`` over a sequence of
    length L (``4 d K = 2 d (L + 1)``); ``causal=False`` counts ``K = L``, what a
    dense masked implementation (this one) executes. Norms, softmax, RoPE and GELU
    are left out.

    Args:
      model: the transformer.
      seq_len: L.
      causal: count only the keys a query may attend to.
    """
    d, f = model.d_model, model.d_ff
    attention = 2 * d * (seq_len + 1) if causal else 4 * d * seq_len
    per_layer = 8 * d * d + 4 * d * f + attention
    return model.num_layers * per_layer + 2 * d * model.vocab_size
