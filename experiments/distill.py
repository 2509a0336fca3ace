"""Teacher, student from scratch and distilled student on one dataset.

    .venv/bin/python -m experiments.distill --config=experiments/configs/mnist1d.py \\
        --workdir=/tmp/kd
    .venv/bin/python -m experiments.distill --config=experiments/configs/digits.py:quick \\
        --workdir=/tmp/kd

Config fields can be overridden on the command line, e.g.
``--config.distill.temperature=2 --config.seeds=0,1``. Re-running with the same
workdir resumes unfinished runs from their checkpoints and reuses finished ones;
a run made with other values of the fields it depends on is refused (exit status
2, naming the fields) unless ``--overwrite`` deletes it and trains it again.
Ctrl-C stops at the next step with a checkpoint (exit status 130): the same
command resumes. With ``--distributed`` every process of a multi-host job calls
``jax.distributed.initialize()`` and reads its own shard of each batch.
"""

from __future__ import annotations

import os

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
_OVERWRITE = flags.DEFINE_bool(
    "overwrite",
    False,
    "Delete and train again the workdir's runs made with other values of the config "
    "fields they depend on (without it, such runs stop the command with an error).",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv, runner: str = "experiments.train"):
    """Runs ``runner.train_and_evaluate`` on the flags' config and workdir."""
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
    import importlib

    from experiments.errors import run_command

    train = importlib.import_module(runner)
    results = run_command(
        train.train_and_evaluate, _CONFIG.value, _WORKDIR.value, overwrite=_OVERWRITE.value
    )
    if jax.process_index() == 0:
        with open(os.path.join(_WORKDIR.value, "results.md")) as f:
            print(f.read())
        print(f"Results, metrics and plots in {os.path.abspath(_WORKDIR.value)}")
    return results and None


if __name__ == "__main__":
    app.run(main)
