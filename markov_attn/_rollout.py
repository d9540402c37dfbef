"""Attention rollout (Abnar & Zuidema 2020), the standard multi-layer baseline."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from ._util import (
    HIGHEST,
    check_choice,
    check_square,
    check_values,
    compute_dtype,
    invalid_matrices,
    is_concrete,
    poison,
    safe_normalize,
    traced_range,
)

FUSIONS = ("mean", "max", "min")


@functools.partial(jax.jit, static_argnames=("head_fusion",))
def _rollout(attn, residual, head_fusion):
    a = attn.astype(compute_dtype(attn.dtype))
    bad = jnp.any(invalid_matrices(a), axis=(-2, -1))  # per stack of layers and heads
    a = safe_normalize(a)  # each head's rows renormalised first (the input contract)
    fused = {"mean": jnp.mean, "max": jnp.max, "min": jnp.min}[head_fusion](a, axis=-3)
    n = a.shape[-1]
    residual = traced_range(jnp.asarray(residual, a.dtype), 0.0, 1.0)
    eye = jnp.broadcast_to(jnp.eye(n, dtype=a.dtype), fused.shape)
    layers = residual * eye + (1.0 - residual) * fused
    layers = safe_normalize(layers)
    layers = jnp.moveaxis(layers, -3, 0)

    def step(r, layer):
        return jnp.matmul(layer, r, precision=HIGHEST), None

    out, _ = jax.lax.scan(step, layers[0], layers[1:])
    return poison(out, bad)


def rollout(
    attn_layers: Float[ArrayLike, "*batch layers heads n n"],
    /,
    *,
    residual: float = 0.5,
    head_fusion: str = "mean",
) -> Float[Array, "*batch n n"]:
    r"""Attention rollout across layers (Abnar & Zuidema, 2020).

    Each head's rows are renormalised (a no-op for softmax attention), heads are fused per
    layer (mean by default), the residual connection is modelled as
    :math:`\hat A_l = r I + (1 - r) \bar A_l` (rows renormalised), and the layers are multiplied,
    latest on the left:

    .. math:: R = \hat A_{L} \hat A_{L-1} \cdots \hat A_{1}.

    ``R[..., 0, :]`` is the rollout map of the CLS token.

    Args:
      attn_layers: ``(..., L, H, n, n)`` attention of every layer, first layer first.
      residual: weight ``r`` of the identity, in ``[0, 1]`` (0.5 in the paper).
      head_fusion: ``"mean"``, ``"max"`` or ``"min"`` over heads.

    Returns:
      ``(..., n, n)`` row-stochastic joint attention. NaN/inf or negative attention, or a
      ``residual`` outside ``[0, 1]``, raise a ``ValueError`` when concrete and give NaN under
      ``jit``.

    Examples:
      >>> import jax.numpy as jnp, markov_attn as ma
      >>> ma.rollout(jnp.ones((2, 1, 2, 2)) / 2, residual=0.0).tolist()
      [[0.5, 0.5], [0.5, 0.5]]
    """
    check_choice("head_fusion", head_fusion, FUSIONS)
    attn_layers = jnp.asarray(attn_layers)
    check_square(attn_layers.shape, "attn_layers")
    if attn_layers.ndim < 4:
        raise ValueError(
            f"attn_layers must be (..., layers, heads, n, n), got shape {attn_layers.shape}; "
            "add a heads axis with x[..., None, :, :] if you already fused heads"
        )
    if jnp.ndim(residual) != 0:  # known even for a traced residual: one weight for the stack
        raise ValueError(
            f"residual must be a scalar (one identity weight), got shape {jnp.shape(residual)}"
        )
    if is_concrete(residual):
        r = np.asarray(residual, np.float64)
        if r.ndim or not 0.0 <= float(r) <= 1.0:
            raise ValueError(
                f"residual must be a number in [0, 1] (the weight of the identity), got "
                f"{residual!r}"
            )
    check_values(attn_layers, "attn_layers")
    return _rollout(attn_layers, residual, head_fusion)


__all__ = ["rollout"]
