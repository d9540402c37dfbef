"""A multi-object variant of the benchmark: 2–4 Fashion-MNIST objects per photo, with an exact
instance mask per object (for unsupervised, label-free segmentation).

Sample ``i`` of a split is drawn from ``np.random.default_rng([seed, split_id, i, 2])`` (the
trailing ``2`` keeps these streams apart from the single-object benchmark's), with the same
train/test split of objects and photos as :func:`markov_attn.data.make_split`:

1. **Background** and **distractors** as in the single-object benchmark (a crop of a photo of
   the split; 0–3 soft blobs that are not in any mask).
2. **Objects**: ``m`` uniform in ``objects`` (default 2–4), each a Fashion-MNIST object of the
   split scaled to a side of 20–32 px at ``size=64``, mirrored at random, filled with a random
   colour or a camouflage crop of another photo and shaded by its intensity, exactly like the
   single object. Its position is the least-overlapping of 4 uniform candidates, and objects are
   pasted in order, so a later one occludes an earlier one.
3. **Instances**: pixel ``(y, x)`` is ``j`` (1-based) where object ``j`` is the top-most with soft
   alpha > 0.5, ``0`` (background) elsewhere. An object hidden completely keeps its label entry
   but has no pixels (``visible`` says how many pixels each object has).
"""

import os

import numpy as np

from ._fashion_mnist import load_fashion_mnist
from ._photos import _pyramids
from ._segbench import (
    _MAX_BLOBS,
    _U_PER_BLOB,
    SPLIT_IDS,
    _blob_count,
    _check,
    _object_side,
    _paint_background,
    _paste_object,
    _resolve_root,
    _silhouette_cache,
)

__all__ = ["make_multi_split"]

_MULTI_SIDE = (20.0, 32.0)  # object side in px at size 64
_CANDIDATES = 4  # positions tried per object; the least-overlapping wins
_U_OBJ = 11  # uniforms per object: the single benchmark's object slots
_U_OBJECT_COLOUR = 3


def _render_multi(rng, objects, obj_images, sils, pyramids, image, inst, size, m):
    u_bg = rng.random(5)
    u_blobs = rng.random(1 + _MAX_BLOBS * _U_PER_BLOB)
    count = _blob_count(u_blobs[0], (0, _MAX_BLOBS))
    bg = _paint_background(rng, u_bg, count, u_blobs[1:], pyramids, image, size)
    cover = np.zeros((size, size), bool)
    for j in range(m):
        uo = rng.random(_U_OBJ)
        colour = rng.random(_U_OBJECT_COLOUR)
        pos = rng.random((_CANDIDATES, 2))
        side = _object_side(uo[0], _MULTI_SIDE, size)
        ys = (pos[:, 0] * (size - side + 1)).astype(int)
        xs = (pos[:, 1] * (size - side + 1)).astype(int)
        overlap = [cover[y : y + side, x : x + side].sum() for y, x in zip(ys, xs)]
        best = int(np.argmin(overlap))
        oy, ox = int(ys[best]), int(xs[best])
        obj = objects[j]
        alpha, _, _ = _paste_object(
            uo, colour, obj_images[obj], sils[obj], pyramids, image, side, oy, ox, bg
        )
        mask = alpha > 0.5
        inst[oy : oy + side, ox : ox + side][mask] = j + 1
        cover[oy : oy + side, ox : ox + side] |= mask


def make_multi_split(
    split: str,
    n: int,
    /,
    *,
    size: int = 64,
    seed: int = 0,
    start: int = 0,
    objects: tuple[int, int] = (2, 4),
    root: str | os.PathLike | None = None,
) -> dict[str, np.ndarray]:
    """Generates ``n`` multi-object samples, indices ``start .. start + n - 1``.

    Args:
      split: ``"train"`` or ``"test"`` (objects and photos as in :func:`make_split`).
      n: number of samples.
      size: image side in pixels (object sizes scale with it).
      seed: data seed.
      start: index of the first sample.
      objects: ``(min, max)`` objects per image, inclusive.
      root: Fashion-MNIST directory (see :func:`load_fashion_mnist`).

    Returns:
      ``"images"`` float32 ``(n, size, size, 3)`` in [0, 1]; ``"instances"`` uint8
      ``(n, size, size)`` (0 = background, ``j`` = object ``j``); ``"labels"`` int32
      ``(n, max)`` Fashion-MNIST classes, ``-1`` past ``num_objects``; ``"num_objects"`` int32
      ``(n,)``; ``"visible"`` int32 ``(n, max)`` pixels of each object in ``instances``.

    Raises:
      ValueError: for a bad split, size or ``objects`` range.
      DataMissingError: Fashion-MNIST is not installed.

    Examples:
      >>> d = make_multi_split("test", 2)  # doctest: +SKIP
      >>> d["instances"].max(axis=(1, 2)) <= d["num_objects"]  # doctest: +SKIP
    """
    _check(split, size)
    lo, hi = (int(v) for v in objects)
    if not 1 <= lo <= hi <= 8:
        raise ValueError(f"objects must be (min, max) with 1 <= min <= max <= 8, got {objects!r}")
    if n < 0 or start < 0:
        raise ValueError(f"start and n must be >= 0, got start={start}, n={n}")
    root = _resolve_root(root)
    obj_images, obj_labels = load_fashion_mnist(split, root=root)
    pyramids = _pyramids(split)
    split_id = SPLIT_IDS[split]
    images = np.empty((n, size, size, 3), np.float32)
    inst = np.zeros((n, size, size), np.uint8)
    labels = np.full((n, hi), -1, np.int32)
    counts = np.zeros((n,), np.int32)
    cache = _silhouette_cache(split, root)
    for i in range(n):
        rng = np.random.default_rng([seed, split_id, start + i, 2])
        m = int(rng.integers(lo, hi + 1))
        objs = rng.integers(obj_images.shape[0], size=m)
        sils = cache.get(objs)
        _render_multi(rng, objs, obj_images, sils, pyramids, images[i], inst[i], size, m)
        labels[i, :m] = obj_labels[objs]
        counts[i] = m
    np.clip(images, 0, 1, out=images)
    visible = np.stack([(inst == j + 1).sum(axis=(1, 2)) for j in range(hi)], axis=1)
    return {
        "images": images,
        "instances": inst,
        "labels": labels,
        "num_objects": counts,
        "visible": visible.astype(np.int32),
    }
