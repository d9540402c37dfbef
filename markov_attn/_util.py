"""Small shared helpers: dtype promotion, full-precision matmuls, eager argument checks."""

import contextlib
import numbers
import warnings

import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST


def compute_dtype(dtype) -> jnp.dtype:
    """The dtype chain arithmetic runs in: float32, or wider when the input is wider."""
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        return jnp.dtype(jnp.float32)
    return jnp.promote_types(dtype, jnp.float32)


def as_chain(attn, name: str = "attn") -> jax.Array:
    """Converts to a float32 (or wider) array and checks the trailing ``(n, n)`` shape."""
    attn = jnp.asarray(attn)
    check_square(attn.shape, name)
    return attn.astype(compute_dtype(attn.dtype))


def value_flags(x) -> tuple[bool, bool, bool] | None:
    """``(all finite, all non-negative, all row sums finite)`` of a float, integer or bool array
    whose values are known now, or ``None`` (traced, inside someone's ``jit``, empty, or of
    another dtype). Row sums are over the last axis of an array with at least two axes
    (``True`` otherwise)."""
    if isinstance(x, list | tuple):
        x = np.asarray(x)
    if not is_concrete(x):
        return None
    arr = jnp.asarray(x)
    if arr.size == 0:
        return None
    if jnp.issubdtype(arr.dtype, jnp.integer) or arr.dtype == bool:
        arr = arr.astype(jnp.float32)  # counts or 0/1 weights: negatives still need refusing
    elif not jnp.issubdtype(arr.dtype, jnp.floating):
        return None
    finite, nonneg, sums = _value_flags(arr)
    if isinstance(finite, jax.core.Tracer):  # concrete input, but traced by an outer jit
        return None
    return bool(finite), bool(nonneg), bool(sums)


def _check_cast(x, name: str) -> None:
    """A float64 NumPy array that float32 (x64 off) cannot hold row by row: entries that
    overflow to inf, or non-zero rows whose entries all flush to zero (read as uniform)."""
    if isinstance(x, list | tuple):
        x = np.asarray(x)
    if (
        not isinstance(x, np.ndarray)
        or x.dtype != np.float64
        or x.ndim < 1
        or x.size == 0
        or jax.config.jax_enable_x64
    ):
        return
    big = float(np.finfo(np.float32).max)
    tiny = float(np.finfo(np.float32).tiny)
    with np.errstate(invalid="ignore"):
        top = np.fmax.reduce(np.abs(x), axis=-1)  # NaN ignored; inf is value_flags' to report
        if np.any(np.isfinite(top) & (top > big)):
            raise ValueError(
                f"{name} has finite float64 values above float32's range (max {big:.3g}), which "
                "would become inf; divide each row by its maximum first (every function "
                "renormalises the rows) or enable jax_enable_x64"
            )
        peak = np.fmax.reduce(x, axis=-1)  # the largest entry of each row
        lost = (peak > 0) & (peak < tiny)
    if np.any(lost):
        raise ValueError(
            f"{name} has rows whose float64 entries are all below float32's smallest normal "
            f"number ({tiny:.3g}): in float32 they would be zero rows, read as uniform; divide "
            "each row by its maximum first (every function renormalises the rows) or enable "
            "jax_enable_x64"
        )


def check_values(x, name: str = "attn") -> None:
    """Eager value check of a probability array, when its values are known now.

    Raises a ``ValueError`` for NaN/inf or negative entries. Under ``jit`` nothing can be
    raised; the jitted functions return NaN for such matrices instead (see :func:`poison`).
    """
    _check_cast(x, name)
    flags = value_flags(x)
    if flags is None:
        return
    finite, nonneg, sums = flags
    if not finite:
        raise ValueError(
            f"{name} contains NaN or inf; check the attention extraction (an all-masked row "
            "gives NaN in a plain softmax; ma.transition handles masks, and ma.check_chain "
            "says where the bad entries are)"
        )
    if not nonneg:
        raise ValueError(
            f"{name} has negative entries; attention probabilities are non-negative: pass "
            "pre-softmax scores through ma.transition (ma.check_chain says where)"
        )
    if not sums:
        raise overflow_error(name)


