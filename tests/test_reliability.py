"""No silent wrong number, no hang: hard chains, causal heads, invalid values, empty input.

Property tests over many fresh random chains of the hard kinds (nearly reducible, causal),
against float64 references; every public function's behaviour on NaN/inf/negative input
(eagerly a ValueError, under jit NaN); LAPACK paths inside one jitted program on CPU.
"""

import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import markov_attn as ma
from markov_attn import testing
from tests._refs import bounces, reverse, stationary

TR_METHODS = ("solve", "gmres", "power")


# --------------------------------------------------------------------------------------------
# TokenRank accuracy on nearly reducible chains, every method, up to n = 1025


@pytest.mark.parametrize("method", TR_METHODS)
@pytest.mark.parametrize("n", [16, 129, 400, 1025])
def test_tokenrank_accuracy_on_nearly_reducible_chains(rng, method, n):
    # two blocks with leakage e^-12 (|λ2| within ~1e-5 of 1): the case where a residual-only
    # stopping rule gave L1 errors of 1e-4
    batch = 3 if n < 1025 else 2
    a = testing.random_chains(rng, (batch,), n, kind="reducible", strength=12.0)
    pi, info = ma.tokenrank(a.astype(np.float32), method=method, return_info=True)
    err = np.abs(np.asarray(pi, np.float64) - stationary(a)).sum(-1)
    assert err.max() <= 1e-5, (method, n, err)
    assert np.all(np.asarray(info.converged))


@pytest.mark.parametrize("kind", ["metastable", "causal", "circulant", "permutation"])
def test_tokenrank_accuracy_over_many_hard_chains(rng, kind):
    # a property test: 8 fresh draws of 6 chains each, all methods; sizes from a fixed set so
    # that the compiled programs are shared between draws and kinds (a new size per draw made
    # this test compile 96 programs)
    for _ in range(8):
        n = int(rng.choice([5, 37, 130, 197]))
        a = testing.random_chains(rng, (6,), n, kind=kind, strength=14.0)
        ref = stationary(a)
        for method in TR_METHODS:
            pi = ma.tokenrank(a.astype(np.float32), method=method)
            err = np.abs(np.asarray(pi, np.float64) - ref).sum(-1).max()
            assert err <= 1e-5, (kind, n, method, err)


def _normalized64(a):
    a = np.asarray(a, np.float64)
    return a / a.sum(-1, keepdims=True)  # the chain tokenrank solves: the rows renormalised


@pytest.mark.parametrize("strength", [12.0, 14.0, 16.0])
def test_tokenrank_error_bound_bounds_the_error(rng, strength):
    # two blocks leaking e^-strength at n = 64, 16 fresh chains. With float32 residuals GMRES
    # and the power method stopped at their rounding (~1e-7 in L1, which the solve amplifies
    # by up to (1+α)/(1-α) = 199) with L1 errors of 1.1-1.7e-5 at e^-14; double-float
    # residuals (markov_attn._df) brought them to ~1e-6 (5e-6 fails the old code)
    a = testing.random_chains(rng, (16,), 64, kind="reducible", strength=strength)
    a32 = a.astype(np.float32)
    ref = stationary(_normalized64(a32))
    for method in TR_METHODS:
        pi, info = ma.tokenrank(a32, method=method, return_info=True)
        err = np.abs(np.asarray(pi, np.float64) - ref).sum(-1)
        assert np.all(err <= np.asarray(info.error_bound)), (method, err, info.error_bound)
        assert err.max() <= (1e-5 if method == "solve" else 5e-6), (method, err.max())


@pytest.mark.parametrize("n", [400, 1025])
def test_tokenrank_accuracy_at_the_float32_floor_up_to_1025(rng, n):
    # leakage e^-14 at larger n (float32 residuals gave 1e-6 to 3e-6 here, double-float ones
    # 4e-8 to 1e-6: a check of the claim up to n = 1025, not a regression test)
    a = testing.random_chains(rng, (2,), n, kind="reducible", strength=14.0)
    a32 = a.astype(np.float32)
    ref = stationary(_normalized64(a32))
    for method in TR_METHODS:
        pi, info = ma.tokenrank(a32, method=method, return_info=True)
        err = np.abs(np.asarray(pi, np.float64) - ref).sum(-1)
        assert err.max() <= 5e-6, (method, n, err)
        assert np.all(np.asarray(info.converged)), method


@pytest.mark.parametrize("scale", ["rows", 1e35, 1e30, 1e-28])
def test_tokenrank_at_any_row_scale(rng, scale):
    # rows are renormalised, so their scale must not matter: the double-float residual's
    # error-free products overflowed (NaN) or lost their low parts (errors of 1e-5 to 0.2)
    # for row sums beyond ~1e34 or below ~1e-34 until the rows were scaled by powers of two,
    # and the power method's correction underflowed at 1e30 (1.1e-5). The scales keep the
    # leakage entries (~1e-8 of a row) above float32's smallest normal number: CPUs flush
    # subnormal inputs to zero, which makes another chain.
    a = testing.random_chains(rng, (3,), 48, kind="reducible", strength=14.0).astype(np.float32)
    ref = stationary(_normalized64(a))
    if scale == "rows":  # every row its own scale, 1e-25 to 1e25
        a = a * (10.0 ** rng.uniform(-25, 25, size=(3, 48, 1))).astype(np.float32)
    else:
        a = a * np.float32(scale)
    assert np.all(np.isfinite(a)) and np.all(a.sum(-1) > np.finfo(np.float32).tiny)
    for method in TR_METHODS:
        pi, info = ma.tokenrank(a, method=method, return_info=True)
        err = np.abs(np.asarray(pi, np.float64) - ref).sum(-1)
        assert err.max() <= 5e-6, (method, err)
        assert np.all(np.isfinite(np.asarray(info.error_bound))), method
        assert np.all(np.asarray(info.converged)), method


