"""The train step: frozen teacher, schedules, cached teacher, accumulation, tracing."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from toy import MLP, batch, init

import jaxkd

TEACHER = MLP(hidden=(64, 64))
STUDENT = MLP(hidden=(16,))


@pytest.fixture(autouse=True)
def _fast_compilation(request):
    """Compiles with most XLA optimizations off: compiling steps is most of this file's time.

    What these tests check (updates, traces, donation, errors, NaN propagation) does
    not depend on how well XLA optimizes the code, except the FLOP count: that test
    compiles as usual.
    """
    if request.node.name == "test_teacher_is_not_differentiated_by_flop_count":
        yield
        return
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", False)


def _setup(optimizer=None, objective=None, teacher_apply="online", **step_kwargs):
    teacher_variables = init(TEACHER, seed=0)
    params, model_state = jaxkd.split_linen_variables(init(STUDENT, seed=1))
    optimizer = optimizer or optax.sgd(0.1)
    state = jaxkd.TrainState.create(
        params=params, optimizer=optimizer, model_state=model_state, rng=3
    )
    teacher_fn = jaxkd.linen_teacher_apply(TEACHER) if teacher_apply == "online" else None
    step = jaxkd.make_train_step(
        jaxkd.linen_apply(STUDENT),
        teacher_fn,
        objective or jaxkd.hinton_objective(alpha=0.7, temperature=3.0),
        optimizer,
        **step_kwargs,
    )
    return state, teacher_variables, step


def test_step_matches_a_hand_written_update():
    state, teacher_variables, step = _setup()
    data = batch(0)
    new_state, metrics = jax.jit(step)(state, teacher_variables, data)

    teacher_logits = jax.jit(lambda v, x: TEACHER.apply(v, x, train=False))(
        teacher_variables, data["image"]
    )

    def loss(params):
        logits = STUDENT.apply({"params": params}, data["image"], train=True)
        log_p_s = jax.nn.log_softmax(logits / 3.0)
        p_t = jax.nn.softmax(teacher_logits / 3.0)
        kl = jnp.sum(p_t * (jnp.log(p_t) - log_p_s), axis=-1) * 9.0
        ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), data["label"][:, None], axis=1)
        return jnp.mean(0.7 * kl + 0.3 * ce[:, 0])

    value, grads = jax.jit(jax.value_and_grad(loss))(state.params)
    expected = jax.tree.map(lambda p, g: p - 0.1 * g, state.params, grads)
    chex.assert_trees_all_close(new_state.params, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["loss"], value, rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(grads), rtol=1e-5)
    assert int(new_state.step) == 1
    for key in ("kd_loss", "ce_loss", "student_entropy", "teacher_entropy", "agreement"):
        assert np.isfinite(metrics[key]), key


def _flops(fn, *args) -> float:
    flops = jaxkd.compiled_flops(jax.jit(fn).lower(*args).compile())
    assert flops is not None, "this backend reports no FLOP count"
    return flops


def test_teacher_is_not_differentiated_by_flop_count():
    # A teacher far larger than the student: differentiating it would add about
    # twice its forward cost, far beyond the 5% allowed here.
    big_teacher = MLP(hidden=(512, 512))
    teacher_variables = init(big_teacher, seed=0)
    params, _ = jaxkd.split_linen_variables(init(STUDENT, seed=1))
    optimizer = optax.sgd(0.1)
    state = jaxkd.TrainState.create(params=params, optimizer=optimizer)
    objective = jaxkd.hinton_objective(alpha=0.5, temperature=2.0)
    step = jaxkd.make_train_step(
        jaxkd.linen_apply(STUDENT), jaxkd.linen_teacher_apply(big_teacher), objective, optimizer
    )
    data = {k: jnp.asarray(v) for k, v in batch(0, size=64).items()}

    def student_fwd_bwd(params, teacher_logits):
        def loss(p):
            return objective(
                STUDENT.apply({"params": p}, data["image"], train=True), teacher_logits, data, 0
            )[0]

        return jax.grad(loss)(params)

    # Lowering needs only the shape of the teacher's logits.
    teacher_logits = jax.eval_shape(
        lambda v: big_teacher.apply(v, data["image"], train=False), teacher_variables
    )
    expected = _flops(student_fwd_bwd, params, teacher_logits) + _flops(
        lambda v: big_teacher.apply(v, data["image"], train=False), teacher_variables
    )
    measured = _flops(step, state, teacher_variables, data)
    assert measured <= 1.05 * expected, (measured, expected)
    assert measured >= 0.95 * expected, (measured, expected)


def test_step_traces_once_and_donates_the_state():
    state, teacher_variables, step = _setup()
    jitted = jax.jit(chex.assert_max_traces(step, n=1), donate_argnums=0)
    for k in range(5):
        old_leaf = jax.tree.leaves(state.params)[0]
        state, _ = jitted(state, teacher_variables, batch(k))
        assert old_leaf.is_deleted(), "the student state was not donated"
    assert int(state.step) == 5


def test_cached_teacher_gives_the_same_update_as_online_teacher():
    online_state, teacher_variables, online = _setup()
    cached_state, _, cached = _setup(teacher_apply=None)
    data = batch(0)
    logits = TEACHER.apply(teacher_variables, data["image"], train=False)
    online_next, online_metrics = jax.jit(online)(online_state, teacher_variables, data)
    cached_next, cached_metrics = jax.jit(cached)(
        cached_state, None, {**data, "teacher_logits": logits}
    )
    chex.assert_trees_all_close(online_next.params, cached_next.params, rtol=1e-6, atol=0)
    chex.assert_trees_all_close(online_metrics, cached_metrics, rtol=1e-6)


def test_cached_teacher_step_runs_no_teacher_forward():
    _, teacher_variables, cached = _setup(teacher_apply=None)
    state, _, _ = _setup()
    data = batch(0)
    logits = TEACHER.apply(teacher_variables, data["image"], train=False)
    jaxpr = jax.make_jaxpr(cached)(state, None, {**data, "teacher_logits": logits})
    # The teacher's 64-wide layers never appear: no dot_general has a 64-sized dim.
    dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
    assert dots and all(64 not in v.aval.shape for e in dots for v in e.invars)


@pytest.mark.parametrize(
    "schedule, expected",
    [
        (0.5, [0.5, 0.5, 0.5, 0.5]),
        (optax.constant_schedule(0.25), [0.25] * 4),
        (optax.linear_schedule(1.0, 0.4, transition_steps=3), [1.0, 0.8, 0.6, 0.4]),
        (optax.exponential_decay(0.8, transition_steps=1, decay_rate=0.5), [0.8, 0.4, 0.2, 0.1]),
    ],
    ids=["float", "constant", "linear", "exponential"],
)
def test_alpha_and_temperature_follow_optax_schedules(schedule, expected):
    temperature = optax.linear_schedule(4.0, 1.0, transition_steps=3)
    state, teacher_variables, step = _setup(
        objective=jaxkd.hinton_objective(alpha=schedule, temperature=temperature)
    )
    jitted = jax.jit(step)
    alphas, temperatures = [], []
    for k in range(4):
        state, metrics = jitted(state, teacher_variables, batch(k))
        alphas.append(float(metrics["alpha"]))
        temperatures.append(float(metrics["temperature"]))
    np.testing.assert_allclose(alphas, expected, rtol=1e-6)
    np.testing.assert_allclose(temperatures, [4.0, 3.0, 2.0, 1.0], rtol=1e-6)


def test_scheduled_alpha_changes_the_update():
    # The schedule is really used in the loss, not only reported.
    data = batch(0)
    results = []
    for alpha in (0.0, optax.constant_schedule(0.0), 1.0):
        state, teacher_variables, step = _setup(
            objective=jaxkd.hinton_objective(alpha=alpha, temperature=2.0)
        )
        results.append(jax.jit(step)(state, teacher_variables, data)[0].params)
    chex.assert_trees_all_close(results[0], results[1])
    with pytest.raises(AssertionError):
        chex.assert_trees_all_close(results[0], results[2])


def test_gradient_accumulation_with_multisteps_equals_one_large_batch():
    data = batch(0, size=32)
    halves = [{k: v[:16] for k, v in data.items()}, {k: v[16:] for k, v in data.items()}]
    big_state, teacher_variables, big_step = _setup(optimizer=optax.sgd(0.1))
    big_state, _ = jax.jit(big_step)(big_state, teacher_variables, data)

    accumulate = optax.MultiSteps(optax.sgd(0.1), every_k_schedule=2)
    state, _, step = _setup(optimizer=accumulate)
    jitted = jax.jit(step)
    start = state.params
    state, _ = jitted(state, teacher_variables, halves[0])
    chex.assert_trees_all_equal(state.params, start)  # no update after 1 of 2 micro-steps
    state, _ = jitted(state, teacher_variables, halves[1])
    chex.assert_trees_all_close(state.params, big_state.params, rtol=1e-5, atol=1e-6)


def test_bfloat16_teacher_forward_is_close_to_float32():
    state, teacher_variables, step32 = _setup()
    _, _, step16 = _setup(teacher_dtype=jnp.bfloat16)
    data = batch(0)
    _, m32 = jax.jit(step32)(state, teacher_variables, data)
    _, m16 = jax.jit(step16)(state, teacher_variables, data)
    assert m16["loss"].dtype == jnp.float32
    np.testing.assert_allclose(m16["teacher_entropy"], m32["teacher_entropy"], rtol=0.05)
    np.testing.assert_allclose(m16["loss"], m32["loss"], rtol=0.05)


def test_supervised_step_without_teacher():
    params, model_state = jaxkd.split_linen_variables(init(STUDENT, seed=1))
    optimizer = optax.adam(1e-2)
    state = jaxkd.TrainState.create(params=params, optimizer=optimizer, model_state=model_state)
    step = jax.jit(
        jaxkd.make_train_step(
            jaxkd.linen_apply(STUDENT), None, jaxkd.cross_entropy_objective(), optimizer
        )
    )
    data = batch(0, size=64)
    losses = []
    for _ in range(30):
        state, metrics = step(state, None, data)
        losses.append(float(metrics["loss"]))
    assert "agreement" not in metrics
    assert losses[-1] < 0.5 * losses[0]


def test_distillation_objective_without_teacher_is_a_clear_error():
    state, _, step = _setup(teacher_apply=None)
    with pytest.raises(ValueError, match="teacher's outputs"):
        step(state, None, batch(0))


def test_eval_step_sums_and_summary():
    state, teacher_variables, _ = _setup()
    eval_step = jax.jit(
        jaxkd.make_eval_step(jaxkd.linen_apply(STUDENT), jaxkd.linen_teacher_apply(TEACHER))
    )
    data = batch(0, size=10)
    mask = np.arange(10) < 7
    sums = eval_step(state, teacher_variables, {**data, "mask": mask})
    summary = jaxkd.summarize_eval(sums)
    s_logits = STUDENT.apply({"params": state.params}, data["image"][:7], train=False)
    t_logits = TEACHER.apply(teacher_variables, data["image"][:7], train=False)
    assert summary["count"] == 7
    np.testing.assert_allclose(
        summary["accuracy"], np.mean(np.argmax(s_logits, -1) == data["label"][:7]), rtol=1e-6
    )
    np.testing.assert_allclose(
        summary["agreement"], np.mean(np.argmax(s_logits, -1) == np.argmax(t_logits, -1))
    )
    np.testing.assert_allclose(
        summary["kl"], np.mean(jaxkd.kl_divergence(s_logits, t_logits)), rtol=1e-5
    )
    with pytest.raises(ValueError, match="scalars"):
        jaxkd.summarize_eval({"count": jnp.ones(2), "correct": jnp.ones(2)})


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(loss="nope"), ValueError, "Unknown `loss`"),
        (dict(alpha=1.5), ValueError, "alpha"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=-2.0), ValueError, "temperature"),
        (dict(alpha=0.5, label_key=None), ValueError, "alpha=1.0"),
        (dict(loss="dkd", alpha=1.0, label_key=None), ValueError, "needs labels"),
        (dict(loss="jsd", loss_kwargs={"betaa": 0.5}), ValueError, r"\['betaa'\].*\['beta'\]"),
        (dict(loss="jsd", loss_kwargs={"beta": 1.5}), ValueError, "`beta` must lie in"),
        (dict(loss="skew_kl", loss_kwargs={"alpha": -0.1}), ValueError, "`alpha` must lie"),
        (dict(loss="kl", loss_kwargs={"temperature": 2.0}), ValueError, "may not set"),
        (dict(loss=3), TypeError, "name or a callable"),
        (dict(alpha="0.5"), TypeError, "real number or a schedule"),
        (dict(alpha=True), TypeError, "real number or a schedule"),
        (dict(alpha=np.ones(2)), TypeError, "real number or a schedule"),
        (dict(alpha=optax.linear_schedule(-0.5, 1.0, 10)), ValueError, r"alpha\(step=0\)"),
        (dict(temperature=lambda step: jnp.ones(3)), ValueError, "scalar"),
        (dict(loss=lambda s, t, *, where=None: s), ValueError, "returned shape"),
        (dict(loss="dkd", loss_kwargs={"beta": -8.0}), ValueError, "non-negative"),
        (dict(loss="dist", loss_kwargs={"gamma": -1.0}), ValueError, "non-negative"),
        (dict(loss="dkd", loss_kwargs={"beta": None}), ValueError, "fails with `loss_kwargs`"),
        (
            dict(loss=functools.partial(jaxkd.dkd_loss, betaa=8.0)),
            ValueError,
            "cannot be called",
        ),
    ],
)
def test_objective_rejects_bad_settings(kwargs, error, match):
    with pytest.raises(error, match=match):
        jaxkd.distillation_objective(**kwargs)


@pytest.mark.parametrize(
    "loss, kwargs",
    [
        ("kl", {}),
        ("reverse_kl", {}),
        ("soft_cross_entropy", {}),
        ("jsd", {"beta": 0.5}),
        ("skew_kl", {"alpha": 0.1}),
        ("skew_reverse_kl", {"alpha": 0.1}),
        ("total_variation", {}),
        ("logit_mse", {}),
        ("dkd", {"beta": 8.0}),
        ("dist", {"beta": 2.0, "gamma": 2.0}),
    ],
)
def test_every_distillation_loss_runs_in_the_step(loss, kwargs):
    objective = jaxkd.distillation_objective(loss, alpha=0.5, temperature=2.0, loss_kwargs=kwargs)
    state, teacher_variables, step = _setup(objective=objective)
    new_state, metrics = jax.jit(step)(state, teacher_variables, batch(0))
    chex.assert_tree_all_finite((new_state.params, metrics))
    assert float(metrics["kd_loss"]) >= 0.0


def test_bad_batch_is_a_clear_error():
    state, teacher_variables, step = _setup()
    with pytest.raises(KeyError, match="image"):
        step(state, teacher_variables, {"label": np.zeros(4, np.int32)})
    with pytest.raises(ValueError, match="leading"):
        step(
            state,
            teacher_variables,
            {"image": np.zeros((4, 12), np.float32), "label": np.zeros(3, np.int32)},
        )


def test_without_extra_metrics_the_update_is_the_same_and_only_the_objective_reports():
    state, teacher_variables, full = _setup()
    _, _, lean = _setup(extra_metrics=False)
    data = batch(0)
    full_state, full_metrics = jax.jit(full)(state, teacher_variables, data)
    lean_state, lean_metrics = jax.jit(lean)(state, teacher_variables, data)
    chex.assert_trees_all_close(full_state.params, lean_state.params, rtol=1e-6, atol=0)
    assert set(lean_metrics) == {"loss", "kd_loss", "ce_loss", "alpha", "temperature"}
    assert {"grad_norm", "param_norm", "agreement", "teacher_entropy"} <= set(full_metrics)


@pytest.mark.parametrize(
    "value", [np.float32(0.5), jnp.asarray(0.5), np.float64(0.5), 1, jnp.asarray(1)]
)
def test_objective_takes_numpy_and_jax_scalars(value):
    objective = jaxkd.distillation_objective("kl", alpha=value, temperature=np.float32(2.0))
    state, teacher_variables, step = _setup(objective=objective)
    _, metrics = jax.jit(step)(state, teacher_variables, batch(0))
    np.testing.assert_allclose(metrics["alpha"], float(value))


def test_a_callable_loss_with_its_own_options_equals_the_named_one():
    data = batch(0)
    named = jaxkd.distillation_objective(
        "dkd", alpha=0.6, temperature=4.0, loss_kwargs={"alpha": 2.0, "beta": 3.0}
    )
    partial = jaxkd.distillation_objective(
        functools.partial(jaxkd.dkd_loss, alpha=2.0, beta=3.0), alpha=0.6, temperature=4.0
    )
    default = jaxkd.distillation_objective("dkd", alpha=0.6, temperature=4.0)
    results = []
    for objective in (named, partial, default):
        state, teacher_variables, step = _setup(objective=objective)
        results.append(jax.jit(step)(state, teacher_variables, data)[1]["kd_loss"])
    np.testing.assert_allclose(results[0], results[1], rtol=1e-6)
    # DKD's own alpha (TCKD weight) reaches the loss: 2.0 differs from the default 1.0.
    assert abs(float(results[0]) - float(results[2])) > 1e-4


def test_a_schedule_leaving_the_unit_interval_makes_the_loss_nan():
    alpha = optax.linear_schedule(0.5, -0.5, transition_steps=2)  # 0.5, 0.0, -0.5
    state, teacher_variables, step = _setup(
        objective=jaxkd.hinton_objective(alpha=alpha, temperature=2.0)
    )
    jitted = jax.jit(step)
    losses = []
    for k in range(3):
        state, metrics = jitted(state, teacher_variables, batch(k))
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses[:2]).all() and np.isnan(losses[2])


@pytest.mark.parametrize("loss", ["kl", "dkd"])
def test_out_of_range_labels_never_train_silently_under_jit(loss):
    objective = jaxkd.distillation_objective(loss, alpha=0.5, temperature=2.0)
    state, teacher_variables, step = _setup(objective=objective)
    data = batch(0)
    bad = {**data, "label": data["label"] + 100}
    _, metrics = jax.jit(step)(state, teacher_variables, bad)
    assert np.isnan(float(metrics["ce_loss"])) and np.isnan(float(metrics["loss"]))
    if loss == "dkd":
        assert np.isnan(float(metrics["kd_loss"]))
    # A masked example may hold any padding label; the kept ones train normally.
    mask = np.arange(len(data["label"])) < 10
    padded = {**data, "label": np.where(mask, data["label"], -1), "mask": mask}
    _, metrics = jax.jit(step)(state, teacher_variables, padded)
    chex.assert_tree_all_finite(metrics)
    # Eager calls keep raising.
    with pytest.raises(ValueError, match="must lie in"):
        step(state, teacher_variables, bad)


def test_a_data_parallel_step_needs_an_objective_that_takes_the_axis():
    def local_objective(student_out, teacher_out, batch, step):
        return jnp.mean(student_out), {}

    with pytest.raises(TypeError, match="axis_name"):
        _setup(objective=local_objective, axis_name="data")
    _setup(objective=local_objective)  # fine on one device


def test_a_batch_level_loss_without_axis_name_is_refused_under_data_parallelism():
    def batch_loss(student_logits, teacher_logits, *, where=None):
        return jnp.mean(jnp.square(student_logits - teacher_logits))

    objective = jaxkd.distillation_objective(batch_loss, alpha=0.5, temperature=1.0)
    state, teacher_variables, step = _setup(objective=objective, axis_name="data")
    run = jaxkd.shard_step(step, jaxkd.data_mesh(), donate=False)
    mesh = jaxkd.data_mesh()
    with pytest.raises(ValueError, match="one shard only"):
        run(
            jaxkd.replicate_on_mesh(state, mesh),
            jaxkd.replicate_on_mesh(teacher_variables, mesh),
            jaxkd.shard_batch(batch(0), mesh),
        )


def test_a_bad_label_under_jit_poisons_the_update_too():
    objective = jaxkd.hinton_objective(alpha=0.5, temperature=2.0)
    state, teacher_variables, step = _setup(objective=objective)
    data = batch(0)
    labels = data["label"].copy()
    labels[3] = 7  # one bad label among 16
    new_state, metrics = jax.jit(step)(state, teacher_variables, {**data, "label": labels})
    assert np.isnan(float(metrics["loss"]))
    assert all(np.isnan(leaf).any() for leaf in jax.tree.leaves(new_state.params))


def test_token_masks_of_logits_rank_reduce_like_per_token_masks():
    rng = np.random.default_rng(0)
    student = rng.normal(size=(2, 3, 5)).astype(np.float32)
    teacher = rng.normal(size=(2, 3, 5)).astype(np.float32)
    labels = rng.integers(0, 5, size=(2, 3)).astype(np.int32)
    mask = np.array([[True, True, False], [True, False, False]])
    objective = jaxkd.hinton_objective(alpha=0.5, temperature=2.0)
    per_token = objective(student, teacher, {"label": labels, "mask": mask}, 0)
    broadcast = objective(student, teacher, {"label": labels, "mask": mask[..., None]}, 0)
    chex.assert_trees_all_close(broadcast, per_token, rtol=1e-6)
    kept = mask.ravel()
    expected = jaxkd.hinton_loss(
        student.reshape(6, 5)[kept],
        teacher.reshape(6, 5)[kept],
        labels.ravel()[kept],
        alpha=0.5,
        temperature=2.0,
    ).mean()
    np.testing.assert_allclose(per_token[0], expected, rtol=1e-6)


def test_a_schedule_out_of_range_at_a_concrete_step_names_the_step():
    objective = jaxkd.distillation_objective("kl", temperature=optax.linear_schedule(1.0, 0.0, 10))
    logits = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match=r"temperature\(step=10\).*got 0.0"):
        objective(logits, logits, {"label": jnp.zeros(2, jnp.int32)}, jnp.int32(10))
