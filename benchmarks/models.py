"""The teacher/student pairs the benchmarks distil, and the small CNN they use.

Architectures are described by small frozen dataclasses (:class:`MlpArch`,
:class:`ConvArch`) so that the JAX models (built here) and the PyTorch models
(built in :mod:`benchmarks.torch_comparison`) come from one description.

- ``mlp``: Hinton et al.'s MNIST pair, teacher 784-1200-1200-10 and student
  784-800-800-10 (the reference ``experiments.models.MLP``), batch 256.
- ``cnn``: conv3x3-BatchNorm-ReLU stacks on 32x32x3 images with global average
  pooling; teacher widths 32-64-64-128-128, student 16-32-64, batch 64. Small
  enough for a few steps a second on two CPU cores, and it has BatchNorm, so
  the student's ``batch_stats`` go through the step as mutable model state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from experiments.models import MLP

Dtype = Any


@dataclasses.dataclass(frozen=True)
class MlpArch:
    """A ReLU MLP on the flattened input.

    Attributes:
      hidden: width of each hidden layer, input side first.
    """

    hidden: tuple[int, ...]

    def describe(self, input_size: int, num_classes: int) -> str:
        return "-".join(str(size) for size in (input_size, *self.hidden, num_classes))


@dataclasses.dataclass(frozen=True)
class ConvArch:
    """Stacked 3x3 convolutions (no bias), each followed by BatchNorm and ReLU.

    Attributes:
      widths: output channels of each convolution.
      strides: stride of each convolution (same length as ``widths``).
    """

    widths: tuple[int, ...]
    strides: tuple[int, ...]

    def describe(self, input_size: int, num_classes: int) -> str:
        del input_size
        return "conv " + "-".join(str(width) for width in self.widths) + f" > {num_classes}"


Arch = MlpArch | ConvArch


class ConvNet(nn.Module):
    """conv3x3-BN-ReLU stages, global average pooling and a dense classifier.

    Attributes:
      widths: output channels of each convolution.
      strides: stride of each convolution.
      num_classes: number of output logits.
      dtype: computation dtype; params stay float32, logits are float32.
    """

    widths: Sequence[int]
    strides: Sequence[int]
    num_classes: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Maps images ``[B, H, W, C]`` to float32 logits ``[B, num_classes]``."""
        x = jnp.asarray(x, self.dtype)
        for index, (width, stride) in enumerate(zip(self.widths, self.strides, strict=True)):
            x = nn.Conv(
                width,
                (3, 3),
                strides=(stride, stride),
                padding=((1, 1), (1, 1)),
                use_bias=False,
                dtype=self.dtype,
                name=f"conv_{index}",
            )(x)
            x = nn.BatchNorm(
                use_running_average=not train,
                momentum=0.9,
                epsilon=1e-5,
                dtype=self.dtype,
                name=f"bn_{index}",
            )(x)
            x = nn.relu(x)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
        return x.astype(jnp.float32)


def build_linen(arch: Arch, num_classes: int, *, dtype: Dtype = jnp.float32) -> nn.Module:
    """The linen model for ``arch``, called as ``model(x, train=...)``."""
    if isinstance(arch, MlpArch):
        return MLP(hidden_sizes=arch.hidden, num_classes=num_classes, dtype=dtype)
    return ConvNet(widths=arch.widths, strides=arch.strides, num_classes=num_classes, dtype=dtype)


@dataclasses.dataclass(frozen=True)
class PairSpec:
    """A teacher/student pair and the batch it is trained on.

    Attributes:
      name: short name used in figure labels (``"mlp"``, ``"cnn"``).
      teacher: the teacher's architecture.
      student: the student's architecture.
      input_shape: shape of one example, channels last.
      batch_size: examples per step.
      num_classes: number of classes.
    """

    name: str
    teacher: Arch
    student: Arch
    input_shape: tuple[int, ...]
    batch_size: int
    num_classes: int = 10

    def describe(self) -> str:
        """E.g. ``mlp 784-1200-1200-10 -> 784-800-800-10, batch 256``."""
        size = 1
        for dim in self.input_shape:
            size *= dim
        teacher = self.teacher.describe(size, self.num_classes)
        student = self.student.describe(size, self.num_classes)
        return f"{self.name} {teacher} -> {student}, batch {self.batch_size}"


def mlp_pair(*, smoke: bool = False) -> PairSpec:
    """Hinton et al.'s MNIST teacher and student (tiny hidden layers for a smoke run)."""
    if smoke:
        return PairSpec("mlp", MlpArch((64, 64)), MlpArch((32, 32)), (28, 28, 1), 32)
    return PairSpec("mlp", MlpArch((1200, 1200)), MlpArch((800, 800)), (28, 28, 1), 256)


def cnn_pair(*, smoke: bool = False) -> PairSpec:
    """The small BatchNorm CNN pair on 32x32x3 images (8x8x3 for a smoke run)."""
    if smoke:
        return PairSpec("cnn", ConvArch((8, 8), (1, 2)), ConvArch((4, 4), (1, 2)), (8, 8, 3), 8)
    return PairSpec(
        "cnn",
        ConvArch((32, 64, 64, 128, 128), (1, 2, 1, 2, 1)),
        ConvArch((16, 32, 64), (1, 2, 2)),
        (32, 32, 3),
        64,
    )


def pairs(*, smoke: bool = False) -> tuple[PairSpec, PairSpec]:
    """The MLP and CNN pairs."""
    return mlp_pair(smoke=smoke), cnn_pair(smoke=smoke)
