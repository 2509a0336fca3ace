"""Tests of the KV-cache sampler against full recomputation and numpy references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.models.transformer import CausalTransformer, config_for, decode_fn, init_cache
from jaxkd.lm._sampling import SampleOutput, filter_logits, sample, sample_token

VOCAB = 64
NEW = 5
# Left-padded prompts of lengths 6, 4 and 1.
PROMPT_MASK = np.array(
    [[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]],
    bool,
)
BATCH, PROMPT = PROMPT_MASK.shape


@pytest.fixture(scope="module")
def model():
    return CausalTransformer(**config_for("tiny", num_layers=1))


@pytest.fixture(scope="module")
def params(model):
    """N(0, 1/fan_in) params drawn with numpy (no compiled init needed)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        if path[-1].key == "scale":
            return jnp.ones(leaf.shape, leaf.dtype)
        fan_in = leaf.shape[-1] if path[-1].key == "embedding" else leaf.shape[0]
        return jnp.asarray(2 * rng.normal(0.0, fan_in**-0.5, leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes["params"])


@pytest.fixture(scope="module")
def decode(model):
    return decode_fn(model)


@pytest.fixture(scope="module")
def prompts():
    tokens = np.random.default_rng(1).integers(1, VOCAB, PROMPT_MASK.shape)
    return jnp.asarray(np.where(PROMPT_MASK, tokens, 0), jnp.int32), jnp.asarray(PROMPT_MASK)


STATIC = ("temperature", "top_k", "top_p")
# Jitted once per sampling setting: cheaper than compiling each primitive eagerly.
jit_sample_token = jax.jit(sample_token, static_argnames=STATIC)
jit_filter_logits = jax.jit(filter_logits, static_argnames=STATIC)


@functools.partial(jax.jit, static_argnames=STATIC)
def reference_draw(logits_BxV, rng, **sampling):
    """``(token, log-prob under the filtered distribution)`` of one step, per row."""
    token = sample_token(logits_BxV, rng, **sampling)
    log_probs = jax.nn.log_softmax(filter_logits(logits_BxV, **sampling), axis=-1)
    return token, jnp.take_along_axis(log_probs, token[:, None], axis=-1)[:, 0]


@pytest.fixture(scope="module")
def full_apply(model):
    """The model's uncached call with positions and key mask, jitted once."""
    return jax.jit(
        lambda p, x, pos, mask: model.apply({"params": p}, x, positions=pos, key_mask=mask)
    )


def recompute(
    full_apply, params, prompt_tokens, prompt_mask, rng, *, eos_id=None, pad_id=0, **sampling
):
    """Reference: rerun the model without a cache on the sequence so far for each new token.

    The sequence is kept at its final length [B, P + NEW] (one compiled shape); the
    columns after the current one are zeros, which a causal model never looks at.
    """
    batch, prompt_len = prompt_tokens.shape
    tokens = np.zeros((batch, prompt_len + NEW), np.int32)
    tokens[:, :prompt_len] = prompt_tokens
    key_mask = np.concatenate([np.asarray(prompt_mask), np.ones((batch, NEW), bool)], 1)
    positions = np.maximum(np.cumsum(key_mask, axis=1) - 1, 0)
    done = np.zeros(batch, bool)
    logprobs, real = [], []
    for i in range(NEW):
        logits = full_apply(params, tokens, positions, key_mask)[:, prompt_len + i - 1]
        step_rng = jax.random.fold_in(rng, i)
        token, logprob = map(np.asarray, reference_draw(logits, step_rng, **sampling))
        token = np.where(done, pad_id, token)
        logprobs.append(np.where(done, 0.0, logprob))
        real.append(~done)
        if eos_id is not None:
            done = done | (token == eos_id)
        tokens[:, prompt_len + i] = token
    return tokens, np.stack(logprobs, 1), np.stack(real, 1)


SETTINGS = [
    dict(temperature=0.0),
    dict(temperature=0.7, top_k=10, top_p=0.9),
]


@pytest.mark.parametrize("sampling", SETTINGS, ids=lambda s: "-".join(map(str, s.values())))
def test_cached_sampling_equals_recomputation(model, params, decode, full_apply, prompts, sampling):
    """Same tokens, log-probs and masks as recomputation, EOS included."""
    prompt_tokens, prompt_mask = prompts
    rng = jax.random.key(7)
    without_eos, _, _ = recompute(full_apply, params, prompt_tokens, prompt_mask, rng, **sampling)
    eos_id = int(without_eos[0, PROMPT + 1])  # row 0 stops at its second new token
    tokens, logprobs, real = recompute(
        full_apply, params, prompt_tokens, prompt_mask, rng, eos_id=eos_id, pad_id=63, **sampling
    )
    assert not real[0, 2:].any() and (tokens[0, PROMPT + 2 :] == 63).all()
    out = sample(
        decode,
        params,
        prompt_tokens,
        prompt_mask,
        rng=rng,
        max_new_tokens=NEW,
        cache=init_cache(model, BATCH, PROMPT + NEW + 2),
        eos_id=eos_id,
        pad_id=63,
        **sampling,
    )
    np.testing.assert_array_equal(out.tokens, tokens)
    np.testing.assert_allclose(out.logprobs, logprobs, atol=1e-5)
    np.testing.assert_array_equal(out.completion_mask[:, PROMPT:], real)
    np.testing.assert_array_equal(out.mask[:, PROMPT:], real)
    np.testing.assert_array_equal(out.mask[:, :PROMPT], PROMPT_MASK)
    assert not np.asarray(out.completion_mask[:, :PROMPT]).any()
    assert out.tokens.dtype == jnp.int32 and out.logprobs.dtype == jnp.float32
    assert out.mask.shape == out.completion_mask.shape == (BATCH, PROMPT + NEW)
    if sampling["temperature"] == 0:
        np.testing.assert_array_equal(out.logprobs, 0.0)  # greedy: a point mass
    else:
        assert (np.asarray(out.logprobs) <= 0).all()
        assert (np.asarray(out.logprobs)[real] < 0).any()


# A stand-in model whose next token is always (token + 1) % V, strongly, with a cache
# of the tokens it has seen; it counts how often it is traced.
TRACES = []


def successor_decode(params, tokens_BxT, positions_BxT, key_mask_BxS, cache, index):
    TRACES.append(tokens_BxT.shape)
    cache = {"tokens": jax.lax.dynamic_update_slice(cache["tokens"], tokens_BxT, (0, index))}
    logits = params["scale"] * jax.nn.one_hot((tokens_BxT + 1) % VOCAB, VOCAB)
    return logits, cache


def successor_cache(batch, slots):
    return {"tokens": jnp.zeros((batch, slots), jnp.int32)}


def test_eos_is_kept_and_later_tokens_are_padding():
    prompt_tokens = jnp.array([[9, 1, 2], [0, 9, 5], [0, 0, 4]], jnp.int32)
    prompt_mask = jnp.array([[1, 1, 1], [0, 1, 1], [0, 0, 1]], bool)
    out = sample(
        successor_decode,
        {"scale": jnp.float32(100.0)},
        prompt_tokens,
        prompt_mask,
        rng=jax.random.key(0),
        max_new_tokens=5,
        cache=successor_cache(3, 8),
        temperature=0.0,
        eos_id=5,
        pad_id=63,
    )
    assert isinstance(out, SampleOutput)
    np.testing.assert_array_equal(
        out.tokens,
        [[9, 1, 2, 3, 4, 5, 63, 63], [0, 9, 5, 6, 7, 8, 9, 10], [0, 0, 4, 5, 63, 63, 63, 63]],
    )
    np.testing.assert_array_equal(
        out.completion_mask[:, 3:],
        [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]],
    )
    np.testing.assert_array_equal(out.mask[:, :3], prompt_mask)
    np.testing.assert_array_equal(out.mask[:, 3:], out.completion_mask[:, 3:])
    np.testing.assert_array_equal(out.logprobs, 0.0)


