"""TokenRank: the stationary distribution of the (teleported) attention chain."""

import functools

import jax
import jax.numpy as jnp
from jaxtyping import ArrayLike, Float

from ._chain import _reverse, _uniform_or
from ._krylov import gmres
from ._typing import ChainLike, Dist, DistLike
from ._util import (
    as_chain,
    check_alpha,
    check_choice,
    map_over_batch,
    matvec,
    matvec_t,
    safe_normalize,
)

METHODS = ("auto", "solve", "gmres", "power")
# "auto": on CPU always GMRES (no LAPACK call: jaxlib 0.10's batched CPU LAPACK kernels can
# deadlock the intra-op thread pool when several run concurrently in one program, and the
# chunked GMRES is faster there: 2-core CPU, 96 matrices, n = 197: 66 ms vs 90 ms; n = 1025:
# 0.8 s vs ~15 s); on GPU/TPU dense LU up to this size and GMRES above.
AUTO_SOLVE_MAX_N = 256

# Bounds for the iterative methods. With alpha <= 0.99 the power method's L1 error after k
# steps is at most 2 alpha^k, so 1,600 steps reach 2e-7 in the worst case; GMRES needs far fewer
# products (chains.md: <= 60 for 1e-5 on attention stacks).
POWER_STEPS = 1600
POWER_TOL = 1e-7
GMRES_RESTART = 20
GMRES_CYCLES = 15
GMRES_TOL = 1e-6


def _system(a, v, alpha):
    """The matrix ``M = I - alpha A^T + alpha v 1^T`` of ``M pi = v`` (valid for alpha = 1)."""
    n = a.shape[-1]
    eye = jnp.broadcast_to(jnp.eye(n, dtype=a.dtype), a.shape)
    return eye - alpha[..., None, None] * (jnp.swapaxes(a, -1, -2) - v[..., :, None])


def m_operator(at_mv, v, alpha):
    """``x -> (I - alpha A^T + alpha v 1^T) x`` from a product ``at_mv(x) = A^T x``."""
    return lambda x: x - alpha[..., None] * (at_mv(x) - v * jnp.sum(x, -1, keepdims=True))


def mt_operator(a_mv, v, alpha):
    """``u -> (I - alpha A + alpha 1 v^T) u`` from a product ``a_mv(u) = A u``."""
    return lambda u: u - alpha[..., None] * (a_mv(u) - jnp.sum(v * u, -1, keepdims=True))


def _m_matvec(a, v, alpha):
    return m_operator(lambda x: matvec_t(a, x), v, alpha)


def _mt_matvec(a, v, alpha):
    return mt_operator(lambda u: matvec(a, u), v, alpha)


def _power(a, v, alpha):
    return power_iterate(lambda x: matvec_t(a, x), v, alpha)


def power_iterate(at_mv, v, alpha):
    """Teleported power method from ``v`` with the product ``at_mv(x) = A^T x``; bounded, stops
    when every member moved less than the tolerance (L1)."""

    def step(x):
        y = alpha[..., None] * at_mv(x) + (1.0 - alpha[..., None]) * v
        return y / jnp.sum(y, -1, keepdims=True)

    def cond(s):
        _, delta, k = s
        return (k < POWER_STEPS) & (jnp.max(delta) > POWER_TOL)

    def body(s):
        x, _, k = s
        y = step(x)
        return y, jnp.sum(jnp.abs(y - x), -1), k + 1

    x0 = v
    delta0 = jnp.full(v.shape[:-1], jnp.inf, v.dtype)
    x, _, _ = jax.lax.while_loop(cond, body, (x0, delta0, jnp.asarray(0, jnp.int32)))
    return x


def _power_adjoint(a, v, alpha, pi, g):
    """Centred iteration for the adjoint: r = g - (pi.g) 1, w <- T w + r; stays in pi-perp and
    contracts at alpha |lambda_2| (chains.md §5)."""
    r = g - jnp.sum(pi * g, -1, keepdims=True)

    def t_mv(w):  # T w with T = alpha A + (1 - alpha) 1 v^T
        return alpha[..., None] * matvec(a, w) + (1.0 - alpha[..., None]) * jnp.sum(
            v * w, -1, keepdims=True
        )

    def cond(s):
        _, delta, k = s
        return (k < POWER_STEPS) & (jnp.max(delta) > POWER_TOL)

    def body(s):
        w, _, k = s
        w2 = t_mv(w) + r
        scale = jnp.maximum(jnp.max(jnp.abs(w2), -1), 1e-30)
        return w2, jnp.max(jnp.abs(w2 - w), -1) / scale, k + 1

    delta0 = jnp.full(g.shape[:-1], jnp.inf, g.dtype)
    w, _, _ = jax.lax.while_loop(cond, body, (r, delta0, jnp.asarray(0, jnp.int32)))
    return w


