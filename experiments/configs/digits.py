"""scikit-learn's 8x8 digits: an MLP teacher, a tiny MLP student. Offline.

    .venv/bin/python -m experiments.distill --config=experiments/configs/digits.py --workdir=/tmp/kd
    .venv/bin/python -m experiments.distill --config=experiments/configs/digits.py:quick \\
        --workdir=/tmp/kd

``quick`` shrinks the run to seconds (one seed, few steps).
"""

from __future__ import annotations

from experiments.configs.base import finish, get_base_config


def get_config(arg: str | None = None):
    config = get_base_config()
    config.dataset = "digits"
    config.teacher.model = "mlp"
    config.teacher.model_kwargs = {"hidden_sizes": (256, 256), "dropout_rate": 0.2}
    config.teacher.steps = 800
    config.student.model = "mlp"
    config.student.model_kwargs = {"hidden_sizes": (8,)}
    config.steps = 800
    config.batch_size = 64
    config.eval_every = 200
    config.checkpoint_every = 200
    quick = dict(teacher__steps=100, steps=100, eval_every=50, log_every=25, checkpoint_every=50)
    return finish(config, arg, **quick)
