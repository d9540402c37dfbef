"""Segmentation metrics as the ImageNet-Segmentation protocol accumulates them.

Per image we keep sufficient statistics (:class:`SegStats`): the confusion counts and the
average precision of the continuous map. Data-set metrics are ratios of sums over images
(pixel accuracy, IoU of each class) or means over images (mAP), so confidence intervals come
from resampling images and recomputing the same ratios (:func:`bootstrap`).
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from .._util import is_concrete
from ._masks import map_to_mask, minmax

__all__ = [
    "METRICS",
    "SegAccumulator",
    "SegStats",
    "average_precision",
    "bootstrap",
    "image_stats",
    "summarize",
]

#: The data-set metrics :func:`summarize` and :func:`bootstrap` report.
METRICS = ("miou", "map", "pixel_acc", "iou_fg", "iou_bg", "map_2class", "mean_iou_fg")


@jax.jit
def average_precision(
    scores: Float[ArrayLike, "*batch p"], targets: Bool[ArrayLike, "*batch p"], /
) -> Float[Array, "*batch"]:
    """Average precision of scores against binary targets, per row (scikit-learn's definition).

    With the scores sorted in decreasing order and one threshold per distinct score,

    .. math::
        \\mathrm{AP} = \\sum_k (R_k - R_{k-1})\\, P_k,

    where ``P_k`` and ``R_k`` are precision and recall at the ``k``-th threshold. Tied scores
    form one threshold, exactly as ``sklearn.metrics.average_precision_score``; the result
    equals it to float32 rounding. Jit- and vmap-friendly: one sort and a few cumulative
    sums per row.

    Edge case: a row with no positive target has no recall; its AP is defined as ``0.0``
    (scikit-learn warns and returns 0 as well; :func:`summarize` leaves such images out of
    the mean).

    Args:
        scores: ``(..., p)`` continuous scores (higher = more foreground).
        targets: ``(..., p)`` boolean targets.

    Returns:
        ``(...)`` float32 AP per row.

    Examples:
        >>> import jax.numpy as jnp
        >>> s = jnp.array([0.1, 0.4, 0.35, 0.8])
        >>> y = jnp.array([False, False, True, True])
        >>> round(float(average_precision(s, y)), 4)   # sklearn: 0.8333
        0.8333
    """
    scores = jnp.asarray(scores)
    scores = scores.astype(jnp.promote_types(scores.dtype, jnp.float32))
    targets = jnp.asarray(targets).astype(bool)
    if scores.shape != targets.shape:
        raise ValueError(
            f"scores and targets must have the same shape, got {scores.shape} and "
            f"{targets.shape}; flatten both over the pixels of each image"
        )
    y = targets.astype(jnp.int32)
    return _ap_counts(scores, y, 1 - y)


def _ap_counts(scores: jax.Array, pos: jax.Array, neg: jax.Array) -> jax.Array:
    """AP of items carrying ``pos`` positive and ``neg`` negative samples at one score each.

    Equal to :func:`average_precision` over the samples expanded item by item (all samples of
    an item tie); used for nearest-upsampled maps, where every pixel of a patch has its
    token's score, so the pixels never need to be sorted.
    """
    p = scores.shape[-1]
    order = jnp.argsort(-scores, axis=-1, stable=True)
    s = jnp.take_along_axis(scores, order, axis=-1)
    pos = jnp.take_along_axis(pos, order, axis=-1)
    neg = jnp.take_along_axis(neg, order, axis=-1)
    tp = jnp.cumsum(pos, axis=-1)
    seen = jnp.cumsum(pos + neg, axis=-1)
    idx = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), s.shape)
    # Index of the last item of each run of tied scores: the threshold that item sits at.
    nxt = jnp.concatenate([s[..., 1:], jnp.full_like(s[..., :1], -jnp.inf)], axis=-1)
    is_end = (s != nxt) | (idx == p - 1)
    end = jax.lax.cummin(jnp.where(is_end, idx, p - 1), axis=s.ndim - 1, reverse=True)
    tp_end = jnp.take_along_axis(tp, end, axis=-1).astype(jnp.float32)
    seen_end = jnp.take_along_axis(seen, end, axis=-1).astype(jnp.float32)
    precision = tp_end / jnp.maximum(seen_end, 1.0)
    n_pos = tp[..., -1]
    total = jnp.sum(pos.astype(jnp.float32) * precision, axis=-1)
    return jnp.where(n_pos > 0, total / jnp.maximum(n_pos, 1).astype(jnp.float32), 0.0)


class SegStats(NamedTuple):
    """Per-image sufficient statistics (leading axes = images).

    Attributes:
        tp, fp, fn, tn: pixel confusion counts, foreground = positive (int32).
        ap: average precision of the continuous map against the mask (0 when the mask is
            empty; see ``has_fg``).
        ap_2class: the reference code's variant: AP of the concatenated scores
            ``[1 - map, map]`` against the one-hot ``[background, foreground]`` targets
            (Chefer et al.'s ``get_ap_scores``), defined for every image.
        has_fg: whether the ground-truth mask has any foreground pixel.
    """

    tp: Int[Array, "*batch"]
    fp: Int[Array, "*batch"]
    fn: Int[Array, "*batch"]
    tn: Int[Array, "*batch"]
    ap: Float[Array, "*batch"]
    ap_2class: Float[Array, "*batch"]
    has_fg: Bool[Array, "*batch"]


def image_stats(
    maps: Float[ArrayLike, "*batch gh gw"],
    masks: Bool[ArrayLike, "*#batch H W"],
    /,
    *,
    thresh: str | float = "mean",
    method: str = "nearest",
) -> SegStats:
    """Per-image statistics of maps against ground-truth masks (``docs/data.md`` §3).

    Each map is min–max normalised, upsampled to the mask's size (:func:`map_to_mask`),
    thresholded for the confusion counts, and scored continuously for AP. With nearest
    upsampling (and a mean or fixed threshold) the result is computed exactly on the token
    grid from per-patch pixel counts, without sorting pixels; bilinear upsampling, the median
    threshold and a mask smaller than the token grid (some tokens would reach no pixel) take
    the pixel path.

    Args:
        maps: ``(..., gh, gw)`` maps over the token grid; leading axes are batch axes (e.g.
            ``(methods, images, gh, gw)``).
        masks: ``(..., H, W)`` boolean ground truth, broadcast against the maps' batch axes
            (same rank).
        thresh: ``"mean"`` (protocol), ``"median"`` or a float (see :func:`threshold`).
        method: upsampling, ``"nearest"`` (protocol) or ``"bilinear"``.

    Returns:
        :class:`SegStats` with the maps' batch shape. A map with a NaN or inf value (the
        library's functions return NaN for invalid attention under ``jit``) raises a
        ``ValueError`` when its values are concrete; under ``jit`` its ``ap`` and ``ap_2class``
        are NaN (its counts are those of an empty prediction), and :func:`summarize` and
        :func:`bootstrap` refuse such statistics: a NaN map is never scored as a blank one.

    Examples:
        >>> import jax.numpy as jnp
        >>> m = jnp.array([[[1.0, 0.0], [0.0, 0.0]]])
        >>> gt = jnp.zeros((1, 4, 4), bool).at[0, :2, :2].set(True)
        >>> st = image_stats(m, gt)
        >>> [int(v[0]) for v in (st.tp, st.fp, st.fn, st.tn)], float(st.ap[0])
        ([4, 0, 0, 12], 1.0)
    """
    if isinstance(thresh, str) and thresh not in ("mean", "median"):
        raise ValueError(f"thresh must be 'mean', 'median' or a float in [0, 1], got {thresh!r}")
    if method not in ("nearest", "bilinear"):
        raise ValueError(f"method must be 'nearest' or 'bilinear', got {method!r}")
    if is_concrete(maps):
        bad = ~np.isfinite(np.asarray(maps, np.float64))
        if bad.any():
            raise ValueError(
                f"maps contain {int(bad.sum())} NaN/inf value(s) (first at "
                f"{tuple(int(i) for i in np.argwhere(bad)[0])}); the chain functions return "
                "NaN for invalid attention (check it with ma.check_chain)"
            )
    return _image_stats(maps, masks, thresh, method)


@functools.partial(jax.jit, static_argnames=("thresh", "method"))
def _image_stats(maps, masks, thresh, method) -> SegStats:
    maps = jnp.asarray(maps)
    masks = jnp.asarray(masks).astype(bool)
    if masks.ndim != maps.ndim:
        raise ValueError(
            f"maps {maps.shape} and masks {masks.shape} must have the same rank; add "
            "leading axes of size 1 to broadcast (e.g. masks[None] for several methods)"
        )
    # the token path min-max scales over every token: right only when each token reaches a
    # pixel (an image smaller than the grid leaves some out, as map_to_mask does)
    covers = masks.shape[-2] >= maps.shape[-2] and masks.shape[-1] >= maps.shape[-1]
    if method == "nearest" and thresh != "median" and covers:
        stats = _token_stats(maps, masks, thresh)
    else:
        stats = _pixel_stats(maps, masks, thresh, method)
    # a map with NaN/inf (traced: no error possible) marks its APs NaN; summarize refuses it
    bad = ~jnp.all(jnp.isfinite(maps), axis=(-2, -1))
    bad = jnp.broadcast_to(bad, stats.ap.shape)
    nan = jnp.asarray(jnp.nan, stats.ap.dtype)
    return stats._replace(
        ap=jnp.where(bad, nan, stats.ap), ap_2class=jnp.where(bad, nan, stats.ap_2class)
    )


def _pixel_stats(maps, masks, thresh, method) -> SegStats:
    """Reference path: upsample every map to pixels and sort the pixels."""
    size = masks.shape[-2:]
    scores, pred = map_to_mask(maps, size=size, thresh=thresh, method=method)
    batch = jnp.broadcast_shapes(scores.shape, masks.shape)
    scores = jnp.broadcast_to(scores, batch)
    pred = jnp.broadcast_to(pred, batch)
    gt = jnp.broadcast_to(masks, batch)
    count = lambda x: jnp.sum(x, axis=(-2, -1), dtype=jnp.int32)
    tp, fp = count(pred & gt), count(pred & ~gt)
    fn, tn = count(~pred & gt), count(~pred & ~gt)
    flat_s = scores.reshape(*batch[:-2], -1)
    flat_y = gt.reshape(*batch[:-2], -1)
    ap = average_precision(flat_s, flat_y)
    ap2 = average_precision(
        jnp.concatenate([1.0 - flat_s, flat_s], axis=-1),
        jnp.concatenate([~flat_y, flat_y], axis=-1),
    )
    return SegStats(tp, fp, fn, tn, ap, ap2, (tp + fn) > 0)


def _token_stats(maps, masks, thresh) -> SegStats:
    """Fast exact path for nearest upsampling: every pixel of a patch has its token's score,
    so counting positive and negative pixels per token gives the same confusion counts and
    AP (ties included) without materialising or sorting the pixels."""
    gh, gw = maps.shape[-2:]
    h, w = masks.shape[-2:]
    scores = minmax(maps)
    # one-hot pixel-row -> token-row (and columns), the nearest rule of `upsample`
    rh = jax.nn.one_hot((jnp.arange(h) * gh) // h, gh, dtype=jnp.int32)
    rw = jax.nn.one_hot((jnp.arange(w) * gw) // w, gw, dtype=jnp.int32)
    pos = jnp.einsum("hi,...hw,wj->...ij", rh, masks.astype(jnp.int32), rw)
    area = jnp.outer(jnp.sum(rh, axis=0), jnp.sum(rw, axis=0))  # pixels per token
    batch = jnp.broadcast_shapes(scores.shape, pos.shape)
    scores = jnp.broadcast_to(scores, batch)
    pos = jnp.broadcast_to(pos, batch)
    area = jnp.broadcast_to(area, batch)
    neg = area - pos
    if thresh == "mean":
        t = jnp.sum(scores * area, axis=(-2, -1), keepdims=True) / (h * w)
    else:
        t = jnp.asarray(thresh, scores.dtype)
    pred = scores > t
    count = lambda x: jnp.sum(x, axis=(-2, -1), dtype=jnp.int32)
    tp, fp = count(jnp.where(pred, pos, 0)), count(jnp.where(pred, neg, 0))
    fn, tn = count(jnp.where(pred, 0, pos)), count(jnp.where(pred, 0, neg))
    flat = lambda x: x.reshape(*batch[:-2], -1)
    s, p, n = flat(scores), flat(pos), flat(neg)
    ap = _ap_counts(s, p, n)
    ap2 = _ap_counts(
        jnp.concatenate([1.0 - s, s], axis=-1),
        jnp.concatenate([n, p], axis=-1),
        jnp.concatenate([p, n], axis=-1),
    )
    return SegStats(tp, fp, fn, tn, ap, ap2, (tp + fn) > 0)


def _ratio(num, den, empty: float):
    num = np.asarray(num, np.float64)
    den = np.asarray(den, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), empty)


def _sums(stats: SegStats, weights: np.ndarray | None = None) -> dict:
    """Weighted sums over images (weights: (..., n_images) counts, None = each image once)."""
    cols = {
        "tp": stats.tp,
        "fp": stats.fp,
        "fn": stats.fn,
        "tn": stats.tn,
        "ap": np.where(stats.has_fg, stats.ap, 0.0),
        "has_fg": stats.has_fg,
        "ap_2class": stats.ap_2class,
        "iou_fg": _ratio(stats.tp, np.add(np.add(stats.tp, stats.fp), stats.fn), 1.0),
        "n": np.ones(np.shape(stats.tp)),
    }
    if weights is None:
        return {k: np.sum(np.asarray(v, np.float64), axis=-1) for k, v in cols.items()}
    w = np.asarray(weights, np.float64)
    return {k: w @ np.asarray(v, np.float64) for k, v in cols.items()}


def _metrics_from_sums(s: dict) -> dict:
    iou_fg = _ratio(s["tp"], s["tp"] + s["fp"] + s["fn"], 1.0)
    iou_bg = _ratio(s["tn"], s["tn"] + s["fp"] + s["fn"], 1.0)
    total = s["tp"] + s["fp"] + s["fn"] + s["tn"]
    return {
        "miou": (iou_fg + iou_bg) / 2.0,
        "map": _ratio(s["ap"], s["has_fg"], 0.0),
        "pixel_acc": _ratio(s["tp"] + s["tn"], total, 0.0),
        "iou_fg": iou_fg,
        "iou_bg": iou_bg,
        "map_2class": _ratio(s["ap_2class"], s["n"], 0.0),
        "mean_iou_fg": _ratio(s["iou_fg"], s["n"], 0.0),
    }


def _as_numpy(stats: SegStats) -> SegStats:
    stats = SegStats(*(np.asarray(v) for v in stats))
    if stats.tp.ndim != 1:
        raise ValueError(
            f"stats must have one axis of images, got shape {stats.tp.shape}; index one "
            "method first (SegStats(*(v[i] for v in stats))) or reshape to (n_images,)"
        )
    if len(stats.tp) == 0:
        raise ValueError("stats hold no images: there is nothing to summarise")
    nan = np.isnan(stats.ap) | np.isnan(stats.ap_2class)
    if nan.any():
        raise ValueError(
            f"{int(nan.sum())} of {len(nan)} images were scored from maps with NaN/inf values "
            f"(the first at image {int(np.argmax(nan))}): their metrics would be those of a "
            "blank map; the chain functions return NaN for invalid attention (ma.check_chain)"
        )
    return stats


def summarize(stats: SegStats, /) -> dict[str, float]:
    """Data-set metrics from per-image statistics (over the last axis = images).

    - ``pixel_acc`` = Σ correct / Σ pixels;
    - ``iou_fg``, ``iou_bg`` = Σ intersection / Σ union of each class, ``miou`` their mean
      (intersections and unions summed over the data set, as the protocol does);
    - ``map`` = mean per-image AP over images whose mask is non-empty;
    - ``map_2class`` = mean of the reference code's two-class AP over all images;
    - ``mean_iou_fg`` = mean of per-image foreground IoU (an image whose prediction and mask
      are both empty counts as 1).

    A class with an empty union over the whole data set gets IoU 1; no metric is ever NaN.

    Args:
        stats: :class:`SegStats` with one axis of images.

    Returns:
        dict metric name → float (keys :data:`METRICS`) plus ``n_images``.

    Examples:
        >>> import jax.numpy as jnp
        >>> m = jnp.array([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]]])
        >>> gt = jnp.zeros((2, 4, 4), bool).at[:, :2, :2].set(True)
        >>> r = summarize(image_stats(m, gt))
        >>> r["pixel_acc"], r["iou_fg"], r["map"]
        (0.75, 0.3333333333333333, 0.625)
    """
    stats = _as_numpy(stats)
    out = {k: float(v) for k, v in _metrics_from_sums(_sums(stats)).items()}
    out["n_images"] = len(stats.tp)
    return out


def bootstrap_counts(n_images: int, /, *, n_resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """Multinomial resampling counts, ``(n_resamples, n_images)``: how often each image is drawn.

    Use the same counts for every method to get paired intervals (differences between
    methods are then resampled consistently).
    """
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_images, np.full(n_images, 1.0 / n_images), size=n_resamples)


def bootstrap_mean(
    x, /, *, n_resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-item values ``x`` (1-D).

    For paired comparisons pass the per-item differences (same items, same order). Items are
    resampled with replacement ``n_resamples`` times with ``np.random.default_rng(seed)``.

    Examples:
        >>> lo, hi = bootstrap_mean([0.0, 1.0] * 50, n_resamples=500)
        >>> 0.35 < lo < 0.5 < hi < 0.65
        True
    """
    x = np.asarray(x, np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"x must be a non-empty 1-D array of per-item values, got {x.shape}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), (n_resamples, len(x)))].mean(axis=1)
    q = ((1.0 - level) / 2.0, (1.0 + level) / 2.0)
    return float(np.quantile(means, q[0])), float(np.quantile(means, q[1]))


def bootstrap(
    stats: SegStats,
    /,
    *,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    counts: np.ndarray | None = None,
    baseline: SegStats | None = None,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap confidence intervals of every data-set metric (``map``'s over the
    resamples that hold an image with foreground: it is undefined on the others).

    Images are resampled with replacement and the data-set metrics recomputed from the
    resampled sums (so mIoU keeps its ratio-of-sums definition).

    Args:
        stats: :class:`SegStats` with one axis of images.
        n_resamples: number of bootstrap resamples.
        level: coverage of the interval (0.95 = 2.5 % and 97.5 % percentiles).
        seed: seed of the resampling.
        counts: precomputed :func:`bootstrap_counts` (overrides ``n_resamples``/``seed``);
            share them between methods for paired comparisons.
        baseline: if given, the intervals are of ``metric(stats) - metric(baseline)`` on the
            same resamples (a paired difference; same images in the same order).

    Returns:
        dict metric name → ``(low, high)``.

    Examples:
        >>> import jax.numpy as jnp
        >>> m = jnp.stack([jnp.eye(2), 1 - jnp.eye(2)] * 5)
        >>> gt = jnp.zeros((10, 4, 4), bool).at[:, :2, :2].set(True)
        >>> lo, hi = bootstrap(image_stats(m, gt), n_resamples=200)["pixel_acc"]
        >>> 0.25 <= lo <= 0.5 <= hi <= 0.75
        True
    """
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    stats = _as_numpy(stats)
    n = len(stats.tp)
    if counts is None:
        counts = bootstrap_counts(n, n_resamples=n_resamples, seed=seed)
    counts = np.asarray(counts)
    if counts.ndim != 2 or counts.shape[1] != n:
        raise ValueError(
            f"counts must have shape (n_resamples, {n}), got {counts.shape}; build them with "
            f"bootstrap_counts({n}, ...)"
        )
    sums = _sums(stats, counts)
    res = _metrics_from_sums(sums)
    if baseline is not None:
        base = _metrics_from_sums(_sums(_as_numpy(baseline), counts))
        res = {k: res[k] - base[k] for k in res}
    # mAP is undefined on a resample without a foreground image (summarize's 0 for a data set
    # without one would pull the interval towards 0): its interval is over the others
    defined = sums["has_fg"] > 0
    if defined.any():
        res["map"] = res["map"][defined]
    q = (100.0 * (1.0 - level) / 2.0, 100.0 * (1.0 + level) / 2.0)
    return {k: tuple(float(x) for x in np.percentile(v, q)) for k, v in res.items()}


class SegAccumulator:
    """Collects per-image statistics batch by batch; metrics and intervals at the end.

    Args:
        thresh: threshold of :func:`image_stats` (``"mean"`` = protocol).
        method: upsampling of :func:`image_stats` (``"nearest"`` = protocol).

    Examples:
        >>> import jax.numpy as jnp
        >>> acc = SegAccumulator()
        >>> gt = jnp.zeros((3, 8, 8), bool).at[:, 2:6, 2:6].set(True)
        >>> _ = acc.update(jnp.pad(jnp.ones((3, 2, 2)), ((0, 0), (1, 1), (1, 1))), gt)
        >>> acc.summary()["miou"], len(acc)
        (1.0, 3)
    """

    def __init__(self, *, thresh: str | float = "mean", method: str = "nearest"):
        self.thresh = thresh
        self.method = method
        self._parts: list[SegStats] = []

    def update(
        self, maps: Float[ArrayLike, "b gh gw"], masks: Bool[ArrayLike, "b H W"], /
    ) -> SegStats:
        """Adds a batch of maps ``(B, gh, gw)`` and masks ``(B, H, W)``; returns its stats."""
        st = image_stats(maps, masks, thresh=self.thresh, method=self.method)
        self._parts.append(SegStats(*(np.asarray(v) for v in st)))
        return st

    def add_stats(self, stats: SegStats, /) -> None:
        """Adds precomputed per-image statistics (one axis of images)."""
        self._parts.append(_as_numpy(stats))

    def __len__(self) -> int:
        return int(sum(len(p.tp) for p in self._parts))

    @property
    def stats(self) -> SegStats:
        """All per-image statistics so far, concatenated over images."""
        if not self._parts:
            raise ValueError("no images yet; call update(maps, masks) first")
        return SegStats(*(np.concatenate(v) for v in zip(*self._parts)))

    def summary(self) -> dict[str, float]:
        """:func:`summarize` of everything collected."""
        return summarize(self.stats)

    def intervals(self, **kwargs) -> dict[str, tuple[float, float]]:
        """:func:`bootstrap` of everything collected (keyword arguments passed on)."""
        return bootstrap(self.stats, **kwargs)
