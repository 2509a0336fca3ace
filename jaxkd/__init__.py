"""jaxkd: knowledge distillation for JAX.

Every public name is importable from ``jaxkd``; the subpackages group them:

- ``jaxkd.losses``: functions on arrays. Softened distributions, KD losses
  (logit, feature, relational), reductions. Every per-example loss returns one
  value per example (or per token) and takes an optional ``where`` mask.
- ``jaxkd.train``: the step. ``TrainState``, ``make_train_step`` /
  ``make_eval_step``, ready-made objectives, multi-teacher aggregation,
  adapters for Flax linen and NNX models, metrics.
- ``jaxkd.parallel``: data parallelism. Reductions over a named axis that equal
  one device, and the ``pmap_step`` / ``shard_step`` runners.
- ``jaxkd.lm``: language models. The next-token shift, a KV-cache sampler,
  sequence-level and on-policy distillation, per-token metrics (its names are
  used as ``jaxkd.lm.NAME``).
"""

from jaxkd import lm, losses, parallel, train
from jaxkd.losses import *  # noqa: F403  (names listed once, in each subpackage's __all__)
from jaxkd.parallel import *  # noqa: F403
from jaxkd.train import *  # noqa: F403

__version__ = "0.1.0"

__all__ = ["lm", *sorted({*losses.__all__, *parallel.__all__, *train.__all__}, key=str.lower)]
