"""Matrix-free Krylov kernels shared by the dense and streaming chain functions.

Everything here works on batches of vectors ``(..., n)`` through a ``matvec`` callable, with
loop counts fixed at trace time (or bounded ``while_loop``s), so it lowers on CPU, GPU and TPU
and a vmapped call never waits on an unbounded slowest member.
"""

import functools
import itertools
from collections.abc import Callable
from typing import NamedTuple

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


class Radius(NamedTuple):
    """Result of :func:`arnoldi_radius` (one entry per member of the batch)."""

    value: jax.Array  #: spectral radius of the Krylov compression (the estimate)
    residual: jax.Array  #: residual of its dominant Ritz subspace, ``||A Y - Y (Y^T A Y)||``
    steps: jax.Array  #: Krylov dimension of the returned estimate


def _orthogonalize_dgks(basis, w, eta: float = 0.5**0.5):
    """Gram–Schmidt against ``basis`` with a second pass only where it is needed.

    The second pass runs when the first removed more than ``1 - eta`` of ``w``'s norm for
    some member (Daniel, Gragg, Kaufman and Stewart's criterion, as in ARPACK): a scalar
    ``cond`` over the members of the call, so a batch chunk skips it when none needs it.
    """
    n0 = _norm(w)
    w, h = _orthogonalize(basis, w, passes=1)
    again = jnp.any(_norm(w) < eta * n0)
    w2, h2 = jax.lax.cond(
        again,
        lambda w: _orthogonalize(basis, w, passes=1),
        lambda w: (w, jnp.zeros_like(h)),
        w,
    )
    return w2, h + h2


def _arnoldi_column(matvec, basis, k, scale, tiny, *, ortho=_orthogonalize, project=None):
    """One Arnoldi step: ``w = A v_k`` (then ``project``ed), orthogonalised against the rows of
    ``basis`` ``(..., j, n)``. Returns the next basis vector (zero where nothing new is left:
    an invariant subspace), the coefficients ``h`` ``(..., j)``, its norm before normalising
    ``hn`` (0 there) and the running operator scale."""
    w = matvec(basis[..., k, :])
    if project is not None:
        w = project(w)
    scale = jnp.maximum(scale, _norm(w))
    w, h = ortho(basis, w)
    hn = _norm(w)
    # a column with (numerically) nothing new marks an invariant subspace: stop growing
    hn = jnp.where(hn > 1e-6 * jnp.maximum(scale, tiny), hn, 0.0)
    return _safe_div(w, hn, tiny), h, hn, scale


