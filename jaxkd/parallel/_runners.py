"""Data-parallel runners for one step body: ``jax.pmap`` and ``jax.shard_map``.

Both take a step built with an ``axis_name`` (see :func:`jaxkd.make_train_step`),
whose body averages gradients and metrics with ``lax.pmean``. The student state
and the teacher parameters are replicated; the batch is split along its leading
axis.

Under ``jax.shard_map`` with ``check_vma=True`` the gradient with respect to a
replicated input comes back already summed over the data axis (the transpose of
the implicit broadcast), and the ``pmean`` in the body would then scale the update
by the number of devices. :func:`shard_step` therefore maps the body with
``check_vma=False``, which gives it exactly the per-device semantics it has under
``pmap``; the tests hold the pmap, shard_map and single-device updates equal.

On CPU devices (``--xla_force_host_platform_device_count``), XLA:CPU runs each
device's program on a shared thread pool and meets at every all-reduce in a
rendezvous; a loop that dispatches hundreds of steps without waiting can exhaust
the client's in-flight executions while some device's program has not started,
and the rendezvous then aborts the process ("not all of them arrived on time").
Both runners therefore keep at most ``max_in_flight`` steps outstanding on CPU,
waiting for the oldest step's outputs before returning from a new one; on GPU and
TPU they never wait.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

PyTree = Any


def _check_axis_name(step: Callable, axis_name: str) -> None:
    step_axis = getattr(step, "axis_name", axis_name)
    if step_axis != axis_name:
        raise ValueError(
            f"The step was built with axis_name={step_axis!r} but is mapped over "
            f"axis {axis_name!r}: pass the same name to make_train_step."
        )


def _bounded_in_flight(fn: Callable, devices, max_in_flight: int | None) -> Callable:
    """``fn`` that waits for the call ``max_in_flight`` calls back before returning.

    Only on CPU devices with more than one device (see the module docstring);
    elsewhere, or with ``max_in_flight=None``, ``fn`` itself. Outputs donated to a
    later call are skipped: that call's own outputs are waited for in their turn.
    """
    devices = list(devices)
    if max_in_flight is None or len(devices) < 2 or devices[0].platform != "cpu":
        return fn
    if max_in_flight < 1:
        raise ValueError(f"`max_in_flight` must be >= 1 or None, got {max_in_flight}.")
    pending: collections.deque = collections.deque()

    @functools.wraps(fn)
    def run(*args, **kwargs):
        outputs = fn(*args, **kwargs)
        pending.append(jax.tree.leaves(outputs))
        if len(pending) > max_in_flight:
            jax.block_until_ready([leaf for leaf in pending.popleft() if not leaf.is_deleted()])
        return outputs

    if hasattr(fn, "lower"):
        run.lower = fn.lower  # ahead-of-time compilation, unthrottled
    return run


def data_mesh(devices=None, axis_name: str = "data") -> Mesh:
    """A one-dimensional mesh over ``devices`` (default: all devices)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (axis_name,))


def pmap_step(
    step: Callable,
    *,
    axis_name: str = "batch",
    donate: bool = True,
    devices=None,
    max_in_flight: int | None = 2,
) -> Callable:
    """Runs ``step(state, teacher_params, batch)`` with ``jax.pmap``.

    Args:
      step: a step built with ``axis_name`` (train or eval).
      axis_name: the pmap axis name.
      donate: donate the (replicated) student state, argument 0.
      devices: local devices to map over (default: all local devices).
      max_in_flight: on CPU devices, the most steps left running when a call
        returns (see the module docstring); ``None`` never waits.

    Returns:
      A function taking a replicated state (:func:`replicate`), replicated teacher
      params and a batch shaped ``[local_devices, per_device_batch, ...]``
      (:func:`split_for_pmap`); its outputs carry the same leading device axis.
    """
    _check_axis_name(step, axis_name)
    mapped = jax.pmap(
        step, axis_name=axis_name, devices=devices, donate_argnums=(0,) if donate else ()
    )
    return _bounded_in_flight(
        mapped, jax.local_devices() if devices is None else devices, max_in_flight
    )


