"""One distillation problem, two ways to step it: jaxkd's step and a hand-written one.

Both use Hinton et al.'s objective ``alpha * T^2 KL(teacher || student) + (1 -
alpha) * CE``, SGD with momentum, the same linen models, initial params and
batch, and both are jitted with the student state donated.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxkd
from benchmarks._timing import compiled_flops, flops_of, require_flops
from benchmarks.models import Dtype, PairSpec, build_linen

ALPHA = 0.9
TEMPERATURE = 4.0
LEARNING_RATE = 0.01
MOMENTUM = 0.9

PyTree = Any
HandState = tuple[PyTree, optax.OptState, PyTree]
"""The hand-written step's state: ``(params, opt_state, model_state)``."""


def make_optimizer() -> optax.GradientTransformation:
    """SGD with momentum (PyTorch's ``SGD(lr, momentum)`` computes the same update)."""
    return optax.sgd(LEARNING_RATE, momentum=MOMENTUM)


def make_batch(spec: PairSpec, seed: int = 0) -> dict[str, np.ndarray]:
    """Random images ``[B, *input_shape]`` (float32) and integer labels ``[B]``."""
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(spec.batch_size, *spec.input_shape)).astype(np.float32)
    labels = rng.integers(0, spec.num_classes, size=spec.batch_size).astype(np.int32)
    return {"image": images, "label": labels}


def init_variables(module: nn.Module, sample: jax.Array, seed: int) -> PyTree:
    """Variables of ``module`` drawn with NumPy, without compiling ``module.init``.

    The shapes come from ``jax.eval_shape`` (tracing only); kernels are drawn
    from ``N(0, 1 / fan_in)``, BatchNorm scales and variances are ones, the
    rest zeros. Compiling a jitted init costs seconds per model on two CPU
    cores, and the values only need to be of a sensible scale for timing.
    """
    shapes = jax.eval_shape(lambda x: module.init(jax.random.key(0), x, train=False), sample)
    rng = np.random.default_rng(seed)

    def draw(path, leaf: jax.ShapeDtypeStruct) -> np.ndarray:
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "kernel":
            fan_in = math.prod(leaf.shape[:-1])
            values = rng.normal(scale=fan_in**-0.5, size=leaf.shape)
        elif name in ("scale", "var"):
            values = np.ones(leaf.shape)
        else:
            values = np.zeros(leaf.shape)
        return values.astype(leaf.dtype)

    return jax.device_put(jax.tree_util.tree_map_with_path(draw, shapes))


@dataclasses.dataclass(eq=False)
class Problem:
    """Models, initial variables, optimizer and batch of one benchmark.

    Attributes:
      spec: the pair's description.
      teacher: the teacher's linen module.
      student: the student's linen module.
      teacher_variables: the teacher's full variables (params and batch stats).
      student_params: the student's initial params.
      student_model_state: the student's other collections (``{}`` or batch stats).
      batch: ``{"image", "label"}`` as device arrays.
      optimizer: the student's optimizer.
    """

    spec: PairSpec
    teacher: nn.Module
    student: nn.Module
    teacher_variables: PyTree
    student_params: PyTree
    student_model_state: PyTree
    batch: dict[str, jax.Array]
    optimizer: optax.GradientTransformation

    def teacher_logits(self, variables: PyTree, images: jax.Array) -> jax.Array:
        """The teacher's inference-mode logits ``[B, C]``."""
        return self.teacher.apply(variables, images, train=False)

    def student_logits(self, variables: PyTree, images: jax.Array) -> jax.Array:
        """The student's inference-mode logits ``[B, C]``."""
        return self.student.apply(variables, images, train=False)

    def student_variables(self) -> PyTree:
        """The student's full initial variables."""
        return {"params": self.student_params, **self.student_model_state}

    def cached_batch(self) -> dict[str, jax.Array]:
        """The batch with the teacher's logits precomputed under ``teacher_logits``."""
        logits = teacher_forward(self)(self.teacher_variables, self.batch["image"])
        return {**self.batch, "teacher_logits": logits}


@functools.cache
def build_problem(spec: PairSpec, *, dtype: Dtype = jnp.float32, seed: int = 0) -> Problem:
    """Initializes the pair's models (computing in ``dtype``) and its batch.

    Cached: benchmarks of one run share the problem, and so the compiled steps
    of the functions below, which are cached per problem too. Nothing mutates a
    problem: every state handed to a donating step is a fresh copy.
    """
    teacher = build_linen(spec.teacher, spec.num_classes, dtype=dtype)
    student = build_linen(spec.student, spec.num_classes, dtype=dtype)
    sample = jax.ShapeDtypeStruct((2, *spec.input_shape), jnp.float32)
    teacher_variables = init_variables(teacher, sample, seed)
    student_params, student_state = jaxkd.split_linen_variables(
        init_variables(student, sample, seed + 1)
    )
    return Problem(
        spec=spec,
        teacher=teacher,
        student=student,
        teacher_variables=teacher_variables,
        student_params=student_params,
        student_model_state=student_state,
        batch=jax.device_put(make_batch(spec, seed)),
        optimizer=make_optimizer(),
    )


@functools.cache
def teacher_forward(problem: Problem) -> Callable[[PyTree, jax.Array], jax.Array]:
    """The jitted teacher forward, ``(variables, images) -> logits``."""
    return jax.jit(problem.teacher_logits)


