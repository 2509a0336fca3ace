"""The README's examples run as written and compute what they claim."""

from __future__ import annotations

import contextlib
import io
import os
import re

import numpy as np

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _python_block_after(heading: str) -> str:
    text = open(README).read()
    section = text[text.index(heading) :]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_loss_with_grad_example_runs():
    code = _python_block_after("## A loss with `jax.grad`")
    namespace: dict = {}
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        exec(compile(code, "README.md", "exec"), namespace)
    assert printed.getvalue().strip()
    grads = namespace["jax"].grad(namespace["loss"])(namespace["student_logits"])
    assert grads.shape == (2, 3)
    # The loss is a mean over examples of a per-example value, so each row's
    # gradient sums to zero (softmax gradients are orthogonal to constants).
    np.testing.assert_allclose(np.asarray(grads).sum(axis=1), 0.0, atol=1e-6)


def test_teacher_and_data_parallel_distillation_example_runs():
    code = _python_block_after("## Training a teacher and distilling it")
    namespace: dict = {}
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        exec(compile(code, "README.md", "exec"), namespace)
    assert "student params; loss" in printed.getvalue()
    state, metrics = namespace["state"], namespace["metrics"]
    assert int(state.step) == 10
    assert np.isfinite(float(metrics["loss"])) and float(metrics["kd_loss"]) > 0
    # The student's params are replicated over every device of the mesh.
    leaf = namespace["jax"].tree.leaves(state.params)[0]
    assert len(leaf.sharding.device_set) == len(namespace["jax"].devices())


def test_every_command_uses_the_virtual_environment():
    text = open(README).read()
    commands = re.findall(r"```bash\n(.*?)```", text, re.DOTALL)
    lines = [line for block in commands for line in block.splitlines() if line.strip()]
    assert lines
    for line in lines:
        assert line.startswith((".venv/bin/", "python3 -m venv .venv && ")), line
    assert not re.search(r"(?<![/\w])python -m|(?<![/.\w])pip install", text)
