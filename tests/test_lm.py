"""Sequences through the stack: [B, L, V] logits with a [B, L] token mask.

The specification: every token-level mean is over real tokens of the global batch
(prompt and padding positions masked), masked positions change neither values nor
gradients, the next-token shift happens in ``jaxkd.lm.shift_tokens`` only, and a
data-parallel sequence step equals the one-device step with uneven token masks.
"""

from __future__ import annotations

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _reference import kl, log_softmax, random_logits, softmax
from toy import TinyLM, init_lm, token_batch

import jaxkd
from jaxkd.lm import completion_mask_after, sequence_nll, shift_tokens, summarize_token_eval

B, L, V = 3, 5, 9
TOKEN_MASK = np.array(
    [[True, True, True, False, False], [False, True, True, True, True], [True] + [False] * 4]
)


# Per-token references from the papers' formulas, float64, one token at a time.
def _mixture(p, q, weight):
    return weight * p + (1 - weight) * q


def _divergence(name, p_s, p_t, option):
    if name == "kl":
        return kl(p_t, p_s)
    if name == "reverse_kl":
        return kl(p_s, p_t)
    if name == "jsd":
        m = _mixture(p_t, p_s, option)
        return option * kl(p_t, m) + (1 - option) * kl(p_s, m)
    if name == "skew_kl":
        return kl(p_t, _mixture(p_t, p_s, option))
    return 0.5 * np.sum(np.abs(p_t - p_s))  # total variation


def _reference_per_token(name, student_logits, teacher_logits, temperature, option):
    out = np.zeros(student_logits.shape[:-1])
    for index in np.ndindex(*student_logits.shape[:-1]):
        p_s = softmax(student_logits[index], temperature)
        p_t = softmax(teacher_logits[index], temperature)
        # Every divergence carries Hinton's T^2.
        out[index] = _divergence(name, p_s, p_t, option) * temperature**2
    return out


LOSSES = {
    "kl": (jaxkd.kl_divergence, None),
    "reverse_kl": (jaxkd.reverse_kl_divergence, None),
    "jsd": (jaxkd.generalized_jsd, 0.3),
    "skew_kl": (jaxkd.skew_kl_divergence, 0.2),
    "total_variation": (jaxkd.total_variation, None),
}


def _call(name, student_logits, teacher_logits, **kwargs):
    fn, option = LOSSES[name]
    keyword = {"jsd": "beta", "skew_kl": "alpha"}.get(name)
    if keyword:
        kwargs[keyword] = option
    return fn(student_logits, teacher_logits, **kwargs)


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sequence_losses_equal_a_per_token_reference_under_a_mask(name, temperature):
    student, teacher = random_logits(0, (B, L, V)), random_logits(1, (B, L, V))
    per_token = _call(name, student, teacher, where=TOKEN_MASK, temperature=temperature)
    expected = _reference_per_token(name, student, teacher, temperature, LOSSES[name][1])
    np.testing.assert_allclose(
        np.where(TOKEN_MASK, per_token, 0.0),
        np.where(TOKEN_MASK, expected, 0.0),
        rtol=2e-5,
        atol=1e-6,
    )
    np.testing.assert_array_equal(np.asarray(per_token)[~TOKEN_MASK], 0.0)
    # The token mean is over the 9 real tokens, not over B * L = 15 positions.
    mean = jaxkd.masked_mean(per_token, TOKEN_MASK)
    np.testing.assert_allclose(mean, expected[TOKEN_MASK].mean(), rtol=2e-5)


