"""A segmentation benchmark with exact masks: Fashion-MNIST objects on natural photos.

Each sample is drawn from its own generator ``np.random.default_rng([seed, split_id, index])``
(``split_id`` 0 for train, 1 for test), so any sample can be regenerated on its own, in any
batch, in any process. A sample is built in four steps:

1. **Background**: a random square crop (side 64–192 px at ``size=64``; ``size`` to
   ``3 * size`` in general, capped by the photo) of one photo of the split, resized to
   ``size x size``, mirrored at random. The photos are split by source image
   (:data:`~markov_attn.data.TRAIN_PHOTOS` / :data:`~markov_attn.data.TEST_PHOTOS`), so test
   backgrounds are never seen in training.
2. **Distractors**: 0–3 soft-edged elliptic blobs (radii 3–10 px at ``size=64``) filled with a
   crop of a photo or a noisy colour. They are *not* in the mask.
3. **Object**: a Fashion-MNIST image (train objects for ``"train"``, test objects for
   ``"test"``) scaled to a side of 29–45 px at ``size=64`` (proportionally otherwise), at a
   uniformly random position fully inside the image, mirrored at random. Its silhouette is the
   holes-filled threshold ``intensity > 16/255``; the soft alpha is the silhouette resized
   bilinearly; the mask is ``alpha > 0.5``. Its fill is a random colour (probability 1/2) or a
   crop of another photo of the split (camouflage), shaded by the Fashion-MNIST intensity
   (``fill * (0.25 + 0.75 * intensity)``), so neither colour nor texture gives the object away.
4. The label is the Fashion-MNIST class of the object (the classification task).

The object covers about 16 % of the pixels on average. The object side range (29–45 px; the
design said "about 28–44") was tuned so that the design's reference rows reproduce (see
``docs/data.md`` and ``experiments/data_reference.py``).

Each process loads the Fashion-MNIST split and builds the photo pyramids once; silhouettes are
computed lazily, once per object, as batches need them (throughput in ``docs/benchmarks.md``).
"""

import dataclasses
import functools
import os

import numpy as np
from jaxtyping import Bool, Float32
from scipy import ndimage

from ._fashion_mnist import load_fashion_mnist
from ._photos import _pyramids, _random_crop

__all__ = ["DIFFICULTIES", "SPLIT_IDS", "Difficulty", "SegBench", "make_split"]

SPLIT_IDS = {"train": 0, "test": 1}
"""The ``split_id`` that enters each sample's seed ``[seed, split_id, index]``."""

_THRESHOLD = 16  # silhouette: FMNIST intensity > 16 (of 255), then holes filled
_OBJ_SIDE = (29.0, 45.0)  # object side in px at size 64 (docs/data.md: design said "about 28-44")
_BLOB_RADIUS = (3.0, 10.0)  # distractor radii in px at size 64
_MAX_BLOBS = 3
_P_CAMO = 0.5
_SHADE = (0.25, 0.75)  # fill * (a + b * intensity)


@dataclasses.dataclass(frozen=True)
class Difficulty:
    """What makes a sample hard: camouflage, distractors and the object's size.

    Every level draws the same uniforms for a sample, so sample ``i`` of two levels shares its
    object, class, photo, crop, position (up to the side) and colour: the levels are paired.

    Attributes:
      camouflage: probability that the object is filled with a crop of another photo instead
        of a random colour.
      blobs: ``(lo, hi)``, the number of distractor blobs, uniform in ``lo .. hi``.
      object_side: ``(lo, hi)``, the object's side in px at ``size=64`` (uniform).
    """

    camouflage: float = _P_CAMO
    blobs: tuple[int, int] = (0, _MAX_BLOBS)
    object_side: tuple[float, float] = _OBJ_SIDE

    def __post_init__(self):
        lo, hi = self.blobs
        if not 0 <= self.camouflage <= 1:
            raise ValueError(f"camouflage must lie in [0, 1], got {self.camouflage}")
        if not 0 <= lo <= hi or int(lo) != lo or int(hi) != hi:
            raise ValueError(f"blobs must be integers 0 <= lo <= hi, got {self.blobs}")
        a, b = self.object_side
        if not 1 <= a <= b <= 64:
            raise ValueError(f"object_side must satisfy 1 <= lo <= hi <= 64, got {(a, b)}")


