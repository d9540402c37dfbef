"""TokenRank: the stationary distribution of the (teleported) attention chain."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import ArrayLike, Float

from . import _df
from ._chain import _reverse, _teleport, _uniform_or, check_v
from ._stationary import Operator, Options, SolveInfo, stationary
from ._typing import ChainLike, Dist, DistLike
from ._util import (
    as_chain,
    check_alpha,
    check_choice,
    check_count,
    check_values,
    compute_dtype,
    invalid_dists,
    invalid_matrices,
    is_concrete,
    matvec,
    matvec_t,
    normalized_rows,
    poison,
    row_scale,
    row_sums,
)

METHODS = ("auto", "solve", "gmres", "power")
DIRECTIONS = ("in", "out")
#: ``method="auto"`` on GPU/TPU uses the dense solve up to this ``n`` and GMRES above; on CPU it
#: is always GMRES (no LAPACK call, and faster there).
AUTO_SOLVE_MAX_N = 256
#: ``method="auto"`` uses GTH elimination (``O(n^3)``, componentwise accurate) for the
#: ``alpha = 1`` problems (``direction="out"`` in the paper's order, a concrete ``alpha`` of 1)
#: up to this ``n`` (the range of the accuracy claim) and GMRES (``O(n^2)`` per product) above.
AUTO_GTH_MAX_N = 1025
#: Rows per plain partial sum of the double-float residual product (:func:`_df.matvec_t`).
ACCURATE_ROWS = 8


def dense_operator(a: jax.Array) -> Operator:
    """The :class:`Operator` of the row-normalised stack ``safe_normalize(a)`` ``(..., n, n)``.

    Its parameters are ``(a, rows)``, the raw stack and its row sums (:func:`row_sums`): every
    product scales instead of dividing the stack, ``(A / s)^T x = A^T (x / s)`` and
    ``(A / s) u = (A u) / s`` (a zero row stands for the uniform row), so no normalised copy of
    the stack is ever written. On a large stack on CPU that copy and the elementwise input
    checks over it cost as much as a third of a solve; the chunks of the batch
    (:func:`~markov_attn._util.map_over_batch`) then read each matrix from memory once.
    """
    n = a.shape[-1]

    def at(p, x):
        a, rows = p
        inv, zero = row_scale(rows)
        lost = jnp.sum(jnp.where(zero, x, 0.0), -1, keepdims=True) / n
        return matvec_t(a, x * inv) + lost

    def av(p, u):
        a, rows = p
        inv, zero = row_scale(rows)
        return jnp.where(zero, jnp.mean(u, -1, keepdims=True), matvec(a, u) * inv)

    def prepare(p):
        a, _ = p
        s = _df.sum_blocked(a, axis=-1)  # the row sums in double-float
        zero = s[0] < jnp.finfo(a.dtype).tiny  # empty rows: uniform (see row_scale)
        # each row scaled by the power of two that brings its sum into [0.5, 1): exact, and it
        # keeps the error-free products below away from overflow and underflow at any scale
        _, ex = jnp.frexp(jnp.where(zero, 1.0, s[0]))
        sigma = jnp.ldexp(jnp.ones_like(s[0]), -ex)
        # 1 / s = inv (1 + beta), the rounding of inv kept (0 for empty rows)
        inv, beta = _df.reciprocal((s[0] * sigma, s[1] * sigma))
        blocks = _df.row_blocks(a * sigma[..., None], ACCURATE_ROWS, zero_diagonal=True)
        d = jnp.diagonal(a, axis1=-2, axis2=-1) * sigma
        return blocks, d, inv, beta, zero

    def accurate(acc, x):
        # A^T x = sum_i a'_ij x_i / s'_i (rows scaled by sigma) with x_i / s'_i = q_i + ql_i
        # in double-float: the off-diagonal a'_ij q_i in one double-float pass, the diagonal
        # exactly, the tiny ql by a plain product over the same (reshaped) blocks
        blocks, d, inv, beta, zero = acc
        q, e = _df.two_prod(x, inv)
        ql = e + q * beta
        m = blocks.shape[-3] * blocks.shape[-2]
        y = _df.add(_df.matvec_t(blocks, _df.pad_last(q, m)), _df.two_prod(d, q))
        flat = blocks.reshape((*blocks.shape[:-3], m, n))
        small = matvec_t(flat, _df.pad_last(ql, m)) + d * ql
        lost = jnp.sum(jnp.where(zero, x, 0.0), -1, keepdims=True) / n  # uniform empty rows
        return _df.add(y, lost + small)

    return Operator(
        at=at,
        a=av,
        prepare=prepare,
        accurate=accurate,
        dense=lambda p: normalized_rows(*p),
        item_bytes=n * n * a.dtype.itemsize,
    )


def _solve(a, rows, v, alpha, method, opts):
    op = dense_operator(a)
    p = (a, rows)
    if method != "auto":  # "gth" included
        return stationary(op, Options(method, *opts), p, v, alpha)
    dense = a.shape[-1] <= AUTO_SOLVE_MAX_N
    return jax.lax.platform_dependent(
        p,
        v,
        alpha,
        cpu=lambda p, v, al: stationary(op, Options("gmres", *opts), p, v, al),
        default=lambda p, v, al: stationary(
            op, Options("solve" if dense else "gmres", *opts), p, v, al
        ),
    )


@functools.partial(
    jax.jit, static_argnames=("direction", "method", "tol", "max_steps", "teleport_first")
)
def _tokenrank(attn, alpha, v, direction, method, tol, max_steps, teleport_first):
    a = as_chain(attn)
    n = a.shape[-1]
    rows = row_sums(a)
    bad = invalid_matrices(a, rows)
    alpha = jnp.asarray(alpha, a.dtype)
    bad_alpha = ~((alpha >= 0) & (alpha <= 1))
    v = _uniform_or(v, n, a.dtype)
    batch = jnp.broadcast_shapes(a.shape[:-2], v.shape[:-1], alpha.shape)
    bad = jnp.broadcast_to(bad, batch) | jnp.broadcast_to(bad_alpha, batch)
    bad = bad | jnp.broadcast_to(invalid_dists(v), batch)
    # invalid members come back as NaN (a NaN matrix stops its own iteration at once; the
    # matrix is not copied to sanitise it)
    a = jnp.broadcast_to(a, (*batch, n, n))
    rows = jnp.broadcast_to(rows, (*batch, n))
    v = jnp.where(bad[..., None], jnp.asarray(1.0 / n, a.dtype), jnp.broadcast_to(v, (*batch, n)))
    alpha = jnp.where(bad, jnp.asarray(0.5, a.dtype), jnp.broadcast_to(alpha, batch))
    if direction == "out":
        a = normalized_rows(a, rows)  # the reverse of the chain, not of the raw weights
        if teleport_first:  # the paper's reverse chain: reverse(teleport(A)), not teleported again
            a = _reverse(_teleport(a, alpha, v))  # _teleport takes one alpha per matrix
            alpha = jnp.ones_like(alpha)
        else:
            a = _reverse(a)
        rows = row_sums(a)
    # The solver reads the rows renormalised (implicitly: see dense_operator), which makes the
    # result a well-defined function of any non-negative input (the implicit VJP assumes
    # row-stochastic A) and absorbs bf16 rounding.
    pi, info = _solve(a, rows, v, alpha, method, (tol, max_steps))
    return poison(pi, bad), info._replace(converged=info.converged & ~bad)


def tokenrank(
    attn: ChainLike,
    /,
    *,
    alpha: float | Float[ArrayLike, "*#batch"] = 0.99,
    v: DistLike | None = None,
    direction: str = "in",
    method: str = "auto",
    tol: float = 1e-6,
    max_steps: int | None = None,
    teleport_first: bool = True,
    return_info: bool = False,
) -> Dist | tuple[Dist, SolveInfo]:
    r"""TokenRank: the stationary distribution of the teleported attention chain.

    With :math:`T = \alpha A + (1-\alpha)\mathbf{1}v^\top`, TokenRank is the unique :math:`\pi`
    with :math:`T^\top \pi = \pi`, :math:`\pi \ge 0`, :math:`\mathbf{1}^\top\pi = 1`: the global
    incoming importance of each token. It solves

    .. math:: M\pi = v, \qquad M = I - \alpha A^\top + \alpha v \mathbf{1}^\top,

    which for :math:`\alpha < 1` is :math:`(I - \alpha A^\top)\pi = (1-\alpha) v` and for
    :math:`\alpha = 1` still pins the normalisation. Since :math:`\mathbf{1}^\top M =
    \mathbf{1}^\top`, a residual :math:`r` bounds the error:
    :math:`\|\hat\pi - \pi\|_1 \le \frac{1+\alpha}{1-\alpha}\|r\|_1`.

    ``direction="out"`` is the stationary distribution of the reverse chain, an outgoing
    importance (the limit of :func:`bounce` with ``direction="reverse"``, as ``"in"`` is that
    of ``"forward"``). By default (``teleport_first=True``, the paper's code) the reverse chain is
    that of the *teleported* chain, :math:`\mathrm{reverse}(T)` (see :func:`reverse`), which
    is irreducible unless ``v`` is concentrated (below) and is not teleported again;
    ``teleport_first=False`` teleports the reverse
    chain instead, :math:`\alpha\,\mathrm{reverse}(A) + (1-\alpha)\mathbf{1}v^\top` (the two
    differ by up to ~1e-2 in L1).

    Methods (L1 error within 1e-5 of a float64 solve for ``alpha <= 0.99`` on every chain
    tested up to n = 1025, nearly reducible ones included: about 1e-6 at most on two blocks
    leaking e^-12 to e^-16, where float32 residuals had left 1.1-1.7e-5; ``info.error_bound``
    bounds the error). ``direction="out"`` with ``teleport_first=True`` (the default for it)
    solves the reverse of the teleported chain with no teleportation of its own, an ``alpha =
    1`` problem (``info.error_bound`` is inf) that is as ill-conditioned as the chain is nearly
    reducible when ``v`` is concentrated: there every float32 iteration and every solve that
    forms :math:`I - A` loses accuracy (L1 1e-4 to 1e-1 with gmres on 3 blocks leaking e^-12
    to e^-20 with a one-hot ``v``), so ``"solve"``, and ``"auto"`` up to n = 1025
    (``AUTO_GTH_MAX_N``; GTH costs :math:`O(n^3)`, GMRES above), use GTH elimination
    (:func:`markov_attn._stationary.gth`, componentwise accurate: 1e-7 there; as fast as GMRES
    on a (12, 197, 197) stack, 2x its time on (4, 12, 197, 197) and at n = 1025, 2-4.5x its
    compile time); explicit
    ``"gmres"`` and ``"power"`` keep the iteration and are outside the claim there. GTH
    eliminates down to token 0; where token 0 is transient (its stationary mass is 0: a
    padding token masked as a key at alpha = 1, or a causal chain with a one-hot ``v`` before
    the last token, whose reverse chain never goes back to an earlier token, so the last
    token absorbs it) it eliminates again down to the largest token of GMRES's answer, which
    is recurrent. Only a chain with several closed classes (no unique answer) takes GMRES's
    answer. Their gradients solve the adjoint with the same GTH factors
    (:func:`markov_attn._stationary.gth_poisson`): within 1e-4 of float64 in relative L2 on
    those chains, where the GMRES adjoint was 27-35 % off; a single small entry's derivative
    is a difference of two large values of the adjoint there, so float32 cancellation leaves
    directional derivatives along relative perturbations 0.1-2.5 % off. Under ``vmap`` the
    fallback's GMRES and the second elimination run for every member (a ``cond`` becomes a
    ``select``; about twice the time of the batched call):

    - ``"auto"`` (default): ``"gmres"`` on CPU; on GPU/TPU ``"solve"`` for ``n <= 256`` and
      ``"gmres"`` above; GTH for ``direction="out"`` with ``teleport_first=True`` (and a
      concrete ``alpha`` of 1) up to n = 1025.
    - ``"gmres"``: matrix-free GMRES with iterative refinement, :math:`O(n^2)` per product:
      each refinement takes the true residual in double-float (:mod:`markov_attn._df`) and
      corrects with one GMRES cycle of at most 20 products (ending early at a relative
      residual of 1e-4), until the error bound meets ``tol`` or the residual stops falling. A
      stopping rule on the float32 residual is not enough on nearly reducible chains: its
      rounding errs along the slow direction, which the solve amplifies by up to
      :math:`(1+\alpha)/(1-\alpha)`. On CPU the batch runs in cache-sized chunks.
    - ``"solve"``: a dense solve, :math:`O(n^3)` per matrix. On CPU it runs in NumPy (float64)
      through a host callback, because jaxlib 0.10's batched CPU LAPACK kernels can deadlock
      when several run concurrently in one jitted program; on GPU it is ``jnp.linalg.solve``.
      Not for TPU (use ``"gmres"``). For ``direction="out"`` with ``teleport_first=True``:
      GTH elimination (every backend).
    - ``"power"``: the teleported power method from ``v``, until the L1 change
      :math:`\delta` gives :math:`\alpha\delta/(1-\alpha) \le` ``tol`` or stops falling, then
      one refinement: the correction from the double-float residual, by the same iteration
      (both phases together at most ``max_steps``, 3,000 by default; the reference code's 200
      steps leave errors up to 2e-2).

    Gradients are implicit, never an unrolled loop: for a cotangent :math:`\bar g`, one adjoint
    solve :math:`u = M^{-\top}\bar g` (same method) gives :math:`\partial L/\partial A =
    \alpha\,\pi u^\top`, :math:`\partial L/\partial v = (1-\alpha)u`.

    ``alpha = 1`` (no teleportation) is allowed but ill-conditioned: for reducible chains the
    stationary distribution is not unique, and for nearly reducible ones (:math:`|\lambda_2|`
    within ~1e-4 of 1) every float32 iteration and every solve that forms :math:`I - A` loses
    accuracy (L1 2e-3 to 1e-1 on three blocks leaking e^-14 to e^-16). A concrete ``alpha``
    of 1 (for any matrix of the batch: the others then take it too) with ``"solve"``, or
    ``"auto"`` up to n = 1025, therefore uses GTH elimination there too (1.3e-7); a traced
    ``alpha`` (under ``jit``) cannot be seen to be 1 and keeps the method's usual path.

    Input contract: rows are renormalised (so rows that do not sum to 1 are read as weights, and
    an all-zero row becomes uniform). A NaN/inf or negative entry, ``alpha`` outside
    ``[0, 1]`` or an invalid ``v`` raises a ``ValueError`` when the values are concrete, and
    gives NaN for that matrix under ``jit``.

    Args:
      attn: attention ``(..., n, n)``, row-stochastic over the last axis (bf16/f16 inputs are
        computed in float32).
      alpha: teleportation weight in ``[0, 1]``, a scalar or one per matrix; traced.
      v: teleport (personalisation) distribution ``(..., n)``, uniform by default.
      direction: ``"in"`` (the chain itself) or ``"out"`` (the reverse chain).
      method: ``"auto"``, ``"solve"``, ``"gmres"`` or ``"power"``.
      tol: target L1 error of the iterative methods (static); they stop when the error bound
        meets it or at the float32 rounding floor, whichever comes first.
      max_steps: bound on matrix–vector products (GMRES) or power steps, 3,000 by default
        (attention heads need 10–60 products; nearly-permutation heads, whose eigenvalues all
        lie near the circle of radius ``alpha``, need as many as the power method). GMRES
        rounds it down to whole cycles of 20 products, at least one: ``max_steps < 40`` allows 20.
      teleport_first: for ``direction="out"``, reverse the teleported chain (default, the
        paper's order) or teleport the reversed chain (``False``).
      return_info: also return a :class:`SolveInfo` (residual, error bound, steps, converged)
        per matrix.

    Returns:
      ``(..., n)`` float32 distributions, non-negative, summing to 1 (and the ``SolveInfo``
      with ``return_info=True``).

    Examples:
      >>> import markov_attn as ma
      >>> A = [[0.01, 0.04, 0.02, 0.85, 0.08], [0.82, 0.04, 0.07, 0.01, 0.06],
      ...      [0.80, 0.07, 0.03, 0.05, 0.05], [0.06, 0.06, 0.03, 0.04, 0.81],
      ...      [0.53, 0.03, 0.03, 0.06, 0.35]]
      >>> [round(float(p), 3) for p in ma.tokenrank(A)]
      [0.278, 0.044, 0.031, 0.271, 0.376]
      >>> pi, info = ma.tokenrank(A, return_info=True)
      >>> bool(info.converged)
      True
    """
    check_choice("direction", direction, DIRECTIONS)
    check_choice("method", method, METHODS)
    check_values(attn)
    batch = np.shape(attn)[:-2]
    check_alpha(alpha, batch=batch)
    if v is not None:
        check_v(v, "v", batch)
    if not isinstance(tol, float | int) or isinstance(tol, bool) or not tol > 0:
        raise ValueError(f"tol must be a positive float (target L1 error), got {tol!r}")
    if max_steps is not None:
        max_steps = check_count("max_steps", max_steps, minimum=1)
    # The alpha = 1 problems (the reverse of the teleported chain, or no teleportation: as
    # ill-conditioned as the chain is nearly reducible) are accurate only by an elimination
    # without subtraction; a batch with some alpha of 1 goes there whole (GTH solves any alpha,
    # as accurately). A traced alpha cannot be seen to be 1.
    reverse_teleported = direction == "out" and teleport_first
    # compared in the dtype the solve runs in: 1 - 1e-9 is 1 in float32
    in_dtype = getattr(attn, "dtype", None) or np.asarray(attn).dtype
    dt = jax.dtypes.canonicalize_dtype(compute_dtype(in_dtype))
    unteleported = is_concrete(alpha) and np.any(np.asarray(alpha).astype(dt) == 1.0)
    n = np.shape(attn)[-1]
    if (reverse_teleported or unteleported) and (
        method == "solve" or (method == "auto" and n <= AUTO_GTH_MAX_N)
    ):
        method = "gth"
    pi, info = _tokenrank(
        attn, alpha, v, direction, method, float(tol), max_steps, bool(teleport_first)
    )
    return (pi, info) if return_info else pi


__all__ = ["tokenrank"]
