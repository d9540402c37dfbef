"""Experiments: training presets, the pooling-head comparison and the demo job.

Scripts run as modules from the repository root, e.g. ``python -m experiments.demo``.
"""

import os

# jaxlib 0.10.2 on CPU fuses a matmul chain followed by a reduction into a slow kernel; turn
# that fusion off unless the caller chose XLA flags (see ../shared/spec/chains.md). Effective
# only when this package is imported before jax initialises its backend.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
