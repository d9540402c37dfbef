"""Strict test settings shared by the whole suite."""

import os
import zlib

# Honour the CPU fusion workaround (docs/chains.md §8) when tests run outside `make`.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
# The suite compiles hundreds of small programs and its time is mostly LLVM's: at backend
# optimisation level 1 a program such as jax.random.normal compiles in 0.4 s instead of 3.3 s.
# The level changes code generation only, not the HLO (the same operations in the same order);
# subprocesses started by tests inherit it. Pass the flag yourself to test at another level.
if "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=1"

import jax
import numpy as np
import pytest

# Implicit rank promotion hides broadcasting bugs over batch axes; make it an error.
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def rng(request):
    """A fresh NumPy generator per test, seeded from the test's name (reproducible, but every
    test draws different data)."""
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)


@pytest.fixture
def x64():
    """Run a test in float64 (reference-quality numerics for gradient checks)."""
    with jax.enable_x64(True):
        yield
