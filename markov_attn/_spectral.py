"""|λ2| and the spectral gap of attention chains."""

import functools
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from . import _host
from ._krylov import Radius, arnoldi_radius
from ._typing import ChainLike, PerMatrix
from ._util import (
    as_chain,
    check_choice,
    check_count,
    check_values,
    invalid_matrices,
    map_over_batch,
    matvec,
    normalized_rows,
    poison,
    row_scale,
    row_sums,
)

METHODS = ("arnoldi", "eig")
KRYLOV_DIM = 256
CHECK_EVERY = 64
SMALL = 64  # Krylov dimensions up to this are built whole, in one stage
TOL = 1e-5


def _zero_sum_start(n: int, dtype) -> jax.Array:
    """A fixed generic zero-sum start vector (deterministic, so results are reproducible)."""
    x = jax.random.normal(jax.random.key(0), (n,), dtype)
    return x - jnp.mean(x)


def check_residual_tol(tol) -> float:
    """``tol`` of the |λ2| estimate: a finite float ``>= 0``."""
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not 0 <= tol < float("inf"):
        raise ValueError(f"tol must be a finite float >= 0 (a residual), got {tol!r}")
    return float(tol)


def krylov_stages(m: int) -> tuple[int, ...]:
    """The Krylov dimensions at which the |λ2| estimate checks its residual: 16, 32, 64, 96,
    128, then every 64 up to ``m`` (which is always the last). The early checks are cheap and
    let fast-mixing and strongly metastable heads stop after a few products; the later ones
    are sparse because every stage is compiled on its own (each costs most of a second of XLA
    compilation on a 2-core CPU)."""
    marks = (16, 32, 64, 96, *range(128, m, CHECK_EVERY))
    return (*(k for k in marks if k <= m - 8), m)


def lambda2_from_matvec(mv, shape, dtype, krylov, tol, skip=None) -> Radius:
    """|λ2| from Arnoldi on a product ``mv`` (``A x`` or ``A^T x``, which have the same
    spectrum) on zero-sum vectors of ``shape`` ``(..., n)``, then Gelfand's formula; grown in
    the stages of :func:`krylov_stages` up to ``krylov`` while a residual is above ``tol``
    (members flagged in ``skip`` do not hold the others back)."""
    n = shape[-1]
    if n == 1:
        zero = jnp.zeros(shape[:-1], dtype)
        return Radius(zero, zero, jnp.zeros(shape[:-1], jnp.int32))
    m = min(krylov, n - 1)
    v0 = jnp.broadcast_to(_zero_sum_start(n, dtype), shape)
    project = lambda w: w - jnp.mean(w, axis=-1, keepdims=True)
    # tol = 0 asks for the whole space: one stage, no residual checks on the way; so does a
    # space of at most SMALL dimensions (n <= 65), whose products cost little, where stages
    # would only add compilation time
    stages = krylov_stages(m) if tol > 0 and m > SMALL else (m,)
    r = arnoldi_radius(mv, v0, stages, project=project, tol=tol, skip=skip)
    # |λ2| <= 1 for every row-stochastic matrix; on nearly reducible chains (several
    # eigenvalues within 1e-7 of 1) the Gelfand estimate from a short Krylov space overshoots
    # (up to 1.004 with 16 dimensions), which made head_weights NaN under jit
    return r._replace(value=jnp.minimum(r.value, 1.0))


def _lambda2_arnoldi(a, rows, skip, krylov, tol):
    # In the basis {1, U} (U orthonormal, spanning the zero-sum vectors) A is block upper
    # triangular, [[1, *], [0, U^T A U]]: the compression P A P onto zero-sum vectors carries
    # every eigenvalue but the Perron 1. (A x is also the faster product layout.) The rows are
    # normalised inside the product, (A / s) x = (A x) / s, so no normalised copy is written.
    inv, zero = row_scale(rows)

    def mv(x):
        return jnp.where(zero, jnp.mean(x, -1, keepdims=True), matvec(a, x) * inv)

    r = lambda2_from_matvec(mv, a.shape[:-1], a.dtype, krylov, tol, skip)
    return r.value, r.residual, r.steps


def _second_largest(mod):
    """The second-largest value over the last axis (0 for a single value)."""
    if mod.shape[-1] < 2:
        return jnp.zeros(mod.shape[:-1], mod.dtype)
    return jnp.sort(mod, axis=-1)[..., -2]


def _lambda2_eig(a):
    return jnp.minimum(_second_largest(jnp.abs(_host.eigvals(a))), 1.0).astype(a.dtype)