def overflow_error(name: str) -> ValueError:
    """The error for finite entries whose float32 row sum overflows (it cannot be normalised)."""
    return ValueError(
        f"{name} has a row whose sum overflows to inf (entries near the float maximum); "
        "divide the weights by a common scale first (rows are renormalised anyway)"
    )


@jax.jit
def _value_flags(x):
    sums = jnp.sum(x.astype(compute_dtype(x.dtype)), axis=-1) if x.ndim >= 2 else x
    return jnp.all(jnp.isfinite(x)), jnp.all(x >= 0), jnp.all(jnp.isfinite(sums))


def poison(x: jax.Array, bad: jax.Array) -> jax.Array:
    """``x`` with NaN wherever ``bad`` (broadcast against the leading axes of ``x``) is true.

    The jitted counterpart of an eager ``ValueError``: an invalid input gives NaN, never a
    plausible number.
    """
    bad = jnp.asarray(bad)
    bad = bad.reshape(bad.shape + (1,) * (x.ndim - bad.ndim))
    return jnp.where(bad, jnp.asarray(jnp.nan, x.dtype), x)


def row_sums(a: jax.Array) -> jax.Array:
    """``(..., n)`` row sums of ``(..., n, n)``, by XLA's reduction.

    Not a matrix–vector product with ones, although that is 1.5× faster on CPU: its float32
    sums err by ~7e-7 at ``n = 1025`` against ~2e-7 for the reduction, and normalising by them
    moved TokenRank on nearly reducible chains by 1.5e-5 in L1 (the rows of the normalised
    chain must sum to 1 as exactly as float32 allows).
    """
    return jnp.sum(a, axis=-1)


def row_scale(rows):
    """``1 / rows`` (0 where a row is empty) and the empty-row flags.

    A row is empty when its sum is below the smallest normal float (not only exactly 0): its
    reciprocal would overflow, and CPU arithmetic flushes such sums to zero anyway, so every
    backend reads it as the uniform row. NaN sums stay NaN.
    """
    zero = rows < jnp.finfo(rows.dtype).tiny
    return jnp.where(zero, 0.0, 1.0 / jnp.where(zero, 1.0, rows)).astype(rows.dtype), zero


def normalized_rows(a, rows):
    """``safe_normalize(a)`` from its row sums: ``A / (A 1)``, uniform rows where a row is empty
    (see :func:`row_scale`)."""
    inv, zero = row_scale(rows)
    n = a.shape[-1]
    return jnp.where(zero[..., None], jnp.asarray(1.0 / n, a.dtype), a * inv[..., None])


def invalid_matrices(a: jax.Array, rows: jax.Array | None = None) -> jax.Array:
    """``(...)`` flags: matrices with a NaN/inf or a negative entry (or a row sum that
    overflows to inf).

    Two cheap passes instead of an elementwise test reduced over both axes (3× slower on a
    large stack on CPU): a NaN or ±inf entry makes its row sum non-finite, and the minimum over
    each column (a reduction over the major axis, which XLA vectorises) finds negative entries.
    ``rows``: the row sums, when the caller has them already.
    """
    rows = row_sums(a) if rows is None else rows
    return ~(jnp.all(jnp.isfinite(rows), axis=-1) & jnp.all(jnp.min(a, axis=-2) >= 0, axis=-1))


def invalid_dists(x: jax.Array) -> jax.Array:
    """``(...)`` flags: vectors ``(..., n)`` with a NaN/inf or a negative entry."""
    return ~jnp.all(jnp.isfinite(x) & (x >= 0), axis=-1)


def traced_range(x: jax.Array, lo: float, hi: float) -> jax.Array:
    """``x`` where ``lo <= x <= hi``, NaN elsewhere (the traced twin of an eager range check)."""
    return jnp.where((x >= lo) & (x <= hi), x, jnp.asarray(jnp.nan, x.dtype))


