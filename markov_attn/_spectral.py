"""|λ2| and the spectral gap of attention chains."""

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from . import _host
from ._krylov import arnoldi, spectral_radius
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
KRYLOV_DIM = 128


def _zero_sum_start(n: int, dtype) -> jax.Array:
    """A fixed generic zero-sum start vector (deterministic, so results are reproducible)."""
    x = jax.random.normal(jax.random.key(0), (n,), dtype)
    return x - jnp.mean(x)


def lambda2_from_matvec(mv, shape, dtype, krylov):
    """|λ2| from ``krylov`` Arnoldi steps of a product ``mv`` (``A x`` or ``A^T x``, which have
    the same spectrum) on zero-sum vectors of ``shape`` ``(..., n)``, then Gelfand's formula."""
    n = shape[-1]
    if n == 1:
        return jnp.zeros(shape[:-1], dtype)
    m = min(krylov, n - 1)
    v0 = jnp.broadcast_to(_zero_sum_start(n, dtype), shape)
    project = lambda w: w - jnp.mean(w, axis=-1, keepdims=True)
    _, hess, _ = arnoldi(mv, v0, m, project=project)
    return spectral_radius(hess[..., :m, :])


def _lambda2_arnoldi(a, rows, krylov):
    # In the basis {1, U} (U orthonormal, spanning the zero-sum vectors) A is block upper
    # triangular, [[1, *], [0, U^T A U]]: the compression P A P onto zero-sum vectors carries
    # every eigenvalue but the Perron 1. (A x is also the faster product layout.) The rows are
    # normalised inside the product, (A / s) x = (A x) / s, so no normalised copy is written.
    inv, zero = row_scale(rows)

    def mv(x):
        return jnp.where(zero, jnp.mean(x, -1, keepdims=True), matvec(a, x) * inv)

    return lambda2_from_matvec(mv, a.shape[:-1], a.dtype, krylov)


def _second_largest(mod):
    """The second-largest value over the last axis (0 for a single value)."""
    if mod.shape[-1] < 2:
        return jnp.zeros(mod.shape[:-1], mod.dtype)
    return jnp.sort(mod, axis=-1)[..., -2]


def _lambda2_eig(a):
    return _second_largest(jnp.abs(_host.eigvals(a))).astype(a.dtype)


def triangular(a: jax.Array) -> jax.Array:
    """``(...)`` flags: matrices that are exactly lower or upper triangular (causal heads)."""
    n = a.shape[-1]
    i = jnp.arange(n)
    upper = (i[None, :] > i[:, None]).reshape((1,) * (a.ndim - 2) + (n, n))
    lower = (i[None, :] < i[:, None]).reshape((1,) * (a.ndim - 2) + (n, n))
    return jnp.all(jnp.where(upper, a == 0, True), axis=(-2, -1)) | jnp.all(
        jnp.where(lower, a == 0, True), axis=(-2, -1)
    )


def _lambda2_triangular(a):
    """|λ2| of a triangular matrix: its eigenvalues are its diagonal, exactly."""
    return _second_largest(jnp.abs(jnp.diagonal(a, axis1=-2, axis2=-1)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _lambda2(a, rows, method, krylov):
    """|λ2| of the row-normalised ``normalized_rows(a, rows)``, never written out."""
    inv, zero = row_scale(rows)
    # a zero row stands for the uniform row, so the normalised matrix is not triangular
    tri = triangular(a) & ~jnp.any(zero, axis=-1)
    d = jnp.diagonal(a, axis1=-2, axis2=-1) * inv
    exact = _second_largest(jnp.abs(d))
    if method == "eig":
        return jnp.where(tri, exact, _lambda2_eig(normalized_rows(a, rows)))
    item = a.shape[-1] * a.shape[-1] * a.dtype.itemsize
    est = map_over_batch(
        lambda a, rows: _lambda2_arnoldi(a, rows, krylov),
        a,
        rows,
        batch_ndim=a.ndim - 2,
        item_bytes=item,
    )
    return jnp.where(tri, exact, est)


def _lambda2_fwd(a, rows, method, krylov):
    return _lambda2(a, rows, method, krylov), (a, rows)


def _lambda2_bwd(method, krylov, res, g):
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
    return pullback(g[..., None, None] * grad)


_lambda2.defvjp(_lambda2_fwd, _lambda2_bwd)


@functools.partial(jax.jit, static_argnames=("method", "krylov"))
def _second_eigenvalue(attn, method, krylov):
    a = as_chain(attn)
    rows = row_sums(a)
    return poison(_lambda2(a, rows, method, krylov), invalid_matrices(a, rows))


def second_eigenvalue(
    attn: ChainLike, /, *, method: str = "arnoldi", krylov: int = KRYLOV_DIM
) -> PerMatrix:
    r"""|λ2|, the second-largest eigenvalue modulus of each attention chain.

    It sets how fast bounces converge to TokenRank (error :math:`\sim|\lambda_2|^n`) and how
    strongly a head forms metastable clusters (:math:`|\lambda_2| \to 1`: slow mixing).

    ``method="arnoldi"`` (default) uses no eigendecomposition, so it runs on CPU, GPU and TPU:
    with :math:`P = I - \mathbf{1}\mathbf{1}^\top/n` the projection onto zero-sum vectors,
    :math:`PAP` restricted to them carries every eigenvalue of :math:`A` but the Perron 1 (in a
    basis :math:`\{\mathbf{1}, U\}`, :math:`A` is block upper triangular), so ``krylov`` steps of
    Arnoldi (re-orthogonalised Gram–Schmidt) on :math:`x \mapsto PAx` give a small Hessenberg
    matrix :math:`H` whose
    spectral radius, found with matmuls only by Gelfand's formula
    :math:`\rho(H) = \lim_k \|H^k\|^{1/k}`, is :math:`|\lambda_2|`. On attention stacks at
    ``n = 197`` and ``1025`` it matches ``numpy.linalg.eigvals`` to about 1e-5.
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
      krylov: Krylov dimension of the Arnoldi method (static).

    Returns:
      ``(...)`` float32 values in ``[0, 1]``.

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
    check_values(attn)
    return _second_eigenvalue(attn, method, krylov)


def spectral_gap(
    attn: ChainLike, /, *, method: str = "arnoldi", krylov: int = KRYLOV_DIM
) -> Float[Array, "*batch"]:
    """The spectral gap ``1 - |λ2|`` of each chain (see :func:`second_eigenvalue`).

    Examples:
      >>> import markov_attn as ma
      >>> round(float(ma.spectral_gap([[0.9, 0.1], [0.1, 0.9]])), 3)
      0.2
    """
    return 1.0 - second_eigenvalue(attn, method=method, krylov=krylov)


__all__ = ["second_eigenvalue", "spectral_gap"]
