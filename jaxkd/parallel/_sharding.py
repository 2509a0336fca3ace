"""A frozen teacher sharded over a 2-D ``(data, model)`` mesh, run by plain ``jax.jit``.

The step of :func:`jaxkd.make_train_step` built with ``axis_name=None`` is a function
of global arrays; ``jax.jit`` partitions it from the shardings of its arguments
(GSPMD), so the same step body runs a teacher too large for one device:

1. :func:`model_mesh` builds the mesh, e.g. 2 x 4 devices named ``("data", "model")``.
2. :func:`logical_shardings` reads the Flax logical axis names that the teacher's
   layers declare (``nn.with_logical_partitioning``) and maps them to mesh axes with a
   table of rules; :func:`auto_shardings` shards models without annotations by shape.
3. :func:`place_teacher` puts the teacher's variables on the mesh once (optionally in
   bfloat16); they enter every step as an argument and are neither differentiated,
   updated nor returned.
4. :func:`shard_batch_2d` splits each batch over ``data`` (replicated over ``model``);
   :func:`jit_sharded_step` jits the step with those shardings, the student state
   staying where it is (replicated, or sharded by the same helpers).

Tensor parallelism is a rule such as ``("mlp", "model")``; FSDP-style (ZeRO-3)
sharding adds rules onto the ``data`` axis, e.g. ``("embed", "data")``: the teacher
is then stored split over every device, and GSPMD gathers what each layer needs
inside the step.

Everything here works across processes: each process passes the same host values
for the teacher and the state, and its own rows of the batch
(:func:`local_batch_slice`). In outline::

    mesh = model_mesh(data=2, model=4)
    rules = (("vocab", "model"), ("mlp", "model"), ("embed", None))
    teacher_shardings = logical_shardings(teacher_variables, mesh, rules)
    teacher = place_teacher(teacher_variables, teacher_shardings, dtype=jnp.bfloat16)
    state_shardings = NamedSharding(mesh, P())  # or auto_shardings(state, mesh)
    state = place_sharded(state, state_shardings)
    step = jit_sharded_step(
        jaxkd.make_train_step(..., axis_name=None),
        mesh,
        teacher_shardings=teacher_shardings,
        state_shardings=state_shardings,  # the same: a sharded state needs them here
    )
    rows = local_batch_slice(mesh, global_batch_size)
    for batch in global_batches:
        local = {key: value[rows] for key, value in batch.items()}
        state, metrics = step(state, teacher, shard_batch_2d(local, mesh))

References:
  Xu et al., "GSPMD: General and Scalable Parallelization for ML Computation
  Graphs", 2021. https://arxiv.org/abs/2105.04663

  Shoeybi et al., "Megatron-LM: Training Multi-Billion Parameter Language Models
  Using Model Parallelism", 2019. https://arxiv.org/abs/1909.08053

  Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion
  Parameter Models", 2019. https://arxiv.org/abs/1910.02054
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax.core import meta
from jax.sharding import Mesh, NamedSharding, Sharding
from jax.sharding import PartitionSpec as P

from jaxkd.parallel._runners import _bounded_in_flight

PyTree = Any
LogicalRules = Sequence[tuple[str, str | tuple[str, ...] | None]]


def model_mesh(
    *,
    data: int | None = None,
    model: int = 1,
    devices=None,
    axis_names: tuple[str, str] = ("data", "model"),
) -> Mesh:
    """A 2-D ``(data, model)`` mesh.

    Args:
      data: size of the data axis; default ``len(devices) // model``.
      model: size of the model axis.
      devices: the devices, default ``jax.devices()``: a flat sequence, laid out
        row-major (consecutive devices share a data row, so with the default order
        the model axis stays within a process while it fits there), or an array of
        shape ``[data, model]`` used as given (e.g. to spread the model axis across
        processes).
      axis_names: the names of the two axes.

    Returns:
      ``Mesh(devices.reshape(data, model), axis_names)``.
    """
    devices = np.asarray(jax.devices() if devices is None else devices, dtype=object)
    if len(axis_names) != 2 or len(set(axis_names)) != 2:
        raise ValueError(f"`axis_names` must be two distinct names, got {axis_names!r}.")
    if not isinstance(model, int | np.integer) or model < 1:
        raise ValueError(f"`model` must be a positive int, got {model!r}.")
    if devices.ndim == 2:
        data = devices.shape[0] if data is None else data
        if devices.shape != (data, model):
            raise ValueError(
                f"`devices` has shape {devices.shape}, but `data`={data} and `model`={model}."
            )
    elif devices.ndim != 1:
        raise ValueError(f"`devices` must be flat or [data, model], got shape {devices.shape}.")
    count = devices.size
    if data is None:
        if count % model:
            raise ValueError(f"`model`={model} does not divide the {count} devices.")
        data = count // model
    if data * model != count:
        raise ValueError(
            f"A mesh of `data`={data} x `model`={model} needs {data * model} devices; got {count}."
        )
    return Mesh(devices.reshape(data, model), tuple(axis_names))


def _axes_of(entry) -> tuple[str, ...]:
    """Mesh axis names in one entry of a PartitionSpec (None, a name or a tuple)."""
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple | list) else (entry,)


def _check_spec(where: str, shape: tuple[int, ...], mesh: Mesh, spec: P) -> None:
    """Raises ``ValueError`` unless ``spec`` fits an array of ``shape`` on ``mesh``."""
    if len(spec) > len(shape):
        raise ValueError(f"{where}: spec {spec} has more entries than the shape {shape}.")
    for dim, entry in enumerate(spec):
        axes = _axes_of(entry)
        unknown = [a for a in axes if a not in mesh.shape]
        if unknown:
            raise ValueError(
                f"{where}: spec {spec} names mesh axes {unknown}; the mesh has {dict(mesh.shape)}."
            )
        parts = math.prod(mesh.shape[a] for a in axes)
        if shape[dim] % parts:
            raise ValueError(
                f"{where}: dimension {dim} of shape {shape} has size {shape[dim]}, not "
                f"divisible by the {parts} shards of {spec} on mesh {dict(mesh.shape)}."
            )


def _is_box(x) -> bool:
    return isinstance(x, meta.AxisMetadata)


def _spec_of_box(box, rules: LogicalRules) -> P:
    if isinstance(box, nn.LogicallyPartitioned):
        return nn.logical_to_mesh_axes(box.names, rules)
    if hasattr(box, "get_partition_spec"):  # nn.Partitioned: names are mesh axes
        return box.get_partition_spec()
    return P()


def logical_shardings(variables: PyTree, mesh: Mesh, rules: LogicalRules) -> PyTree:
    """Shardings from the Flax logical axis names in ``variables``.

    Leaves boxed by ``nn.with_logical_partitioning`` (``nn.LogicallyPartitioned``)
    have their logical names mapped to mesh axes by ``rules`` (in order of
    precedence, as ``flax.linen.logical_to_mesh_axes`` does; a name without a rule
    is replicated); leaves boxed by ``nn.with_partitioning`` name mesh axes directly;
    unboxed leaves are replicated.

    Args:
      variables: a linen variables dict from ``module.init``, boxed or not.
      mesh: the mesh (:func:`model_mesh`).
      rules: ``((logical_name, mesh_axis or None or a tuple of axes), ...)``, e.g.
        ``(("vocab", "model"), ("mlp", "model"), ("embed", None))``.

    Returns:
      A pytree of ``NamedSharding`` with the structure of ``meta.unbox(variables)``.

    Raises:
      ValueError: a rule names an axis not in ``mesh``, or a sharded dimension is not
        divisible by the number of its shards (naming the leaf, shape and spec).
    """
    if not isinstance(rules, tuple | list) or any(
        not isinstance(rule, tuple | list) or len(rule) != 2 for rule in rules
    ):
        raise TypeError(f"`rules` must be a sequence of (logical_name, mesh_axes), got {rules!r}.")

    def sharding(path, leaf):
        spec = _spec_of_box(leaf, rules) if _is_box(leaf) else P()
        value = getattr(leaf, "value", leaf)
        _check_spec(f"Leaf {jax.tree_util.keystr(path)}", np.shape(value), mesh, spec)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(sharding, variables, is_leaf=_is_box)


def auto_shardings(
    variables: PyTree,
    mesh: Mesh,
    *,
    axis: str | tuple[str, ...] = "model",
    min_size: int = 2**14,
) -> PyTree:
    """Shardings for a model without annotations, by shape alone.

    The rule, leaf by leaf: a leaf with fewer than ``min_size`` elements (biases,
    norm scales, scalars, PRNG keys) is replicated; otherwise its largest dimension
    divisible by the size ``n`` of ``axis`` is split over ``axis`` (on ties, the last
    such dimension, e.g. the output features of a square kernel); a leaf with no
    such dimension is replicated. Applied to a whole ``TrainState``, it shards the
    params and any optimizer state of the same shapes alike.

    Args:
      variables: a pytree of arrays (linen boxes are unboxed first).
      mesh: the mesh.
      axis: the mesh axis to shard over, or a tuple of axes (sharded jointly).
      min_size: the smallest leaf, in elements, worth sharding.

    Returns:
      A pytree of ``NamedSharding`` with the structure of ``meta.unbox(variables)``.
    """
    axes = _axes_of(axis)
    if not axes or any(a not in mesh.shape for a in axes):
        raise ValueError(f"`axis`={axis!r} must name axes of the mesh {dict(mesh.shape)}.")
    parts = math.prod(mesh.shape[a] for a in axes)
    entry = axes[0] if len(axes) == 1 else axes

    def sharding(leaf):
        shape = np.shape(leaf)
        dims = [d for d, size in enumerate(shape) if size % parts == 0]
        if parts == 1 or math.prod(shape) < min_size or _is_key(leaf) or not dims:
            return NamedSharding(mesh, P())
        dim = max(dims, key=lambda d: (shape[d], d))
        return NamedSharding(mesh, P(*([None] * dim), entry))

    return jax.tree.map(sharding, meta.unbox(variables))


def _is_key(leaf) -> bool:
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _match_shardings(tree: PyTree, shardings) -> list:
    """The shardings as a flat list matching ``tree``'s leaves; a single one is repeated."""
    leaves = jax.tree.leaves(tree)
    if isinstance(shardings, Sharding):
        return [shardings] * len(leaves)
    flat, structure = jax.tree.flatten(shardings, is_leaf=lambda x: isinstance(x, Sharding))
    if structure != jax.tree.structure(tree):
        raise ValueError(
            f"`shardings` must match the structure of the tree it places (or be one "
            f"Sharding); got\n  {structure}\nfor\n  {jax.tree.structure(tree)}."
        )
    return flat


