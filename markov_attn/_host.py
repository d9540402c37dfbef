"""Dense LAPACK routines that never hang on CPU.

jaxlib 0.10's batched CPU LAPACK kernels (``getrf``, ``geev``, ...) can deadlock the intra-op
thread pool when several of them run concurrently inside one jitted program (all pool threads
end up waiting in each other's batch partitions). On CPU these wrappers therefore hand the
work to NumPy through ``jax.pure_callback`` (NumPy's LAPACK runs outside XLA's thread pool, in
float64), float64 input in x64 mode included (its results travel as uint32 words, see
:func:`_callback`); on GPU they call ``jnp.linalg`` directly. Both
are batched over leading axes and work under ``jit`` and ``vmap``; they are not differentiable
themselves (the callers define their own VJPs). A host callback cannot be serialised, so the
CPU path does not export; ``solve`` exports for GPU and TPU, ``eig`` for neither (no TPU
lowering, and the GPU kernel has no serialisation guarantee).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _words(dtype) -> int:
    """uint32 words per element of a float64 / complex128 result (0: passed as it is)."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float64:
        return 2
    return 4 if dtype == jnp.complex128 else 0


def _callback(fn, outs, *args):
    """``jax.pure_callback(fn, outs, *args)`` that can return float64 and complex128.

    Under the thread-local ``jax.enable_x64`` context the callback's thread sees x64 off, and
    a float64 result cannot be handed back as such; so wide results come back as their uint32
    words (``ndarray.view``) and are bitcast to the declared dtype inside the program.
    """

    def as_words(*a):
        res = fn(*a)
        res = res if isinstance(res, tuple) else (res,)
        return tuple(
            # np.shape(r), not o.shape: under vmap the callback sees the batched arrays
            np.ascontiguousarray(r, np.dtype(o.dtype)).view(np.uint32).reshape(*np.shape(r), w)
            if (w := _words(o.dtype))
            else r
            for r, o in zip(res, outs_t)
        )

    outs_t = outs if isinstance(outs, tuple) else (outs,)
    shapes = tuple(
        jax.ShapeDtypeStruct((*o.shape, w), jnp.uint32) if (w := _words(o.dtype)) else o
        for o in outs_t
    )
    got = jax.pure_callback(as_words, shapes, *args, vmap_method="broadcast_all")
    back = []
    for r, o in zip(got, outs_t):
        if _words(o.dtype) == 2:
            r = jax.lax.bitcast_convert_type(r, jnp.float64)
        elif _words(o.dtype) == 4:
            parts = jax.lax.bitcast_convert_type(r.reshape(*o.shape, 2, 2), jnp.float64)
            r = jax.lax.complex(parts[..., 0], parts[..., 1])
        back.append(r)
    return tuple(back) if isinstance(outs, tuple) else back[0]


def _np_solve(m, b, *, dtype):
    wide = np.complex128 if np.iscomplexobj(m) or np.iscomplexobj(b) else np.float64
    m64 = np.asarray(m, wide)
    b64 = np.asarray(b, wide)
    with np.errstate(all="ignore"):
        try:
            x = np.linalg.solve(m64, b64[..., None])[..., 0]
        except np.linalg.LinAlgError:  # a singular matrix somewhere in the batch:
            # NaN for that one only (one uniform head made every head's |λ2| gradient NaN)
            shape = np.broadcast_shapes(m64.shape[:-1], b64.shape)
            mb = np.broadcast_to(m64, (*shape[:-1], *m64.shape[-2:])).reshape(-1, *m64.shape[-2:])
            bb = np.broadcast_to(b64, shape).reshape(-1, shape[-1])
            x = np.full(bb.shape, np.nan, wide)
            for i in range(len(bb)):
                try:
                    x[i] = np.linalg.solve(mb[i], bb[i])
                except np.linalg.LinAlgError:
                    pass
            x = x.reshape(shape)
    return x.astype(dtype)


def _np_eig(a, *, dtype):
    a64 = np.asarray(a, np.float64)
    if not np.all(np.isfinite(a64)):  # LAPACK refuses NaN; give NaN back, batch-wise
        bad = ~np.all(np.isfinite(a64), axis=(-2, -1))
        a64 = np.where(bad[..., None, None], 0.0, a64)
    else:
        bad = None
    w, vr = np.linalg.eig(a64)
    if bad is not None:
        w = np.where(bad[..., None], np.nan, w)
        vr = np.where(bad[..., None, None], np.nan, vr)
    return w.astype(dtype), vr.astype(dtype)


def solve(m: jax.Array, b: jax.Array) -> jax.Array:
    """``m^{-1} b`` for ``(..., n, n)`` and ``(..., n)`` (batch axes must match)."""

    def on_cpu(m, b):
        dtype = jnp.result_type(m.dtype, b.dtype)
        out = jax.ShapeDtypeStruct(jnp.broadcast_shapes(m.shape[:-1], b.shape), dtype)
        fn = functools.partial(_np_solve, dtype=np.dtype(dtype))
        return _callback(fn, out, m, b)

    def other(m, b):
        return jnp.linalg.solve(m, b[..., None])[..., 0]

    return jax.lax.platform_dependent(m, b, cpu=on_cpu, default=other)


def eig(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Eigenvalues ``(..., n)`` and right eigenvectors ``(..., n, n)`` (complex64, or
    complex128 for float64 input)."""
    cdtype = jnp.result_type(a.dtype, jnp.complex64)

    def on_cpu(a):
        n = a.shape[-1]
        out = (
            jax.ShapeDtypeStruct((*a.shape[:-2], n), cdtype),
            jax.ShapeDtypeStruct(a.shape, cdtype),
        )
        fn = functools.partial(_np_eig, dtype=np.dtype(cdtype))
        return _callback(fn, out, a)

    def other(a):
        w, vr = jnp.linalg.eig(a)
        return w.astype(cdtype), vr.astype(cdtype)

    return jax.lax.platform_dependent(a, cpu=on_cpu, default=other)


def eigvals(a: jax.Array) -> jax.Array:
    """Eigenvalues ``(..., n)``."""
    return eig(a)[0]
