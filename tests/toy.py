"""Small models and data shared by the step tests."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

NUM_CLASSES = 5
NUM_FEATURES = 12


class MLP(nn.Module):
    """A plain MLP with an optional BatchNorm and dropout."""

    hidden: tuple[int, ...] = (16,)
    batch_norm: bool = False
    dropout_rate: float = 0.0
    bn_axis_name: str | None = None  # synchronized BatchNorm over this axis

    @nn.compact
    def __call__(self, x, *, train: bool):
        for width in self.hidden:
            x = nn.Dense(width)(x)
            if self.batch_norm:
                x = nn.BatchNorm(
                    use_running_average=not train, momentum=0.9, axis_name=self.bn_axis_name
                )(x)
            x = nn.relu(x)
            if self.dropout_rate:
                x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(NUM_CLASSES)(x)


def init(module: nn.Module, seed: int):
    """Linen variables for a ``[*, NUM_FEATURES]`` input."""
    return module.init(jax.random.key(seed), jnp.zeros((1, NUM_FEATURES)), train=False)


def batch(seed: int, size: int = 16) -> dict[str, np.ndarray]:
    """A separable classification batch: label = argmax of a fixed projection."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(size, NUM_FEATURES)).astype(np.float32)
    projection = np.random.default_rng(1234).normal(size=(NUM_FEATURES, NUM_CLASSES))
    return {"image": x, "label": np.argmax(x @ projection, axis=-1).astype(np.int32)}


class NnxMLP(nnx.Module):
    """Dense -> [BatchNorm] -> ReLU -> Dropout -> Dense, in NNX."""

    def __init__(
        self, *, hidden: int = 16, batch_norm: bool = False, dropout_rate: float, rngs: nnx.Rngs
    ):
        self.hidden = nnx.Linear(NUM_FEATURES, hidden, rngs=rngs)
        self.norm = nnx.BatchNorm(hidden, momentum=0.9, rngs=rngs) if batch_norm else None
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
        self.out = nnx.Linear(hidden, NUM_CLASSES, rngs=rngs)

    def __call__(self, x):
        x = self.hidden(x)
        if self.norm is not None:
            x = self.norm(x)
        return self.out(self.dropout(nnx.relu(x)))


class TinyLM(nn.Module):
    """A causal toy language model: embedding, running mean of the past, dense head.

    Position ``t`` sees tokens ``0..t`` only (a cumulative mean), so it is causal
    like a transformer at a fraction of the cost.
    """

    vocab_size: int = 11
    width: int = 8

    @nn.compact
    def __call__(self, tokens, *, train: bool = False):
        del train
        x = nn.Embed(self.vocab_size, self.width)(tokens)
        counts = jnp.arange(1, tokens.shape[-1] + 1, dtype=x.dtype)[None, :, None]
        x = jnp.cumsum(x, axis=-2) / counts
        x = nn.tanh(nn.Dense(self.width)(x))
        return nn.Dense(self.vocab_size)(x)


def token_batch(seed: int, size: int, length: int, vocab_size: int = 11) -> dict[str, np.ndarray]:
    """Shifted next-token batch of random ``[size, length + 1]`` windows, all real."""
    from jaxkd.lm import shift_tokens

    tokens = np.random.default_rng(seed).integers(0, vocab_size, (size, length + 1))
    return shift_tokens(tokens.astype(np.int32))


def init_lm(module: nn.Module, seed: int):
    """Linen variables of a token model for ``[1, 4]`` int32 inputs."""
    return module.init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))
