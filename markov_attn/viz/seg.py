"""Segmentation figures: image / mask / each method's map and mask, and metric-vs-bounce curves.

matplotlib is imported lazily (Agg backend) when a figure is drawn; the maps are turned into
masks with the protocol of :mod:`markov_attn.segmentation` (min–max, nearest upsampling,
mean threshold), so the figure shows exactly what the metrics score.
"""

import os
from collections.abc import Mapping, Sequence

import numpy as np
from jaxtyping import ArrayLike, Bool, Float

from ._overlay import _check_finite, _unit_float

__all__ = ["metric_curves", "save_figure", "seg_grid"]


def _plt():
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("markov_attn.viz needs matplotlib: pip install 'markov_attn[viz]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _iou(pred: np.ndarray, gt: np.ndarray) -> float:
    union = np.logical_or(pred, gt).sum()
    return 1.0 if union == 0 else float(np.logical_and(pred, gt).sum() / union)


def seg_grid(
    images: Float[ArrayLike, "n H W 3"],
    masks: Bool[ArrayLike, "n H W"],
    maps: Mapping[str, Float[ArrayLike, "n gh gw"]],
    /,
    *,
    thresh: str | float = "mean",
    titles: Mapping[str, str] | None = None,
    cell: float = 1.3,
):
    """A grid with two rows per image: top = image, ground truth, each method's map (min–max,
    nearest upsampled, over the image); bottom = each method's predicted mask, titled with
    its per-image IoU.

    Args:
        images: ``(n, H, W, 3)`` float images in ``[0, 1]``.
        masks: ``(n, H, W)`` ground-truth masks.
        maps: method name → ``(n, gh, gw)`` maps over the token grid.
        thresh: threshold of the protocol (``"mean"``).
        titles: optional display names per method.
        cell: size of one panel in inches.

    Returns:
        the matplotlib figure.
    """
    from markov_attn.segmentation import map_to_mask

    plt = _plt()
    images = _unit_float(images)  # uint8 / uint16 scaled (clipping made them black and white)
    masks = np.asarray(masks, bool)
    n, h, w = masks.shape
    names = list(maps)
    for name in names:
        _check_finite(np.asarray(maps[name])[:n], f"map {name!r}")
    titles = dict(titles or {})
    cols = 2 + len(names)
    fig, axes = plt.subplots(2 * n, cols, figsize=(cell * cols, cell * 2 * n), squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for k, name in enumerate(names):
        scores, pred = map_to_mask(np.asarray(maps[name])[:n], size=(h, w), thresh=thresh)
        scores, pred = np.asarray(scores), np.asarray(pred)
        for i in range(n):
            top, bottom = axes[2 * i, 2 + k], axes[2 * i + 1, 2 + k]
            top.imshow(images[i])
            top.imshow(scores[i], cmap="inferno", alpha=0.6, vmin=0.0, vmax=1.0)
            bottom.imshow(pred[i], cmap="gray", vmin=0, vmax=1)
            bottom.contour(masks[i], levels=[0.5], colors="tab:green", linewidths=0.6)
            bottom.set_title(f"IoU {_iou(pred[i], masks[i]):.2f}", fontsize=6, pad=1)
            if i == 0:
                top.set_title(titles.get(name, name), fontsize=7, pad=2)
    for i in range(n):
        axes[2 * i, 0].imshow(images[i])
        axes[2 * i, 1].imshow(masks[i], cmap="gray", vmin=0, vmax=1)
        if i == 0:
            axes[0, 0].set_title("image", fontsize=7, pad=2)
            axes[0, 1].set_title("mask", fontsize=7, pad=2)
    axes[1, 1].text(
        0.0,
        0.5,
        "row 1: map, min–max\nstretched per image\nrow 2: predicted mask\n(green: true outline)",
        fontsize=6,
        transform=axes[1, 1].transAxes,
        va="center",
    )
    fig.subplots_adjust(wspace=0.04, hspace=0.18, left=0.01, right=0.99, top=0.97, bottom=0.01)
    return fig


def metric_curves(
    results: Mapping[str, Mapping],
    families: Mapping[str, Sequence[str]],
    /,
    *,
    metrics: Sequence[str] = ("miou", "map"),
    references: Mapping[str, str] | None = None,
    xlabel: str = "bounces n",
):
    """Metric against bounce count with 95 % intervals, one line per family of methods.

    Args:
        results: method name → ``{"metrics": {m: value}, "ci": {m: (lo, hi)}}`` (the layout of
            ``segment.json``).
        families: line label → method names in x order (e.g. ``bounce_fwd_1 ... _5``).
        metrics: which metrics, one panel each.
        references: horizontal reference lines, label → method name (e.g. CLS attention).
        xlabel: x axis label.

    Returns:
        the matplotlib figure.
    """
    plt = _plt()
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for label, family in families.items():
            # each method keeps its position in the family (its bounce count): a missing one
            # leaves a gap instead of shifting the rest one step to the left
            x = np.array([i + 1 for i, n in enumerate(family) if n in results])
            names = [n for n in family if n in results]
            if not names:
                continue
            y = np.array([results[n]["metrics"][metric] for n in names])
            ci = np.array([results[n]["ci"][metric] for n in names])
            ax.errorbar(
                x, y, yerr=[y - ci[:, 0], ci[:, 1] - y], marker="o", ms=3, capsize=2, label=label
            )
        for k, (label, name) in enumerate((references or {}).items()):
            if name in results:
                ax.axhline(
                    results[name]["metrics"][metric],
                    ls="--",
                    lw=0.8,
                    color=f"C{k + 5}",
                    label=label,
                )
        ax.set_xlabel(xlabel)
        ax.set_title(metric)
        ax.grid(alpha=0.3)
    axes[0, -1].legend(fontsize=6, loc="best")
    fig.tight_layout()
    return fig


def save_figure(fig, path: str | os.PathLike, /, *, dpi: int = 110) -> str:
    """Saves ``fig`` as PNG (creating the directory) and closes it; returns the path."""
    plt = _plt()
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