def test_jit_does_not_retrace_a_new_key_changes_the_sample_and_outer_jit_agrees():
    TRACES.clear()
    params = {"scale": jnp.float32(0.0)}  # uniform next-token distribution
    prompt_mask = jnp.array([[0, 1], [1, 1], [1, 1], [0, 1]], bool)

    def run(params, prompt, prompt_mask, rng):
        return sample(
            successor_decode,
            params,
            prompt,
            prompt_mask,
            rng=rng,
            max_new_tokens=6,
            cache=successor_cache(4, 8),
        )

    first = run(params, jnp.full((4, 2), 1, jnp.int32), prompt_mask, jax.random.key(0))
    assert len(TRACES) == 2  # the prefill and the scanned step, traced once each
    prompt = jnp.full((4, 2), 2, jnp.int32)
    second = run(params, prompt, prompt_mask, jax.random.key(1))
    assert len(TRACES) == 2
    # two keys agree on 24 uniform draws from 64 tokens with probability 64^-24
    assert not np.array_equal(first.tokens[:, 2:], second.tokens[:, 2:])
    np.testing.assert_allclose(first.logprobs, -np.log(VOCAB), rtol=1e-6)
    # called inside the caller's jit (traced mask: the eager mask check is skipped)
    jitted = jax.jit(run)(params, prompt, prompt_mask, jax.random.key(1))
    jax.tree.map(np.testing.assert_array_equal, second, jitted)


