"""A frozen teacher sharded over a 2 x 4 (data x model) mesh under plain ``jax.jit``.

The sharded runs must give the student params and metrics of the same step jitted
on one device with unsharded params: with the teacher tensor-parallel over the
model axis; with the teacher FSDP-sharded over both axes and the student sharded
too (one run, one compile: compiles are most of this file's time); and in two
processes, with the model axis or the data axis across them. Plain SGD (Adam would hide a
gradient off by a factor) and a token mask that puts 20 of the 23 real tokens on
the first data shard, so a mean of per-shard means cannot pass.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from multihost_sharded_teacher import (
    FSDP,
    GLOBAL_BATCH,
    LAYOUTS,
    MULTIHOST_STEPS,
    TENSOR_PARALLEL,
    global_batch,
    make_step,
    new_state,
    teacher_variables,
)

from jaxkd.parallel._sharding import (
    auto_shardings,
    jit_sharded_step,
    local_batch_slice,
    logical_shardings,
    model_mesh,
    per_device_bytes,
    place_sharded,
    place_teacher,
    shard_batch_2d,
)

STEPS = 3
TOLERANCE = dict(rtol=1e-5, atol=1e-6)
TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == 8
    return model_mesh(data=2, model=4)


@pytest.fixture(scope="module")
def reference():
    """Per-step student params (host copies) and metrics of the one-device step."""
    teacher = jax.tree.map(np.asarray, jax.device_get(nn.unbox(teacher_variables())))
    step = jax.jit(make_step())
    state, params, history = new_state(), [], []
    for k in range(STEPS):
        state, metrics = step(state, teacher, global_batch(k))
        params.append(jax.device_get(state.params))
        history.append(jax.device_get(metrics))
    return params, history


def _run(mesh, rules, *, student_sharded=False, dtype=None):
    """``STEPS`` sharded steps.

    Returns:
      (metrics history, final state, placed teacher, per-device bytes of the
      initial state).
    """
    variables = teacher_variables()
    teacher_shardings = logical_shardings(variables, mesh, rules)
    teacher = place_teacher(variables, teacher_shardings, dtype=dtype)
    state = new_state()
    state_shardings = auto_shardings(state, mesh, min_size=64) if student_sharded else None
    state = place_sharded(
        state, NamedSharding(mesh, P()) if state_shardings is None else state_shardings
    )
    initial_bytes = per_device_bytes(state)
    step = jit_sharded_step(
        make_step(), mesh, teacher_shardings=teacher_shardings, state_shardings=state_shardings
    )
    history = []
    for k in range(STEPS):
        state, metrics = step(state, teacher, shard_batch_2d(global_batch(k), mesh))
        history.append(metrics)
    return history, state, teacher, initial_bytes


@pytest.fixture(scope="module")
def tensor_parallel_run(mesh):
    return _run(mesh, TENSOR_PARALLEL)


def _assert_matches(reference, history, state, steps=STEPS, **tolerance):
    expected_params, expected_history = reference
    tolerance = tolerance or TOLERANCE
    for metrics, expected in zip(history, expected_history[:steps], strict=True):
        assert set(metrics) == set(expected)
        chex.assert_trees_all_close(jax.device_get(metrics), expected, **tolerance)
    chex.assert_trees_all_close(
        jax.device_get(state.params), expected_params[steps - 1], **tolerance
    )


def test_tensor_parallel_teacher_matches_single_device(mesh, reference, tensor_parallel_run):
    shardings = logical_shardings(teacher_variables(), mesh, TENSOR_PARALLEL)["params"]
    assert shardings["Embed_0"]["embedding"].spec == P("model", None)  # "embed": None
    assert shardings["Dense_0"]["kernel"].spec == P(None, "model")
    assert shardings["Dense_0"]["bias"].spec == P("model")
    # ("mlp", "vocab"): "vocab" comes first in the rules and takes "model".
    assert shardings["Dense_1"]["kernel"].spec == P(None, "model")
    history, state, _, _ = tensor_parallel_run
    _assert_matches(reference, history, state)
    assert all(leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(state))


def test_fsdp_teacher_and_sharded_student_match_single_device(mesh, reference):
    shardings = logical_shardings(teacher_variables(), mesh, FSDP)["params"]
    assert shardings["Embed_0"]["embedding"].spec == P("model", "data")
    assert shardings["Dense_0"]["kernel"].spec == P("data", "model")
    assert shardings["Dense_1"]["kernel"].spec == P("data", "model")
    history, state, teacher, _ = _run(mesh, FSDP, student_sharded=True)
    _assert_matches(reference, history, state)
    # The teacher is sharded over all 8 devices: a kernel's shard is 1/8 of it.
    for layer in ("Dense_0", "Dense_1"):
        kernel = teacher["params"][layer]["kernel"]
        assert {s.data.nbytes for s in kernel.addressable_shards} == {kernel.nbytes // 8}
    # The student state leaves the step sharded as it came in (auto_shardings' rule:
    # the largest dimension divisible by 4, leaves under min_size replicated).
    assert state.params["Embed_0"]["embedding"].sharding.spec == P("model")
    assert state.params["Dense_0"]["kernel"].sharding.spec == P(None, "model")
    assert state.params["Dense_1"]["kernel"].sharding.spec == P(None, "model")  # a tie
    assert state.params["Dense_1"]["bias"].sharding.spec == P()  # 16 < min_size


def test_teacher_memory_state_and_bfloat16(mesh, reference, tensor_parallel_run):
    _, state, teacher, initial_bytes = tensor_parallel_run
    variables = teacher_variables()
    shardings = logical_shardings(variables, mesh, TENSOR_PARALLEL)
    # Expected from the specs: sharded leaves over the 4-way model axis, others whole;
    # under these rules every teacher leaf has a dimension on "model".
    sharded = sum(
        leaf.nbytes
        for leaf, sharding in zip(jax.tree.leaves(teacher), jax.tree.leaves(shardings), strict=True)
        if "model" in sharding.spec
    )
    total = sum(leaf.nbytes for leaf in jax.tree.leaves(teacher))
    expected = sharded // 4 + (total - sharded)
    assert expected == total // 4
    assert per_device_bytes(teacher) == {device: expected for device in mesh.devices.flat}
    # After the steps nothing of the teacher's is in the student's state (params,
    # optimizer state, model state), and the teacher is left as it was.
    assert jax.tree.structure(state) == jax.tree.structure(new_state())
    assert per_device_bytes(state) == initial_bytes
    chex.assert_trees_all_equal(teacher, nn.unbox(variables))

    history, state, half, _ = _run(mesh, TENSOR_PARALLEL, dtype=jnp.bfloat16)
    assert {leaf.dtype for leaf in jax.tree.leaves(half)} == {jnp.dtype(jnp.bfloat16)}
    assert per_device_bytes(half) == {device: expected // 2 for device in mesh.devices.flat}
    _assert_matches(reference, history, state, rtol=5e-3, atol=1e-3)  # seen: 2.4e-4


def test_auto_shardings_rule(mesh):
    tree = {
        "divisible_last": np.zeros((6, 8)),
        "small": np.zeros((8,)),
        "indivisible": np.zeros((5, 7)),
        "tie": np.zeros((8, 8)),
        "largest_first": np.zeros((16, 4)),
    }
    specs = {key: s.spec for key, s in auto_shardings(tree, mesh, min_size=16).items()}
    assert specs == {
        "divisible_last": P(None, "model"),
        "small": P(),
        "indivisible": P(),
        "tie": P(None, "model"),
        "largest_first": P("model"),
    }
    both = auto_shardings(tree, mesh, axis=("data", "model"), min_size=16)
    assert both["largest_first"].spec == P(("data", "model"))
    assert both["divisible_last"].spec == P(None, ("data", "model"))


def test_one_host_feeds_the_whole_batch(mesh):
    assert local_batch_slice(mesh, GLOBAL_BATCH) == slice(0, GLOBAL_BATCH)
    batch = shard_batch_2d(global_batch(0), mesh)
    shard = batch["inputs"].addressable_shards[0]
    assert shard.data.shape == (GLOBAL_BATCH // 2, batch["inputs"].shape[1])


def test_bad_input(mesh):
    with pytest.raises(ValueError, match="needs 12 devices; got 8"):
        model_mesh(data=3, model=4)
    with pytest.raises(ValueError, match="`model`=3 does not divide the 8 devices"):
        model_mesh(model=3)
    variables = teacher_variables()
    with pytest.raises(ValueError, match=r"names mesh axes \['tensor'\]"):
        logical_shardings(variables, mesh, (("mlp", "tensor"),))
    with pytest.raises(ValueError, match=r"Dense_0.*shape \(12, 32\).*not divisible by the 8"):
        logical_shardings(variables, mesh, (("embed", ("data", "model")),))
    with pytest.raises(TypeError, match="`rules` must be a sequence"):
        logical_shardings(variables, mesh, ("mlp", "model"))
    shardings = logical_shardings(variables, mesh, TENSOR_PARALLEL)
    with pytest.raises(ValueError, match="`shardings` must match the structure"):
        place_teacher(variables, shardings["params"])
    with pytest.raises(ValueError, match=r"shape \(7, 6\).*2 data shards"):
        shard_batch_2d({"inputs": np.zeros((7, 6), np.int32)}, mesh)
    with pytest.raises(ValueError, match="built with axis_name='data'"):
        jit_sharded_step(make_step(axis_name="data"), mesh, teacher_shardings=shardings)
    with pytest.raises(ValueError, match="`axis`='batch'"):
        auto_shardings(variables, mesh, axis="batch")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_device(tmp_path, reference):
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(TESTS), env.get("PYTHONPATH", "")])
    port = _free_port()
    worker = os.path.join(TESTS, "multihost_sharded_teacher.py")
    processes = [
        subprocess.Popen(
            [sys.executable, worker, str(index), str(port), str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for index in range(2)
    ]
    try:
        outputs = [process.communicate(timeout=120)[0] for process in processes]
    finally:
        for process in processes:
            process.kill()
    for index, (process, output) in enumerate(zip(processes, outputs, strict=True)):
        assert process.returncode == 0, f"process {index}:\n{output[-3000:]}"
    expected_params, expected_history = reference
    for index in range(2):
        with np.load(tmp_path / f"process_{index}.npz") as arrays:
            for layout in LAYOUTS:
                for prefix, tree in (
                    ("params", expected_params[MULTIHOST_STEPS - 1]),
                    ("metrics", expected_history[MULTIHOST_STEPS - 1]),
                ):
                    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
                        key = f"{layout}/{prefix}{jax.tree_util.keystr(path)}"
                        np.testing.assert_allclose(arrays[key], leaf, **TOLERANCE, err_msg=key)
            # Model axis across processes: each holds every batch row; data axis
            # across processes: each feeds its half.
            assert arrays["model_across/rows"].tolist() == [0, GLOBAL_BATCH]
            half = GLOBAL_BATCH // 2
            assert arrays["data_across/rows"].tolist() == [index * half, (index + 1) * half]
