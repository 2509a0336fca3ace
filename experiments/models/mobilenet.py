"""A MobileNetV2-style student for 32x32 and other small images.

Inverted residual blocks (1x1 expansion, 3x3 depthwise convolution, linear 1x1
projection, identity shortcut when the shape is kept) with a width multiplier.
For small images the stem has stride 1 and the second stage stride 1 (the
ImageNet network downsamples 32x, this one 8x: a 32x32 input ends at 4x4).

With ``width_multiplier=0.5`` and 100 classes the model has 815,780 parameters,
close to the 0.81M of the half-width MobileNetV2 student in the CRD benchmark
(whose layer layout differs in details).

Features for distillation (see ``FEATURE_LAYERS`` in the registry): the last block
of each resolution (``stage1_block1`` 32x32, ``stage2_block2`` 16x16,
``stage4_block2`` 8x8, ``stage6_block0`` 4x4 for 32x32 inputs: the blocks whose
outputs CRD's code hands to feature losses) and the pooled embedding ``pooled``.

References:
  MobileNetV2: Inverted Residuals and Linear Bottlenecks. Mark Sandler, Andrew
  Howard, Menglong Zhu, Andrey Zhmoginov, Liang-Chieh Chen, 2018.
  https://arxiv.org/abs/1801.04381
  Contrastive Representation Distillation. Yonglong Tian, Dilip Krishnan,
  Phillip Isola, 2020. https://arxiv.org/abs/1910.10699
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from experiments.models._common import Dtype, as_images, batch_norm, conv
from experiments.models.resnet import GlobalAveragePool

# (expansion t, output channels c, repeats n, first stride s) per stage, as in
# Table 2 of Sandler et al. (2018) but with the second stage at stride 1.
SMALL_IMAGE_STAGES: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def make_divisible(value: float, divisor: int = 8) -> int:
    """Rounds a channel count to the nearest multiple of ``divisor``, losing at most 10%."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class InvertedResidual(nn.Module):
    """Expand (1x1), filter (3x3 depthwise), project (1x1, linear) with BatchNorm.

    Attributes:
      features: output channels.
      strides: stride of the depthwise convolution.
      expansion: hidden channels = input channels * expansion (no expand layer if 1).
      dtype: computation dtype.
    """

    features: int
    strides: int
    expansion: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Maps [B, H, W, C] to [B, H / strides, W / strides, features]."""
        in_features = x.shape[-1]
        hidden = in_features * self.expansion
        y = x
        if self.expansion != 1:
            y = conv(hidden, 1, dtype=self.dtype, name="expand_conv")(y)
            y = nn.relu6(batch_norm(train=train, dtype=self.dtype, name="expand_bn")(y))
        y = conv(
            hidden, 3, strides=self.strides, groups=hidden, dtype=self.dtype, name="depthwise_conv"
        )(y)
        y = nn.relu6(batch_norm(train=train, dtype=self.dtype, name="depthwise_bn")(y))
        y = conv(self.features, 1, dtype=self.dtype, name="project_conv")(y)
        y = batch_norm(train=train, dtype=self.dtype, name="project_bn")(y)
        if self.strides == 1 and in_features == self.features:
            y = y + x
        return y


class MobileNetV2(nn.Module):
    """MobileNetV2 with a width multiplier, for small images.

    Attributes:
      num_classes: number of output logits.
      width_multiplier: scales every channel count (rounded to multiples of 8); the
        last 1x1 convolution keeps ``last_features`` unless the multiplier exceeds 1.
      stages: (expansion, channels, repeats, first stride) per stage.
      stem_strides: stride of the 3x3 stem convolution (1 for 32x32 inputs).
      last_features: channels of the final 1x1 convolution before pooling.
      dropout_rate: dropout before the classifier (train mode only).
      dtype: computation dtype; params stay float32 and logits are returned as float32.
    """

    num_classes: int
    width_multiplier: float = 1.0
    stages: Sequence[tuple[int, int, int, int]] = SMALL_IMAGE_STAGES
    stem_strides: int = 1
    last_features: int = 1280
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Computes logits.

        Args:
          x: images [B, H, W, C] or grayscale [B, H, W].
          train: uses batch statistics and updates ``batch_stats`` (mutable) when True;
            enables dropout (needs a ``dropout`` rng when ``dropout_rate`` > 0).

        Returns:
          float32 logits [B, num_classes].
        """
        x = as_images(x, self.dtype)
        stem = make_divisible(32 * self.width_multiplier)
        x = conv(stem, 3, strides=self.stem_strides, dtype=self.dtype, name="stem_conv")(x)
        x = nn.relu6(batch_norm(train=train, dtype=self.dtype, name="stem_bn")(x))
        for stage, (expansion, channels, repeats, first_strides) in enumerate(self.stages):
            features = make_divisible(channels * self.width_multiplier)
            for block in range(repeats):
                x = InvertedResidual(
                    features,
                    strides=first_strides if block == 0 else 1,
                    expansion=expansion,
                    dtype=self.dtype,
                    name=f"stage{stage}_block{block}",
                )(x, train=train)
        last = make_divisible(self.last_features * max(1.0, self.width_multiplier))
        x = conv(last, 1, dtype=self.dtype, name="last_conv")(x)
        x = nn.relu6(batch_norm(train=train, dtype=self.dtype, name="last_bn")(x))
        x = GlobalAveragePool(name="pooled")(x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
        return x.astype(jnp.float32)
