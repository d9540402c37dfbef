"""Token-grid maps drawn over images, and the bounce-strip figure (matplotlib, Agg)."""

import os
import textwrap
from collections.abc import Mapping

import numpy as np
from jaxtyping import ArrayLike, Float

#: colour scalings of :func:`bounce_strip`
SCALES = ("shared", "minmax")


def _matplotlib():
    """Imports matplotlib lazily with the non-interactive Agg backend."""
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("markov_attn.viz needs matplotlib: pip install 'markov_attn[viz]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return matplotlib, plt


def _as_image(image) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    if img.ndim != 3 or img.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image must be (H, W), (H, W, 1|3|4), got shape {img.shape}")
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    img = img[..., :3]
    return _unit_float(img)


def _unit_float(img) -> np.ndarray:
    """Images as float32 in [0, 1]: unsigned integer images divided by their dtype's maximum
    (uint8 by 255, uint16 by 65535: clipping them made every non-zero pixel white), floats
    clipped; signed integers and other dtypes refused."""
    img = np.asarray(img)
    if img.dtype == bool:
        return img.astype(np.float32)
    if np.issubdtype(img.dtype, np.unsignedinteger):
        return img.astype(np.float32) / np.float32(np.iinfo(img.dtype).max)
    if not np.issubdtype(img.dtype, np.floating):
        raise ValueError(
            f"images must be floats in [0, 1] or unsigned integers (uint8, uint16), got {img.dtype}"
        )
    return np.clip(img.astype(np.float32), 0.0, 1.0)


def _upsample(
    token_map: Float[ArrayLike, "gh gw"], size: tuple[int, int], /, *, method: str
) -> Float[np.ndarray, "h w"]:
    """One ``(gh, gw)`` token map resized to ``size = (H, W)`` pixels as float32 numpy, by
    :func:`markov_attn.segmentation.upsample` (the project's one upsampling)."""
    from markov_attn.segmentation import upsample

    m = np.asarray(token_map, dtype=np.float32)
    if m.ndim != 2:
        raise ValueError(
            f"token_map must be a (gh, gw) grid, got shape {m.shape}; reshape the patch tokens "
            "(drop CLS/registers first)"
        )
    return np.asarray(upsample(m, size=(int(size[0]), int(size[1])), method=method))


def _check_finite(m, what: str) -> None:
    """Refuses a map with NaN or inf values: drawn, it would look flat, dark or blank."""
    if not np.all(np.isfinite(np.asarray(m, np.float32))):
        raise ValueError(
            f"{what} has NaN or infinite values (the chain functions return NaN for invalid "
            "attention: check it with ma.check_chain)"
        )


def _rescale(m: np.ndarray) -> np.ndarray:
    lo, hi = float(np.min(m)), float(np.max(m))
    return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)


def overlay(
    image: ArrayLike,
    token_map: Float[ArrayLike, "gh gw"],
    /,
    *,
    method: str = "bilinear",
    cmap: str = "inferno",
    alpha: float = 0.6,
    rescale: bool = True,
    vmin: float | None = None,
    vmax: float | None = None,
) -> Float[np.ndarray, "h w 3"]:
    """Blends a colour-mapped token map over an image.

    Args:
      image: ``(H, W, 3)`` (float in [0, 1] or uint8) or ``(H, W)``.
      token_map: ``(gh, gw)`` map over the patch grid.
      method: upsampling, ``"nearest"`` or ``"bilinear"``
        (:func:`markov_attn.segmentation.upsample`).
      cmap: matplotlib colormap name.
      alpha: opacity of the map (0 = image only, 1 = map only).
      rescale: min-max rescale the map to [0, 1] before colouring (else it is clipped to
        [0, 1]). This stretches every map to full contrast, a nearly flat one included; pass
        ``vmin``/``vmax`` to colour on a fixed scale instead.
      vmin: value drawn with the lowest colour (with ``vmax``: a fixed linear scale, values
        outside clipped; ``rescale`` is then ignored). Default: 0 when only ``vmax`` is given.
      vmax: value drawn with the highest colour. Default: the map's maximum when only ``vmin``
        is given.

    Returns:
      float32 RGB ``(H, W, 3)`` in [0, 1].

    Examples:
      >>> import numpy as np
      >>> overlay(np.zeros((16, 16, 3)), np.eye(2), alpha=0.5).shape
      (16, 16, 3)
    """
    img = _as_image(image)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    _check_finite(token_map, "token_map")
    up = _upsample(token_map, img.shape[:2], method=method)
    if vmin is not None or vmax is not None:
        lo = 0.0 if vmin is None else float(vmin)
        hi = float(np.max(up)) if vmax is None else float(vmax)
        if not hi > lo:
            raise ValueError(f"vmax must exceed vmin, got vmin={lo}, vmax={hi}")
        up = np.clip((up - lo) / (hi - lo), 0.0, 1.0)
    else:
        up = _rescale(up) if rescale else np.clip(up, 0.0, 1.0)
    matplotlib, _ = _matplotlib()
    colours = matplotlib.colormaps[cmap](up)[..., :3].astype(np.float32)
    return (1.0 - alpha) * img + alpha * colours