def _objective_loss(name, student, teacher, targets, mask):
    keyword = {"jsd": "beta", "skew_kl": "alpha"}.get(name)
    objective = jaxkd.distillation_objective(
        name,
        alpha=0.7,
        temperature=2.0,
        label_key="targets",
        loss_kwargs={keyword: LOSSES[name][1]} if keyword else None,
    )
    return objective(student, teacher, {"targets": targets, "mask": mask}, 0)[0]


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_masked_tokens_change_neither_the_objective_nor_its_gradient(name):
    student, teacher = random_logits(2, (B, L, V)), random_logits(3, (B, L, V))
    targets = np.random.default_rng(4).integers(0, V, (B, L)).astype(np.int32)
    # Garbage at masked positions: huge logits, out-of-range labels.
    noise = random_logits(5, (B, L, V), scale=1e3)
    student_garbage = np.where(TOKEN_MASK[..., None], student, noise)
    teacher_garbage = np.where(TOKEN_MASK[..., None], teacher, -noise)
    targets_garbage = np.where(TOKEN_MASK, targets, 10_000).astype(np.int32)
    loss = functools.partial(_objective_loss, name)
    value, grad = jax.value_and_grad(loss)(student, teacher, targets, TOKEN_MASK)
    value_g, grad_g = jax.value_and_grad(loss)(
        student_garbage, teacher_garbage, targets_garbage, TOKEN_MASK
    )
    np.testing.assert_allclose(value_g, value, rtol=1e-6)
    np.testing.assert_allclose(grad_g, grad, rtol=1e-5, atol=1e-8)
    np.testing.assert_array_equal(np.asarray(grad)[~TOKEN_MASK], 0.0)
    assert np.all(np.abs(np.asarray(grad)[TOKEN_MASK]).sum(-1) > 0)
    # Slicing out the real tokens gives the same value: the mean is per real token.
    sliced = _objective_loss(
        name, student[TOKEN_MASK], teacher[TOKEN_MASK], targets[TOKEN_MASK], None
    )
    np.testing.assert_allclose(value, sliced, rtol=1e-5)


def test_shift_tokens_pairs_each_input_with_the_next_token():
    tokens = np.array([[1, 2, 3, 4, 0], [7, 8, 9, 0, 0]], np.int32)
    mask = tokens != 0
    prompt = np.zeros_like(mask)
    prompt[:, :2] = True  # the first two tokens of each row are a prompt
    batch = shift_tokens(tokens, mask, target_mask=mask & ~prompt)
    np.testing.assert_array_equal(batch["inputs"], tokens[:, :-1])
    np.testing.assert_array_equal(batch["targets"], tokens[:, 1:])
    # Row 0 predicts 3 and 4 (not the prompt token 2, not padding);
    # row 1 predicts 9 only.
    expected = np.array([[False, True, True, False], [False, True, False, False]])
    np.testing.assert_array_equal(batch["mask"], expected)
    assert isinstance(batch["inputs"], np.ndarray)
    jax_batch = jax.jit(shift_tokens)(jnp.asarray(tokens), jnp.asarray(mask))
    assert isinstance(jax_batch["mask"], jax.Array)
    np.testing.assert_array_equal(jax_batch["mask"], mask[:, :-1] & mask[:, 1:])


def test_shift_tokens_rejects_bad_input():
    with pytest.raises(ValueError, match="L >= 1"):
        shift_tokens(np.array([[3]], np.int32))
    with pytest.raises(ValueError, match="`mask` must have the shape of `tokens`"):
        shift_tokens(np.zeros((2, 4), np.int32), np.ones((2, 3), bool))
    with pytest.raises(TypeError, match="integer ids"):
        shift_tokens(np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="prompt_length"):
        completion_mask_after(6, (2, 5))


def test_a_beta_schedule_equals_the_fixed_beta_at_each_step():
    student, teacher = random_logits(6, (B, L, V)), random_logits(7, (B, L, V))
    batch = {"mask": TOKEN_MASK}
    schedule = optax.linear_schedule(0.0, 1.0, 4)  # 0 (forward KL) ... 1 (reverse KL)
    scheduled = jaxkd.distillation_objective(
        "jsd", alpha=1.0, temperature=1.0, label_key=None, loss_kwargs={"beta": schedule}
    )
    run = jax.jit(lambda step: scheduled(student, teacher, batch, step))
    for step, beta in [(0, 0.0), (1, 0.25), (2, 0.5), (4, 1.0)]:
        fixed = jaxkd.distillation_objective(
            "jsd", alpha=1.0, temperature=1.0, label_key=None, loss_kwargs={"beta": beta}
        )
        value, metrics = run(jnp.int32(step))
        np.testing.assert_allclose(value, fixed(student, teacher, batch, step)[0], rtol=1e-5)
        np.testing.assert_allclose(metrics["beta"], beta, atol=1e-7)
    with pytest.raises(ValueError, match="beta"):
        jaxkd.distillation_objective("jsd", loss_kwargs={"beta": optax.linear_schedule(1.5, 0, 4)})
    # A traced beta outside [0, 1] is NaN, never a silent value.
    outside = jax.jit(lambda b: jaxkd.generalized_jsd(student, teacher, beta=b))(1.5)
    assert np.all(np.isnan(outside))


