"""Reductions: masked means as sums over counts, on one device and over a data axis.

The specification: with uneven masks, the value on 8 devices (and the gradient,
averaged with pmean as the train step does) equals the value on one device over
the concatenated batch; batch-level losses with ``axis_name`` see the global batch.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxkd

NUM_DEVICES = 8
AXIS = "data"


def _on_devices(fn, *sharded, replicated=()):
    """``fn(*replicated, *sharded_shards)`` on 8 devices; outputs from device 0."""
    mesh = jaxkd.data_mesh()
    mapped = jax.shard_map(
        fn,
        mesh=mesh,
        in_specs=(*(P() for _ in replicated), *(P(AXIS) for _ in sharded)),
        out_specs=P(),
        check_vma=False,
    )
    return jax.jit(mapped)(*replicated, *sharded)


def _uneven_mask(size, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.zeros(size, bool)
    mask[: size // 8] = True  # device 0 full
    mask[rng.choice(np.arange(size // 8, size), 3, replace=False)] = True
    return mask


def test_masked_mean_is_sum_over_count_and_ignores_masked_nan():
    values = jnp.array([1.0, 2.0, jnp.nan, 4.0])
    where = jnp.array([True, True, False, True])
    np.testing.assert_allclose(jaxkd.masked_mean(values, where), 7.0 / 3.0, rtol=1e-6)
    total, count = jaxkd.masked_sum_and_count(values, where)
    assert float(total) == 7.0 and float(count) == 3.0
    grad = jax.grad(lambda v: jaxkd.masked_mean(v, where))(values)
    np.testing.assert_allclose(grad, [1 / 3, 1 / 3, 0.0, 1 / 3], rtol=1e-6)


def test_fully_masked_mean_is_zero_with_zero_gradient():
    values = jnp.arange(4.0)
    where = jnp.zeros(4, bool)
    assert float(jaxkd.masked_mean(values, where)) == 0.0
    grad = jax.grad(lambda v: jaxkd.masked_mean(v, where))(values)
    np.testing.assert_array_equal(grad, np.zeros(4))


@pytest.mark.parametrize("mask_shape", [(3, 1), (1, 5), (3, 5)])
def test_masks_broadcast_without_changing_rank(mask_shape):
    values = jnp.arange(15.0).reshape(3, 5)
    rng = np.random.default_rng(0)
    where = rng.random(mask_shape) < 0.6
    where.flat[0] = True
    full = np.broadcast_to(where, (3, 5))
    expected = np.asarray(values)[full].mean()
    np.testing.assert_allclose(jaxkd.masked_mean(values, where), expected, rtol=1e-6)


@pytest.mark.parametrize(
    "where, error, match",
    [
        (np.ones(3, bool), ValueError, r"\(3,\).*\(3, 5\)"),
        (np.ones((3, 5, 1), bool), ValueError, "no change of rank"),
        (np.ones((2, 5), bool), ValueError, "expected the values' shape"),
        (np.ones((3, 5), np.float32), TypeError, "boolean"),
    ],
)
def test_bad_masks_are_clear_errors(where, error, match):
    with pytest.raises(error, match=match):
        jaxkd.masked_mean(jnp.zeros((3, 5)), where)


def test_masked_means_equal_separate_means_with_one_collective():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(2, 16)).astype(np.float32)
    mask = _uneven_mask(16)
    means = jaxkd.masked_means({"a": (a, mask), "b": (b, None)})
    np.testing.assert_allclose(means["a"], a[mask].mean(), rtol=1e-6)
    np.testing.assert_allclose(means["b"], b.mean(), rtol=1e-6)

    def body(a, b, mask):
        return jaxkd.masked_means({"a": (a, mask), "b": (b, None)}, axis_name=AXIS)

    jaxpr = jax.make_jaxpr(
        jax.shard_map(
            body,
            mesh=jaxkd.data_mesh(),
            in_specs=(P(AXIS), P(AXIS), P(AXIS)),
            out_specs=P(),
            check_vma=False,
        )
    )(a, b, mask)
    collectives = [e for e in jaxpr.eqns[0].params["jaxpr"].eqns if e.primitive.name == "psum"]
    assert len(collectives) == 1


def test_uneven_masks_on_8_devices_equal_one_device_value_and_gradient():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(32, 4)).astype(np.float32)
    w = rng.normal(size=(4,)).astype(np.float32)
    mask = _uneven_mask(32)

    def loss(w, x, mask, axis_name=None):
        return jaxkd.masked_mean(jnp.square(x @ w), mask, axis_name=axis_name)

    value, grad = jax.jit(jax.value_and_grad(loss))(w, x, mask)

    def body(w, x, mask):
        value, grad = jax.value_and_grad(loss)(w, x, mask, AXIS)
        return value, jax.lax.pmean(grad, AXIS)

    sharded_value, sharded_grad = _on_devices(body, x, mask, replicated=(w,))
    np.testing.assert_allclose(sharded_value, value, rtol=1e-5)
    np.testing.assert_allclose(sharded_grad, grad, rtol=1e-5)
    # The mean of per-device means is far off: this is what the reduction prevents.
    per_device = [x[d * 4 : (d + 1) * 4] for d in range(NUM_DEVICES)]
    per_mask = [mask[d * 4 : (d + 1) * 4] for d in range(NUM_DEVICES)]
    mean_of_means = np.mean([loss(w, xd, md) for xd, md in zip(per_device, per_mask, strict=True)])
    assert abs(mean_of_means - float(value)) > 0.1 * abs(float(value))


def test_gather_examples_is_the_global_batch_in_order():
    x = np.arange(32.0).reshape(16, 2)
    np.testing.assert_array_equal(jaxkd.gather_examples(x, None), x)
    gathered = _on_devices(lambda x: jaxkd.gather_examples(x, AXIS), x)
    np.testing.assert_array_equal(gathered, x)


def test_pmean_packed_equals_a_leafwise_pmean_and_keeps_other_leaves():
    from jaxkd.parallel._reductions import pmean_packed

    rng = np.random.default_rng(3)
    tree = {
        "w": rng.normal(size=(NUM_DEVICES, 3, 2)).astype(np.float32),
        "b": rng.normal(size=(NUM_DEVICES, 2)).astype(np.float16),
        "count": np.arange(NUM_DEVICES, dtype=np.int32)[:, None],
    }

    def body(tree):
        return pmean_packed(tree, AXIS), jax.lax.pmean(
            {k: v for k, v in tree.items() if k != "count"}, AXIS
        )

    mapped = jax.jit(
        jax.shard_map(
            body, mesh=jaxkd.data_mesh(), in_specs=P(AXIS), out_specs=P(AXIS), check_vma=False
        )
    )
    packed, reference = mapped(tree)
    np.testing.assert_allclose(packed["w"], reference["w"], rtol=1e-6)
    np.testing.assert_allclose(packed["b"].astype(np.float32), reference["b"].astype(np.float32))
    assert packed["b"].dtype == np.float16
    np.testing.assert_array_equal(packed["count"], tree["count"])  # per device, unchanged


BATCH_LOSSES = {
    "dist": (jaxkd.dist_loss, 5, 5),
    "rkd_distance": (jaxkd.rkd_distance_loss, 4, 6),
    "rkd_angle": (jaxkd.rkd_angle_loss, 4, 6),
    "similarity_preserving": (jaxkd.similarity_preserving_loss, 4, 6),
    "pkt": (jaxkd.pkt_loss, 4, 6),
}


@pytest.mark.parametrize("name", sorted(BATCH_LOSSES))
def test_batch_level_losses_gather_the_global_batch(name):
    """Value and pmean-ed gradient on 8 devices equal one device's, with a mask."""
    loss_fn, student_dim, teacher_dim = BATCH_LOSSES[name]
    rng = np.random.default_rng(4)
    inputs = rng.normal(size=(16, 3)).astype(np.float32)
    projection = rng.normal(size=(3, student_dim)).astype(np.float32)
    teacher = rng.normal(size=(16, teacher_dim)).astype(np.float32)
    if name == "dist":
        teacher = teacher[:, :student_dim]
    mask = _uneven_mask(16, seed=5)

    def loss(projection, inputs, teacher, mask, axis_name=None):
        return loss_fn(inputs @ projection, teacher, where=mask, axis_name=axis_name)

    # Jitted: eager differentiation dispatches (and compiles) every primitive alone.
    value, grad = jax.jit(jax.value_and_grad(loss))(projection, inputs, teacher, mask)

    def body(projection, inputs, teacher, mask):
        value, grad = jax.value_and_grad(loss)(projection, inputs, teacher, mask, AXIS)
        # Per shard (no axis_name), in the same program to compile once.
        local = jax.lax.pmean(loss(projection, inputs, teacher, mask), AXIS)
        return (value, jax.lax.pmean(grad, AXIS)), local

    sharded, local = _on_devices(body, inputs, teacher, mask, replicated=(projection,))
    chex.assert_trees_all_close(sharded, (value, grad), rtol=1e-5, atol=1e-6)
    # Per shard (no axis_name) the value differs: the relations span devices.
    assert abs(float(local) - float(value)) > 1e-3


def test_masked_mean_under_vmap_and_jit():
    values = jnp.arange(12.0).reshape(3, 4)
    where = jnp.array([[True, False, True, True]] * 3)
    batched = jax.jit(jax.vmap(functools.partial(jaxkd.masked_mean)))(values, where)
    np.testing.assert_allclose(batched, [(0 + 2 + 3) / 3, (4 + 6 + 7) / 3, (8 + 10 + 11) / 3])