def check_square(shape, name: str = "attn") -> None:
    if len(shape) >= 2 and shape[-1] == shape[-2] == 0:
        raise ValueError(
            f"{name} has no tokens (shape {tuple(shape)}); a chain needs at least one token"
        )
    if len(shape) < 2:
        raise ValueError(
            f"{name} must have at least two axes (..., n, n), got shape {tuple(shape)}; "
            "add a leading axis or pass the full attention matrix"
        )
    if shape[-1] != shape[-2]:
        raise ValueError(
            f"{name} must be square over its last two axes, got (..., {shape[-2]}, {shape[-1]}); "
            "slice queries and keys together (pass keep= to ma.transition to drop tokens)"
        )


def matvec_t(attn: jax.Array, x: jax.Array) -> jax.Array:
    """``attn^T x`` over the last axes at full precision: ``(..., n, n), (..., n) -> (..., n)``."""
    return jnp.einsum("...ij,...i->...j", attn, x, precision=HIGHEST)


def matvec(attn: jax.Array, x: jax.Array) -> jax.Array:
    """``attn x`` at full precision: ``(..., n, n), (..., n) -> (..., n)``."""
    return jnp.einsum("...ij,...j->...i", attn, x, precision=HIGHEST)


# Terms per partial sum of the streaming accurate product (see markov_attn._stream).
ACCURATE_BLOCK = 32


def is_concrete(x) -> bool:
    """True when ``x`` holds a value known now (not a tracer inside jit/vmap/grad): also a
    list or tuple of numbers (eager checks used to skip those, so ``alpha=[0.9, 1.1]`` or an
    index list out of range gave NaN instead of an error)."""
    if isinstance(x, numbers.Number | np.ndarray | np.generic):
        return True
    if isinstance(x, list | tuple):
        try:
            return np.asarray(x).dtype != object
        except (TypeError, ValueError, jax.errors.TracerArrayConversionError):
            return False
    return isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)


def check_alpha(alpha, *, allow_one: bool = True, batch=None) -> None:
    """Eager range check of the teleportation weight, when its value is known; with
    ``batch``, the attention's batch shape, also that ``alpha``'s shape broadcasts with it."""
    if batch is not None:
        check_batch("alpha", np.shape(alpha), batch, "pass a scalar or one value per matrix")
    if not is_concrete(alpha):
        return
    a = np.asarray(alpha)
    upper_ok = (a <= 1.0) if allow_one else (a < 1.0)
    if not np.all(np.isfinite(a)) or not np.all(a >= 0.0) or not np.all(upper_ok):
        bound = "[0, 1]" if allow_one else "[0, 1)"
        raise ValueError(
            f"alpha must lie in {bound}, got {alpha!r}; alpha is the weight of the attention "
            "chain against teleportation (0.99 in the paper, 1.0 = no teleportation)"
        )


def check_batch(name: str, shape, batch, hint: str) -> None:
    """Eager: ``name``'s batch shape must broadcast with the attention's batch shape (not
    checked for symbolic dimensions, as under ``jax.export``)."""
    if not all(isinstance(d, int | np.integer) for d in (*shape, *batch)):
        return
    try:
        np.broadcast_shapes(tuple(shape), tuple(batch))
    except ValueError:
        raise ValueError(
            f"{name} has batch shape {tuple(shape)}, which does not broadcast with the "
            f"attention's batch shape {tuple(batch)}; {hint}"
        ) from None


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")


def check_count(name: str, value, *, minimum: int = 0, what: str = "") -> int:
    """An integer option (Python or NumPy integer, not bool) of at least ``minimum``."""
    kind = {0: "a non-negative int", 1: "a positive int"}.get(minimum, f"an int >= {minimum}")
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be {kind}{what}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be {kind}{what}, got {value!r}")
    return int(value)


def safe_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    """``x / x.sum(axis)``; where the sum is exactly zero, the uniform distribution instead.

    NaN propagates (a NaN sum gives NaN, never a uniform row); an inf gives NaN or zeros, and
    the public functions turn any matrix with a NaN/inf entry into NaN.
    """
    s = jnp.sum(x, axis=axis, keepdims=True)
    n = x.shape[axis]
    zero = s == 0
    return jnp.where(zero, jnp.asarray(1.0 / n, x.dtype), x / jnp.where(zero, 1.0, s))


