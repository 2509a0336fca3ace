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
from jaxkd.train._crd_objective import crd_objective
from jaxkd.train._dynamic import (
    confidence_temperature_objective,
    confidence_temperatures,
    cosine_ramp,
    ctkd_objective,
    gap_alpha,
    gap_alpha_objective,
    reverse_gradient,
)
from jaxkd.train._feature_objective import feature_objective, features_of, init_distillation
from jaxkd.train._metrics import (
    accuracy,
    mutual_information,
    mutual_information_of_labels,
    prediction_joint_counts,
    prediction_pairs,
    top1_agreement,
)
from jaxkd.train._mutual import make_mutual_learning_step, mutual_learning_objective
from jaxkd.train._objectives import (
    cross_entropy_objective,
    distillation_objective,
    hinton_objective,
    logits_of,
)
from jaxkd.train._sparse_objective import sparse_distillation_objective
from jaxkd.train._state import TrainState, distillation_optimizer, export_student
from jaxkd.train._step import make_eval_step, make_train_step, summarize_eval
from jaxkd.train._teachers import (
    aggregate_teacher_logits,
    ca_mkd_weights,
    multi_teacher_apply,
    stack_params,
    stacked_teacher_apply,
)

__all__ = [
    "crd_objective",
    "make_mutual_learning_step",
    "mutual_learning_objective",
    "mutual_information",
    "mutual_information_of_labels",
    "prediction_joint_counts",
    "prediction_pairs",
    "accuracy",
    "aggregate_teacher_logits",
    "ca_mkd_weights",
    "chunked_distillation_objective",
    "compiled_flops",
    "confidence_temperature_objective",
    "confidence_temperatures",
    "cosine_ramp",
    "ctkd_objective",
    "count_params",
    "cross_entropy_objective",
    "distillation_objective",
    "distillation_optimizer",
    "export_student",
    "feature_objective",
    "features_of",
    "gap_alpha",
    "gap_alpha_objective",
    "hinton_objective",
    "init_distillation",
    "linen_apply",
    "linen_teacher_apply",
    "logits_of",
    "make_eval_step",
    "make_train_step",
    "multi_teacher_apply",
    "nnx_apply",
    "nnx_split",
    "nnx_teacher_apply",
    "reverse_gradient",
    "sparse_distillation_objective",
    "split_linen_variables",
    "stack_params",
    "stacked_teacher_apply",
    "summarize_eval",
    "top1_agreement",
    "TrainState",
]
