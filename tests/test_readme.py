"""The README's example runs as written and computes what it claims."""

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
