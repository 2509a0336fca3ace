"""Tests of the causal transformer: shapes, causality, KV-cache decoding, FLOPs, training."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxkd
from experiments.models.transformer import (
    CausalTransformer,
    config_for,
    decode_fn,
    flops_per_token,
    init_cache,
)

CONFIG = config_for("tiny")  # vocab 64, 2 layers, d 32, 2 heads, d_ff 64, max_length 32
BATCH, LENGTH = 2, 12


@pytest.fixture(scope="module")
def model():
    return CausalTransformer(**CONFIG)


def random_params(model, seed=0):
    """Params of the model's structure drawn with numpy, N(0, 1/fan_in) (norm scales 1).

    Cheaper than compiling ``model.init`` (threefry) on a busy CPU.
    """
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        if path[-1].key == "scale":
            return jnp.ones(leaf.shape, leaf.dtype)
        fan_in = leaf.shape[-1] if path[-1].key == "embedding" else leaf.shape[0]
        return jnp.asarray(rng.normal(0.0, fan_in**-0.5, leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes["params"])


@pytest.fixture(scope="module")
def params(model):
    return random_params(model)


@pytest.fixture(scope="module")
def apply(model):
    """The jitted training call ``apply(params, tokens, **kwargs) -> logits``."""
    return jax.jit(lambda p, x, **kwargs: model.apply({"params": p}, x, **kwargs))


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.key(1), (BATCH, LENGTH), 0, CONFIG["vocab_size"])


def _arange_positions(batch, length, start=0):
    return jnp.broadcast_to(jnp.arange(start, start + length)[None, :], (batch, length))


def test_logits_shape_and_dtype(apply, params, tokens):
    logits = apply(params, tokens)
    assert logits.shape == (BATCH, LENGTH, CONFIG["vocab_size"])
    assert logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()


def test_bfloat16_model_returns_float32_logits(params, tokens):
    model = CausalTransformer(**CONFIG, dtype=jnp.bfloat16)
    logits = jax.eval_shape(model.apply, {"params": params}, tokens)
    assert logits.shape == (BATCH, LENGTH, CONFIG["vocab_size"])
    assert logits.dtype == jnp.float32


@pytest.mark.parametrize("j", [0, 5, LENGTH - 1])
def test_causal(apply, params, tokens, j):
    changed = tokens.at[:, j].set((tokens[:, j] + 1) % CONFIG["vocab_size"])
    before = apply(params, tokens)
    after = apply(params, changed)
    np.testing.assert_array_equal(before[:, :j], after[:, :j])
    assert not np.allclose(before[:, j], after[:, j])


def test_decode_on_fresh_cache_equals_training_call(model, apply, params, tokens):
    full = apply(params, tokens)
    logits, cache = jax.jit(decode_fn(model))(
        params,
        tokens,
        _arange_positions(BATCH, LENGTH),
        jnp.ones((BATCH, 20), bool),
        init_cache(model, BATCH, 20),
        0,
    )
    np.testing.assert_allclose(logits, full, atol=1e-5)
    # the keys went into the first LENGTH slots only
    assert np.abs(np.asarray(cache[0]["key"][:, :LENGTH])).sum() > 0
    np.testing.assert_array_equal(cache[0]["key"][:, LENGTH:], 0)


def test_incremental_decode_equals_full_call(model, apply, params, tokens):
    full = apply(params, tokens)
    decode = jax.jit(decode_fn(model))
    cache = init_cache(model, BATCH, LENGTH)
    key_mask = jnp.ones((BATCH, LENGTH), bool)
    steps = []
    for i in range(LENGTH):
        logits, cache = decode(
            params, tokens[:, i : i + 1], _arange_positions(BATCH, 1, i), key_mask, cache, i
        )
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5)


def test_left_padding_with_positions_and_key_mask_equals_unpadded(apply, params, tokens):
    pad = 3
    padded = jnp.concatenate([jnp.full((BATCH, pad), 7), tokens], axis=1)
    key_mask = jnp.arange(pad + LENGTH)[None, :] >= pad
    key_mask = jnp.broadcast_to(key_mask, padded.shape)
    positions = jnp.maximum(jnp.cumsum(key_mask, axis=1) - 1, 0)
    logits = apply(params, padded, positions=positions, key_mask=key_mask)
    full = apply(params, tokens)
    np.testing.assert_allclose(logits[:, pad:], full, atol=1e-5)


def test_tied_and_untied_param_counts(params):
    d, f, vocab, layers = CONFIG["d_model"], CONFIG["d_ff"], CONFIG["vocab_size"], 2
    tied = jaxkd.count_params(params)
    # embedding + per layer (qkv, out, two MLP matrices, two norm scales) + final norm
    assert tied == vocab * d + layers * (4 * d * d + 2 * d * f + 2 * d) + d
    untied = CausalTransformer(**CONFIG, tie_embeddings=False)
    tokens = jnp.zeros((1, 4), jnp.int32)
    untied_params = jax.eval_shape(untied.init, jax.random.key(0), tokens)["params"]
    assert jaxkd.count_params(untied_params) == tied + vocab * d
    assert untied_params["head"].shape == (d, vocab)
    logits = jax.eval_shape(untied.apply, {"params": untied_params}, tokens)
    assert logits.shape == (1, 4, vocab)


def test_flops_per_token_against_xla():
    """The dense count is within 10% of XLA's (which adds norms, softmax, RoPE, GELU)."""
    seq_len = 32
    model = CausalTransformer(**config_for("tiny", vocab_size=256))
    tokens = jax.ShapeDtypeStruct((2, seq_len), jnp.int32)
    variables = jax.eval_shape(model.init, jax.random.key(0), tokens)
    compiled = jax.jit(lambda v, x: model.apply(v, x)).lower(variables, tokens).compile()
    xla = jaxkd.compiled_flops(compiled)
    if xla is None:
        pytest.skip("no cost analysis on this backend")
    dense = flops_per_token(model, seq_len, causal=False)
    assert abs(xla / (2 * seq_len) - dense) / dense < 0.10
    # the causal count drops the masked half of the scores/values matrices
    d = model.d_model
    assert dense - flops_per_token(model, seq_len) == model.num_layers * 2 * d * (seq_len - 1)


