"""MNIST-1D (Greydanus, 2020): a small CNN teacher distilled into an MLP. Offline.

The CNN (5k params) generalizes far better than the MLP (15k params) on these
shifted, noisy 1D signals, so distillation transfers an inductive bias across
architectures. T=1 and alpha=0.5 come from the grid sweep, chosen on the validation
split (a seeded 10% of the training split; the test split plays no part):

    .venv/bin/python -m experiments.sweep --config=experiments/configs/mnist1d.py \\
        --config.seeds=0 --workdir=/tmp/jaxkd-runs/sweep --temperatures=1,2,4,8 \\
        --alphas=0.5,0.9 --select_on=validation

Its best validation accuracy (0.756, seed 0) led the next trials (T=1, alpha=0.9 and
T=4, alpha=0.5, both 0.744) by 0.012 on 1,000 validation examples: a weak preference.

The README's main experiment:

    .venv/bin/python -m experiments.distill --config=experiments/configs/mnist1d.py \\
        --workdir=/tmp/jaxkd-runs/mnist1d

``quick`` shrinks the run to seconds (one seed, few steps, fewer samples).
"""

from __future__ import annotations

from experiments.configs.base import finish, get_base_config


def get_config(arg: str | None = None):
    config = get_base_config()
    config.dataset = "mnist1d"
    config.dataset_kwargs = {"num_samples": 12500}  # 9,000 train / 1,000 validation / 2,500 test
    config.teacher.model = "mnist1d_cnn"
    config.teacher.model_kwargs = {}
    config.teacher.steps = 3000
    config.student.model = "mnist1d_mlp"
    config.student.model_kwargs = {}
    config.steps = 3000
    config.batch_size = 128
    config.distill.temperature = 1.0  # chosen on the validation split: see above
    config.distill.alpha = 0.5
    config.eval_every = 500
    config.checkpoint_every = 500
    config.log_every = 100
    quick = dict(
        dataset_kwargs={"num_samples": 2000},
        teacher__steps=60,
        steps=60,
        eval_every=30,
        log_every=20,
        checkpoint_every=30,
    )
    return finish(config, arg, **quick)
