"""Shared test set-up: float64 available for derivative checks, small deterministic fixtures."""
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402

# Derivative tests run in float64; library code follows the dtype of its inputs, so float32
# inputs still exercise the float32 path.
jax.config.update("jax_enable_x64", True)
