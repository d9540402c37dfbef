"""Every public function lowers for TPU and CUDA (checked on this CPU machine with jax.export)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import markov_attn as ma

N = 6
A = jax.ShapeDtypeStruct((2, 3, N, N), jnp.float32)
X = jax.ShapeDtypeStruct((2, 3, N), jnp.float32)
L = jax.ShapeDtypeStruct((2, 3), jnp.float32)
Q = jax.ShapeDtypeStruct((2, 3, N, 4), jnp.float32)

# name -> (function, abstract args). Forward passes and, where listed, gradients.
FUNCTIONS = {
    "transition": (lambda s: ma.transition(s, keep=slice(1, None), mask=jnp.ones(N, bool)), (A,)),
    "normalize": (lambda a: ma.normalize(a), (A,)),
    "teleport": (lambda a: ma.teleport(a, alpha=0.9), (A,)),
    "reverse": (ma.reverse, (A,)),
    "column_sum": (ma.column_sum, (A,)),
    "row_select": (lambda a: ma.row_select(a, 0), (A,)),
    "column_select": (lambda a: ma.column_select(a, 0), (A,)),
    "bounce": (lambda a, x: ma.bounce(a, x, steps=3, direction="reverse"), (A, X)),
    "tokenrank-solve": (lambda a: ma.tokenrank(a, method="solve"), (A,)),
    "tokenrank-auto": (lambda a: ma.tokenrank(a), (A,)),
    "tokenrank-gmres": (lambda a: ma.tokenrank(a, method="gmres", direction="out"), (A,)),
    "tokenrank-power": (lambda a: ma.tokenrank(a, method="power"), (A,)),
    # direction="out" in the paper's order: GTH elimination (and its GMRES fallback)
    "tokenrank-out": (lambda a: ma.tokenrank(a, direction="out"), (A,)),
    "grad-tokenrank-out": (
        jax.grad(lambda a: ma.tokenrank(a, direction="out")[..., 0].sum()),
        (A,),
    ),
    "grad-tokenrank-solve": (jax.grad(lambda a: ma.tokenrank(a).sum()), (A,)),
    "grad-tokenrank-gmres": (jax.grad(lambda a: ma.tokenrank(a, method="gmres").sum()), (A,)),
    "grad-tokenrank-power": (jax.grad(lambda a: ma.tokenrank(a, method="power").sum()), (A,)),
    "grad-bounce": (jax.grad(lambda a: ma.bounce(a, 0, steps=2).sum()), (A,)),
    "second_eigenvalue": (ma.second_eigenvalue, (A,)),
    "spectral_gap": (ma.spectral_gap, (A,)),
    "head_weights": (lambda lam: ma.head_weights(lam), (L,)),
    "average": (lambda a, w: ma.average(a, weights=w), (A, L)),
    "rollout": (lambda a: ma.rollout(a), (A,)),
    "tokenrank_qk": (lambda q, k: ma.tokenrank_qk(q, k, block=4), (Q, Q)),
    "grad-tokenrank_qk": (jax.grad(lambda q, k: ma.tokenrank_qk(q, k, block=4).sum()), (Q, Q)),
    "bounce_qk": (lambda q, k: ma.bounce_qk(q, k, 0, steps=2, block=4), (Q, Q)),
    "second_eigenvalue_qk": (lambda q, k: ma.second_eigenvalue_qk(q, k, block=4), (Q, Q)),
    # n = 80: several Krylov stages (the stage conditions), not the single one of n <= 65
    "second_eigenvalue-staged": (
        lambda a: ma.second_eigenvalue(a, return_info=True),
        (jax.ShapeDtypeStruct((2, 3, 80, 80), jnp.float32),),
    ),
    "second_eigenvalue_qk-staged": (
        lambda q, k: ma.second_eigenvalue_qk(q, k, block=8),
        (jax.ShapeDtypeStruct((2, 3, 80, 4), jnp.float32),) * 2,
    ),
    "schur_subspace": (lambda a: ma.schur_subspace(a, k=3), (A,)),
    "metastable_states": (lambda a: ma.metastable_states(a, k=3), (A,)),
}

# Documented exceptions: general eigendecomposition has no TPU lowering in JAX 0.10, so
# method="eig" and the |lambda_2| gradient (eigenvectors) run on CPU (LAPACK in NumPy through a
# host callback) and GPU (cuSOLVER/MAGMA) but cannot be exported: neither the callback nor
# the GPU eig kernel has a serialisation guarantee.
CPU_GPU_ONLY = {
    "second_eigenvalue-eig": (lambda a: ma.second_eigenvalue(a, method="eig"), (A,)),
    "grad-second_eigenvalue": (jax.grad(lambda a: ma.second_eigenvalue(a).sum()), (A,)),
}


def _export(fn, args, platform):
    return jax.export.export(jax.jit(fn), platforms=[platform])(*args)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_lowers(name, platform):
    fn, args = FUNCTIONS[name]
    exported = _export(fn, args, platform)
    assert exported.platforms == (platform,)


@pytest.mark.parametrize("name", sorted(CPU_GPU_ONLY))
def test_eig_paths_run_on_cpu_but_do_not_export(name):
    fn, args = CPU_GPU_ONLY[name]
    jax.jit(fn).lower(*args).compile()  # CPU: the host callback
    for platform in ("tpu", "cuda"):
        with pytest.raises(Exception, match=r"primitive 'eig'|cuhybrid_eig"):
            _export(fn, args, platform)


def test_every_public_function_is_covered():
    covered = {k.removeprefix("grad-").split("-")[0] for k in FUNCTIONS} | {"check_chain"}
    # the sharding helpers (which take functions, not arrays) are tested in tests/test_shard.py
    sharding = {"shard_stack", "stack_spec"}
    missing = set(ma.__all__) - covered - sharding
    assert not missing, f"add {sorted(missing)} to FUNCTIONS"


def test_tpu_modules_use_no_host_kernels():
    # A CPU LAPACK custom call in a TPU module would mean the lowering silently fell back.
    names = (
        "tokenrank-solve",
        "grad-tokenrank-solve",
        "tokenrank-out",
        "second_eigenvalue",
        "schur_subspace",
        "metastable_states",
    )
    for name in names:
        text = _export(*FUNCTIONS[name], "tpu").mlir_module()
        assert "lapack" not in text.lower(), name


# A host callback (method="solve" on CPU) cannot be serialised; on TPU/GPU it is a plain solve.
NO_CPU_EXPORT = {"tokenrank-solve"}


@pytest.mark.parametrize("platform", ["cpu", "tpu"])
@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_exports_with_a_symbolic_batch_axis(name, platform):
    # users export models with a dynamic batch: a symbolic leading axis must go through
    if platform == "cpu" and name in NO_CPU_EXPORT:
        pytest.skip("host callback on CPU (documented)")
    fn, args = FUNCTIONS[name]
    (b,) = jax.export.symbolic_shape("b")
    sym = [jax.ShapeDtypeStruct((b, *a.shape), a.dtype) for a in args]
    exported = jax.export.export(jax.jit(fn), platforms=[platform])(*sym)
    assert exported.in_avals[0].shape[0] == b
    if platform == "cpu":  # and the exported program runs, at a concrete batch, like jit
        rng = np.random.default_rng(0)
        concrete = [_concrete(rng, (3, *a.shape)) for a in args]
        got = jax.tree.leaves(exported.call(*concrete))
        want = jax.tree.leaves(jax.jit(fn)(*concrete))
        for x, y in zip(got, want, strict=True):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def _concrete(rng, shape):
    """Valid values for an abstract argument: chains (..., n, n), distributions (..., N),
    |λ2| per head, or queries/keys."""
    if len(shape) >= 2 and shape[-1] == shape[-2]:
        x = rng.random(shape) + 0.05
        return (x / x.sum(-1, keepdims=True)).astype(np.float32)
    if shape[-1] == N:
        x = rng.random(shape) + 0.05
        return (x / x.sum(-1, keepdims=True)).astype(np.float32)
    if shape[-1] == 4:
        return rng.normal(size=shape).astype(np.float32)
    return rng.uniform(0.1, 0.9, shape).astype(np.float32)
