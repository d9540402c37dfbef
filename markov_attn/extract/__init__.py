"""Pulling attention probabilities out of other people's Flax models (NNX and Linen).

Needs the ``nn`` extra (flax). Capturing forces the non-fused attention path: the
``(n, n)`` probabilities are computed explicitly, so fused/flash kernels are bypassed while
capturing.
"""

from markov_attn._util import require_extra

require_extra(["flax"], "nn", "markov_attn.extract")

from ._linen import capture_attention_linen as capture_attention_linen
from ._nnx import capture_attention as capture_attention

__all__ = ["capture_attention", "capture_attention_linen"]