def _scale(arrays: dict, scale: str, vmin, vmax) -> tuple[float, float]:
    """The colour range ``(vmin, vmax)`` shared by every panel (``"shared"``), or (0, 1)."""
    if scale == "minmax":
        return 0.0, 1.0
    values = [float(np.min(v)) for v in arrays.values()] + [0.0]
    lo = min(values) if vmin is None else float(vmin)
    hi = max(float(np.max(v)) for v in arrays.values()) if vmax is None else float(vmax)
    if vmax is None and not hi > lo:  # all maps constant at lo: any range shows them flat
        hi = lo + 1.0
    if not hi > lo:
        raise ValueError(f"vmax must exceed vmin, got vmin={lo}, vmax={hi}")
    return lo, hi


def bounce_strip(
    images: ArrayLike,
    maps: Mapping[str, ArrayLike],
    /,
    *,
    path: str | os.PathLike | None = None,
    method: str = "bilinear",
    cmap: str = "inferno",
    alpha: float = 0.6,
    title: str | None = None,
    row_labels: list[str] | None = None,
    scale: str = "shared",
    vmin: float | None = None,
    vmax: float | None = None,
    label: str | None = None,
    cell: float = 1.6,
    dpi: int = 100,
):
    """The bounce-strip figure: one row per image, the image then one overlaid map per column.

    Typical columns: ``"TokenRank"``, ``"bounce 1"`` ... ``"bounce 4"`` (from the CLS token),
    ``"column sum"``. A colour bar on the right states the scale. With ``scale="shared"``
    (default) every panel is coloured on one linear scale, from ``vmin`` (default
    ``min(0, smallest value)``) to ``vmax`` (default: the largest value of all maps), so a flat
    map looks flat and panels can be compared. ``scale="minmax"`` stretches each panel from its
    own minimum to its own maximum (the colour bar then says so): shapes are easier to see but
    a nearly flat map looks as contrasted as a peaked one.

    Args:
      images: ``(N, H, W, 3)`` (float in [0, 1] or uint8).
      maps: column title -> ``(N, gh, gw)`` token maps, in display order.
      path: if given, the figure is saved there as PNG (parent directories created, an existing
        file replaced) and closed.
      method: upsampling (``"nearest"`` | ``"bilinear"``).
      cmap: colormap name.
      alpha: map opacity.
      title: optional figure title.
      row_labels: optional label per row, written under the image (e.g. class and prediction).
      scale: ``"shared"`` (one absolute scale for all panels) or ``"minmax"`` (per panel).
      vmin: lower end of the shared scale (``scale="shared"`` only).
      vmax: upper end of the shared scale (``scale="shared"`` only).
      label: colour bar label, the unit of the maps (default: the scaling, in words).
      cell: size of one panel in inches.
      dpi: resolution of the saved PNG.

    Returns:
      The matplotlib ``Figure`` (already closed when ``path`` is given; it can still be saved);
      its last axes is the colour bar.

    Examples:
      >>> import numpy as np
      >>> fig = bounce_strip(np.zeros((2, 16, 16, 3)), {"a": np.ones((2, 2, 2))})
      >>> len(fig.axes)  # 2 rows x (image, map) + the colour bar
      5
      >>> save_png(fig, "/dev/null")
      '/dev/null'
    """
    images = np.asarray(images)
    if images.ndim not in (3, 4):
        raise ValueError(f"images must be (N, H, W[, C]), got shape {images.shape}")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if scale == "minmax" and (vmin is not None or vmax is not None):
        raise ValueError('vmin/vmax set a shared scale; pass scale="shared" or drop them')
    n = images.shape[0]
    if row_labels is not None and len(row_labels) != n:
        raise ValueError(f"row_labels must have one entry per image ({n}), got {len(row_labels)}")
    arrays = {k: np.asarray(v, np.float32) for k, v in maps.items()}
    if not arrays:
        raise ValueError("maps is empty; pass at least one {title: (N, gh, gw)} map")
    for k, v in arrays.items():
        if v.ndim != 3 or v.shape[0] != n:
            raise ValueError(
                f"map {k!r} must have shape ({n}, gh, gw) (one grid per image), got {v.shape}"
            )
        _check_finite(v, f"map {k!r}")
    lo, hi = _scale(arrays, scale, vmin, vmax)
    if label is None:
        label = (
            "each panel min–max stretched\n(0 = its min, 1 = its max)"
            if scale == "minmax"
            else "map value, one scale\nfor all panels"
        )
    matplotlib, plt = _matplotlib()
    cols = 1 + len(arrays)
    bar = 1.0  # inches on the right for the colour bar and its label
    width = cell * cols + bar
    fig, axes = plt.subplots(
        n, cols, figsize=(width, cell * n + (0.4 if title else 0.0)), squeeze=False
    )
    shared = {} if scale == "minmax" else {"vmin": lo, "vmax": hi}
    for r in range(n):
        img = _as_image(images[r])
        axes[r, 0].imshow(img, interpolation="nearest")
        for c, (name, m) in enumerate(arrays.items(), start=1):
            rgb = overlay(img, m[r], method=method, cmap=cmap, alpha=alpha, **shared)
            axes[r, c].imshow(rgb, interpolation="nearest")
            if r == 0:
                # long method names ("bounce n=2 forward from CLS") ran into each other
                axes[r, c].set_title(textwrap.fill(name, 16), fontsize=8)
        if r == 0:
            axes[r, 0].set_title("image", fontsize=9)
        if row_labels is not None:
            axes[r, 0].set_xlabel(row_labels[r], fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10, wrap=True)
    right = 1.0 - bar / width
    fig.tight_layout(rect=(0.0, 0.0, right, 1.0))
    cax = fig.add_axes((right + 0.1 * bar / width, 0.12, 0.15 * bar / width, 0.72))
    mappable = matplotlib.cm.ScalarMappable(
        norm=matplotlib.colors.Normalize(lo, hi), cmap=matplotlib.colormaps[cmap]
    )
    cb = fig.colorbar(mappable, cax=cax)
    cb.set_label(label, fontsize=7)
    cb.ax.tick_params(labelsize=7)
    if path is not None:
        save_png(fig, path, dpi=dpi)
    return fig


