"""MNIST-1D with function matching: consistent views, pure distillation, a long schedule.

Beyer et al. (2022) distill best when the teacher and the student see the same
augmented view of every example ("consistent") and the student trains for long:
the student then matches the teacher's function on many more inputs than the
training set holds. Here the views are random shifts of at most 4 of the 40
samples (zero padding, :mod:`experiments.data.augment`), the same for the teacher
forward and the student in every step; the distillation loss alone
(``distill.alpha = 1``, no labels); and 4x the steps of ``mnist1d.py``. The
teacher and the scratch student train on the labels with the same shifts.

    .venv/bin/python -m experiments.distill \\
        --config=experiments/configs/mnist1d_function_matching.py \\
        --workdir=/tmp/jaxkd-runs/mnist1d_function_matching

The inconsistent contrast (the teacher sees its own, independent shift) is
``--config.augment.consistent=False`` (the distilled run's step then reads the
teacher's inputs from ``teacher_image``). ``quick`` shrinks the run to seconds.

Reference:
  Knowledge distillation: A good teacher is patient and consistent. Lucas Beyer,
  Xiaohua Zhai, Amelie Royer, Larisa Markeeva, Rohan Anil, Alexander Kolesnikov.
  CVPR 2022. https://arxiv.org/abs/2106.05237
"""

from __future__ import annotations

import ml_collections

from experiments.configs import mnist1d
from experiments.configs.base import finish


def get_config(arg: str | None = None):
    config = mnist1d.get_config()  # the dataset, models and teacher of mnist1d.py
    # Function matching: pure distillation on consistent, shifted views, for long.
    config.distill.loss = "kl"
    config.distill.alpha = 1.0
    config.distill.temperature = 1.0
    if config.get("augment") is None:  # until base.py has the augment fields
        config.augment = ml_collections.ConfigDict()
    config.augment.crop_padding = 4  # shifts of at most 4 of the 40 samples
    config.augment.padding_mode = "zero"  # the signals are standardized: 0 is their mean
    config.augment.flip = False  # 1-D signals are never flipped
    config.augment.mixup_alpha = 0.0
    config.augment.consistent = True
    config.steps = 12000  # 4x mnist1d.py's 3000
    config.eval_every = 2000
    config.checkpoint_every = 2000
    config.log_every = 200
    quick = dict(
        dataset_kwargs={"num_samples": 2000},
        teacher__steps=60,
        steps=120,
        eval_every=60,
        log_every=20,
        checkpoint_every=60,
    )
    return finish(config, arg, **quick)