def _place_leaf(path, leaf, sharding: Sharding, dtype):
    if _is_key(leaf):
        data = _place_leaf(path, jax.random.key_data(leaf), sharding, None)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
    source_dtype = jnp.result_type(leaf)
    target = dtype if dtype is not None and jnp.issubdtype(source_dtype, jnp.floating) else None
    if isinstance(sharding, NamedSharding):
        where = f"Leaf {jax.tree_util.keystr(path)}"
        _check_spec(where, np.shape(leaf), sharding.mesh, sharding.spec)
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        # A global array already: reshard (and cast) on device, without a host copy.
        return jax.jit(lambda x: x if target is None else x.astype(target), out_shardings=sharding)(
            leaf
        )
    host = np.asarray(leaf)
    if target is not None:
        host = host.astype(target)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def place_sharded(tree: PyTree, shardings, *, dtype=None) -> PyTree:
    """Puts every leaf of ``tree`` on its mesh with its sharding, as global arrays.

    Each device receives its shard only (``jax.make_array_from_callback``), so this
    works across processes when every process passes the same host values; leaves
    that are already non-addressable global arrays are resharded on device. PRNG
    keys are placed through their key data.

    Args:
      tree: a pytree of arrays (NumPy, JAX or PRNG keys), e.g. a ``TrainState``.
      shardings: a pytree of ``Sharding`` with the structure of ``tree``, or one
        ``Sharding`` for every leaf (e.g. ``NamedSharding(mesh, P())``).
      dtype: if given, floating leaves are cast to it on the host first; integer
        and key leaves are kept.

    Returns:
      ``tree`` with each leaf a ``jax.Array`` with its sharding.

    Raises:
      ValueError: the structures differ, or a sharded dimension does not divide.
    """
    flat = _match_shardings(tree, shardings)
    paths_and_leaves, structure = jax.tree_util.tree_flatten_with_path(tree)
    placed = [
        _place_leaf(path, leaf, sharding, dtype)
        for (path, leaf), sharding in zip(paths_and_leaves, flat, strict=True)
    ]
    return jax.tree.unflatten(structure, placed)


