"""Teacher, student from scratch and distilled student on one dataset.

    python -m experiments.distill --config=experiments/configs/mnist1d.py --workdir=/tmp/kd
    python -m experiments.distill --config=experiments/configs/digits.py:quick --workdir=/tmp/kd

Config fields can be overridden on the command line, e.g.
``--config.distill.temperature=2 --config.seeds=0,1``. Re-running with the same
workdir resumes unfinished runs from their checkpoints and reuses finished ones.
With ``--distributed`` every process of a multi-host job calls
``jax.distributed.initialize()`` and reads its own shard of each batch.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an experiment config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and results.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (multi-host runs)."
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0; default: from the cluster."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # keep checkpoint chatter off the console
    import jax

    if _DISTRIBUTED.value:
        # Cross-process collectives for CPU devices; no effect on GPU/TPU backends.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
        )
    from experiments import train

    config = _CONFIG.value
    try:
        train.validate_config(config, jax.device_count())
    except ValueError as error:
        print(error, file=sys.stderr)
        sys.exit(2)
    results = train.train_and_evaluate(config, _WORKDIR.value)
    if jax.process_index() == 0:
        with open(os.path.join(_WORKDIR.value, "results.md")) as f:
            print(f.read())
        print(f"Results, metrics and plots in {os.path.abspath(_WORKDIR.value)}")
    return results and None


if __name__ == "__main__":
    app.run(main)