def _finish(pi):
    return safe_normalize(jnp.maximum(pi, 0.0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _stationary(a, v, alpha, method):
    return _stationary_fwd(a, v, alpha, method)[0]


def _item_bytes(a):
    return a.shape[-1] * a.shape[-1] * a.dtype.itemsize


def _gmres_solve(a, v, alpha, b, transpose):
    op = _mt_matvec if transpose else _m_matvec
    x, _, _ = gmres(
        op(a, v, alpha), b, b, restart=GMRES_RESTART, max_restarts=GMRES_CYCLES, tol=GMRES_TOL
    )
    return x


def _solve_pi(a, v, alpha):
    lu, piv = jax.scipy.linalg.lu_factor(_system(a, v, alpha))
    return jax.scipy.linalg.lu_solve((lu, piv), v[..., None])[..., 0], (lu, piv)


def _solve_u(a, v, alpha, g):
    # M^T u = g with M^T = I - alpha A + alpha 1 v^T
    return jnp.linalg.solve(jnp.swapaxes(_system(a, v, alpha), -1, -2), g[..., None])[..., 0]


def _gmres_pi(a, v, alpha):
    return map_over_batch(
        lambda a, v, al: _gmres_solve(a, v, al, v, False),
        a,
        v,
        alpha,
        batch_ndim=a.ndim - 2,
        item_bytes=_item_bytes(a),
    )


def _gmres_u(a, v, alpha, g):
    return map_over_batch(
        lambda a, v, al, g: _gmres_solve(a, v, al, g, True),
        a,
        v,
        alpha,
        g,
        batch_ndim=a.ndim - 2,
        item_bytes=_item_bytes(a),
    )


def _stationary_fwd(a, v, alpha, method):
    nb = a.ndim - 2
    res = None
    if method == "auto":
        dense = a.shape[-1] <= AUTO_SOLVE_MAX_N
        pi = jax.lax.platform_dependent(
            a,
            v,
            alpha,
            cpu=_gmres_pi,
            default=(lambda *x: _solve_pi(*x)[0]) if dense else _gmres_pi,
        )
    elif method == "solve":
        pi, res = _solve_pi(a, v, alpha)
    elif method == "gmres":
        pi = _gmres_pi(a, v, alpha)
    else:
        pi = map_over_batch(_power, a, v, alpha, batch_ndim=nb, item_bytes=_item_bytes(a))
    pi = _finish(pi)
    return pi, (a, v, alpha, pi, res)


def _stationary_bwd(method, residuals, g):
    a, v, alpha, pi, res = residuals
    nb = a.ndim - 2
    if method == "auto":
        dense = a.shape[-1] <= AUTO_SOLVE_MAX_N
        u = jax.lax.platform_dependent(
            a, v, alpha, g, cpu=_gmres_u, default=_solve_u if dense else _gmres_u
        )
    elif method == "solve":
        u = jax.scipy.linalg.lu_solve(res, g[..., None], trans=1)[..., 0]
    elif method == "gmres":
        u = _gmres_u(a, v, alpha, g)
    else:
        u = map_over_batch(
            _power_adjoint, a, v, alpha, pi, g, batch_ndim=nb, item_bytes=_item_bytes(a)
        )
    # M dpi = (1 - alpha) dv + alpha dA^T pi + dalpha (A^T pi - v),  u = M^-T g
    da = alpha[..., None, None] * pi[..., :, None] * u[..., None, :]
    dv = (1.0 - alpha[..., None]) * u
    dalpha = jnp.sum(u * (matvec_t(a, pi) - v), -1)
    return da, dv, dalpha


_stationary.defvjp(_stationary_fwd, _stationary_bwd)


@functools.partial(jax.jit, static_argnames=("direction", "method"))
def _tokenrank(attn, alpha, v, direction, method):
    a = as_chain(attn)
    if direction == "out":
        a = _reverse(a)
    # Renormalising rows makes the result a well-defined function of any non-negative input
    # (the implicit VJP below assumes row-stochastic A) and absorbs bf16 rounding.
    a = safe_normalize(a)
    n = a.shape[-1]
    v = _uniform_or(v, n, a.dtype)
    alpha = jnp.asarray(alpha, a.dtype)
    batch = jnp.broadcast_shapes(a.shape[:-2], v.shape[:-1], alpha.shape)
    a = jnp.broadcast_to(a, (*batch, n, n))
    v = jnp.broadcast_to(v, (*batch, n))
    alpha = jnp.broadcast_to(alpha, batch)
    return _stationary(a, v, alpha, method)


def tokenrank(
    attn: ChainLike,
    /,
    *,
    alpha: float | Float[ArrayLike, "*#batch"] = 0.99,
    v: DistLike | None = None,
    direction: str = "in",
    method: str = "auto",
) -> Dist:
    r"""TokenRank: the stationary distribution of the teleported attention chain.

    With :math:`T = \alpha A + (1-\alpha)\mathbf{1}v^\top`, TokenRank is the unique :math:`\pi`
    with :math:`T^\top \pi = \pi`, :math:`\pi \ge 0`, :math:`\mathbf{1}^\top\pi = 1`: the global
    incoming importance of each token. It solves

    .. math:: (I - \alpha A^\top + \alpha v \mathbf{1}^\top)\,\pi = v,

    which for :math:`\alpha < 1` is :math:`(I - \alpha A^\top)\pi = (1-\alpha) v` and for
    :math:`\alpha = 1` still pins the normalisation. ``direction="out"`` uses the reverse chain
    (:func:`reverse`), an outgoing importance.

    Methods (all give the same answer to float32 rounding, with ``alpha <= 0.99``):

    - ``"auto"`` (default): ``"gmres"`` on CPU; on GPU/TPU ``"solve"`` for ``n <= 256`` and
      ``"gmres"`` above.
    - ``"solve"``: dense LU, :math:`O(n^3)` per matrix, accurate to about 1e-6 (L1) in
      float32; runs on CPU, GPU and TPU. On CPU with jaxlib 0.10 avoid several concurrent
      batched LU calls inside one jitted program: jaxlib's batched CPU LAPACK kernels can
      deadlock the intra-op thread pool (fixed in jaxlib 0.11); ``"auto"`` never calls LAPACK
      on CPU.
    - ``"gmres"``: matrix-free restarted GMRES (restart 20, at most 15 cycles, relative
      residual 1e-6), :math:`O(n^2)` per product; the better choice for large ``n``. On CPU
      the batch is processed in cache-sized chunks (each chunk's matrices stay in the last-level
      cache across products and stop iterating when they converge); on GPU/TPU all at once.
    - ``"power"``: the teleported power method from ``v`` until the L1 change is below 1e-7
      (at most 1,600 steps; the reference code's 200 steps leave errors up to 2e-2).

    Gradients are implicit, never an unrolled loop: for a cotangent :math:`\bar g`, one adjoint
    solve :math:`u = M^{-\top}\bar g` gives :math:`\partial L/\partial A = \alpha\,\pi u^\top`,
    :math:`\partial L/\partial v = (1-\alpha)u` (the solve reuses the LU factors).

    ``alpha = 1`` (no teleportation) is allowed but ill-conditioned: for nearly reducible chains
    (:math:`|\lambda_2|` within ~1e-4 of 1) no float32 method is accurate, and for reducible
    chains the stationary distribution is not unique.

    Args:
      attn: attention ``(..., n, n)``, row-stochastic over the last axis (rows are renormalised
        here; bf16/f16 inputs are computed in float32).
      alpha: teleportation weight in ``[0, 1]``, a scalar or one per matrix; traced.
      v: teleport (personalisation) distribution ``(..., n)``, uniform by default.
      direction: ``"in"`` (the chain itself) or ``"out"`` (the reverse chain).
      method: ``"auto"``, ``"solve"``, ``"gmres"`` or ``"power"``.

    Returns:
      ``(..., n)`` float32 distributions, non-negative, summing to 1.

    Examples:
      >>> import markov_attn as ma
      >>> A = [[0.01, 0.04, 0.02, 0.85, 0.08], [0.82, 0.04, 0.07, 0.01, 0.06],
      ...      [0.80, 0.07, 0.03, 0.05, 0.05], [0.06, 0.06, 0.03, 0.04, 0.81],
      ...      [0.53, 0.03, 0.03, 0.06, 0.35]]
      >>> [round(float(p), 3) for p in ma.tokenrank(A)]
      [0.278, 0.044, 0.031, 0.271, 0.376]
    """
    check_choice("direction", direction, ("in", "out"))
    check_choice("method", method, METHODS)
    check_alpha(alpha)
    return _tokenrank(attn, alpha, v, direction, method)


__all__ = ["tokenrank"]
