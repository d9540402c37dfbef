"""Reference token maps every segmentation table shows: the centre prior and the grid oracle.

A method's map counts only where it beats :func:`centre_prior` (objects sit near the centre on
average); :func:`oracle_map` is the best any map on a ``grid x grid`` token grid can do, the
ceiling set by the patch size.
"""

import numpy as np
from jaxtyping import Bool, Float32

__all__ = ["centre_prior", "oracle_map"]


def centre_prior(
    size: int = 64, grid: int = 8, *, sigma: float | None = None
) -> Float32[np.ndarray, "grid grid"]:
    """A centred isotropic Gaussian over the token grid, normalised to sum to 1.

    Token ``(r, c)`` covers the patch centred at pixel ``((r + 1/2) p, (c + 1/2) p)`` with
    ``p = size / grid``; its weight is

    .. math::  w_{rc} \\propto \\exp\\!\\big(-\\lVert x_{rc} - x_0 \\rVert^2 / 2\\sigma^2\\big)

    with :math:`x_0` the image centre.

    Args:
      size: image side in pixels.
      grid: tokens per side.
      sigma: standard deviation in pixels; ``None`` means ``size / 4``.

    Returns:
      float32 ``(grid, grid)``, positive, summing to 1 (a distribution over tokens, like a
      TokenRank map).

    Examples:
      >>> p = centre_prior(64, 4)
      >>> p.shape, p.dtype, round(float(p.sum()), 6)
      ((4, 4), dtype('float32'), 1.0)
      >>> bool(p[1, 1] > p[0, 0]) and bool(np.allclose(p, p.T))
      True
    """
    if grid < 1 or size < 1:
        raise ValueError(f"size and grid must be positive, got size={size}, grid={grid}")
    sigma = size / 4 if sigma is None else float(sigma)
    if not sigma > 0:
        raise ValueError(f"sigma must be positive (pixels), got {sigma}")
    centres = (np.arange(grid, dtype=np.float64) + 0.5) * (size / grid) - size / 2
    g = np.exp(-(centres**2) / (2 * sigma**2))
    w = g[:, None] * g[None, :]
    return (w / w.sum()).astype(np.float32)


def oracle_map(
    masks: Bool[np.ndarray, "*batch h w"], /, grid: int = 8
) -> Float32[np.ndarray, "*batch grid grid"]:
    """The ground-truth mask averaged over each patch of a ``grid x grid`` token grid.

    Args:
      masks: boolean (or 0/1) masks with any leading axes; ``h`` and ``w`` must be multiples
        of ``grid``.
      grid: tokens per side.

    Returns:
      float32 ``(*batch, grid, grid)``: the fraction of each patch inside the mask.

    Examples:
      >>> m = np.zeros((4, 4), bool)
      >>> m[:2, :3] = True
      >>> oracle_map(m, 2)
      array([[1. , 0.5],
             [0. , 0. ]], dtype=float32)
    """
    masks = np.asarray(masks)
    if masks.ndim < 2:
        raise ValueError(f"masks must have shape (..., h, w), got {masks.shape}")
    h, w = masks.shape[-2:]
    if grid < 1 or h % grid or w % grid:
        raise ValueError(
            f"mask size {h}x{w} is not a multiple of grid={grid}; crop or resize the masks to "
            "a multiple of the token grid first"
        )
    ph, pw = h // grid, w // grid
    blocks = masks.astype(np.float32).reshape(*masks.shape[:-2], grid, ph, grid, pw)
    return blocks.mean(axis=(-3, -1), dtype=np.float32)
