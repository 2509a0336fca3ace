"""Wide residual networks for 32x32 images, as in the CRD benchmark.

WRN-d-k (Zagoruyko & Komodakis, 2016): a 3x3 stem convolution of 16 channels,
three groups of ``(d - 4) / 6`` pre-activation basic blocks of widths ``16k``,
``32k`` and ``64k`` (the second and third groups start with stride 2), a final
BatchNorm + ReLU, global average pooling and a dense classifier.

A pre-activation block computes ``BN-ReLU-conv3x3-BN-ReLU-conv3x3`` and adds its
input; where the width (or the stride) changes, the shortcut is a bias-free 1x1
convolution of the *activated* input, ``relu(bn(x))``, as in the authors' code and
in the code of the CRD benchmark. No dropout (the CRD networks use none).

Parameter counts for 100 classes (BatchNorm scales and biases included, running
statistics not): wrn_40_2 2,255,156; wrn_16_2 703,284 (2.26M and 0.70M, as the
CRD benchmark's PyTorch networks count them).

Features for distillation (see ``FEATURE_LAYERS`` in the registry): each group's
last block output ``stage{g}_block{n-1}`` (the block's sum, before the next
pre-activation, which is what CRD's code hands to feature losses) and the pooled
embedding ``pooled`` (after the final BN-ReLU).

References:
  Wide Residual Networks. Sergey Zagoruyko, Nikos Komodakis, 2016.
  https://arxiv.org/abs/1605.07146
  Contrastive Representation Distillation. Yonglong Tian, Dilip Krishnan,
  Phillip Isola, 2020. https://arxiv.org/abs/1910.10699
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from experiments.models._common import Dtype, as_images, batch_norm, conv
from experiments.models.resnet import GlobalAveragePool


class PreActBlock(nn.Module):
    """A pre-activation basic block: ``x + conv(relu(bn(conv(relu(bn(x))))))``.

    Attributes:
      features: output channels.
      strides: stride of the first convolution and of the shortcut.
      dtype: computation dtype.
    """

    features: int
    strides: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Maps [B, H, W, C] to [B, H / strides, W / strides, features]."""
        activated = nn.relu(batch_norm(train=train, dtype=self.dtype, name="bn_0")(x))
        y = conv(self.features, 3, strides=self.strides, dtype=self.dtype, name="conv_0")(activated)
        y = nn.relu(batch_norm(train=train, dtype=self.dtype, name="bn_1")(y))
        y = conv(self.features, 3, dtype=self.dtype, name="conv_1")(y)
        shortcut = x
        if self.strides != 1 or x.shape[-1] != self.features:
            shortcut = conv(
                self.features, 1, strides=self.strides, dtype=self.dtype, name="shortcut_conv"
            )(activated)
        return y + shortcut


class WideResNet(nn.Module):
    """WRN-depth-widen_factor for 32x32 images.

    Attributes:
      depth: total number of weighted layers, ``6n + 4`` (n blocks per group).
      widen_factor: width multiplier ``k`` of the three groups (16k, 32k, 64k).
      num_classes: number of output logits.
      dtype: computation dtype; params stay float32 and logits are returned as float32.
    """

    depth: int
    widen_factor: int
    num_classes: int
    dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        if self.depth < 10 or (self.depth - 4) % 6 != 0:
            raise ValueError(f"depth must be 6n + 4 with n >= 1, got {self.depth}")
        if not isinstance(self.widen_factor, int) or self.widen_factor < 1:
            raise ValueError(f"widen_factor must be a positive integer, got {self.widen_factor!r}")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Computes logits.

        Args:
          x: images [B, H, W, C] (CIFAR: 32x32x3) or grayscale [B, H, W].
          train: uses batch statistics and updates ``batch_stats`` (mutable) when True,
            running statistics when False.

        Returns:
          float32 logits [B, num_classes].
        """
        blocks_per_group = (self.depth - 4) // 6
        x = as_images(x, self.dtype)
        x = conv(16, 3, dtype=self.dtype, name="stem_conv")(x)
        for group, width in enumerate((16, 32, 64)):
            for block in range(blocks_per_group):
                strides = 2 if group > 0 and block == 0 else 1
                x = PreActBlock(
                    width * self.widen_factor,
                    strides=strides,
                    dtype=self.dtype,
                    name=f"stage{group}_block{block}",
                )(x, train=train)
        x = nn.relu(batch_norm(train=train, dtype=self.dtype, name="final_bn")(x))
        x = GlobalAveragePool(name="pooled")(x)
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
        return x.astype(jnp.float32)


def wrn_40_2(num_classes: int, **kwargs) -> WideResNet:
    """WRN-40-2: 6 blocks per group, widths 32/64/128; a CRD teacher (Tian et al., 2020)."""
    return WideResNet(depth=40, widen_factor=2, num_classes=num_classes, **kwargs)


def wrn_16_2(num_classes: int, **kwargs) -> WideResNet:
    """WRN-16-2: 2 blocks per group, widths 32/64/128; a CRD student (Tian et al., 2020)."""
    return WideResNet(depth=16, widen_factor=2, num_classes=num_classes, **kwargs)
