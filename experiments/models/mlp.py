"""Fully connected classifiers: Hinton et al.'s MNIST teacher and students, MNIST-1D MLP.

References:
  Distilling the Knowledge in a Neural Network. Geoffrey Hinton, Oriol Vinyals,
  Jeff Dean, 2015. https://arxiv.org/abs/1503.02531
  Improving neural networks by preventing co-adaptation of feature detectors.
  Geoffrey Hinton, Nitish Srivastava, Alex Krizhevsky, Ilya Sutskever, Ruslan
  Salakhutdinov, 2012. https://arxiv.org/abs/1207.0580
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from experiments.models._common import Dtype


class MLP(nn.Module):
    """A ReLU multilayer perceptron that flattens its input.

    Hinton et al. (2015) distil a 784-1200-1200-10 MNIST teacher, regularized with
    dropout, into 784-800-800-10 and smaller (e.g. 784-30-30-10) students:
    ``MLP((1200, 1200), 10, dropout_rate=0.5, input_dropout_rate=0.2)`` and
    ``MLP((800, 800), 10)``. The dropout rates (50% hidden, 20% input) follow
    Hinton et al. (2012), which the 2015 paper cites for its teacher.

    Attributes:
      hidden_sizes: width of each hidden layer, input side first.
      num_classes: number of output logits.
      dropout_rate: dropout probability after each hidden ReLU (train mode only).
      input_dropout_rate: dropout probability on the flattened input (train mode only).
      dtype: computation dtype; params stay float32 and logits are returned as float32.
    """

    hidden_sizes: Sequence[int]
    num_classes: int
    dropout_rate: float = 0.0
    input_dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Computes logits.

        Args:
          x: inputs [B, ...], flattened to [B, D] (e.g. MNIST [B, 28, 28, 1] -> D = 784,
            MNIST-1D [B, 40] -> D = 40).
          train: enables dropout; needs a ``dropout`` rng when a rate is positive.

        Returns:
          float32 logits [B, num_classes].
        """
        x = jnp.asarray(x, self.dtype).reshape((x.shape[0], -1))
        x = nn.Dropout(self.input_dropout_rate, deterministic=not train)(x)
        for i, size in enumerate(self.hidden_sizes):
            x = nn.Dense(size, dtype=self.dtype, name=f"hidden_{i}")(x)
            x = nn.relu(x)
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
        return x.astype(jnp.float32)
