"""The sharded-teacher tests' models and data, and their two-process worker.

Imported by ``tests/test_sharded_teacher.py`` (which computes the single-device
reference from the same definitions), and run by it as a script in two processes
with four CPU devices each::

    JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=4 \\
        python tests/multihost_sharded_teacher.py PROCESS_ID PORT OUT_DIR

Each process joins ``jax.distributed`` on loopback (gloo collectives), runs
``MULTIHOST_STEPS`` SGD steps for each layout of ``LAYOUTS`` on a 2 x 4
``(data, model)`` mesh, feeding only the batch rows its devices hold, and writes
the gathered student params and metrics to ``OUT_DIR/process_<id>.npz``.
"""

from __future__ import annotations

import functools
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxkd
from jaxkd.lm import shift_tokens
from jaxkd.parallel import _sharding

VOCAB = 16
LENGTH = 6
GLOBAL_BATCH = 8
# Real tokens per row: data shard 0 (rows 0-3) holds 20, data shard 1 holds 3.
ROW_LENGTHS = np.array([6, 5, 6, 3, 1, 0, 0, 2])
TENSOR_PARALLEL = (("vocab", "model"), ("mlp", "model"), ("embed", None))
# Over both axes: a rule per logical name and axis, in priority order ("mlp" takes
# "data" where "model" is taken by "vocab"), so that every kernel is split 8 ways.
FSDP = (("vocab", "model"), ("mlp", "model"), ("embed", "data"), ("mlp", "data"))
MULTIHOST_STEPS = 2
# Two device layouts of the 2 x 4 mesh over two processes of four devices:
# "model_across": each model row takes two devices of each process, so the teacher
#   is sharded across both processes (and each process holds every batch row);
# "data_across": each process is one data row (and feeds half of the batch), with
#   the teacher FSDP-sharded over both axes and the student sharded too.
LAYOUTS = ("model_across", "data_across")


class TokenModel(nn.Module):
    """A causal toy language model: embedding, running mean of the past, MLP head.

    With ``logical=True`` the embedding and every kernel and bias carry Flax logical
    axis names (``vocab``, ``embed``, ``mlp``). Small on purpose: each variant of
    the step is one XLA compile, most of these tests' time.
    """

    embed: int
    mlp: int
    logical: bool = True

    def _init(self, init, names):
        return nn.with_logical_partitioning(init, names) if self.logical else init

    @nn.compact
    def __call__(self, tokens, *, train: bool = False):
        del train
        init = nn.initializers.normal()  # traced for shapes only: see `_initialize`
        x = nn.Embed(VOCAB, self.embed, embedding_init=self._init(init, ("vocab", "embed")))(tokens)
        counts = jnp.arange(1, tokens.shape[-1] + 1, dtype=x.dtype)[None, :, None]
        x = jnp.cumsum(x, axis=-2) / counts

        def dense(features, names):
            kernel_init, bias_init = self._init(init, names), self._init(init, names[1:])
            return nn.Dense(features, kernel_init=kernel_init, bias_init=bias_init)

        hidden = jnp.tanh(dense(self.mlp, ("embed", "mlp"))(x))
        return dense(VOCAB, ("mlp", "vocab"))(hidden)


TEACHER = TokenModel(embed=12, mlp=32)
STUDENT = TokenModel(embed=8, mlp=16, logical=False)


def _initialize(module: nn.Module, seed: int):
    """Variables of ``module`` drawn with NumPy: ``normal / sqrt(fan_in)`` for 2-D leaves.

    The structure (and Flax's logical-axis boxes) come from ``jax.eval_shape``, so
    that nothing is compiled for initialization: a jitted Flax init costs seconds
    of XLA compile on CPU, more than the steps under test.
    """
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, LENGTH), jnp.int32))
    rng = np.random.default_rng(seed)

    def draw(leaf):
        scale = 1.0 / np.sqrt(leaf.shape[0]) if len(leaf.shape) == 2 else 0.5
        return (scale * rng.normal(size=leaf.shape)).astype(leaf.dtype)

    return jax.tree.map(draw, shapes)