def place_teacher(variables: PyTree, shardings, *, dtype=None) -> PyTree:
    """Places a frozen teacher's variables on the mesh, once, optionally in ``dtype``.

    The result enters the jitted step as its ``teacher_params`` argument at every
    call; it is never part of the student's state or optimizer. ``dtype=jnp.bfloat16``
    halves the teacher's memory (floating leaves only; the step's
    ``teacher_dtype`` sets the precision of the forward pass itself).

    Args:
      variables: the teacher's variables (linen boxes are unboxed first).
      shardings: from :func:`logical_shardings` or :func:`auto_shardings`, or one
        ``Sharding`` for every leaf.
      dtype: e.g. ``jnp.bfloat16``: floating leaves are cast before placing.

    Returns:
      The unboxed variables as global ``jax.Array`` s (see :func:`place_sharded`).
    """
    return place_sharded(meta.unbox(variables), shardings, dtype=dtype)


def batch_sharding(mesh: Mesh, *, axis: str = "data") -> NamedSharding:
    """A batch's sharding: leading dimension split over ``axis``, replicated otherwise."""
    if axis not in mesh.shape:
        raise ValueError(f"`axis`={axis!r} is not an axis of the mesh {dict(mesh.shape)}.")
    return NamedSharding(mesh, P(axis))


