"""Flax NNX models whose attention reads as Markov chains (needs the ``nn`` extra: flax).

The :class:`ViT` returns every layer's attention probabilities in ``aux`` (and sows them), and
offers a differentiable TokenRank pooling head. The :class:`DiT` is a small class-conditional
diffusion transformer with joint label/image attention, returned the same way; the samplers
(DDIM, DDPM) and Self-Attention Guidance with a column-sum or TokenRank mask come with it.
:func:`load_run` reads a trained ViT back from a training run directory or a weights file
(:func:`write_weights`); :func:`config_to_dict` / :func:`config_from_dict` are the one pair of
configuration ↔ JSON converters that the run formats and the training scripts share.
``import markov_attn`` does not import this subpackage; import ``markov_attn.nn`` explicitly.
"""

from markov_attn._util import require_extra

require_extra(["flax"], "nn", "markov_attn.nn")

from ._checkpoint import CheckpointError as CheckpointError
from ._config import ViTConfig as ViTConfig
from ._diffusion import alphas_cumprod as alphas_cumprod
from ._diffusion import ddim_sample as ddim_sample
from ._diffusion import ddpm_sample as ddpm_sample
from ._diffusion import q_sample as q_sample
from ._diffusion import sample as sample
from ._diffusion import timesteps as timesteps
from ._dit import DiT as DiT
from ._dit import DiTConfig as DiTConfig
from ._dit import JointAttention as JointAttention
from ._dit import JointBlock as JointBlock
from ._layers import Mlp as Mlp
from ._pool import MAPHead as MAPHead
from ._pool import TokenRankPool as TokenRankPool
from ._posembed import POS_INTERPS as POS_INTERPS
from ._posembed import bicubic_matrix as bicubic_matrix
from ._posembed import resize_pos_embed as resize_pos_embed
from ._run import config_from_dict as config_from_dict
from ._run import config_to_dict as config_to_dict
from ._run import load_run as load_run
from ._run import write_weights as write_weights
from ._sag import MASK_KINDS as MASK_KINDS
from ._sag import gaussian_blur as gaussian_blur
from ._sag import sag_degrade as sag_degrade
from ._sag import sag_mask as sag_mask
from ._sag import upsample_mask as upsample_mask
from ._vit import Attention as Attention
from ._vit import Block as Block
from ._vit import ViT as ViT

__all__ = [
    "MASK_KINDS",
    "Attention",
    "Block",
    "CheckpointError",
    "DiT",
    "DiTConfig",
    "JointAttention",
    "JointBlock",
    "MAPHead",
    "Mlp",
    "TokenRankPool",
    "ViT",
    "ViTConfig",
    "alphas_cumprod",
    "bicubic_matrix",
    "config_from_dict",
    "config_to_dict",
    "ddim_sample",
    "ddpm_sample",
    "gaussian_blur",
    "load_run",
    "q_sample",
    "resize_pos_embed",
    "sag_degrade",
    "sag_mask",
    "sample",
    "timesteps",
    "upsample_mask",
    "write_weights",
]
