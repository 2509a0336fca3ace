"""CIFAR ResNets with the shapes used in knowledge-distillation papers.

Depth ``6n + 2``: a 3x3 stem convolution, three stages of ``n`` BasicBlocks (the
second and third start with stride 2), global average pooling and a dense
classifier. ``resnet20``/``resnet56`` use widths 16 (stem), 16, 32, 64 as in He et
al. (2016); the "x4" variants of the CRD benchmark use 32 (stem), 64, 128, 256.

Shortcut: a 1x1 convolution + BatchNorm where a block changes the stride or the
width (option B of He et al.), identity otherwise; this is what the CRD code
uses for all four networks. The original CIFAR ResNets of He et al. used
parameter-free zero-padding shortcuts (option A); the two projection shortcuts
add 2,752 parameters to ``resnet20``/``resnet56`` (1% of resnet20).

Parameter counts for 100 classes (BatchNorm scales and biases included, running
statistics not): resnet20 278,324; resnet56 861,620; resnet8x4 1,233,540;
resnet32x4 7,433,860; the CRD paper reports 0.28M, 0.86M, 1.23M and 7.43M.

Features for distillation (see ``FEATURE_LAYERS`` in the registry): each stage's
last block ``stage{s}_block{n-1}`` (its output, after the ReLU) and the pooled
embedding ``pooled`` [B, C], the module outputs that CRD's code hands to feature
losses. Capturing them (``capture_intermediates``) changes nothing in the model.

References:
  Deep Residual Learning for Image Recognition. Kaiming He, Xiangyu Zhang,
  Shaoqing Ren, Jian Sun, 2016. https://arxiv.org/abs/1512.03385
  Contrastive Representation Distillation. Yonglong Tian, Dilip Krishnan,
  Phillip Isola, 2020. https://arxiv.org/abs/1910.10699
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from experiments.models._common import Dtype, as_images, batch_norm, conv


class GlobalAveragePool(nn.Module):
    """Mean over the spatial axes, [B, H, W, C] -> [B, C]: a parameter-free module, so
    that the pooled embedding is a module output that feature methods can capture."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.mean(x, axis=(1, 2))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection, ReLU after the sum.

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
        y = conv(self.features, 3, strides=self.strides, dtype=self.dtype, name="conv_0")(x)
        y = nn.relu(batch_norm(train=train, dtype=self.dtype, name="bn_0")(y))
        y = conv(self.features, 3, dtype=self.dtype, name="conv_1")(y)
        y = batch_norm(train=train, dtype=self.dtype, name="bn_1")(y)
        shortcut = x
        if self.strides != 1 or x.shape[-1] != self.features:
            shortcut = conv(
                self.features, 1, strides=self.strides, dtype=self.dtype, name="shortcut_conv"
            )(x)
            shortcut = batch_norm(train=train, dtype=self.dtype, name="shortcut_bn")(shortcut)
        return nn.relu(y + shortcut)


class CifarResNet(nn.Module):
    """A ResNet of depth ``6n + 2`` for 32x32 images.

    Attributes:
      depth: total number of weighted layers, ``6n + 2`` (n blocks per stage).
      widths: four channel counts: the stem, then the three stages.
      num_classes: number of output logits.
      dtype: computation dtype; params stay float32 and logits are returned as float32.
    """

    depth: int
    widths: Sequence[int]
    num_classes: int
    dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        if self.depth < 8 or (self.depth - 2) % 6 != 0:
            raise ValueError(f"depth must be 6n + 2 with n >= 1, got {self.depth}")
        if len(self.widths) != 4:
            raise ValueError(f"widths must be (stem, stage1, stage2, stage3), got {self.widths}")
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
        blocks_per_stage = (self.depth - 2) // 6
        x = as_images(x, self.dtype)
        x = conv(self.widths[0], 3, dtype=self.dtype, name="stem_conv")(x)
        x = nn.relu(batch_norm(train=train, dtype=self.dtype, name="stem_bn")(x))
        for stage, width in enumerate(self.widths[1:]):
            for block in range(blocks_per_stage):
                strides = 2 if stage > 0 and block == 0 else 1
                x = BasicBlock(
                    width, strides=strides, dtype=self.dtype, name=f"stage{stage}_block{block}"
                )(x, train=train)
        x = GlobalAveragePool(name="pooled")(x)
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
        return x.astype(jnp.float32)


def resnet20(num_classes: int, **kwargs) -> CifarResNet:
    """ResNet-20, widths 16/16/32/64 (He et al., 2016)."""
    return CifarResNet(depth=20, widths=(16, 16, 32, 64), num_classes=num_classes, **kwargs)


def resnet56(num_classes: int, **kwargs) -> CifarResNet:
    """ResNet-56, widths 16/16/32/64 (He et al., 2016)."""
    return CifarResNet(depth=56, widths=(16, 16, 32, 64), num_classes=num_classes, **kwargs)


def resnet8x4(num_classes: int, **kwargs) -> CifarResNet:
    """ResNet-8x4, widths 32/64/128/256: a CRD student (Tian et al., 2020)."""
    return CifarResNet(depth=8, widths=(32, 64, 128, 256), num_classes=num_classes, **kwargs)


def resnet32x4(num_classes: int, **kwargs) -> CifarResNet:
    """ResNet-32x4, widths 32/64/128/256: a CRD teacher (Tian et al., 2020)."""
    return CifarResNet(depth=32, widths=(32, 64, 128, 256), num_classes=num_classes, **kwargs)