def test_accurate_product_of_the_normalised_chain(rng):
    # the rows of the normalised chain sum to 1, so 1^T (A^T x) = 1^T x: a check of the row
    # sums, of the rounding of 1/s (beta) and of the low parts, which a float32 row sum, a
    # dropped beta or a dropped low part each break by 0.04-0.08 eps (0.007 eps with all)
    from markov_attn._tokenrank import dense_operator, row_sums

    eps = np.finfo(np.float32).eps
    a = rng.uniform(size=(4, 257, 257)).astype(np.float32) ** 3
    a *= (10.0 ** rng.uniform(-3, 3, size=(4, 257, 1))).astype(np.float32)
    x = rng.uniform(size=(4, 257)).astype(np.float32)
    op = dense_operator(jnp.asarray(a))
    p = (jnp.asarray(a), row_sums(jnp.asarray(a)))
    hi, lo = jax.jit(lambda p, x: op.accurate(op.prepare(p), x))(p, jnp.asarray(x))
    y = np.asarray(hi, np.float64) + np.asarray(lo, np.float64)
    ref = np.einsum("bij,bi->bj", _normalized64(a), x.astype(np.float64))
    total = x.astype(np.float64).sum(-1)
    assert np.max(np.abs(y.sum(-1) - total) / total) <= 0.02 * eps
    assert np.max(np.abs(y - ref) / ref) <= 0.5 * eps
    # the residual v - M x: off the direction of v (the float32 part, harmless) within 0.1
    # eps of the float64 one in L1 (0.4 eps without its low part)
    from markov_attn._stationary import _residual_fn

    x = x / x.sum(-1, keepdims=True)
    v = np.full((4, 257), 1 / 257, np.float32)
    al = np.full((4,), 0.99, np.float32)
    fn = jax.jit(lambda p, x: _residual_fn(op, op.prepare(p), jnp.asarray(v), jnp.asarray(al))(x))
    r = np.asarray(fn(p, jnp.asarray(x)), np.float64)
    x64, v64 = x.astype(np.float64), v.astype(np.float64)
    ax = np.einsum("bij,bi->bj", _normalized64(a), x64)
    r64 = v64 - x64 + 0.99 * (ax - v64 * x64.sum(-1, keepdims=True))
    d = r - r64 - (np.float64(np.float32(0.99)) - 0.99) * (ax - v64)  # alpha is a float32
    d -= np.sum(d * v64, -1, keepdims=True) / np.sum(v64 * v64, -1, keepdims=True) * v64
    assert np.abs(d).sum(-1).max() <= 0.2 * eps, np.abs(d).sum(-1) / eps


def test_solve_info_reports_what_happened(rng):
    a = testing.random_chains(rng, (4,), 60, kind="metastable").astype(np.float32)
    for method in TR_METHODS:
        _, info = ma.tokenrank(a, method=method, return_info=True)
        assert info.residual.shape == info.converged.shape == (4,)
        assert np.all(np.asarray(info.converged))
        assert np.all(np.asarray(info.residual) < 1e-6)
        floor = 2 * np.finfo(np.float32).eps  # the residual's own rounding
        bound = (np.asarray(info.residual) + floor) * 1.99 / 0.01
        np.testing.assert_allclose(info.error_bound, bound, rtol=1e-5)
    # a step limit that cannot be met is reported, not hidden
    slow = testing.random_chains(rng, (2,), 60, kind="reducible", strength=12.0)
    _, info = ma.tokenrank(slow.astype(np.float32), method="power", max_steps=3, return_info=True)
    assert not np.any(np.asarray(info.converged))
    assert np.all(np.asarray(info.steps) == 3)
    # alpha = 1 has no error bound
    _, info = ma.tokenrank(a, alpha=1.0, return_info=True)
    assert np.all(np.isinf(np.asarray(info.error_bound)))


@pytest.mark.parametrize("causal", [False, True])
def test_tokenrank_qk_on_a_nearly_reducible_chain(rng, causal):
    # two clusters of queries and keys (1 - |λ2| ~ 1e-5): the streamed tiles' rows sum to 1
    # only up to the rounding of the log-sum-exp (~1e-6), which left tokenrank_qk 0.6-3.1e-5
    # from the chain with its rows normalised; its residuals now renormalise them
    n, d = 200, 16
    c = rng.normal(size=(2, d)) * 3.0
    lab = np.arange(n) % 2
    q = (c[lab] + 0.3 * rng.normal(size=(2, n, d))).astype(np.float32)
    k = (c[lab] + 0.3 * rng.normal(size=(2, n, d))).astype(np.float32)
    a = np.asarray(ma.transition(np.einsum("bid,bjd->bij", q, k) / 4.0, causal=causal))
    ref = stationary(_normalized64(a))
    pi = np.asarray(ma.tokenrank_qk(q, k, block=64, causal=causal), np.float64)
    err = np.abs(pi - ref).sum(-1)
    assert err.max() <= 5e-6, err


def test_tokenrank_qk_shares_the_solver_and_its_accuracy(rng):
    n, d = 300, 16
    q = rng.normal(size=(3, n, d)).astype(np.float32)
    k = rng.normal(size=(3, n, d)).astype(np.float32)
    pi, info = ma.tokenrank_qk(q, k, block=64, return_info=True)
    a = np.asarray(ma.transition(np.einsum("bid,bjd->bij", q, k) / 4.0), np.float64)
    assert np.abs(np.asarray(pi, np.float64) - stationary(a)).sum(-1).max() <= 1e-5
    assert np.all(np.asarray(info.converged))


# --------------------------------------------------------------------------------------------
# causal (decoder) attention: first-class input


