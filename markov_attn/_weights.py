"""λ2 head weighting and weighted averages of chains and maps."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from ._util import check_choice, compute_dtype, is_concrete, safe_normalize, traced_range

#: The head weightings of :func:`head_weights`, the one definition every layer imports
#: (``ViTConfig.tokenrank_weighting``, ``MapMethod.weighting``, the CLI's ``--weighting``).
HEAD_WEIGHTINGS = ("lambda2", "gap", "uniform")


@functools.partial(jax.jit, static_argnames=("weighting", "axis"))
def _head_weights(lam2, weighting, axis):
    lam2 = lam2.astype(compute_dtype(lam2.dtype))
    # out of [0, 1] (or NaN) under jit: NaN weights, for every weighting ("uniform" too)
    lam2 = traced_range(lam2, -1e-6, 1.0 + 1e-6)
    if weighting == "lambda2":
        w = lam2
    elif weighting == "gap":
        w = 1.0 - lam2
    else:
        w = jnp.where(jnp.isnan(lam2), lam2, 1.0)
    w = jnp.clip(w, 0.0, None)
    return jnp.moveaxis(safe_normalize(jnp.moveaxis(w, axis, -1)), -1, axis)


def head_weights(
    lam2: Float[ArrayLike, "*batch"], /, *, weighting: str = "lambda2", axis: int = -1
) -> Float[Array, "*batch"]:
    r"""Weights for averaging heads (or layers) from their |λ2|, normalised over ``axis``.

    - ``"lambda2"`` (default): :math:`w_h \propto |\lambda_2^{(h)}|`, favouring heads with strong
      metastable structure (the paper's λ2 weighting; its exact formula is not public);
    - ``"gap"``: :math:`w_h \propto 1 - |\lambda_2^{(h)}|`, favouring fast-mixing heads;
    - ``"uniform"``: the plain mean.

    Where every weight along ``axis`` is zero the weights fall back to uniform.

    Args:
      lam2: |λ2| per head, e.g. ``(batch, layers, heads)`` from :func:`second_eigenvalue`.
      weighting: ``"lambda2"``, ``"gap"`` or ``"uniform"`` (:data:`HEAD_WEIGHTINGS`).
      axis: the axis to normalise over (heads by default).

    Returns:
      Non-negative weights of the same shape, summing to 1 over ``axis``; use them with
      :func:`average` on matrices or on per-head maps.

    Examples:
      >>> import markov_attn as ma
      >>> ma.head_weights([0.9, 0.3]).tolist()
      [0.75, 0.25]
    """
    check_choice("weighting", weighting, HEAD_WEIGHTINGS)
    lam2 = jnp.asarray(lam2)
    if lam2.ndim == 0:
        raise ValueError("lam2 must have at least one axis (the heads to weight)")
    if not -lam2.ndim <= axis < lam2.ndim:
        raise ValueError(f"axis {axis} is out of range for lam2 of shape {lam2.shape}")
    if lam2.shape[axis] == 0:
        raise ValueError(
            f"lam2 of shape {lam2.shape} has no heads along axis {axis}: there is nothing to "
            "weight (pass |λ2| per head, e.g. ma.second_eigenvalue(attn) of shape (..., heads))"
        )
    if lam2.size == 0:  # an empty batch of heads: empty weights
        return jnp.zeros(lam2.shape, compute_dtype(lam2.dtype))
    if is_concrete(lam2):
        x = np.asarray(lam2, np.float64)
        if not np.all(np.isfinite(x)):
            raise ValueError(
                f"lam2 contains {int(np.sum(~np.isfinite(x)))} NaN/inf value(s); |λ2| from "
                "ma.second_eigenvalue is NaN only for an invalid attention matrix (check it "
                "with ma.check_chain)"
            )
        if np.any(x < -1e-6) or np.any(x > 1 + 1e-6):
            raise ValueError(
                "lam2 must hold eigenvalue moduli in [0, 1] (from ma.second_eigenvalue), got "
                f"values in [{x.min():.3g}, {x.max():.3g}]"
            )
    return _head_weights(lam2, weighting, axis % lam2.ndim)


@functools.partial(jax.jit, static_argnames=("axis",))
def _average(x, weights, axis):
    x = x.astype(compute_dtype(x.dtype))
    if weights is None:
        return jnp.mean(x, axis=axis)
    w = weights.astype(x.dtype)
    w = jnp.where(w >= 0, w, jnp.nan)  # negative or NaN weights give NaN, never a mean
    w = jnp.moveaxis(safe_normalize(jnp.moveaxis(w, axis, -1)), -1, axis)
    w = w.reshape(w.shape + (1,) * (x.ndim - w.ndim))
    return jnp.sum(w * x, axis=axis)


def average(
    x: Float[ArrayLike, "..."],
    /,
    *,
    weights: Float[ArrayLike, "..."] | None = None,
    axis: int = -3,
) -> Float[Array, "..."]:
    r"""Weighted average over one axis: a convex combination of chains, or of per-head maps.

    A convex combination of row-stochastic matrices is again a chain, so averaging heads (or
    layers) with :func:`head_weights` gives the λ2-weighted chain of the paper. The same weights
    average per-head maps. Unlike the chain functions it does not renormalise rows (it also
    averages maps): chains sliced after the softmax (e.g. CLS dropped) should go through
    :func:`normalize` first, or each head is weighted by its rows' remaining mass.

    Args:
      x: the arrays, e.g. chains ``(B, L, H, n, n)`` or per-head maps ``(B, L, H, n)``.
      weights: ``None`` for the plain mean, or non-negative weights of shape ``x.shape[:k]``
        for some ``k`` (leading axes of ``x``; the trailing ``x.ndim - k`` axes are event axes
        and get the same weight), renormalised over ``axis``; weights that are all zero along
        ``axis`` give the plain mean there (as :func:`head_weights` falls back to uniform).
      axis: the axis of ``x`` to average over; ``-3`` = heads of ``(..., H, n, n)`` chains. For
        maps ``(..., H, n)`` pass ``axis=-2``.

    Returns:
      ``x`` with ``axis`` removed.

    Examples:
      >>> import jax.numpy as jnp, markov_attn as ma
      >>> heads = jnp.stack([jnp.eye(2), jnp.ones((2, 2)) / 2])
      >>> ma.average(heads, weights=jnp.array([3.0, 1.0])).tolist()
      [[0.875, 0.125], [0.125, 0.875]]
    """
    x = jnp.asarray(x)
    if x.ndim == 0:
        raise ValueError("x must have at least one axis to average over")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis {axis} is out of range for x of shape {x.shape}")
    axis = axis % x.ndim
    if weights is not None:
        weights = jnp.asarray(weights)
        k = weights.ndim
        if k > x.ndim or weights.shape != x.shape[:k] or axis >= k:
            raise ValueError(
                f"weights of shape {weights.shape} must equal the leading axes of x "
                f"{x.shape} up to and including the averaged axis {axis}; e.g. weights "
                "(B, L, H) for chains (B, L, H, n, n) with axis=-3 or maps (B, L, H, n) "
                "with axis=-2"
            )
        if is_concrete(weights):
            w = np.asarray(weights, np.float64)
            if not np.all(np.isfinite(w)) or np.any(w < 0):
                raise ValueError("weights must be finite and non-negative (use ma.head_weights)")
    return _average(x, weights, axis)


__all__ = ["average", "head_weights"]
