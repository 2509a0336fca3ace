"""All jaxkd losses in one namespace: ``from jaxkd import losses``.

Logit losses return one value per example; feature losses per example too
(hints, attention transfer); relational and batch losses (RKD, similarity-
preserving, PKT, DIST) return a scalar for the batch. Reductions (masked means
over one device or a data-parallel axis) live here too.
"""

from jaxkd.losses._chunked import ChunkedSums, chunked_distillation_loss
from jaxkd.losses._crd import (
    crd_nce_loss,
    crd_scores,
    init_memory_bank,
    sample_negatives,
    update_memory_bank,
)
from jaxkd.losses._distributions import entropy, log_softmax, softmax, standardize_logits
from jaxkd.losses._divergences import (
    generalized_jsd,
    kl_divergence,
    logit_mse,
    reverse_kl_divergence,
    skew_kl_divergence,
    skew_reverse_kl_divergence,
    soft_cross_entropy,
    total_variation,
)
from jaxkd.losses._feature_losses import attention_transfer_loss, hint_loss
from jaxkd.losses._kd_losses import (
    cross_entropy_with_integer_labels,
    dist_loss,
    dkd_loss,
    hinton_loss,
)
from jaxkd.losses._projection import output_logits
from jaxkd.losses._relational_losses import (
    pkt_loss,
    rkd_angle_loss,
    rkd_distance_loss,
    similarity_preserving_loss,
)
from jaxkd.losses._sparse_teacher import SparseTeacher, tail_bucket_kl, top_k_kl, top_k_teacher
from jaxkd.losses._vocab_parallel import (
    vocab_parallel_cross_entropy,
    vocab_parallel_divergence,
    vocab_parallel_log_softmax,
)
from jaxkd.parallel._reductions import (
    gather_examples,
    masked_mean,
    masked_means,
    masked_sum_and_count,
)

__all__ = [
    "crd_nce_loss",
    "crd_scores",
    "init_memory_bank",
    "sample_negatives",
    "update_memory_bank",
    "SparseTeacher",
    "tail_bucket_kl",
    "top_k_kl",
    "top_k_teacher",
    "ChunkedSums",
    "chunked_distillation_loss",
    "output_logits",
    "attention_transfer_loss",
    "hint_loss",
    "pkt_loss",
    "rkd_angle_loss",
    "rkd_distance_loss",
    "similarity_preserving_loss",
    "cross_entropy_with_integer_labels",
    "dist_loss",
    "dkd_loss",
    "entropy",
    "gather_examples",
    "generalized_jsd",
    "hinton_loss",
    "kl_divergence",
    "log_softmax",
    "logit_mse",
    "masked_mean",
    "masked_means",
    "masked_sum_and_count",
    "reverse_kl_divergence",
    "skew_kl_divergence",
    "skew_reverse_kl_divergence",
    "soft_cross_entropy",
    "softmax",
    "standardize_logits",
    "total_variation",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_divergence",
    "vocab_parallel_log_softmax",
]