@functools.cache
def teacher_variables():
    """The teacher's boxed variables (``nn.LogicallyPartitioned`` leaves), made once."""
    return _initialize(TEACHER, seed=0)


def new_state() -> jaxkd.TrainState:
    params = _initialize(STUDENT, seed=1)["params"]
    return jaxkd.TrainState.create(params=params, optimizer=optax.sgd(0.5))


def make_step(**kwargs):
    """The distillation step: Hinton's objective over the real tokens, plain SGD."""
    return jaxkd.make_train_step(
        jaxkd.linen_apply(STUDENT),
        jaxkd.linen_teacher_apply(TEACHER),
        jaxkd.hinton_objective(alpha=0.6, temperature=2.0, label_key="targets"),
        optax.sgd(0.5),
        input_key="inputs",
        **kwargs,
    )


def global_batch(k: int) -> dict[str, np.ndarray]:
    """Batch ``k``: next-token windows ``[GLOBAL_BATCH, LENGTH]`` with an uneven mask."""
    tokens = np.random.default_rng(k).integers(0, VOCAB, (GLOBAL_BATCH, LENGTH + 1))
    batch = shift_tokens(tokens.astype(np.int32))
    batch["mask"] = np.arange(LENGTH)[None, :] < ROW_LENGTHS[:, None]
    return batch


def mesh_for(layout: str):
    """The 2 x 4 ``(data, model)`` mesh of a layout over all processes' devices."""
    per_process = [
        sorted((d for d in jax.devices() if d.process_index == p), key=lambda d: d.id)
        for p in range(jax.process_count())
    ]
    if layout == "model_across":
        rows = [
            [*per_process[0][0:2], *per_process[1][0:2]],
            [*per_process[0][2:4], *per_process[1][2:4]],
        ]
        return _sharding.model_mesh(model=4, devices=np.array(rows, dtype=object))
    return _sharding.model_mesh(model=4, devices=[d for devices in per_process for d in devices])


def run_layout(layout: str, batches) -> tuple[dict, dict, slice]:
    """``MULTIHOST_STEPS`` steps on this process; gathered params and last metrics."""
    mesh = mesh_for(layout)
    rules = TENSOR_PARALLEL if layout == "model_across" else FSDP
    variables = teacher_variables()
    teacher_shardings = _sharding.logical_shardings(variables, mesh, rules)
    teacher = _sharding.place_teacher(variables, teacher_shardings)
    state = new_state()
    state_shardings = (
        None if layout == "model_across" else _sharding.auto_shardings(state, mesh, min_size=64)
    )
    state = _sharding.place_sharded(
        state, NamedSharding(mesh, P()) if state_shardings is None else state_shardings
    )
    step = _sharding.jit_sharded_step(
        make_step(),
        mesh,
        teacher_shardings=teacher_shardings,
        state_shardings=state_shardings,
    )
    rows = _sharding.local_batch_slice(mesh, GLOBAL_BATCH)
    for batch in batches:
        local = {key: value[rows] for key, value in batch.items()}
        state, metrics = step(state, teacher, _sharding.shard_batch_2d(local, mesh))
    # One program replicates everything (the sharded student's params too); each
    # process then reads its own full copy.
    replicated = jax.jit(lambda tree: tree, out_shardings=NamedSharding(mesh, P()))(
        (state.params, metrics)
    )
    params, metrics = jax.tree.map(lambda leaf: np.asarray(leaf.addressable_data(0)), replicated)
    return params, metrics, rows


def flatten(prefix: str, tree) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {prefix + jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def main(process_id: int, port: int, out_dir: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    assert jax.process_count() == 2 and jax.local_device_count() == 4, jax.devices()
    batches = [global_batch(k) for k in range(MULTIHOST_STEPS)]
    arrays = {}
    for layout in LAYOUTS:
        params, metrics, rows = run_layout(layout, batches)
        arrays.update(flatten(f"{layout}/params", params))
        arrays.update(flatten(f"{layout}/metrics", metrics))
        arrays[f"{layout}/rows"] = np.array(rows.indices(GLOBAL_BATCH)[:2])
    np.savez(f"{out_dir}/process_{process_id}.npz", **arrays)
    print(f"process {process_id}: done", flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