def save_png(fig, path: str | os.PathLike, /, *, dpi: int = 100) -> str:
    """Saves ``fig`` as PNG at ``path`` (creating parent directories), closes it, returns the
    path as a string."""
    _, plt = _matplotlib()
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    plt.close(fig)
    return path


def states_figure(
    image,
    assignment,
    memberships=None,
    /,
    *,
    path: str | os.PathLike | None = None,
    title: str | None = None,
    alpha: float = 0.55,
    dpi: int = 100,
):
    """Metastable states over an image: one colour per state.

    Panels: the image; the image with the crisp ``assignment`` (``(gh, gw)`` state indices)
    upsampled to pixels (nearest) in a qualitative colour map, with a legend; and, if
    ``memberships`` ``(gh, gw, k)`` is given, the membership of each token in its own state
    (how crisp the assignment is, 1 = certain).

    Returns:
      The matplotlib figure (saved to ``path`` as PNG and closed when ``path`` is given).
    """
    matplotlib, plt = _matplotlib()
    img = _as_image(image)
    states = np.asarray(assignment)
    if states.ndim != 2:
        raise ValueError(f"assignment must be (gh, gw) state indices, got shape {states.shape}")
    k = int(states.max()) + 1 if states.size else 0
    if k <= 20:
        cmap = matplotlib.colormaps["tab10" if k <= 10 else "tab20"]
        palette = cmap(np.arange(max(k, 1)) % cmap.N)[:, :3]
    else:  # one colour per state (tab20 repeated its colours from the 21st state on)
        palette = matplotlib.colormaps["hsv"](np.arange(k) / k)[:, :3]
    size = img.shape[:2]
    up = _upsample(states.astype(np.float32), size, method="nearest").astype(int)
    colour = palette[up]
    panels = 3 if memberships is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(3.2 * panels, 3.6), squeeze=False)
    axes = axes[0]
    axes[0].imshow(img)
    axes[0].set_title("image")
    axes[1].imshow((1 - alpha) * img + alpha * colour)
    axes[1].set_title(f"{k} metastable states")
    handles = [
        matplotlib.patches.Patch(color=palette[s], label=f"state {s}: {int((states == s).sum())}")
        for s in range(k)
    ]
    axes[1].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)
    if memberships is not None:
        chi = np.asarray(memberships)
        own = np.take_along_axis(chi, states[..., None], axis=-1)[..., 0]
        im = axes[2].imshow(_upsample(own, size, method="nearest"), vmin=0, vmax=1, cmap="viridis")
        axes[2].set_title("membership of own state")
        fig.colorbar(im, ax=axes[2], fraction=0.046, pad=0.04)
    for ax in axes:
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    if path is not None:
        save_png(fig, path, dpi=dpi)
    return fig