DIFFICULTIES = {
    "standard": Difficulty(),
    "plain": Difficulty(camouflage=0.0, blobs=(0, 0)),
    "clutter": Difficulty(blobs=(4, 8), object_side=(22.0, 34.0)),
}
"""The named levels. ``"standard"`` is the benchmark (every table of the README); ``"plain"``
the same samples without camouflage or distractors; ``"clutter"`` smaller objects (22–34 px)
among 4–8 distractors, the setting chosen in advance for the pooling-head question (README)."""


def _difficulty(difficulty) -> Difficulty:
    if isinstance(difficulty, Difficulty):
        return difficulty
    if difficulty not in DIFFICULTIES:
        raise ValueError(
            f"difficulty must be one of {sorted(DIFFICULTIES)} or a Difficulty, got {difficulty!r}"
        )
    return DIFFICULTIES[difficulty]


def _fill_holes(images: np.ndarray) -> np.ndarray:
    """Holes-filled thresholded silhouettes of a stack of images, bool (N, 28, 28).

    Foreground is ``intensity > 16``; holes are background regions (4-connected) that do not
    touch the image border. One ``ndimage.label`` call over the stack handles all images.
    """
    background = images <= _THRESHOLD
    structure = np.zeros((3, 3, 3), bool)
    structure[1] = ndimage.generate_binary_structure(2, 1)  # 4-connected, within each image
    labels, count = ndimage.label(background, structure=structure)
    outside = np.zeros(count + 1, bool)
    for edge in (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]):
        outside[edge] = True
    outside[0] = False  # label 0 is the foreground
    return ~outside[labels]  # foreground, or background not connected to the border


class _Silhouettes:
    """Per-process cache of the silhouettes of one FMNIST split, filled lazily per batch."""

    def __init__(self, images: np.ndarray):
        self.images = images
        self.sils = np.zeros(images.shape, bool)
        self.done = np.zeros(images.shape[0], bool)

    def get(self, index: np.ndarray) -> np.ndarray:
        todo = np.unique(index[~self.done[index]])
        if todo.size:
            self.sils[todo] = _fill_holes(self.images[todo])
            self.done[todo] = True
        return self.sils


@functools.cache
def _silhouette_cache(split: str, root: str | None) -> _Silhouettes:
    return _Silhouettes(load_fashion_mnist(split, root=root)[0])


@functools.cache
def _interp_matrix(out: int, src: int = 28) -> np.ndarray:
    """Bilinear resampling matrix (out, src), half-pixel centres, edges clamped."""
    pos = (np.arange(out) + 0.5) * (src / out) - 0.5
    pos = np.clip(pos, 0, src - 1)
    lo = np.floor(pos).astype(np.intp)
    hi = np.minimum(lo + 1, src - 1)
    frac = (pos - lo).astype(np.float32)
    m = np.zeros((out, src), np.float32)
    m[np.arange(out), lo] += 1 - frac
    m[np.arange(out), hi] += frac
    m.flags.writeable = False
    return m


def _resolve_root(root) -> str | None:
    return None if root is None else os.path.abspath(os.fspath(root))


def _check(split: str, size: int) -> None:
    if split not in SPLIT_IDS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not isinstance(size, int | np.integer) or size < 16:
        raise ValueError(f"size must be an integer >= 16 (64 is the benchmark's), got {size!r}")


# Each sample draws one vector of uniforms up front (one generator call instead of dozens);
# fixed slots keep the draw order, and so each sample, independent of the code path taken.
_U_BACKGROUND = slice(0, 5)  # photo, crop (side, top, left, mirror)
_U_OBJECT = slice(5, 16)  # side, top, left, mirror, camouflage?, photo, crop (4), -
_U_COLOUR = slice(16, 19)
_U_BLOBS = 19  # count, then _U_PER_BLOB per blob
_U_PER_BLOB = 12  # ry, rx, angle, cy, cx, photo?, photo, crop (4), -; colour reuses the crop slots
_N_U = _U_BLOBS + 1 + _MAX_BLOBS * _U_PER_BLOB


