"""Sequence-level and on-policy distillation: batches whose continuations are sampled.

Both are batch transforms run by the train step before the teacher's forward pass
(``make_train_step(..., batch_transform=...)``), outside the differentiated
function, so no gradient flows through sampling:

- sequence-level KD (Kim and Rush, 2016): continuations of the batch's prompts are
  sampled from the teacher and the student is trained on them;
- on-policy GKD (Agarwal et al., 2024): with probability ``lmbda`` a batch's
  continuations are sampled from the current student, then scored by the teacher
  (the objective's divergence); otherwise the data's own continuations are used.

Batches hold shifted tokens (:func:`jaxkd.lm.shift_tokens`): ``inputs`` and
``targets`` ``[B, L]`` and a target ``mask`` ``[B, L]``. The first
``prompt_length`` inputs of every row are the prompt (all real tokens, as in
packed windows); the loss counts only positions whose target is a completion
token, in generated batches and data batches alike.

References:
  Kim and Rush, "Sequence-Level Knowledge Distillation", EMNLP 2016.
  https://arxiv.org/abs/1606.07947

  Agarwal et al., "On-Policy Distillation of Language Models: Learning from
  Self-Generated Mistakes" (GKD), ICLR 2024. https://arxiv.org/abs/2306.13649
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxkd import _checks
from jaxkd.lm._sampling import SampleOutput, sample
from jaxkd.lm._tokens import completion_mask_after, shift_tokens

PyTree = Any
Generate = Callable[[PyTree, jax.Array, jax.Array, jax.Array], SampleOutput]


def make_generate(
    decode: Callable,
    init_cache: Callable[[int, int], PyTree],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    pad_id: int = 0,
) -> Generate:
    """``generate(params, prompt_tokens, prompt_mask, rng) -> SampleOutput``.

    Args:
      decode: the model's cached decode function (see :func:`jaxkd.lm.sample`).
      init_cache: ``init_cache(batch_size, max_length) -> cache``.
      max_new_tokens: N, the number of tokens sampled after each prompt.
      temperature, top_k, top_p, eos_id, pad_id: as in :func:`jaxkd.lm.sample`.

    Returns:
      A function of ``params``, prompts ``[B, P]`` (left-padded), their bool mask
      ``[B, P]`` and an rng key, returning tokens ``[B, P + N]`` and masks.
    """
    if max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be >= 1, got {max_new_tokens}.")

    def generate(params, prompt_tokens, prompt_mask, rng):
        batch_size, prompt_length = prompt_tokens.shape
        return sample(
            decode,
            params,
            prompt_tokens,
            prompt_mask,
            rng=rng,
            max_new_tokens=max_new_tokens,
            cache=init_cache(batch_size, prompt_length + max_new_tokens),
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            eos_id=eos_id,
            pad_id=pad_id,
        )

    return generate


def generated_batch(output: SampleOutput) -> dict[str, jax.Array]:
    """The shifted training batch of sampled sequences: loss on completions only.

    Args:
      output: a sample of ``[B, P + N]`` tokens with ``mask`` (real tokens) and
        ``completion_mask`` (sampled tokens up to and including EOS).

    Returns:
      ``{"inputs", "targets", "mask"}``, each ``[B, P + N - 1]``; ``mask`` is True
      where the target is a real completion token.
    """
    return shift_tokens(output.tokens, output.mask, target_mask=output.completion_mask)


def generation_transform(
    generate: Generate,
    *,
    prompt_length: int,
    lmbda: float = 1.0,
    policy: str = "student",
    input_key: str = "inputs",
    target_key: str = "targets",
    mask_key: str = "mask",
):
    """A train-step batch transform for on-policy GKD or sequence-level KD.

    Args:
      generate: from :func:`make_generate`, sampling ``L + 1 - prompt_length``
        tokens so that a generated batch has the data batch's shapes.
      prompt_length: P, how many leading inputs of each row are the prompt.
      lmbda: probability that a step's batch is generated rather than the data's
        (GKD's lambda; 1.0 always generates). One draw per step, shared by all
        devices of a data-parallel step.
      policy: ``"student"`` (on-policy: ``generate`` gets the student's params as
        the step holds them) or ``"teacher"`` (sequence-level KD: ``generate`` gets
        ``teacher_params`` exactly as passed to the step, e.g. a linen teacher's
        whole variables dict ``{"params": ...}``; its decode must accept that form).
      input_key, target_key, mask_key: the batch's keys.

    Returns:
      ``transform(student_params, teacher_params, batch, rng, *, axis_name=None) ->
      batch``. Sampling uses ``rng`` folded with the device's index on
      ``axis_name``, so devices draw different continuations.
    """
    _checks.check_unit_interval("lmbda", lmbda)
    lmbda = float(lmbda)
    if policy not in ("student", "teacher"):
        raise ValueError(f'`policy` must be "student" or "teacher", got {policy!r}.')
    if prompt_length < 1:
        raise ValueError(f"`prompt_length` must be >= 1, got {prompt_length}.")

    def transform(student_params, teacher_params, batch: Mapping, rng, *, axis_name=None):
        inputs, mask = batch[input_key], batch[mask_key]
        if inputs.ndim != 2:
            raise ValueError(f"`batch[{input_key!r}]` must be [B, L], got {inputs.shape}.")
        length = inputs.shape[1]
        if not 1 <= prompt_length <= length:
            raise ValueError(
                f"`prompt_length`={prompt_length} must be in [1, L] for inputs of shape "
                f"{inputs.shape}."
            )
        coin_rng, sample_rng = jax.random.split(rng)
        if axis_name is not None:
            sample_rng = jax.random.fold_in(sample_rng, jax.lax.axis_index(axis_name))
        params = student_params if policy == "student" else teacher_params
        params = jax.lax.stop_gradient(params)
        prompt = inputs[:, :prompt_length]

        def from_model(_):
            output = generate(params, prompt, jnp.ones(prompt.shape, bool), sample_rng)
            if output.tokens.shape != (inputs.shape[0], length + 1):
                raise ValueError(
                    f"`generate` returned tokens of shape {output.tokens.shape}; a batch "
                    f"with inputs {inputs.shape} and prompt_length={prompt_length} needs "
                    f"max_new_tokens={length + 1 - prompt_length}."
                )
            shifted = generated_batch(output)
            return (
                shifted["inputs"].astype(inputs.dtype),
                shifted["targets"].astype(batch[target_key].dtype),
                shifted["mask"].astype(mask.dtype),
            )

        def from_data(_):
            completion = completion_mask_after(prompt_length, inputs.shape)
            kept = mask.astype(bool) & completion[None, :]
            return inputs, batch[target_key], kept.astype(mask.dtype)

        if lmbda == 1.0:
            new = from_model(None)
        elif lmbda == 0.0:
            new = from_data(None)
        else:
            use_model = jax.random.uniform(coin_rng) < lmbda
            new = jax.lax.cond(use_model, from_model, from_data, None)
        return {**batch, input_key: new[0], target_key: new[1], mask_key: new[2]}

    return transform
