"""The jaxkd step against the same KD step in PyTorch on the CPU.

Same architectures (built from one description in :mod:`benchmarks.models`),
the same initial weights (copied from the JAX params), batch, loss
(``alpha T^2 KL + (1 - alpha) CE``) and optimizer (SGD with momentum, same
learning rate). The PyTorch teacher runs under ``torch.inference_mode()`` in eval
mode; the student runs eagerly in train mode. PyTorch gets as many intra-op
threads as the cores JAX's CPU backend uses (the process's CPU affinity). The
first step's losses of the two are compared, to check that the two steps compute
the same thing.

PyTorch's OpenMP threads spin while idle by default. On a small machine shared
with other work (two cores here) a spinning thread that loses its core stalls
every parallel region, and PyTorch steps measured 2-10x slower than with
``OMP_WAIT_POLICY=PASSIVE``, so that is set (unless the environment already sets
it) before PyTorch is imported: the fairer, faster setting for PyTorch here.

PyTorch is the optional ``bench`` extra (``pip install 'jaxkd[bench]'``); without
it the benchmark is skipped. This is the only module that imports it.

    python -m benchmarks.torch_comparison [--smoke] [--json PATH]
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any

import jax
import numpy as np

from benchmarks import _kd
from benchmarks._report import Config, Result, Target, cpu_cores, main, skipped
from benchmarks._timing import chain, interleave
from benchmarks.models import Arch, MlpArch, PairSpec, pairs

NAME = "torch_comparison"
TARGET = Target("<=", 0.8)
LOSS_TOLERANCE = 1e-3


def _torch_model(torch: Any, arch: Arch, spec: PairSpec) -> Any:
    """The PyTorch twin of ``arch``: channels-first convolutions, flat MLP inputs."""
    nn = torch.nn
    if isinstance(arch, MlpArch):
        layers: list[Any] = [nn.Flatten()]
        size = math.prod(spec.input_shape)
        for width in arch.hidden:
            layers += [nn.Linear(size, width), nn.ReLU()]
            size = width
        return nn.Sequential(*layers, nn.Linear(size, spec.num_classes))

    class GlobalAveragePool(nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3))

    layers = []
    channels = spec.input_shape[-1]
    for width, stride in zip(arch.widths, arch.strides, strict=True):
        layers += [
            nn.Conv2d(channels, width, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(width, eps=1e-5, momentum=0.1),
            nn.ReLU(),
        ]
        channels = width
    return nn.Sequential(*layers, GlobalAveragePool(), nn.Linear(channels, spec.num_classes))


def _jax_to_torch_parameters(variables: Any) -> list[np.ndarray]:
    """The JAX variables as PyTorch-layout arrays, in ``state_dict`` order.

    Walks the linen variables layer by layer (``hidden_i``/``head`` for the MLP,
    ``conv_i``/``bn_i``/``head`` for the CNN): Dense kernels ``[in, out]`` become
    ``[out, in]``, conv kernels HWIO become OIHW, BatchNorm contributes weight,
    bias, running mean, running variance (and PyTorch's batch counter, skipped).
    """
    params = variables["params"]
    stats = variables.get("batch_stats", {})
    arrays = []
    layers = [name for name in params if name.startswith(("hidden_", "conv_"))]
    layers = sorted(layers, key=lambda name: int(name.rsplit("_", 1)[1])) + ["head"]
    for name in layers:
        kernel = np.array(params[name]["kernel"])
        if name.startswith("conv_"):
            norm = "bn_" + name.rsplit("_", 1)[1]
            arrays += [
                kernel.transpose(3, 2, 0, 1),
                np.array(params[norm]["scale"]),
                np.array(params[norm]["bias"]),
                np.array(stats[norm]["mean"]),
                np.array(stats[norm]["var"]),
            ]
        else:
            arrays += [kernel.T, np.array(params[name]["bias"])]
    return arrays


def _load(torch: Any, module: Any, variables: Any) -> None:
    """Copies JAX variables into ``module`` (same architecture)."""
    arrays = iter(_jax_to_torch_parameters(variables))
    state = module.state_dict()
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        state[key] = torch.from_numpy(np.ascontiguousarray(next(arrays))).to(value.dtype)
    module.load_state_dict(state)


def _torch_inputs(torch: Any, spec: PairSpec, images: np.ndarray) -> Any:
    """NHWC images as the PyTorch model's input (NCHW for the CNN)."""
    if isinstance(spec.teacher, MlpArch):
        return torch.from_numpy(images.reshape(images.shape[0], -1).copy())
    return torch.from_numpy(images.transpose(0, 3, 1, 2).copy())


def torch_step(torch: Any, problem: _kd.Problem):
    """The PyTorch KD step on ``problem``'s models, weights and batch.

    Returns:
      ``step() -> loss``: one training step of the student; the teacher in eval
      mode under ``torch.inference_mode()``.
    """
    functional = torch.nn.functional
    spec = problem.spec
    teacher = _torch_model(torch, spec.teacher, spec)
    student = _torch_model(torch, spec.student, spec)
    _load(torch, teacher, problem.teacher_variables)
    _load(torch, student, problem.student_variables())
    teacher.eval()
    student.train()
    optimizer = torch.optim.SGD(student.parameters(), lr=_kd.LEARNING_RATE, momentum=_kd.MOMENTUM)
    batch = jax.device_get(problem.batch)
    images = _torch_inputs(torch, spec, batch["image"])
    labels = torch.from_numpy(batch["label"].astype(np.int64))
    temperature, alpha = _kd.TEMPERATURE, _kd.ALPHA

    def step():
        with torch.inference_mode():
            teacher_logits = teacher(images)
        student_logits = student(images)
        # An inference tensor cannot be saved for backward: clone it out first.
        log_p_t = functional.log_softmax(teacher_logits.clone() / temperature, dim=-1)
        log_p_s = functional.log_softmax(student_logits / temperature, dim=-1)
        kl = functional.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
        ce = functional.cross_entropy(student_logits, labels)
        loss = alpha * temperature**2 * kl + (1.0 - alpha) * ce
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def measure(torch: Any, spec: PairSpec, config: Config) -> Result:
    """The ratio of step times, jaxkd / PyTorch, for one pair."""
    problem = _kd.build_problem(spec)
    step = torch_step(torch, problem)
    first_jax = _kd.jitted_jaxkd_step(problem)(
        _kd.jaxkd_state(problem), problem.teacher_variables, problem.batch
    )[1]["loss"]
    loss_gap = abs(float(step()) - float(first_jax))
    if loss_gap > LOSS_TOLERANCE * max(1.0, abs(float(first_jax))):
        raise RuntimeError(
            f"{spec.name}: PyTorch and jaxkd first-step losses differ by {loss_gap}."
        )

    def torch_runner(n: int) -> None:
        for _ in range(n):
            step()

    runners = {
        "jaxkd": chain(
            _kd.jitted_jaxkd_step(problem),
            _kd.jaxkd_state(problem),
            problem.teacher_variables,
            problem.batch,
        ),
        "torch": torch_runner,
    }
    times = interleave(runners, rounds=config.reps(21), min_round_seconds=config.round_seconds(0.1))
    return Result(
        benchmark=NAME,
        figure=f"{spec.name}: jaxkd step / PyTorch step",
        ratio=times.ratio("jaxkd", "torch"),
        target=TARGET,
        times=times.medians(),
    )


def run(config: Config) -> list[Result]:
    """One row per pair (MLP, CNN), or a skip row without PyTorch."""
    # Idle OpenMP threads sleep instead of spinning; read when libgomp loads.
    wait_policy = os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import torch
    except ImportError:
        reason = "skipped: torch not installed (pip install 'jaxkd[bench]')"
        return [skipped(NAME, "jaxkd step / PyTorch step", reason)]
    threads = cpu_cores()
    torch.set_num_threads(threads)
    results = [measure(torch, spec, config) for spec in pairs(smoke=config.smoke)]
    results[0].note = (
        f"torch {torch.__version__}, {threads} intra-op threads, OMP_WAIT_POLICY={wait_policy}; "
        "first-step losses of the "
        f"two steps agree to {LOSS_TOLERANCE:g} (same weights, batch and loss)"
    )
    return results


if __name__ == "__main__":
    sys.exit(main(NAME, run, __doc__.splitlines()[0]))