@functools.cache
def _blob_alpha(q_ry: int, q_rx: int, q_angle: int) -> np.ndarray:
    """Soft alpha (2R+1, 2R+1, 1) of an ellipse centred on the middle pixel, radii
    ``q/2`` px, angle ``q_angle * pi / 32``; edge one pixel wide. Cached: blobs reuse it."""
    ry, rx, theta = q_ry / 2, q_rx / 2, q_angle * np.pi / 32
    big = int(np.ceil(max(ry, rx))) + 1
    t = np.arange(-big, big + 1, dtype=np.float64)
    v, x = t[:, None], t[None, :]
    c, s = np.cos(theta), np.sin(theta)
    d = np.sqrt(((c * x + s * v) / rx) ** 2 + ((-s * x + c * v) / ry) ** 2)
    alpha = np.clip((1 - d) * min(rx, ry) + 0.5, 0, 1).astype(np.float32)[:, :, None]
    alpha.flags.writeable = False
    return alpha


def _blob(rng: np.random.Generator, u: np.ndarray, pyramids, image: np.ndarray, size: int):
    """Composites one textured elliptic blob into ``image`` in place."""
    scale = size / 64
    lo, hi = _BLOB_RADIUS
    q_ry = max(1, round(2 * scale * (lo + (hi - lo) * u[0])))
    q_rx = max(1, round(2 * scale * (lo + (hi - lo) * u[1])))
    alpha = _blob_alpha(q_ry, q_rx, int(u[2] * 32))
    big = alpha.shape[0] // 2
    cy, cx = int(u[3] * size), int(u[4] * size)
    y0, y1 = max(0, cy - big), min(size, cy + big + 1)
    x0, x1 = max(0, cx - big), min(size, cx + big + 1)
    h, w = y1 - y0, x1 - x0
    alpha = alpha[y0 - cy + big : y1 - cy + big, x0 - cx + big : x1 - cx + big]
    if u[5] < 0.5:  # a crop of a photo of the split
        tex = _random_crop(u[7:11], pyramids[int(u[6] * len(pyramids))], h, w)
    else:  # a noisy random colour
        colour = u[7:10].astype(np.float32)
        tex = colour * (np.float32(0.6) + np.float32(0.4) * rng.random((h, w, 1), np.float32))
    win = image[y0:y1, x0:x1]
    win += alpha * (tex - win)


def _render(
    rng: np.random.Generator,
    obj_image: np.ndarray,
    obj_sil: np.ndarray,
    pyramids,
    image: np.ndarray,
    alpha_out: np.ndarray,
    size: int,
    level: Difficulty,
) -> dict:
    """Renders one sample into ``image`` (size, size, 3) and ``alpha_out`` (size, size)."""
    u = rng.random(_N_U)
    count = _blob_count(u[_U_BLOBS], level.blobs)
    blob_u = u[_U_BLOBS + 1 :]
    if count > _MAX_BLOBS:  # more blobs than slots: drawn after the fixed slots
        blob_u = np.concatenate([blob_u, rng.random((count - _MAX_BLOBS) * _U_PER_BLOB)])
    # 1. background, 2. distractors (under the object)
    bg = _paint_background(rng, u[_U_BACKGROUND], count, blob_u, pyramids, image, size)
    # 3. object
    uo = u[_U_OBJECT]
    side = _object_side(uo[0], level.object_side, size)
    oy = int(uo[1] * (size - side + 1))
    ox = int(uo[2] * (size - side + 1))
    alpha, flip, camo = _paste_object(
        uo, u[_U_COLOUR], obj_image, obj_sil, pyramids, image, side, oy, ox, bg, level.camouflage
    )
    alpha_out[oy : oy + side, ox : ox + side] = alpha
    info = {"side": side, "y": oy, "x": ox, "flip": flip, "camo": camo, "background": bg}
    return info | {"blobs": count}


def _blob_count(u: float, blobs: tuple[int, int]) -> int:
    """The number of distractor blobs, uniform in ``blobs = (lo, hi)``, from one uniform."""
    lo, hi = blobs
    return lo + int(u * (hi - lo + 1))


