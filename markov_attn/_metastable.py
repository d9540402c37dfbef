"""Metastable states: the dominant invariant subspace of a chain and G-PCCA memberships.

Everything on the default path is matmuls, Householder reflections and fixed-size loops in
plain ``jax.numpy``: no LAPACK call, no host callback, no nonsymmetric eigensolver, so it
lowers for CPU, GPU and TPU alike.
"""

import functools
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Complex, Float, Int

from ._typing import ChainLike, DistLike, PerMatrix
from ._util import (
    HIGHEST,
    as_chain,
    check_choice,
    check_count,
    check_square,
    check_values,
    invalid_dists,
    invalid_matrices,
    is_concrete,
    map_over_batch,
    poison,
    safe_normalize,
)

#: Products with the chain between two orthonormalisations (and Schur–Rayleigh–Ritz steps).
RR_EVERY = 5
#: Each reordering of the small projected matrix ``H`` takes ``RR_ROUNDS`` QR factorisations
#: of ``H^(2^RR_SQUARINGS)``: as many unshifted QR steps as ``RR_ROUNDS * 2^RR_SQUARINGS``.
RR_ROUNDS = 2
RR_SQUARINGS = 3
#: A member whose residual, extrapolated at its rate over the last ``STALL_ROUNDS`` rounds,
#: would still exceed ``max(STALL_SLACK * tol, STALL_FLOOR)`` when ``iters`` runs out stops
#: holding its batch (checked every ``STALL_ROUNDS`` rounds from round ``2 * STALL_ROUNDS``,
#: i.e. from 72 products on). The floor keeps a tiny ``tol`` from cutting converging members.
STALL_ROUNDS = 6
STALL_SLACK = 10.0
STALL_FLOOR = 1e-4
#: ... or whose best residual fell by less than this factor over those rounds (no progress,
#: e.g. at the floor that float rounding sets) while still above ``tol``.
STALL_PROGRESS = 0.9
#: Default range searched when ``metastable_states(k=None)`` picks the number of states.
K_RANGE = (2, 10)


def _mm(a, b):
    return jnp.matmul(a, b, precision=HIGHEST)


def _t(a):
    return jnp.swapaxes(a, -1, -2)


def _col(x, j):
    return jax.lax.dynamic_index_in_dim(x, j, axis=x.ndim - 1, keepdims=False)


def _reflect(v, x):
    """``(I - 2 v v^T) x`` for unit (or zero) ``v`` ``(..., m)`` and ``x`` ``(..., m, p)``."""
    return (
        x
        - 2.0
        * v[..., :, None]
        * jnp.einsum("...m,...mp->...p", v, x, precision=HIGHEST)[..., None, :]
    )


