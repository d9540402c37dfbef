r"""One stationary-distribution solver over matrix–vector products, with its implicit VJP.

The dense (:func:`markov_attn.tokenrank`) and the streaming (:func:`markov_attn.tokenrank_qk`)
paths solve the same fixed point and differ only in how they multiply by :math:`A`; both call
:func:`stationary` with an :class:`Operator`.

The system is :math:`M\pi = v` with :math:`M = I - \alpha A^\top + \alpha v\mathbf{1}^\top`
(valid for :math:`\alpha = 1` too). Since :math:`\mathbf{1}^\top M = \mathbf{1}^\top`, an
approximate solution with residual :math:`r = v - M\hat\pi` has error

.. math:: \|\hat\pi - \pi\|_1 \le \frac{1 + \alpha}{1 - \alpha}\,\|r\|_1,

the bound used by the ``tol`` stopping rule. :attr:`SolveInfo.error_bound` reports it with
the residual's own rounding (``RESIDUAL_ROUNDING`` eps) added to :math:`\|r\|_1`. True
residuals are formed in double-float (:func:`_residual_fn`), so that iterative refinement
reaches the accuracy of the float32 solution rather than that of a float32 residual.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from . import _df, _host
from ._krylov import refined_gmres
from ._util import HIGHEST, map_over_batch, safe_normalize

SOLVERS = ("gmres", "power", "solve", "gth")


class SolveInfo(NamedTuple):
    """How a stationary solve went, per matrix (``return_info=True``).

    Attributes:
      residual: :math:`\\|v - M\\pi\\|_1` of the returned :math:`\\pi` before its final
        renormalisation, formed in double-float (rounded once, to float32).
      error_bound: :math:`(1+\\alpha)/(1-\\alpha)` times the residual plus its own rounding
        (2 eps of the working precision), a bound on the L1 error (``inf`` at
        :math:`\\alpha = 1`, where no such bound exists). At float32 and
        :math:`\\alpha = 0.99` it is at least :math:`4.7\\cdot 10^{-5}`, pessimistic: the
        errors on nearly reducible chains are about 1e-6 (the residual's rounding along
        :math:`v` only rescales the solution, which is renormalised).
      steps: matrix–vector products (or power steps) used; members of one batch chunk share a
        count.
      converged: the bound met ``tol``, or the iteration reached the rounding floor of float32
        (no further progress possible); ``False`` when the step limit stopped it first, or
        for a NaN input. ``"power"`` stops on its own rule (the change of a step, see
        :func:`markov_attn.tokenrank`), which can hold while ``error_bound`` is still above
        ``tol``.
    """

    residual: Float[Array, "*batch"]
    error_bound: Float[Array, "*batch"]
    steps: Int[Array, "*batch"]
    converged: Bool[Array, "*batch"]


@dataclasses.dataclass(frozen=True)
class Options:
    """Static solver options (see :func:`markov_attn.tokenrank`)."""

    method: str = "gmres"
    tol: float = 1e-6
    max_steps: int | None = None
    restart: int = 20

    def steps(self) -> int:
        if self.max_steps is not None:
            return self.max_steps
        return 3000


@dataclasses.dataclass(frozen=True)
class Operator:
    r"""A chain given by products. ``params`` is any pytree of arrays with the batch leading.

    Attributes:
      at: ``(params, x) -> A^T x`` for ``x`` ``(..., n)`` (the fast product).
      a: ``(params, u) -> A u``.
      prepare: ``params -> acc``, whatever :attr:`accurate` needs (run once per solve,
        inside the batch chunk).
      accurate: ``(acc, x) -> (hi, lo)``, :math:`A^\top x` in double-float
        (:mod:`markov_attn._df`), within about 2 ulp of float32 of the exact result
        (0.7-1.75 ulp at most measured on attention-like chains, n = 4 to 1025).

    True residuals :math:`v - Mx = v(1 - \alpha\mathbf{1}^\top x) - x + \alpha A^\top x` are
    formed in double-float from it (:func:`_residual_fn`): in float32 the cancellation of
    :math:`x_j` against :math:`\alpha (A^\top x)_j` (complete at an attention sink, where
    :math:`A_{jj} \approx 1`) and the rounding of the product left an error of about an ulp per
    entry, which the solve amplifies by up to :math:`(1+\alpha)/(1-\alpha)` along the slow
    direction of a nearly reducible chain (L1 errors of 1.1-1.7e-5 at :math:`\alpha = 0.99`).
      dense: ``params -> A`` (only for ``method="solve"``); ``None`` for matrix-free chains.
      item_bytes: bytes per matrix when ``params`` is a dense stack (enables cache-sized
        chunks of the batch on CPU); ``None`` otherwise.
    """

    at: Callable[[Any, jax.Array], jax.Array]
    a: Callable[[Any, jax.Array], jax.Array]
    prepare: Callable[[Any], Any]
    accurate: Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]
    dense: Callable[[Any], jax.Array] | None = None
    item_bytes: int | None = None


def _m(at, p, v, alpha):
    """``x -> (I - alpha A^T + alpha v 1^T) x``."""
    return lambda x: x - alpha[..., None] * (at(p, x) - v * jnp.sum(x, -1, keepdims=True))


def _residual_fn(op, acc, v, alpha):
    """``x -> v - M x`` formed in double-float (see :class:`Operator`), rounded once at the
    end. The term ``v (1 - alpha 1^T x)`` stays float32: its rounding is a multiple of ``v``,
    which moves the solution along itself (``M^-1 v = pi``) and the final normalisation
    removes."""
    al = alpha[..., None]

    def residual(x):
        t = _df.add(_df.scale(op.accurate(acc, x), al), -x)  # alpha A^T x - x
        return t[0] + (t[1] + v * (1.0 - al * jnp.sum(x, -1, keepdims=True)))

    return residual


def _mt(a, p, v, alpha):
    """``u -> (I - alpha A + alpha 1 v^T) u``."""
    return lambda u: u - alpha[..., None] * (a(p, u) - jnp.sum(v * u, -1, keepdims=True))


def _threshold(tol, alpha, scale):
    """Residual (L1) at which the error bound ``(1 + alpha) / (1 - alpha) ||r||`` meets tol."""
    return tol * scale * (1.0 - alpha) / (1.0 + alpha)


#: multiples of the working precision's eps added to the residual in ``error_bound``.
RESIDUAL_ROUNDING = 2.0


def _bound(res, alpha):
    return jnp.where(alpha < 1.0, res * (1.0 + alpha) / jnp.maximum(1.0 - alpha, 1e-30), jnp.inf)


def _batched(op, fn, p, *rest):
    """``fn(p, *rest)`` chunked over the batch on CPU when ``p`` is a dense stack."""
    if op.item_bytes is None:
        return fn(p, *rest)
    return map_over_batch(fn, p, *rest, batch_ndim=rest[0].ndim - 1, item_bytes=op.item_bytes)


def _iterate(step, x0, stop_delta, patience, limit):
    """``x <- step(x)`` from ``x0`` until the L1 change ``delta`` of a member is at most
    ``stop_delta``, or has not reached a new minimum for ``patience`` steps (it then only
    fluctuates at float rounding), or ``limit`` steps (traced) ran. Returns ``(x, steps,
    converged)``."""

    def cond(s):
        *_, active, k = s
        return (k < limit) & jnp.any(active)

    def body(s):
        x, delta, best, since, active, k = s
        y = step(x)
        d = jnp.sum(jnp.abs(y - x), -1)
        x = jnp.where(active[..., None], y, x)
        delta = jnp.where(active, d, delta)
        improved = delta < best
        best = jnp.where(improved, delta, best)
        since = jnp.where(improved, 0, since + 1)
        active = active & ~(delta <= stop_delta) & (since < patience) & jnp.isfinite(delta)
        return x, delta, best, since, active, k + 1

    batch = x0.shape[:-1]
    inf = jnp.full(batch, jnp.inf, x0.dtype)
    state = (x0, inf, inf, jnp.zeros(batch, jnp.int32), jnp.ones(batch, bool))
    x, delta, _, _, active, k = jax.lax.while_loop(cond, body, (*state, jnp.asarray(0, jnp.int32)))
    return x, k, ~active & jnp.isfinite(delta)


def _power(op, opts, p, v, alpha, residual):
    """Teleported power method from ``v``, then one step of iterative refinement.

    Both phases stop a member when the L1 change ``delta`` gives ``alpha delta / (1 - alpha)
    <= tol`` (then its error is below ``tol``), or when ``delta`` has not reached a new
    minimum for ``2 / (1 - alpha)`` steps (at most 400). The first iterates the
    stationary distribution with the fast product; its fixed point in float32 is off along
    the slow direction of a nearly reducible chain (by up to 1.6e-5 in L1 at ``alpha =
    0.99``), so the second solves ``M d = r`` for the correction by the same iteration,
    ``d <- alpha A^T d - alpha v 1^T d + r``, from the double-float residual ``r`` of the
    first's result. ``max_steps`` bounds both phases together.
    """
    al = alpha[..., None]
    stop_delta = opts.tol * (1.0 - alpha) / jnp.maximum(alpha, 1e-30)
    patience = jnp.minimum(400.0, 2.0 / jnp.maximum(1.0 - alpha, 1e-30))
    limit = jnp.asarray(opts.steps(), jnp.int32)

    def step(x):
        y = al * op.at(p, x) + (1.0 - al) * v
        return y / jnp.sum(y, -1, keepdims=True)

    x, k1, conv1 = _iterate(step, v, stop_delta, patience, limit)
    r = residual(x)
    # the correction of a unit residual (the iteration is linear), so that its values stay far
    # from float32's underflow whatever the scale of the rows
    size = jnp.sum(jnp.abs(r), -1, keepdims=True)
    size = jnp.where(size > 0, size, 1.0)  # r = 0: d = 0 whatever the scale
    r = r / size

    def correct(d):
        return al * (op.at(p, d) - v * jnp.sum(d, -1, keepdims=True)) + r

    stop2 = stop_delta / size[..., 0]
    # at alpha = 1 (no stop_delta) only patience stops it: a shorter one, since the correction
    # needs far fewer correct digits than the solution
    d, k2, conv2 = _iterate(correct, jnp.zeros_like(x), stop2, jnp.minimum(patience, 100.0),
                            limit - k1)  # fmt: skip
    conv = conv1 & conv2
    return x + d * size, jnp.broadcast_to(k1 + k2, conv.shape), conv


#: GTH's blocks: :data:`GTH_BLOCK` states eliminated per block up to ``GTH_MAX_BLOCKS``
#: blocks, larger blocks above (each block is traced separately: compile time).
GTH_BLOCK = 32
GTH_MAX_BLOCKS = 24


def _gth_blocks(n: int) -> list[tuple[int, int]]:
    """GTH's blocks ``(lo, hi)`` of states, from the last one down (state 0 is never
    eliminated)."""
    size = max(GTH_BLOCK, -(-(n - 1) // GTH_MAX_BLOCKS))
    blocks = []
    hi = n
    while hi > 1:
        blocks.append((max(1, hi - size), hi))
        hi = blocks[-1][0]
    return blocks


def gth_factor(p: jax.Array) -> jax.Array:
    """GTH elimination of row-stochastic ``p`` ``(..., n, n)`` (see :func:`gth`), its factors
    in one matrix ``F``: above the diagonal ``F[i, k] = c_k[i]``, the censored chain's
    ``P[i, k]`` divided by the pivot of state ``k`` (``i < k``); below it ``F[k, j]`` the row of
    state ``k`` when it was eliminated (``j < k``), whose sum is that pivot. The diagonal is
    not used."""
    n = p.shape[-1]
    for lo, hi in _gth_blocks(n):
        b = hi - lo
        cols_hi, rows_b = jnp.arange(hi), jnp.arange(b)

        def eliminate(s, carry, lo=lo, b=b, cols_hi=cols_hi, rows_b=rows_b):
            rw, cl = carry  # the block's rows P[lo:hi, :hi] and columns below it P[:lo, lo:hi]
            t = b - 1 - s
            k = lo + t
            row = jnp.where(cols_hi < k, rw[..., t, :], 0.0)  # P[k, :k]
            leave = jnp.sum(row, -1, keepdims=True)  # the pivot, no subtraction
            col = rw[..., :, k]
            c_in = jnp.where(rows_b < t, col, 0.0) / leave  # P[i, k] / leave, i in [lo, k)
            c_low = cl[..., :, t] / leave  # i < lo
            rw = rw + c_in[..., :, None] * row[..., None, :]
            rw = rw.at[..., :, k].set(jnp.where(rows_b < t, c_in, col))
            row_in = jnp.where(rows_b < t, row[..., lo : lo + b], 0.0)  # P[k, j], j in [lo, k)
            cl = cl + c_low[..., :, None] * row_in[..., None, :]
            return rw, cl.at[..., :, t].set(c_low)

        rw, cl = jax.lax.fori_loop(0, b, eliminate, (p[..., lo:hi, :hi], p[..., :lo, lo:hi]))
        # the block's update of the states below it, P[:lo, :lo] += C R, in one product
        p = p.at[..., :lo, :lo].add(jnp.matmul(cl, rw[..., :, :lo], precision=HIGHEST))
        p = p.at[..., lo:hi, :hi].set(rw).at[..., :lo, lo:hi].set(cl)
    return p


def gth_poisson(f: jax.Array, b: jax.Array) -> jax.Array:
    r"""A solution ``u`` ``(..., n)`` of :math:`(I - P)u = b` with :math:`u_0 = 0`, from the GTH
    factors ``f`` of ``P`` (:func:`gth_factor`); ``b`` must satisfy :math:`\pi^\top b = 0`.

    The same elimination on the right-hand side: state ``k`` (from the last down) passes
    ``c_k[i] b_k`` to each ``b_i``, ``i < k``; then :math:`u_k = (b_k + \sum_{j<k} F_{kj}u_j) /
    \sum_{j<k} F_{kj}`. With the factors accurate entrywise, ``u`` is accurate relative to the
    sizes of the terms it sums, where a float32 Krylov solve errs by the condition number
    times the rounding: the adjoint of :func:`gth` (the implicit gradient).
    """
    n = f.shape[-1]
    idx = jnp.arange(n)
    cols = jnp.swapaxes(f, -1, -2)  # row k: c_k

    def forward(s, b):
        k = n - 1 - s
        bk = jax.lax.dynamic_index_in_dim(b, k, axis=-1)
        return b + jnp.where(idx < k, cols[..., k, :], 0.0) * bk

    b = jax.lax.fori_loop(0, n - 1, forward, b)

    def back(k, u):
        row = jnp.where(idx < k, f[..., k, :], 0.0)
        uk = jax.lax.dynamic_index_in_dim(b, k, axis=-1, keepdims=False) + jnp.sum(row * u, -1)
        return u.at[..., k].set(uk / jnp.sum(row, -1))

    return jax.lax.fori_loop(1, n, back, jnp.zeros_like(b))


def gth(p: jax.Array) -> jax.Array:
    r"""The stationary distribution of row-stochastic ``p`` ``(..., n, n)`` by GTH elimination.

    Grassmann, Taksar and Heyman (1985): state elimination (a Gaussian elimination on
    :math:`I - P` from the last state down) in which each pivot, the probability of leaving
    the state eliminated, is the sum of its remaining off-diagonal entries, never
    :math:`1 - p_{kk}`. Every operation adds non-negative numbers, so every component comes out
    with a small relative error whatever the conditioning of the chain (O'Cinneide 1993): on a
    nearly reducible chain whose blocks leak :math:`e^{-16}` it is within ~1e-7 in L1 of
    float64, where a solve that forms :math:`I - P` or a float32 iteration is 1e-3 to 1e-1 off.

    Blocked like a right-looking LU: the states of a block (:data:`GTH_BLOCK`) are eliminated
    one by one on the block's rows and columns only, then the rest of the matrix takes their
    combined update as one matmul (of non-negative factors, at ``HIGHEST`` precision). No
    LAPACK, so it runs on every backend. The elimination alone took about 4 ms for
    ``(12, 197, 197)`` and 0.16 s for ``(12, 1025, 1025)`` on the 2-core CPU (the whole
    ``tokenrank`` call: 5.4 ms and 0.24 s).

    The diagonal is never read. A state of the censored chain that cannot leave it (a
    reducible chain, or a transient state 0, whose stationary mass is 0) divides by zero:
    those members come back non-finite; eliminating down to a recurrent state instead (swap
    it with state 0) solves the second case. The back substitution is rescaled by powers of
    two, so components spanning more than float32's range do not overflow (the smallest
    flush to 0).
    """
    f = gth_factor(p)
    # back substitution from state 0: x_k = sum_{i < k} x_i c_k[i], block by block, rescaled
    # by a power of two after each block (exact): when state 0 is nearly transient the
    # components span more than float32's range (x reached ~1e38 and its sum's reciprocal
    # flushed to zero: a silent uniform answer)
    x = jnp.ones((*p.shape[:-2], 1), p.dtype)
    for lo, hi in reversed(_gth_blocks(p.shape[-1])):
        b = hi - lo
        cl, diag = f[..., :lo, lo:hi], f[..., lo:hi, lo:hi]
        base = jnp.einsum("...i,...ib->...b", x, cl, precision=HIGHEST)  # the terms i < lo

        def substitute(t, xb, base=base, diag=diag, b=b):
            inner = jnp.sum(jnp.where(jnp.arange(b) < t, xb * diag[..., :, t], 0.0), -1)
            return xb.at[..., t].set(base[..., t] + inner)

        x = jnp.concatenate([x, jax.lax.fori_loop(0, b, substitute, jnp.zeros_like(base))], -1)
        top = jnp.max(x, -1, keepdims=True)
        x = x * jnp.where(jnp.isfinite(top) & (top > 0), _pow2_below(top), 1.0)
    return x / jnp.sum(x, -1, keepdims=True)


def _pow2_below(x):
    """``2^-e`` with ``2^e`` the largest power of two at most ``x`` (> 0, finite): scaling by it
    is exact and brings ``x`` into ``[1, 2)``."""
    _, e = jnp.frexp(x)
    return jnp.ldexp(jnp.ones_like(x), 1 - e)


def _swap_first(t, base):
    """``t`` ``(..., n, n)`` with states 0 and ``base`` ``(...)`` swapped (rows and columns),
    and the permutation (an involution: it also swaps back a vector over the states)."""
    idx = jnp.broadcast_to(jnp.arange(t.shape[-1]), (*base.shape, t.shape[-1]))
    b = base[..., None]
    perm = jnp.where(idx == 0, b, jnp.where(idx == b, 0, idx))
    t = jnp.take_along_axis(t, perm[..., :, None], axis=-2)
    return jnp.take_along_axis(t, perm[..., None, :], axis=-1), perm


def _gth_ok(x):
    """Members whose GTH answer holds: finite, with a positive sum (GTH divides by a zero pivot
    when a state of the censored chain cannot leave it: a reducible chain, or a transient
    state 0)."""
    return jnp.all(jnp.isfinite(x), -1) & (jnp.sum(x, -1) > 0)


def _teleported(op, p, v, al):
    r"""The dense teleported chain :math:`T = \alpha A + (1 - \alpha)\mathbf{1}v^\top` (GTH
    solves it directly, its factors give the adjoint)."""
    return al[..., None, None] * op.dense(p) + (1.0 - al[..., None, None]) * v[..., None, :]


def _unless_broken(ok, value, fallback):
    """``value`` where ``ok`` ``(...)``, ``fallback()`` elsewhere (same pytree); the fallback
    runs only when some member broke down (GTH on a reducible chain: a division by zero)."""

    def mix():
        return jax.tree.map(
            lambda f, v: jnp.where(ok.reshape(ok.shape + (1,) * (f.ndim - ok.ndim)), v, f),
            fallback(),
            value,
        )

    return jax.lax.cond(jnp.all(ok), lambda: value, mix)


def _forward(op, opts, p, v, alpha):
    """``(x, residual, steps, converged)``, ``x`` before the final renormalisation."""

    def l1_residual(p, v, al, x):
        r = _residual_fn(op, op.prepare(p), v, al)(x)
        return jnp.sum(jnp.abs(r), -1)

    if opts.method == "gth":

        def run_gth(p, v, al, base=None):
            t = _teleported(op, p, v, al)
            if base is None:
                x = gth(t)
            else:  # eliminate down to state `base` instead of state 0
                t, perm = _swap_first(t, base)
                x = jnp.take_along_axis(gth(t), perm, axis=-1)
            return x, l1_residual(p, v, al, x)

        x, res = _batched(op, run_gth, p, v, alpha)
        steps = jnp.zeros(v.shape[:-1], jnp.int32)
        gmres = dataclasses.replace(opts, method="gmres")

        def again():
            # GTH broke down (possible at alpha = 1): where state 0 is transient (a padding
            # token masked as a key, a causal chain's reverse) the chain can still have one
            # stationary distribution; eliminating down to a recurrent state instead, the
            # largest of GMRES's answer, gives it accurately. A reducible chain breaks down
            # again and keeps GMRES's answer.
            xg, rg, sg, cg = _forward(op, gmres, p, v, alpha)
            base = jnp.argmax(jnp.where(jnp.isfinite(xg), xg, -jnp.inf), -1)
            x2, r2 = _batched(op, run_gth, p, v, alpha, base)
            ok2 = _gth_ok(x2)
            return _unless_broken(ok2, (x2, r2, steps, ok2), lambda: (xg, rg, sg, cg))

        ok = _gth_ok(x)
        return _unless_broken(ok, (x, res, steps, ok), again)

    if opts.method == "solve":
        n = v.shape[-1]
        a = op.dense(p)
        eye = jnp.broadcast_to(jnp.eye(n, dtype=a.dtype), a.shape)
        m = eye - alpha[..., None, None] * (jnp.swapaxes(a, -1, -2) - v[..., :, None])
        x = _host.solve(m, v)
        steps = jnp.zeros(v.shape[:-1], jnp.int32)
        res = _batched(op, l1_residual, p, v, alpha, x)
        return x, res, steps, jnp.all(jnp.isfinite(x), -1)
    if opts.method == "power":

        def run_power(p, v, al):
            residual = _residual_fn(op, op.prepare(p), v, al)
            x, steps, conv = _power(op, opts, p, v, al, residual)
            return x, jnp.sum(jnp.abs(residual(x)), -1), steps, conv

        return _batched(op, run_power, p, v, alpha)

    def run(p, v, al):
        ref = refined_gmres(
            _m(op.at, p, v, al),
            _residual_fn(op, op.prepare(p), v, al),
            v,
            threshold=_threshold(opts.tol, al, 1.0),
            restart=opts.restart,
            max_refinements=max(1, opts.steps() // opts.restart),
        )
        steps = jnp.broadcast_to(ref.steps, ref.converged.shape)
        return ref.x, ref.residual, steps, ref.converged

    return _batched(op, run, p, v, alpha)


def _adjoint(op, opts, p, v, alpha, pi, g):
    """``u`` with ``M^T u = g`` (any solution of the singular-at-alpha-1 system that gives the
    same gradient for row-stochastic perturbations)."""
    if opts.method == "solve":
        n = v.shape[-1]
        a = op.dense(p)
        eye = jnp.broadcast_to(jnp.eye(n, dtype=a.dtype), a.shape)
        mt = eye - alpha[..., None, None] * (a - v[..., None, :])
        return _host.solve(mt, g)
    if opts.method == "power":
        adjoint = functools.partial(_power_adjoint, op, opts)
        return _batched(op, adjoint, p, v, alpha, pi, g)
    if opts.method == "gth":
        # M^T = I - T + 1 v^T with T the teleported chain: u = w + c 1 with (I - T) w = g -
        # (pi.g) 1 by T's GTH factors and v.u = pi.g; GMRES for members whose factors broke
        # down (a reducible chain: the forward pass fell back to GMRES too)
        def run_gth(p, v, al, pi, g, base):
            pg = jnp.sum(pi * g, -1, keepdims=True)
            t, perm = _swap_first(_teleported(op, p, v, al), base)  # factors down to `base`
            w = gth_poisson(gth_factor(t), jnp.take_along_axis(g - pg, perm, -1))
            w = jnp.take_along_axis(w, perm, -1)
            return w + (pg - jnp.sum(v * w, -1, keepdims=True))

        # always eliminated down to the largest token of pi (recurrent): down to a nearly
        # transient token 0 the factors are finite but the Poisson solve cancels (a chain
        # whose column 0 is scaled by 1e-12 had a 7.7e-2 relative gradient error, 1e-20 and
        # beyond: 1e6 and more; found by review)
        u = _batched(op, run_gth, p, v, alpha, pi, g, jnp.argmax(pi, -1))
        fallback = dataclasses.replace(opts, method="gmres")
        return _unless_broken(
            jnp.all(jnp.isfinite(u), -1), u, lambda: _adjoint(op, fallback, p, v, alpha, pi, g)
        )

    def run(p, v, al, g):
        scale = jnp.sum(jnp.abs(g), -1)
        mt = _mt(op.a, p, v, al)
        ref = refined_gmres(
            mt,
            lambda u: g - mt(u),
            g,
            threshold=_threshold(opts.tol, al, scale),
            restart=opts.restart,
            max_refinements=max(1, opts.steps() // opts.restart),
        )
        return ref.x

    return _batched(op, run, p, v, alpha, g)


def _power_adjoint(op, opts, p, v, alpha, pi, g):
    """Centred iteration for the adjoint: r = g - (pi.g) 1, w <- T w + r; it stays in pi-perp
    and contracts at alpha |lambda_2|, like the forward power method."""
    r = g - jnp.sum(pi * g, -1, keepdims=True)
    eps = jnp.finfo(g.dtype).eps
    stop = jnp.maximum(opts.tol * (1.0 - alpha), 8 * eps)

    def t_mv(w):  # T w with T = alpha A + (1 - alpha) 1 v^T
        return alpha[..., None] * op.a(p, w) + (1.0 - alpha[..., None]) * jnp.sum(
            v * w, -1, keepdims=True
        )

    def cond(s):
        _, delta, k = s
        return (k < opts.steps()) & jnp.any(delta > stop)

    def body(s):
        w, _, k = s
        w2 = t_mv(w) + r
        scale = jnp.maximum(jnp.max(jnp.abs(w2), -1), 1e-30)
        return w2, jnp.max(jnp.abs(w2 - w), -1) / scale, k + 1

    delta0 = jnp.full(g.shape[:-1], jnp.inf, g.dtype)
    w, _, _ = jax.lax.while_loop(cond, body, (r, delta0, jnp.asarray(0, jnp.int32)))
    return w


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def stationary(op: Operator, opts: Options, p, v, alpha):
    """The stationary distribution ``(..., n)`` and its :class:`SolveInfo`.

    Args:
      op: the chain's products (static).
      opts: solver options (static).
      p: the operator's parameters (differentiable).
      v: teleport distributions ``(..., n)``, broadcast to the batch.
      alpha: teleportation weights ``(...)``.
    """
    return _stationary_fwd(op, opts, p, v, alpha)[0]


def _stationary_fwd(op, opts, p, v, alpha):
    x, res, steps, conv = _forward(op, opts, p, v, alpha)
    pi = safe_normalize(jnp.maximum(x, 0.0))
    bad = ~jnp.all(jnp.isfinite(pi), -1)
    # the residual is itself computed in the working precision: its rounding (up to ~eps of
    # ||v||_1 = 1 measured at float32) goes into the bound, which then bounds the error
    floor = RESIDUAL_ROUNDING * jnp.finfo(pi.dtype).eps
    info = SolveInfo(res, _bound(res + floor, alpha), steps, conv & ~bad)
    return (pi, info), (p, v, alpha, pi)


def _stationary_bwd(op, opts, residuals, cotangents):
    p, v, alpha, pi = residuals
    g = cotangents[0]
    u = _adjoint(op, opts, p, v, alpha, pi, g)
    # M dpi = (1 - alpha) dv + alpha dA^T pi + dalpha (A^T pi - v),  u = M^-T g
    atpi, pullback = jax.vjp(lambda p: op.at(p, pi), p)
    (dp,) = pullback(alpha[..., None] * u)
    dv = (1.0 - alpha[..., None]) * u
    dalpha = jnp.sum(u * (atpi - v), -1)
    return dp, dv, dalpha


stationary.defvjp(_stationary_fwd, _stationary_bwd)