def test_transition_causal_is_lower_triangular_softmax(rng):
    s = rng.normal(size=(2, 3, 9, 9)).astype(np.float32)
    a = np.asarray(ma.transition(s, causal=True))
    ref = np.where(np.tril(np.ones((9, 9))) > 0, np.exp(s), 0.0)
    np.testing.assert_allclose(a, ref / ref.sum(-1, keepdims=True), atol=1e-6)
    # with a key mask and keep= (CLS dropped): both apply, in the original token order
    km = np.ones(9, bool)
    km[4] = False
    b = np.asarray(ma.transition(s, causal=True, mask=km, keep=slice(1, None)))
    ref = np.where(np.tril(np.ones((9, 9))) > 0, np.exp(s), 0.0)[..., 1:, 1:] * km[1:]
    np.testing.assert_allclose(b, ref / ref.sum(-1, keepdims=True), atol=1e-6)
    with pytest.raises(ValueError, match="increasing token order"):
        ma.transition(s, causal=True, keep=np.array([3, 1, 2]))


@pytest.mark.parametrize("n", [64, 197])
def test_second_eigenvalue_is_exact_on_causal_heads(rng, n):
    # a sink (token 0) plus content: lower triangular, so the eigenvalues are its diagonal;
    # Arnoldi estimates of such ill-conditioned eigenvalues were off by 0.7
    a = testing.random_chains(rng, (2, 4), n, kind="causal")
    ref = np.sort(np.abs(np.diagonal(a, axis1=-2, axis2=-1)), -1)[..., -2]
    for method in ("arnoldi", "eig"):
        lam = ma.second_eigenvalue(a.astype(np.float32), method=method)
        np.testing.assert_allclose(lam, ref, atol=1e-6)
    # sliding-window causal attention is triangular too
    s = rng.normal(size=(2, 4, n, n)) * 2  # the shape above: one compilation
    i = np.arange(n)
    window = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - 16)
    w = np.where(window, np.exp(s), 0.0)
    w = w / w.sum(-1, keepdims=True)
    ref = np.sort(np.abs(np.diagonal(w, axis1=-2, axis2=-1)), -1)[..., -2]
    np.testing.assert_allclose(ma.second_eigenvalue(w.astype(np.float32)), ref, atol=1e-6)
    # upper triangular as well (rows renormalised first, which changes the diagonal)
    u = np.swapaxes(w, -1, -2)
    u = u / u.sum(-1, keepdims=True)
    ref_u = np.sort(np.abs(np.diagonal(u, axis1=-2, axis2=-1)), -1)[..., -2]
    np.testing.assert_allclose(ma.second_eigenvalue(u.astype(np.float32)), ref_u, atol=1e-6)


def test_second_eigenvalue_gradient_on_causal_heads(rng, x64):
    # |λ2| = A_kk / sum_j A_kj (rows are renormalised): d/dA_kj = delta_jk - A_kk on row k
    a = jnp.asarray(testing.random_chains(rng, (2,), 12, kind="causal"))
    g = jax.grad(lambda x: ma.second_eigenvalue(x).sum())(a)
    d = np.asarray(jnp.diagonal(a, axis1=-2, axis2=-1))
    k = np.argsort(np.abs(d), -1)[:, -2]
    ref = np.zeros(a.shape)
    ref[np.arange(2), k, :] = -d[np.arange(2), k][:, None]
    ref[np.arange(2), k, k] += 1.0
    np.testing.assert_allclose(g, ref, atol=1e-10)


def test_every_chain_function_on_causal_chains(rng):
    a = testing.random_chains(rng, (2, 3), 40, kind="causal")
    a32 = a.astype(np.float32)
    # bounces
    out = ma.bounce(a32, 5, steps=4, alpha=0.9)
    x0 = np.broadcast_to(np.eye(40)[5], (2, 3, 40))
    np.testing.assert_allclose(out, bounces(a, x0, 4, 0.9), atol=2e-6)
    # TokenRank, both directions
    np.testing.assert_allclose(ma.tokenrank(a32), stationary(a), atol=2e-6)
    out_dir = ma.tokenrank(a32, direction="out")
    np.testing.assert_allclose(out_dir, stationary(reverse(0.99 * a + 0.01 / 40), 1.0), atol=1e-5)
    # column select / reverse: columns of a causal chain
    np.testing.assert_allclose(ma.reverse(a32), reverse(a), atol=1e-6)
    # rollout over causal layers stays lower triangular
    r = np.asarray(ma.rollout(a32[:, :, None]))
    assert np.all(np.triu(r, 1) == 0)
    # streaming from q, k with the causal structure as masks is not offered: the dense path is
    # the causal path; lambda2 per head agrees with the diagonal
    lam = ma.second_eigenvalue(a32)
    np.testing.assert_allclose(lam, np.sort(np.abs(np.diagonal(a, 0, -2, -1)), -1)[..., -2], 1e-6)
    # the generic estimate would have been wrong on these heads: a permuted copy (the same
    # eigenvalues, no longer triangular) goes through Arnoldi and misses them
    p = np.random.default_rng(0).permutation(a.shape[-1])
    permuted = np.asarray(ma.second_eigenvalue(a32[..., p, :][..., :, p]))
    assert np.abs(permuted - np.asarray(lam)).max() > 1e-5


# --------------------------------------------------------------------------------------------
# invalid values: eagerly a ValueError, under jit NaN (never a plausible number)


def _bad_chains(rng, n=6):
    a = testing.random_chains(rng, (3,), n).astype(np.float32)
    nan = a.copy()
    nan[1, 2, 3] = np.nan
    inf = a.copy()
    inf[1, 0, 0] = np.inf
    neg = a.copy()
    neg[1, 4, 1] = -0.3
    return {"nan": nan, "inf": inf, "negative": neg}


CHAIN_FUNCTIONS = {
    "tokenrank": lambda a: ma.tokenrank(a),
    "tokenrank-solve": lambda a: ma.tokenrank(a, method="solve"),
    "tokenrank-power": lambda a: ma.tokenrank(a, method="power"),
    "tokenrank-out": lambda a: ma.tokenrank(a, direction="out"),
    "second_eigenvalue": lambda a: ma.second_eigenvalue(a),
    "second_eigenvalue-eig": lambda a: ma.second_eigenvalue(a, method="eig"),
    "bounce": lambda a: ma.bounce(a, 0, steps=3),
    "bounce-reverse": lambda a: ma.bounce(a, 0, steps=3, direction="reverse"),
    "teleport": lambda a: ma.teleport(a),
    "reverse": lambda a: ma.reverse(a),
    "normalize": lambda a: ma.normalize(a),
    "column_sum": lambda a: ma.column_sum(a),
    "row_select": lambda a: ma.row_select(a, 1),
    "column_select": lambda a: ma.column_select(a, 1),
    "rollout": lambda a: ma.rollout(a[:, None, None]),
}