def _qr(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Thin QR of ``(..., m, p)`` (``m >= p``) by Householder reflections, ``diag(R) >= 0``.

    Plain jnp in a loop over columns, so it lowers everywhere, compiles once whatever ``p``,
    and avoids jaxlib's batched CPU LAPACK kernels. A rank-deficient ``x`` still gives an
    orthonormal ``Q``.
    """
    m, p = x.shape[-2:]
    tiny = jnp.finfo(x.dtype).tiny * 1e4
    rows = jnp.arange(m)

    def forward(j, carry):
        r, vs = carry
        col = jnp.where(rows >= j, _col(r, j), 0.0)
        alpha = jnp.sqrt(jnp.sum(col * col, axis=-1))
        head = jnp.sum(jnp.where(rows == j, col, 0.0), axis=-1)
        sign = jnp.where(head >= 0, 1.0, -1.0).astype(x.dtype)
        v = col + jnp.where(rows == j, (sign * alpha)[..., None], 0.0)
        vn = jnp.sqrt(jnp.sum(v * v, axis=-1))
        ok = vn > tiny
        v = jnp.where(ok[..., None], v / jnp.where(ok, vn, 1.0)[..., None], 0.0)
        vs = jax.lax.dynamic_update_index_in_dim(vs, v, j, axis=vs.ndim - 2)
        return _reflect(v, r), vs

    vs = jnp.zeros((*x.shape[:-2], p, m), x.dtype)
    r, vs = jax.lax.fori_loop(0, p, forward, (x, vs))

    def backward(i, q):
        v = jax.lax.dynamic_index_in_dim(vs, p - 1 - i, axis=vs.ndim - 2, keepdims=False)
        return _reflect(v, q)

    q = jax.lax.fori_loop(0, p, backward, jnp.broadcast_to(jnp.eye(m, p, dtype=x.dtype), x.shape))
    r = r[..., :p, :]
    s = jnp.where(jnp.diagonal(r, axis1=-2, axis2=-1) < 0, -1.0, 1.0).astype(x.dtype)
    return q * s[..., None, :], r * s[..., :, None]


def _small_inverse(m: jax.Array) -> jax.Array:
    """Inverse of small ``(..., k, k)`` matrices: Householder QR and back substitution (a
    near-singular pivot is floored at ``eps`` times the largest entry of ``R``)."""
    k = m.shape[-1]
    q, r = _qr(m)
    b = _t(q)
    scale = jnp.max(jnp.abs(r), axis=(-2, -1))
    floor = jnp.finfo(m.dtype).eps * jnp.maximum(scale, jnp.finfo(m.dtype).tiny)

    def back(i, y):
        row = k - 1 - i
        ri = jax.lax.dynamic_index_in_dim(r, row, axis=r.ndim - 2, keepdims=False)
        bi = jax.lax.dynamic_index_in_dim(b, row, axis=b.ndim - 2, keepdims=False)
        acc = bi - jnp.einsum("...j,...jm->...m", ri, y, precision=HIGHEST)
        piv = _col(ri, row)
        piv = jnp.where(jnp.abs(piv) > floor, piv, jnp.where(piv < 0, -floor, floor))
        return jax.lax.dynamic_update_index_in_dim(y, acc / piv[..., None], row, axis=y.ndim - 2)

    return jax.lax.fori_loop(0, k, back, jnp.zeros_like(b))


def _order_by_modulus(h: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``U`` orthogonal with ``U^T H U = T`` whose diagonal blocks tend to decreasing modulus
    (complex pairs stay 2x2 blocks): unshifted QR iteration, ``2^RR_SQUARINGS`` steps at a
    time as the QR factorisation of the normalised power ``H^(2^RR_SQUARINGS)`` (the product
    of ``m`` QR steps' ``Q`` factors is the ``Q`` factor of ``H^m``)."""
    u = jnp.broadcast_to(jnp.eye(h.shape[-1], dtype=h.dtype), h.shape)

    def power(t):
        for _ in range(RR_SQUARINGS):
            t = _mm(t, t)
            t = t / jnp.maximum(jnp.max(jnp.abs(t), axis=(-2, -1), keepdims=True), 1e-30)
        return t

    def body(_, carry):
        t, u = carry
        q, _ = _qr(power(t))
        return _mm(_t(q), _mm(t, q)), _mm(u, q)

    return jax.lax.fori_loop(0, RR_ROUNDS, body, (h, u))


def _ritz_values(t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Eigenvalues of a (nearly) block upper triangular ``(..., p, p)`` matrix from its 1x1
    and 2x2 diagonal blocks, and ``(..., p)`` flags: position ``i`` starts a complex 2x2 block.

    A 2x2 block is where the subdiagonal entry is above ``1e-5`` of the matrix scale (blocks
    taken greedily from the top); its eigenvalues are ``tr/2 ± sqrt(tr^2/4 - det)``, complex
    when the discriminant is negative.
    """
    scale = jnp.max(jnp.abs(t), axis=(-2, -1))
    diag = jnp.diagonal(t, axis1=-2, axis2=-1)
    a, d = diag[..., :-1], diag[..., 1:]
    b = jnp.diagonal(t, offset=1, axis1=-2, axis2=-1)
    c = jnp.diagonal(t, offset=-1, axis1=-2, axis2=-1)
    coupled = jnp.abs(c) > 1e-5 * scale[..., None]

    def greedy(prev, cpl):
        start = cpl & ~prev
        return start, start

    _, start = jax.lax.scan(greedy, jnp.zeros(t.shape[:-2], bool), jnp.moveaxis(coupled, -1, 0))
    start = jnp.moveaxis(start, 0, -1)  # (..., p - 1): a block covers i, i + 1
    half = 0.5 * (a + d)
    disc = 0.25 * (a - d) ** 2 + b * c
    root = jnp.sqrt(jnp.abs(disc))
    cplx = start & (disc < 0)
    pad = jnp.zeros((*t.shape[:-2], 1), bool)
    zero = jnp.zeros((*t.shape[:-2], 1), t.dtype)
    first = jnp.concatenate([start, pad], axis=-1)  # position i opens a block
    second = jnp.concatenate([pad, start], axis=-1)  # position i closes one
    cfirst = jnp.concatenate([cplx, pad], axis=-1)
    csecond = jnp.concatenate([pad, cplx], axis=-1)
    half_f, root_f = jnp.concatenate([half, zero], -1), jnp.concatenate([root, zero], -1)
    half_s, root_s = jnp.concatenate([zero, half], -1), jnp.concatenate([zero, root], -1)
    re = jnp.where(first, jnp.where(cfirst, half_f, half_f + root_f), diag)
    re = jnp.where(second, jnp.where(csecond, half_s, half_s - root_s), re)
    im = jnp.where(cfirst, root_f, 0.0) - jnp.where(csecond, root_s, 0.0)
    return jax.lax.complex(re, im), cfirst


#: Shifted QR steps per eigenvalue in :func:`_small_eigvals`, every ``EXCEPTIONAL``-th of
#: them with an exceptional shift.
EIG_STEPS = 24
EXCEPTIONAL = 8


def _complex_qr(x: jax.Array, m) -> tuple[jax.Array, jax.Array]:
    """``Q R = x`` for the leading ``m x m`` block of small complex ``(..., p, p)`` matrices
    (``x`` zero outside it; ``m`` may be traced) by Householder reflections, one loop over the
    columns (a program whose size does not depend on ``p``): ``Q`` is unitary even where the
    block is singular, and the identity outside the block."""
    p = x.shape[-1]
    rows = jnp.arange(p).reshape((1,) * (x.ndim - 2) + (p,))
    tiny = jnp.finfo(jnp.float32).tiny * 1e4
    r = x
    q = jnp.broadcast_to(jnp.eye(p, dtype=x.dtype), x.shape)

    def reflect(j, carry):
        r, q = carry
        col = jnp.where((rows >= j) & (rows < m), jnp.take(r, j, axis=-1), 0.0)
        nrm = jnp.sqrt(jnp.sum(jnp.abs(col) ** 2, axis=-1))
        head = jnp.sum(jnp.where(rows == j, col, 0.0), axis=-1)
        mag = jnp.abs(head)
        phase = jnp.where(mag > 0, head / jnp.where(mag > 0, mag, 1.0), 1.0)
        v = col + jnp.where(rows == j, (phase * nrm)[..., None], 0.0)
        vn = jnp.sqrt(jnp.sum(jnp.abs(v) ** 2, axis=-1))
        ok = (vn > tiny) & (j < m - 1)  # columns at and past the block's last: no reflection
        v = jnp.where(ok[..., None], v / jnp.where(ok, vn, 1.0)[..., None], 0.0)
        r = r - 2.0 * v[..., :, None] * jnp.einsum("...i,...ij->...j", jnp.conj(v), r)[..., None, :]
        q = q - 2.0 * jnp.einsum("...ij,...j->...i", q, v)[..., :, None] * jnp.conj(v)[..., None, :]
        return r, q

    # static bounds (a traced m would make it a while loop, which has no reverse-mode
    # derivative: jax.grad of the eigenvalues failed)
    r, q = jax.lax.fori_loop(0, p - 1, reflect, (r, q))
    return q, r


def _small_eigvals(t: jax.Array, locked: int = 0) -> jax.Array:
    """Eigenvalues ``(..., p)`` (complex, decreasing modulus, a conjugate pair with the
    positive imaginary part first) of small real ``(..., p, p)`` matrices.

    The complex shifted QR iteration with Wilkinson shifts (an exceptional one every
    ``EXCEPTIONAL``-th step), ``EIG_STEPS`` steps per eigenvalue, deflating the trailing one
    and going on with the leading block: one loop over the block size with the block masked, so
    the program does not grow with ``p`` (Householder QR: no LAPACK, it lowers everywhere). The
    first ``locked`` diagonal entries are taken as eigenvalues as they are (the caller knows
    their columns are invariant, as the constant vector's is: the iteration would only add
    rounding to them, ~1e-6 at λ1 = 1). Reading the eigenvalues off the diagonal blocks of the
    unshifted QR iteration's reordering (:func:`_order_by_modulus`) left errors of 3.5e-3 and
    an order out of sequence where moduli nearly tie (differences ~1e-3): its subdiagonal there
    was still 5e-3 while the subspace had converged.
    """
    dtype = jnp.result_type(t.dtype, jnp.complex64)
    head = [t[..., i, i].astype(dtype) for i in range(locked)]
    b = t[..., locked:, locked:].astype(dtype)
    q = b.shape[-1]
    if q:
        idx = jnp.arange(q)
        eye = jnp.broadcast_to(jnp.eye(q, dtype=dtype), b.shape)

        def deflate(d, carry):
            b, ev = carry
            m = q - d  # the active leading block
            live = (idx[:, None] < m) & (idx[None, :] < m)
            live = live.reshape((1,) * (b.ndim - 2) + (q, q))

            def step(i, b):
                w, x = b[..., m - 2, m - 2], b[..., m - 2, m - 1]
                y, z = b[..., m - 1, m - 2], b[..., m - 1, m - 1]
                half = 0.5 * (w + z)
                root = jnp.sqrt(0.25 * (w - z) ** 2 + x * y)
                mu1, mu2 = half + root, half - root
                mu = jnp.where(jnp.abs(mu1 - z) <= jnp.abs(mu2 - z), mu1, mu2)
                # an exceptional shift now and then breaks the cycles Wilkinson's can fall in
                off = jnp.sum(jnp.where(idx < m - 1, jnp.abs(b[..., m - 1, :]), 0.0), axis=-1)
                mu = jnp.where(i % EXCEPTIONAL == EXCEPTIONAL - 1, z + (0.75 + 0.5j) * off, mu)
                shift = mu[..., None, None] * eye
                qm, r = _complex_qr(jnp.where(live, b - shift, 0.0), m)
                return jnp.where(live, jnp.matmul(r, qm, precision=HIGHEST) + shift, b)

            b = jax.lax.fori_loop(0, EIG_STEPS, step, b)
            return b, ev.at[..., m - 1].set(b[..., m - 1, m - 1])

        ev = jnp.zeros(b.shape[:-1], dtype)
        b, ev = jax.lax.fori_loop(0, q - 1, deflate, (b, ev))
        ev = ev.at[..., 0].set(b[..., 0, 0])
        head.append(ev)
    ev = jnp.concatenate([h[..., None] if h.ndim == t.ndim - 2 else h for h in head], axis=-1)
    # the eigenvalues of a real matrix come in conjugate pairs, which the complex iteration
    # rounds apart (~1e-5): average each with the conjugate of its nearest conjugate, so that
    # pairs are exact conjugates (and real eigenvalues real), then sort by decreasing modulus
    # with the positive imaginary part first within a pair
    dist = jnp.abs(ev[..., :, None] - jnp.conj(ev)[..., None, :])
    partner = jnp.take_along_axis(ev, jnp.argmin(dist, axis=-1), axis=-1)
    ev = 0.5 * (ev + jnp.conj(partner))
    order = jnp.lexsort((-ev.imag, -jnp.abs(ev)), axis=-1)
    return jnp.take_along_axis(ev, order, axis=-1)


def _start_basis(n: int, p: int) -> np.ndarray:
    """``[1/sqrt(n), generic columns]`` orthonormalised, a trace-time constant (fixed seed:
    reproducible)."""
    x = np.random.default_rng(0).standard_normal((n, p))
    x[:, 0] = 1.0
    q, r = np.linalg.qr(x)
    return q * np.where(np.diagonal(r) < 0, -1.0, 1.0)


def _leading_residuals(v, w, t):
    """``(..., p)``: entry ``j - 1`` is ``||A V_j - V_j T_jj||_F`` for the leading ``j`` columns,
    from ``W = A V`` and ``T = V^T W`` (the part of ``W`` outside ``span V`` is orthogonal to it,
    the part inside is the block of ``T`` below the leading one)."""
    p = t.shape[-1]
    outside = jnp.sum((w - _mm(v, t)) ** 2, axis=-2)  # per column
    idx = jnp.arange(p)
    size = idx[:, None, None] + 1  # block size j = 1..p
    mask = (idx[None, None, :] < size) & (idx[None, :, None] >= size)  # (j, row, col)
    below = jnp.einsum("jrc,...rc->...j", mask.astype(t.dtype), t * t, precision=HIGHEST)
    inside = jnp.cumsum(outside, axis=-1)
    return jnp.sqrt(inside + below)


def _gap_choice(xp, eigenvalues, cuts, lo, hi, skip_cuts=True):
    """The ``k`` in ``[lo, hi]`` with the largest batch-mean modulus gap: ``xp`` is NumPy on the
    host (:func:`choose_k`) or ``jax.numpy`` inside the iteration (:func:`_stack_k`).

    A ``k`` that cuts a complex pair of a matrix has a zero gap there (the pair's two
    eigenvalues share one modulus). With ``skip_cuts`` such a ``k`` is also ruled out when it
    cuts a pair of any matrix (unless every ``k`` does): the rule for ``split="raise"``, where a
    cut is an error. Without it the gaps decide, except that a ``k`` which cuts a pair of
    every matrix is ruled out (unless every ``k`` does): the rule for ``split="nan"``, where a
    cut matrix gets NaN and the others keep their states (on a stack of metastable and
    near-circulant heads the skipping rule is left with the odd ``k``, whose gaps are all at
    the level of noise). The exception matters where the gaps are noise: the moduli are
    sorted for the gaps, while ``cuts`` are by position in the (partly converged) Schur order,
    so on a chain with no gap (a nearly rank-one chain, whose Ritz values past the first are
    rounding noise) the largest noise gap could fall on a cut and leave every matrix NaN."""
    return lo + xp.argmax(_gaps(xp, eigenvalues, cuts, lo, hi, skip_cuts))


def _member_gaps(xp, eigenvalues, lo, hi):
    r"""``(members, hi - lo + 1)``: each matrix's modulus gaps :math:`|\lambda_k| -
    |\lambda_{k+1}|` for ``k = lo..hi`` (moduli sorted, the batch flattened)."""
    mod = xp.sort(xp.abs(eigenvalues), axis=-1)[..., ::-1]
    mod = mod.reshape(-1, mod.shape[-1])
    return mod[:, lo - 1 : hi] - mod[:, lo : hi + 1]


def _gaps(xp, eigenvalues, cuts, lo, hi, skip_cuts=True):
    """The batch-mean modulus gaps of :func:`_gap_choice` for ``k = lo..hi``, ``-inf`` for a
    ``k`` its rule rules out."""
    gaps = xp.nanmean(_member_gaps(xp, eigenvalues, lo, hi), axis=0)
    if cuts is not None:
        cut = cuts.reshape(-1, eigenvalues.shape[-1])[:, lo - 1 : hi]
        cut = cut.any(axis=0) if skip_cuts else cut.all(axis=0)
        gaps = xp.where(cut & ~cut.all(), -xp.inf, gaps)
    return gaps


class UnresolvedGapWarning(UserWarning):
    """``metastable_states(k=None)`` chose a ``k`` whose gap does not stand out from another
    candidate's within the uncertainty of the Ritz moduli (a chain with no clear gap)."""


def _unresolved_choice(eigenvalues, cuts, lead, lo, hi, skip_cuts, k):
    """``None`` when the gap at the chosen ``k`` stands out in at least one matrix of the batch,
    else ``(runner_up, its gap, the chosen gap, its uncertainty)``, batch means (host-side,
    NumPy).

    The gap at ``k`` reads the ``(k + 1)``-th Ritz modulus, which is an eigenvalue of a matrix
    within the residual of the leading ``k + 1`` columns (``k + 2`` where a complex pair starts
    there) of the ordered basis, ``lead`` ``(..., p)``; past the subspace the iteration
    converged those residuals are large. In one matrix the choice stands out when its gap at
    ``k`` less that residual exceeds its gap at every other candidate plus the residual there
    (a NaN one counts as unknown: a tie). Per matrix, so that a stack whose metastable heads
    have a clear gap at ``k`` while its diffuse heads have none is not flagged. A heuristic for
    non-normal chains, whose eigenvalues can move by more than the residual.
    """
    p = lead.shape[-1]
    lead = lead.reshape(-1, p)
    gap = _member_gaps(np, eigenvalues, lo, hi)  # (members, candidates k = lo..hi)
    starts = np.zeros_like(lead, bool) if cuts is None else cuts.reshape(-1, p)
    ks = np.arange(lo, hi + 1)
    idx = np.minimum(np.where(starts[:, ks], ks + 1, ks), p - 1)
    unc = np.take_along_axis(lead, idx, axis=1)
    c = k - lo
    rivals = np.where(np.isnan(gap + unc), np.inf, gap + unc)
    ruled_out = ~np.isfinite(_gaps(np, eigenvalues, cuts, lo, hi, skip_cuts))  # the k rule's
    rivals[:, ruled_out] = -np.inf
    rivals[:, c] = -np.inf
    # a gap must also stand out from zero (with no rival left, e.g. a narrow k_range or the
    # others ruled out, a gap of 1e-6 with an uncertainty near 1 passed silently: review)
    if np.any(gap[:, c] - unc[:, c] > np.maximum(rivals.max(axis=1), 0.0)):
        return None
    with warnings.catch_warnings():  # a candidate no member has: NaN means
        warnings.simplefilter("ignore", RuntimeWarning)
        mean_gap, mean_unc = np.nanmean(gap, axis=0), np.nanmean(unc, axis=0)
    others = np.where(np.arange(len(ks)) != c, np.nan_to_num(mean_gap, nan=-np.inf), -np.inf)
    others[ruled_out] = -np.inf
    j = int(np.argmax(others))
    if not np.isfinite(others[j]):  # no rival: the gap does not stand out from zero
        return None, 0.0, float(mean_gap[c]), float(mean_unc[c])
    return int(ks[j]), float(mean_gap[j]), float(mean_gap[c]), float(mean_unc[c])


def _stack_k(t, ks):
    """The ``k`` that :func:`choose_k` would pick from the current Ritz values of the whole batch
    ``t`` ``(..., p, p)`` (a traced int32 scalar), by the same rule;
    ``ks = (lo, hi, skip_cuts)``."""
    ritz, starts = _ritz_values(t)
    return _gap_choice(jnp, ritz, starts, *ks).astype(jnp.int32)


def _deflate_constant(y):
    """``y`` ``(..., n, p)`` with the mean of each column but the first removed: column 0 of the
    basis is the constant vector (``A 1 = 1``), the others stay zero-sum, so the iteration runs
    on the compression of ``A`` onto zero-sum vectors (the same invariant subspaces). Without
    it each product adds a large constant component to the other columns (``A`` is not doubly
    stochastic) while their own parts shrink like ``λ^RR_EVERY``; the QR then cancels it in
    float32, which left fast-mixing chains (|λ2| ~ 0.1) a subspace error of ~1e-2 that no
    number of products reduced (found by review)."""
    rest = y[..., 1:]
    return jnp.concatenate([y[..., :1], rest - jnp.mean(rest, axis=-2, keepdims=True)], -1)


def _iterate(a, p, iters, tol, ks):
    """Block orthogonal iteration with Schur–Rayleigh–Ritz reordering on ``a`` ``(..., n, n)``.

    Each round: ``RR_EVERY`` products, a QR, one more product and the reordering of
    ``V^T A V``. Returns the ``(..., n, p)`` basis, the ``(..., p, p)`` reordered projection and
    the number of products. The residual is that of the leading ``k`` columns, with ``k`` fixed
    (``ks = (k, k, _)``) or, for ``ks = (lo, hi, skip_cuts)``, the one ``k`` that
    :func:`choose_k` would pick for the whole batch (chunk) from the current Ritz values, the ``k``
    that ``metastable_states(k=None)`` will use (a per-member best-gap ``k`` made a member that
    converges slowly at its own ``k`` hold the batch to ``iters`` although that ``k`` was not
    the one chosen). Stops early when every member has converged (residual at most
    ``tol``) or stalled: every ``STALL_ROUNDS`` rounds, a member whose best residual so far,
    extrapolated at its geometric rate over the last ``STALL_ROUNDS`` rounds to the end of the
    budget, would still exceed ``max(STALL_SLACK * tol, STALL_FLOOR)``, or that improved by
    less than the factor ``STALL_PROGRESS`` over those rounds while above ``tol`` (a ``tol``
    below float rounding's floor), stops holding the others (when the batch runs as one it
    keeps iterating while they do; under ``vmap``, as in ``lax.map`` chunks, its state stays
    where it stopped). The first check that can stall a
    member is at round ``2 * STALL_ROUNDS`` (the one before only records the rate's anchor).
    Heads without a modulus gap at ``k`` (diffuse or near-circulant attention) usually stall
    there. The history is kept per ``k``, so a change of the range's ``k`` between rounds
    does not mix the residuals of two subspaces. ``tol = 0`` turns the rule off.
    ``rounds * (RR_EVERY + 1)`` is ``iters`` rounded up to whole rounds.
    """
    n = a.shape[-1]
    v0 = jnp.asarray(_start_basis(n, p), a.dtype)
    v = jnp.broadcast_to(v0, (*a.shape[:-2], n, p))
    rounds = max(1, -(-iters // (RR_EVERY + 1)))

    def cond(state):
        it, _, _, res, _, _, stalled, kk = state
        held = ~(res <= tol) & ~jnp.take(stalled, kk - 1, axis=-1)
        return (it < rounds) & jnp.any(held)

    def body(state):
        it, v, _, _, best, anchor, stalled, _ = state
        v = _qr(jax.lax.fori_loop(0, RR_EVERY, lambda _, x: _deflate_constant(_mm(a, x)), v))[0]
        w = _mm(a, v)
        t, u = _order_by_modulus(_mm(_t(v), w))
        v, w = _mm(v, u), _mm(w, u)
        lead = _leading_residuals(v, w, t)
        kk = jnp.asarray(ks[0] if ks[0] == ks[1] else _stack_k(t, ks), jnp.int32)
        it = it + 1
        # history and stall flags per k (the range's k may change between rounds)
        best = jnp.minimum(best, jnp.where(jnp.isnan(lead), jnp.inf, lead))
        check = it % STALL_ROUNDS == 0
        rate = (best / anchor) ** (1.0 / STALL_ROUNDS)  # per round; anchor = inf: rate 0
        left = (rounds - it).astype(a.dtype)
        decay = jnp.where(rate < 1.0, rate**left, 1.0)
        forecast = best * decay
        limit = jnp.maximum(STALL_SLACK * tol, STALL_FLOOR)
        # little progress, and the current residual would not reach tol at that rate within
        # the budget (e.g. at float rounding's floor, where it swings around its best)
        stuck = (lead * decay > tol) & (best > STALL_PROGRESS * anchor)
        stall = check & (tol > 0) & jnp.isfinite(anchor) & ((forecast > limit) | stuck)
        anchor = jnp.where(check, best, anchor)
        res = jnp.take(lead, kk - 1, axis=-1)
        return it, v, t, res, best, anchor, stalled | stall, kk

    t = jnp.zeros((*a.shape[:-2], p, p), a.dtype)
    res = jnp.full(a.shape[:-2], jnp.inf, a.dtype)
    hist = jnp.full((*a.shape[:-2], p), jnp.inf, a.dtype)
    no = jnp.zeros((*a.shape[:-2], p), bool)
    state = (jnp.asarray(0, jnp.int32), v, t, res, hist, hist, no, jnp.asarray(ks[0], jnp.int32))
    it, v, t, *_, kk = jax.lax.while_loop(cond, body, state)
    # per member (the same for all): lax.map over chunks stacks them like the other outputs
    per = a.shape[:-2]
    return v, t, jnp.broadcast_to(it * (RR_EVERY + 1), per), jnp.broadcast_to(kk, per)


def _frob(x):
    return jnp.sqrt(jnp.sum(x * x, axis=(-2, -1)))


def _sanitize(a, bad):
    """Rows renormalised; invalid matrices replaced by the uniform chain (which converges at
    once), so they do not hold a batch's iteration to its limit. Their outputs are poisoned."""
    n = a.shape[-1]
    return jnp.where(
        bad[..., None, None], 1.0 / n, safe_normalize(jnp.where(bad[..., None, None], 1.0, a))
    )


#: ``converged`` needs the modulus gap above this multiple of the residual.
GAP_RESIDUAL_RATIO = 100.0


class _Full(NamedTuple):
    basis: jax.Array
    schur: jax.Array
    ritz: jax.Array
    residual: jax.Array
    gap: jax.Array
    split: jax.Array
    starts: jax.Array
    converged: jax.Array
    products: jax.Array


def _subspace_core(a, k, p, iters, tol, ks=None):
    """The ``k``-dimensional dominant subspace of valid chains ``a`` (no input checks)."""
    a = jax.lax.stop_gradient(a)  # memberships are held fixed under differentiation
    item = a.shape[-1] * a.shape[-1] * a.dtype.itemsize
    v, t, products, kk = map_over_batch(
        lambda x: _iterate(x, p, iters, tol, ks or (k, k, True)),
        a,
        batch_ndim=a.ndim - 2,
        item_bytes=item,
        whole_chunks=ks is not None,  # the range's k is chosen over the chunk, not per member
    )
    return v, t, products, kk


def _finish(a, v, t, k, tol, products):
    """Residual, Ritz values, gap and flags of the leading ``k`` columns of ``v``."""
    ritz, starts = _ritz_values(t)
    aw = _mm(a, v)
    vk, av = v[..., :k], aw[..., :k]
    r = _mm(_t(vk), av)
    residual = _frob(av - _mm(vk, r))
    # the gap from the ordered projection's diagonal blocks (its (k+1)-th value is a Ritz value
    # of the unconverged oversampled columns either way; tests/test_metastable.py bounds it)
    mod = jnp.sort(jnp.abs(ritz), axis=-1)[..., ::-1]
    gap = mod[..., k - 1] - mod[..., k]
    # a complex block at k, k + 1 cuts the subspace. Exception: a nearly converged block (the
    # residual of the leading k + 1 columns below a tenth of |λk|) whose discriminant could
    # turn non-negative when its entries move by that residual: two close real eigenvalues of
    # a causal chain looked like a pair there (a spurious cut, found by review). The
    # imaginary part of such a pair grows like the square root of the coupling. A block far
    # from converged stays a cut (exempting those too let real pairs of unconverged
    # near-circulant heads through with a wrong real eigenvalue: review)
    split = starts[..., k - 1]
    if k < v.shape[-1]:
        e = _leading_residuals(v, aw, t)[..., k]
        aa, bb, cc, dd = t[..., k - 1, k - 1], t[..., k - 1, k], t[..., k, k - 1], t[..., k, k]
        disc = 0.25 * (aa - dd) ** 2 + bb * cc
        slack = e * (jnp.abs(bb) + jnp.abs(cc) + jnp.abs(aa - dd)) + e * e
        near = e <= 0.1 * jnp.abs(ritz[..., k - 1])
        split = split & ~(near & (disc + slack >= 0))
    # the k eigenvalues: those of R by shifted QR (column 0 is the constant vector, λ1 = R[0,
    # 0]); R's diagonal blocks resolved nearly tied moduli only to ~3.5e-3, out of order. A
    # cut R has no eigenvalues of a k-dimensional invariant subspace (R is NaN in
    # schur_subspace): NaN, not the eigenvalues of the cut block (a wrong real value)
    head = jnp.where(split[..., None], jnp.nan, _small_eigvals(r, locked=1))
    ritz = jnp.concatenate([head, ritz[..., k:]], axis=-1)
    ortho = _frob(_mm(_t(vk), vk) - jnp.broadcast_to(jnp.eye(k, dtype=a.dtype), r.shape))
    # residual / gap estimates the angle to the exact subspace: a gap at the level of the
    # residual (rounding) leaves the subspace undetermined (tests/test_metastable.py)
    converged = (residual <= tol) & (gap > GAP_RESIDUAL_RATIO * residual) & ~split
    converged &= ortho <= 1e-4
    return _Full(vk, r, ritz, residual, gap, split, starts, converged, products)


@functools.partial(jax.jit, static_argnames=("k", "p", "iters"))
def _schur_subspace(attn, tol, k, p, iters):
    a = as_chain(attn)
    bad = invalid_matrices(a)
    a = _sanitize(a, bad)
    v, t, products, _ = _subspace_core(a, k, p, iters, tol)
    full = _finish(a, v, t, k, tol, products)
    cut = bad | full.split  # a cut complex pair: no invariant subspace of that dimension
    return full._replace(
        basis=poison(full.basis, cut),
        schur=poison(full.schur, cut),
        ritz=poison(full.ritz, bad),
        residual=poison(full.residual, bad),
        gap=poison(full.gap, bad),
        converged=full.converged & ~bad,
    )


class SchurSubspace(NamedTuple):
    """Result of :func:`schur_subspace` (leading axes ``...`` are the batch)."""

    #: ``(..., n, k)`` orthonormal basis ``V`` of the right invariant subspace, ``A V = V R``;
    #: its first column is the constant vector ``1/sqrt(n)``.
    basis: Float[Array, "*batch n k"]
    #: ``(..., k, k)`` Rayleigh quotient ``R = V^T A V``, block upper triangular up to the
    #: residual, blocks ordered by decreasing eigenvalue modulus (complex pairs are 2x2 blocks).
    schur: Float[Array, "*batch k k"]
    #: ``(..., k)`` complex64 eigenvalues of ``R`` (shifted QR), decreasing modulus.
    eigenvalues: Complex[Array, "*batch k"]
    #: ``(...)`` Frobenius residual ``||A V - V R||_F``.
    residual: PerMatrix
    #: ``(...)`` modulus gap ``|λ_k| - |λ_{k+1}|`` from the Ritz values of the ordered
    #: projection (0 at a complex pair; ``|λ_{k+1}|`` is rough, see :func:`schur_subspace`).
    gap: PerMatrix
    #: ``(...)`` residual at most ``tol`` and below ``gap / 100``, no complex pair cut, ``V``
    #: orthonormal.
    converged: Bool[Array, "*batch"]
    #: ``(...)`` products ``A V`` used (every member of a batch chunk runs as long as its
    #: slowest one).
    products: Int[Array, "*batch"]


def _check_k(k, n, minimum, what):
    k = check_count("k", k, minimum=minimum, what=what)
    if k >= n:
        raise ValueError(
            f"k must be smaller than the number of tokens n = {n}, got k = {k}; the subspace "
            f"of all {n} eigenvalues is the whole space (pass k <= {n - 1})"
        )
    return k


SPLIT = ("raise", "nan")


def _check_split(full, k, split, name="attn", chosen=False):
    """Eager: refuse a ``k`` that cuts a complex-conjugate pair of some matrix in half."""
    if split == "nan" or not is_concrete(full.split):
        return
    cut = np.asarray(full.split)
    if cut.any():
        where = np.argwhere(cut)
        first = tuple(int(i) for i in where[0]) if where.shape[1] else ()
        if chosen:
            raise ValueError(
                f"k=None chose k = {k} (the largest gap among the k that cut no pair while "
                f"iterating), but the final basis cuts a complex-conjugate pair in half for "
                f"{int(cut.sum())} matrices of {name} (the first at index {first}): no k suits "
                'every matrix of this stack. Pass split="nan" (the default for k=None) to get '
                "NaN and converged=False for those matrices only, or call per matrix"
            )
        raise ValueError(
            f"k = {k} cuts a complex-conjugate eigenvalue pair in half for {int(cut.sum())} "
            f"matrices of {name} (the first at index {first}); a real invariant subspace must "
            f"keep both: pass k = {k - 1} or k = {k + 1}, k=None to choose from the gaps, or "
            'split="nan" to get NaN (and converged=False) for those matrices only'
        )


def schur_subspace(
    attn: ChainLike,
    /,
    *,
    k: int,
    oversample: int = 4,
    iters: int = 300,
    tol: float = 1e-5,
    split: str = "raise",
) -> SchurSubspace:
    r"""The invariant subspace of the ``k`` eigenvalues of largest modulus, without ``eig``.

    For a row-stochastic chain :math:`A` (``attn[..., i, j]`` = P(i → j)) this is the **right**
    invariant subspace, :math:`A V = V R` with :math:`V^\top V = I`: functions on tokens, the
    side PCCA+/G-PCCA needs (it contains :math:`\mathbf{1}`, since :math:`A\mathbf{1} =
    \mathbf{1}`; the left one of :math:`A^\top` contains the stationary distribution instead).
    :math:`R` is a real Schur-like form: block upper triangular with 1x1 blocks for real and 2x2
    blocks for complex-conjugate eigenvalues, ordered by decreasing modulus, so its eigenvalues
    are the chain's ``k`` leading eigenvalues.

    Algorithm: block orthogonal iteration :math:`V \leftarrow \mathrm{qr}(A V)` with
    :math:`p = k + \text{oversample}` columns, the first one the constant vector (which locks
    :math:`\lambda_1 = 1`), and every few products a Schur–Rayleigh–Ritz step (Stewart 1976):
    :math:`H = V^\top A V` is reordered by an unshifted QR iteration :math:`T \leftarrow RQ`,
    :math:`V \leftarrow V U`. The leading ``k`` columns converge like
    :math:`|\lambda_{p+1} / \lambda_k|^t` (without the reordering, only like
    :math:`|\lambda_{k+1} / \lambda_k|^t`). QR is Householder in plain ``jax.numpy``; there is
    no LAPACK call, host callback or nonsymmetric eigensolver (``jnp.linalg.eig`` and ``schur``
    have no TPU lowering), so it runs on CPU and lowers for GPU and TPU (checked with
    ``jax.export``, also with a symbolic batch axis). Iteration stops when every
    matrix of a batch chunk has residual ``<= tol`` or has stalled, or after ``iters``
    products. A matrix has stalled when its residual, extrapolated at its rate over the last 36
    products (checked every 36 from 72 on), would still exceed ``max(10 * tol, 1e-4)`` after
    ``iters`` products: heads with no modulus gap at ``k`` (diffuse, near-circulant) usually do
    at the first such check, and stop holding the others. A stalled matrix reports
    ``converged=False`` unless it still reaches ``tol`` while the others iterate on (within one
    batch chunk it keeps iterating). ``tol=0`` turns the rule off and runs ``iters`` products
    (rounded up to a multiple of 6).

    **Convergence is reported, never assumed.** ``converged`` needs the residual at most
    ``tol``, a modulus gap :math:`|\lambda_k| - |\lambda_{k+1}|` above ``100 * residual`` and
    an orthonormal basis. The angle to the exact subspace is roughly ``residual / separation``,
    so a small residual with a gap at the level of rounding is no guarantee: on nearly
    reducible chains (three blocks leaking ~1e-6) ``k = 2`` leaves a gap of ~1e-6, the same
    size as a float32 residual, and such bases were 0.3-1.6 rad from the float64 Schur
    subspace; ``converged`` is ``False`` there. The subspace exists only when the gap is
    positive: a ``k`` that cuts a complex-conjugate pair in half (or ties in modulus) has none.
    When the leading ``k + oversample + 1`` moduli nearly tie (near-permutation heads),
    convergence is slow: raise ``iters`` or ``oversample``. ``eigenvalues`` are those of
    ``schur`` (``R``), by a shifted QR iteration on the ``k x k`` matrix (matmuls and
    Householder reflections), sorted by decreasing modulus: about 1e-6 from float64
    ``eigvals`` on planted-cluster chains, nearly tied moduli included (reading them off
    ``R``'s diagonal blocks, as before 2026-12-07, erred by up to 3.5e-3 there, out of order).
    ``gap`` is rougher: its ``|λ_{k+1}|`` is a Ritz value of the oversampled columns, which the
    iteration does not converge (errors up to ~2e-2 measured on planted-cluster chains).
    Causal (triangular) chains have ill-conditioned eigenvalues; their subspaces are not
    determined to float32 accuracy.

    Gradients: the basis is held fixed (``stop_gradient``); ``schur`` and ``residual`` are
    differentiable through the explicit :math:`A` in :math:`V^\top A V` only.

    Args:
      attn: attention ``(..., n, n)``, row-stochastic over the last axis (rows renormalised).
      k: subspace dimension, ``1 <= k <= n - 1`` (static).
      oversample: extra columns iterated along (static); ``p = min(k + oversample, n)``.
      iters: maximum number of products ``A V`` (static); also the budget against which a
        stalled matrix is judged (above).
      tol: residual threshold of the early stop and of ``converged``.
      split: ``"raise"`` (eagerly) or ``"nan"`` when ``k`` cuts a complex-conjugate pair of
        some matrix in half; with ``"nan"``, and always under ``jit``, that matrix gets a NaN
        ``basis`` and ``schur`` and ``converged = False``.

    Returns:
      A :class:`SchurSubspace` ``(basis, schur, eigenvalues, residual, gap, converged,
      products)``.

    Raises:
      ValueError: ``k`` not in ``[1, n - 1]``, ``k`` cutting a complex pair (eagerly), a
        non-square ``attn``, or (eagerly) NaN/inf or negative entries; under ``jit`` those
        matrices give NaN and ``converged = False`` instead.

    Examples:
      >>> import numpy as np
      >>> import markov_attn as ma
      >>> A = [[0.01, 0.04, 0.02, 0.85, 0.08], [0.82, 0.04, 0.07, 0.01, 0.06],
      ...      [0.80, 0.07, 0.03, 0.05, 0.05], [0.06, 0.06, 0.03, 0.04, 0.81],
      ...      [0.53, 0.03, 0.03, 0.06, 0.35]]
      >>> s = ma.schur_subspace(A, k=3)
      >>> np.round(np.abs(s.eigenvalues), 3)
      array([1.   , 0.626, 0.626], dtype=float32)
      >>> bool(s.converged), s.basis.shape
      (True, (5, 3))
    """
    shape = np.shape(attn)
    check_square(shape)
    n = shape[-1]
    k = _check_k(k, n, 1, " (subspace dimension)")
    oversample = check_count("oversample", oversample, minimum=1)
    iters = check_count("iters", iters, minimum=1)
    check_choice("split", split, SPLIT)
    check_values(attn)
    p = min(k + oversample, n)
    full = _schur_subspace(attn, tol, k, p, iters)
    _check_split(full, k, split)
    return SchurSubspace(
        full.basis,
        full.schur,
        full.ritz[..., :k],
        full.residual,
        full.gap,
        full.converged,
        full.products,
    )


def _gpcca_basis(vk, eta):
    """G-PCCA's basis ``X`` ``(..., n, k)``: ``X[:, 0] = 1``, ``X^T D X = I`` with
    ``D = diag(eta)``, spanning the same subspace as ``vk`` (whose span contains ``1``)."""
    sq = jnp.sqrt(eta)
    w = sq[..., :, None] * vk
    w = w.at[..., :, 0].set(sq)  # D^{1/2} 1 = sqrt(eta): the constant function, weighted
    q, _ = _qr(w)
    x = q / sq[..., :, None]
    return x.at[..., :, 0].set(1.0)


def _isa_vertices(x):
    """Inner simplex algorithm (Weber & Galliat 2002; pyGPCCA ``_indexsearch``): the ``k`` rows
    of ``x`` ``(..., n, k)`` that span the largest simplex, greedily. ``(..., k)`` int32."""
    k = x.shape[-1]
    norms = jnp.sum(x * x, axis=-1)
    first = jnp.argmax(norms, axis=-1)
    take = lambda o, i: jnp.take_along_axis(o, i[..., None, None], axis=-2)[..., 0, :]
    o = x - take(x, first)[..., None, :]
    idx = [first]
    for _ in range(1, k):
        temp = take(o, idx[-1])  # zero at the first step; unit norm afterwards
        o = (
            o
            - jnp.einsum("...nk,...k->...n", o, temp, precision=HIGHEST)[..., None]
            * temp[..., None, :]
        )
        d = jnp.sqrt(jnp.sum(o * o, axis=-1))
        nxt = jnp.argmax(d, axis=-1)
        o = o / jnp.maximum(jnp.max(d, axis=-1), jnp.finfo(x.dtype).tiny)[..., None, None]
        idx.append(nxt)
    return jnp.stack(idx, axis=-1).astype(jnp.int32)


class _States(NamedTuple):
    memberships: jax.Array
    assignment: jax.Array
    coarse: jax.Array
    metastability: jax.Array
    crispness: jax.Array
    min_chi: jax.Array


def _gpcca(a, vk, eta):
    """Memberships from the ISA rotation of the G-PCCA basis, clipped to be non-negative."""
    x = _gpcca_basis(jax.lax.stop_gradient(vk), eta)
    idx = _isa_vertices(x)
    verts = jnp.take_along_axis(x, idx[..., :, None], axis=-2)  # (..., k, k)
    chi_raw = _mm(x, _small_inverse(verts))  # rows sum to 1, chi_raw[idx] = I
    min_chi = jnp.min(chi_raw, axis=(-2, -1))
    chi = jnp.maximum(chi_raw, 0.0)
    chi = chi / jnp.sum(chi, axis=-1, keepdims=True)
    chi = jax.lax.stop_gradient(chi)
    weight = jnp.einsum("...nk,...n->...k", chi, eta, precision=HIGHEST)
    # clusters in order of decreasing weight chi^T eta (ISA's vertex order is arbitrary)
    order = jnp.argsort(-weight, axis=-1)
    chi = jnp.take_along_axis(chi, order[..., None, :], axis=-1)
    weight = jnp.take_along_axis(weight, order, axis=-1)
    dchi = eta[..., :, None] * chi
    coarse = _mm(_t(dchi), _mm(a, chi)) / weight[..., :, None]
    crisp = jnp.sum(dchi * chi, axis=-2) / weight
    k = chi.shape[-1]
    return _States(
        memberships=chi,
        assignment=jnp.argmax(chi, axis=-1).astype(jnp.int32),
        coarse=coarse,
        metastability=jnp.trace(coarse, axis1=-2, axis2=-1),
        crispness=jnp.sum(crisp, axis=-1) / k,
        min_chi=min_chi,
    )


class MetastableStates(NamedTuple):
    """Result of :func:`metastable_states` (leading axes ``...`` are the batch)."""

    #: ``(..., n, k)`` memberships ``χ``: non-negative, each row sums to 1; ``χ[i, j]`` is how
    #: much token ``i`` belongs to state ``j``. States are ordered by decreasing weight ``χ^T η``.
    memberships: Float[Array, "*batch n k"]
    #: ``(..., n)`` int32 crisp assignment ``argmax_j χ[i, j]`` (-1 for invalid matrices).
    assignment: Int[Array, "*batch n"]
    #: ``(..., k, k)`` coarse-grained chain ``diag(1/χ^T η) χ^T D A χ``: non-negative and
    #: row-stochastic; ``coarse[a, b]`` = P(next step in ``b`` | now in ``a``) under ``η``.
    coarse: Float[Array, "*batch k k"]
    #: ``(...)`` metastability, ``trace(coarse)`` (at most ``k``; ``k`` for ``k`` closed sets).
    metastability: PerMatrix
    #: ``(...)`` crispness ``trace(diag(1/χ^T η) χ^T D χ) / k`` in ``(0, 1]``, 1 iff crisp.
    crispness: PerMatrix
    #: ``(...)`` the most negative ISA membership before clipping (near 0: ``k`` fits well).
    min_chi: PerMatrix
    #: ``(..., k)`` complex64 leading eigenvalues, decreasing modulus.
    eigenvalues: Complex[Array, "*batch k"]
    #: ``(...)`` residual ``||A V - V R||_F`` of the Schur basis (see :func:`schur_subspace`).
    residual: PerMatrix
    #: ``(...)`` modulus gap ``|λ_k| - |λ_{k+1}|``.
    gap: PerMatrix
    #: ``(...)`` the subspace converged (see :func:`schur_subspace`).
    converged: Bool[Array, "*batch"]
    #: ``(...)`` products ``A V`` used by the subspace iteration.
    products: Int[Array, "*batch"]
    #: the number of states (the same for the whole batch).
    k: int


def _prepare(attn, eta):
    """Chain, weights and invalid-matrix flags; invalid matrices replaced by uniform ones."""
    a = as_chain(attn)
    eta = jnp.broadcast_to(jnp.asarray(eta, a.dtype), a.shape[:-1])
    bad = invalid_matrices(a) | invalid_dists(eta) | ~jnp.all(eta > 0, axis=-1)
    eta = safe_normalize(jnp.where(bad[..., None], 1.0, eta))
    return _sanitize(a, bad), eta, bad


def _states(a, eta, bad, v, t, products, tol, k):
    full = _finish(a, v, t, k, tol, products)
    st = _gpcca(a, full.basis, eta)
    # a cut complex pair leaves no invariant subspace to cluster: NaN, like an invalid input
    bad_out = bad | full.split
    # invalid matrices were replaced by the uniform chain: their subspace numbers are its
    full = full._replace(
        ritz=poison(full.ritz, bad),
        residual=poison(full.residual, bad),
        gap=poison(full.gap, bad),
        converged=full.converged & ~bad,
    )
    return full, _States(
        memberships=poison(st.memberships, bad_out),
        assignment=jnp.where(bad_out[..., None], -1, st.assignment),
        coarse=poison(st.coarse, bad_out),
        metastability=poison(st.metastability, bad_out),
        crispness=poison(st.crispness, bad_out),
        min_chi=poison(st.min_chi, bad_out),
    )


@functools.partial(jax.jit, static_argnames=("k", "p", "iters"))
def _metastable(attn, eta, tol, k, p, iters):
    a, eta, bad = _prepare(attn, eta)
    v, t, products, _ = _subspace_core(a, k, p, iters, tol)
    return _states(a, eta, bad, v, t, products, tol, k)


@functools.partial(jax.jit, static_argnames=("ks", "p", "iters"))
def _leading_basis(attn, eta, tol, ks, p, iters):
    """The ``p``-column ordered basis for ``ks = (k_min, k_max, skip_cuts)``, and its Ritz values
    (the iteration stops when the ``k`` that :func:`choose_k` picks from the current Ritz
    values has converged or stalled in every matrix)."""
    a, _, _ = _prepare(attn, eta)
    v, t, products, kk = _subspace_core(a, ks[1], p, iters, tol, ks)
    ritz, starts = _ritz_values(t)
    lead = _leading_residuals(v, _mm(a, v), t)
    return v, t, products, ritz, starts, kk, lead


@functools.partial(jax.jit, static_argnames=("k",))
def _metastable_from(attn, eta, v, t, products, tol, k):
    """G-PCCA on the leading ``k`` columns of an ordered basis computed for a larger ``k``."""
    a, eta, bad = _prepare(attn, eta)
    return _states(a, eta, bad, v, t, products, tol, k)


def _check_eta(eta, n, batch=()):
    if eta is None:
        return
    shape = np.shape(eta)
    if not shape or shape[-1] != n:
        raise ValueError(
            f"eta must be a distribution over the n = {n} tokens, shape (..., {n}), got shape "
            f"{shape}; pass eta=None for uniform weights"
        )
    if not all(isinstance(d, int | np.integer) for d in (*shape, *batch)):
        return  # symbolic dimensions (jax.export)
    try:
        fits = np.broadcast_shapes(shape[:-1], tuple(batch)) == tuple(batch)
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(
            f"eta has batch shape {shape[:-1]}, which does not broadcast to the attention's "
            f"batch shape {tuple(batch)}; pass one distribution (shape ({n},)) or one per "
            "matrix"
        )
    if is_concrete(eta) or isinstance(eta, list | tuple):
        e = np.asarray(eta)
        if not (np.all(np.isfinite(e)) and np.all(e > 0)):
            raise ValueError(
                "eta must be positive and finite (G-PCCA divides by sqrt(eta)); for the "
                "stationary distribution use ma.tokenrank(attn), which is strictly positive"
            )


def choose_k(eigenvalues, k_range=K_RANGE, cuts=None, skip_cuts=True) -> int:
    """The number of states with the largest modulus gap ``|λ_k| - |λ_{k+1}|``.

    ``eigenvalues`` ``(..., m)`` are leading eigenvalues in decreasing modulus; over a batch the
    gaps are averaged, so one ``k`` serves the whole stack. ``cuts`` ``(..., m)`` flags where a
    complex pair starts; a ``k`` that would cut a pair of any matrix is skipped (unless every
    ``k`` does); with ``skip_cuts=False`` (``split="nan"``) the gaps decide (a cut pair has a
    zero gap in its matrix) and only a ``k`` that cuts a pair of every matrix is skipped.
    Host-side (NumPy); ``k`` ranges over ``k_range`` clipped to ``m - 1``.
    """
    eigenvalues = np.asarray(eigenvalues)
    lo, hi = int(k_range[0]), min(int(k_range[1]), eigenvalues.shape[-1] - 1)
    cuts = None if cuts is None else np.asarray(cuts)
    return int(_gap_choice(np, eigenvalues, cuts, lo, hi, skip_cuts))


def metastable_states(
    attn: ChainLike,
    /,
    *,
    k: int | None = None,
    eta: DistLike | None = None,
    k_range: tuple[int, int] = K_RANGE,
    oversample: int = 4,
    iters: int = 300,
    tol: float = 1e-5,
    split: str | None = None,
) -> MetastableStates:
    r"""Metastable states of each chain by G-PCCA: soft memberships of the tokens.

    A metastable state is a set of tokens :math:`M` with :math:`P(x_{t+1} \in M \mid x_t \in M)
    \approx 1`: attention that enters it stays for many steps. Such sets show up as eigenvalues
    of modulus near 1, and G-PCCA (Reuter et al. 2018, generalising PCCA+ of Deuflhard & Weber
    2005 to non-reversible chains) finds them from a real Schur basis of the dominant
    invariant subspace (:func:`schur_subspace`, no eigenvectors needed):

    1. With :math:`D = \mathrm{diag}(\eta)` (``eta``, uniform by default), the basis is made
       :math:`D`-orthonormal with the constant function first: :math:`X^\top D X = I`,
       :math:`X_{:,1} = \mathbf{1}`, :math:`A X = X \tilde R`.
    2. The inner simplex algorithm (ISA) picks the ``k`` rows of :math:`X` spanning the largest
       simplex; :math:`\chi = X\, X_{\mathrm{idx}}^{-1}` has rows summing to 1 and
       :math:`\chi_{\mathrm{idx}} = I`; its negative entries are clipped and rows renormalised.
    3. The coarse-grained chain :math:`\hat A = \mathrm{diag}(1/\chi^\top\eta)\,\chi^\top D A
       \chi` is non-negative and row-stochastic; its trace is the **metastability**.

    The ISA rotation is kept without the Röblitz–Weber optimisation of the rotation: on
    attention chains the clipped ISA memberships score at least as high on the metastability
    (the trace above) as the crispness-optimised ones. (The Galerkin projection
    :math:`(\chi^\top D\chi)^{-1}\chi^\top D A\chi` is no score: its trace is the sum of the
    ``k`` eigenvalues for every rotation.) States come ordered by decreasing weight
    :math:`\chi^\top \eta`.

    **Choosing k.** ``k=None`` takes the ``k`` in ``k_range`` (clipped to ``n - 1``) with the
    largest modulus gap :math:`|\lambda_k| - |\lambda_{k+1}|`, averaged over the batch: outputs
    need one static shape, so the whole stack gets the same ``k`` (call per matrix for a ``k``
    each). With ``split="nan"`` (the default for ``k=None``) the gaps decide (a cut pair has a
    zero gap in its matrix, which then gets NaN and ``converged=False``: it has no real
    invariant subspace of that dimension), among the ``k`` that leave at least one matrix
    uncut; with ``split="raise"`` it takes only a ``k`` that cuts no complex pair of any matrix
    (unless every ``k`` does). On a stack that mixes metastable heads with near-circulant ones,
    whose eigenvalues come in pairs at every even ``k``, the first rule finds the metastable
    heads' ``k``, the second is left with gaps at the level of noise (and, measured, is 3-4
    times as slow, since heads without a gap at such a ``k`` keep iterating). Limitation: the
    moduli past the chosen ``k`` come from oversampled columns that are not converged, so on a
    chain without a clear gap the choice can depend on the token order and ``gap`` can be far
    too large (README). Such a choice comes with an :class:`UnresolvedGapWarning`: the gap of
    each candidate is read with the residual of the leading columns it needs (``k + 1``, or
    ``k + 2`` where a complex pair starts at ``k + 1``) as its uncertainty, and the warning
    says when the chosen gap less its uncertainty does not exceed another candidate's gap plus
    its own in any matrix of the stack (a heuristic: the eigenvalues of non-normal chains,
    e.g. causal ones, can move by more than the residual); pass ``k`` there. The subspace
    iteration then runs once for ``k_max`` (stopping when the ``k`` that this rule picks from
    the current Ritz values has converged, or stalled, in every matrix) and G-PCCA uses the
    leading ``k`` columns of its ordered basis (which span the ``k``-subspace). On CPU a large
    batch iterates in cache-sized chunks, each picking its ``k`` over its own members; if one
    picked another ``k`` than the whole batch, the batch is iterated again for the batch's
    ``k`` (``products`` counts both runs; that fresh iteration's Ritz values can differ from
    the ones the ``k`` was chosen on, so on chains without a gap the ``k`` may then cut a pair
    of every matrix, NaN under ``split="nan"``). It needs concrete values and so raises under
    ``jit``; pass ``k`` there. Moduli count, not signs: an eigenvalue near -1 (a near-periodic
    chain, e.g. attention that alternates between two token sets) opens a gap too; the sets
    it gives alternate instead of holding the chain, and their ``metastability`` near 0 says
    so. ``min_chi`` (most negative ISA entry, near 0 for a good ``k``)
    and ``crispness`` help compare choices. A ``k`` passed by the caller that cuts a complex
    pair in half raises eagerly (``split="raise"``); under ``jit`` that matrix gets NaN
    memberships and ``converged = False``.

    Differentiability: memberships, assignment and the ISA vertex choice are held fixed
    (``stop_gradient``; argmax and the vertex search are piecewise constant). ``coarse`` and
    ``metastability`` are differentiable in ``attn`` at fixed memberships.

    Args:
      attn: attention ``(..., n, n)``, row-stochastic over the last axis (rows renormalised).
      k: number of states, ``2 <= k <= n - 1`` (static), or ``None`` (eager only) to choose it.
      eta: positive weights ``(..., n)`` over tokens (normalised here); uniform by default. For
        a reversible chain, its stationary distribution makes G-PCCA equal PCCA+.
      k_range: ``(k_min, k_max)`` searched by ``k=None``.
      oversample, iters, tol: options of :func:`schur_subspace`.
      split: ``"raise"`` (eagerly) or ``"nan"`` when ``k`` cuts a complex-conjugate pair of
        some matrix: ``"nan"`` gives that matrix NaN memberships, assignment -1 and
        ``converged=False``. ``None`` (default): ``"raise"`` for a ``k`` you pass (a ``k`` that
        cuts a pair is a wrong request), ``"nan"`` for ``k=None`` (the cut is then the data's,
        not the caller's: one ``k`` rarely fits every head of a stack).

    Returns:
      A :class:`MetastableStates` ``(memberships, assignment, coarse, metastability,
      crispness, min_chi, eigenvalues, residual, gap, converged, products, k)``.

    Raises:
      ValueError: ``k`` not in ``[2, n - 1]``, ``k=None`` under ``jit``, a ``k`` that cuts a
        complex pair (eagerly), a bad ``eta`` or ``k_range``, a non-square ``attn``, or (eagerly)
        NaN/inf or negative entries; under ``jit`` invalid matrices give NaN (assignment -1).

    Examples:
      >>> import numpy as np
      >>> import markov_attn as ma
      >>> labels = np.array([0, 0, 0, 0, 1, 1])  # two groups, 90 % of attention stays inside
      >>> size = np.bincount(labels)[labels][:, None]
      >>> A = np.where(labels[:, None] == labels, 0.9 / size, 0.1 / (6 - size))
      >>> ms = ma.metastable_states(A)
      >>> ms.k, ms.assignment.tolist()
      (2, [0, 0, 0, 0, 1, 1])
      >>> round(float(ms.metastability), 3)
      1.8
    """
    a = jnp.asarray(attn) if isinstance(attn, list | tuple) else attn
    shape = np.shape(a)
    check_square(shape)
    n = shape[-1]
    check_values(attn)
    _check_eta(eta, n, shape[:-2])
    oversample = check_count("oversample", oversample, minimum=1)
    iters = check_count("iters", iters, minimum=1)
    if split is None:
        split = "nan" if k is None else "raise"
    check_choice("split", split, SPLIT)
    # one weights array of the batch's shape, so every call of one shape shares a program
    eta = jnp.full(shape[:-1], 1.0 / n, jnp.float32) if eta is None else eta
    eta = jnp.broadcast_to(jnp.asarray(eta), shape[:-1])
    chosen = k is None
    if k is None:
        if not is_concrete(jnp.asarray(a) if not isinstance(a, jax.Array) else a):
            raise ValueError(
                "k=None chooses the number of states from the eigenvalues, which needs concrete "
                "values; under jit pass k= (for example from ma.metastable_states on a sample, "
                "or ma.schur_subspace(attn, k=k_max).eigenvalues outside jit)"
            )
        lo = check_count("k_range[0]", k_range[0], minimum=2)
        hi = check_count("k_range[1]", k_range[1], minimum=lo)
        hi = min(hi, n - 1)
        if hi < lo:
            raise ValueError(
                f"k_range = {tuple(k_range)} leaves no k in [2, n - 1] for n = {n} tokens; "
                "a chain needs at least 3 tokens to have metastable states"
            )
        # one iteration for k_max: its ordered basis also holds the subspaces of smaller k
        skip = split == "raise"  # a cut is an error: choose among the k that cut no pair
        basis = _leading_basis(a, eta, tol, (lo, hi, skip), min(hi + oversample, n), iters)
        if not is_concrete(basis[3]):  # concrete input inside someone's jit
            raise ValueError("k=None needs concrete values (eager mode); pass k= under jit")
        k = choose_k(basis[3], (lo, hi), cuts=basis[4], skip_cuts=skip)
        tied = _unresolved_choice(
            np.asarray(basis[3]), np.asarray(basis[4]), np.asarray(basis[6]), lo, hi, skip, k
        )
        if tied is not None:
            rival = (
                f"k = {tied[0]} has {tied[1]:.3g}"
                if tied[0] is not None
                else "no other k is left in k_range, and it does not stand out from 0"
            )
            warnings.warn(
                f"metastable_states(k=None) chose k = {k} (batch-mean gap |λk| - |λk+1| = "
                f"{tied[2]:.3g}), but in no matrix does that gap stand out: {rival}, and the "
                "moduli they are read from are uncertain by up to about "
                f"{tied[3]:.2g} (the residual of the leading columns, not converged past the "
                "chosen k). The chains have no clear gap in k_range, so the choice can change "
                "with the token order or rounding, and ms.gap is that uncertain; pass k= "
                "explicitly",
                UnresolvedGapWarning,
                stacklevel=2,
            )
        if np.all(np.asarray(basis[5]) == k):
            full, st = _metastable_from(a, eta, *basis[:3], tol, k)
        else:  # a chunk (CPU) iterated for another k than the batch's: iterate for this one
            full, st = _metastable(a, eta, tol, k, min(k + oversample, n), iters)
            full = full._replace(products=full.products + basis[2])
    else:
        k = _check_k(k, n, 2, " (number of metastable states)")
        full, st = _metastable(a, eta, tol, k, min(k + oversample, n), iters)
    _check_split(full, k, split, chosen=chosen)
    return MetastableStates(
        *st,
        eigenvalues=full.ritz[..., :k],
        residual=full.residual,
        gap=full.gap,
        converged=full.converged & ~jnp.isnan(st.metastability),
        products=full.products,
        k=k,
    )


__all__ = ["MetastableStates", "SchurSubspace", "metastable_states", "schur_subspace"]