def local_batch_slice(mesh: Mesh, global_batch_size: int, *, axis: str = "data") -> slice:
    """The rows of the global batch that this process feeds to :func:`shard_batch_2d`.

    On one host, all of them. Across processes, the rows held by this process's
    devices: half each for two processes splitting the data axis, but all of them
    when every process has a device in every data row (a model axis spanning the
    processes).
    """
    sharding = batch_sharding(mesh, axis=axis)
    indices = sharding.addressable_devices_indices_map((global_batch_size,)).values()
    starts = sorted({index[0].indices(global_batch_size)[:2] for index in indices})
    merged = [list(starts[0])]
    for start, stop in starts[1:]:
        if start > merged[-1][1]:
            raise ValueError(
                f"This process holds the non-contiguous batch rows {starts}: lay out the "
                "mesh so that each process's data rows are adjacent."
            )
        merged[-1][1] = max(merged[-1][1], stop)
    return slice(*merged[0])


def shard_batch_2d(batch: Mapping[str, Any], mesh: Mesh, *, axis: str = "data") -> dict:
    """Global batch arrays split over ``axis`` and replicated over the other mesh axes.

    Args:
      batch: this process's rows of the global batch (:func:`local_batch_slice`;
        on one host the whole batch), a mapping of ``[B_local, ...]`` arrays.
      mesh: the mesh.
      axis: the data axis.

    Returns:
      A dict of global ``jax.Array`` s ``[B, ...]`` with :func:`batch_sharding`.
    """
    sharding = batch_sharding(mesh, axis=axis)
    size = mesh.shape[axis]
    indices = sharding.addressable_devices_indices_map((size,)).values()
    local_shards = len({index[0].indices(size) for index in indices})
    result = {}
    for key, value in batch.items():
        value = np.asarray(value)
        if value.ndim == 0 or value.shape[0] % local_shards:
            raise ValueError(
                f"Batch entry {key!r} has shape {value.shape}; its leading size must divide "
                f"into the {local_shards} data shards this process holds on mesh "
                f"{dict(mesh.shape)}."
            )
        result[key] = jax.make_array_from_process_local_data(sharding, value)
    return result


def per_device_bytes(tree: PyTree) -> dict:
    """Bytes each addressable device holds of the arrays in ``tree``.

    Returns:
      ``{device: sum of the nbytes of the tree's shards on that device}``.
    """
    totals: dict = collections.defaultdict(int)
    for leaf in jax.tree.leaves(tree):
        if not isinstance(leaf, jax.Array):
            raise TypeError(f"`tree` must hold jax.Arrays, got {type(leaf)}.")
        if _is_key(leaf):
            leaf = jax.random.key_data(leaf)
        for shard in leaf.addressable_shards:
            totals[shard.device] += shard.data.nbytes
    return dict(totals)


def jit_sharded_step(
    step: Callable,
    mesh: Mesh,
    *,
    teacher_shardings,
    state_shardings=None,
    batch_axis: str = "data",
    donate: bool = True,
    max_in_flight: int | None = 2,
) -> Callable:
    """``jax.jit`` of a global-array step with its argument and output shardings.

    Args:
      step: ``step(state, teacher_params, batch) -> (state, metrics)`` built with
        ``axis_name=None`` (GSPMD inserts the collectives).
      mesh: the mesh (:func:`model_mesh`).
      teacher_shardings: the shardings of the placed teacher (:func:`place_teacher`),
        or one ``Sharding`` for all of it; ``None`` for a step without teacher params.
      state_shardings: the student state's shardings, the ones it was placed with
        (e.g. ``auto_shardings(state, mesh)``); ``None``: replicated on every
        device, and a state placed otherwise is refused by ``jax.jit`` (sharding
        mismatch). The state leaves the step with these shardings.
      batch_axis: the mesh axis the batch's leading dimension is split over.
      donate: donate the state (argument 0).
      max_in_flight: on CPU devices, the most steps left running when a call returns
        (see :mod:`jaxkd.parallel._runners`); ``None`` never waits.

    Returns:
      The jitted step, taking the state and teacher placed with those shardings
      (:func:`place_sharded`, :func:`place_teacher`) and a batch from
      :func:`shard_batch_2d`; metrics come back replicated. Its ``lower`` gives the
      ahead-of-time lowering.
    """
    if getattr(step, "axis_name", None) is not None:
        raise ValueError(
            f"The step was built with axis_name={step.axis_name!r}: under jax.jit with "
            "sharded arguments build it with axis_name=None (GSPMD reduces the batch)."
        )
    replicated = NamedSharding(mesh, P())
    state_shardings = replicated if state_shardings is None else state_shardings
    jitted = jax.jit(
        step,
        in_shardings=(state_shardings, teacher_shardings, batch_sharding(mesh, axis=batch_axis)),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,) if donate else (),
    )
    return _bounded_in_flight(jitted, mesh.devices.flat, max_in_flight)