@pytest.mark.parametrize("name", sorted(CHAIN_FUNCTIONS))
def test_invalid_entries_raise_eagerly_and_give_nan_under_jit(rng, name):
    fn = CHAIN_FUNCTIONS[name]
    for what, a in _bad_chains(rng).items():
        with pytest.raises(ValueError, match="NaN or inf|negative"):
            fn(a)
        out = np.asarray(jax.jit(fn)(a))
        assert np.all(np.isnan(out[1])), (what, out[1])
        assert np.all(np.isfinite(out[[0, 2]])), what  # the others are untouched


@pytest.mark.parametrize("name", ["tokenrank", "second_eigenvalue", "bounce", "normalize"])
def test_rows_whose_sum_overflows_raise_eagerly_and_give_nan_under_jit(rng, name):
    # finite entries, but a row sum of inf cannot be normalised: an error, never a number
    fn = CHAIN_FUNCTIONS[name]
    a = testing.random_chains(rng, (3,), 6).astype(np.float32)
    a[1, 2, :2] = 3e38
    with pytest.raises(ValueError, match="overflows"):
        fn(a)
    out = np.asarray(jax.jit(fn)(a))
    assert np.all(np.isnan(out[1])) and np.all(np.isfinite(out[[0, 2]]))


def test_invalid_options_under_jit_give_nan(rng):
    a = testing.random_chains(rng, (2,), 8).astype(np.float32)
    for alpha in (1.5, -0.1, np.nan):
        assert np.all(np.isnan(jax.jit(lambda al: ma.tokenrank(a, alpha=al))(alpha)))
        assert np.all(np.isnan(jax.jit(lambda al: ma.bounce(a, 0, steps=2, alpha=al))(alpha)))
        assert np.all(np.isnan(jax.jit(lambda al: ma.teleport(a, alpha=al))(alpha)))
    for x0 in (8, 11, -9):  # token index out of range (n = 8)
        out = jax.jit(lambda i: ma.bounce(a, i, steps=2))(x0)
        assert np.all(np.isnan(out))
    assert np.all(np.isnan(jax.jit(lambda r: ma.rollout(a[None, :, None], residual=r))(1.5)))
    v_bad = np.array([0.5, -0.1, 0.2, 0.1, 0.1, 0.1, 0.05, 0.05], np.float32)
    for v in (v_bad, np.full(8, np.nan, np.float32)):
        assert np.all(np.isnan(jax.jit(lambda v: ma.tokenrank(a, v=v))(v)))
        assert np.all(np.isnan(jax.jit(lambda v: ma.bounce(a, v, steps=2))(v)))
    w = np.array([0.3, np.nan], np.float32)
    assert np.all(np.isnan(jax.jit(lambda w: ma.average(a, weights=w, axis=0))(w)))
    lam = np.array([0.3, np.nan], np.float32)
    assert np.all(np.isnan(jax.jit(lambda x: ma.head_weights(x))(lam)))


def test_invalid_options_raise_eagerly(rng):
    a = testing.random_chains(rng, (2,), 8).astype(np.float32)
    with pytest.raises(ValueError, match="residual must be"):
        ma.rollout(a[None, :, None], residual=1.5)
    with pytest.raises(ValueError, match="NaN/inf"):
        ma.head_weights([np.nan, 0.3])
    with pytest.raises(ValueError, match="finite and non-negative"):
        ma.average(a, weights=[np.nan, 1.0], axis=0)
    with pytest.raises(ValueError, match="v must be finite and non-negative"):
        ma.tokenrank(a, v=np.array([1, -1, 1, 1, 1, 1, 1, 1.0]))
    with pytest.raises(ValueError, match=r"v must be a distribution over the 8 tokens"):
        ma.tokenrank(a, v=np.ones(5))
    with pytest.raises(ValueError, match=r"v must be a distribution over the 8 tokens"):
        ma.bounce(a, 0, steps=2, v=np.ones((2, 3)))
    with pytest.raises(ValueError, match="x0 must be finite and non-negative"):
        ma.bounce(a, np.full(8, -1.0), steps=2)
    with pytest.raises(ValueError, match="q contains NaN"):
        q = np.ones((4, 2), np.float32)
        q[0, 0] = np.nan
        ma.tokenrank_qk(q, np.ones((4, 2), np.float32))


def test_nan_in_q_gives_nan_under_jit(rng):
    q = rng.normal(size=(2, 12, 4)).astype(np.float32)
    k = rng.normal(size=(2, 12, 4)).astype(np.float32)
    q[1, 3, 0] = np.nan
    for fn in (
        lambda q: ma.tokenrank_qk(q, k, block=4),
        lambda q: ma.bounce_qk(q, k, 0, steps=2, block=4),
        lambda q: ma.second_eigenvalue_qk(q, k, block=4),
    ):
        out = np.asarray(jax.jit(fn)(q))
        assert np.all(np.isnan(out[1])) and np.all(np.isfinite(out[0]))


def test_counts_take_numpy_ints_and_refuse_bools(rng):
    a = testing.random_chains(rng, (), 6).astype(np.float32)
    assert ma.bounce(a, 0, steps=np.int64(2)).shape == (3, 6)
    assert ma.second_eigenvalue(a, krylov=np.int32(4)).shape == ()
    for fn in (
        lambda: ma.bounce(a, 0, steps=True),
        lambda: ma.second_eigenvalue(a, krylov=True),
        lambda: ma.bounce(a, 0, steps=2.0),
    ):
        with pytest.raises(ValueError, match="must be a (non-negative|positive) int"):
            fn()


