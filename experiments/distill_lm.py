"""Language-model distillation on Python's own source: teacher, scratch, KD, GKD.

    .venv/bin/python -m experiments.distill_lm --config=experiments/configs/lm_stdlib.py \\
        --workdir=/tmp/jaxkd-runs/lm
    .venv/bin/python -m experiments.distill_lm \\
        --config=experiments/configs/lm_stdlib.py:quick --workdir=/tmp/jaxkd-runs/lm-quick

The flags are those of :mod:`experiments.distill` (``--overwrite``,
``--distributed``, config overrides such as ``--config.gkd.lmbda=1``); the runs,
their resumption and the report are described in :mod:`experiments.lm_train`.
"""

from __future__ import annotations

from absl import app

from experiments import distill


def main(argv):
    return distill.main(argv, runner="experiments.lm_train")


if __name__ == "__main__":
    app.run(main)