def arnoldi_radius(
    matvec: MatVec,
    v0: jax.Array,
    stages: tuple[int, ...],
    *,
    project: MatVec | None = None,
    tol: float = 0.0,
    skip: jax.Array | None = None,
) -> Radius:
    """The largest eigenvalue modulus of an operator by Arnoldi, grown in stages until it holds.

    Arnoldi (re-orthogonalised Gram–Schmidt) builds the Krylov basis ``V`` and the Hessenberg
    compression ``H`` one product at a time. At the end of each stage (``stages``: increasing
    static Krylov dimensions) the spectral radius of ``H_m`` comes from Gelfand's formula
    (:func:`spectral_radius`), whose last normalised power spans the dominant Ritz subspace
    ``Y`` of ``H_m`` (one vector for a real Ritz value, two for a complex pair); its residual
    in the operator, from ``A V_m = V_m H_m + h_{m+1,m} v_{m+1} e_m^T`` without a product,

        ``||A V Y - V Y (Y^T H Y)||^2 = ||H Y - Y (Y^T H Y)||^2 + h_{m+1,m}^2 ||e_m^T Y||^2``,

    says whether that Ritz value has converged (to an eigenvalue of the operator; the Krylov
    space could still miss one of larger modulus). A member keeps the estimate of the first
    stage whose residual met ``tol`` (so, up to rounding, its result does not depend on the
    other members); the next stage runs only while some member's residual is above ``tol``
    (``tol=0`` runs every stage unless every member's space became invariant). Under
    ``jax.vmap`` the stage conditions become selects: every stage runs. Each stage
    orthogonalises against the basis built so far only, so an early stop saves the products
    and the Gram–Schmidt work of the later stages; the first stage re-orthogonalises every
    column (CGS2), later ones where the DGKS criterion asks for it. A single stage is plain
    ``stages[0]``-step Arnoldi.

    Args:
      matvec: the operator, batched over leading axes.
      v0: start vectors ``(..., n)`` (normalised here).
      stages: Krylov dimensions at which to check, increasing (static).
      project: optional projection applied after each product (for example onto zero-sum
        vectors, to keep the iteration in an invariant subspace despite rounding).
      tol: residual at which a member counts as converged.
      skip: optional ``(...)`` flags of members whose estimate is not wanted (exact or
        invalid elsewhere): they count as converged after the first stage, so they do not
        keep their batch growing; their results are meaningless.

    Returns:
      A :class:`Radius`. A breakdown (invariant subspace found) leaves zero columns and a
      residual at rounding level, never NaN.
    """
    dtype = v0.dtype
    tiny = jnp.finfo(dtype).tiny * 1e4
    m_max = stages[-1]
    beta = _norm(v0)
    batch = v0.shape[:-1]
    basis = jnp.zeros((*batch, m_max + 1, v0.shape[-1]), dtype)
    basis = basis.at[..., 0, :].set(_safe_div(v0, beta, tiny))
    hess = jnp.zeros((*batch, m_max + 1, m_max), dtype)
    scale = jnp.zeros(batch, dtype)

    # the first stage re-orthogonalises every column (cheap for a short basis, and exactly
    # plain Arnoldi when there is one stage); later stages only where DGKS asks for it
    def grow(lo, hi, basis, hess, scale):
        ortho = _orthogonalize if lo == 0 else _orthogonalize_dgks

        def body(k, carry):
            basis, hess, scale = carry
            v, h, hn, scale = _arnoldi_column(
                matvec, basis[..., : hi + 1, :], k, scale, tiny, ortho=ortho, project=project
            )
            hess = hess.at[..., : hi + 1, k].set(h.at[..., k + 1].set(hn))
            basis = basis.at[..., k + 1, :].set(v)
            return basis, hess, scale

        return jax.lax.fori_loop(lo, hi, body, (basis, hess, scale))

    def stage(lo, hi, carry):
        basis, hess, scale, value, res, steps = carry
        basis, hess, scale = grow(lo, hi, basis, hess, scale)
        h = hess[..., :hi, :hi]
        new_value, power = spectral_radius(h, return_power=True)
        new_res = _ritz_residual(h, power, hess[..., hi, hi - 1])
        # a member keeps the estimate of the first stage that met tol, so (up to rounding) its
        # result does not depend on the other members of its batch
        if skip is not None:
            new_res = jnp.where(skip, 0.0, new_res)
        done = res <= tol
        value = jnp.where(done, value, new_value)
        res = jnp.where(done, res, new_res)
        steps = jnp.where(done, steps, hi)
        return basis, hess, scale, value, res, steps

    inf = jnp.full(batch, jnp.inf, dtype)
    carry = (basis, hess, scale, inf, inf, jnp.zeros(batch, jnp.int32))
    carry = stage(0, stages[0], carry)
    for lo, hi in itertools.pairwise(stages):
        more = jnp.any(~(carry[4] <= tol))
        carry = jax.lax.cond(more, functools.partial(stage, lo, hi), lambda c: c, carry)
    *_, value, res, steps = carry
    return Radius(value, res, steps)


def _ritz_residual(h, power, h_next):
    """Residual of the dominant Ritz subspace of ``h`` ``(..., m, m)`` spanned by the columns
    of ``power`` (a normalised high power of ``h``), given ``h_{m+1,m}`` (see
    :func:`arnoldi_radius`). Written with elementwise products and sums, no dot ops: it is
    compiled once per stage, and each small dot added about a tenth of a second of XLA
    compilation there."""
    m = h.shape[-1]
    tiny = jnp.finfo(h.dtype).tiny * 1e4
    cols = jnp.sum(power * power, axis=-2)
    pick = jax.nn.one_hot(jnp.argmax(cols, axis=-1), m, dtype=h.dtype)
    u = jnp.sum(power * pick[..., None, :], axis=-1)  # the column of largest norm
    u = _safe_div(u, _norm(u), tiny)
    w = jnp.sum(h * u[..., None, :], axis=-1)  # H u
    w2 = w - _dot(u, w)[..., None] * u
    w2 = w2 - _dot(u, w2)[..., None] * u
    nw = _norm(w2)
    # a complex pair: the dominant subspace is span{u, H u}; a real Ritz value: u alone
    pair = nw > 1e-4 * jnp.maximum(_norm(w), tiny)
    u2 = jnp.where(pair[..., None], _safe_div(w2, nw, tiny), 0.0)
    z = jnp.sum(h * u2[..., None, :], axis=-1)  # H u2
    # columns of H Y - Y (Y^T H Y), Y = [u, u2]
    c1 = w - _dot(u, w)[..., None] * u - _dot(u2, w)[..., None] * u2
    c2 = z - _dot(u, z)[..., None] * u - _dot(u2, z)[..., None] * u2
    inner = jnp.sum(c1 * c1, axis=-1) + jnp.sum(c2 * c2, axis=-1)
    last = u[..., m - 1] ** 2 + u2[..., m - 1] ** 2
    res = jnp.sqrt(inner + h_next * h_next * last)
    # a power that collapsed to 0 (H numerically nilpotent) spans nothing: no certificate
    # beyond |h_{m+1,m}| (0 only where the Krylov space is invariant)
    return jnp.where(cols.max(-1) > 0, res, jnp.abs(h_next))


