"""Small models and data shared by the step tests."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

NUM_CLASSES = 5
NUM_FEATURES = 12


class MLP(nn.Module):
    """A plain MLP with an optional BatchNorm and dropout."""

    hidden: tuple[int, ...] = (16,)
    batch_norm: bool = False
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x, *, train: bool):
        for width in self.hidden:
            x = nn.Dense(width)(x)
            if self.batch_norm:
                x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
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
