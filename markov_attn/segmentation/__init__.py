"""Zero-shot segmentation from attention maps: the map → mask protocol, metrics, map methods.

The protocol (``docs/data.md`` §3): a map over the token grid is min–max normalised, upsampled to
the image (nearest), and thresholded at its mean; pixel accuracy and two-class mIoU are
accumulated over the data set, mAP is the mean per-image average precision of the continuous
map. :func:`diffseg` is DiffSeg's label-free multi-segment merging of attention maps, with grid
or TokenRank anchors. This subpackage depends on jax and numpy only (``h5py`` is imported lazily by
:func:`load_imagenet_seg`).
"""

from ._diffseg import diffseg as diffseg
from ._diffseg import grid_anchors as grid_anchors
from ._diffseg import symmetric_kl as symmetric_kl
from ._diffseg import tokenrank_anchors as tokenrank_anchors
from ._imagenet_seg import ImageNetSeg as ImageNetSeg
from ._imagenet_seg import load_imagenet_seg as load_imagenet_seg
from ._masks import map_to_mask as map_to_mask
from ._masks import minmax as minmax
from ._masks import threshold as threshold
from ._masks import upsample as upsample
from ._methods import METHODS as METHODS
from ._methods import MapMethod as MapMethod
from ._methods import compute_maps as compute_maps
from ._methods import extended_methods as extended_methods
from ._methods import per_layer as per_layer
from ._metrics import METRICS as METRICS
from ._metrics import SegAccumulator as SegAccumulator
from ._metrics import SegStats as SegStats
from ._metrics import average_precision as average_precision
from ._metrics import bootstrap as bootstrap
from ._metrics import bootstrap_counts as bootstrap_counts
from ._metrics import bootstrap_mean as bootstrap_mean
from ._metrics import image_stats as image_stats
from ._metrics import summarize as summarize

__all__ = [
    "METHODS",
    "METRICS",
    "ImageNetSeg",
    "MapMethod",
    "SegAccumulator",
    "SegStats",
    "average_precision",
    "bootstrap",
    "bootstrap_counts",
    "bootstrap_mean",
    "compute_maps",
    "diffseg",
    "extended_methods",
    "grid_anchors",
    "image_stats",
    "load_imagenet_seg",
    "map_to_mask",
    "minmax",
    "per_layer",
    "summarize",
    "symmetric_kl",
    "threshold",
    "tokenrank_anchors",
    "upsample",
]
