"""Strict test settings shared by the whole suite."""

import os
import zlib

# Honour the CPU fusion workaround (docs/chains.md §8) when tests run outside `make`.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
# The suite compiles hundreds of small programs and its time is mostly XLA compiling them. At
# backend optimisation level 0 with XLA's older loop emitters instead of its fusion emitters
# (--xla_cpu_use_fusion_emitters=false), tokenrank on (16, 2, 16, 16) compiles in 0.4 s instead
# of 1.6 s at level 1 with fusion emitters, and test_tokenrank.py runs in 46 s instead of 111 s
# (test_reliability.py 46 s instead of 105 s). The arithmetic is the same (the same operations
# in the same order); the emitter flag changes which operations XLA fuses, and so rounding at
# the level of a few ulp between two programs that compute the same thing. Trade-off: the suite
# no longer runs XLA's default CPU code generation (a miscompile there, like the YNN fusion
# problem above, would not show here); the experiments and benchmarks run the defaults.
# Subprocesses started by tests inherit the flags. Pass either flag yourself to test otherwise.
if "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
if "--xla_cpu_use_fusion_emitters" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_cpu_use_fusion_emitters=false"

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
