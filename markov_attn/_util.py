"""Small shared helpers: dtype promotion, full-precision matmuls, eager argument checks."""

import numbers

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


def check_square(shape, name: str = "attn") -> None:
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


def is_concrete(x) -> bool:
    """True when ``x`` holds a value known now (not a tracer inside jit/vmap/grad)."""
    if isinstance(x, numbers.Number | np.ndarray | np.generic):
        return True
    return isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)


def check_alpha(alpha, *, allow_one: bool = True) -> None:
    """Eager range check of the teleportation weight, when its value is known."""
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


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")


def safe_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    """``x / x.sum(axis)``; where the sum is zero, the uniform distribution instead."""
    s = jnp.sum(x, axis=axis, keepdims=True)
    n = x.shape[axis]
    ok = s > 0
    return jnp.where(ok, x / jnp.where(ok, s, 1.0), jnp.asarray(1.0 / n, x.dtype))
