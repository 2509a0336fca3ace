"""CIFAR-10: resnet32x4 teacher, resnet8x4 student (the CRD benchmark pair).

Downloaded and prepared by TFDS on first use (needs network and TensorFlow once):

    .venv/bin/python -m experiments.distill --config=experiments/configs/cifar10.py --workdir=DIR

``quick`` shrinks the run to a few steps on tiny batches.
"""

from __future__ import annotations

from experiments.configs.base import TINY_RUN, finish, image_classification_config


def get_config(arg: str | None = None):
    config = image_classification_config(
        "cifar10",
        teacher="resnet32x4",
        student="resnet8x4",
        steps=60000,
        batch_size=64,
        optimizer="sgd",
        learning_rate=0.05,
        weight_decay=5e-4,
    )
    return finish(config, arg, **TINY_RUN)
