"""The natural photos behind the segmentation benchmark, split by source between train and test.

Only photos that ship inside the scikit-image and scikit-learn wheels are used (no download,
works offline). Each is loaded once per process and kept in a module-level cache as a small
uint8 image pyramid (scales ``2**(-k/4)``, anti-aliased with PIL) from which crops are sampled
with nearest-neighbour indexing: a crop of side ``c`` resized to ``s`` reads the pyramid level
just finer than ``s / c``, so the resampling never shrinks by more than ``2**(1/4)`` and stays
practically alias-free while costing one gather. :func:`photos` returns the originals as float32.
"""

import functools
import math

import numpy as np
from jaxtyping import Float32

__all__ = ["PHOTO_SPLITS", "TEST_PHOTOS", "TRAIN_PHOTOS", "photos"]

TRAIN_PHOTOS = (
    "astronaut",
    "brick",
    "camera",
    "chelsea",
    "coins",
    "grass",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "cell",
    "colorwheel",
    "stereo_motorcycle",
    "retina",
    "china",
)
"""Background/camouflage photos of the train split (``skimage.data`` names; ``china`` is from
``sklearn.datasets.load_sample_images``)."""

TEST_PHOTOS = ("coffee", "gravel", "clock", "rocket", "flower")
"""Held-out photos of the test split: never seen in training (colour and grey, smooth and
textured)."""

PHOTO_SPLITS = {"train": TRAIN_PHOTOS, "test": TEST_PHOTOS}
"""Photo names per split; the two sets are disjoint by source image."""

_N_LEVELS = 8  # pyramid scales 2**(-k/4), k = 0..7: down to 1/3.4, enough for 3x crops


def _load_rgb(name: str) -> np.ndarray:
    """One bundled photo as uint8 (H, W, 3)."""
    if name in ("china", "flower"):
        # the JPEG files of sklearn.datasets.load_sample_image, read directly: importing
        # sklearn.datasets takes seconds
        import importlib.util
        from pathlib import Path

        from PIL import Image

        spec = importlib.util.find_spec("sklearn")
        if spec is None or spec.origin is None:
            raise ModuleNotFoundError(
                f"photo {name!r} ships with scikit-learn; install the data extra: "
                "pip install 'markov_attn[data]'"
            )
        path = Path(spec.origin).parent / "datasets" / "images" / f"{name}.jpg"
        with Image.open(path) as f:
            img = np.asarray(f.convert("RGB"))
    else:
        import skimage.data

        img = getattr(skimage.data, name)()
        if isinstance(img, tuple):  # stereo_motorcycle -> (left, right, disparity)
            img = img[0]
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise ValueError(f"photo {name!r} has dtype {img.dtype}, expected uint8")
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3])


@functools.cache
def _pyramid(name: str) -> tuple[np.ndarray, ...]:
    """uint8 levels of one photo, level k downscaled by 2**(k/4) (anti-aliased)."""
    from PIL import Image

    img = _load_rgb(name)
    h, w = img.shape[:2]
    pil = Image.fromarray(img)
    levels = [img]
    for k in range(1, _N_LEVELS):
        scale = 2.0 ** (-k / 4)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        levels.append(np.asarray(pil.resize(size, Image.Resampling.BILINEAR)))
    for lvl in levels:
        lvl.flags.writeable = False
    return tuple(levels)


def _pyramids(split: str) -> tuple[tuple[np.ndarray, ...], ...]:
    if split not in PHOTO_SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return tuple(_pyramid(name) for name in PHOTO_SPLITS[split])


def _crop(
    levels: tuple[np.ndarray, ...],
    y0: int,
    x0: int,
    side: int,
    out_h: int,
    out_w: int,
    flip: bool,
) -> np.ndarray:
    """A square crop (full-resolution box ``[y0, y0+side) x [x0, x0+side)``) resized to
    ``(out_h, out_w)`` as float32 in [0, 1]; ``flip`` mirrors it left-right."""
    h, w = levels[0].shape[:2]
    ratio = side / max(out_h, out_w)
    k = 0 if ratio <= 1.0 else min(math.floor(4.0 * math.log2(ratio) + 1e-9), _N_LEVELS - 1)
    lvl = levels[k]
    lh, lw = lvl.shape[:2]
    sy, sx = lh / h, lw / w
    rows = (_centres(out_h) * (side / out_h * sy) + y0 * sy).astype(np.intp)
    cols = (_centres(out_w) * (side / out_w * sx) + x0 * sx).astype(np.intp)
    if rows[-1] >= lh:  # only by rounding; never in practice
        np.minimum(rows, lh - 1, out=rows)
    if cols[-1] >= lw:
        np.minimum(cols, lw - 1, out=cols)
    c0, c1 = cols[0], cols[-1] + 1
    cols -= c0
    if flip:
        cols = cols[::-1]
    # gather rows from the column band only, then columns: two cheap takes
    out = lvl[:, c0:c1].take(rows, axis=0).take(cols, axis=1)
    return np.multiply(out, np.float32(1 / 255), dtype=np.float32)


@functools.cache
def _centres(n: int) -> np.ndarray:
    """Pixel centres 0.5, 1.5, ..., n - 0.5 (cached)."""
    c = np.arange(n) + 0.5
    c.flags.writeable = False
    return c


def _random_crop(
    u: np.ndarray,
    levels: tuple[np.ndarray, ...],
    out_h: int,
    out_w: int,
    *,
    max_zoom: float = 3.0,
) -> np.ndarray:
    """A random square crop with side between ``max(out)`` and ``max_zoom * max(out)`` photo
    pixels (capped by the photo), resized to ``(out_h, out_w)``, randomly mirrored.

    ``u`` holds four uniform [0, 1) numbers: side, top, left, mirror.
    """
    h, w = levels[0].shape[:2]
    lo = max(out_h, out_w)
    # the side never exceeds the photo (a larger one started above its top and wrapped
    # around: a seam of the photo's bottom rows above its top ones at size 320); an output
    # larger than the photo is then an upsampled crop of the photo's shorter side
    hi = min(max(lo, round(max_zoom * lo)), h, w)
    lo = min(lo, hi)
    side = lo + int(u[0] * (hi - lo + 1))
    y0 = int(u[1] * (h - side + 1))
    x0 = int(u[2] * (w - side + 1))
    return _crop(levels, y0, x0, side, out_h, out_w, u[3] < 0.5)


@functools.cache
def _photos_f32(split: str) -> dict[str, np.ndarray]:
    out = {}
    for name in PHOTO_SPLITS[split]:
        arr = _pyramid(name)[0].astype(np.float32) / np.float32(255)
        arr.flags.writeable = False
        out[name] = arr
    return out


def photos(split: str, /) -> dict[str, Float32[np.ndarray, "h w 3"]]:
    """The benchmark's photos of one split, as float32 RGB in [0, 1] (cached, read-only).

    Grey photos are repeated over the three channels. The split is by source image:
    :data:`TRAIN_PHOTOS` for ``"train"``, :data:`TEST_PHOTOS` for ``"test"``.

    Args:
      split: ``"train"`` or ``"test"``.

    Returns:
      A dict from photo name to its ``(height, width, 3)`` float32 array.
    """
    if split not in PHOTO_SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return _photos_f32(split)
