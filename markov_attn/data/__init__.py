"""Data: Fashion-MNIST and the synthetic segmentation benchmark (objects on natural photos).

Needs the ``data`` extra (scikit-image, scikit-learn, scipy, pillow) and the Fashion-MNIST IDX
files (``sudo apt-get install dataset-fashion-mnist``). See ``make_split`` for the benchmark's
design and ``centre_prior`` / ``oracle_map`` for the reference maps every results table shows.
"""

from markov_attn._util import require_extra

require_extra(["scipy"], "data", "markov_attn.data")

from ._fashion_mnist import CLASSES as CLASSES
from ._fashion_mnist import DataMissingError as DataMissingError
from ._fashion_mnist import load_fashion_mnist as load_fashion_mnist
from ._multibench import make_multi_split as make_multi_split
from ._photos import PHOTO_SPLITS as PHOTO_SPLITS
from ._photos import TEST_PHOTOS as TEST_PHOTOS
from ._photos import TRAIN_PHOTOS as TRAIN_PHOTOS
from ._photos import photos as photos
from ._reference import centre_prior as centre_prior
from ._reference import oracle_map as oracle_map
from ._segbench import DIFFICULTIES as DIFFICULTIES
from ._segbench import SPLIT_IDS as SPLIT_IDS
from ._segbench import Difficulty as Difficulty
from ._segbench import SegBench as SegBench
from ._segbench import make_split as make_split

__all__ = [
    "CLASSES",
    "DIFFICULTIES",
    "PHOTO_SPLITS",
    "SPLIT_IDS",
    "TEST_PHOTOS",
    "TRAIN_PHOTOS",
    "DataMissingError",
    "Difficulty",
    "SegBench",
    "centre_prior",
    "load_fashion_mnist",
    "make_multi_split",
    "make_split",
    "oracle_map",
    "photos",
]
