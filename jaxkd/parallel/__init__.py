"""Data parallelism: reductions that equal one device, and the step runners.

Reductions (``masked_mean``, ``masked_means``, ``gather_examples``,
``pmean_packed``) reduce sums and counts over a named data axis, so a global
batch split unevenly across devices gives the one-device value. The runners
(``pmap_step``, ``shard_step``) wrap a per-device step for ``jax.pmap`` or
``jax.shard_map`` over a one-axis ``Mesh``.
"""

from jaxkd.parallel._reductions import (
    gather_examples,
    masked_mean,
    masked_means,
    masked_sum_and_count,
    pmean_packed,
)
from jaxkd.parallel._runners import (
    data_mesh,
    pmap_step,
    replicate,
    replicate_on_mesh,
    shard_batch,
    shard_step,
    split_for_pmap,
    unreplicate,
)

__all__ = [
    "data_mesh",
    "gather_examples",
    "masked_mean",
    "masked_means",
    "masked_sum_and_count",
    "pmap_step",
    "pmean_packed",
    "replicate",
    "replicate_on_mesh",
    "shard_batch",
    "shard_step",
    "split_for_pmap",
    "unreplicate",
]
