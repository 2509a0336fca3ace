"""MNIST-1D with a dynamic distilled student beside the fixed-T one.

The main MNIST-1D experiment (``mnist1d.py``: T=1, alpha=0.5, chosen on the
validation split) plus a ``distilled_dynamic`` run whose temperature or alpha is set
by a rule while it trains; the argument names the rule:

    .venv/bin/python -m experiments.distill \\
        --config=experiments/configs/mnist1d_dynamic.py:ctkd --workdir=/tmp/jaxkd-runs/mnist1d

- ``ctkd``: a learned temperature, starting at the fixed T=1, in (0.5, 8.5), pushed up
  the KD loss by a gradient reversal that ramps up over the first 1,000 steps (CTKD).
- ``confidence_temperature``: T_i from 1 (an uncertain teacher) to 4 (a confident one).
- ``gap_alpha``: alpha = 0.9 (1 - exp(-KL / 0.5)) of the current teacher-student KL.

Run in the main experiment's workdir, it reuses its teacher, scratch and distilled
runs (they do not depend on ``distill.dynamic``) and trains the dynamic one alone.
Append ``,quick`` to the argument for a seconds-long run.
"""

from __future__ import annotations

from experiments.configs import mnist1d

METHODS = {
    "ctkd": dict(min_temperature=0.5, max_temperature=8.5, curriculum_steps=1000),
    "confidence_temperature": dict(min_temperature=1.0, max_temperature=4.0),
    "gap_alpha": dict(max_alpha=0.9, scale=0.5),
}


def get_config(arg: str | None = None):
    method, _, size = (arg or "").partition(",")
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; use one of {sorted(METHODS)}[,quick].")
    config = mnist1d.get_config(size or None)
    config.student_runs = ("scratch", "distilled", "distilled_dynamic")
    config.distill.dynamic.method = method
    config.distill.dynamic.kwargs = METHODS[method]
    return config
