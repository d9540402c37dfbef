"""|λ2| and the spectral gap against numpy.linalg.eigvals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import markov_attn as ma
from markov_attn import testing
from tests._refs import PAPER_A, lambda2


def test_paper_vector():
    # eigenvalue moduli 1, .626, .626, .061, .036: lambda_2 is a complex pair
    for method in ("arnoldi", "eig"):
        np.testing.assert_allclose(ma.second_eigenvalue(PAPER_A, method=method), 0.626, atol=5e-4)
    np.testing.assert_allclose(ma.spectral_gap(PAPER_A), 1 - 0.626, atol=5e-4)


# Kinds and sizes where the default Krylov dimension (128) is accurate to 1e-4.
CASES = [
    (n, kind, strength)
    for n in (5, 40, 197)
    for kind, strength in [
        ("attention", 6.0),
        ("diffuse", 6.0),
        ("dirichlet", 6.0),
        ("metastable", 6.0),
        ("metastable", 14.0),  # nearly reducible
        ("circulant", 6.0),  # complex lambda_2
        ("circulant", 14.0),  # complex and nearly reducible
    ]
]


@pytest.mark.parametrize(("n", "kind", "strength"), CASES)
def test_arnoldi_matches_eigvals(rng, n, kind, strength):
    a = testing.random_chains(rng, (3,), n, kind=kind, strength=strength)
    ref = lambda2(a)
    out = np.asarray(ma.second_eigenvalue(a.astype(np.float32)))
    assert out.dtype == np.float32
    assert np.abs(out - ref).max() <= 1e-4
    np.testing.assert_allclose(ma.second_eigenvalue(a, method="eig"), ref, atol=1e-5)


@pytest.mark.slow
def test_arnoldi_matches_eigvals_n1025(rng):
    kinds = ["attention", "metastable", "circulant", "diffuse"]
    a = np.concatenate([testing.random_chains(rng, (1,), 1025, kind=k) for k in kinds])
    out = np.asarray(ma.second_eigenvalue(a.astype(np.float32)))
    err = np.abs(out - lambda2(a))
    assert err.max() <= 1e-4, dict(zip(kinds, err))


def test_near_permutation_heads_need_a_larger_krylov_space(rng):
    # The documented hard case: all eigenvalues of nearly the same modulus. The default
    # dimension is only accurate to ~1e-2 here; krylov >= n - 1 is exact.
    a = testing.random_chains(rng, (2,), 150, kind="permutation")
    ref = lambda2(a)
    assert np.abs(np.asarray(ma.second_eigenvalue(a.astype(np.float32))) - ref).max() < 3e-2
    exact = np.asarray(ma.second_eigenvalue(a.astype(np.float32), krylov=149))
    assert np.abs(exact - ref).max() <= 1e-4


def test_degenerate_chains_no_nan():
    cases = [np.eye(6), np.full((6, 6), 1 / 6), np.roll(np.eye(6), 1, axis=1), np.ones((1, 1))]
    expected = [1.0, 0.0, 1.0, 0.0]
    for a, e in zip(cases, expected):
        out = float(ma.second_eigenvalue(a))
        assert np.isfinite(out)
        np.testing.assert_allclose(out, e, atol=1e-5)


def test_vmap_jit_batching(rng):
    a = testing.random_chains(rng, (3, 2), 24).astype(np.float32)
    full = ma.second_eigenvalue(a)
    assert full.shape == (3, 2)
    np.testing.assert_allclose(jax.vmap(ma.second_eigenvalue)(a), full, atol=1e-6)
    np.testing.assert_allclose(jax.jit(ma.second_eigenvalue)(a), full, atol=1e-7)
    np.testing.assert_allclose(ma.second_eigenvalue(a[2, 1]), full[2, 1], atol=1e-6)


def test_gradient_against_finite_differences(rng, x64):
    # The backward pass is the eigenvector formula for both methods. Check it against finite
    # differences of the exact forward (eig) on a real and a complex-pair lambda_2, and of the
    # Arnoldi forward where lambda_2 is real. (For a complex pair the Gelfand estimate carries a
    # phase-dependent error of ~1e-7 relative that is not smooth at finite-difference scale.)
    w = jnp.array([1.0, 2.0])
    for kind in ("metastable", "circulant"):
        a = jnp.asarray(testing.random_chains(rng, (2,), 10, kind=kind, strength=3.0))
        f = lambda x: jnp.sum(ma.second_eigenvalue(x, method="eig") * w)
        check_grads(f, (a,), order=1, modes=["rev"], atol=1e-6, rtol=1e-5)
    a = jnp.asarray(testing.random_chains(rng, (2,), 10, kind="metastable", strength=3.0))
    f = lambda x: jnp.sum(ma.second_eigenvalue(x) * w)
    check_grads(f, (a,), order=1, modes=["rev"], atol=1e-6, rtol=1e-5)
    g_eig = jax.grad(lambda x: jnp.sum(ma.second_eigenvalue(x, method="eig") * w))(a)
    np.testing.assert_allclose(jax.grad(f)(a), g_eig, atol=1e-9)


def test_bad_arguments():
    with pytest.raises(ValueError, match="method must be one of"):
        ma.second_eigenvalue(PAPER_A, method="qr")
    with pytest.raises(ValueError, match="krylov"):
        ma.second_eigenvalue(PAPER_A, krylov=0)
    with pytest.raises(ValueError, match="square"):
        ma.spectral_gap(np.ones((3, 4)))


def test_unnormalised_weights_with_zero_rows_equal_their_normalised_chain(rng):
    """|λ2| normalises rows inside its products; a zero row stands for the uniform row (so a
    triangular matrix with a zero row is no longer triangular once normalised)."""
    n = 40
    w = testing.random_chains(rng, (3,), n) * rng.uniform(0.1, 30.0, (3, n, 1))
    w[0, 5] = 0.0
    w[2] = np.tril(w[2])
    w[2, 7] = 0.0  # causal head with an empty row: its normalised chain is not triangular
    s = w.sum(-1, keepdims=True)
    chain = np.where(s == 0, 1.0 / n, w / np.where(s == 0, 1.0, s))
    ref = np.sort(np.abs(np.linalg.eigvals(chain)), -1)[..., -2]
    for method in ("arnoldi", "eig"):
        out = ma.second_eigenvalue(w.astype(np.float32), method=method)
        want = ma.second_eigenvalue(chain.astype(np.float32), method=method)
        np.testing.assert_allclose(out, want, atol=1e-5)
        # the nearly triangular head's eigenvalues are ill-conditioned: Arnoldi is only
        # checked on the other two against float64
        heads = slice(None) if method == "eig" else slice(0, 2)
        np.testing.assert_allclose(np.asarray(out)[heads], ref[heads], atol=1e-4)
