"""Multi-bounce attention: propagating a start distribution through the chain."""

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Integer

from ._chain import _reverse, _teleport, _uniform_or, check_index, check_v, not_a_dist, one_hot
from ._typing import ChainLike, DistLike
from ._util import (
    as_chain,
    check_alpha,
    check_batch,
    check_choice,
    check_count,
    check_values,
    invalid_matrices,
    matvec_t,
    poison,
    safe_normalize,
    traced_range,
)

DIRECTIONS = ("forward", "reverse")


@functools.partial(jax.jit, static_argnames=("steps", "direction", "teleport_first"))
def _bounce(attn, x0, alpha, v, steps, direction, teleport_first):
    a = as_chain(attn)
    bad = invalid_matrices(a)
    n = a.shape[-1]
    alpha = traced_range(jnp.asarray(alpha, a.dtype), 0.0, 1.0)
    bad_alpha = jnp.isnan(alpha)  # before the reverse chain's alpha is replaced by ones
    # _teleport and _reverse renormalise the rows first: the reverse of the chain, not of the
    # raw weights
    if direction == "reverse" and teleport_first:
        # the paper's reverse chain: reverse(teleport(A)), stepped without teleporting again
        a = _reverse(_teleport(a, alpha, v))
        alpha = jnp.ones_like(alpha)
    elif direction == "reverse":
        a = _reverse(a)
    a = safe_normalize(a)
    v = _uniform_or(v, n, a.dtype)
    x0 = jnp.asarray(x0)
    if jnp.issubdtype(x0.dtype, jnp.integer):
        batch = jnp.broadcast_shapes(a.shape[:-2], x0.shape, alpha.shape, v.shape[:-1])
        x = one_hot(x0, n, batch, a.dtype)
    else:
        batch = jnp.broadcast_shapes(a.shape[:-2], x0.shape[:-1], alpha.shape, v.shape[:-1])
        x0 = x0.astype(a.dtype)
        x = poison(safe_normalize(x0), not_a_dist(x0))
        x = jnp.broadcast_to(x, (*batch, n))
    a = jnp.broadcast_to(a, (*batch, n, n))
    v = jnp.broadcast_to(v, (*batch, n))
    alpha = jnp.broadcast_to(alpha, batch)  # one per matrix
    bad = jnp.broadcast_to(bad, batch) | jnp.broadcast_to(bad_alpha, batch)
    bad = bad | jnp.any(jnp.isnan(v), axis=-1)
    al = alpha[..., None]

    def step(x, _):
        y = al * matvec_t(a, x) + (1.0 - al) * jnp.sum(x, -1, keepdims=True) * v
        y = safe_normalize(y)
        return y, y

    _, xs = jax.lax.scan(step, x, None, length=steps)
    out = jnp.concatenate([x[..., None, :], jnp.moveaxis(xs, 0, -2)], axis=-2)
    return poison(out, jnp.broadcast_to(bad, batch))


def bounce(
    attn: ChainLike,
    x0: Integer[ArrayLike, "*#batch"] | DistLike,
    /,
    *,
    steps: int,
    alpha: float | Float[ArrayLike, "*#batch"] = 0.99,
    v: DistLike | None = None,
    direction: str = "forward",
    teleport_first: bool = True,
) -> Float[Array, "*batch steps_plus_1 n"]:
    r"""Multi-bounce (indirect) attention maps :math:`x_0, x_1, \dots, x_{\text{steps}}`.

    Each bounce is one step of the teleported chain :math:`T = \alpha A + (1-\alpha)\mathbf{1}
    v^\top`,

    .. math:: x_{k+1} = T^\top x_k / \mathbf{1}^\top T^\top x_k,

    renormalised each step as in the reference code. Every :math:`x_k` is its own map; nothing is
    summed over :math:`k`. From one-hot(CLS), :math:`x_1` is the CLS attention row and
    :math:`x_2` the paper's best segmentation map; from uniform, :math:`x_1` is the column mean.
    ``direction="reverse"`` walks the reverse chain (:func:`reverse`): its first step is "who
    looks at the start token". By default (``teleport_first=True``, the paper's code) that is
    the reverse of the teleported chain, :math:`\mathrm{reverse}(T)`, stepped as it is;
    ``teleport_first=False`` teleports the reversed chain instead (they differ by up to a few
    1e-3 per entry for :math:`\alpha < 1`). As ``steps`` grows, :math:`x_k` tends to
    :func:`tokenrank` of the same chain (its ``direction="in"`` for ``"forward"``, ``"out"`` for
    ``"reverse"``: both functions' ``direction`` picks the chain or its reverse, named for a
    walk here and for an importance there; same ``teleport_first``) at rate
    :math:`(\alpha|\lambda_2|)^k`.

    Input contract: rows are renormalised; NaN/inf or negative entries, ``alpha`` outside
    ``[0, 1]``, an index outside ``[-n, n)`` or an invalid ``x0``/``v`` raise a ``ValueError``
    when concrete and give NaN under ``jit``.

    Args:
      attn: attention ``(..., n, n)``, row-stochastic over the last axis.
      x0: start token index (an integer, or an integer array broadcasting against the batch
        axes ``attn.shape[:-2]``, one-hot start), or start distributions ``(..., n)``
        (renormalised).
      steps: number of bounces (static).
      alpha: teleportation weight in ``[0, 1]``, a scalar or one per matrix ``(...)``;
        ``1.0`` = no teleportation (traced).
      v: teleport distribution ``(..., n)``, uniform by default.
      direction: ``"forward"`` or ``"reverse"``.
      teleport_first: for ``direction="reverse"``: reverse the teleported chain (default, the
        paper's order) or teleport the reversed chain (``False``).

    Returns:
      ``(..., steps + 1, n)``: the maps, stacked on a new axis before the token axis, each
      summing to 1; index 0 is the start distribution.

    Examples:
      >>> import markov_attn as ma
      >>> A = [[0.01, 0.04, 0.02, 0.85, 0.08], [0.82, 0.04, 0.07, 0.01, 0.06],
      ...      [0.80, 0.07, 0.03, 0.05, 0.05], [0.06, 0.06, 0.03, 0.04, 0.81],
      ...      [0.53, 0.03, 0.03, 0.06, 0.35]]
      >>> xs = ma.bounce(A, 4, steps=2, alpha=1.0)
      >>> [round(float(p), 3) for p in xs[2]]
      [0.243, 0.039, 0.026, 0.476, 0.217]
    """
    check_choice("direction", direction, DIRECTIONS)
    steps = check_count("steps", steps, what=" (number of bounces)")
    attn = jnp.asarray(attn)
    as_chain(attn)  # shape check with a clear message
    check_values(attn)
    batch = attn.shape[:-2]
    check_alpha(alpha, batch=batch)
    if v is not None:
        check_v(v, "v", batch)
    x0 = jnp.asarray(x0)
    if jnp.issubdtype(x0.dtype, jnp.integer):
        check_batch("x0", x0.shape, batch, "pass one token index or one per matrix")
        check_index(x0, attn.shape[-1])
    elif x0.ndim == 0 or x0.shape[-1] != attn.shape[-1]:
        raise ValueError(
            f"x0 must be a token index (integer) or a distribution over the "
            f"{attn.shape[-1]} tokens, got {x0.dtype} array of shape {x0.shape}"
        )
    else:
        check_v(x0, "x0", batch)
    return _bounce(attn, x0, alpha, v, steps, direction, bool(teleport_first))


__all__ = ["bounce"]
