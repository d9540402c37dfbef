"""Map → mask, the protocol of ``docs/data.md`` §3: min–max, nearest upsampling, mean threshold."""

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float

__all__ = ["map_to_mask", "minmax", "threshold", "upsample"]

_UPSAMPLE = ("nearest", "bilinear")


def _check_map(x, name: str = "maps") -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim < 2:
        raise ValueError(
            f"{name} must have at least two axes (..., gh, gw), got shape {x.shape}; "
            "reshape a flat token map to its patch grid first"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


@jax.jit
def minmax(maps: Float[ArrayLike, "*batch h w"], /) -> Float[Array, "*batch h w"]:
    """Rescales each map to ``[0, 1]`` by its own minimum and maximum.

    ``(m - min m) / (max m - min m)`` over the last two axes. A constant map (``max = min``,
    including an all-zero map) becomes all zeros, so it predicts no foreground and never
    produces NaN.

    Args:
        maps: maps over a grid, ``(..., h, w)``; leading axes are batch axes.

    Returns:
        float32 maps of the same shape with values in ``[0, 1]``.

    Examples:
        >>> import jax.numpy as jnp
        >>> minmax(jnp.array([[1.0, 3.0], [2.0, 5.0]]))
        Array([[0.  , 0.5 ],
               [0.25, 1.  ]], dtype=float32)
        >>> minmax(jnp.full((2, 2), 7.0))
        Array([[0., 0.],
               [0., 0.]], dtype=float32)
    """
    maps = _check_map(maps)
    lo = jnp.min(maps, axis=(-2, -1), keepdims=True)
    hi = jnp.max(maps, axis=(-2, -1), keepdims=True)
    span = hi - lo
    ok = span > 0
    scaled = (maps - lo) / jnp.where(ok, span, 1.0)
    # XLA may divide by multiplying with the reciprocal; pin the maximum to exactly 1 so that
    # ties at the ends (e.g. between 1 - min and max in the two-class AP) are exact.
    scaled = jnp.where(maps == hi, 1.0, jnp.clip(scaled, 0.0, 1.0))
    return jnp.where(ok, scaled, 0.0)


@functools.partial(jax.jit, static_argnames=("size", "method"))
def upsample(
    maps: Float[ArrayLike, "*batch gh gw"], /, *, size: tuple[int, int], method: str = "nearest"
) -> Float[Array, "*batch H W"]:
    """Resizes maps over the token grid to the image size.

    ``method="nearest"`` (the protocol) copies each token's value to the pixels of its
    patch: output pixel ``(y, x)`` takes token ``(floor(y·gh/H), floor(x·gw/W))`` (PyTorch's
    ``nearest``); with an integer patch size that is exactly one token per patch.
    ``method="bilinear"`` uses ``jax.image.resize`` without antialiasing (half-pixel
    centres, as PyTorch ``align_corners=False``, also when the image is smaller than the
    grid), as some reference evaluation code does.

    Args:
        maps: ``(..., gh, gw)`` maps over the patch grid.
        size: ``(H, W)`` image size in pixels.
        method: ``"nearest"`` or ``"bilinear"``.

    Returns:
        ``(..., H, W)`` float32 maps.

    Examples:
        >>> import jax.numpy as jnp
        >>> upsample(jnp.array([[0.0, 1.0], [2.0, 3.0]]), size=(4, 4))[0]
        Array([0., 0., 1., 1.], dtype=float32)
    """
    if method not in _UPSAMPLE:
        raise ValueError(f"method must be one of {_UPSAMPLE}, got {method!r}")
    maps = _check_map(maps)
    gh, gw = maps.shape[-2:]
    h, w = int(size[0]), int(size[1])
    if method == "bilinear":
        # no antialiasing: PyTorch's bilinear interpolation has none when shrinking either
        shape = (*maps.shape[:-2], h, w)
        return jax.image.resize(maps, shape, method="bilinear", antialias=False)
    rows = (jnp.arange(h) * gh) // h
    cols = (jnp.arange(w) * gw) // w
    return jnp.take(jnp.take(maps, rows, axis=-2), cols, axis=-1)


def _threshold_value(maps: jax.Array, thresh) -> jax.Array:
    if isinstance(thresh, str):
        if thresh == "mean":
            return jnp.mean(maps, axis=(-2, -1), keepdims=True)
        if thresh == "median":
            flat = maps.reshape(*maps.shape[:-2], -1)
            return jnp.median(flat, axis=-1)[..., None, None]
        raise ValueError(f"threshold must be 'mean', 'median' or a float in [0, 1], got {thresh!r}")
    return jnp.asarray(thresh, maps.dtype)


@functools.partial(jax.jit, static_argnames=("thresh",))
def threshold(
    maps: Float[ArrayLike, "*batch H W"], /, *, thresh: str | float = "mean"
) -> Bool[Array, "*batch H W"]:
    """Binarises maps: ``mask = map > t`` with ``t`` per map.

    Args:
        maps: ``(..., H, W)`` maps (min–max normalised for a fixed ``thresh`` to make sense).
        thresh: ``"mean"`` (the protocol: ``t`` = mean of the map), ``"median"``, or a fixed
            float (for normalised maps in ``[0, 1]``).

    Returns:
        boolean masks, ``True`` = foreground. A constant map gives an empty mask
        (nothing is strictly above its own mean).

    Examples:
        >>> import jax.numpy as jnp
        >>> threshold(jnp.array([[0.0, 0.2], [0.9, 1.0]]))
        Array([[False, False],
               [ True,  True]], dtype=bool)
    """
    maps = _check_map(maps)
    return maps > _threshold_value(maps, thresh)


@functools.partial(jax.jit, static_argnames=("size", "thresh", "method"))
def map_to_mask(
    maps: Float[ArrayLike, "*batch gh gw"],
    /,
    *,
    size: tuple[int, int],
    thresh: str | float = "mean",
    method: str = "nearest",
) -> tuple[Float[Array, "*batch H W"], Bool[Array, "*batch H W"]]:
    """The full protocol: per-map min–max, upsampling to the image, threshold.

    Args:
        maps: ``(..., gh, gw)`` maps over the patch grid (any scale; only their order
            within a map matters).
        size: ``(H, W)`` image size.
        thresh: see :func:`threshold`; ``"mean"`` is the protocol.
        method: upsampling, ``"nearest"`` (the protocol) or ``"bilinear"``.

    Returns:
        ``(scores, mask)``: the normalised upsampled continuous map (used for average
        precision) and the boolean mask.

    Examples:
        >>> import jax.numpy as jnp
        >>> scores, mask = map_to_mask(jnp.array([[1.0, 0.0], [0.0, 0.0]]), size=(4, 4))
        >>> int(mask.sum()), float(scores.max())
        (4, 1.0)
    """
    # upsample, then min-max (the reference order, Chefer et al.'s imagenet_seg_eval): bilinear
    # never samples a token's exact value, so min-max first left scores short of [0, 1]
    scores = minmax(upsample(maps, size=size, method=method))
    return scores, threshold(scores, thresh=thresh)
