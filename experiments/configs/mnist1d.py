"""MNIST-1D (Greydanus, 2020): a small CNN teacher distilled into an MLP. Offline.

The CNN (5k params) generalizes far better than the MLP (15k params) on these
shifted, noisy 1D signals, so distillation transfers an inductive bias across
architectures. T=2 and alpha=0.5 come from the grid sweep

    python -m experiments.sweep --config=experiments/configs/mnist1d.py \
        --config.seeds=0 --workdir=/tmp/sweep --temperatures=1,2,4,8 --alphas=0.5,0.9

The README's main experiment:

    python -m experiments.distill --config=experiments/configs/mnist1d.py --workdir=/tmp/kd

``quick`` shrinks the run to seconds (one seed, few steps, fewer samples).
"""

from __future__ import annotations

from experiments.configs.base import finish, get_base_config


def get_config(arg: str | None = None):
    config = get_base_config()
    config.dataset = "mnist1d"
    config.dataset_kwargs = {"num_samples": 12500}  # 10,000 train / 2,500 test
    config.teacher.model = "mnist1d_cnn"
    config.teacher.model_kwargs = {}
    config.teacher.steps = 3000
    config.student.model = "mnist1d_mlp"
    config.student.model_kwargs = {}
    config.steps = 3000
    config.batch_size = 128
    config.distill.temperature = 2.0
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
