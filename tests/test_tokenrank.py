"""TokenRank against float64 references, across methods, batching, jit and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import markov_attn as ma
from markov_attn import testing
from tests._refs import PAPER_A, reverse, stationary

METHODS = ("solve", "gmres", "power")


def test_paper_vectors():
    np.testing.assert_allclose(
        ma.tokenrank(PAPER_A), [0.278, 0.044, 0.031, 0.271, 0.376], atol=6e-4
    )
    np.testing.assert_allclose(
        ma.tokenrank(PAPER_A, alpha=1.0), [0.278, 0.043, 0.029, 0.272, 0.379], atol=6e-4
    )


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["attention", "metastable", "circulant", "permutation", "diffuse"])
@pytest.mark.parametrize("n", [7, 64, 197])
def test_matches_float64_solve(rng, method, kind, n):
    a = testing.random_chains(rng, (3,), n, kind=kind)
    ref = stationary(a, 0.99)
    out = np.asarray(ma.tokenrank(a.astype(np.float32), method=method))
    assert out.dtype == np.float32 and np.all(out >= 0)
    np.testing.assert_allclose(out.sum(-1), 1, atol=1e-6)
    assert np.abs(out - ref).sum(-1).max() <= 1e-5


@pytest.mark.parametrize("method", METHODS)
def test_nearly_reducible_with_teleportation(rng, method):
    # |lambda_2| within ~1e-4 of 1: alpha = 0.99 keeps the problem well conditioned
    a = testing.random_chains(rng, (4,), 96, kind="metastable", strength=14.0)
    lam = np.sort(np.abs(np.linalg.eigvals(a)), -1)[:, -2]
    assert lam.min() > 0.999
    out = np.asarray(ma.tokenrank(a.astype(np.float32), method=method))
    assert np.abs(out - stationary(a, 0.99)).sum(-1).max() <= 1e-5


@pytest.mark.slow
def test_large_n_solve_and_gmres(rng):
    a = testing.random_chains(rng, (2,), 1025, kind="metastable")
    ref = stationary(a, 0.99)
    for method in ("solve", "gmres"):
        out = np.asarray(ma.tokenrank(a.astype(np.float32), method=method))
        assert np.abs(out - ref).sum(-1).max() <= 1e-5, method


def test_alpha_one_and_personalisation(rng):
    a = testing.random_chains(rng, (2,), 30, kind="attention")
    v = rng.dirichlet(np.ones(30), size=2)
    for method in METHODS:
        out = ma.tokenrank(a.astype(np.float32), alpha=1.0, method=method)
        np.testing.assert_allclose(out, stationary(a, 1.0), atol=2e-6)
        out = ma.tokenrank(a.astype(np.float32), alpha=0.85, v=v, method=method)
        np.testing.assert_allclose(out, stationary(a, 0.85, v), atol=2e-6)


def test_per_matrix_alpha(rng):
    a = testing.random_chains(rng, (3,), 12)
    alphas = np.array([0.5, 0.9, 0.99])
    out = ma.tokenrank(a, alpha=alphas)
    for k in range(3):
        np.testing.assert_allclose(out[k], stationary(a[k], alphas[k]), atol=2e-6)


def test_direction_out_is_reverse_of_teleported_chain(rng):
    # the paper's order: reverse(teleport(A)), its stationary distribution without re-teleporting
    a = testing.random_chains(rng, (2, 2), 20)
    t = 0.99 * a + 0.01 / 20
    out = ma.tokenrank(a.astype(np.float32), direction="out")
    np.testing.assert_allclose(out, stationary(reverse(t), 1.0), atol=2e-6)
    # the other order on request: teleport(reverse(A))
    other = ma.tokenrank(a.astype(np.float32), direction="out", teleport_first=False)
    np.testing.assert_allclose(other, stationary(reverse(a), 0.99), atol=2e-6)
    assert np.abs(np.asarray(out) - np.asarray(other)).sum(-1).max() > 1e-4  # they differ


def test_bf16_and_f16_inputs(rng):
    a = testing.random_chains(rng, (2,), 40)
    ref = stationary(a)
    for dt in (jnp.bfloat16, jnp.float16):
        out = ma.tokenrank(jnp.asarray(a, dt))
        assert out.dtype == jnp.float32
        assert np.abs(np.asarray(out) - ref).sum(-1).max() < 2e-2


def test_vmap_equals_broadcast_and_jit_equals_eager(rng):
    a = testing.random_chains(rng, (4, 3), 16).astype(np.float32)
    for method in METHODS:
        f = lambda x: ma.tokenrank(x, method=method)
        full = f(a)
        np.testing.assert_allclose(jax.vmap(f)(a), full, atol=1e-6)
        np.testing.assert_allclose(jax.vmap(jax.vmap(f))(a), full, atol=1e-6)
        np.testing.assert_allclose(jax.jit(f)(a), full, atol=1e-7)
        np.testing.assert_allclose(f(a[1, 2]), full[1, 2], atol=1e-6)


def test_alpha_sweep_does_not_recompile(rng):
    a = testing.random_chains(rng, (2,), 10).astype(np.float32)
    from markov_attn._tokenrank import _tokenrank

    ma.tokenrank(a, alpha=0.5)
    before = _tokenrank._cache_size()
    for alpha in (0.6, 0.7, 0.8):
        ma.tokenrank(a, alpha=alpha)
    assert _tokenrank._cache_size() == before


def _loss(a, method, alpha=0.99, direction="in"):
    pi = ma.tokenrank(a, alpha=alpha, method=method, direction=direction)
    w = jnp.broadcast_to(jnp.linspace(1.0, 2.0, a.shape[-1], dtype=a.dtype), pi.shape)
    return jnp.sum(jnp.sin(3.0 * pi) * w)


@pytest.mark.parametrize("method", METHODS)
def test_gradient_against_finite_differences(rng, x64, method):
    logits = jnp.asarray(rng.normal(size=(2, 9, 9)))
    f = lambda s: _loss(jax.nn.softmax(s, -1), method)
    check_grads(f, (logits,), order=1, modes=["rev"], atol=1e-6, rtol=1e-5)
    # the raw-matrix gradient (off the stochastic manifold) is consistent too
    a = jnp.asarray(testing.random_chains(rng, (2,), 9))
    check_grads(lambda x: _loss(x, method), (a,), order=1, modes=["rev"], atol=1e-6, rtol=1e-5)


def test_gradients_alpha_v_and_direction(rng, x64):
    a = jnp.asarray(testing.random_chains(rng, (2,), 8))
    v = jnp.asarray(rng.dirichlet(np.ones(8)))
    check_grads(lambda al: _loss(a, "solve", alpha=al), (jnp.asarray(0.9),), order=1, modes=["rev"])
    check_grads(
        lambda vv: jnp.sum(ma.tokenrank(a, v=vv) ** 2 * jnp.arange(8.0)[None]),
        (v,),
        order=1,
        modes=["rev"],
    )
    check_grads(lambda x: _loss(x, "solve", direction="out"), (a,), order=1, modes=["rev"])
    check_grads(lambda x: _loss(x, "solve", alpha=1.0), (a,), order=1, modes=["rev"])


def test_implicit_gradient_matches_unrolled_solver(rng, x64):
    a = jnp.asarray(testing.random_chains(rng, (), 12))

    def unrolled(a):  # autodiff through 3000 plain power steps
        n = a.shape[-1]
        t = 0.99 * a + 0.01 / n
        x = jax.lax.fori_loop(0, 3000, lambda i, x: x @ t, jnp.full(n, 1.0 / n))
        return jnp.sum(jnp.sin(3.0 * x) * jnp.linspace(1.0, 2.0, n))

    g_ref = jax.grad(unrolled)(a)
    n = a.shape[-1]
    for method in METHODS:
        g = jax.grad(lambda x: _loss(x, method))(a)
        # the gradients agree up to a per-row constant (directions that change row sums)
        d = np.asarray(g - g_ref)
        tol = (1e-10 if method == "solve" else 1e-6) * float(jnp.abs(g_ref).max())
        np.testing.assert_allclose(d - d.mean(-1, keepdims=True), 0, atol=tol)
        # and exactly on row-stochastic perturbations
        e = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)))
        e = e - e.mean(-1, keepdims=True)
        np.testing.assert_allclose(jnp.sum(g * e), jnp.sum(g_ref * e), rtol=1e-5)


def test_auto_method_is_gmres_on_cpu(rng):
    # On CPU "auto" never calls LAPACK (jaxlib 0.10's batched CPU LAPACK kernels can deadlock
    # the thread pool when several run concurrently); on GPU/TPU it picks LU up to n = 256.
    assert jax.default_backend() == "cpu"
    for n in (40, 300):
        a = testing.random_chains(rng, (2,), n).astype(np.float32)
        np.testing.assert_array_equal(ma.tokenrank(a), ma.tokenrank(a, method="gmres"))
    a = jnp.ones((2, 3, 50, 50)) / 50
    for fn in (ma.tokenrank, jax.grad(lambda x: ma.tokenrank(x).sum())):
        assert "lapack" not in jax.jit(fn).lower(a).compile().as_text().lower()
    tpu = jax.export.export(jax.jit(ma.tokenrank), platforms=["tpu"])(a).mlir_module()
    # the dense LU branch is the one lowered for TPU at n <= 256 ("lu" alone also matched
    # source locations of any export)
    assert "ludecomposition" in tpu.lower()


def test_gradient_is_not_an_unrolled_loop(rng):
    # The backward pass of the default method is one adjoint solve: no while loop in its jaxpr.
    a = jnp.asarray(testing.random_chains(rng, (), 6), jnp.float32)
    jaxpr = jax.make_jaxpr(jax.grad(lambda x: _loss(x, "solve")))(a)
    assert "while" not in str(jaxpr)


def test_no_nan_on_valid_but_extreme_chains():
    eye = np.eye(5)
    perm = np.roll(np.eye(5), 1, axis=1)
    hard = np.zeros((5, 5))
    hard[:, 0] = 1.0  # every token attends to token 0
    for a in (eye, perm, hard):
        for method in METHODS:
            for alpha in (0.99, 1.0):
                out = np.asarray(ma.tokenrank(a, alpha=alpha, method=method))
                assert np.all(np.isfinite(out)), (a, method, alpha)
                np.testing.assert_allclose(out.sum(), 1, atol=1e-6)
    np.testing.assert_allclose(ma.tokenrank(hard, alpha=1.0), np.eye(5)[0], atol=1e-6)


def test_iterative_methods_are_bounded_on_adversarial_input():
    # periodic chain without teleportation: the power method never converges; must stop
    perm = jnp.asarray(np.roll(np.eye(64), 1, axis=1), jnp.float32)
    out = ma.tokenrank(perm, alpha=1.0, method="power")
    assert np.all(np.isfinite(np.asarray(out)))
    nan = jnp.full((4, 4), jnp.nan)
    for method in METHODS:  # NaN under jit (eagerly it raises), never a hang
        out = jax.jit(lambda a: ma.tokenrank(a, method=method))(nan)
        assert np.all(np.isnan(np.asarray(out)))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": 1.2}, "alpha must lie in"),
        ({"alpha": -0.5}, "alpha must lie in"),
        ({"method": "eig"}, "method must be one of"),
        ({"method": "Solve"}, "method must be one of"),
        ({"direction": "up"}, "direction must be one of"),
        ({"v": np.ones(4)}, "distribution over the 5"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ma.tokenrank(PAPER_A, **kwargs)


@pytest.mark.parametrize("method", METHODS)
def test_unnormalised_weights_with_zero_rows_equal_their_normalised_chain(rng, method):
    """The solver normalises rows inside its products (no normalised copy); weights whose rows
    do not sum to 1, some all-zero (read as uniform rows), give the normalised chain's answer."""
    for n in (9, 130):
        w = testing.random_chains(rng, (3,), n) * rng.uniform(0.1, 30.0, (3, n, 1))
        w[0, 2] = 0.0
        w[1, [0, n - 1]] = 0.0
        s = w.sum(-1, keepdims=True)
        chain = np.where(s == 0, 1.0 / n, w / np.where(s == 0, 1.0, s))
        ref = stationary(chain, 0.99)
        for direction in ("in", "out"):
            out = ma.tokenrank(w.astype(np.float32), method=method, direction=direction)
            want = ma.tokenrank(chain.astype(np.float32), method=method, direction=direction)
            np.testing.assert_allclose(out, want, atol=2e-6)
        out = np.asarray(ma.tokenrank(w.astype(np.float32), method=method), np.float64)
        assert np.abs(out - ref).sum(-1).max() <= 1e-5
