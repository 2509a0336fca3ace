"""The step: a frozen-teacher train step, objectives, adapters and metrics.

``make_train_step(student_apply, teacher_apply, objective, optimizer)`` returns a
pure ``step(state, teacher_params, batch) -> (state, metrics)``; objectives map
``(student_out, teacher_out, batch, step)`` to a loss and metrics; adapters turn
Flax linen and NNX models into the ``apply`` functions the step takes.
"""

from jaxkd.train._adapters import (
    count_params,
    linen_apply,
    linen_teacher_apply,
    nnx_apply,
    nnx_split,
    nnx_teacher_apply,
    split_linen_variables,
)
from jaxkd.train._chunked_objective import chunked_distillation_objective
from jaxkd.train._cost import compiled_flops
from jaxkd.train._metrics import accuracy, top1_agreement
from jaxkd.train._objectives import (
    cross_entropy_objective,
    distillation_objective,
    hinton_objective,
    logits_of,
)
from jaxkd.train._sparse_objective import sparse_distillation_objective
from jaxkd.train._state import TrainState
from jaxkd.train._step import make_eval_step, make_train_step, summarize_eval
from jaxkd.train._teachers import (
    aggregate_teacher_logits,
    ca_mkd_weights,
    multi_teacher_apply,
    stack_params,
    stacked_teacher_apply,
)

__all__ = [
    "accuracy",
    "aggregate_teacher_logits",
    "ca_mkd_weights",
    "chunked_distillation_objective",
    "compiled_flops",
    "count_params",
    "cross_entropy_objective",
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
    "sparse_distillation_objective",
    "split_linen_variables",
    "stack_params",
    "stacked_teacher_apply",
    "summarize_eval",
    "top1_agreement",
    "TrainState",
]
