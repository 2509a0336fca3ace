"""Contrastive representation distillation (CRD): the NCE objective and its memory bank.

CRD embeds the student's and the teacher's penultimate features with linear heads,
L2-normalizes them, and trains the student embedding to pick out the teacher's
embedding of the *same* example among ``K`` teacher embeddings of other examples
(and, symmetrically, the teacher embedding to pick out the student's). The other
examples' embeddings come from two memory banks ``[N, D]``, one per network, that
hold a momentum average of the embedding of every training example.

The pieces, each a pure function:

* :func:`sample_negatives`: ``K`` dataset indices per example, never the example's
  own, drawn from a key folded with the example's dataset index (so the draw does not
  depend on the batch composition or the sharding);
* :func:`crd_scores`: :math:`P = \\exp(\\langle v, m \\rangle / \\tau) / Z` of an anchor
  embedding against the bank rows of its positive and of its negatives;
* :func:`crd_nce_loss`: the NCE loss of those scores, per example;
* :func:`update_memory_bank`: the momentum update of the rows of a batch;
* :func:`init_memory_bank`: the reference's uniform initialization.

:func:`jaxkd.train._crd_objective.crd_objective` puts them together as an objective
of the train step.

References:
  Tian, Krishnan and Isola, "Contrastive Representation Distillation", ICLR 2020.
  https://arxiv.org/abs/1911.10959

  Wu, Xiong, Yu and Lin, "Unsupervised Feature Learning via Non-Parametric Instance
  Discrimination", CVPR 2018 (memory bank, NCE with a constant normalizer).
  https://arxiv.org/abs/1805.01978
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd import _checks
from jaxkd.losses._feature_losses import _HIGHEST, _safe_normalize


def check_count(name: str, value, *, minimum: int = 1) -> int:
    """``value`` as a Python int ``>= minimum``, or ``TypeError``/``ValueError`` naming it."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an int, got {value!r} ({type(value).__name__}).")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}.")
    return int(value)


def check_negatives(num_negatives, num_data) -> tuple[int, int]:
    """``1 <= num_negatives < num_data``, both ints; returns them."""
    num_data = check_count("num_data", num_data, minimum=2)
    num_negatives = check_count("num_negatives", num_negatives)
    if num_negatives >= num_data:
        raise ValueError(
            f"`num_negatives`={num_negatives} must be smaller than `num_data`={num_data}: "
            "the negatives of an example are drawn from the other examples of the dataset."
        )
    return num_negatives, num_data


def _check_indices(name: str, indices, num_data: int, batch: int | None = None) -> None:
    """Integer ``[B]`` dataset indices (``batch`` checks ``B``), in range when concrete."""
    _checks.check_integer(name, indices)
    shape = jnp.shape(indices)
    if len(shape) != 1 or (batch is not None and shape[0] != batch):
        expected = "[B]" if batch is None else f"[{batch}]"
        raise ValueError(f"`{name}` must be {expected} dataset indices, got shape {shape}.")
    if _checks.is_concrete(indices) and shape[0]:
        values = np.asarray(indices)
        if values.min() < 0 or values.max() >= num_data:
            raise ValueError(
                f"`{name}` must lie in [0, {num_data}) (`num_data`={num_data}); got values "
                f"in [{values.min()}, {values.max()}]."
            )


def _check_mask(where, batch: int):
    if where is None:
        return None
    where = jnp.asarray(where)
    if where.dtype != jnp.bool_:
        raise TypeError(f"`where` must be a boolean mask, got dtype {where.dtype}.")
    if where.shape != (batch,):
        raise ValueError(f"`where` must be a per-example mask [{batch}], got {where.shape}.")
    return where