@pytest.mark.parametrize(
    "fn",
    [
        ma.tokenrank,
        ma.second_eigenvalue,
        ma.teleport,
        ma.reverse,
        ma.normalize,
        ma.column_sum,
        lambda a: ma.rollout(a[None, None]),
        lambda a: ma.bounce(a, 0, steps=1),
        ma.transition,
    ],
)
def test_empty_chains_get_a_clear_error(fn):
    with pytest.raises(ValueError, match="no tokens"):
        fn(np.zeros((2, 0, 0), np.float32))


def test_empty_qk_gets_a_clear_error():
    with pytest.raises(ValueError, match="no tokens"):
        ma.tokenrank_qk(np.zeros((0, 4), np.float32), np.zeros((0, 4), np.float32))


_A2 = testing.random_chains(np.random.default_rng(0), (2,), 8).astype(np.float32)
_Q2 = np.random.default_rng(1).standard_normal((2, 8, 4)).astype(np.float32)


@pytest.mark.parametrize(
    "name, call",
    [
        ("v", lambda: ma.tokenrank(_A2, v=np.ones((3, 8)))),
        ("alpha", lambda: ma.tokenrank(_A2, alpha=np.full(3, 0.9))),
        ("v", lambda: ma.teleport(_A2, v=np.ones((3, 8)))),
        ("alpha", lambda: ma.teleport(_A2, alpha=np.full(3, 0.9))),
        ("v", lambda: ma.bounce(_A2, 0, steps=2, v=np.ones((3, 8)))),
        ("x0", lambda: ma.bounce(_A2, np.array([0, 1, 2]), steps=2)),
        ("x0", lambda: ma.bounce(_A2, np.ones((3, 8)), steps=2)),
        ("v", lambda: ma.tokenrank_qk(_Q2, _Q2, v=np.ones((3, 8)))),
        ("alpha", lambda: ma.tokenrank_qk(_Q2, _Q2, alpha=np.full(3, 0.9))),
        ("v", lambda: ma.tokenrank_qk(_Q2[0], _Q2, v=np.ones((3, 8)))),  # k's batch counts
    ],
)
def test_a_batch_shape_that_does_not_broadcast_names_the_argument(name, call):
    # these used to fail inside the computation with "Incompatible shapes for broadcasting"
    with pytest.raises(ValueError, match=rf"^{name} has batch shape \(3,\).*batch shape \(2,\)"):
        call()


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_one_alpha_per_matrix_equals_separate_calls(rng, direction):
    # teleport and bounce once multiplied a per-matrix alpha (B,) into the token axis: rows
    # that did not sum to 1, or a broadcasting error when n != B
    a = testing.random_chains(rng, (3,), 5).astype(np.float32)
    al = np.array([0.5, 0.9, 0.99], np.float32)
    t = np.asarray(ma.teleport(a, alpha=al))
    xs = np.asarray(ma.bounce(a, 0, steps=3, alpha=al, direction=direction))
    pi = np.asarray(ma.tokenrank(a, alpha=al, direction="out" if direction == "reverse" else "in"))
    for i in range(3):
        np.testing.assert_allclose(t[i], ma.teleport(a[i], alpha=al[i]), atol=1e-7)
        one = ma.bounce(a[i], 0, steps=3, alpha=al[i], direction=direction)
        np.testing.assert_allclose(xs[i], one, atol=1e-7)
        d = "out" if direction == "reverse" else "in"
        np.testing.assert_allclose(pi[i], ma.tokenrank(a[i], alpha=al[i], direction=d), atol=1e-6)


def test_batch_shapes_that_broadcast_still_work():
    assert ma.tokenrank(_A2, v=np.ones((2, 8)), alpha=np.full(2, 0.9)).shape == (2, 8)
    assert ma.tokenrank(_A2[0], v=np.ones((3, 8))).shape == (3, 8)
    assert ma.bounce(_A2, np.array([0, 1]), steps=2).shape == (2, 3, 8)


def test_head_weights_without_heads_gets_a_clear_error():
    for lam2 in ([], np.zeros((2, 0), np.float32)):
        with pytest.raises(ValueError, match="no heads along axis -1"):
            ma.head_weights(lam2)
    assert ma.head_weights(np.zeros((0, 3), np.float32)).shape == (0, 3)  # an empty batch


def test_an_empty_batch_is_fine(rng):
    a = np.zeros((0, 5, 5), np.float32)
    assert ma.tokenrank(a).shape == (0, 5)
    assert ma.second_eigenvalue(a).shape == (0,)
    assert ma.bounce(a, 0, steps=2).shape == (0, 3, 5)


# --------------------------------------------------------------------------------------------
# no hang: the LAPACK paths inside one jitted program on CPU


