"""All jaxkd losses in one namespace: ``from jaxkd import losses``."""

from jaxkd._distributions import entropy, log_softmax, softmax, standardize_logits
from jaxkd._divergences import (
    generalized_jsd,
    kl_divergence,
    logit_mse,
    reverse_kl_divergence,
    skew_kl_divergence,
    skew_reverse_kl_divergence,
    soft_cross_entropy,
    total_variation,
)
from jaxkd._kd_losses import (
    cross_entropy_with_integer_labels,
    dist_loss,
    dkd_loss,
    hinton_loss,
    masked_mean,
)

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
