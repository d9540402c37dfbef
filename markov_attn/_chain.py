"""Building and inspecting chains: softmax, renormalisation, teleportation, the reverse chain,
the one-step operations, and the eager validator."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Integer

from ._typing import Chain, ChainLike, Dist, DistLike
from ._util import (
    HIGHEST,
    as_chain,
    check_alpha,
    check_batch,
    check_square,
    check_values,
    compute_dtype,
    invalid_dists,
    invalid_matrices,
    is_concrete,
    overflow_error,
    poison,
    safe_normalize,
    traced_range,
)

# --------------------------------------------------------------------------------------------
# transition / normalize


def _keep_index(keep, n: int, causal: bool = False) -> np.ndarray | None:
    """Turns ``keep`` (slice, index array or boolean mask over tokens) into sorted-as-given
    integer indices, eagerly (it changes the output shape, so it must be concrete); with
    ``causal``, refuses an order that is not increasing (the causal order)."""
    idx = _keep_indices(keep, n)
    if causal and idx is not None and np.any(np.diff(idx) < 0):
        raise ValueError(
            "causal=True needs keep= in increasing token order (the causal order); sort it"
        )
    return idx


def _keep_indices(keep, n: int) -> np.ndarray | None:
    if keep is None:
        return None
    if isinstance(keep, slice):
        idx = np.arange(n)[keep]
    else:
        if isinstance(keep, jax.core.Tracer):
            raise ValueError(
                "keep= changes the output shape, so it must be a concrete slice or NumPy "
                "index/boolean array, not a traced value; pass a traced boolean mask as mask= "
                "instead (it excludes keys without changing the shape)"
            )
        k = np.asarray(keep)
        if k.dtype == bool:
            if k.shape != (n,):
                raise ValueError(
                    f"a boolean keep= must have shape ({n},) (one flag per token), got {k.shape}"
                )
            idx = np.flatnonzero(k)
        elif np.issubdtype(k.dtype, np.integer):
            if k.ndim != 1:
                raise ValueError(f"an index keep= must be one-dimensional, got shape {k.shape}")
            if np.any(k < -n) or np.any(k >= n):
                raise ValueError(f"keep= indices must lie in [-{n}, {n}), got {k.tolist()}")
            idx = np.where(k < 0, k + n, k)
            if len(np.unique(idx)) != len(idx):
                raise ValueError("keep= indices must not repeat a token")
        else:
            raise ValueError(
                f"keep= must be a slice, an integer index array or a boolean mask, got dtype "
                f"{k.dtype}"
            )
    if idx.size == 0:
        raise ValueError("keep= selects no token; a chain needs at least one state")
    return idx.astype(np.int32)


def _full_mask(mask, logits) -> bool:
    """A mask with fewer axes than the logits whose last two axes are ``(n, n)``: a full mask
    broadcast over the logits' leading axes (it was read as a batch of n key masks, which
    added an axis or gave each head a row of the mask as its key mask)."""
    n = logits.shape[-1]
    return mask.ndim >= 2 and mask.shape[-2:] == (n, n)


@functools.partial(jax.jit, static_argnames=("causal",))
def _transition(logits, idx, mask, causal):
    dtype = compute_dtype(logits.dtype)
    logits = logits.astype(dtype)
    if mask is not None:
        mask = jnp.asarray(mask, bool)
        if mask.ndim < logits.ndim and not _full_mask(mask, logits):  # keys: (..., 1, n)
            mask = mask[..., None, :]
    if causal:  # key j visible to query i iff j <= i, in the original token order
        n0 = logits.shape[-1]
        tri = jnp.tril(jnp.ones((n0, n0), bool))
        if mask is not None:
            tri = tri.reshape((1,) * (mask.ndim - 2) + tri.shape)
        mask = tri if mask is None else mask & tri
    if idx is not None:
        logits = jnp.take(jnp.take(logits, idx, axis=-2), idx, axis=-1)
        if mask is not None:
            if mask.shape[-2] != 1:
                mask = jnp.take(mask, idx, axis=-2)
            mask = jnp.take(mask, idx, axis=-1)
    n = logits.shape[-1]
    if mask is None:
        return jax.nn.softmax(logits, axis=-1)
    mask = jnp.broadcast_to(mask, jnp.broadcast_shapes(mask.shape, logits.shape))
    logits = jnp.broadcast_to(logits, mask.shape)
    masked = jnp.where(mask, logits, -jnp.inf)
    m = jnp.max(masked, axis=-1, keepdims=True)
    m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    e = jnp.where(mask, jnp.exp(jnp.where(mask, logits - m, 0.0)), 0.0)
    s = jnp.sum(e, axis=-1, keepdims=True)
    # every key masked: uniform; visible keys whose scores are all -inf (s = 0 too) or a NaN
    # score give NaN, as the unmasked softmax does (never a plausible uniform row)
    empty = ~jnp.any(mask, axis=-1, keepdims=True)
    return jnp.where(empty, jnp.asarray(1.0 / n, dtype), e / s)


def transition(
    logits: ChainLike,
    /,
    *,
    keep: slice | Integer[ArrayLike, " k"] | Bool[ArrayLike, " n"] | None = None,
    mask: Bool[ArrayLike, "*#batch n"] | Bool[ArrayLike, "*#batch n n"] | None = None,
    causal: bool = False,
) -> Float[Array, "*batch m m"]:
    r"""Row-softmax of pre-softmax attention scores, the chain's transition matrix.

    For scores :math:`S` (rows = queries, columns = keys) this returns

    .. math:: A_{ij} = \frac{m_{ij} \exp S_{ij}}{\sum_k m_{ik} \exp S_{ik}},

    computed in float32 (or wider), where :math:`m` is the optional key mask. Tokens listed by
    ``keep`` are kept on both axes *before* the softmax, which is how the reference code drops
    the CLS token (``keep=slice(1, None)``); it equals dropping the CLS column from the
    probabilities and renormalising each row.

    Args:
      logits: scores of shape ``(..., n, n)``; any leading batch/layer/head axes.
      keep: tokens to keep (slice, integer indices or a boolean mask of length ``n``), applied
        to queries and keys alike. It changes the shape, so it must be concrete.
      mask: boolean, ``True`` for keys that may be attended to. Either a key mask of shape
        ``(..., n)`` or a full mask of shape ``(..., n, n)`` (a mask with fewer axes than
        ``logits`` whose last two are ``(n, n)`` is a full mask, broadcast over the leading
        axes); given over the original ``n`` tokens (before ``keep``). A row whose keys are
        all masked becomes uniform (the dangling-node convention of PageRank); a row whose
        visible scores are all ``-inf`` is NaN, as in a plain softmax. Masked tokens stay
        states of the chain; drop them with ``keep`` to remove them.
      causal: decoder (causal) attention: query ``i`` sees keys ``j <= i`` only (in the
        original token order, combined with ``mask``). The chain is lower triangular: token 0
        is absorbing without teleportation, and its eigenvalues are its diagonal (which
        :func:`second_eigenvalue` reads exactly).

    Returns:
      Row-stochastic ``(..., m, m)`` float32 array, ``m`` = number of kept tokens.

    Examples:
      >>> import jax.numpy as jnp, markov_attn as ma
      >>> A = ma.transition(jnp.zeros((4, 4)), keep=slice(1, None))
      >>> A.shape, float(A[0, 0])
      ((3, 3), 0.3333...)
      >>> ma.transition(jnp.zeros((3, 3)), causal=True)[2].tolist()
      [0.3333..., 0.3333..., 0.3333...]
    """
    logits = jnp.asarray(logits)
    check_square(logits.shape, "logits")
    n = logits.shape[-1]
    idx = _keep_index(keep, n, causal)
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.dtype != bool:
            raise ValueError(f"mask must be boolean (True = valid key), got dtype {mask.dtype}")
        if mask.shape[-1] != n or (mask.ndim == logits.ndim and mask.shape[-2] not in (1, n)):
            raise ValueError(
                f"mask must have shape (..., {n}) (keys) or (..., {n}, {n}), got {mask.shape}"
            )
    return _transition(logits, None if idx is None else jnp.asarray(idx), mask, bool(causal))


@jax.jit
def _normalize(weights):
    w = weights.astype(compute_dtype(weights.dtype))
    return poison(safe_normalize(w, axis=-1), invalid_matrices(w))


def normalize(weights: ChainLike, /) -> Chain:
    r"""Renormalises non-negative weights into a row-stochastic matrix, :math:`W / W\mathbf{1}`.

    For probabilities that only need renormalising (after dropping tokens, rounding, or mixing
    heads). Rows that sum to zero become uniform.

    Args:
      weights: non-negative ``(..., n, n)``.

    Returns:
      Row-stochastic float32 ``(..., n, n)``.

    Raises:
      ValueError: if concrete weights are negative or not finite (under ``jit`` such a
        matrix comes back as NaN).

    Examples:
      >>> import markov_attn as ma
      >>> ma.normalize([[1.0, 3.0], [0.0, 0.0]]).tolist()
      [[0.25, 0.75], [0.5, 0.5]]
    """
    weights = jnp.asarray(weights)
    check_square(weights.shape, "weights")
    if is_concrete(weights):
        w = np.asarray(weights, dtype=np.float64)
        if not np.all(np.isfinite(w)):
            raise ValueError("weights contain NaN or inf; check the attention extraction")
        if np.any(w < 0):
            raise ValueError(
                f"weights must be non-negative (min {w.min():.3g}); if these are "
                "pre-softmax scores, use ma.transition instead"
            )
        if np.any(w.sum(-1) > np.finfo(compute_dtype(weights.dtype)).max):
            raise overflow_error("weights")  # finite entries, but a row sum of inf
    return _normalize(weights)


# --------------------------------------------------------------------------------------------
# teleport / reverse


def _uniform_or(v, n: int, dtype, batch_shape=()):
    """``v`` renormalised (NaN where it has a NaN/inf or negative entry or sums to zero), or
    uniform when ``v`` is ``None``."""
    if v is None:
        return jnp.full((*batch_shape, n), 1.0 / n, dtype)
    v = jnp.asarray(v).astype(dtype)
    if v.shape[-1:] != (n,):
        raise ValueError(
            f"v must be a distribution over the {n} tokens, shape (..., {n}), got shape {v.shape}"
        )
    return poison(safe_normalize(v), not_a_dist(v))


def not_a_dist(x: jax.Array) -> jax.Array:
    """``(...)`` flags: vectors ``(..., n)`` with a NaN/inf or a negative entry, or that sum to
    zero (``safe_normalize`` would make those uniform: a plausible answer to an invalid
    input)."""
    return invalid_dists(x) | (jnp.sum(x, -1) == 0)


def check_v(v, name: str = "v", batch=None) -> None:
    """Eager checks of a teleport distribution (values, when concrete); with ``batch``, the
    attention's batch shape, also that ``v``'s leading axes broadcast with it."""
    arr = np.asarray(v) if isinstance(v, list | tuple) else v
    if jnp.ndim(arr) == 0:
        raise ValueError(f"{name} must be a distribution (..., n) over the tokens, got a scalar")
    if batch is not None:
        check_batch(name, np.shape(arr)[:-1], batch, "pass one distribution (n,) or one per matrix")
    if is_concrete(arr):
        x = np.asarray(arr, np.float64)
        if not np.all(np.isfinite(x)) or np.any(x < 0):
            raise ValueError(f"{name} must be finite and non-negative (a distribution)")
        if np.any(x.sum(-1) == 0):
            raise ValueError(f"{name} sums to zero; pass a distribution over the tokens")


@jax.jit
def _teleport(attn, alpha, v):
    a = as_chain(attn)
    n = a.shape[-1]
    v = _uniform_or(v, n, a.dtype)
    alpha = traced_range(jnp.asarray(alpha, a.dtype), 0.0, 1.0)  # a scalar or one per matrix
    batch = jnp.broadcast_shapes(a.shape[:-2], v.shape[:-1], alpha.shape)
    a = safe_normalize(poison(a, invalid_matrices(a)))  # rows renormalised (input contract)
    a = jnp.broadcast_to(a, (*batch, n, n))
    v = jnp.broadcast_to(v, (*batch, n))
    alpha = jnp.broadcast_to(alpha, batch)[..., None, None]
    return alpha * a + (1.0 - alpha) * v[..., None, :]


def teleport(
    attn: ChainLike,
    /,
    *,
    alpha: float | Float[ArrayLike, "*#batch"] = 0.99,
    v: DistLike | None = None,
) -> Chain:
    r"""The PageRank-style teleported chain :math:`T = \alpha A + (1-\alpha)\,\mathbf{1} v^\top`.

    With probability :math:`1-\alpha` the walker jumps to a token drawn from :math:`v`. ``T`` is
    strictly positive when ``v`` is, so it has a unique stationary distribution. This is the
    textbook personalised PageRank (``1 vᵀ``), not the reference code's ``p pᵀ / N``.

    Args:
      attn: row-stochastic ``(..., n, n)``.
      alpha: weight of the attention chain, in ``[0, 1]``: a scalar or one per matrix
        ``(...)``, broadcast against the batch (traced: sweeping it does not recompile).
      v: teleport distribution ``(..., n)``; uniform by default; renormalised to sum 1.

    Returns:
      Row-stochastic ``(..., n, n)``.

    Examples:
      >>> import jax.numpy as jnp, markov_attn as ma
      >>> ma.teleport(jnp.eye(2), alpha=0.5).tolist()
      [[0.75, 0.25], [0.25, 0.75]]
    """
    check_values(attn)
    check_alpha(alpha, batch=np.shape(attn)[:-2])
    if v is not None:
        check_v(v, "v", np.shape(attn)[:-2])
    return _teleport(attn, alpha, v)


@jax.jit
def _reverse(attn):
    a = as_chain(attn)
    # the reverse of the chain (rows renormalised first), not of the raw weights
    a = safe_normalize(poison(a, invalid_matrices(a)))
    return jnp.swapaxes(safe_normalize(a, axis=-2), -1, -2)


def reverse(attn: ChainLike, /) -> Chain:
    r"""The reverse chain, as a row-stochastic matrix.

    The paper's reverse chain is the column-normalised :math:`C = A\,\mathrm{diag}(\mathbf{1}^\top
    A)^{-1}`, stepped as :math:`x_{n+1} = C x_n`. This returns :math:`R = C^\top`, so every
    function of this library applies to it unchanged: one step from one-hot(``j``) is column
    ``j`` of ``A``, normalised ("who looks at token ``j``"). A column that sums to zero (a token
    no query attends to) gives a uniform row.

    Args:
      attn: row-stochastic ``(..., n, n)``.

    Returns:
      Row-stochastic ``(..., n, n)`` with ``R[..., j, i] = A[..., i, j] / sum_k A[..., k, j]``,
      ``A`` the input with its rows renormalised (the reverse of the chain, not of the raw
      weights).

    Examples:
      >>> import markov_attn as ma
      >>> ma.reverse([[0.5, 0.5], [1.0, 0.0]]).tolist()
      [[0.3333333432674408, 0.6666666865348816], [1.0, 0.0]]
    """
    check_values(attn)
    return _reverse(attn)


# --------------------------------------------------------------------------------------------
# one-step operations


def one_hot(index, n: int, batch_shape: tuple, dtype) -> jax.Array:
    """One-hot distributions for integer token indices broadcast (right-aligned) against
    ``batch_shape``; NaN for an index outside ``[-n, n)`` (a traced index cannot raise)."""
    index = jnp.asarray(index)
    if index.ndim > len(batch_shape):
        raise ValueError(
            f"token index of shape {index.shape} has more axes than the batch shape "
            f"{batch_shape}; index arrays broadcast against the leading axes of attn"
        )
    index = jnp.broadcast_to(index, batch_shape)
    # compare in a type that holds -n and n: uint8 wrapped -n and int8 overflowed, which made
    # every valid index NaN; unsigned indices are compared before the cast, so a huge uint32
    # cannot wrap to a valid negative one
    if jnp.issubdtype(index.dtype, jnp.unsignedinteger):
        ok = index < jnp.asarray(n, index.dtype) if n <= jnp.iinfo(index.dtype).max else True
        index = jnp.where(ok, index, 0).astype(jnp.int32)
    else:
        if jnp.iinfo(index.dtype).bits < 32:
            index = index.astype(jnp.int32)
        ok = (index >= -n) & (index < n)
    index = jnp.where(index < 0, index + n, index)
    return poison(jax.nn.one_hot(index, n, dtype=dtype), ~ok)


def check_index(index, n: int) -> None:
    if is_concrete(index):
        i = np.asarray(index)
        if not np.issubdtype(i.dtype, np.integer):
            raise ValueError(f"token index must be an integer, got dtype {i.dtype}")
        if np.any(i < -n) or np.any(i >= n):
            raise ValueError(f"token index must lie in [-{n}, {n}), got {i.tolist()}")


@jax.jit
def _column_sum(attn):
    a = as_chain(attn)
    return poison(jnp.mean(safe_normalize(a), axis=-2), invalid_matrices(a))


def column_sum(attn: ChainLike, /) -> Dist:
    r"""Mean incoming attention per token, :math:`A^\top \mathbf{1} / n`: one bounce from uniform.

    Args:
      attn: row-stochastic ``(..., n, n)``.

    Returns:
      ``(..., n)``, sums to 1 (the column sums divided by ``n``).

    Examples:
      >>> import markov_attn as ma
      >>> ma.column_sum([[0.5, 0.5], [1.0, 0.0]]).tolist()
      [0.75, 0.25]
    """
    check_values(attn)
    return _column_sum(attn)


@jax.jit
def _row_select(attn, i):
    a = as_chain(attn)
    batch = jnp.broadcast_shapes(a.shape[:-2], jnp.shape(i))
    e = one_hot(i, a.shape[-1], batch, a.dtype)
    out = jnp.einsum("...i,...ij->...j", e, safe_normalize(a), precision=HIGHEST)
    return poison(out, jnp.broadcast_to(invalid_matrices(a), batch))


def row_select(attn: ChainLike, i: Integer[ArrayLike, "*#batch"], /) -> Dist:
    """Where token ``i`` looks: row ``i`` of the attention, one bounce from one-hot(``i``).

    Args:
      attn: row-stochastic ``(..., n, n)``.
      i: token index; an integer array broadcasts (right-aligned) against ``attn.shape[:-2]``.

    Returns:
      ``(..., n)``.

    Examples:
      >>> import markov_attn as ma
      >>> ma.row_select([[0.5, 0.5], [1.0, 0.0]], 1).tolist()
      [1.0, 0.0]
    """
    attn = jnp.asarray(attn)
    check_square(attn.shape)
    check_index(i, attn.shape[-1])
    check_values(attn)
    return _row_select(attn, jnp.asarray(i))


@jax.jit
def _column_select(attn, j):
    r = _reverse(attn)
    e = one_hot(j, r.shape[-1], jnp.broadcast_shapes(r.shape[:-2], jnp.shape(j)), r.dtype)
    return jnp.einsum("...i,...ij->...j", e, r, precision=HIGHEST)


def column_select(attn: ChainLike, j: Integer[ArrayLike, "*#batch"], /) -> Dist:
    """Who looks at token ``j``: column ``j`` of the attention, normalised to sum 1.

    This is one step of the reverse chain (:func:`reverse`) from one-hot(``j``).

    Args:
      attn: row-stochastic ``(..., n, n)``.
      j: token index; an integer array broadcasts (right-aligned) against ``attn.shape[:-2]``.

    Returns:
      ``(..., n)``, sums to 1.

    Examples:
      >>> import markov_attn as ma
      >>> ma.column_select([[0.5, 0.5], [1.0, 0.0]], 0).tolist()
      [0.3333333432674408, 0.6666666865348816]
    """
    attn = jnp.asarray(attn)
    check_square(attn.shape)
    check_index(j, attn.shape[-1])
    check_values(attn)
    return _column_select(attn, jnp.asarray(j))


# --------------------------------------------------------------------------------------------
# validation


def _default_atol(dtype) -> float:
    eps = float(jnp.finfo(dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.float32).eps)
    # rounding each probability to the dtype moves a row sum by at most eps / 2, whatever n
    # (bf16 softmax rows, from jax.nn.softmax or cast from float32, deviate by up to 0.0055 at
    # n = 197 and 1025); 4 eps * sqrt(n) accepted bf16 rows summing to 1.3 at n = 197
    return max(1e-4, 4.0 * eps)


def check_chain(
    attn: ChainLike,
    /,
    *,
    atol: float | None = None,
    alpha: float | None = None,
) -> Float[Array, "*batch n n"]:
    """Eagerly validates a batch of transition matrices and raises a ``ValueError`` naming the
    problem and the fix.

    Checks: at least two axes and square, no NaN/inf, no negative entries, every row summing to
    1 within ``atol``, and (if given) ``alpha`` in ``[0, 1]``. Not jittable: it reads values.

    Args:
      attn: ``(..., n, n)`` array to check.
      atol: tolerance on the row sums; by default ``max(1e-4, 4 eps)`` for the input dtype
        (0.031 for bf16, whose softmax rows deviate from 1 by up to about 0.006; 1e-4 for
        float32).
      alpha: a teleportation weight to range-check along with the matrix.

    Returns:
      ``attn`` as a JAX array, unchanged, so the call can be used inline.

    Examples:
      >>> import markov_attn as ma
      >>> ma.check_chain([[0.5, 0.6], [1.0, 0.0]])
      Traceback (most recent call last):
      ...
      ValueError: rows of attn must sum to 1, but row (0,) sums to 1.1 ...
    """
    if isinstance(attn, jax.core.Tracer):
        raise ValueError(
            "check_chain reads values, so it cannot run inside jit/vmap/grad; call it on "
            "concrete arrays before the transformed function"
        )
    if alpha is not None:
        check_alpha(alpha)
    arr = jnp.asarray(attn)
    check_square(arr.shape)
    a = np.asarray(arr.astype(compute_dtype(arr.dtype)), dtype=np.float64)
    n = a.shape[-1]
    if n == 0:
        raise ValueError(f"attn is empty (shape {a.shape}); a chain needs at least one token")
    bad = ~np.isfinite(a)
    if bad.any():
        where = tuple(int(x) for x in np.argwhere(bad)[0])
        raise ValueError(
            f"attn contains NaN or inf ({int(bad.sum())} entries, first at {where}); check the "
            "attention extraction (an all-masked row gives NaN in a plain softmax; "
            "ma.transition handles masks)"
        )
    if (a < 0).any():
        where = tuple(int(x) for x in np.argwhere(a < 0)[0])
        raise ValueError(
            f"attn has negative entries (min {a.min():.3g} at {where}); attention "
            "probabilities are non-negative: pass pre-softmax scores through ma.transition"
        )
    tol = _default_atol(arr.dtype) if atol is None else float(atol)
    dev = np.abs(a.sum(-1) - 1.0)
    if dev.size and dev.max() > tol:
        k = np.unravel_index(int(np.argmax(dev)), dev.shape)
        rs = a.sum(-1)[k]
        raise ValueError(
            f"rows of attn must sum to 1, but row {tuple(int(x) for x in k)} sums to "
            f"{rs:.4g} (max deviation {dev.max():.3g}, atol {tol:.3g}); if these are "
            "probabilities, renormalise them with ma.normalize; if they are pre-softmax "
            "scores, use ma.transition"
        )
    return arr


__all__ = [
    "check_chain",
    "column_select",
    "column_sum",
    "normalize",
    "reverse",
    "row_select",
    "teleport",
    "transition",
]
