"""A small 1D convolutional classifier for MNIST-1D.

Reference:
  Scaling Down Deep Learning. Sam Greydanus, 2020. https://arxiv.org/abs/2011.14439
  (revised as "Scaling Down Deep Learning with MNIST-1D", Sam Greydanus and
  Dmitry Kobak, ICML 2024).
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from experiments.models._common import Dtype


class Mnist1DCNN(nn.Module):
    """Three strided 1D convolutions and a linear classifier (about 5k params).

    The shape of the reference CNN of the MNIST-1D paper: 25 channels, kernel
    sizes 5, 3, 3, stride 2 and padding 1 in every layer, ReLU after each
    convolution, then the flattened features go to one dense layer. For the
    40-sample input the lengths are 40 -> 19 -> 10 -> 5, so the classifier sees
    5 * 25 = 125 features, and the model has 5,210 parameters for 10 classes.

    Attributes:
      num_classes: number of output logits.
      channels: channels of every convolution.
      kernel_sizes: kernel size of each convolution, input side first.
      dtype: computation dtype; params stay float32 and logits are returned as float32.
    """

    num_classes: int = 10
    channels: int = 25
    kernel_sizes: Sequence[int] = (5, 3, 3)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Computes logits.

        Args:
          x: signals [B, L] or [B, L, 1] (MNIST-1D: L = 40).
          train: unused (the model has no dropout or BatchNorm); kept for a uniform API.

        Returns:
          float32 logits [B, num_classes].
        """
        del train
        if x.ndim == 2:
            x = x[..., None]
        if x.ndim != 3:
            raise ValueError(f"expected signals [B, L] or [B, L, C], got shape {x.shape}")
        x = jnp.asarray(x, self.dtype)
        for i, kernel_size in enumerate(self.kernel_sizes):
            x = nn.Conv(
                self.channels,
                (kernel_size,),
                strides=(2,),
                padding=((1, 1),),
                dtype=self.dtype,
                name=f"conv_{i}",
            )(x)
            x = nn.relu(x)
        x = x.reshape((x.shape[0], -1))
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
        return x.astype(jnp.float32)