def _fresh(tree: PyTree) -> PyTree:
    """A copy in new buffers, so that donating one state never deletes another's."""
    return jax.tree.map(jnp.copy, tree)


# ----------------------------------------------------------------------------- jaxkd


def jaxkd_state(problem: Problem) -> jaxkd.TrainState:
    """A fresh ``TrainState`` of the student."""
    return jaxkd.TrainState.create(
        params=_fresh(problem.student_params),
        optimizer=problem.optimizer,
        model_state=_fresh(problem.student_model_state),
    )


@functools.cache
def jaxkd_step(
    problem: Problem, *, cached: bool = False, axis_name: str | None = None
) -> Callable[..., tuple[jaxkd.TrainState, dict]]:
    """The un-jitted jaxkd step: online teacher, or ``cached`` teacher logits."""
    teacher_apply = None if cached else jaxkd.linen_teacher_apply(problem.teacher)
    return jaxkd.make_train_step(
        jaxkd.linen_apply(problem.student),
        teacher_apply,
        jaxkd.hinton_objective(alpha=ALPHA, temperature=TEMPERATURE),
        problem.optimizer,
        axis_name=axis_name,
    )


@functools.cache
def jitted_jaxkd_step(problem: Problem, *, cached: bool = False, donate: bool = True):
    """``jax.jit`` of :func:`jaxkd_step`, donating the state."""
    return jax.jit(jaxkd_step(problem, cached=cached), donate_argnums=(0,) if donate else ())


# ---------------------------------------------------------------------- hand-written


def hand_state(problem: Problem) -> HandState:
    """A fresh ``(params, opt_state, model_state)`` of the student."""
    params = _fresh(problem.student_params)
    return params, problem.optimizer.init(params), _fresh(problem.student_model_state)


def _hinton_loss(
    student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array
) -> jax.Array:
    """``alpha T^2 KL(p_t^T || p_s^T) + (1 - alpha) CE``, averaged over the batch."""
    log_p_s = jax.nn.log_softmax(student_logits / TEMPERATURE)
    log_p_t = jax.nn.log_softmax(teacher_logits / TEMPERATURE)
    kl = jnp.mean(jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1))
    ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(student_logits, labels))
    return ALPHA * TEMPERATURE**2 * kl + (1.0 - ALPHA) * ce


@functools.cache
def hand_step(problem: Problem) -> Callable[..., tuple[HandState, jax.Array]]:
    """A minimal KD step written directly in JAX, jitted with the state donated.

    ``step((params, opt_state, model_state), teacher_variables, batch) ->
    ((params, opt_state, model_state), loss)``.
    """
    teacher, student, optimizer = problem.teacher, problem.student, problem.optimizer

    def loss_fn(params, model_state, teacher_logits, images, labels):
        variables = {"params": params, **model_state}
        if "batch_stats" in model_state:
            logits, updates = student.apply(variables, images, train=True, mutable=["batch_stats"])
            model_state = {**model_state, **updates}
        else:
            logits = student.apply(variables, images, train=True)
        return _hinton_loss(logits, teacher_logits, labels), model_state

    def step(state: HandState, teacher_variables: PyTree, batch: dict[str, jax.Array]):
        params, opt_state, model_state = state
        teacher_logits = jax.lax.stop_gradient(
            teacher.apply(teacher_variables, batch["image"], train=False)
        )
        (loss, model_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, model_state, teacher_logits, batch["image"], batch["label"]
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, model_state), loss

    return jax.jit(step, donate_argnums=(0,))


# ----------------------------------------------------------------------- FLOP counts


@functools.cache
def teacher_forward_flops(problem: Problem) -> float:
    """XLA's FLOP count of one teacher forward pass on the batch."""
    compiled = (
        teacher_forward(problem).lower(problem.teacher_variables, problem.batch["image"]).compile()
    )
    return require_flops(compiled_flops(compiled), "the teacher forward")


@functools.cache
def student_forward_flops(problem: Problem) -> float:
    """XLA's FLOP count of one (inference-mode) student forward pass on the batch."""
    flops = flops_of(problem.student_logits, problem.student_variables(), problem.batch["image"])
    return require_flops(flops, "the student forward")


def _fwd_bwd_flops(module: nn.Module, variables: PyTree, batch: dict[str, jax.Array]) -> float:
    """FLOPs of value-and-grad of the mean cross-entropy w.r.t. ``module``'s params."""
    params, model_state = jaxkd.split_linen_variables(variables)
    mutable = ["batch_stats"] if "batch_stats" in model_state else False

    def loss(params, images, labels):
        out = module.apply({"params": params, **model_state}, images, train=True, mutable=mutable)
        logits = out[0] if mutable else out
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

    flops = flops_of(jax.value_and_grad(loss), params, batch["image"], batch["label"])
    return require_flops(flops, "a forward and backward pass")


@functools.cache
def student_fwd_bwd_flops(problem: Problem) -> float:
    """FLOPs of the student's training forward and backward pass (cross-entropy loss)."""
    return _fwd_bwd_flops(problem.student, problem.student_variables(), problem.batch)


@functools.cache
def teacher_fwd_bwd_flops(problem: Problem) -> float:
    """FLOPs the teacher would cost if it were differentiated too (for comparison)."""
    return _fwd_bwd_flops(problem.teacher, problem.teacher_variables, problem.batch)
