"""Flax NNX models whose attention reads as Markov chains (needs the ``nn`` extra: flax).

The :class:`ViT` returns every layer's attention probabilities in ``aux`` (and sows them), and
offers a differentiable TokenRank pooling head. The :class:`DiT` is a small class-conditional
diffusion transformer with joint label/image attention, returned the same way.
``import markov_attn`` does not import this subpackage; import ``markov_attn.nn`` explicitly.
"""

from ._config import ViTConfig as ViTConfig
from ._dit import DiT as DiT
from ._dit import DiTConfig as DiTConfig
from ._dit import JointAttention as JointAttention
from ._dit import JointBlock as JointBlock
from ._pool import MAPHead as MAPHead
from ._pool import TokenRankPool as TokenRankPool
from ._vit import Attention as Attention
from ._vit import Block as Block
from ._vit import Mlp as Mlp
from ._vit import ViT as ViT

__all__ = [
    "Attention",
    "Block",
    "DiT",
    "DiTConfig",
    "JointAttention",
    "JointBlock",
    "MAPHead",
    "Mlp",
    "TokenRankPool",
    "ViT",
    "ViTConfig",
]