def gmres_cycle(matvec: MatVec, r: jax.Array, *, steps: int, rtol: float):
    """One GMRES cycle from zero for ``M d = r``, ending early when every member is done.

    Arnoldi (CGS2) with Givens rotations applied as the Hessenberg matrix grows, so the
    residual estimate ``|g_{k+1}| / ||r||`` of every member is known after each product; the
    cycle stops when all estimates are at most ``rtol`` or after ``steps`` products (static
    bound). Plain JAX ops only (no LAPACK), so it lowers on every backend.

    Returns:
      ``(d, est, k)``: the correction ``(..., n)``, each member's relative residual estimate
      ``(...)`` and the number of products used.
    """
    dtype = r.dtype
    tiny = jnp.finfo(dtype).tiny * 1e4
    m = steps
    beta = _norm(r)
    basis = jnp.zeros((*r.shape[:-1], m + 1, r.shape[-1]), dtype)
    basis = basis.at[..., 0, :].set(_safe_div(r, beta, tiny))
    rmat = jnp.zeros((*r.shape[:-1], m, m), dtype)  # rotated Hessenberg, upper triangular
    cs = jnp.zeros((*r.shape[:-1], m), dtype)
    sn = jnp.zeros((*r.shape[:-1], m), dtype)
    g = jnp.zeros((*r.shape[:-1], m + 1), dtype).at[..., 0].set(beta)
    scale = jnp.zeros(r.shape[:-1], dtype)
    est0 = jnp.where(beta > tiny, 1.0, 0.0).astype(dtype)

    def cond(state):
        k, *_, est = state
        return (k < m) & jnp.any(est > rtol)

    def body(state):
        k, basis, rmat, cs, sn, g, scale, _ = state
        v, h, hn, scale = _arnoldi_column(matvec, basis, k, scale, tiny)
        basis = basis.at[..., k + 1, :].set(v)
        col = h[..., :m]  # entries 0..k are live (the rest are zero)

        def rot(i, col):
            a, b = col[..., i], col[..., i + 1]
            c, s_ = cs[..., i], sn[..., i]
            return col.at[..., i].set(c * a + s_ * b).at[..., i + 1].set(c * b - s_ * a)

        col = jnp.concatenate([col, jnp.zeros((*col.shape[:-1], 1), dtype)], axis=-1)
        col = col.at[..., k + 1].set(hn)
        col = jax.lax.fori_loop(0, k, rot, col)
        x, y = col[..., k], col[..., k + 1]
        rr = jnp.sqrt(x * x + y * y)
        ok = rr > tiny
        c = jnp.where(ok, x / jnp.where(ok, rr, 1.0), 1.0)
        s_ = jnp.where(ok, y / jnp.where(ok, rr, 1.0), 0.0)
        col = col.at[..., k].set(c * x + s_ * y).at[..., k + 1].set(0.0)
        cs = cs.at[..., k].set(c)
        sn = sn.at[..., k].set(s_)
        rmat = rmat.at[..., :, k].set(col[..., :m])
        gk = g[..., k]
        g = g.at[..., k].set(c * gk).at[..., k + 1].set(-s_ * gk)
        est = jnp.abs(g[..., k + 1]) / jnp.maximum(beta, tiny)
        return k + 1, basis, rmat, cs, sn, g, scale, est

    state = (jnp.asarray(0, jnp.int32), basis, rmat, cs, sn, g, scale, est0)
    k, basis, rmat, _, _, g, _, est = jax.lax.while_loop(cond, body, state)
    diag = jnp.abs(jnp.diagonal(rmat, axis1=-2, axis2=-1))
    live = jnp.broadcast_to(jnp.arange(m) < k, diag.shape)
    small = ~live | (diag <= 1e-7 * jnp.maximum(jnp.max(diag, axis=-1, keepdims=True), tiny))

    def back(i, y):
        j = m - 1 - i
        acc = g[..., j] - jnp.sum(rmat[..., j, :] * y, axis=-1)
        piv = rmat[..., j, j]
        yj = jnp.where(small[..., j], 0.0, acc / jnp.where(small[..., j], 1.0, piv))
        return y.at[..., j].set(yj)

    y = jax.lax.fori_loop(0, m, back, jnp.zeros((*r.shape[:-1], m), dtype))
    d = jnp.einsum("...kn,...k->...n", basis[..., :-1, :], y, precision=HIGHEST)
    return d, est, k