def sample_negatives(rng, indices, num_negatives: int, num_data: int) -> jax.Array:
    """``K`` negative dataset indices per example, uniform over the other examples.

    Example ``b`` draws from ``jax.random.fold_in(rng, indices[b])``: its negatives
    depend on ``rng`` and on its own dataset index only, so one device and eight
    devices (whatever the split of the batch) draw the same negatives for it. The
    draws are with replacement and uniform over ``{0, ..., N - 1}`` without
    ``indices[b]`` (a draw ``r`` from ``[0, N - 1)`` is shifted by one when
    ``r >= indices[b]``). The reference implementation draws from all ``N``
    indices, so that its positive can come back as a negative; here it never does.

    Args:
      rng: a PRNG key (the same on every device).
      indices: int array ``[B]``: the examples' indices in the dataset, in
        ``[0, num_data)``.
      num_negatives: ``K``, with ``1 <= K < num_data``.
      num_data: ``N``, the number of examples in the dataset (rows of the bank).

    Returns:
      int32 array ``[B, K]`` of indices in ``[0, N)``, none equal to its row's
      ``indices[b]``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> negatives = sample_negatives(jax.random.key(0), jnp.array([3, 5]), 4, 10)
      >>> negatives.shape, bool((negatives != jnp.array([[3], [5]])).all())
      ((2, 4), True)
    """
    num_negatives, num_data = check_negatives(num_negatives, num_data)
    _check_indices("indices", indices, num_data)
    indices = jnp.asarray(indices, jnp.int32)

    def draw(index):
        key = jax.random.fold_in(rng, index)
        return jax.random.randint(key, (num_negatives,), 0, num_data - 1, dtype=jnp.int32)

    draws = jax.vmap(draw)(indices)
    return draws + (draws >= indices[:, None]).astype(jnp.int32)


def crd_scores(
    anchor, bank, positive_index, negative_index, *, temperature, normalizer
) -> tuple[jax.Array, jax.Array]:
    r"""The CRD scores of anchor embeddings against memory-bank rows.

    .. math::
      P(i, j) = \frac{\exp(\langle v_i, m_j \rangle / \tau)}{Z}

    for the anchor :math:`v_i` of example ``i`` and the bank row :math:`m_j` of its
    positive (``j = positive_index[i]``) and of each of its negatives. The bank is
    memory, not a parameter: no gradient flows into it (``stop_gradient``). The
    anchors (L2-normalized embeddings) are the differentiated input.

    When ``N <= (K + 1) D`` (CRD's usual regime, e.g. ``N = 50000``, ``K = 16384``,
    ``D = 128``) the dot products are taken as one ``[B, D] x [D, N]`` matmul and the
    ``K + 1`` needed columns picked from it, which needs ``B N`` floats instead of
    the ``B (K + 1) D`` of gathering the rows; otherwise the rows are gathered. Both
    compute the same values.

    Args:
      anchor: float array ``[B, D]``, e.g. L2-normalized student embeddings.
      bank: float array ``[N, D]``: the other network's memory bank.
      positive_index: int array ``[B]``: the bank row of each anchor's positive (its
        own dataset index).
      negative_index: int array ``[B, K]``: the bank rows of its negatives
        (:func:`sample_negatives`).
      temperature: :math:`\tau > 0` (0.07 in the paper).
      normalizer: :math:`Z > 0`, a scalar (CRD sets it once, from the first batch,
        to the mean unnormalized score times ``N``); 1 gives the unnormalized
        scores.

    Returns:
      ``(scores_positive [B], scores_negative [B, K])``, float32 (or the inputs'
      wider dtype).

    References:
      Tian, Krishnan and Isola, "Contrastive Representation Distillation", ICLR
      2020. https://arxiv.org/abs/1911.10959
    """
    _checks.check_floating("anchor", anchor)
    _checks.check_floating("bank", bank)
    if jnp.ndim(anchor) != 2 or jnp.ndim(bank) != 2 or jnp.shape(anchor)[1] != jnp.shape(bank)[1]:
        raise ValueError(
            f"`anchor` must be [B, D] and `bank` [N, D] with the same D; got `anchor` "
            f"{jnp.shape(anchor)} and `bank` {jnp.shape(bank)}."
        )
    _checks.check_positive_scalar("temperature", temperature)
    _checks.check_positive_scalar("normalizer", normalizer)
    batch, dim = jnp.shape(anchor)
    num_data = jnp.shape(bank)[0]
    _check_indices("positive_index", positive_index, num_data, batch)
    _checks.check_integer("negative_index", negative_index)
    if jnp.ndim(negative_index) != 2 or jnp.shape(negative_index)[0] != batch:
        raise ValueError(
            f"`negative_index` must be [B, K] with B = {batch} (`anchor` {jnp.shape(anchor)}), "
            f"got shape {jnp.shape(negative_index)}."
        )
    num_negatives = jnp.shape(negative_index)[1]
    dtype = jnp.promote_types(jnp.result_type(anchor, bank), jnp.float32)
    anchor = jnp.asarray(anchor, dtype)
    bank = jax.lax.stop_gradient(jnp.asarray(bank, dtype))
    rows = jnp.concatenate(
        [jnp.asarray(positive_index, jnp.int32)[:, None], jnp.asarray(negative_index, jnp.int32)],
        axis=1,
    )
    if num_data <= (num_negatives + 1) * dim:
        all_dots = jnp.matmul(anchor, bank.T, precision=_HIGHEST)
        dots = jnp.take_along_axis(all_dots, rows, axis=1)
    else:
        dots = jnp.einsum("bd,bkd->bk", anchor, bank[rows], precision=_HIGHEST)
    temperature = jnp.asarray(temperature, dtype)
    log_normalizer = jnp.log(jnp.asarray(normalizer, dtype))
    scores = jnp.exp(dots / temperature - log_normalizer)
    return scores[:, 0], scores[:, 1:]


