"""A fully connected autoencoder whose output names its reconstruction and its latent code.

The regression experiment (:mod:`experiments.regression`) distils a wide
autoencoder into a narrow one. Both return a mapping, not logits::

    model = Autoencoder(encoder_sizes=(256, 128), latent_size=16)
    variables = model.init(jax.random.key(0), images, train=False)
    outputs = model.apply(variables, images, train=False)
    outputs["reconstruction"]  # float32 [B, D], in (0, 1): a sigmoid of the last layer
    outputs["latent"]          # float32 [B, latent_size]: the bottleneck, linear

References:
  Reducing the Dimensionality of Data with Neural Networks. Geoffrey E. Hinton,
  Ruslan R. Salakhutdinov, 2006. https://doi.org/10.1126/science.1127647
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from experiments.models._common import Dtype


def layer_sizes(model: Autoencoder, input_size: int) -> tuple[int, ...]:
    """Widths of every layer of ``model`` on inputs of ``input_size`` features, input first.

    ``Autoencoder((256, 128), 16)`` on 64 features: ``(64, 256, 128, 16, 128, 256, 64)``.
    """
    decoder = model.encoder_sizes[::-1] if model.decoder_sizes is None else model.decoder_sizes
    return (input_size, *model.encoder_sizes, model.latent_size, *decoder, input_size)


def describe(model: Autoencoder, input_size: int) -> str:
    """``"autoencoder 64-256-128-16-128-256-64"``: the model's layer widths."""
    return "autoencoder " + "-".join(str(size) for size in layer_sizes(model, input_size))


class Autoencoder(nn.Module):
    """A ReLU MLP encoder to a linear latent code, and a ReLU MLP decoder back to the input.

    The input ``[B, ...]`` is flattened to ``[B, D]``; the decoder's last layer has
    ``D`` units and a sigmoid, for inputs scaled to [0, 1].

    Attributes:
      encoder_sizes: widths of the encoder's hidden layers, input side first.
      latent_size: width of the latent code (no activation).
      decoder_sizes: widths of the decoder's hidden layers, latent side first;
        None mirrors ``encoder_sizes``.
      dtype: computation dtype; params and outputs are float32.
    """

    encoder_sizes: Sequence[int]
    latent_size: int
    decoder_sizes: Sequence[int] | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> dict[str, jax.Array]:
        """Encodes and decodes ``x``.

        Args:
          x: inputs ``[B, ...]``, flattened to ``[B, D]`` (digits ``[B, 8, 8, 1]``: D = 64).
          train: unused (no dropout or BatchNorm); kept for the step's apply signature.

        Returns:
          ``{"reconstruction": float32 [B, D], "latent": float32 [B, latent_size]}``.
        """
        del train
        if x.ndim < 2:
            raise ValueError(f"`x` must be a batch [B, ...] of inputs, got shape {x.shape}.")
        size = 1
        for dim in x.shape[1:]:
            size *= dim
        h = jnp.asarray(x, self.dtype).reshape((x.shape[0], size))
        for i, width in enumerate(self.encoder_sizes):
            h = nn.relu(nn.Dense(width, dtype=self.dtype, name=f"encoder_{i}")(h))
        latent = nn.Dense(self.latent_size, dtype=self.dtype, name="latent")(h)
        h = latent
        decoder = self.encoder_sizes[::-1] if self.decoder_sizes is None else self.decoder_sizes
        for i, width in enumerate(decoder):
            h = nn.relu(nn.Dense(width, dtype=self.dtype, name=f"decoder_{i}")(h))
        h = nn.Dense(size, dtype=self.dtype, name="output")(h)
        return {
            "reconstruction": nn.sigmoid(h).astype(jnp.float32),
            "latent": latent.astype(jnp.float32),
        }