@pytest.mark.parametrize("x64", [False, True])
def test_lapack_paths_in_one_program_do_not_hang(x64):
    # jaxlib 0.10's batched CPU LAPACK kernels deadlocked in 2 of 4 runs of this program; the
    # library now routes dense LAPACK work on CPU through NumPy (host callbacks), so the
    # compiled module holds no LAPACK custom call, and it completes. The batch of 4 x 12 chains
    # is kept (every routine runs batched); n = 64 rather than 197 (the absence of LAPACK calls
    # does not depend on n, and NumPy's eig on 48 chains of 197 made this 100 s)
    code = textwrap.dedent(
        """
        import os
        os.environ.setdefault("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
        import sys
        import jax, jax.numpy as jnp, numpy as np
        x64 = sys.argv[1] == "True"
        # float64 input in x64 mode too: its NumPy results come back as uint32 words
        jax.config.update("jax_enable_x64", x64)
        import markov_attn as ma
        from markov_attn import testing

        dtype = jnp.float64 if x64 else jnp.float32
        a = jnp.asarray(testing.random_chains(np.random.default_rng(0), (4, 12), 64), dtype)

        @jax.jit
        def everything(a):
            pin = ma.tokenrank(a, method="solve")
            pout = ma.tokenrank(a, method="solve", direction="out")
            lam = ma.second_eigenvalue(a, method="eig")
            g = jax.grad(lambda x: jnp.sum(ma.tokenrank(x, method="solve") ** 2))(a)
            gl = jax.grad(lambda x: ma.second_eigenvalue(x).sum())(a)
            return pin, pout, lam, g, gl

        text = everything.lower(a).compile().as_text().lower()
        assert "lapack" not in text, "a LAPACK custom call is compiled into the CPU module"
        for _ in range(3):
            out = jax.block_until_ready(everything(a))
        assert all(o.dtype == dtype for o in out), [o.dtype for o in out]
        ref = np.sort(np.abs(np.linalg.eigvals(np.asarray(a, np.float64))), -1)[..., -2]
        assert np.abs(np.asarray(out[2], np.float64) - ref).max() < (1e-12 if x64 else 1e-5)
        # under vmap the host callback sees batched arrays (a reshape there once failed)
        lam = jax.vmap(lambda x: ma.second_eigenvalue(x, method="eig"))(a)
        pin = jax.vmap(lambda x: ma.tokenrank(x, method="solve"))(a)
        assert lam.dtype == pin.dtype == dtype
        np.testing.assert_array_equal(np.asarray(lam), np.asarray(out[2]))
        np.testing.assert_allclose(np.asarray(pin), np.asarray(out[0]), atol=1e-6)
        print("done")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(x64)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done" in proc.stdout


def _gth64(p):
    """Float64 GTH reference (one matrix)."""
    p = np.array(p, np.float64)
    n = len(p)
    for k in range(n - 1, 0, -1):
        p[:k, k] /= p[k, :k].sum()
        p[:k, :k] += np.outer(p[:k, k], p[k, :k])
    x = np.zeros(n)
    x[0] = 1.0
    for k in range(1, n):
        x[k] = x[:k] @ p[:k, k]
    return x / x.sum()


def _leaky_blocks(seed, n, leak, blocks=3):
    rng = np.random.default_rng(seed)
    label = np.arange(n) * blocks // n
    logits = rng.normal(size=(n, n))
    a = np.exp(logits - logits.max(-1, keepdims=True))
    a *= np.where(label[:, None] == label[None, :], 1.0, np.exp(-leak))
    return (a / a.sum(-1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize(
    ("seed", "n", "leak"), [(11, 64, 14), (5, 64, 16), (5, 64, 20), (4, 300, 14)]
)
def test_tokenrank_out_on_a_nearly_reducible_chain_with_a_one_hot_v(seed, n, leak):
    """direction='out' in the paper's order (an alpha = 1 solve of the reversed teleported
    chain, as ill-conditioned as the chain is nearly reducible with a concentrated v) keeps the
    accuracy claim with "auto" and "solve" (GTH elimination); the iterative methods do not
    (1e-4 to 1e-1 off) and say so in the docstring. teleport_first=False keeps it everywhere."""
    a32 = _leaky_blocks(seed, n, leak)
    a64 = a32.astype(np.float64) / a32.astype(np.float64).sum(-1, keepdims=True)
    v = np.eye(n)[7]
    t = 0.99 * a64 + 0.01 * v[None, :]
    want = _gth64(t.T / t.T.sum(-1, keepdims=True))
    for method in ("auto", "solve"):
        pi, info = ma.tokenrank(a32, v=v, direction="out", method=method, return_info=True)
        assert np.abs(np.asarray(pi, np.float64) - want).sum() < 1e-5, method
        assert bool(info.converged) and np.isinf(np.asarray(info.error_bound))
    # the case is hard: the float32 iteration misses it (why GTH is the default here)
    gm = ma.tokenrank(a32, v=v, direction="out", method="gmres")
    assert np.abs(np.asarray(gm, np.float64) - want).sum() > 1e-4
    rev = a64.T / a64.T.sum(-1, keepdims=True)
    other = np.linalg.solve(np.eye(n) - 0.99 * rev.T, 0.01 * v)
    other /= other.sum()
    for method in ("gmres", "power", "solve"):
        pi = ma.tokenrank(a32, v=v, direction="out", teleport_first=False, method=method)
        assert np.abs(np.asarray(pi, np.float64) - other).sum() < 1e-5, method


@pytest.mark.parametrize(("seed", "n", "leak"), [(11, 64, 14), (5, 64, 16), (4, 300, 14)])
def test_tokenrank_alpha_one_on_a_nearly_reducible_chain(seed, n, leak):
    """alpha = 1 (the plain stationary distribution): GMRES 2e-3 to 1.2e-2 off, the float64
    solve of the float32 I - A 4e-3 to 7e-2; a concrete alpha of 1 takes GTH (1.3e-7)."""
    a32 = _leaky_blocks(seed, n, leak)
    want = _gth64(a32.astype(np.float64) / a32.astype(np.float64).sum(-1, keepdims=True))
    for method in ("auto", "solve"):
        pi = ma.tokenrank(a32, alpha=1.0, method=method)
        assert np.abs(np.asarray(pi, np.float64) - want).sum() < 1e-5, method
    pi = ma.tokenrank(np.stack([a32, a32]), alpha=[1.0, 1.0])  # one alpha per matrix, all 1
    assert np.abs(np.asarray(pi[1], np.float64) - want).sum() < 1e-5
    # a batch with only some alphas of 1 (the alpha = 1 member was 2.3e-3 off: a cliff)
    pi = np.asarray(ma.tokenrank(np.stack([a32, a32]), alpha=[1.0, 0.5]), np.float64)
    assert np.abs(pi[0] - want).sum() < 1e-5
    a64 = a32.astype(np.float64) / a32.astype(np.float64).sum(-1, keepdims=True)
    half = np.linalg.solve(np.eye(n) - 0.5 * a64.T, np.full(n, 0.5 / n))
    assert np.abs(pi[1] - half / half.sum()).sum() < 1e-5
    gm = ma.tokenrank(a32, alpha=1.0, method="gmres")  # the case is hard
    assert np.abs(np.asarray(gm, np.float64) - want).sum() > 1e-4


@pytest.mark.parametrize(
    "kind", ["attention", "metastable", "reducible", "permutation", "dirichlet"]
)
@pytest.mark.parametrize("n", [2, 3, 33, 97])
def test_gth_against_float64(rng, kind, n):
    from markov_attn._stationary import gth

    a = testing.random_chains(rng, (2, 3), n, kind=kind, strength=14.0)
    out = np.asarray(jax.jit(gth)(jnp.asarray(a, jnp.float32)), np.float64)
    for idx in np.ndindex(2, 3):
        want = _gth64(a[idx].astype(np.float32))
        # componentwise: every entry to a small relative error, tiny ones included
        np.testing.assert_allclose(out[idx], want, rtol=2e-5, atol=0)
    np.testing.assert_allclose(np.asarray(gth(jnp.asarray(a[1, 2], jnp.float32))), out[1, 2],
                               rtol=1e-6)  # fmt: skip


_GTH_GRAD_CASES = {
    "out": dict(direction="out", v=np.eye(48)[5].tolist()),
    "alpha1": dict(alpha=1.0),
}


def test_tokenrank_gth_gradients_on_a_nearly_reducible_chain(tmp_path):
    """The GTH paths' gradients use GTH's factors for the adjoint (the GMRES adjoint was
    27-35 % off here in relative L2): float32 gradients of direction="out" (one-hot v) and
    alpha = 1 on three blocks leaking e^-16 against float64 ones, which a subprocess checks
    against central differences of the float64 forward."""
    code = textwrap.dedent(
        """
        import json, sys
        import jax
        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp, numpy as np
        import markov_attn as ma
        from tests.test_reliability import _GTH_GRAD_CASES, _leaky_blocks
        out = {}
        for seed in (0, 1):
            a = _leaky_blocks(seed, 48, 16).astype(np.float64)
            w = np.random.default_rng(seed).standard_normal(48)
            e = np.random.default_rng(seed + 10).standard_normal((48, 48)) * a
            for name, kw in _GTH_GRAD_CASES.items():
                f = lambda x: jnp.sum(w * ma.tokenrank(x, tol=1e-12, **kw))
                g = np.asarray(jax.grad(f)(jnp.asarray(a)))
                fd = (float(f(a + 1e-6 * e)) - float(f(a - 1e-6 * e))) / 2e-6
                out[f"{name}{seed}"] = [g.tolist(), float(np.sum(g * e)), fd]
        json.dump(out, open(sys.argv[1], "w"))
        """
    )
    path = tmp_path / "g64.json"
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = json.loads(path.read_text())
    for seed in (0, 1):
        a32 = _leaky_blocks(seed, 48, 16)
        w = jnp.asarray(np.random.default_rng(seed).standard_normal(48), jnp.float32)
        for name, kw in _GTH_GRAD_CASES.items():
            g64, directional, fd = ref[f"{name}{seed}"]
            assert abs(directional - fd) <= 1e-6 * abs(fd)  # the float64 reference is right
            g = jax.grad(lambda x, kw=kw: jnp.sum(w * ma.tokenrank(x, **kw)))(jnp.asarray(a32))
            g, g64 = np.asarray(g, np.float64), np.asarray(g64)
            assert np.linalg.norm(g - g64) <= 1e-4 * np.linalg.norm(g64), (name, seed)


def test_tokenrank_out_gth_on_a_causal_chain_with_a_one_hot_v(rng):
    """A causal chain's reversed teleported chain with a one-hot v: nothing after token v
    leads back, so the last token absorbs it and token 0 is transient. GTH's elimination down
    to token 0 divides by zero there; the second elimination, down to the largest token of
    GMRES's answer, gives the exact answer e_{n-1} (GMRES's own was 1.2e-4 to 3.3e-4 off,
    review). The other members of the batch keep the first elimination's answer."""
    n = 48
    causal = testing.random_chains(np.random.default_rng(0), (2,), n, kind="causal")
    full = testing.random_chains(rng, (1,), n)
    a = np.concatenate([causal, full]).astype(np.float32)
    v = np.eye(n)[3]
    from markov_attn._stationary import gth
    from markov_attn._tokenrank import _reverse, _teleport

    chains = _reverse(_teleport(jnp.asarray(a), jnp.float32(0.99), jnp.asarray(v, jnp.float32)))
    raw = np.asarray(gth(chains))
    assert not np.isfinite(raw[:2]).all() and np.isfinite(raw[2]).all()  # the premise
    for batch in (a[:2], a):
        pi, info = ma.tokenrank(batch, v=v, direction="out", return_info=True)
        for i in (0, 1):
            assert np.abs(np.asarray(pi[i], np.float64) - np.eye(n)[-1]).sum() < 1e-6
        assert np.asarray(info.converged).all()
    np.testing.assert_allclose(pi[2], raw[2], rtol=1e-6)


