"""Online distillation: deep mutual learning (K students) and born-again generations.

The mutual-learning objective is checked against a float64 numpy reference written
from Zhang et al.'s formula, its gradients against the closed form (peers are
constants), and its step on 8 simulated devices (shard_map and pmap) against one
device with an uneven mask and plain SGD (Adam would hide a gradient scale).
Born-again networks need no library code: a test runs two generations with
``make_train_step`` and the student's own architecture as the teacher.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _reference import kl as reference_kl
from _reference import log_softmax, random_logits, softmax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from toy import MLP, NUM_CLASSES, NUM_FEATURES, batch, init

import jaxkd
from jaxkd.train._mutual import make_mutual_learning_step, mutual_learning_objective

TEMPERATURE = 2.0
KD_WEIGHT = 0.7
# [6, 5] logits of K = 3 students; example 4 is padding with a label out of range.
MASK = np.array([True, True, False, True, False, True])
LABELS = np.array([0, 3, 1, 4, -1, 2], np.int32)
LOGITS = tuple(random_logits(seed, (6, 5)) for seed in (1, 2, 3))
TOLERANCE = dict(rtol=1e-5, atol=1e-6)


pytestmark = pytest.mark.usefixtures("fast_compilation")


def reference_dml(logits, labels, mask, temperature, kd_weight):
    """Per-student metrics of the DML objective, float64, from the paper's formula."""
    logits = [np.asarray(z, np.float64) for z in logits]
    num_students = len(logits)
    kept = np.asarray(mask)
    rows = np.arange(len(labels))
    safe_labels = np.where(kept, labels, 0)
    out = {}
    for k, z_k in enumerate(logits):
        ce = -log_softmax(z_k)[rows, safe_labels]
        peers = [
            temperature**2 * reference_kl(softmax(z_j, temperature), softmax(z_k, temperature))
            for j, z_j in enumerate(logits)
            if j != k
        ]
        kd = sum(peers) / (num_students - 1)
        out[f"ce_{k}"] = ce[kept].mean()
        out[f"kd_{k}"] = kd[kept].mean()
        out[f"loss_{k}"] = out[f"ce_{k}"] + kd_weight * out[f"kd_{k}"]
        out[f"accuracy_{k}"] = (np.argmax(z_k, -1) == labels)[kept].mean()
    out["loss"] = sum(out[f"loss_{k}"] for k in range(num_students))
    top = [np.argmax(z, -1) for z in logits]
    pairs = [(j, k) for j in range(num_students) for k in range(j + 1, num_students)]
    out["agreement"] = np.mean([(top[j] == top[k])[kept].mean() for j, k in pairs])
    return out


def reference_gradient(logits, labels, mask, temperature, kd_weight, k):
    """d loss_k / d z_k: (p_k - y + w T / (K - 1) sum_j (p_k^T - p_j^T)) / n on kept rows."""
    logits = [np.asarray(z, np.float64) for z in logits]
    num_students = len(logits)
    one_hot = np.eye(logits[k].shape[-1])[np.where(mask, labels, 0)]
    soft_k = softmax(logits[k], temperature)
    peers = sum(soft_k - softmax(z, temperature) for j, z in enumerate(logits) if j != k)
    grad = softmax(logits[k]) - one_hot + kd_weight * temperature / (num_students - 1) * peers
    return np.where(mask[:, None], grad, 0.0) / mask.sum()


def _objective():
    return mutual_learning_objective(temperature=TEMPERATURE, kd_weight=KD_WEIGHT)


@pytest.fixture(scope="module")
def analysis():
    """Metrics and gradients of the K = 3 objective, from one jitted function (one compile).

    ``metrics``: with the joint output mapping; ``sequence``: the outputs as a plain
    sequence, padding rows replaced by 1e4; ``own[k]``: d loss_k / d logits (all
    three students). The returned loss is their sum, so its gradient with respect
    to student k's logits is d loss_k / d z_k when the peers' gradients are zero.
    """
    objective = _objective()
    batch_ = {"label": LABELS, "mask": MASK}

    @jax.jit
    def analyse(logits, padded, batch_):
        def metrics_of(outputs):
            loss, metrics = objective(outputs, None, batch_, 0)
            return {**metrics, "returned": loss}

        def losses(z):
            metrics = metrics_of({"students": z})
            return [metrics[f"loss_{k}"] for k in range(3)]

        return {
            "metrics": metrics_of({"students": logits}),
            "sequence": metrics_of(list(padded)),
            "own": jax.jacrev(losses)(logits),
        }

    padded = tuple(np.where(MASK[:, None], z, 1e4).astype(np.float32) for z in LOGITS)
    return analyse(LOGITS, padded, batch_)