def _paint_background(rng, ub, count, ublobs, pyramids, image: np.ndarray, size: int) -> int:
    """Paints a crop of one photo of the split into ``image`` and ``count`` distractor blobs
    over it; returns the photo's index. ``ub``: 5 uniforms (photo, crop); ``ublobs``:
    ``_U_PER_BLOB`` uniforms per blob."""
    bg = int(ub[0] * len(pyramids))
    image[...] = _random_crop(ub[1:5], pyramids[bg], size, size)
    for k in range(count):
        start = k * _U_PER_BLOB
        _blob(rng, ublobs[start : start + _U_PER_BLOB], pyramids, image, size)
    return bg


def _object_side(u: float, side_range: tuple[float, float], size: int) -> int:
    """Object side in pixels: uniform in ``side_range`` (px at size 64), scaled to ``size``."""
    lo, hi = side_range
    return min(size, max(1, round((lo + (hi - lo) * u) * size / 64)))


def _paste_object(
    uo, colour, obj_image, obj_sil, pyramids, image, side, oy, ox, bg, p_camo=_P_CAMO
):
    """Composites one Fashion-MNIST object of side ``side`` at ``(oy, ox)`` into ``image`` in
    place (intensity and silhouette resized together by separable bilinear matrices); returns
    its soft alpha ``(side, side)``, whether it was mirrored and whether it is camouflaged.
    ``uo`` are the object's uniforms (``_U_OBJECT`` slots), ``colour`` its plain fill."""
    flip = bool(uo[3] < 0.5)
    camo = bool(uo[4] < p_camo)
    m = _interp_matrix(side)
    mx = m[::-1] if flip else m
    planes = np.stack([obj_image, obj_sil]).astype(np.float32)
    planes = m @ planes @ mx.T  # (2, side, side)
    intensity, alpha = planes[0], planes[1]
    intensity *= np.float32(_SHADE[1] / 255)
    intensity += np.float32(_SHADE[0])  # now the shade
    np.clip(alpha, 0, 1, out=alpha)
    if camo:
        other = int(uo[5] * (len(pyramids) - 1))
        other += other >= bg  # another photo than the background's
        fill = _random_crop(uo[6:10], pyramids[other], side, side)
    else:
        fill = colour.astype(np.float32)
    win = image[oy : oy + side, ox : ox + side]
    win += alpha[:, :, None] * (fill * intensity[:, :, None] - win)
    return alpha, flip, camo


def _generate(
    split: str,
    start: int,
    n: int,
    size: int,
    seed: int,
    root,
    alpha: bool,
    meta=False,
    difficulty="standard",
):
    _check(split, size)
    level = _difficulty(difficulty)
    if n < 0 or start < 0:
        raise ValueError(f"start and n must be >= 0, got start={start}, n={n}")
    root = _resolve_root(root)
    obj_images, obj_labels = load_fashion_mnist(split, root=root)
    pyramids = _pyramids(split)
    split_id = SPLIT_IDS[split]
    images = np.empty((n, size, size, 3), np.float32)
    alphas = np.zeros((n, size, size), np.float32)
    n_objects = obj_images.shape[0]
    rngs = [np.random.default_rng([seed, split_id, start + i]) for i in range(n)]
    objects = np.array([int(rng.integers(n_objects)) for rng in rngs], np.intp)
    labels = obj_labels[objects].astype(np.int32)
    sils = _silhouette_cache(split, root).get(objects)
    metas = []
    for i, (rng, obj) in enumerate(zip(rngs, objects)):
        info = _render(rng, obj_images[obj], sils[obj], pyramids, images[i], alphas[i], size, level)
        if meta:
            info["object"] = int(obj)
            metas.append(info)
    np.clip(images, 0, 1, out=images)
    out = {"images": images, "masks": alphas > 0.5, "labels": labels}
    if alpha:
        out["alpha"] = alphas
    if meta:
        out["meta"] = metas
    return out