class Refined(NamedTuple):
    """Result of :func:`refined_gmres`."""

    x: jax.Array  #: the solution ``(..., n)``
    residual: jax.Array  #: ``||b - M x||_1`` with the accurate product, per member
    steps: jax.Array  #: products with the fast operator (all members together)
    converged: jax.Array  #: per member: threshold met, or refinement at the rounding floor


def refined_gmres(
    fast: MatVec,
    residual: MatVec,
    b: jax.Array,
    *,
    threshold: jax.Array,
    restart: int = 20,
    inner_rtol: float = 1e-4,
    max_refinements: int = 8,
) -> Refined:
    """GMRES with iterative refinement: ``M x = b`` to the accuracy of the residual.

    Each refinement computes the true residual ``r = b - M x`` with ``residual`` (``x -> b - M
    x``, computed more accurately than the fast product: in double-float for the stationary
    solver), then solves ``M d = r`` with one :func:`gmres_cycle` of the ``fast`` product (at most
    ``restart`` products, ending early at relative residual ``inner_rtol``) and adds ``d``.
    A member stops when ``||r||_1 <= threshold`` (converged), or when a refinement reduced
    its residual by less than a tenth of what the inner solve promised (the residual is at its
    rounding floor: converged as far as float arithmetic allows), or after
    ``max_refinements`` (not converged). A correction is kept unless it more than doubles the
    residual (at the rounding floor the residual is noise, and a correction that does not
    lower it still lowers the error).
    A member whose every correction was refused (a non-finite or diverging first step: a
    broken operator, such as logits that overflow) returns NaN, not the zero start.

    Why: a stopping rule on the residual alone is not enough when ``M`` is ill-conditioned
    (nearly reducible chains): the float32 product ``A^T x`` errs along slow directions, which
    the inverse amplifies; refinement with an accurate residual removes that error, down to
    the accuracy of the residual itself.
    """
    x0 = jnp.zeros_like(b)
    r0 = b  # the residual of x = 0 needs no product
    n0 = jnp.sum(jnp.abs(r0), axis=-1)
    noise = 8 * jnp.finfo(b.dtype).eps * n0  # rounding level of an accurate residual
    active0 = ~(n0 <= threshold)

    def cond(state):
        it, *_, active, _, _ = state
        return (it < max_refinements) & jnp.any(active)

    def body(state):
        it, x, r, nres, steps, active, conv, accepted = state
        d, est, k = gmres_cycle(fast, r, steps=restart, rtol=inner_rtol)
        x_new = x + d
        r_new = residual(x_new)
        n_new = jnp.sum(jnp.abs(r_new), axis=-1)
        # accept unless the step diverged: at the rounding floor the residual is noise, and a
        # correction that does not lower it can still lower the error
        ok = jnp.isfinite(n_new) & ((n_new <= 2.0 * nres) | (n_new <= noise))
        keep = active & ok
        accepted = accepted | keep
        x = jnp.where(keep[..., None], x_new, x)
        r = jnp.where(keep[..., None], r_new, r)
        nres_next = jnp.where(keep, n_new, nres)
        met = nres_next <= threshold
        # a refinement that gained less than a tenth of what GMRES promised: rounding floor
        floor = n_new > 10.0 * jnp.maximum(est, inner_rtol) * nres
        stop = active & (met | floor | ~ok)
        conv = jnp.where(stop, met | (floor & ok), conv)
        active = active & ~stop
        return it + 1, x, r, nres_next, steps + k, active, conv, accepted

    state = (
        jnp.asarray(0, jnp.int32),
        x0,
        r0,
        n0,
        jnp.asarray(0, jnp.int32),
        active0,
        ~active0,
        ~active0,
    )
    _, x, _, nres, steps, active, conv, accepted = jax.lax.while_loop(cond, body, state)
    # no correction ever accepted (the first one non-finite or diverging: a broken operator,
    # e.g. logits that overflow): x is still 0, which a caller would normalise to a plausible
    # uniform answer; NaN instead
    x = jnp.where(accepted[..., None], x, jnp.nan)
    return Refined(x, nres, steps, conv & ~active)


def spectral_radius(mat: jax.Array, *, squarings: int = 24, return_power: bool = False):
    r"""Spectral radius of small square matrices by Gelfand's formula with matmuls only.

    :math:`\rho(H) = \lim_k \|H^k\|^{1/k}`; ``squarings`` normalised squarings give
    :math:`k = 2^{s}`, with relative error about :math:`\log(\kappa) / 2^{s}`. Runs on any
    backend (no eigendecomposition). With ``return_power=True`` also returns the last
    normalised power :math:`H^{2^s} / \|H^{2^s}\|`, whose columns span the dominant invariant
    subspace of ``H`` (of the eigenvalues of largest modulus).
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

    b, log_rho = jax.lax.fori_loop(0, squarings, body, (b, log_rho))
    return (jnp.exp(log_rho), b) if return_power else jnp.exp(log_rho)