def test_sgd_lowers_the_loss_on_a_repetitive_sequence(model, params):
    sequence = jnp.tile(jnp.arange(8), 4)[None, :]  # [1, 32]: 0..7 repeated
    inputs, targets = sequence[:, :-1], sequence[:, 1:]

    def loss_fn(p):
        logits = model.apply({"params": p}, inputs, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    optimizer = optax.sgd(0.5)

    @jax.jit
    def step(p, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(p, updates), opt_state, loss

    p, opt_state = params, optimizer.init(params)
    losses = []
    for _ in range(10):
        p, opt_state, loss = step(p, opt_state)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]


def test_bad_configuration_and_lengths(model, params):
    with pytest.raises(ValueError, match="num_heads"):
        model_3_heads = CausalTransformer(**config_for("tiny", num_heads=3))
        jax.eval_shape(model_3_heads.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    with pytest.raises(ValueError, match="max_length"):
        too_long = jnp.zeros((1, CONFIG["max_length"] + 1), jnp.int32)
        jax.eval_shape(model.apply, {"params": params}, too_long)
    with pytest.raises(ValueError, match="config_for|unknown size"):
        config_for("huge")


def test_hidden_outputs_in_a_chunked_step_equal_logits_in_a_dense_step(model, params):
    """``return_hidden=True`` with the chunked objective: the same SGD step as logits."""
    teacher_params = random_params(model, seed=3)
    batch = jaxkd.lm.shift_tokens(
        jax.random.randint(jax.random.key(2), (BATCH, LENGTH + 1), 0, CONFIG["vocab_size"]),
        jnp.arange(LENGTH + 1)[None, :] < jnp.array([[LENGTH + 1], [5]]),
    )

    def student(return_hidden):
        def apply(p, model_state, inputs, *, train, rng):
            return model.apply({"params": p}, inputs, return_hidden=return_hidden), model_state

        return apply

    def teacher(p, inputs):
        return model.apply({"params": p}, inputs)

    optimizer = optax.sgd(1.0)
    state = jaxkd.TrainState.create(params=params, optimizer=optimizer)
    objectives = {
        True: jaxkd.chunked_distillation_objective("kl", alpha=0.5, chunk_size=5),
        False: jaxkd.distillation_objective("kl", alpha=0.5, temperature=1.0, label_key="targets"),
    }
    results = {}
    for hidden, objective in objectives.items():
        step = jaxkd.make_train_step(
            student(hidden), teacher, objective, optimizer, input_key="inputs"
        )
        results[hidden] = jax.jit(step)(state, teacher_params, batch)
    (chunked, chunked_metrics), (dense, dense_metrics) = results[True], results[False]
    for name in ("loss", "kd_loss", "ce_loss", "agreement", "student_entropy", "grad_norm"):
        np.testing.assert_allclose(chunked_metrics[name], dense_metrics[name], rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        chunked.params,
        dense.params,
    )
    with pytest.raises(ValueError, match="return_hidden"):
        model.apply(
            {"params": params},
            batch["inputs"],
            return_hidden=True,
            cache=init_cache(model, BATCH, LENGTH),
        )
