"""Relational distillation losses: how each network arranges a batch.

They compare distances, angles or similarities between the examples of a batch, so,
like ``dist_loss``, they are a property of the whole batch and return a scalar:
``rkd_distance_loss``, ``rkd_angle_loss``, ``similarity_preserving_loss`` and
``pkt_loss``. Masks, dtypes and safe norms follow :mod:`jaxkd.losses._feature_losses`.

Under data parallelism each takes ``axis_name``: the embeddings (and the mask) of
every device are gathered over that axis first, so that the relations, the value
and the gradient are those of the global batch, as on one device. Without it the
loss is that of the local shard only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxkd import _checks
from jaxkd.losses._feature_losses import (
    _HIGHEST,
    _pair_mask,
    _prepare_pair,
    _safe_divide,
    _safe_normalize,
)
from jaxkd.losses._kd_losses import _safe_norm
from jaxkd.parallel._reductions import gather_examples, masked_mean


def _relational_pair(student_embeddings, teacher_embeddings, where):
    """Checks ``[B, D_s]`` / ``[B, D_t]`` embeddings; returns them (masked) and ``kept``."""
    return _prepare_pair(
        ("student_embeddings", "teacher_embeddings"),
        student_embeddings,
        teacher_embeddings,
        rank=2,
        layout="[batch, features]",
        where=where,
    )


def _normalized_distances(embeddings: jax.Array, pairs: jax.Array) -> jax.Array:
    """``[B, B]`` Euclidean distances divided by their mean over ``pairs``."""
    differences = embeddings[:, None, :] - embeddings[None, :, :]
    distances = _safe_norm(differences, axis=-1)
    return _safe_divide(distances, masked_mean(distances, pairs))


def rkd_distance_loss(
    student_embeddings, teacher_embeddings, *, where=None, axis_name: str | None = None
) -> jax.Array:
    r"""Distance-wise relational distillation (RKD-D).

    With :math:`\psi(e_i, e_j) = \|e_i - e_j\|_2 / \mu`, :math:`\mu` the mean of the
    distances over the distinct pairs of the batch, and :math:`\ell_1` the Huber loss
    with :math:`\delta = 1` (smooth L1):

    .. math::
      \frac{1}{n(n-1)} \sum_{i \ne j} \ell_1\left(\psi(s_i, s_j) - \psi(t_i, t_j)\right)

    over the ``n`` kept examples. The paper sums over all pairs; the authors' code
    averages over all ``B * B`` entries, whose zero diagonal makes that value
    ``(n - 1) / n`` times this one, and takes :math:`\mu` over the positive distances
    only (the same unless two embeddings coincide). Computed from the ``[B, B, D]``
    differences, exact (not from a Gram matrix) and safe at coincident points.

    Args:
      student_embeddings: float array ``[B, D_s]``.
      teacher_embeddings: float array ``[B, D_t]``; ``D_t`` may differ from ``D_s``.
      where: optional bool ``[B]`` mask of the examples taking part.
      axis_name: the data-parallel axis to gather the batch over, or ``None``.

    Returns:
      A non-negative scalar; 0 with fewer than two kept examples.

    Examples:
      >>> import jax.numpy as jnp, jaxkd
      >>> e = jnp.array([[0.0, 0.0], [3.0, 4.0], [6.0, 0.0]])
      >>> s = jnp.array([[0.0, 0.0], [3.0, 1.0], [6.0, 0.0]])
      >>> jaxkd.rkd_distance_loss(s, e).round(4)
      Array(0.0281, dtype=float32)
      >>> jaxkd.rkd_distance_loss(10.0 * e, e).round(4)  # scale does not matter
      Array(0., dtype=float32)

    References:
      Park, Kim, Lu and Cho, "Relational Knowledge Distillation", CVPR 2019.
      https://arxiv.org/abs/1904.05068
    """
    student_embeddings, teacher_embeddings, where = (
        gather_examples(x, axis_name) for x in (student_embeddings, teacher_embeddings, where)
    )
    student, teacher, kept = _relational_pair(student_embeddings, teacher_embeddings, where)
    pairs = _pair_mask(kept)
    errors = optax.losses.huber_loss(
        _normalized_distances(student, pairs), _normalized_distances(teacher, pairs), delta=1.0
    )
    return masked_mean(errors, pairs)


def _angles(embeddings: jax.Array) -> jax.Array:
    """``[B, B, B]`` cosines: entry ``[j, i, k]`` is the angle at ``e_j`` of ``(e_i, e_k)``."""
    directions = _safe_normalize(embeddings[None, :, :] - embeddings[:, None, :])
    return jnp.einsum("jid,jkd->jik", directions, directions, precision=_HIGHEST)


def rkd_angle_loss(
    student_embeddings, teacher_embeddings, *, where=None, axis_name: str | None = None
) -> jax.Array:
    r"""Angle-wise relational distillation (RKD-A).

    With :math:`\psi(e_i, e_j, e_k) = \cos\angle e_i e_j e_k = \langle
    \frac{e_i - e_j}{\|e_i - e_j\|}, \frac{e_k - e_j}{\|e_k - e_j\|} \rangle` and
    :math:`\ell_1` the Huber loss with :math:`\delta = 1`:

    .. math::
      \frac{1}{n(n-1)(n-2)} \sum_{i, j, k \text{ distinct}}
        \ell_1\left(\psi(s_i, s_j, s_k) - \psi(t_i, t_j, t_k)\right)

    over the ``n`` kept examples. The paper sums over all triplets; the authors' code
    averages over all ``B**3`` entries, where the degenerate ones (two equal indices)
    contribute 0, so its value is ``(n-1)(n-2)/n**2`` times this one. An edge of zero
    length (coincident embeddings) has the zero direction, hence cosine 0. Invariant
    to translating, rotating and scaling either set of embeddings. Uses
    ``[B, B, D]`` and ``[B, B, B]`` intermediates.

    Args:
      student_embeddings: float array ``[B, D_s]``.
      teacher_embeddings: float array ``[B, D_t]``; ``D_t`` may differ from ``D_s``.
      where: optional bool ``[B]`` mask of the examples taking part.
      axis_name: the data-parallel axis to gather the batch over, or ``None``.

    Returns:
      A non-negative scalar; 0 with fewer than three kept examples.

    Examples:
      >>> import jax.numpy as jnp, jaxkd
      >>> e = jnp.array([[0.0, 0.0], [3.0, 4.0], [6.0, 0.0]])
      >>> s = jnp.array([[0.0, 0.0], [3.0, 1.0], [6.0, 0.0]])
      >>> jaxkd.rkd_angle_loss(s, e).round(4)
      Array(0.2339, dtype=float32)
      >>> jaxkd.rkd_angle_loss(2.0 * e + 1.0, e).round(4)  # nor do scale and translation
      Array(0., dtype=float32)

    References:
      Park, Kim, Lu and Cho, "Relational Knowledge Distillation", CVPR 2019.
      https://arxiv.org/abs/1904.05068
    """
    student_embeddings, teacher_embeddings, where = (
        gather_examples(x, axis_name) for x in (student_embeddings, teacher_embeddings, where)
    )
    student, teacher, kept = _relational_pair(student_embeddings, teacher_embeddings, where)
    pairs = _pair_mask(kept)
    # [j, i, k]: (i, j), (k, j) and (i, k) distinct pairs of kept examples.
    triplets = pairs.T[:, :, None] & pairs[:, None, :] & pairs[None, :, :]
    errors = optax.losses.huber_loss(_angles(student), _angles(teacher), delta=1.0)
    return masked_mean(errors, triplets)


def _flat(features: jax.Array) -> jax.Array:
    return features.reshape(features.shape[0], -1)


def _similarities(features: jax.Array) -> jax.Array:
    """``[B, B]`` Gram matrix of the flattened features, rows L2-normalized."""
    flat = _flat(features)
    return _safe_normalize(jnp.matmul(flat, flat.T, precision=_HIGHEST))


def similarity_preserving_loss(
    student_features, teacher_features, *, where=None, axis_name: str | None = None
) -> jax.Array:
    r"""Similarity-preserving distillation: match the batch's similarity matrices.

    With :math:`Q \in \mathbb{R}^{B \times n}` a model's features flattened per
    example, :math:`\tilde G = Q Q^\top` and :math:`G` the matrix :math:`\tilde G`
    with each row L2-normalized, :math:`G_{i:} = \tilde G_{i:} / \|\tilde G_{i:}\|_2`
    (the paper's Eq. 2 and the authors' code: rows of the ``B x B`` matrix, not of the
    features):

    .. math::
      \frac{1}{B^2} \left\| G_s - G_t \right\|_F^2

    without the paper's weight :math:`\gamma`. Only the batch sizes need to match.
    The loss is invariant to a positive rescaling of all the features of a model and
    to an orthogonal map of its flattened features, but not to rescaling one example
    (that changes the other rows of :math:`\tilde G`). An all-zero example has a zero
    row in :math:`G`.

    Args:
      student_features: float array ``[B, ...]``.
      teacher_features: float array ``[B, ...]``, any shape after the batch axis.
      where: optional bool ``[B]`` mask of the examples taking part: the loss of the
        ``n`` kept examples alone, normalized by ``n**2``.
      axis_name: the data-parallel axis to gather the batch over, or ``None``.

    Returns:
      A non-negative scalar.

    Examples:
      >>> import jax.numpy as jnp, jaxkd
      >>> f = jnp.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
      >>> g = jnp.array([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0]])
      >>> jaxkd.similarity_preserving_loss(g, f).round(4)
      Array(0.0885, dtype=float32)
      >>> jaxkd.similarity_preserving_loss(3.0 * f, f).round(4)
      Array(0., dtype=float32)

    References:
      Tung and Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019.
      https://arxiv.org/abs/1907.09682
    """
    student_features, teacher_features, where = (
        gather_examples(x, axis_name) for x in (student_features, teacher_features, where)
    )
    student, teacher, kept = _prepare_pair(
        ("student_features", "teacher_features"),
        student_features,
        teacher_features,
        rank=None,
        layout="[batch, features, ...]",
        where=where,
    )
    # Masked rows and columns of both matrices are 0: only kept examples count.
    squared = jnp.sum(jnp.square(_similarities(student) - _similarities(teacher)))
    count = jnp.sum(kept).astype(squared.dtype)
    return squared / jnp.maximum(jnp.square(count), 1.0)


def _conditional_probabilities(embeddings: jax.Array, pairs: jax.Array) -> jax.Array:
    """``[B, B]`` rows of :math:`(\\cos + 1) / 2` over ``pairs``, each summing to 1."""
    unit = _safe_normalize(embeddings)
    kernel = (jnp.matmul(unit, unit.T, precision=_HIGHEST) + 1.0) / 2.0
    kernel = jnp.where(pairs, kernel, 0.0)
    return _safe_divide(kernel, jnp.sum(kernel, axis=1, keepdims=True))


def pkt_loss(
    student_embeddings, teacher_embeddings, *, eps=1e-7, where=None, axis_name: str | None = None
) -> jax.Array:
    r"""Probabilistic knowledge transfer: match conditional similarity distributions.

    With the cosine kernel :math:`K(a, b) = \frac12 \left(\frac{a^\top b}{\|a\|\|b\|}
    + 1\right) \in [0, 1]` and :math:`p(j | i) = K(e_i, e_j) / \sum_k K(e_i, e_k)`:

    .. math::
      \frac1n \sum_i \sum_j p_t(j|i) \log \frac{p_t(j|i) + \epsilon}{p_s(j|i) + \epsilon}

    over the ``n`` kept examples, the diagonal :math:`j = i` included (as in the
    authors' code; :math:`K(e_i, e_i) = 1`), so each row is a distribution over the
    ``n`` kept examples and the loss is the mean over ``i`` of a KL divergence with
    :math:`\epsilon` added inside the logarithm. The authors' code takes the mean
    over all ``B * B`` terms instead: this value divided by ``B``. It also divides by
    :math:`\|e\| + \epsilon` where this computes the cosine exactly (0 for a zero
    embedding). Only the batch sizes need to match.

    Args:
      student_embeddings: float array ``[B, D_s]``.
      teacher_embeddings: float array ``[B, D_t]``; ``D_t`` may differ from ``D_s``.
      eps: positive constant added to both probabilities inside the logarithm.
      where: optional bool ``[B]`` mask of the examples taking part.
      axis_name: the data-parallel axis to gather the batch over, or ``None``.

    Returns:
      A scalar (non-negative up to the effect of ``eps``).

    Examples:
      >>> import jax.numpy as jnp, jaxkd
      >>> e = jnp.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
      >>> s = jnp.array([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0]])
      >>> jaxkd.pkt_loss(s, e).round(4)
      Array(0.0244, dtype=float32)
      >>> jaxkd.pkt_loss(5.0 * e, e).round(4)
      Array(0., dtype=float32)

    References:
      Passalis and Tefas, "Learning Deep Representations with Probabilistic
      Knowledge Transfer", ECCV 2018. https://arxiv.org/abs/1803.10837
    """
    _checks.check_positive_scalar("eps", eps)
    student_embeddings, teacher_embeddings, where = (
        gather_examples(x, axis_name) for x in (student_embeddings, teacher_embeddings, where)
    )
    student, teacher, kept = _relational_pair(student_embeddings, teacher_embeddings, where)
    pairs = kept[:, None] & kept[None, :]
    p_s = _conditional_probabilities(student, pairs)
    p_t = _conditional_probabilities(teacher, pairs)
    eps = jnp.asarray(eps, p_t.dtype)
    terms = jnp.where(pairs, p_t * (jnp.log(p_t + eps) - jnp.log(p_s + eps)), 0.0)
    return masked_mean(jnp.sum(terms, axis=1), kept)
