"""Loading pretrained PyTorch ViT checkpoints (HF ViT / DINO / DINOv2 / CLIP, timm) into JAX.

Needs the ``checkpoints`` and ``nn`` extras (safetensors, flax). ``.pth``/``.bin`` files also
need torch, imported only when such a file is read.
"""

from markov_attn._util import require_extra

require_extra(["flax", "safetensors", "PIL"], "checkpoints", "markov_attn.checkpoints")

from ._families import FAMILIES as FAMILIES
from ._io import read_state_dict as read_state_dict
from ._load import CheckpointInfo as CheckpointInfo
from ._load import detect_family as detect_family
from ._load import load as load
from ._preprocess import CLIP_MEAN as CLIP_MEAN
from ._preprocess import CLIP_STD as CLIP_STD
from ._preprocess import HALF_MEAN as HALF_MEAN
from ._preprocess import HALF_STD as HALF_STD
from ._preprocess import IMAGENET_MEAN as IMAGENET_MEAN
from ._preprocess import IMAGENET_STD as IMAGENET_STD
from ._preprocess import AssumedDefaultsWarning as AssumedDefaultsWarning
from ._preprocess import preprocess as preprocess
from ._preprocess import recipe as recipe

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "FAMILIES",
    "HALF_MEAN",
    "HALF_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "AssumedDefaultsWarning",
    "CheckpointInfo",
    "detect_family",
    "load",
    "preprocess",
    "read_state_dict",
    "recipe",
]
