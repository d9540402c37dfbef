"""Token-grid maps drawn over images, and the bounce-strip figure (matplotlib, Agg)."""

import os
from collections.abc import Mapping

import numpy as np
from jaxtyping import ArrayLike, Float

UPSAMPLES = ("nearest", "bilinear")


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
    if img.dtype == np.uint8:
        return img.astype(np.float32) / 255.0
    return np.clip(img.astype(np.float32), 0.0, 1.0)


def upsample(
    token_map: Float[ArrayLike, "gh gw"],
    size: tuple[int, int],
    /,
    *,
    method: str = "bilinear",
) -> Float[np.ndarray, "h w"]:
    """Resizes a token-grid map to ``size = (H, W)`` pixels.

    ``"nearest"`` repeats each token over its patch (exact when ``H`` is a multiple of the grid);
    ``"bilinear"`` interpolates between patch centres (half-pixel convention, edges clamped).

    Args:
      token_map: ``(gh, gw)`` values over the patch grid.
      size: output ``(H, W)``.
      method: ``"nearest"`` or ``"bilinear"``.

    Returns:
      float32 ``(H, W)``.

    Examples:
      >>> import numpy as np
      >>> upsample(np.array([[0.0, 1.0], [2.0, 3.0]]), (4, 4), method="nearest")[0].tolist()
      [0.0, 0.0, 1.0, 1.0]
    """
    m = np.asarray(token_map, dtype=np.float32)
    if m.ndim != 2:
        raise ValueError(
            f"token_map must be a (gh, gw) grid, got shape {m.shape}; reshape the patch tokens "
            "(drop CLS/registers first)"
        )
    if method not in UPSAMPLES:
        raise ValueError(f"method must be one of {UPSAMPLES}, got {method!r}")
    h, w = size
    gh, gw = m.shape

    def coords(n_out, n_in):
        x = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
        if method == "nearest":
            return np.clip(np.floor(x + 0.5).astype(int), 0, n_in - 1), None, None
        x = np.clip(x, 0, n_in - 1)
        lo = np.floor(x).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, (x - lo).astype(np.float32)

    ylo, yhi, fy = coords(h, gh)
    xlo, xhi, fx = coords(w, gw)
    if method == "nearest":
        return m[ylo][:, xlo]
    top = m[ylo][:, xlo] * (1 - fx) + m[ylo][:, xhi] * fx
    bot = m[yhi][:, xlo] * (1 - fx) + m[yhi][:, xhi] * fx
    return (top * (1 - fy[:, None]) + bot * fy[:, None]).astype(np.float32)


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
) -> Float[np.ndarray, "h w 3"]:
    """Blends a colour-mapped token map over an image.

    Args:
      image: ``(H, W, 3)`` (float in [0, 1] or uint8) or ``(H, W)``.
      token_map: ``(gh, gw)`` map over the patch grid.
      method: upsampling, ``"nearest"`` or ``"bilinear"`` (see :func:`upsample`).
      cmap: matplotlib colormap name.
      alpha: opacity of the map (0 = image only, 1 = map only).
      rescale: min-max rescale the map to [0, 1] before colouring (else it is clipped).

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
    up = upsample(token_map, img.shape[:2], method=method)
    up = _rescale(up) if rescale else np.clip(up, 0.0, 1.0)
    matplotlib, _ = _matplotlib()
    colours = matplotlib.colormaps[cmap](up)[..., :3].astype(np.float32)
    return (1.0 - alpha) * img + alpha * colours


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
    cell: float = 1.6,
    dpi: int = 100,
):
    """The bounce-strip figure: one row per image, the image then one overlaid map per column.

    Typical columns: ``"TokenRank"``, ``"bounce 1"`` ... ``"bounce 4"`` (from the CLS token),
    ``"column sum"``. Each map is min-max rescaled on its own.

    Args:
      images: ``(N, H, W, 3)`` (float in [0, 1] or uint8).
      maps: column title -> ``(N, gh, gw)`` token maps, in display order.
      path: if given, the figure is saved there as PNG (parent directories created) and closed.
      method: upsampling (``"nearest"`` | ``"bilinear"``).
      cmap: colormap name.
      alpha: map opacity.
      title: optional figure title.
      row_labels: optional label per row, written under the image (e.g. class and prediction).
      cell: size of one panel in inches.
      dpi: resolution of the saved PNG.

    Returns:
      The matplotlib ``Figure`` (already closed when ``path`` is given; it can still be saved).

    Examples:
      >>> import numpy as np
      >>> fig = bounce_strip(np.zeros((2, 16, 16, 3)), {"a": np.ones((2, 2, 2))})
      >>> len(fig.axes)
      4
      >>> save_png(fig, "/dev/null")
      '/dev/null'
    """
    images = np.asarray(images)
    if images.ndim not in (3, 4):
        raise ValueError(f"images must be (N, H, W[, C]), got shape {images.shape}")
    n = images.shape[0]
    if row_labels is not None and len(row_labels) != n:
        raise ValueError(f"row_labels must have one entry per image ({n}), got {len(row_labels)}")
    arrays = {k: np.asarray(v) for k, v in maps.items()}
    for k, v in arrays.items():
        if v.ndim != 3 or v.shape[0] != n:
            raise ValueError(
                f"map {k!r} must have shape ({n}, gh, gw) (one grid per image), got {v.shape}"
            )
    _, plt = _matplotlib()
    cols = 1 + len(arrays)
    fig, axes = plt.subplots(
        n, cols, figsize=(cell * cols, cell * n + (0.4 if title else 0.0)), squeeze=False
    )
    for r in range(n):
        img = _as_image(images[r])
        axes[r, 0].imshow(img, interpolation="nearest")
        for c, (name, m) in enumerate(arrays.items(), start=1):
            axes[r, c].imshow(
                overlay(img, m[r], method=method, cmap=cmap, alpha=alpha), interpolation="nearest"
            )
            if r == 0:
                axes[r, c].set_title(name, fontsize=9)
        if r == 0:
            axes[r, 0].set_title("image", fontsize=9)
        if row_labels is not None:
            axes[r, 0].set_xlabel(row_labels[r], fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
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