def _alpha_one_grad_error(a, a64, pi, seed):
    """Relative L2 error of the float32 gradient of w.tokenrank(a, alpha=1) against float64:
    with row-stochastic A and (I - A) u = w - (w.pi) 1, dL/dA_ij = pi_i (u_j - (A u)_i)."""
    n = len(pi)
    w64 = np.random.default_rng(seed).standard_normal(n)
    u = np.linalg.lstsq(np.eye(n) - a64, w64 - (w64 @ pi), rcond=None)[0]
    ref = pi[:, None] * (u[None, :] - (a64 @ u)[:, None])
    w = jnp.asarray(w64, jnp.float32)
    g = jax.grad(lambda x: jnp.sum(w * ma.tokenrank(x, alpha=1.0)))(jnp.asarray(a))
    return np.linalg.norm(np.asarray(g, np.float64) - ref) / np.linalg.norm(ref)


def test_tokenrank_alpha_one_with_a_transient_token_0():
    """alpha = 1 on a nearly reducible chain whose token 0 receives no attention (a padding
    token masked as a key: column 0 is zero, so pi_0 = 0 and the chain still has one answer).
    GTH eliminating down to token 0 divided by zero and the member took GMRES's answer, 1.6e-3
    to 7.6e-3 off with converged=True (review); now as accurate as with the token placed
    last. Also in a batch, and its gradient (the adjoint's second elimination)."""
    for seed, n, leak in ((11, 64, 14), (5, 64, 16), (4, 48, 14)):
        logits = np.log(_leaky_blocks(seed, n, leak))
        mask = np.ones(n, bool)
        mask[0] = False
        a = np.asarray(ma.transition(logits, mask=mask))
        assert np.all(a[:, 0] == 0)  # the premise
        perm = np.r_[1:n, 0]
        a64 = a.astype(np.float64) / a.astype(np.float64).sum(-1, keepdims=True)
        want = np.zeros(n)
        want[perm] = _gth64(a64[np.ix_(perm, perm)])
        for method in ("auto", "solve"):
            pi, info = ma.tokenrank(a, alpha=1.0, method=method, return_info=True)
            assert np.abs(np.asarray(pi, np.float64) - want).sum() < 1e-6, (seed, method)
            assert bool(info.converged)
        both = np.asarray(ma.tokenrank(np.stack([_leaky_blocks(seed, n, leak), a]), alpha=1.0))
        assert np.abs(both[1] - want).sum() < 1e-6
    # the gradient (the adjoint eliminated down to a recurrent token) against float64
    assert _alpha_one_grad_error(a, a64, want, seed=0) <= 1e-4  # GMRES's adjoint: 3.6e-3