def triangular(a: jax.Array) -> jax.Array:
    """``(...)`` flags: matrices that are exactly lower or upper triangular (causal heads)."""
    n = a.shape[-1]
    if n == 1:
        return jnp.ones(a.shape[:-2], bool)
    # a lower triangular matrix has nothing right of a[0, 0], an upper one nothing left of
    # a[n-1, n-1]: a test on two rows, so the full pass over the stack (as costly as a
    # product) runs only when some matrix of the batch passes it
    maybe = jnp.all(a[..., 0, 1:] == 0, axis=-1) | jnp.all(a[..., -1, :-1] == 0, axis=-1)

    def full(a):
        i = jnp.arange(n)
        upper = (i[None, :] > i[:, None]).reshape((1,) * (a.ndim - 2) + (n, n))
        lower = (i[None, :] < i[:, None]).reshape((1,) * (a.ndim - 2) + (n, n))
        tri = jnp.all(jnp.where(upper, a == 0, True), axis=(-2, -1)) | jnp.all(
            jnp.where(lower, a == 0, True), axis=(-2, -1)
        )
        return tri & maybe

    return jax.lax.cond(jnp.any(maybe), full, lambda a: jnp.zeros_like(maybe), a)


def _lambda2_triangular(a):
    """|λ2| of a triangular matrix: its eigenvalues are its diagonal, exactly."""
    return _second_largest(jnp.abs(jnp.diagonal(a, axis1=-2, axis2=-1)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _lambda2(a, rows, bad, method, krylov, tol):
    """|λ2| of the row-normalised ``normalized_rows(a, rows)``, never written out, with the
    residual of its Ritz estimate and the Krylov dimension used (both 0 where exact). ``bad``
    flags invalid matrices (their outputs are poisoned by the caller): like the triangular
    ones, they do not hold a batch's Krylov space growing."""
    inv, zero = row_scale(rows)
    # a zero row stands for the uniform row, so the normalised matrix is not triangular
    tri = triangular(a) & ~jnp.any(zero, axis=-1)
    d = jnp.diagonal(a, axis1=-2, axis2=-1) * inv
    exact = _second_largest(jnp.abs(d))
    none = jnp.zeros(tri.shape, a.dtype)
    if method == "eig":
        value = jnp.where(tri, exact, _lambda2_eig(normalized_rows(a, rows)))
        return value, none, jnp.zeros(tri.shape, jnp.int32)
    item = a.shape[-1] * a.shape[-1] * a.dtype.itemsize
    est, res, steps = map_over_batch(
        lambda a, rows, skip: _lambda2_arnoldi(a, rows, skip, krylov, tol),
        a,
        rows,
        tri | bad,
        batch_ndim=a.ndim - 2,
        item_bytes=item,
        whole_chunks=True,  # so that a chunk stops growing its Krylov space when it converged
    )
    return jnp.where(tri, exact, est), jnp.where(tri, 0.0, res), jnp.where(tri | bad, 0, steps)


def _lambda2_fwd(a, rows, bad, method, krylov, tol):
    return _lambda2(a, rows, bad, method, krylov, tol), (a, rows)


def _lambda2_bwd(method, krylov, tol, res, cotangents):
    g = cotangents[0]  # the residual and the step count are not differentiated
    a_raw, rows = res
    a, pullback = jax.vjp(normalized_rows, a_raw, rows)
    # First-order perturbation of a simple eigenvalue: d lam = l^T dA r with l^T r = 1, and
    # d|lam| = Re(conj(lam) d lam) / |lam|. Needs the eigenvectors: CPU/GPU only.
    n = a.shape[-1]
    w, vr = _host.eig(a)
    perron = jnp.argmin(jnp.abs(w - 1.0), axis=-1)
    tokens = jnp.arange(n).reshape((1,) * perron.ndim + (n,))
    mod = jnp.where(tokens == perron[..., None], -1.0, jnp.abs(w))
    k2 = jnp.argmax(mod, axis=-1)
    lam = jnp.take_along_axis(w, k2[..., None], axis=-1)[..., 0]
    r = jnp.take_along_axis(vr, k2[..., None, None], axis=-1)[..., 0]
    e = jax.nn.one_hot(k2, n, dtype=vr.dtype)
    left = _host.solve(jnp.swapaxes(vr, -1, -2), e)
    unit = jnp.conj(lam) / jnp.maximum(jnp.abs(lam), jnp.finfo(a.dtype).tiny)
    grad = jnp.real(unit[..., None, None] * left[..., :, None] * r[..., None, :])
    # a triangular matrix: |λ2| is one diagonal entry's modulus
    d = jnp.diagonal(a, axis1=-2, axis2=-1)
    order = jnp.argsort(jnp.abs(d), axis=-1)
    k = order[..., -2] if n > 1 else order[..., -1]
    eye_k = jax.nn.one_hot(k, n, dtype=a.dtype)
    sign = jnp.sign(jnp.take_along_axis(d, k[..., None], axis=-1))
    grad_tri = (sign * eye_k)[..., :, None] * eye_k[..., None, :]
    tri = triangular(a_raw) & ~jnp.any(row_scale(rows)[1], axis=-1)  # as in the forward pass
    grad = jnp.where(tri[..., None, None], grad_tri, grad.astype(a.dtype))
    return (*pullback(g[..., None, None] * grad), None)


_lambda2.defvjp(_lambda2_fwd, _lambda2_bwd)


class Lambda2Info(NamedTuple):
    r"""How an |λ2| estimate went, per matrix (``second_eigenvalue(..., return_info=True)``).

    Attributes:
      residual: :math:`\|A Y - Y (Y^\top A Y)\|` of the dominant Ritz subspace ``Y`` of the
        Krylov compression (the Ritz vector of the estimate, two for a complex pair), on
        zero-sum vectors; for a normal matrix the estimate is within it of an eigenvalue
        modulus (the Krylov space could in principle still miss one of larger modulus). 0
        where the value is exact (``method="eig"``, triangular matrices); not differentiated
        (its gradient is 0).
      steps: Krylov dimension of the estimate (products with the matrix), 0 where exact or
        invalid.
      converged: ``residual <= tol`` (``False`` for a NaN input).
    """

    residual: Float[Array, "*batch"]
    steps: Int[Array, "*batch"]
    converged: Bool[Array, "*batch"]


@functools.partial(jax.jit, static_argnames=("method", "krylov", "tol"))
def _second_eigenvalue(attn, method, krylov, tol):
    a = as_chain(attn)
    rows = row_sums(a)
    bad = invalid_matrices(a, rows)
    value, res, steps = _lambda2(a, rows, bad, method, krylov, tol)
    res = poison(res, bad)
    return poison(value, bad), Lambda2Info(res, steps, res <= tol)


def second_eigenvalue(
    attn: ChainLike,
    /,
    *,
    method: str = "arnoldi",
    krylov: int = KRYLOV_DIM,
    tol: float = TOL,
    return_info: bool = False,
) -> PerMatrix | tuple[PerMatrix, Lambda2Info]:
    r"""|λ2|, the second-largest eigenvalue modulus of each attention chain.

    It sets how fast bounces converge to TokenRank (error :math:`\sim|\lambda_2|^n`) and how
    strongly a head forms metastable clusters (:math:`|\lambda_2| \to 1`: slow mixing).

    ``method="arnoldi"`` (default) uses no eigendecomposition, so it runs on CPU, GPU and TPU:
    with :math:`P = I - \mathbf{1}\mathbf{1}^\top/n` the projection onto zero-sum vectors,
    :math:`PAP` restricted to them carries every eigenvalue of :math:`A` but the Perron 1 (in a
    basis :math:`\{\mathbf{1}, U\}`, :math:`A` is block upper triangular), so Arnoldi
    (re-orthogonalised Gram–Schmidt) on :math:`x \mapsto PAx` gives a small Hessenberg matrix
    :math:`H` whose spectral radius, found with matmuls only by Gelfand's formula
    :math:`\rho(H) = \lim_k \|H^k\|^{1/k}`, is :math:`|\lambda_2|`. The Krylov space grows
    in stages (16, 32, 64, 96, 128, then every 64) up to ``krylov``: after each stage the residual
    of the dominant Ritz vector(s) of :math:`H` (from the Arnoldi relation, no extra product)
    says whether that Ritz value has converged, a matrix keeps the estimate of the first stage
    whose residual met ``tol``, and the next stage runs only while some matrix of the batch
    chunk has a residual above ``tol`` (up to ``n = 65`` the whole space is built in one
    stage: its products cost little). Fast-mixing and metastable heads stop at 16–64
    products; heads whose leading eigenvalues crowd near a circle (positional,
    near-circulant heads) take 128–256 at ``n = 1025``. On attention stacks at ``n = 197``
    and ``1025`` it matches ``numpy.linalg.eigvals`` to about 1e-6; ``return_info=True``
    reports the residual, the
    Krylov dimension used and whether the residual met ``tol``.
    ``method="eig"`` is a dense eigendecomposition, :math:`O(n^3)`, the oracle: on CPU it runs
    in NumPy through a host callback (jaxlib 0.10's batched CPU LAPACK kernels can deadlock
    when several run concurrently in one jitted program), on GPU ``jnp.linalg.eigvals``; it does
    not lower for TPU.

    **Causal (triangular) heads are exact:** a lower- or upper-triangular matrix (decoder
    attention, see ``transition(..., causal=True)``) has its diagonal as eigenvalues, so every
    matrix that is exactly triangular gets the second-largest :math:`|A_{ii}|` (both methods).
    Its eigenvalues are ill-conditioned (the matrix is far from normal), so no Krylov or float32
    eigen-solver can be trusted there: an Arnoldi estimate on a 64-token causal head can read
    0.75 where the eigenvalues give 0.05, even with ``krylov = n - 1``.

    **Other non-normal heads** (nearly triangular, nearly a permutation, near-circulant and
    nearly reducible at once): the Arnoldi value is the spectral radius of the Krylov
    compression, which converges to |λ2| but is sensitive to rounding when eigenvalues are
    ill-conditioned; errors up to ~1e-3–1e-2 are possible there (~1e-2 for near-permutations at
    ``n ≈ 1000``). A larger ``krylov`` or ``method="eig"`` helps for normal-ish heads; for
    highly non-normal ones the eigenvalues themselves are not determined to float32 accuracy by
    the matrix entries.

    Gradients use the eigenvector formula :math:`d|\lambda| = \mathrm{Re}(\bar\lambda\, l^\top
    dA\, r)/|\lambda|` and need an eigendecomposition in the backward pass (CPU/GPU); for a
    triangular matrix, the derivative of its diagonal entry. At a repeated |λ2| (other than a
    complex-conjugate pair) the modulus is not differentiable.

    NaN/inf or negative entries raise a ``ValueError`` when the values are concrete and give
    NaN for that matrix under ``jit``.

    Args:
      attn: attention ``(..., n, n)``, row-stochastic over the last axis (rows renormalised).
      method: ``"arnoldi"`` or ``"eig"``.
      krylov: largest Krylov dimension of the Arnoldi method (static); ``n - 1`` at most.
      tol: residual at which the estimate counts as converged (static); ``0`` builds the
        full ``krylov``-dimensional space in one stage, with no checks on the way (with
        ``krylov=128``, the fixed-dimension estimate of earlier versions). Under
        ``jax.vmap`` every stage runs (the stage conditions become selects); call it on the
        batch instead, it is batched over leading axes. On GPU and TPU a whole batch shares
        one Krylov space, so it stops only when all its matrices have converged.
      return_info: also return a :class:`Lambda2Info` (residual, Krylov dimension used,
        converged).

    Returns:
      ``(...)`` float32 values in ``[0, 1]`` (and the ``Lambda2Info`` with
      ``return_info=True``).

    Examples:
      >>> import markov_attn as ma
      >>> A = [[0.01, 0.04, 0.02, 0.85, 0.08], [0.82, 0.04, 0.07, 0.01, 0.06],
      ...      [0.80, 0.07, 0.03, 0.05, 0.05], [0.06, 0.06, 0.03, 0.04, 0.81],
      ...      [0.53, 0.03, 0.03, 0.06, 0.35]]
      >>> round(float(ma.second_eigenvalue(A)), 3)
      0.626
    """
    check_choice("method", method, METHODS)
    krylov = check_count("krylov", krylov, minimum=1, what=" (Krylov dimension)")
    tol = check_residual_tol(tol)
    check_values(attn)
    value, info = _second_eigenvalue(attn, method, krylov, tol)
    return (value, info) if return_info else value


def spectral_gap(
    attn: ChainLike, /, *, method: str = "arnoldi", krylov: int = KRYLOV_DIM, tol: float = TOL
) -> Float[Array, "*batch"]:
    """The spectral gap ``1 - |λ2|`` of each chain (see :func:`second_eigenvalue`).

    Examples:
      >>> import markov_attn as ma
      >>> round(float(ma.spectral_gap([[0.9, 0.1], [0.1, 0.9]])), 3)
      0.2
    """
    return 1.0 - second_eigenvalue(attn, method=method, krylov=krylov, tol=tol)


__all__ = ["Lambda2Info", "second_eigenvalue", "spectral_gap"]
