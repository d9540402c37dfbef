"""Resizing position-embedding grids the way each PyTorch ViT family does.

Two resampling rules cover HuggingFace ViT / DINO / DINOv2 / CLIP and timm:

- ``"bicubic"``: ``torch.nn.functional.interpolate(..., mode="bicubic", align_corners=False)``
  without antialiasing (HF ViT, HF DINOv2 without registers, HF CLIP). PyTorch uses the Keys
  cubic kernel with coefficient :math:`a = -0.75`, source coordinate
  :math:`x = (i + \\tfrac12)\\,s_\\text{in}/s_\\text{out} - \\tfrac12` and replicates the border
  samples. ``jax.image.resize(..., "cubic")`` uses :math:`a = -0.5` and renormalises at the
  borders, so it differs by 0.3-0.5 on random grids; here the 1-D interpolation matrix is built
  explicitly and applied along each axis.
- ``"bicubic_antialias"``: ``interpolate(..., mode="bicubic", antialias=True)`` (timm
  ``resample_abs_pos_embed``, HF DINOv2-with-registers), which is matched to ~1e-6 by
  ``jax.image.resize(..., "cubic", antialias=True)``.

- ``"bicubic_offset"``: the original DINO and DINOv2 code (``interpolate_offset=0.1``, no
  antialias): ``interpolate(..., scale_factor=(g + 0.1) / M, mode="bicubic")``. PyTorch then
  maps output ``i`` to :math:`x = (i + \\tfrac12) / s - \\tfrac12` with the scale factor
  :math:`s`, not to :math:`(i + \\tfrac12)\\,M/g - \\tfrac12`: on a smooth 37 → 16 grid of
  values in [-1, 1] the two differ by up to 0.07. (DINOv2's register models use
  ``"bicubic_antialias"``.)

All interpolate in float32.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

#: The position-embedding interpolations (``ViTConfig.pos_interp``).
POS_INTERPS = ("bicubic", "bicubic_antialias", "bicubic_offset")
#: ``interpolate_offset`` of the original DINO/DINOv2 code (``"bicubic_offset"``).
DINO_OFFSET = 0.1

_A = -0.75  # PyTorch's cubic convolution coefficient (upsample_bicubic2d)


def _cc1(x: np.ndarray) -> np.ndarray:  # |x| <= 1
    return ((_A + 2.0) * x - (_A + 3.0)) * x * x + 1.0


def _cc2(x: np.ndarray) -> np.ndarray:  # 1 < |x| < 2
    return ((_A * x - 5.0 * _A) * x + 8.0 * _A) * x - 4.0 * _A


def bicubic_matrix(n_in: int, n_out: int, /, *, scale_factor: float | None = None) -> np.ndarray:
    """The ``(n_out, n_in)`` float32 matrix of PyTorch's 1-D bicubic resize (no antialias).

    Reproduces ``interpolate(x, size=n_out, mode="bicubic", align_corners=False)`` along one
    axis: output ``i`` samples the input at ``(i + 0.5) * n_in / n_out - 0.5`` with the cubic
    convolution kernel (``a = -0.75``), taps clamped to the border. With ``scale_factor``
    (``interpolate(x, scale_factor=...)``, whose output length is ``floor(n_in *
    scale_factor)`` = ``n_out``) the sample is at ``(i + 0.5) / scale_factor - 0.5``.

    Args:
      n_in: input length.
      n_out: output length.
      scale_factor: the scale factor PyTorch was given instead of the size (``None``: size).

    Returns:
      ``(n_out, n_in)`` float32 array whose rows sum to one.

    Examples:
      >>> m = bicubic_matrix(4, 4)
      >>> bool(np.allclose(m, np.eye(4)))
      True
      >>> bicubic_matrix(3, 6).sum(axis=1).round(6).tolist()
      [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    """
    if n_in < 1 or n_out < 1:
        raise ValueError(f"sizes must be positive, got n_in={n_in}, n_out={n_out}")
    # PyTorch computes these in float32 (opmath of float); mirror it for bitwise-close taps.
    if scale_factor is None:
        scale = np.float32(n_in) / np.float32(n_out)
    else:  # PyTorch: static_cast<float>(1.0 / scale) (compute_scales_value)
        if int(np.floor(n_in * scale_factor)) != n_out:
            raise ValueError(
                f"scale_factor={scale_factor} gives {int(np.floor(n_in * scale_factor))} "
                f"outputs from {n_in}, not {n_out}"
            )
        scale = np.float32(1.0 / scale_factor)
    i = np.arange(n_out, dtype=np.float32)
    real = scale * (i + np.float32(0.5)) - np.float32(0.5)
    floor = np.floor(real)
    t = (real - floor).astype(np.float32)
    w = np.stack([_cc2(t + 1.0), _cc1(t), _cc1(1.0 - t), _cc2(2.0 - t)], axis=1).astype(np.float32)
    idx = floor.astype(np.int64)[:, None] + np.arange(-1, 3)[None, :]
    idx = np.clip(idx, 0, n_in - 1)
    m = np.zeros((n_out, n_in), np.float32)
    for k in range(4):
        np.add.at(m, (np.arange(n_out), idx[:, k]), w[:, k])
    return m


def resize_pos_embed(
    grid: Float[ArrayLike, "*batch gh gw d"],
    new_hw: tuple[int, int],
    /,
    *,
    method: str = "bicubic",
) -> Float[Array, "*batch nh nw d"]:
    """Resizes a grid of patch position embeddings to a new patch grid.

    Only the patch part of a position embedding is resized; the CLS slot (when there is one)
    is kept as it is by the caller.

    Args:
      grid: ``(..., gh, gw, D)`` position embeddings laid out on the patch grid (row-major
        patches reshaped to ``(gh, gw)``).
      new_hw: the target patch grid ``(new_gh, new_gw)``.
      method: ``"bicubic"`` (PyTorch bicubic, ``align_corners=False``, ``a=-0.75``, no
        antialias: HF ViT, DINOv2, CLIP), ``"bicubic_antialias"`` (PyTorch bicubic with
        ``antialias=True``: timm, HF DINOv2-with-registers, the original DINOv2 register
        models) or ``"bicubic_offset"`` (the original DINO/DINOv2 code: a scale factor of
        ``(new + 0.1) / old``, no antialias).

    Returns:
      ``(..., new_gh, new_gw, D)`` float32 array.

    Examples:
      >>> g = jnp.arange(2 * 2 * 1, dtype=jnp.float32).reshape(2, 2, 1)
      >>> resize_pos_embed(g, (2, 2)).shape
      (2, 2, 1)
      >>> resize_pos_embed(g, (4, 3), method="bicubic_antialias").shape
      (4, 3, 1)
    """
    if method not in POS_INTERPS:
        raise ValueError(
            f"method must be one of {list(POS_INTERPS)}, got {method!r}; use 'bicubic' for HF "
            "ViT/DINOv2/CLIP checkpoints, 'bicubic_antialias' for timm and "
            "DINOv2-with-registers, 'bicubic_offset' for the original DINO/DINOv2 code"
        )
    grid = jnp.asarray(grid)
    if grid.ndim < 3:
        raise ValueError(
            f"grid must have shape (..., gh, gw, D), got {grid.shape}; reshape the patch "
            "position embeddings (N, D) to (gh, gw, D) first"
        )
    nh, nw = (int(s) for s in new_hw)
    gh, gw = grid.shape[-3], grid.shape[-2]
    out_dtype = jnp.promote_types(grid.dtype, jnp.float32)
    grid = grid.astype(out_dtype)
    if (nh, nw) == (gh, gw):
        return grid
    if method in ("bicubic", "bicubic_offset"):
        off = method == "bicubic_offset"
        sh = float(nh + DINO_OFFSET) / gh if off else None  # DINOv2: float(w0 + offset) / M
        sw = float(nw + DINO_OFFSET) / gw if off else None
        mh = jnp.asarray(bicubic_matrix(gh, nh, scale_factor=sh), out_dtype)
        mw = jnp.asarray(bicubic_matrix(gw, nw, scale_factor=sw), out_dtype)
        hi = jax.lax.Precision.HIGHEST
        # Width first, then height, as PyTorch's separable kernel accumulates.
        x = jnp.einsum("vw,...hwd->...hvd", mw, grid, precision=hi)
        return jnp.einsum("uh,...hvd->...uvd", mh, x, precision=hi)
    shape = (*grid.shape[:-3], nh, nw, grid.shape[-1])
    return jax.image.resize(grid, shape, method="cubic", antialias=True)


def grid_size(num_patches: int, /) -> int:
    """Side of a square patch grid holding ``num_patches`` tokens (raises if not square)."""
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(
            f"{num_patches} patch position embeddings do not form a square grid; pass the "
            "grid as (gh, gw, D) explicitly"
        )
    return side