def test_objective_matches_float64_reference_with_three_students_and_a_mask(analysis):
    metrics = analysis["metrics"]
    expected = reference_dml(LOGITS, LABELS, MASK, TEMPERATURE, KD_WEIGHT)
    for name, value in expected.items():
        np.testing.assert_allclose(metrics[name], value, rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(metrics["returned"], expected["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["temperature"], TEMPERATURE)
    np.testing.assert_allclose(metrics["kd_weight"], KD_WEIGHT, rtol=1e-7)
    # A plain sequence of outputs is the same objective; padding rows change nothing.
    chex.assert_trees_all_close(analysis["sequence"], metrics, **TOLERANCE)


def test_peers_are_constants_and_own_gradient_is_the_closed_form(analysis):
    for k in range(3):
        grads = analysis["own"][k]
        expected = reference_gradient(LOGITS, LABELS, MASK, TEMPERATURE, KD_WEIGHT, k)
        np.testing.assert_allclose(grads[k], expected, rtol=1e-4, atol=1e-7)
        for j in range(3):
            if j != k:
                np.testing.assert_array_equal(grads[j], 0.0)


# --- two students of different architectures, one device against eight ------------------

NUM_DEVICES = 8
GLOBAL_BATCH = 32
STEPS = 3
# 6 real examples: 4 on device 0, 1 on device 4, 1 on device 7; the others hold none.
UNEVEN_MASK = np.isin(np.arange(GLOBAL_BATCH), [0, 1, 2, 3, 17, 30])


def _students(axis_name):
    """A plain MLP and a deeper one with BatchNorm synchronized over ``axis_name``."""
    return (
        MLP(hidden=(16,)),
        MLP(hidden=(8, 8), batch_norm=True, bn_axis_name=axis_name),
    )


@functools.cache
def _initial_variables():
    """Both students' linen variables, initialized once, in one compiled program."""

    def init_all(key):
        inputs = jnp.zeros((1, NUM_FEATURES))
        keys = jax.random.split(key)
        return [m.init(k, inputs, train=False) for m, k in zip(_students(None), keys, strict=True)]

    return jax.jit(init_all)(jax.random.key(1))


def _mutual_setup(axis_name):
    optimizer = optax.sgd(0.5)
    students = _students(axis_name)
    variables = _initial_variables()
    params, model_state = zip(*map(jaxkd.split_linen_variables, variables), strict=True)
    state = jaxkd.TrainState.create(params=params, optimizer=optimizer, model_state=model_state)
    step = make_mutual_learning_step(
        [jaxkd.linen_apply(module) for module in students],
        mutual_learning_objective(temperature=TEMPERATURE, kd_weight=KD_WEIGHT),
        optimizer,
        axis_name=axis_name,
    )
    return state, step


def _batch(k):
    return {**batch(k, GLOBAL_BATCH), "mask": UNEVEN_MASK}


@pytest.fixture(scope="module")
def single_device_run():
    state, step = _mutual_setup(None)
    step = jax.jit(step)
    history = []
    for k in range(STEPS):
        state, metrics = step(state, None, _batch(k))
        history.append(metrics)
    return state, history


def _assert_same_run(expected_run, state, history, unreplicate=lambda tree: tree):
    expected_state, expected_history = expected_run
    state = unreplicate(state)
    for metrics, expected in zip(map(unreplicate, history), expected_history, strict=True):
        assert set(metrics) == set(expected)
        chex.assert_trees_all_close(metrics, expected, **TOLERANCE)
    chex.assert_trees_all_close(state.params, expected_state.params, **TOLERANCE)
    chex.assert_trees_all_close(state.model_state, expected_state.model_state, **TOLERANCE)


def test_single_device_run_trains_both_students(single_device_run):
    state, history = single_device_run
    keys = {"loss", "agreement", "grad_norm", "param_norm", "temperature", "kd_weight"}
    assert keys | {f"{m}_{k}" for m in ("loss", "ce", "kd", "accuracy") for k in (0, 1)} == set(
        history[0]
    )
    assert int(state.step) == STEPS
    assert float(history[-1]["loss"]) < float(history[0]["loss"])
    assert "batch_stats" in state.model_state[1] and state.model_state[0] == {}


def test_mutual_learning_on_eight_devices_with_shard_map_equals_one_device(single_device_run):
    mesh = jaxkd.data_mesh()
    state, step = _mutual_setup("data")
    run = jaxkd.shard_step(step, mesh)
    state = jaxkd.replicate_on_mesh(state, mesh)
    history = []
    for k in range(STEPS):
        state, metrics = run(state, None, jaxkd.shard_batch(_batch(k), mesh))
        history.append(metrics)
    _assert_same_run(single_device_run, state, history)


def _replicate_for_pmap(tree, axis_name):
    """What ``jaxkd.replicate`` gives, on a mesh axis named like the pmap axis.

    ``jaxkd.replicate`` names its axis "devices" while the pmapped step returns
    arrays on an axis named ``axis_name``, so its second call would compile again.
    Stacked on the host, so no per-leaf broadcast is compiled either.
    """

    def stack(leaf):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            data = np.stack([np.asarray(jax.random.key_data(leaf))] * NUM_DEVICES)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
        return np.stack([np.asarray(leaf)] * NUM_DEVICES)

    mesh = jaxkd.data_mesh(jax.local_devices(), axis_name)
    return jax.device_put(jax.tree.map(stack, tree), NamedSharding(mesh, P(axis_name)))


def test_mutual_learning_on_eight_devices_with_pmap_equals_one_device(single_device_run):
    state, step = _mutual_setup("batch")
    run = jaxkd.pmap_step(step, axis_name="batch")
    state = _replicate_for_pmap(state, "batch")
    history = []
    for k in range(STEPS):
        state, metrics = run(state, None, jaxkd.split_for_pmap(_batch(k)))
        history.append(metrics)
    first = functools.partial(jax.tree.map, lambda leaf: np.asarray(leaf)[0])
    _assert_same_run(single_device_run, state.replace(rng=None), history, unreplicate=first)


def test_bad_input_is_refused_naming_the_argument():
    batch_ = {"label": LABELS, "mask": MASK}
    apply = jaxkd.linen_apply(MLP())
    optimizer = optax.sgd(0.1)
    with pytest.raises(ValueError, match="student_applies"):
        make_mutual_learning_step([apply], _objective(), optimizer)
    with pytest.raises(ValueError, match="K >= 2.*student_out"):
        _objective()(LOGITS[:1], None, batch_, 0)
    for temperature in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature"):
            mutual_learning_objective(temperature=temperature)
    with pytest.raises(ValueError, match="kd_weight"):
        mutual_learning_objective(kd_weight=-0.5)
    with pytest.raises(ValueError, match=r"student_out\[1\].*\(4, 5\)"):
        _objective()((LOGITS[0], LOGITS[1][:4]), None, batch_, 0)
    with pytest.raises(ValueError, match="labels"):
        _objective()(LOGITS, None, {"label": LABELS[:4]}, 0)
    with pytest.raises(ValueError, match="teacher_out"):
        _objective()(LOGITS, LOGITS[0], batch_, 0)
    step = make_mutual_learning_step([apply, apply], _objective(), optimizer)
    params = jaxkd.split_linen_variables(init(MLP(), 0))[0]
    state = jaxkd.TrainState.create(params=(params,) * 3, optimizer=optimizer)
    with pytest.raises(ValueError, match="state.params"):
        step(state, None, batch(0, 4))
    state = state.replace(params=(params,) * 2)
    with pytest.raises(ValueError, match="teacher_params"):
        step(state, {"params": params}, batch(0, 4))
    # Stateless students may keep TrainState.create's model_state={} (traced, not run).
    new_state, _ = jax.eval_shape(step, state, None, batch(0, 4))
    assert new_state.model_state == {}


# --- born-again networks: generation g distils from frozen generation g - 1 -------------


def test_born_again_generation_learns_from_the_frozen_previous_generation():
    """Generation 1 (fresh init, same architecture) against generation 0 in eval mode.

    Its run must equal one against generation 0's logits computed separately and put
    in the batch as a cached teacher, and generation 0 must be left as it was.
    """
    module = MLP(hidden=(16,))
    optimizer = optax.sgd(0.5)
    data = [batch(k, 16) for k in range(STEPS)]
    apply = jaxkd.linen_apply(module)

    params, model_state = jaxkd.split_linen_variables(init(module, seed=0))
    generation_0 = jaxkd.TrainState.create(
        params=params, optimizer=optimizer, model_state=model_state
    )
    labels_only = jax.jit(
        jaxkd.make_train_step(apply, None, jaxkd.cross_entropy_objective(), optimizer)
    )
    for example in data:
        generation_0, _ = labels_only(generation_0, None, example)
    teacher = jaxkd.export_student(generation_0)
    frozen_copy = jax.tree.map(np.array, teacher)

    objective = jaxkd.hinton_objective(alpha=0.5, temperature=TEMPERATURE)
    online = jax.jit(
        jaxkd.make_train_step(apply, jaxkd.linen_teacher_apply(module), objective, optimizer)
    )
    cached = jax.jit(jaxkd.make_train_step(apply, None, objective, optimizer))
    params, model_state = jaxkd.split_linen_variables(init(module, seed=1))
    generation_1 = jaxkd.TrainState.create(
        params=params, optimizer=optimizer, model_state=model_state
    )
    from_cache = generation_1
    for example in data:
        generation_1, metrics = online(generation_1, teacher, example)
        teacher_logits = module.apply(frozen_copy, example["image"], train=False)
        assert teacher_logits.shape == (16, NUM_CLASSES)
        from_cache, expected = cached(
            from_cache, None, {**example, "teacher_logits": teacher_logits}
        )
        chex.assert_trees_all_close(metrics["kd_loss"], expected["kd_loss"], **TOLERANCE)
        assert float(metrics["kd_loss"]) > 0.0
    chex.assert_trees_all_close(generation_1.params, from_cache.params, **TOLERANCE)
    chex.assert_trees_all_equal(teacher, frozen_copy)