def make_split(
    split: str,
    n: int,
    /,
    *,
    size: int = 64,
    seed: int = 0,
    start: int = 0,
    alpha: bool = False,
    root: str | os.PathLike | None = None,
    difficulty: str | Difficulty = "standard",
) -> dict[str, np.ndarray]:
    """Generates ``n`` benchmark samples, indices ``start .. start + n - 1``.

    Sample ``i`` depends only on ``(seed, split, i, size)``: it is drawn from
    ``np.random.default_rng([seed, split_id, i])``, so ``make_split(s, 10, start=5)`` equals
    rows 5..14 of ``make_split(s, 20)``. Train samples use Fashion-MNIST train objects and the
    train photos; test samples use test objects and the held-out photos.

    Args:
      split: ``"train"`` or ``"test"``.
      n: number of samples.
      size: image side in pixels (64 is the benchmark; object and crop sizes scale with it).
      seed: data seed.
      start: index of the first sample.
      alpha: also return the object's soft alpha (key ``"alpha"``).
      root: Fashion-MNIST directory (see :func:`load_fashion_mnist`).
      difficulty: a name of :data:`DIFFICULTIES` (``"standard"``, the benchmark; ``"plain"``;
        ``"clutter"``) or a :class:`Difficulty`. Sample ``i`` of every level shares its
        object and photo (the levels are paired).

    Returns:
      A dict of numpy arrays: ``"images"`` float32 ``(n, size, size, 3)`` RGB in [0, 1];
      ``"masks"`` bool ``(n, size, size)``, the exact object mask (``alpha > 0.5``);
      ``"labels"`` int32 ``(n,)``, the object's Fashion-MNIST class; and with ``alpha=True``,
      ``"alpha"`` float32 ``(n, size, size)`` in [0, 1].

    Raises:
      DataMissingError: Fashion-MNIST is not installed.
    """
    return _generate(split, int(start), int(n), size, int(seed), root, alpha, difficulty=difficulty)


class SegBench:
    """The benchmark as an indexable object: ``bench[i] -> (image, mask, label)``.

    Args:
      split: ``"train"`` or ``"test"``.
      size: image side in pixels.
      seed: data seed.
      n: optional length; with it ``len(bench) == n``, indices past it raise ``IndexError``
        and negative indices count from the end. Without it the stream is unbounded (no
        ``len``, no iteration; use :meth:`batch`).
      root: Fashion-MNIST directory (see :func:`load_fashion_mnist`).
      difficulty: see :func:`make_split`.
    """

    def __init__(
        self,
        split: str,
        /,
        *,
        size: int = 64,
        seed: int = 0,
        n: int | None = None,
        root: str | os.PathLike | None = None,
        difficulty: str | Difficulty = "standard",
    ):
        _check(split, size)
        _difficulty(difficulty)
        self.split, self.size, self.seed, self.n, self.root = split, size, seed, n, root
        self.difficulty = difficulty

    def __repr__(self) -> str:
        extra = "" if self.difficulty == "standard" else f", difficulty={self.difficulty!r}"
        return f"SegBench({self.split!r}, size={self.size}, seed={self.seed}, n={self.n}{extra})"

    def __len__(self) -> int:
        if self.n is None:
            raise TypeError("this SegBench is unbounded; pass n= to give it a length")
        return self.n

    def __iter__(self):
        if self.n is None:
            raise TypeError("this SegBench is unbounded; pass n= to iterate, or use .batch()")
        return (self[i] for i in range(self.n))

    def __getitem__(
        self, index: int
    ) -> tuple[Float32[np.ndarray, "s s 3"], Bool[np.ndarray, "s s"], int]:
        index = int(index)
        if self.n is not None:
            if index < 0:
                index += self.n
            if not 0 <= index < self.n:
                raise IndexError(f"index out of range for SegBench of length {self.n}")
        elif index < 0:
            raise IndexError("negative index into an unbounded SegBench; pass n=")
        out = self.batch(index, 1)
        return out["images"][0], out["masks"][0], int(out["labels"][0])

    def batch(self, start: int, n: int, /, *, alpha: bool = False) -> dict[str, np.ndarray]:
        """Samples ``start .. start + n - 1`` as :func:`make_split` returns them."""
        return make_split(
            self.split,
            n,
            size=self.size,
            seed=self.seed,
            start=start,
            alpha=alpha,
            root=self.root,
            difficulty=self.difficulty,
        )
