"""Fashion-MNIST with Hinton et al.'s MLPs (1200-1200 teacher, 800-800 student).

Downloaded and prepared by TFDS on first use (needs network and TensorFlow once):

    .venv/bin/python -m experiments.distill --config=experiments/configs/fashion_mnist.py \\
        --workdir=DIR

``quick`` shrinks the run to a few steps on tiny batches.
"""

from __future__ import annotations

from experiments.configs.base import TINY_RUN, finish, image_classification_config


def get_config(arg: str | None = None):
    config = image_classification_config(
        "fashion_mnist",
        teacher="mlp_1200_1200",
        student="mlp_30_30",
        steps=10000,
        batch_size=128,
        optimizer="adam",
        learning_rate=0.001,
    )
    return finish(config, arg, **TINY_RUN)
