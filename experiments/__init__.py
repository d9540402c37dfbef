"""Experiments: training presets, the pooling-head comparison and the demo job.

Scripts run as modules from the repository root, e.g. ``python -m experiments.demo``.
"""

import os

# jaxlib 0.10.2 on CPU fuses a matmul chain followed by a reduction into a slow kernel; turn
# that fusion off (added to any XLA flags the caller set; harmless off CPU; see
# docs/chains.md §8). This is the one place the experiments set it: every script runs as
# ``python -m experiments.NAME``, which imports this package before jax initialises.
_FLAG = "--xla_cpu_experimental_ynn_fusion_type="
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
