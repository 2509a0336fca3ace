"""Token-weighted language-model metrics: perplexity, prediction MI and sequence scores."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxkd.losses._kd_losses import cross_entropy_with_integer_labels
from jaxkd.train._step import summarize_eval


def summarize_token_eval(sums: Mapping[str, Any]) -> dict[str, float]:
    """Per-token means of summed eval metrics, plus perplexities.

    Args:
      sums: scalar sums from :func:`jaxkd.make_eval_step` over ``[B, L]``
        targets and mask (one batch's, or many batches' added up), and, with a
        teacher, its ``prediction_joint`` or ``prediction_pairs``: for a
        vocabulary of thousands, build the step with ``prediction_joint="labels"``
        and concatenate the ``[N, 2]`` pairs over batches rather than adding them.

    Returns:
      :func:`jaxkd.summarize_eval`'s means, each per real token (``count`` is the
      number of real target tokens), with ``perplexity = exp(cross_entropy)`` and,
      with a teacher, ``teacher_perplexity``; with the pairs or the joint,
      ``mutual_information`` and ``normalized_mutual_information`` of the
      teacher's and the student's next-token argmaxes over the real tokens.
    """
    summary = summarize_eval(sums)
    summary["perplexity"] = math.exp(summary["cross_entropy"])
    if "teacher_cross_entropy" in summary:
        summary["teacher_perplexity"] = math.exp(summary["teacher_cross_entropy"])
    return summary


def sequence_nll(logits, targets, where) -> tuple[jax.Array, jax.Array]:
    """Summed negative log-likelihood of ``targets`` and the number of tokens scored.

    Scores sampled continuations under a model (e.g. the teacher's NLL of the
    student's samples): per token ``-log softmax(logits)[target]`` where ``where``.

    Args:
      logits: float ``[B, L, V]`` of the scoring model on the sequences' inputs.
      targets: int ``[B, L]``, the next tokens.
      where: bool ``[B, L]``, the tokens to score.

    Returns:
      ``(nll_sum, count)``, float32 scalars; their ratio is the per-token NLL.
    """
    nll = cross_entropy_with_integer_labels(logits, targets, where=where)
    where = jnp.asarray(where, bool)
    return jnp.sum(jnp.where(where, nll, 0.0)), jnp.sum(where.astype(jnp.float32))