def test_token_eval_reports_perplexity_per_real_token():
    student, teacher = init_lm(TinyLM(), seed=0), init_lm(TinyLM(width=12), seed=1)
    data = token_batch(0, B, L)
    data["mask"] = TOKEN_MASK
    evaluate = jaxkd.make_eval_step(
        jaxkd.linen_apply(TinyLM()),
        jaxkd.linen_teacher_apply(TinyLM(width=12)),
        input_key="inputs",
        label_key="targets",
    )
    params, model_state = jaxkd.split_linen_variables(student)
    state = jaxkd.TrainState.create(
        params=params, optimizer=optax.sgd(0.1), model_state=model_state
    )
    summary = summarize_token_eval(jax.jit(evaluate)(state, teacher, data))
    student_logits = TinyLM().apply(student, data["inputs"])
    teacher_logits = TinyLM(width=12).apply(teacher, data["inputs"])
    picked = np.take_along_axis(log_softmax(student_logits), data["targets"][..., None], -1)[..., 0]
    nll = -picked[TOKEN_MASK].mean()
    assert summary["count"] == TOKEN_MASK.sum()
    np.testing.assert_allclose(summary["cross_entropy"], nll, rtol=1e-5)
    np.testing.assert_allclose(summary["perplexity"], math.exp(nll), rtol=1e-5)
    teacher_picked = np.take_along_axis(
        log_softmax(teacher_logits), data["targets"][..., None], -1
    )[..., 0]
    np.testing.assert_allclose(
        summary["teacher_perplexity"], math.exp(-teacher_picked[TOKEN_MASK].mean()), rtol=1e-5
    )
    kl_reference = kl(softmax(teacher_logits), softmax(student_logits))[TOKEN_MASK].mean()
    np.testing.assert_allclose(summary["kl"], kl_reference, rtol=1e-4)
    total, count = sequence_nll(student_logits, data["targets"], TOKEN_MASK)
    np.testing.assert_allclose(total / count, nll, rtol=1e-5)


# Data parallelism over tokens: 8 devices with uneven token masks equal one device.
NUM_DEVICES, GLOBAL_BATCH, LENGTH, STEPS = 8, 16, 6, 3


def _uneven_token_mask():
    mask = np.zeros((GLOBAL_BATCH, LENGTH), bool)
    mask[0] = True  # device 0: 6 + 3 real tokens
    mask[1, :3] = True
    mask[9, 2:4] = True  # device 4: 2 tokens; devices 1-3 and 5-7: none except...
    mask[15, 5] = True  # device 7: 1 token
    return mask


def _sequence_batch(k):
    return {**token_batch(k, GLOBAL_BATCH, LENGTH), "mask": _uneven_token_mask()}


def _sequence_setup(axis_name):
    optimizer = optax.sgd(0.5)
    params, model_state = jaxkd.split_linen_variables(init_lm(TinyLM(), seed=2))
    state = jaxkd.TrainState.create(params=params, optimizer=optimizer, model_state=model_state)
    objective = jaxkd.distillation_objective(
        "jsd",
        alpha=0.6,
        temperature=2.0,
        label_key="targets",
        loss_kwargs={"beta": optax.linear_schedule(0.2, 0.8, STEPS)},
    )
    kwargs = dict(input_key="inputs", axis_name=axis_name)
    step = jaxkd.make_train_step(
        jaxkd.linen_apply(TinyLM()),
        jaxkd.linen_teacher_apply(TinyLM(width=12)),
        objective,
        optimizer,
        **kwargs,
    )
    evaluate = jaxkd.make_eval_step(
        jaxkd.linen_apply(TinyLM()),
        jaxkd.linen_teacher_apply(TinyLM(width=12)),
        label_key="targets",
        **kwargs,
    )
    return state, step, evaluate


def _run_sequences(axis_name, place_state, place_batch, wrap):
    teacher = init_lm(TinyLM(width=12), seed=3)
    state, step, evaluate = _sequence_setup(axis_name)
    state, teacher = place_state(state), place_state(teacher)
    run, run_eval = wrap(step, True), wrap(evaluate, False)
    history = []
    for k in range(STEPS):
        state, metrics = run(state, teacher, place_batch(_sequence_batch(k)))
        history.append(metrics)
    return state, history, run_eval(state, teacher, place_batch(_sequence_batch(99)))


