"""Language models: token sequences through the same losses, step and runners.

Logits are ``[B, L, V]`` with a ``[B, L]`` token mask; every jaxkd logit loss,
objective, train and eval step takes them as they are and averages over real
tokens across the data-parallel axis (``psum(sum) / psum(count)``). This
subpackage adds what sequences need besides:

- :func:`shift_tokens`: the one place where ``[B, L + 1]`` windows become
  next-token ``inputs``, ``targets`` and a target ``mask``;
- :func:`sample` / :func:`sample_token`: a jitted sampler over a KV cache
  (temperature, top-k, top-p, EOS);
- :func:`generation_transform`: sequence-level KD (teacher samples) and on-policy
  GKD (student samples with probability ``lmbda``) as a train-step batch
  transform;
- :func:`summarize_token_eval`, :func:`sequence_nll`: per-token metrics and
  perplexity.
"""

from jaxkd.lm._generation import generated_batch, generation_transform, make_generate
from jaxkd.lm._metrics import sequence_nll, summarize_token_eval
from jaxkd.lm._sampling import SampleOutput, sample, sample_token
from jaxkd.lm._tokens import completion_mask_after, shift_tokens

__all__ = [
    "SampleOutput",
    "generated_batch",
    "generation_transform",
    "make_generate",
    "sample",
    "sample_token",
    "completion_mask_after",
    "sequence_nll",
    "shift_tokens",
    "summarize_token_eval",
]
