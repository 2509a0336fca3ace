"""Test configuration: 8 simulated CPU devices and strict promotion rules.

The device count must be set before JAX is imported anywhere, so this file sets
``XLA_FLAGS`` at import time (pytest imports conftest.py before any test module).
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# Silent broadcasting is a test failure.
jax.config.update("jax_numpy_rank_promotion", "raise")

import pytest  # noqa: E402


@pytest.fixture
def fast_compilation():
    """Compiles with most XLA optimizations off, for tests whose time is mostly
    compiling small steps: what they check (values, gradients, updates, errors)
    does not depend on how well XLA optimizes. Use it with
    ``pytestmark = pytest.mark.usefixtures("fast_compilation")``."""
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", False)
