"""Double-float arithmetic: error-free transformations for accurate residuals in float32.

A value is carried as an unevaluated sum ``hi + lo`` of two floats of the working precision
(``|lo| <= ulp(hi) / 2`` after :func:`two_sum`). :func:`two_sum` and :func:`two_prod` return a
rounded result and its exact rounding error (Knuth's TwoSum; Dekker's product with
Veltkamp's split, no FMA needed), so sums and products of such pairs keep about twice the
working precision. Plain ``jax.numpy`` elementwise ops, valid on every backend as long as the
compiler does not reassociate floating-point arithmetic (XLA does not, without fast-math).
Contracting a product and a sum into an FMA leaves them exact as written (every product of
split halves is exact), but a compiler that rebuilt ``a * b`` inside ``ah * bh - a * b`` and
contracted that would lose the error term. Checked on CPU (``tests/test_chain.py::
test_error_free_transformations``, also under the test suite's XLA flags); not yet run on a
GPU, where that test settles it (``experiments/gpu_session3.sh`` runs it first).

Used where float32 rounding, amplified by an ill-conditioned solve, would otherwise set the
accuracy: the true residuals of the stationary solver (:mod:`markov_attn._stationary`).
"""

import jax
import jax.numpy as jnp


def two_sum(a, b):
    """``(s, e)`` with ``s = fl(a + b)`` and ``a + b = s + e`` exactly."""
    s = a + b
    bb = s - a
    e = (a - (s - bb)) + (b - bb)
    return s, e


def _split(a):
    """Veltkamp's split ``a = hi + lo`` into halves of at most half the mantissa each."""
    bits = jnp.finfo(a.dtype).nmant + 1
    c = a * jnp.asarray(2.0 ** ((bits + 1) // 2) + 1.0, a.dtype)
    hi = c - (c - a)
    return hi, a - hi


def two_prod(a, b):
    """``(p, e)`` with ``p = fl(a b)`` and ``a b = p + e`` exactly (barring under/overflow)."""
    p = a * b
    ah, al = _split(a)
    bh, bl = _split(b)
    e = ((ah * bh - p) + ah * bl + al * bh) + al * bl
    return p, e


def add(x, y):
    """Double-float sum of pairs ``x = (hi, lo)`` and ``y`` (a pair or a plain array)."""
    yh, yl = y if isinstance(y, tuple) else (y, 0.0)
    s, e = two_sum(x[0], yh)
    return s, e + x[1] + yl


def scale(x, c):
    """Double-float product of the pair ``x`` and the plain array ``c``."""
    p, e = two_prod(x[0], c)
    return p, e + x[1] * c


def reciprocal(s):
    """For row sums ``s = (hi, lo)`` in double-float: ``(inv, beta)`` with ``1 / s = inv (1 +
    beta)``, ``inv = fl(1 / hi)``. Dividing by ``inv`` alone would scale a whole row by the
    same rounding error, a bias that a nearly reducible chain's stationary distribution
    amplifies; ``beta`` keeps it (to about 0.25 ulp). Rows whose ``hi`` is below the smallest
    normal number (empty rows, zero padding) get ``inv = beta = 0``."""
    empty = s[0] < jnp.finfo(s[0].dtype).tiny
    hi = jnp.where(empty, 1.0, s[0])
    inv = 1.0 / hi
    p, e = two_prod(inv, hi)  # inv s - 1 = (p - 1) + e + inv s_lo
    beta = -(((p - 1.0) + e) + inv * s[1]) / (p + inv * s[1])
    return jnp.where(empty, 0.0, inv), jnp.where(empty, 0.0, beta)


def sum_blocked(x, axis: int = -1, block: int = 8):
    """Double-float ``(hi, lo)`` sum of ``x`` over ``axis``: plain sums within runs of
    ``block`` consecutive entries (their rounding is relative to these short partial sums),
    then :func:`tree_sum` over the partials. About one read of ``x``; at ``block = 8`` the
    row sums of a 1025 x 1025 chain come within 0.15 ulp of the float64 sums."""
    x = jnp.moveaxis(x, axis, -1)
    m = x.shape[-1]
    nb = -(-m // block)
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, nb * block - m)])
    return tree_sum(jnp.sum(x.reshape((*x.shape[:-1], nb, block)), axis=-1), axis=-1)


def tree_sum(part, axis: int = -2):
    """Double-float ``(hi, lo)`` sum over ``axis`` by a pairwise tree of :func:`two_sum`
    (``log2`` levels of elementwise work; exact up to the rounding of ``lo``). Pairs are
    neighbours along ``axis`` (no transposition)."""
    axis = axis % part.ndim
    hi, lo = part, jnp.zeros_like(part)
    while hi.shape[axis] > 1:
        if hi.shape[axis] % 2:
            pad = [(0, 0)] * hi.ndim
            pad[axis] = (0, 1)
            hi, lo = jnp.pad(hi, pad), jnp.pad(lo, pad)
        shape = (*hi.shape[:axis], hi.shape[axis] // 2, 2, *hi.shape[axis + 1 :])
        hi, lo = hi.reshape(shape), lo.reshape(shape)
        s, e = two_sum(jnp.take(hi, 0, axis + 1), jnp.take(hi, 1, axis + 1))
        lo = jnp.take(lo, 0, axis + 1) + jnp.take(lo, 1, axis + 1) + e
        hi = s
    return jnp.take(hi, 0, axis), jnp.take(lo, 0, axis)


def matvec_t(blocks, x):
    """Double-float ``A^T x`` from ``A`` as row blocks ``(..., nb, b, n)`` (rows padded with
    zeros to whole blocks) and ``x`` ``(..., nb * b)``: the products of a block summed in
    float32 (rounding relative to ``b``-term partial sums), the ``nb`` partials of each output
    by :func:`tree_sum`. Relative error about 0.07 ulp on average (0.3 ulp at most) at
    ``b = 8``, ``n = 1025`` for the sums; with the row normalisation, up to 1.75 ulp. XLA
    fuses what computes ``x`` into the product's loop, once per entry of ``A``: keep it cheap
    (a double-float division there made the product four times as slow)."""
    nb, b = blocks.shape[-3], blocks.shape[-2]
    xb = x.reshape((*x.shape[:-1], nb, b))
    return tree_sum(jnp.sum(blocks * xb[..., None], axis=-2))


def row_blocks(a, block: int, zero_diagonal: bool = False):
    """``a`` ``(..., m, n)`` as row blocks ``(..., ceil(m / block), block, n)``, the last
    padded with zero rows, the diagonal zeroed with ``zero_diagonal`` (a copy, in one pass:
    make it once per solve)."""
    m, n = a.shape[-2:]
    rows = -(-m // block) * block
    a = jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, rows - m), (0, 0)])
    if zero_diagonal:
        r = jax.lax.broadcasted_iota(jnp.int32, (rows, n), 0)
        c = jax.lax.broadcasted_iota(jnp.int32, (rows, n), 1)
        a = jnp.where(r == c, jnp.zeros((), a.dtype), a)
    return a.reshape((*a.shape[:-2], rows // block, block, n))


def pad_last(x, size: int):
    """``x`` zero-padded over its last axis to ``size``."""
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - x.shape[-1])])


__all__ = [
    "add",
    "matvec_t",
    "pad_last",
    "reciprocal",
    "row_blocks",
    "scale",
    "sum_blocked",
    "tree_sum",
    "two_prod",
    "two_sum",
]