def numpy_kept(logits, temperature, top_k, top_p):
    """The set of token ids top-k then top-p keep, from the definitions."""
    z = np.asarray(logits, np.float64) / temperature
    order = np.argsort(-z, kind="stable")
    if top_k is not None:
        order = order[:top_k]
    if top_p is not None:
        probs = np.exp(z[order] - z[order].max())
        mass = np.cumsum(probs / probs.sum())
        order = order[: int(np.searchsorted(mass, top_p)) + 1]  # smallest prefix reaching p
    return set(order.tolist())


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [
        (1.0, 7, None),
        (0.5, None, 0.3),
        (2.0, None, 0.95),
        (1.0, 20, 0.6),
        (1.0, VOCAB, 1.0),
    ],
)
def test_filter_logits_keeps_what_the_definitions_keep(temperature, top_k, top_p):
    logits = jax.random.normal(jax.random.key(0), (16, VOCAB)) * 2
    filtered = np.asarray(
        jit_filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    )
    for row, logit_row in zip(filtered, np.asarray(logits), strict=True):
        kept = set(np.flatnonzero(np.isfinite(row)).tolist())
        assert kept == numpy_kept(logit_row, temperature, top_k, top_p)
        keep = np.array(sorted(kept))
        np.testing.assert_allclose(row[keep], logit_row[keep] / temperature, rtol=1e-6)


def test_draws_follow_the_filtered_distribution():
    logits = jnp.log(jnp.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04]))[None, :]
    many = jnp.tile(logits, (10000, 1))
    draws = np.asarray(jit_sample_token(many, jax.random.key(0), top_k=4, top_p=0.75))
    # top-k keeps 4 (mass 0.9), renormalized 0.444, 0.278, 0.167, 0.111; the first two
    # have mass 0.722 < 0.75, so top-p keeps 3
    expected = np.array([0.4, 0.25, 0.15]) / 0.8
    frequencies = np.bincount(draws, minlength=6) / len(draws)
    np.testing.assert_array_equal(frequencies[3:], 0)
    np.testing.assert_allclose(frequencies[:3], expected, atol=0.02)


def test_temperature_zero_is_argmax():
    logits = jax.random.normal(jax.random.key(1), (32, VOCAB))
    for seed in range(2):
        tokens = jit_sample_token(logits, jax.random.key(seed), temperature=0.0, top_k=3, top_p=0.5)
        np.testing.assert_array_equal(tokens, np.argmax(logits, axis=-1))
        assert tokens.dtype == jnp.int32


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_k=VOCAB + 1), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
    ],
)
def test_bad_sampling_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        sample_token(jnp.zeros((2, VOCAB)), jax.random.key(0), **kwargs)


def test_bad_sample_arguments():
    params = {"scale": jnp.float32(1.0)}
    prompt = jnp.ones((2, 3), jnp.int32)
    left = jnp.array([[0, 1, 1], [1, 1, 1]], bool)

    def run(prompt_mask=left, max_new_tokens=2, cache=None, **kwargs):
        cache = successor_cache(2, 5) if cache is None else cache
        return sample(
            successor_decode,
            params,
            prompt,
            prompt_mask,
            rng=jax.random.key(0),
            max_new_tokens=max_new_tokens,
            cache=cache,
            **kwargs,
        )

    with pytest.raises(ValueError, match="LEFT"):
        run(prompt_mask=jnp.array([[1, 1, 0], [1, 1, 1]], bool))
    with pytest.raises(ValueError, match="LEFT"):
        run(prompt_mask=jnp.array([[1, 0, 1], [1, 1, 1]], bool))
    with pytest.raises(ValueError, match="cache"):
        run(max_new_tokens=3)
    with pytest.raises(ValueError, match="cache"):
        run(cache=successor_cache(3, 5))
    with pytest.raises(ValueError, match="max_new_tokens"):
        run(max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        run(top_p=2.0)
    with pytest.raises(ValueError, match="prompt_mask"):
        run(prompt_mask=jnp.ones((2, 4), bool))


def test_masked_vocabulary_entries_stay_out():
    logits = jax.random.normal(jax.random.key(2), (16, VOCAB))
    logits = jnp.where(jnp.arange(VOCAB)[None, :] % 2 == 1, -jnp.inf, logits)
    filtered = np.asarray(jit_filter_logits(logits, temperature=1.0, top_k=VOCAB, top_p=1.0))
    assert not np.isnan(filtered).any()
    np.testing.assert_array_equal(np.isfinite(filtered), np.isfinite(np.asarray(logits)))
    draws = np.asarray(jit_sample_token(logits, jax.random.key(0), top_k=7, top_p=0.75))
    assert (draws % 2 == 0).all()
