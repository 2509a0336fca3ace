"""jaxkd: knowledge distillation for JAX.

Layer 1, functions on arrays: softened distributions, KD losses and reductions.
Every loss returns one value per example and takes an optional ``where`` mask.
"""

from jaxkd.losses import (
    cross_entropy_with_integer_labels,
    dist_loss,
    dkd_loss,
    entropy,
    generalized_jsd,
    hinton_loss,
    kl_divergence,
    log_softmax,
    logit_mse,
    masked_mean,
    reverse_kl_divergence,
    skew_kl_divergence,
    skew_reverse_kl_divergence,
    soft_cross_entropy,
    softmax,
    standardize_logits,
    total_variation,
)

__version__ = "0.1.0"

__all__ = [
    "cross_entropy_with_integer_labels",
    "dist_loss",
    "dkd_loss",
    "entropy",
    "generalized_jsd",
    "hinton_loss",
    "kl_divergence",
    "log_softmax",
    "logit_mse",
    "masked_mean",
    "reverse_kl_divergence",
    "skew_kl_divergence",
    "skew_reverse_kl_divergence",
    "soft_cross_entropy",
    "softmax",
    "standardize_logits",
    "total_variation",
]
