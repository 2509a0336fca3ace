"""Building blocks shared by the reference models: dtypes, initializers, input shaping."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
"""A JAX dtype such as ``jnp.float32`` or ``jnp.bfloat16``."""

# He et al. (2015) "Delving Deep into Rectifiers" normal init, fan-out mode: the
# initialization used by the CIFAR ResNet and MobileNetV2 reference implementations.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def batch_norm(*, train: bool, dtype: Dtype, name: str | None = None) -> nn.BatchNorm:
    """BatchNorm with the PyTorch defaults used by the papers' code.

    Flax's ``momentum`` is the decay of the running average, so PyTorch's
    ``momentum=0.1`` is ``0.9`` here; ``epsilon=1e-5`` as in PyTorch. Running
    statistics live in the ``batch_stats`` collection and are used when
    ``train`` is False. Statistics are computed in float32 even for bfloat16
    inputs (Flax promotes them).
    """
    return nn.BatchNorm(
        use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, name=name
    )


def conv(
    features: int,
    kernel_size: int,
    *,
    strides: int = 1,
    groups: int = 1,
    dtype: Dtype,
    name: str | None = None,
) -> nn.Conv:
    """A bias-free square 2D convolution with PyTorch-style symmetric padding.

    The padding is ``(kernel_size - 1) // 2`` on every side (PyTorch's
    ``padding=k // 2``), not ``"SAME"``, which pads asymmetrically for stride 2.
    """
    pad = (kernel_size - 1) // 2
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=(strides, strides),
        padding=((pad, pad), (pad, pad)),
        feature_group_count=groups,
        use_bias=False,
        dtype=dtype,
        kernel_init=conv_kernel_init,
        name=name,
    )


def as_images(x: jax.Array, dtype: Dtype) -> jax.Array:
    """Casts images to ``dtype`` and adds a channel axis to grayscale input.

    Args:
      x: images, [B, H, W, C] or [B, H, W] (one channel).
      dtype: the computation dtype.

    Returns:
      [B, H, W, C] array of ``dtype``.
    """
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise ValueError(f"expected images [B, H, W, C] or [B, H, W], got shape {x.shape}")
    return jnp.asarray(x, dtype)
