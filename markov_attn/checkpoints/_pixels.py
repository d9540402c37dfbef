"""Pixel statistics, and the record of the preprocessing a checkpoint family expects.

Each family's record in the registry (:data:`._families.CONVERTERS`) holds one
:class:`Preprocessing`; :mod:`._preprocess` turns it into a recipe. Both import it from here,
so the registry does not depend on the preprocessing code.
"""

import dataclasses
from typing import Literal

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: HF's IMAGENET_STANDARD_MEAN / _STD, the defaults of its ViTImageProcessor
HALF_MEAN = (0.5, 0.5, 0.5)
HALF_STD = (0.5, 0.5, 0.5)


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """The preprocessing defaults of a family, used when its checkpoint lacks the file that
    says how it was trained (the table in :mod:`._preprocess`'s docstring).

    Attributes:
      mode: ``"square"`` (resize to size x size, no crop) or ``"short_crop"`` (shortest edge
        to ``floor(scale * size)``, then a centre crop of ``size``).
      scale: shortest edge / crop side (1.0 for ``"square"``).
      resample: the PIL filter, by name.
      mean: per-channel mean of pixels in [0, 1].
      std: per-channel standard deviation of pixels in [0, 1].
      source: where a checkpoint states its own preprocessing, overriding these defaults:
        ``"preprocessor_config.json"`` (HF, next to the weights) or ``"pretrained_cfg"``
        (timm, inside ``config.json``).
    """

    mode: Literal["square", "short_crop"]
    scale: float
    resample: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: Literal["preprocessor_config.json", "pretrained_cfg"] = "preprocessor_config.json"

    def __post_init__(self):
        if self.mode not in ("square", "short_crop"):
            raise ValueError(f"mode must be 'square' or 'short_crop', got {self.mode!r}")
        if self.source not in ("preprocessor_config.json", "pretrained_cfg"):
            raise ValueError(f"unknown preprocessing source {self.source!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("mean and std need one value per RGB channel")