def shard_step(
    step: Callable,
    mesh: Mesh,
    *,
    axis_name: str | None = None,
    donate: bool = True,
    max_in_flight: int | None = 2,
) -> Callable:
    """Runs ``step(state, teacher_params, batch)`` with ``jax.shard_map`` in ``jax.jit``.

    Args:
      step: a step built with ``axis_name`` (train or eval).
      mesh: a mesh whose ``axis_name`` axis splits the batch (:func:`data_mesh`).
      axis_name: the mesh axis; defaults to the mesh's only axis.
      donate: donate the student state, argument 0.
      max_in_flight: on CPU devices, the most steps left running when a call
        returns (see the module docstring); ``None`` never waits.

    Returns:
      A jitted function of global arrays: state and teacher params replicated
      (:func:`replicate_on_mesh`), the batch sharded along its leading axis
      (:func:`shard_batch`). Outputs are replicated. Its ``lower`` gives the
      jitted function's ahead-of-time lowering.
    """
    if axis_name is None:
        if len(mesh.axis_names) != 1:
            raise ValueError(f"Name the data axis: the mesh has axes {mesh.axis_names}.")
        axis_name = mesh.axis_names[0]
    if axis_name not in mesh.axis_names:
        raise ValueError(f"`axis_name`={axis_name!r} is not an axis of the mesh {mesh.axis_names}.")
    _check_axis_name(step, axis_name)
    mapped = jax.shard_map(
        step,
        mesh=mesh,
        in_specs=(P(), P(), P(axis_name)),
        out_specs=P(),
        check_vma=False,
    )
    jitted = jax.jit(mapped, donate_argnums=(0,) if donate else ())
    return _bounded_in_flight(jitted, mesh.devices.flat, max_in_flight)


def _check_divisible(batch: Mapping[str, Any], parts: int, what: str) -> None:
    for key, value in batch.items():
        size = np.shape(value)[0]
        if size % parts:
            raise ValueError(
                f"Batch entry {key!r} has {size} examples, not divisible by {parts} {what}."
            )


def replicate(tree: PyTree, devices=None) -> PyTree:
    """Copies every leaf to each local device, with a leading device axis (pmap)."""
    devices = jax.local_devices() if devices is None else list(devices)
    sharding = NamedSharding(data_mesh(devices, "devices"), P("devices"))

    def put(leaf):
        leaf = jnp.asarray(leaf)
        return jax.device_put(jnp.broadcast_to(leaf, (len(devices), *leaf.shape)), sharding)

    return jax.tree.map(put, tree)


def unreplicate(tree: PyTree) -> PyTree:
    """The first device's copy of a replicated (pmap) tree."""
    return jax.tree.map(lambda leaf: leaf[0], tree)


def split_for_pmap(batch: Mapping[str, Any], num_devices: int | None = None) -> dict:
    """Reshapes each ``[B, ...]`` entry to ``[num_devices, B // num_devices, ...]``."""
    num_devices = jax.local_device_count() if num_devices is None else num_devices
    _check_divisible(batch, num_devices, "devices")
    return {
        key: np.reshape(value, (num_devices, -1, *np.shape(value)[1:]))
        for key, value in batch.items()
    }


def replicate_on_mesh(tree: PyTree, mesh: Mesh) -> PyTree:
    """Places every leaf, whole, on every device of ``mesh`` (for shard_step).

    Works on one host and across processes: each process passes the same values.
    """
    sharding = NamedSharding(mesh, P())

    def put(leaf):
        if jax.dtypes.issubdtype(jnp.result_type(leaf), jax.dtypes.prng_key):
            data = put(jax.random.key_data(leaf))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
        return jax.make_array_from_process_local_data(sharding, np.asarray(leaf))

    return jax.tree.map(put, tree)


def shard_batch(batch: Mapping[str, Any], mesh: Mesh, axis_name: str | None = None) -> dict:
    """Global arrays sharded along the leading axis, from this process's batch.

    Each process passes its own slice of the global batch; on one host that is the
    whole batch. The leading size must divide evenly over the process's devices.
    """
    axis_name = mesh.axis_names[0] if axis_name is None else axis_name
    sharding = NamedSharding(mesh, P(axis_name))
    _check_divisible(batch, len(mesh.local_devices), "devices of this process")
    return {
        key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for key, value in batch.items()
    }
