"""The fused chunked losses equal the whole-array ones, and never hold [N, V].

The reference ("naive") builds the full logits with ``output_logits`` and sums
jaxkd's per-token divergence and cross-entropy over the real tokens; both are
tested against numpy references elsewhere (test_divergences.py, test_kd_losses.py).
Gradients are compared for every student input: hidden states, kernel and bias.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxkd
from jaxkd.losses._chunked import chunked_distillation_loss
from jaxkd.losses._divergences import DIVERGENCES
from jaxkd.losses._projection import output_logits
from jaxkd.train._chunked_objective import chunked_distillation_objective


@pytest.fixture(autouse=True)
def _fast_compiles(request):
    """Unoptimized XLA: these tests compile many small programs and run each once.

    The memory and layout tests read the compiled program and keep the optimizer.
    """
    if "no_array" in request.node.name or "strided" in request.node.name:
        yield
        return
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", False)


N, D, D_TEACHER, V = 23, 6, 5, 17  # 23 tokens: chunks of 5 leave a remainder of 3
CHUNK = 5
TOLERANCE = dict(rtol=1e-5, atol=1e-6)
OPTIONS = {"jsd": {"beta": 0.3}, "skew_kl": {"alpha": 0.2}, "skew_reverse_kl": {"alpha": 0.2}}


def _inputs(seed=0, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 7)
    rng = np.random.default_rng(seed)
    return dict(
        hidden=jax.random.normal(keys[0], (N, D), dtype),
        kernel=(jax.random.normal(keys[1], (D, V)) / 2).astype(dtype),
        bias=jax.random.normal(keys[2], (V,)).astype(dtype),
        teacher_hidden=jax.random.normal(keys[3], (N, D_TEACHER)),
        teacher_kernel=jax.random.normal(keys[4], (D_TEACHER, V)),
        labels=jax.random.randint(keys[5], (N,), 0, V),
        # uneven: the first chunk is nearly empty, the remainder full
        where=jnp.asarray(rng.random(N) < np.linspace(0.1, 1.0, N)),
    )


def _naive(
    loss,
    hidden,
    kernel,
    bias,
    teacher_logits,
    labels,
    where,
    *,
    alpha,
    temperature,
    softcap,
    loss_kwargs,
):
    logits = output_logits(hidden, kernel, bias, softcap=softcap)
    kd = DIVERGENCES[loss](
        logits, teacher_logits, temperature=temperature, where=where, **loss_kwargs
    )
    ce = jaxkd.cross_entropy_with_integer_labels(logits, labels, where=where)
    return jnp.sum(jnp.where(where, alpha * kd + (1 - alpha) * ce, 0.0))


@pytest.mark.parametrize("loss", sorted(DIVERGENCES))
def test_value_and_every_gradient_equal_the_naive_loss(loss):
    x = _inputs()
    teacher_logits = 2.0 * jnp.tanh(x["teacher_hidden"] @ x["teacher_kernel"] / 2.0)
    options = dict(alpha=0.7, temperature=2.0, softcap=4.0, loss_kwargs=OPTIONS.get(loss, {}))

    def chunked(hidden, kernel, bias):
        return chunked_distillation_loss(
            hidden,
            kernel,
            x["labels"],
            teacher_logits=teacher_logits,
            student_bias=bias,
            loss=loss,
            where=x["where"],
            chunk_size=CHUNK,
            **options,
        ).loss

    naive = functools.partial(
        _naive,
        loss,
        teacher_logits=teacher_logits,
        labels=x["labels"],
        where=x["where"],
        **options,
    )
    args = (x["hidden"], x["kernel"], x["bias"])
    value, grads = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1, 2)))(*args)
    expected, expected_grads = jax.jit(jax.value_and_grad(naive, argnums=(0, 1, 2)))(*args)
    np.testing.assert_allclose(value, expected, **TOLERANCE)
    for name, got, want in zip(("hidden", "kernel", "bias"), grads, expected_grads, strict=True):
        np.testing.assert_allclose(got, want, **TOLERANCE, err_msg=name)
    assert float(jnp.abs(grads[1]).max()) > 0


def test_teacher_from_hidden_states_with_scale_and_softcap_equals_its_logits():
    x = _inputs(1)
    teacher_logits = output_logits(
        x["teacher_hidden"], x["teacher_kernel"], logit_scale=0.5, softcap=3.0
    )
    common = dict(
        loss="kl",
        alpha=0.5,
        temperature=1.5,
        where=x["where"],
        chunk_size=4,
        logit_scale=2.0,
        with_metrics=True,
    )

    def both(hidden, kernel):
        from_hidden = chunked_distillation_loss(
            hidden,
            kernel,
            x["labels"],
            teacher_hidden=x["teacher_hidden"],
            teacher_kernel=x["teacher_kernel"],
            teacher_logit_scale=0.5,
            teacher_softcap=3.0,
            **common,
        )
        from_logits = chunked_distillation_loss(
            hidden, kernel, x["labels"], teacher_logits=teacher_logits, **common
        )
        return from_hidden.loss, (from_hidden, from_logits)

    grads, (from_hidden, from_logits) = jax.jit(jax.grad(both, argnums=(0, 1), has_aux=True))(
        x["hidden"], x["kernel"]
    )
    for name in from_hidden._fields:
        np.testing.assert_allclose(
            getattr(from_hidden, name), getattr(from_logits, name), **TOLERANCE, err_msg=name
        )
    naive_grads = jax.jit(
        jax.grad(
            lambda h, k: (
                chunked_distillation_loss(
                    h,
                    k,
                    x["labels"],
                    teacher_logits=teacher_logits,
                    **{**common, "chunk_size": None},
                ).loss
            ),
            argnums=(0, 1),
        )
    )(x["hidden"], x["kernel"])
    for got, want in zip(grads, naive_grads, strict=True):
        np.testing.assert_allclose(got, want, **TOLERANCE)
    # the metric sums are those of the whole logits
    logits = x["hidden"] @ x["kernel"] * 2.0
    kept = x["where"]
    np.testing.assert_allclose(from_hidden.count, kept.sum())
    np.testing.assert_allclose(
        from_hidden.student_entropy, jnp.sum(jnp.where(kept, jaxkd.entropy(logits), 0)), rtol=1e-5
    )
    agree = jnp.argmax(logits, -1) == jnp.argmax(teacher_logits, -1)
    np.testing.assert_allclose(from_hidden.agreement, jnp.sum(kept & agree))


def test_masked_tokens_change_neither_value_nor_gradient():
    x = _inputs(2)
    teacher_logits = jax.random.normal(jax.random.key(9), (N, V))
    garbage = ~x["where"][:, None]
    hidden = jnp.where(garbage, 1e3, x["hidden"]).at[0].set(jnp.nan)  # token 0 is masked
    labels = jnp.where(x["where"], x["labels"], V + 7)  # out of range where masked
    kept = np.flatnonzero(np.asarray(x["where"]))

    def loss(hidden, kernel, labels, where):
        return chunked_distillation_loss(
            hidden,
            kernel,
            labels,
            teacher_logits=teacher_logits[jnp.arange(len(hidden))]
            if len(hidden) == N
            else teacher_logits[kept],
            loss="jsd",
            alpha=0.5,
            temperature=2.0,
            where=where,
            chunk_size=CHUNK,
        ).loss

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    value, (d_hidden, d_kernel) = grad(hidden, x["kernel"], labels, x["where"])
    sliced, (d_sliced, d_kernel_sliced) = grad(
        x["hidden"][kept], x["kernel"], x["labels"][kept], None
    )
    np.testing.assert_allclose(value, sliced, **TOLERANCE)
    np.testing.assert_allclose(d_kernel, d_kernel_sliced, **TOLERANCE)
    np.testing.assert_allclose(d_hidden[kept], d_sliced, **TOLERANCE)
    assert not np.any(np.asarray(d_hidden)[~np.asarray(x["where"])])
    assert not x["where"][0] and np.isfinite(value) and np.all(np.isfinite(d_kernel))


def test_traced_options_equal_static_ones():
    x = _inputs(3)
    teacher_logits = jax.random.normal(jax.random.key(4), (N, V))

    def loss(hidden, alpha, temperature, beta):
        return chunked_distillation_loss(
            hidden,
            x["kernel"],
            x["labels"],
            teacher_logits=teacher_logits,
            loss="jsd",
            alpha=alpha,
            temperature=temperature,
            loss_kwargs={"beta": beta},
            where=x["where"],
            chunk_size=CHUNK,
        ).loss

    traced = jax.jit(jax.value_and_grad(loss))
    static = jax.jit(jax.value_and_grad(loss), static_argnums=(1, 2, 3))
    for beta in (0.0, 0.4, 1.0):  # the traced beta selects generalized_jsd's endpoints too
        value, grad = traced(x["hidden"], 0.6, 1.5, beta)
        expected, expected_grad = static(x["hidden"], 0.6, 1.5, beta)
        np.testing.assert_allclose(value, expected, **TOLERANCE)
        np.testing.assert_allclose(grad, expected_grad, **TOLERANCE)


def test_bfloat16_inputs_accumulate_in_float32():
    x32 = _inputs(5)
    x16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16) if a.dtype == jnp.float32 else a, x32)
    teacher_logits = jax.random.normal(jax.random.key(6), (N, V))

    def loss(floats, chunk_size):
        return chunked_distillation_loss(
            floats["hidden"],
            floats["kernel"],
            x32["labels"],
            teacher_logits=teacher_logits,
            student_bias=floats["bias"],
            alpha=0.5,
            where=x32["where"],
            chunk_size=chunk_size,
        ).loss

    floats16 = {name: x16[name] for name in ("hidden", "kernel", "bias")}
    floats32 = jax.tree.map(lambda a: a.astype(jnp.float32), floats16)
    grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    value16, grads16 = grad(floats16, CHUNK)
    value32, grads32 = grad(floats32, None)
    assert value16.dtype == jnp.float32
    np.testing.assert_allclose(value16, value32, rtol=1e-5)  # same bf16 numbers, f32 math
    for name in floats16:
        assert grads16[name].dtype == jnp.bfloat16
        np.testing.assert_allclose(
            grads16[name].astype(jnp.float32), grads32[name], rtol=2e-2, atol=2e-2, err_msg=name
        )


def test_no_array_of_tokens_by_vocabulary_is_live():
    """Compiled temp memory: chunked < one [N, V] float32 array < naive."""
    tokens, d, vocab, chunk = 2048, 32, 2048, 128
    shapes = [jax.ShapeDtypeStruct(s, jnp.float32) for s in ((tokens, d), (d, vocab))]
    teacher = jax.ShapeDtypeStruct((tokens, d), jnp.float32)
    labels = jax.ShapeDtypeStruct((tokens,), jnp.int32)

    def temp_bytes(chunk_size):
        def loss(hidden, kernel, teacher_hidden, labels):
            return chunked_distillation_loss(
                hidden,
                kernel,
                labels,
                teacher_hidden=teacher_hidden,
                teacher_kernel=kernel,
                alpha=0.5,
                chunk_size=chunk_size,
            ).loss

        grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
        compiled = grad.lower(*shapes, teacher, labels).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    one_array = tokens * vocab * 4
    chunked, naive = temp_bytes(chunk), temp_bytes(None)
    assert chunked < one_array / 2 < naive / 4, (chunked, one_array, naive)


def test_the_objective_in_a_data_parallel_step_equals_the_dense_objective_on_one_device():
    batch_size, length = 8, 6
    keys = jax.random.split(jax.random.key(7), 5)
    params = {
        "embed": jax.random.normal(keys[0], (V, D)),
        "kernel": jax.random.normal(keys[1], (D, V)),
    }
    teacher = {
        "embed": jax.random.normal(keys[2], (V, D_TEACHER)),
        "kernel": jax.random.normal(keys[3], (D_TEACHER, V)),
    }
    tokens = jax.random.randint(keys[4], (batch_size, length + 1), 0, V)
    mask = np.zeros((batch_size, length + 1), bool)
    mask[0] = True  # device 0 holds most real tokens; others one or none
    mask[3, :2] = mask[7, :3] = True
    batch = jaxkd.lm.shift_tokens(tokens, jnp.asarray(mask))

    def hidden_apply(params, model_state, inputs, *, train, rng):
        return {
            "hidden": jnp.tanh(params["embed"][inputs]),
            "kernel": params["kernel"],
        }, model_state

    def logits_apply(params, model_state, inputs, *, train, rng):
        out, _ = hidden_apply(params, model_state, inputs, train=train, rng=rng)
        return out["hidden"] @ out["kernel"], model_state

    def teacher_apply(teacher, inputs):
        return {"hidden": teacher["embed"][inputs], "kernel": teacher["kernel"]}

    def teacher_logits_apply(teacher, inputs):
        return teacher["embed"][inputs] @ teacher["kernel"]

    schedule = optax.linear_schedule(0.2, 0.8, 4)  # alpha
    optimizer = optax.sgd(0.5)
    state = jaxkd.TrainState.create(params=params, optimizer=optimizer)
    dense = jaxkd.make_train_step(
        logits_apply,
        teacher_logits_apply,
        jaxkd.distillation_objective(
            "jsd", alpha=0.5, temperature=2.0, label_key="targets", loss_kwargs={"beta": schedule}
        ),
        optimizer,
        input_key="inputs",
    )
    chunked = jaxkd.make_train_step(
        hidden_apply,
        teacher_apply,
        chunked_distillation_objective(
            "jsd", alpha=0.5, temperature=2.0, chunk_size=4, loss_kwargs={"beta": schedule}
        ),
        optimizer,
        input_key="inputs",
        axis_name="data",
    )
    mesh = jaxkd.data_mesh()
    chunked = jaxkd.shard_step(chunked, mesh)
    dense = jax.jit(dense)
    sharded = jaxkd.replicate_on_mesh(state, mesh)
    for _ in range(2):
        state, want = dense(state, teacher, batch)
        sharded, got = chunked(
            sharded, jaxkd.replicate_on_mesh(teacher, mesh), jaxkd.shard_batch(batch, mesh)
        )
        for name in (
            "loss",
            "kd_loss",
            "ce_loss",
            "beta",
            "student_entropy",
            "teacher_entropy",
            "agreement",
            "grad_norm",
        ):
            np.testing.assert_allclose(got[name], want[name], **TOLERANCE, err_msg=name)
    for got, want in zip(
        jax.tree.leaves(sharded.params), jax.tree.leaves(state.params), strict=True
    ):
        np.testing.assert_allclose(got, want, **TOLERANCE)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(student_kernel=np.zeros((D, V + 1), np.float32)), "vocabulary"),
        (dict(student_kernel=np.zeros((D + 1, V), np.float32)), "student_kernel"),
        (dict(teacher_kernel=np.zeros((D_TEACHER, V), np.float32)), "not both"),
        (dict(teacher_logits=None), "not neither"),
        (dict(teacher_logits=np.zeros((N - 1, V), np.float32)), "teacher_logits"),
        (dict(labels=np.zeros((N, 1), np.int32)), "labels"),
        (dict(labels=np.zeros((N,), np.float32)), "labels"),
        (dict(where=np.ones((N,), np.int32)), "where"),
        (dict(where=np.ones((N + 1,), bool)), "where"),
        (dict(student_bias=np.zeros((V + 1,), np.float32)), "student_bias"),
        (dict(labels=np.full((N,), -100, np.int32)), r"labels.*\[0, 17\)"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(labels=None, alpha=0.5), "alpha=1.0"),
        (dict(loss="kld"), "Unknown `loss`"),
        (dict(loss="jsd", loss_kwargs={"betaa": 0.5}), "betaa"),
        (dict(loss="jsd", loss_kwargs={"beta": 1.5}), "beta"),
        (dict(loss_kwargs={"temperature": 2.0}), "may not set"),
        (dict(temperature=0.0), "temperature"),
        (dict(softcap=-1.0), "softcap"),
    ],
)
def test_bad_input_is_refused_by_name(change, message):
    x = _inputs()
    kwargs = dict(
        student_hidden=x["hidden"],
        student_kernel=x["kernel"],
        labels=x["labels"],
        teacher_logits=np.zeros((N, V), np.float32),
        where=x["where"],
        alpha=0.5,
    )
    kwargs.update(change)
    with pytest.raises((ValueError, TypeError), match=message):
        chunked_distillation_loss(**kwargs)


def test_objective_refuses_outputs_without_hidden_states():
    objective = chunked_distillation_objective("kl")
    with pytest.raises(ValueError, match="'hidden'"):
        objective(
            jnp.zeros((2, 3, V)), jnp.zeros((2, 3, V)), {"targets": jnp.zeros((2, 3), jnp.int32)}, 0
        )
    with pytest.raises(ValueError, match="betaa"):
        chunked_distillation_objective("jsd", loss_kwargs={"betaa": 0.1})


def test_traced_options_get_the_gradients_of_the_naive_loss():
    x = _inputs(8)
    teacher_logits = jax.random.normal(jax.random.key(8), (N, V))

    def loss(options, chunk_size):
        return chunked_distillation_loss(
            x["hidden"],
            x["kernel"],
            x["labels"],
            teacher_logits=teacher_logits,
            loss="jsd",
            alpha=options["alpha"],
            temperature=options["temperature"],
            softcap=options["softcap"],
            logit_scale=options["scale"],
            loss_kwargs={"beta": options["beta"]},
            where=x["where"],
            chunk_size=chunk_size,
        ).loss

    options = dict(alpha=0.3, temperature=2.0, softcap=3.0, scale=1.5, beta=0.4)
    grad = jax.jit(jax.grad(loss), static_argnums=1)
    chunked, naive = grad(options, CHUNK), grad(options, None)
    for name in options:
        assert naive[name] != 0, name
        np.testing.assert_allclose(chunked[name], naive[name], **TOLERANCE, err_msg=name)


@pytest.mark.parametrize("check_vma", [True, False])
def test_inside_shard_map_the_global_gradient_is_exact(check_vma):
    """Grad of the global mean inside ``shard_map``; 3 tokens a device, chunks of 1 and 3."""
    mesh = jaxkd.data_mesh()
    tokens = 3 * mesh.size
    x = _inputs(9)
    hidden = jax.random.normal(jax.random.key(10), (tokens, D))
    teacher_logits = jax.random.normal(jax.random.key(11), (tokens, V))
    labels = jax.random.randint(jax.random.key(12), (tokens,), 0, V)
    where = jnp.arange(tokens) % 4 != 1
    spec = jax.sharding.PartitionSpec("data")

    def global_mean(hidden, kernel, teacher_logits, labels, where, chunk_size, axis_name):
        sums = chunked_distillation_loss(
            hidden,
            kernel,
            labels,
            teacher_logits=teacher_logits,
            alpha=0.5,
            where=where,
            chunk_size=chunk_size,
        )
        total, count = sums.loss, sums.count
        if axis_name is not None:
            total, count = jax.lax.psum((total, count), axis_name)
        return total / count

    expected = jax.jit(jax.grad(global_mean, argnums=(0, 1)), static_argnums=(5, 6))(
        hidden, x["kernel"], teacher_logits, labels, where, None, None
    )
    for chunk_size in (1, 3):

        def body(hidden, kernel, teacher_logits, labels, where, chunk_size=chunk_size):
            grads = jax.grad(global_mean, argnums=(0, 1))(
                hidden, kernel, teacher_logits, labels, where, chunk_size, "data"
            )
            if not check_vma:  # the transpose of psum is psum: average, as pmap's users do
                grads = (grads[0], jax.lax.pmean(grads[1], "data"))
            return grads

        sharded = jax.jit(
            jax.shard_map(
                body,
                mesh=mesh,
                in_specs=(spec, jax.sharding.PartitionSpec(), spec, spec, spec),
                out_specs=(spec, jax.sharding.PartitionSpec()),
                check_vma=check_vma,
            )
        )
        got = sharded(hidden, x["kernel"], teacher_logits, labels, where)
        scale = 1.0 if check_vma else mesh.size  # per-device hidden grads of a psum-ed loss
        np.testing.assert_allclose(got[0] / scale, expected[0], **TOLERANCE)
        np.testing.assert_allclose(got[1], expected[1], **TOLERANCE)


def test_strided_chunks_keep_data_parallel_tokens_on_their_devices():
    from jaxkd.losses._chunked import chunk_layout

    assert chunk_layout(24, 5) == (6, 4, 0)  # 4 divides 24 and is > 5 / 2
    assert chunk_layout(23, 5) == (4, 5, 3)  # 23 is prime: a remainder chunk
    assert chunk_layout(8, None) == chunk_layout(8, 100) == (1, 8, 0)
    mesh = jaxkd.data_mesh()
    tokens = 16 * mesh.size
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def loss(hidden, kernel, teacher_hidden, labels):
        return chunked_distillation_loss(
            hidden,
            kernel,
            labels,
            teacher_hidden=teacher_hidden,
            teacher_kernel=kernel,
            alpha=0.5,
            chunk_size=32,
        ).loss

    grad = jax.jit(
        jax.value_and_grad(loss, argnums=(0, 1)),
        in_shardings=(rows, replicated, rows, rows),
    )
    args = (
        jax.ShapeDtypeStruct((tokens, D), jnp.float32),
        jax.ShapeDtypeStruct((D, V), jnp.float32),
        jax.ShapeDtypeStruct((tokens, D), jnp.float32),
        jax.ShapeDtypeStruct((tokens,), jnp.int32),
    )
    text = grad.lower(*args).compile().as_text()
    assert "all-gather" not in text  # contiguous chunks would gather every device's tokens


def test_objective_masks_must_be_boolean_token_masks():
    objective = chunked_distillation_objective("kl", alpha=1.0, label_key=None)
    outputs = {"hidden": jnp.ones((2, 3, D)), "kernel": jnp.ones((D, V))}
    teacher = jnp.zeros((2, 3, V))
    mask = jnp.array([[True, True, False], [True, False, False]])
    loss, _ = objective(outputs, teacher, {"mask": mask}, 0)
    loss_column, _ = objective(outputs, teacher, {"mask": mask[..., None]}, 0)
    np.testing.assert_allclose(loss_column, loss)
    with pytest.raises(TypeError, match="boolean"):
        objective(outputs, teacher, {"mask": mask.astype(jnp.float32)}, 0)
    with pytest.raises(ValueError, match="per-class"):
        objective(outputs, teacher, {"mask": jnp.ones((2, 3, V), bool)}, 0)
