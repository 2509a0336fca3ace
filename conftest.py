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
