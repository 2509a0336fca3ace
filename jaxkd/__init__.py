"""jaxkd: knowledge distillation for JAX.

Layer 1, functions on arrays: softened distributions, KD losses, reductions,
metrics and multi-teacher aggregation. Every per-example loss returns one value
per example and takes an optional ``where`` mask.

Layer 2, the step: ``TrainState``, ``make_train_step`` / ``make_eval_step`` and
ready-made objectives, run on one device or data-parallel with ``pmap_step`` or
``shard_step``; adapters for Flax linen and NNX models.
"""

from jaxkd import losses
from jaxkd._adapters import (
    count_params,
    linen_apply,
    linen_teacher_apply,
    nnx_apply,
    nnx_split,
    nnx_teacher_apply,
    split_linen_variables,
)
from jaxkd._cost import compiled_flops
from jaxkd._metrics import accuracy, top1_agreement
from jaxkd._objectives import (
    cross_entropy_objective,
    distillation_objective,
    hinton_objective,
    logits_of,
)
from jaxkd._parallel import (
    data_mesh,
    pmap_step,
    replicate,
    replicate_on_mesh,
    shard_batch,
    shard_step,
    split_for_pmap,
    unreplicate,
)
from jaxkd._state import TrainState
from jaxkd._step import make_eval_step, make_train_step, summarize_eval
from jaxkd._teachers import (
    aggregate_teacher_logits,
    ca_mkd_weights,
    multi_teacher_apply,
    stack_params,
    stacked_teacher_apply,
)
from jaxkd.losses import *  # noqa: F403  (names listed once, in jaxkd.losses.__all__)

__version__ = "0.1.0"

__all__ = [
    *losses.__all__,
    "accuracy",
    "aggregate_teacher_logits",
    "ca_mkd_weights",
    "compiled_flops",
    "count_params",
    "cross_entropy_objective",
    "data_mesh",
    "distillation_objective",
    "hinton_objective",
    "linen_apply",
    "linen_teacher_apply",
    "logits_of",
    "make_eval_step",
    "make_train_step",
    "multi_teacher_apply",
    "nnx_apply",
    "nnx_split",
    "nnx_teacher_apply",
    "pmap_step",
    "replicate",
    "replicate_on_mesh",
    "shard_batch",
    "shard_step",
    "split_for_pmap",
    "split_linen_variables",
    "stack_params",
    "stacked_teacher_apply",
    "summarize_eval",
    "top1_agreement",
    "TrainState",
    "unreplicate",
]
