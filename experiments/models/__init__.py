"""Reference models for the distillation experiments (Flax linen).

Every model is called as ``model(x, train=...)`` and returns float32 logits
[B, num_classes]; an optional ``dtype`` attribute sets the computation dtype
(params stay float32). BatchNorm models keep running statistics in the
``batch_stats`` collection; dropout uses the ``dropout`` rng.

    model = get_model("resnet8x4", num_classes=100)
    params, model_state = init_model(model, jax.random.key(0), jnp.zeros((2, 32, 32, 3)))
    apply = make_apply(model)
    logits, model_state = apply(params, model_state, images, train=True, rng=dropout_key)
"""

from experiments.models.autoencoder import Autoencoder
from experiments.models.functional import (
    ApplyFn,
    ModelState,
    Params,
    init_model,
    make_apply,
    param_count,
)
from experiments.models.mlp import MLP
from experiments.models.mnist1d import Mnist1DCNN
from experiments.models.mobilenet import InvertedResidual, MobileNetV2
from experiments.models.registry import FEATURE_LAYERS, MODEL_NAMES, get_model
from experiments.models.resnet import (
    BasicBlock,
    CifarResNet,
    resnet8x4,
    resnet20,
    resnet32x4,
    resnet56,
)
from experiments.models.wrn import PreActBlock, WideResNet, wrn_16_2, wrn_40_2

__all__ = [
    "Autoencoder",
    "FEATURE_LAYERS",
    "MLP",
    "MODEL_NAMES",
    "ApplyFn",
    "BasicBlock",
    "CifarResNet",
    "InvertedResidual",
    "Mnist1DCNN",
    "MobileNetV2",
    "ModelState",
    "Params",
    "PreActBlock",
    "WideResNet",
    "get_model",
    "init_model",
    "make_apply",
    "param_count",
    "resnet8x4",
    "resnet20",
    "resnet32x4",
    "resnet56",
    "wrn_16_2",
    "wrn_40_2",
]