def crd_nce_loss(scores_positive, scores_negative, *, num_data, where=None) -> jax.Array:
    r"""The NCE loss of CRD, per example, with noise distribution :math:`P_n = 1/N`.

    With :math:`P^+` the score of the example's positive pair and :math:`P^-_k` those
    of its ``K`` negatives (:func:`crd_scores`), the probability that a pair comes
    from the data rather than the noise is :math:`h(P) = P / (P + K P_n)`, and

    .. math::
      \ell = -\left[\log \frac{P^+}{P^+ + K P_n}
        + \sum_{k=1}^{K} \log \frac{K P_n}{P^-_k + K P_n}\right]
      = \log\left(1 + \frac{K P_n}{P^+}\right)
        + \sum_k \log\left(1 + \frac{P^-_k}{K P_n}\right)

    computed in the second form (``log1p``). The reference implementation adds
    ``1e-7`` to both denominators and returns the batch mean of this value; here it
    is exact and per example (the caller reduces). CRD's loss is the sum of two such
    terms: the student embedding against the teacher bank and the teacher embedding
    against the student bank.

    Args:
      scores_positive: positive float array ``[B]``.
      scores_negative: positive float array ``[B, K]``.
      num_data: ``N``, the number of examples in the dataset (:math:`P_n = 1/N`).
      where: optional bool ``[B]`` mask; masked examples give 0, with a zero and
        finite gradient, whatever their scores.

    Returns:
      float array ``[B]``, non-negative.

    Examples:
      >>> import jax.numpy as jnp
      >>> loss = crd_nce_loss(jnp.array([1e-3]), jnp.array([[1e-5, 1e-5]]), num_data=1000)
      >>> loss.round(4)  # log(1 + 2) + 2 log(1 + 0.005)
      Array([1.1086], dtype=float32)

    References:
      Tian, Krishnan and Isola, "Contrastive Representation Distillation", ICLR
      2020, Eq. (18). https://arxiv.org/abs/1911.10959

      Gutmann and Hyvarinen, "Noise-contrastive estimation: A new estimation
      principle for unnormalized statistical models", AISTATS 2010.
      https://proceedings.mlr.press/v9/gutmann10a.html
    """
    _checks.check_floating("scores_positive", scores_positive)
    _checks.check_floating("scores_negative", scores_negative)
    positive_shape, negative_shape = jnp.shape(scores_positive), jnp.shape(scores_negative)
    if (
        len(positive_shape) != 1
        or len(negative_shape) != 2
        or negative_shape[0] != positive_shape[0]
    ):
        raise ValueError(
            f"`scores_positive` must be [B] and `scores_negative` [B, K]; got "
            f"`scores_positive` {positive_shape} and `scores_negative` {negative_shape}."
        )
    num_data = check_count("num_data", num_data)
    where = _check_mask(where, positive_shape[0])
    dtype = jnp.promote_types(jnp.result_type(scores_positive, scores_negative), jnp.float32)
    positive = jnp.asarray(scores_positive, dtype)
    negative = jnp.asarray(scores_negative, dtype)
    if where is not None:  # safe values, so that masked scores leave no NaN in the gradient
        positive = jnp.where(where, positive, 1.0)
        negative = jnp.where(where[:, None], negative, 0.0)
    noise = jnp.asarray(negative_shape[1] / num_data, dtype)  # K * P_n
    loss = jnp.log1p(noise / positive) + jnp.sum(jnp.log1p(negative / noise), axis=1)
    return loss if where is None else jnp.where(where, loss, 0.0)


