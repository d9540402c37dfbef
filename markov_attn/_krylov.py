"""Matrix-free Krylov kernels shared by the dense and streaming chain functions.

Everything here works on batches of vectors ``(..., n)`` through a ``matvec`` callable, with
loop counts fixed at trace time (or bounded ``while_loop``s), so it lowers on CPU, GPU and TPU
and a vmapped call never waits on an unbounded slowest member.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from ._util import HIGHEST

MatVec = Callable[[jax.Array], jax.Array]


def _dot(a, b):
    return jnp.sum(a * b, axis=-1)


def _norm(x):
    return jnp.sqrt(jnp.sum(x * x, axis=-1))


def _safe_div(x, d, tiny):
    ok = d > tiny
    return jnp.where(ok[..., None], x / jnp.where(ok, d, 1.0)[..., None], 0.0)


def _orthogonalize(basis, w, passes: int = 2):
    """Classical Gram–Schmidt against ``basis`` ``(..., k, n)``, repeated (CGS2)."""
    h_total = jnp.zeros(basis.shape[:-1], w.dtype)
    for _ in range(passes):
        h = jnp.einsum("...kn,...n->...k", basis, w, precision=HIGHEST)
        w = w - jnp.einsum("...kn,...k->...n", basis, h, precision=HIGHEST)
        h_total = h_total + h
    return w, h_total


def arnoldi(matvec: MatVec, v0: jax.Array, steps: int, *, project: MatVec | None = None):
    """``steps`` steps of Arnoldi with re-orthogonalised Gram–Schmidt.

    Args:
      matvec: the operator, batched over leading axes.
      v0: start vectors ``(..., n)`` (normalised here).
      steps: Krylov dimension ``m`` (static).
      project: optional projection applied after each product (for example onto zero-sum
        vectors, to keep the iteration in an invariant subspace despite rounding).

    Returns:
      ``(V, H, beta)``: basis ``(..., m + 1, n)``, Hessenberg ``(..., m + 1, m)`` and the norm
      of ``v0``. A breakdown (invariant subspace found) leaves zero columns, never NaN.
    """
    dtype = v0.dtype
    tiny = jnp.finfo(dtype).tiny * 1e4
    beta = _norm(v0)
    basis = jnp.zeros((*v0.shape[:-1], steps + 1, v0.shape[-1]), dtype)
    basis = basis.at[..., 0, :].set(_safe_div(v0, beta, tiny))
    hess = jnp.zeros((*v0.shape[:-1], steps + 1, steps), dtype)
    scale = jnp.zeros(v0.shape[:-1], dtype)

    def body(k, carry):
        basis, hess, scale = carry
        w = matvec(basis[..., k, :])
        if project is not None:
            w = project(w)
        scale = jnp.maximum(scale, _norm(w))
        w, h = _orthogonalize(basis, w)
        hn = _norm(w)
        # a column with (numerically) nothing new marks an invariant subspace: stop growing it
        hn = jnp.where(hn > 1e-6 * jnp.maximum(scale, tiny), hn, 0.0)
        hess = hess.at[..., :, k].set(h.at[..., k + 1].set(hn))
        basis = basis.at[..., k + 1, :].set(_safe_div(w, hn, tiny))
        return basis, hess, scale

    basis, hess, _ = jax.lax.fori_loop(0, steps, body, (basis, hess, scale))
    return basis, hess, beta


def _lstsq_hessenberg(hess, rhs):
    """Least squares ``min ||rhs - H y||`` for upper Hessenberg ``H`` ``(..., m + 1, m)``.

    Givens rotations and back substitution in plain JAX ops: no LAPACK call, so nothing here
    can hit jaxlib 0.10's CPU thread-pool deadlock in batched LAPACK kernels, and it lowers on
    every backend. Robust to breakdown: a (numerically) zero pivot gives a zero coefficient.
    """
    m = hess.shape[-1]
    dtype = hess.dtype
    tiny = jnp.finfo(dtype).tiny * 1e4

    def rotate(k, carry):
        h, g = carry
        a, b = h[..., k, :], h[..., k + 1, :]
        x, y = a[..., k], b[..., k]
        r = jnp.sqrt(x * x + y * y)
        ok = r > tiny
        c = jnp.where(ok, x / jnp.where(ok, r, 1.0), 1.0)
        s = jnp.where(ok, y / jnp.where(ok, r, 1.0), 0.0)
        h = h.at[..., k, :].set(c[..., None] * a + s[..., None] * b)
        h = h.at[..., k + 1, :].set(c[..., None] * b - s[..., None] * a)
        gk, gk1 = g[..., k], g[..., k + 1]
        g = g.at[..., k].set(c * gk + s * gk1).at[..., k + 1].set(c * gk1 - s * gk)
        return h, g

    r, g = jax.lax.fori_loop(0, m, rotate, (hess, rhs))
    diag = jnp.abs(jnp.diagonal(r[..., :m, :], axis1=-2, axis2=-1))
    small = diag <= 1e-7 * jnp.maximum(jnp.max(diag, axis=-1, keepdims=True), tiny)

    def back(i, y):
        k = m - 1 - i
        acc = g[..., k] - jnp.sum(r[..., k, :] * y, axis=-1)
        piv = r[..., k, k]
        yk = jnp.where(small[..., k], 0.0, acc / jnp.where(small[..., k], 1.0, piv))
        return y.at[..., k].set(yk)

    return jax.lax.fori_loop(0, m, back, jnp.zeros((*hess.shape[:-2], m), dtype))


def gmres(
    matvec: MatVec,
    b: jax.Array,
    x0: jax.Array,
    *,
    restart: int = 20,
    max_restarts: int = 10,
    tol: float | jax.Array = 1e-6,
):
    """Restarted GMRES for a batch of systems ``M x = b``; ``(x, relative residual, cycles)``.

    Stops when every member's residual ``||b - M x||_2 <= tol ||b||_2`` or after
    ``max_restarts`` cycles of ``restart`` products (both bounds static).
    """
    bnorm = _norm(b)
    tiny = jnp.finfo(b.dtype).tiny * 1e4

    def residual(x):
        r = b - matvec(x)
        return r, _norm(r) / jnp.maximum(bnorm, tiny)

    def cond(state):
        _, rel, it = state
        return (it < max_restarts) & jnp.any(rel > tol)

    def body(state):
        x, _, it = state
        r, _ = residual(x)
        basis, hess, beta = arnoldi(matvec, r, restart)
        rhs = jnp.zeros(hess.shape[:-1], b.dtype).at[..., 0].set(beta)
        y = _lstsq_hessenberg(hess, rhs)
        x = x + jnp.einsum("...kn,...k->...n", basis[..., :-1, :], y, precision=HIGHEST)
        _, rel = residual(x)
        return x, rel, it + 1

    _, rel0 = residual(x0)
    x, rel, it = jax.lax.while_loop(cond, body, (x0, rel0, jnp.asarray(0, jnp.int32)))
    return x, rel, it


def spectral_radius(mat: jax.Array, *, squarings: int = 24) -> jax.Array:
    r"""Spectral radius of small square matrices by Gelfand's formula with matmuls only.

    :math:`\rho(H) = \lim_k \|H^k\|^{1/k}`; ``squarings`` normalised squarings give
    :math:`k = 2^{s}`, with relative error about :math:`\log(\kappa) / 2^{s}`. Runs on any
    backend (no eigendecomposition).
    """
    nrm = jnp.sqrt(jnp.sum(mat * mat, axis=(-2, -1)))
    ok = nrm > 0
    log_rho = jnp.where(ok, jnp.log(jnp.where(ok, nrm, 1.0)), -jnp.inf)
    b = mat / jnp.where(ok, nrm, 1.0)[..., None, None]

    def body(i, carry):
        b, log_rho = carry
        b2 = jnp.matmul(b, b, precision=HIGHEST)
        n2 = jnp.sqrt(jnp.sum(b2 * b2, axis=(-2, -1)))
        ok = n2 > 0
        weight = jnp.exp2(-(i + 1).astype(mat.dtype))
        log_rho = log_rho + jnp.where(ok, jnp.log(jnp.where(ok, n2, 1.0)), -jnp.inf) * weight
        return b2 / jnp.where(ok, n2, 1.0)[..., None, None], log_rho

    _, log_rho = jax.lax.fori_loop(0, squarings, body, (b, log_rho))
    return jnp.exp(log_rho)
