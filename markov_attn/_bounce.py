"""Multi-bounce attention: propagating a start distribution through the chain."""

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Integer

from ._chain import _reverse, _uniform_or, check_index, one_hot
from ._typing import ChainLike, DistLike
from ._util import as_chain, check_alpha, check_choice, matvec_t, safe_normalize


@functools.partial(jax.jit, static_argnames=("steps", "direction"))
def _bounce(attn, x0, alpha, v, steps, direction):
    a = as_chain(attn)
    if direction == "reverse":
        a = _reverse(a)
    a = safe_normalize(a)
    n = a.shape[-1]
    x0 = jnp.asarray(x0)
    if jnp.issubdtype(x0.dtype, jnp.integer):
        batch = jnp.broadcast_shapes(a.shape[:-2], x0.shape)
        x = one_hot(x0, n, batch, a.dtype)
    else:
        batch = jnp.broadcast_shapes(a.shape[:-2], x0.shape[:-1])
        x = safe_normalize(jnp.broadcast_to(x0.astype(a.dtype), (*batch, n)))
    a = jnp.broadcast_to(a, (*batch, n, n))
    v = jnp.broadcast_to(_uniform_or(v, n, a.dtype), (*batch, n))
    alpha = jnp.asarray(alpha, a.dtype)

    def step(x, _):
        y = alpha * matvec_t(a, x) + (1.0 - alpha) * jnp.sum(x, -1, keepdims=True) * v
        y = safe_normalize(y)
        return y, y

    _, xs = jax.lax.scan(step, x, None, length=steps)
    return jnp.concatenate([x[..., None, :], jnp.moveaxis(xs, 0, -2)], axis=-2)


def bounce(
    attn: ChainLike,
    x0: Integer[ArrayLike, "*#batch"] | DistLike,
    /,
    *,
    steps: int,
    alpha: float | Float[ArrayLike, ""] = 0.99,
    v: DistLike | None = None,
    direction: str = "forward",
) -> Float[Array, "*batch steps_plus_1 n"]:
    r"""Multi-bounce (indirect) attention maps :math:`x_0, x_1, \dots, x_{\text{steps}}`.

    Each bounce is one step of the teleported chain :math:`T = \alpha A + (1-\alpha)\mathbf{1}
    v^\top`,

    .. math:: x_{k+1} = T^\top x_k / \mathbf{1}^\top T^\top x_k,

    renormalised each step as in the reference code. Every :math:`x_k` is its own map; nothing is
    summed over :math:`k`. From one-hot(CLS), :math:`x_1` is the CLS attention row and
    :math:`x_2` the paper's best segmentation map; from uniform, :math:`x_1` is the column mean.
    ``direction="reverse"`` walks the reverse chain (:func:`reverse`): its first step is "who
    looks at the start token". As ``steps`` grows, :math:`x_k` tends to :func:`tokenrank` at
    rate :math:`(\alpha|\lambda_2|)^k`.

    Args:
      attn: attention ``(..., n, n)``, row-stochastic over the last axis.
      x0: start token index (an integer, or an integer array broadcasting against the batch
        axes ``attn.shape[:-2]``, one-hot start), or start distributions ``(..., n)``
        (renormalised).
      steps: number of bounces (static).
      alpha: teleportation weight in ``[0, 1]``; ``1.0`` = no teleportation (traced).
      v: teleport distribution ``(..., n)``, uniform by default.
      direction: ``"forward"`` or ``"reverse"``.

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
    check_choice("direction", direction, ("forward", "reverse"))
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int (number of bounces), got {steps!r}")
    check_alpha(alpha)
    attn = jnp.asarray(attn)
    as_chain(attn)  # shape check with a clear message
    x0 = jnp.asarray(x0)
    if jnp.issubdtype(x0.dtype, jnp.integer):
        check_index(x0, attn.shape[-1])
    elif x0.ndim == 0 or x0.shape[-1] != attn.shape[-1]:
        raise ValueError(
            f"x0 must be a token index (integer) or a distribution over the "
            f"{attn.shape[-1]} tokens, got {x0.dtype} array of shape {x0.shape}"
        )
    return _bounce(attn, x0, alpha, v, steps, direction)


__all__ = ["bounce"]