def update_memory_bank(bank, embeddings, indices, *, momentum, where=None) -> jax.Array:
    r"""The memory bank after the momentum update of a batch's rows.

    .. math::
      m_{y_b} \leftarrow \frac{\mu\, m_{y_b} + (1 - \mu)\, v_b}
        {\lVert \mu\, m_{y_b} + (1 - \mu)\, v_b \rVert_2}

    for each kept example ``b`` of dataset index :math:`y_b`; every other row,
    including those of masked examples, is returned unchanged. No gradient flows
    through the update. When an index occurs more than once among the kept
    examples, the last occurrence's update is the one written (deterministically;
    a batch drawn without replacement has no repeats).

    Args:
      bank: float array ``[N, D]``.
      embeddings: float array ``[B, D]``: the batch's embeddings (L2-normalized).
      indices: int array ``[B]``: their dataset indices in ``[0, N)``.
      momentum: :math:`\mu \in [0, 1]`, the weight of the old row (0.5 in CRD).
      where: optional bool ``[B]`` mask of the examples whose rows are updated.

    Returns:
      The new bank, ``[N, D]`` in the bank's dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> bank = jnp.array([[1.0, 0.0], [0.0, 1.0]])
      >>> update_memory_bank(bank, jnp.array([[0.0, 1.0]]), jnp.array([0]), momentum=0.5)
      Array([[0.70710677, 0.70710677],
             [0.        , 1.        ]], dtype=float32)

    References:
      Wu, Xiong, Yu and Lin, "Unsupervised Feature Learning via Non-Parametric
      Instance Discrimination", CVPR 2018. https://arxiv.org/abs/1805.01978
    """
    _checks.check_floating("bank", bank)
    _checks.check_floating("embeddings", embeddings)
    if (
        jnp.ndim(bank) != 2
        or jnp.ndim(embeddings) != 2
        or jnp.shape(bank)[1] != jnp.shape(embeddings)[1]
    ):
        raise ValueError(
            f"`bank` must be [N, D] and `embeddings` [B, D] with the same D; got `bank` "
            f"{jnp.shape(bank)} and `embeddings` {jnp.shape(embeddings)}."
        )
    _checks.check_unit_interval("momentum", momentum)
    num_data = jnp.shape(bank)[0]
    batch = jnp.shape(embeddings)[0]
    _check_indices("indices", indices, num_data, batch)
    where = _check_mask(where, batch)
    kept = jnp.ones((batch,), jnp.bool_) if where is None else where
    indices = jnp.asarray(indices, jnp.int32)
    bank = jax.lax.stop_gradient(jnp.asarray(bank))
    dtype = jnp.promote_types(bank.dtype, jnp.float32)
    embeddings = jax.lax.stop_gradient(jnp.asarray(embeddings, dtype))
    momentum = jnp.asarray(momentum, dtype)
    rows = _safe_normalize(momentum * bank[indices].astype(dtype) + (1 - momentum) * embeddings)
    # The last kept occurrence of each index writes its row; all other writes are dropped
    # (out of range), so that the scatter has unique targets and a defined result.
    positions = jnp.arange(batch, dtype=jnp.int32)
    targets = jnp.where(kept, indices, num_data)
    last = jnp.full((num_data,), -1, jnp.int32).at[targets].max(positions, mode="drop")
    writes = kept & (last[indices] == positions)
    targets = jnp.where(writes, indices, num_data)
    return bank.at[targets].set(rows.astype(bank.dtype), mode="drop")


def init_memory_bank(rng, num_data: int, feature_dim: int, *, dtype=jnp.float32) -> jax.Array:
    r"""A memory bank ``[N, D]`` initialized as in the CRD reference implementation.

    Each entry is uniform in :math:`[-s, s]` with :math:`s = \sqrt{3 / D}`, so that
    its variance is :math:`1 / D` and a row's expected squared norm is 1. Rows are
    not normalized at initialization (as in the reference); each becomes a unit
    vector at its first :func:`update_memory_bank`, within the first epoch.

    Args:
      rng: a PRNG key.
      num_data: ``N``, the number of examples in the dataset.
      feature_dim: ``D``, the embedding dimension.
      dtype: the bank's floating dtype.

    Returns:
      float array ``[N, D]``.
    """
    num_data = check_count("num_data", num_data)
    feature_dim = check_count("feature_dim", feature_dim)
    bound = float(np.sqrt(3.0 / feature_dim))
    return jax.random.uniform(rng, (num_data, feature_dim), dtype, minval=-bound, maxval=bound)
