"""Reference models by name: ``get_model(name, num_classes, **kwargs)``.

- ``mlp``: ``MLP(hidden_sizes=...)``, ``hidden_sizes`` required; any input, flattened.
- ``mlp_1200_1200``: Hinton et al. (2015) MNIST teacher 784-1200-1200-10, dropout 0.5
  on hidden units and 0.2 on the input; MNIST [B, 28, 28, 1].
- ``mlp_800_800``: Hinton et al. (2015) student 784-800-800-10, no dropout.
- ``mlp_30_30``: Hinton et al. (2015) small student 784-30-30-10.
- ``mnist1d_cnn``: MNIST-1D CNN, 3 conv layers of 25 channels (5,210 params for 10
  classes); [B, 40] or [B, 40, 1].
- ``mnist1d_mlp``: MNIST-1D MLP 40-100-100-10 (15,210 params); [B, 40].
- ``resnet20``, ``resnet56``: CIFAR ResNets, widths 16/16/32/64; [B, 32, 32, 3].
- ``resnet8x4``, ``resnet32x4``: CRD ResNets, widths 32/64/128/256; [B, 32, 32, 3].
- ``wrn_40_2``, ``wrn_16_2``: CRD wide ResNets (pre-activation), widths 32/64/128;
  [B, 32, 32, 3].
- ``mobilenet_small``: MobileNetV2 with width multiplier 0.5 and small-image strides;
  [B, H, W, C] (32x32 and other small images).

Keyword arguments go to the model's constructor and override the preset
(e.g. ``dtype=jnp.bfloat16``, ``dropout_rate=0.1``, ``width_multiplier=0.75``).

``FEATURE_LAYERS[name]`` gives, for the CIFAR models, the paths of the intermediate
values that feature and relational distillation methods compare, for
``jaxkd.linen_apply(model, features=...)`` (module paths: the output of that
submodule is taken; the model itself is unchanged):

- ``stage1`` ... ``stage3`` (``stage4`` for MobileNetV2): the last feature map of
  each stage, [B, H, W, C], numbered as in the feature lists of CRD's code
  (``feat[1]`` ... ``feat[-2]``): after each ResNet stage's last ReLU, the sum of
  each WRN group's last (pre-activation) block, the last MobileNetV2 block of each
  resolution;
- ``pooled``: the globally averaged embedding before the classifier, [B, C]
  (CRD's ``feat[-1]``).
"""

from collections.abc import Callable

import flax.linen as nn

from experiments.models.mlp import MLP
from experiments.models.mnist1d import Mnist1DCNN
from experiments.models.mobilenet import MobileNetV2
from experiments.models.resnet import resnet8x4, resnet20, resnet32x4, resnet56
from experiments.models.wrn import wrn_16_2, wrn_40_2

ModelFactory = Callable[..., nn.Module]


def _mlp(num_classes: int, **kwargs) -> MLP:
    if "hidden_sizes" not in kwargs:
        raise ValueError(
            "model 'mlp' needs hidden_sizes, e.g. get_model('mlp', 10, hidden_sizes=(64,))"
        )
    hidden_sizes = tuple(kwargs.pop("hidden_sizes"))  # a tuple keeps the module hashable
    return MLP(hidden_sizes=hidden_sizes, num_classes=num_classes, **kwargs)


def _mlp_preset(hidden_sizes: tuple[int, ...], **preset) -> ModelFactory:
    def factory(num_classes: int, **kwargs) -> MLP:
        return MLP(**{"hidden_sizes": hidden_sizes, **preset, **kwargs}, num_classes=num_classes)

    return factory


def _mobilenet_small(num_classes: int, **kwargs) -> MobileNetV2:
    return MobileNetV2(num_classes=num_classes, **{"width_multiplier": 0.5, **kwargs})


_FACTORIES: dict[str, ModelFactory] = {
    "mlp": _mlp,
    "mlp_1200_1200": _mlp_preset((1200, 1200), dropout_rate=0.5, input_dropout_rate=0.2),
    "mlp_800_800": _mlp_preset((800, 800)),
    "mlp_30_30": _mlp_preset((30, 30)),
    "mnist1d_cnn": lambda num_classes, **kwargs: Mnist1DCNN(num_classes=num_classes, **kwargs),
    "mnist1d_mlp": _mlp_preset((100, 100)),
    "resnet20": resnet20,
    "resnet56": resnet56,
    "resnet8x4": resnet8x4,
    "resnet32x4": resnet32x4,
    "wrn_40_2": wrn_40_2,
    "wrn_16_2": wrn_16_2,
    "mobilenet_small": _mobilenet_small,
}

MODEL_NAMES: tuple[str, ...] = tuple(_FACTORIES)
"""Every name ``get_model`` accepts."""


def _stage_paths(blocks_per_stage: tuple[int, ...], **named: str) -> dict[str, str]:
    """``{"stage1": "stage0_block{n0 - 1}", ...}`` (the last block of each stage), then
    ``named`` (such as ``pooled``)."""
    paths = {
        f"stage{stage + 1}": f"stage{stage}_block{blocks - 1}"
        for stage, blocks in enumerate(blocks_per_stage)
    }
    return {**paths, **named}


FEATURE_LAYERS: dict[str, dict[str, str]] = {
    # CifarResNet: (depth - 2) / 6 blocks per stage.
    "resnet20": _stage_paths((3, 3, 3), pooled="pooled"),
    "resnet56": _stage_paths((9, 9, 9), pooled="pooled"),
    "resnet8x4": _stage_paths((1, 1, 1), pooled="pooled"),
    "resnet32x4": _stage_paths((5, 5, 5), pooled="pooled"),
    # WideResNet: (depth - 4) / 6 blocks per group.
    "wrn_40_2": _stage_paths((6, 6, 6), pooled="pooled"),
    "wrn_16_2": _stage_paths((2, 2, 2), pooled="pooled"),
    # MobileNetV2 (SMALL_IMAGE_STAGES): the last block at each resolution, 32x32
    # (stages 0-1), 16x16 (stage 2), 8x8 (stages 3-4) and 4x4 (stages 5-6).
    "mobilenet_small": {
        "stage1": "stage1_block1",
        "stage2": "stage2_block2",
        "stage3": "stage4_block2",
        "stage4": "stage6_block0",
        "pooled": "pooled",
    },
}
"""Feature paths by model name, then by feature name (see the module docstring)."""


def get_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Builds a reference model by name.

    Args:
      name: one of ``MODEL_NAMES`` (see the module docstring for what each is).
      num_classes: number of output logits.
      **kwargs: constructor arguments overriding the preset, e.g. ``dtype``.

    Returns:
      A linen module called as ``model(x, train=...)`` returning float32 logits
      [B, num_classes].

    Raises:
      ValueError: for an unknown name (the message lists the known names).
    """
    if name not in _FACTORIES:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}")
    return _FACTORIES[name](num_classes, **kwargs)