@pytest.mark.parametrize("runner", ["pmap", "shard_map"])
def test_data_parallel_sequence_steps_equal_one_device_with_uneven_token_masks(runner):
    assert jax.device_count() == NUM_DEVICES
    expected = _run_sequences(None, lambda x: x, lambda b: b, lambda f, _: jax.jit(f))
    if runner == "pmap":
        state, history, sums = _run_sequences(
            "batch",
            jaxkd.replicate,
            jaxkd.split_for_pmap,
            lambda f, donate: jaxkd.pmap_step(f, axis_name="batch", donate=donate),
        )
        state, history, sums = jax.tree.map(jaxkd.unreplicate, (state, history, sums))
    else:
        mesh = jaxkd.data_mesh()
        state, history, sums = _run_sequences(
            "data",
            functools.partial(jaxkd.replicate_on_mesh, mesh=mesh),
            functools.partial(jaxkd.shard_batch, mesh=mesh),
            lambda f, donate: jaxkd.shard_step(f, mesh, donate=donate),
        )
    chex.assert_trees_all_close(state.params, expected[0].params, rtol=1e-5, atol=1e-6)
    for metrics, reference in zip(history, expected[1], strict=True):
        chex.assert_trees_all_close(metrics, reference, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(sums, expected[2], rtol=1e-5)
    assert float(sums["count"]) == _uneven_token_mask().sum()


# On-policy and sequence-level batches.
PROMPT = 3


def _fake_generate(eos_row0_at):
    """A stand-in sampler: completion tokens from the key; row 0 stops (EOS) early."""

    def generate(params, prompt_tokens, prompt_mask, rng):
        del params
        batch, prompt_length = prompt_tokens.shape
        new = LENGTH + 1 - prompt_length
        completion = jnp.broadcast_to(jnp.arange(1, new + 1, dtype=jnp.int32), (batch, new))
        noise = jax.random.randint(rng, (batch, new), 0, 3, jnp.int32)
        completion = (completion + 4 * noise) % 11  # depends on the key; TinyLM's vocabulary
        done = (
            jnp.arange(new)[None, :] > jnp.where(jnp.arange(batch) == 0, eos_row0_at, new)[:, None]
        )
        completion = jnp.where(done, 0, completion)
        tokens = jnp.concatenate([prompt_tokens, completion], axis=1)
        real = jnp.concatenate([prompt_mask, ~done], axis=1)
        completion_mask = jnp.concatenate([jnp.zeros_like(prompt_mask), ~done], axis=1)
        logprobs = jnp.where(done, 0.0, -1.0)
        return jaxkd.lm.SampleOutput(tokens, real, completion_mask, logprobs)

    return generate


def test_generated_batches_train_on_completion_tokens_up_to_eos_only():
    data = token_batch(0, 4, LENGTH)
    transform = jaxkd.lm.generation_transform(
        _fake_generate(eos_row0_at=1), prompt_length=PROMPT, lmbda=1.0
    )
    out = jax.jit(transform)(None, None, data, jax.random.key(0))
    tokens = np.concatenate(
        [data["inputs"][:, :PROMPT], np.asarray(out["targets"])[:, PROMPT - 1 :]], 1
    )
    np.testing.assert_array_equal(out["inputs"], tokens[:, :-1])  # the prompt is kept
    np.testing.assert_array_equal(out["inputs"][:, :PROMPT], data["inputs"][:, :PROMPT])
    expected = np.zeros((4, LENGTH), bool)
    expected[:, PROMPT - 1 :] = True  # every target after the prompt is a completion...
    expected[0, PROMPT + 1 :] = False  # ...except in row 0 after its EOS (2nd new token)
    np.testing.assert_array_equal(out["mask"], expected)


def test_data_batches_of_a_gkd_step_mask_the_prompt_targets():
    data = token_batch(1, 4, LENGTH)
    data["mask"][1, -2:] = False  # padding stays masked
    transform = jaxkd.lm.generation_transform(
        _fake_generate(eos_row0_at=1), prompt_length=PROMPT, lmbda=0.0
    )
    out = transform(None, None, data, jax.random.key(0))
    np.testing.assert_array_equal(out["inputs"], data["inputs"])
    expected = data["mask"] & (np.arange(LENGTH) >= PROMPT - 1)[None, :]
    np.testing.assert_array_equal(out["mask"], expected)


def test_lmbda_is_the_probability_of_a_generated_batch():
    data = token_batch(2, 2, LENGTH)
    transform = jax.jit(
        jaxkd.lm.generation_transform(_fake_generate(LENGTH), prompt_length=PROMPT, lmbda=0.3)
    )
    generated = [
        not np.array_equal(
            transform(None, None, data, jax.random.key(k))["targets"], data["targets"]
        )
        for k in range(200)
    ]
    assert 0.2 < np.mean(generated) < 0.4


def test_devices_sample_with_different_keys_and_share_the_coin():
    mesh = jaxkd.data_mesh()
    data = token_batch(3, NUM_DEVICES, LENGTH)
    transform = jaxkd.lm.generation_transform(
        _fake_generate(LENGTH), prompt_length=PROMPT, lmbda=0.5
    )

    def body(batch, rng):
        return transform(None, None, batch, rng, axis_name="data")

    from jax.sharding import PartitionSpec as P

    run = jax.jit(
        jax.shard_map(
            body, mesh=mesh, in_specs=(P("data"), P()), out_specs=P("data"), check_vma=False
        )
    )
    for k in range(6):
        out = run(jaxkd.shard_batch(data, mesh), jax.random.key(k))
        changed = [not np.array_equal(out["targets"][d], data["targets"][d]) for d in range(8)]
        assert len(set(changed)) == 1  # one coin for the whole global batch
        if changed[0]:
            completions = {tuple(np.asarray(out["targets"][d, PROMPT:])) for d in range(8)}
            assert len(completions) > 1  # ... and a key per device


def test_an_on_policy_step_samples_from_the_student_without_gradient():
    """GKD with lmbda=1: the student's params reach the sampler; the loss trains on them."""
    seen = {}

    def generate(params, prompt_tokens, prompt_mask, rng):
        seen["params"] = params
        return _fake_generate(LENGTH)(params, prompt_tokens, prompt_mask, rng)

    optimizer = optax.sgd(0.1)
    params, _ = jaxkd.split_linen_variables(init_lm(TinyLM(), seed=0))
    state = jaxkd.TrainState.create(params=params, optimizer=optimizer)
    step = jaxkd.make_train_step(
        jaxkd.linen_apply(TinyLM()),
        jaxkd.linen_teacher_apply(TinyLM(width=12)),
        jaxkd.distillation_objective("jsd", alpha=1.0, temperature=1.0, label_key="targets"),
        optimizer,
        input_key="inputs",
        batch_transform=jaxkd.lm.generation_transform(generate, prompt_length=PROMPT),
    )
    new_state, metrics = jax.jit(step)(
        state, init_lm(TinyLM(width=12), seed=1), token_batch(4, 4, LENGTH)
    )
    assert jax.tree.structure(seen["params"]) == jax.tree.structure(params)
    assert np.isfinite(metrics["loss"]) and metrics["loss"] > 0
    assert not np.allclose(new_state.params["Dense_1"]["kernel"], params["Dense_1"]["kernel"])


def test_sequence_level_kd_samples_from_the_teacher():
    """policy="teacher": the teacher's params reach the sampler (Kim and Rush, 2016)."""
    seen = []

    def generate(params, prompt_tokens, prompt_mask, rng):
        seen.append(params)
        return _fake_generate(LENGTH)(params, prompt_tokens, prompt_mask, rng)

    transform = jaxkd.lm.generation_transform(generate, prompt_length=PROMPT, policy="teacher")
    student, teacher = {"who": jnp.zeros(())}, {"who": jnp.ones(())}
    out = transform(student, teacher, token_batch(5, 2, LENGTH), jax.random.key(0))
    assert len(seen) == 1 and float(seen[0]["who"]) == 1.0
    assert out["mask"][:, : PROMPT - 1].sum() == 0 and out["mask"][:, PROMPT - 1 :].all()
    with pytest.raises(ValueError, match="policy"):
        jaxkd.lm.generation_transform(generate, prompt_length=PROMPT, policy="data")
    with pytest.raises(ValueError, match="lmbda"):
        jaxkd.lm.generation_transform(generate, prompt_length=PROMPT, lmbda=1.5)
