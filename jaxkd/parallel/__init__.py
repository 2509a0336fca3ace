"""Data parallelism: reductions that equal one device, and the step runners.

Reductions (``masked_mean``, ``masked_means``, ``gather_examples``,
``pmean_packed``) reduce sums and counts over a named data axis, so a global
batch split unevenly across devices gives the one-device value. The runners
(``pmap_step``, ``shard_step``) wrap a per-device step for ``jax.pmap`` or
``jax.shard_map`` over a one-axis ``Mesh``.

Model parallelism for a frozen teacher (and optionally the student): a 2-D
``(data, model)`` mesh (``model_mesh``), shardings from Flax logical axis names
(``logical_shardings``) or by size (``auto_shardings``), placement
(``place_teacher``, ``place_sharded``) and a jitted step whose arguments keep
their shardings (``jit_sharded_step``): GSPMD partitions the teacher's forward,
and each device holds 1/m of it.
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
from jaxkd.parallel._sharding import (
    auto_shardings,
    batch_sharding,
    jit_sharded_step,
    local_batch_slice,
    logical_shardings,
    model_mesh,
    per_device_bytes,
    place_sharded,
    place_teacher,
    shard_batch_2d,
)

__all__ = [
    "auto_shardings",
    "batch_sharding",
    "jit_sharded_step",
    "local_batch_slice",
    "logical_shardings",
    "model_mesh",
    "per_device_bytes",
    "place_sharded",
    "place_teacher",
    "shard_batch_2d",
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