def test_gth_gradient_with_a_nearly_transient_token_0():
    """The adjoint eliminated down to token 0 first: with token 0 nearly transient (column 0
    scaled by eps) its factors are finite but the Poisson solve cancels (relative gradient
    error 7.7e-2 at eps = 1e-12, 1e6 and more from 1e-20; review). It now eliminates down to
    the largest token of pi."""
    n = 32
    a = _leaky_blocks(2, n, 8)
    a[:, 0] *= 1e-20
    a = (a / a.sum(-1, keepdims=True)).astype(np.float32)
    a64 = a.astype(np.float64) / a.astype(np.float64).sum(-1, keepdims=True)
    perm = np.r_[1:n, 0]
    pi = np.zeros(n)
    pi[perm] = _gth64(a64[np.ix_(perm, perm)])
    assert _alpha_one_grad_error(a, a64, pi, seed=1) <= 1e-4


def test_gth_range_beyond_float32_is_not_uniform():
    """A chain whose stationary components span more than float32's range (token 0 nearly
    transient): GTH's unnormalised solution reached ~1e38, the reciprocal of its sum flushed to
    zero and the answer came back exactly uniform with converged=True (review)."""
    b = 5e-20
    a = np.array([[0.5, 0.5, 0.0], [b, 0.5, 0.5 - b], [0.0, b, 1.0 - b]], np.float32)
    pi, info = ma.tokenrank(a, alpha=1.0, return_info=True)
    pi = np.asarray(pi, np.float64)
    assert pi[2] > 1 - 1e-6 and 0.5e-19 < pi[1] < 2e-19 and pi[0] < 1e-37
    assert bool(info.converged)
    mixed = np.asarray(ma.tokenrank(np.stack([a, a]), alpha=[1.0, 0.999]))
    np.testing.assert_allclose(mixed[0], pi, rtol=1e-5, atol=1e-30)


def test_tokenrank_alpha_that_is_one_in_float32_takes_gth():
    """alpha = 1 - 1e-9 is 1 in float32, where the solve runs: it took the float32 iteration
    at alpha = 1 (2.3e-3 off), not GTH (review)."""
    a = _leaky_blocks(11, 64, 14)
    np.testing.assert_array_equal(ma.tokenrank(a, alpha=1 - 1e-9), ma.tokenrank(a, alpha=1.0))


def test_tokenrank_alpha_one_on_a_reducible_chain_keeps_gmres(rng):
    """Two closed classes (no unique answer): both eliminations break down, the member takes
    GMRES's answer; the other member of the batch keeps GTH's."""
    n = 12
    a = np.zeros((n, n), np.float32)
    a[:6, :6] = testing.random_chains(rng, (), 6)
    a[6:, 6:] = testing.random_chains(rng, (), 6)
    full = testing.random_chains(rng, (), n).astype(np.float32)
    pi = np.asarray(ma.tokenrank(np.stack([a, full]), alpha=1.0))
    gm = np.asarray(ma.tokenrank(np.stack([a, full]), alpha=1.0, method="gmres"))
    np.testing.assert_array_equal(pi[0], gm[0])
    want = _gth64(full.astype(np.float64) / full.astype(np.float64).sum(-1, keepdims=True))
    assert np.abs(pi[1] - want).sum() < 1e-6


def test_auto_uses_gth_only_up_to_its_size_limit(monkeypatch):
    """GTH costs O(n^3): "auto" takes it for the alpha = 1 problems up to AUTO_GTH_MAX_N and
    GMRES above ("solve" always takes it)."""
    from markov_attn import _tokenrank

    monkeypatch.setattr(_tokenrank, "AUTO_GTH_MAX_N", 16)
    jax.clear_caches()
    try:
        for n, same_as in ((16, "solve"), (24, "gmres")):
            a = _leaky_blocks(3, n, 12)
            v = np.eye(n)[2]
            for kw in (dict(direction="out", v=v), dict(alpha=1.0)):
                auto = np.asarray(ma.tokenrank(a, **kw))
                want = np.asarray(ma.tokenrank(a, method=same_as, **kw))
                other = np.asarray(
                    ma.tokenrank(a, method="gmres" if same_as == "solve" else "solve", **kw)
                )
                np.testing.assert_array_equal(auto, want)
                assert not np.array_equal(auto, other)  # the two paths are told apart
    finally:
        jax.clear_caches()