# Cache budget for one chunk of matrices on CPU. Iterative methods read every matrix once per
# product; streaming a whole (batch, n, n) stack from DRAM for each of dozens of products is
# memory-bound, while a chunk that stays in the last-level cache is re-read at cache speed
# (measurements in docs/benchmarks.md).
CPU_CHUNK_BYTES = 12 * 2**20


def map_over_batch(fn, *args, batch_ndim: int, item_bytes: int, whole_chunks: bool = False):
    """Applies ``fn`` (batched over ``batch_ndim`` leading axes) chunk by chunk on CPU.

    On CPU the flattened batch is processed in chunks of ``CPU_CHUNK_BYTES // item_bytes``
    items with ``lax.map``, so each chunk's matrices stay in cache across the iterations of
    ``fn`` (and each chunk stops iterating when its own members converge). On GPU and TPU the
    whole batch runs at once. Every arg (an array or a pytree of arrays) shares the same
    ``batch_ndim`` leading axes; ``fn`` returns a pytree of arrays with those leading axes.

    By default ``lax.map`` vmaps ``fn`` over a chunk, so ``fn`` sees one item and a
    data-dependent ``lax.cond`` in it becomes a ``select`` that runs both branches. With
    ``whole_chunks=True`` ``fn`` is called on each chunk as a batch ``(size, ...)``, so a
    ``cond`` on a reduction over the chunk stays a branch; the chunks are made equal (at most
    the cache-sized chunk), the last padded with copies of the last item, so ``fn`` is traced
    once.
    """
    batch = jax.tree.leaves(args)[0].shape[:batch_ndim]
    if not all(isinstance(d, int) for d in batch):  # symbolic batch (jax.export): no chunks
        return fn(*args)
    total = int(np.prod(batch)) if batch else 1
    chunk = max(1, CPU_CHUNK_BYTES // max(1, item_bytes))
    if batch_ndim == 0 or total <= chunk:
        return fn(*args)

    def flat_map(flat):
        if not whole_chunks:
            return jax.lax.map(lambda xs: fn(*xs), flat, batch_size=chunk)
        # as many chunks as the cache size asks for, of equal size (so one trace of fn): the
        # last one padded with copies of the last item (fewer than the number of chunks)
        count = -(-total // chunk)
        size = -(-total // count)
        pad = count * size - total
        padded = jax.tree.map(
            lambda a: jnp.concatenate([a, jnp.repeat(a[-1:], pad, axis=0)]) if pad else a, flat
        )
        head = jax.tree.map(lambda a: a.reshape((count, size, *a.shape[1:])), padded)
        out = jax.lax.map(lambda xs: fn(*xs), head)
        return jax.tree.map(lambda o: o.reshape((count * size, *o.shape[2:]))[:total], out)

    def on_cpu(*args):
        flat = jax.tree.map(lambda a: a.reshape((total, *a.shape[batch_ndim:])), args)
        out = flat_map(flat)
        return jax.tree.map(lambda o: o.reshape((*batch, *o.shape[1:])), out)

    return jax.lax.platform_dependent(*args, cpu=on_cpu, default=fn)


def require_extra(modules, extra: str, what: str) -> None:
    """Raises an ``ImportError`` naming the pip extra when a module ``what`` needs is missing
    (instead of a bare ``ModuleNotFoundError`` from deep inside the subpackage)."""
    import importlib.util
    import sys

    def present(m):
        try:
            return importlib.util.find_spec(m) is not None
        except ValueError:  # in sys.modules without a __spec__ (a stub): it is there
            return m in sys.modules

    missing = [m for m in modules if not present(m)]
    if missing:
        raise MissingExtraError(
            f"{what} needs {', '.join(missing)}: pip install 'markov_attn[{extra}]'"
        )


class MissingExtraError(ImportError):
    """An optional dependency of a subpackage is not installed (the message names the extra)."""


@contextlib.contextmanager
def caught_warnings(category):
    """Collects the warnings of ``category`` raised in the block (every one, repeats included)
    into the list it yields; any other warning is raised again as usual when the block ends
    (not when it raises)."""
    got = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", category)
        yield got
    for w in caught:
        if issubclass(w.category, category):
            got.append(w)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
