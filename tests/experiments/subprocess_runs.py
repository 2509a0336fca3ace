"""Running ``python -m experiments.distill`` in subprocesses, and reading its results."""

from __future__ import annotations

import os
import socket
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A short digits run without dropout, so that data-parallel runs are comparable
# with single-device ones (dropout masks depend on the device layout). Plain SGD:
# its update is proportional to the gradient, so a gradient off by a factor (say,
# the process count) changes the params by as much, where Adam would hide it.
SHORT_RUN = (
    "--config=experiments/configs/digits.py:quick",
    "--config.steps=30",
    "--config.teacher.steps=30",
    "--config.teacher.model_kwargs.dropout_rate=0.0",
    "--config.optimizer=sgd",
    "--config.momentum=0",
    "--config.learning_rate=0.2",
    "--config.teacher.learning_rate=0.2",
    "--config.checkpoint_every=5",
    "--config.eval_every=15",
    "--config.log_every=5",
)


def command(workdir, *extra) -> list[str]:
    return [sys.executable, "-m", "experiments.distill", *SHORT_RUN, f"--workdir={workdir}", *extra]


def environment(data_dir: str, devices: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["TFDS_DATA_DIR"] = data_dir
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def final_params(workdir, run: str, seed: int = 0):
    """The student params of a run's newest checkpoint, as numpy arrays.

    Read as host arrays, whatever devices or processes wrote the checkpoint.
    """
    directory = os.path.join(workdir, f"seed_{seed}", run, "checkpoints")
    manager = ocp.CheckpointManager(directory)
    path = os.path.join(directory, str(manager.latest_step()), "state")
    manager.close()
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(path).item_metadata.tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    return restored["params"]
