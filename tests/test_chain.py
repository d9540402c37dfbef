"""transition, normalize, teleport, reverse, one-step operations, check_chain."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import markov_attn as ma
from markov_attn import testing
from tests._refs import PAPER_A, reverse


def test_paper_vectors_one_step():
    # docs/chains.md §9: one bounce from one-hot(4) and from uniform
    np.testing.assert_allclose(ma.row_select(PAPER_A, 4), [0.53, 0.03, 0.03, 0.06, 0.35], atol=1e-6)
    np.testing.assert_allclose(
        ma.column_sum(PAPER_A), [0.444, 0.048, 0.036, 0.202, 0.270], atol=5e-4
    )


def test_transition_matches_float64_softmax(rng):
    logits = rng.normal(size=(2, 3, 17, 17)) * 3
    ref = np.exp(logits - logits.max(-1, keepdims=True))
    ref /= ref.sum(-1, keepdims=True)
    out = ma.transition(logits.astype(np.float32))
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref, atol=1e-6)


@pytest.mark.parametrize(
    "keep",
    [slice(1, None), np.arange(1, 9), np.r_[False, np.ones(8, bool)], [1, 2, 3, 4, 5, 6, 7, 8]],
)
def test_transition_keep_drops_before_softmax(rng, keep):
    logits = rng.normal(size=(4, 9, 9))
    out = ma.transition(logits, keep=keep)
    ref = np.exp(logits[:, 1:, 1:])
    ref /= ref.sum(-1, keepdims=True)
    np.testing.assert_allclose(out, ref, atol=1e-6)
    # equals dropping the CLS column of the probabilities and renormalising rows
    full = np.asarray(ma.transition(logits))[:, 1:, 1:]
    np.testing.assert_allclose(out, full / full.sum(-1, keepdims=True), atol=1e-6)


def test_transition_key_mask_and_full_mask(rng):
    logits = rng.normal(size=(2, 6, 6))
    key = np.array([True, True, False, True, False, True])
    out = np.asarray(ma.transition(logits, mask=key))
    assert np.all(out[..., ~key] == 0)
    np.testing.assert_allclose(out.sum(-1), 1, atol=1e-6)
    full = np.broadcast_to(key, (2, 6, 6))
    np.testing.assert_allclose(ma.transition(logits, mask=full), out, atol=1e-7)
    # a row with every key masked becomes uniform, not NaN
    m = np.ones((6, 6), bool)
    m[2] = False
    out = np.asarray(ma.transition(logits[0], mask=m))
    np.testing.assert_allclose(out[2], 1 / 6, atol=1e-7)
    # mask given over original tokens, together with keep
    out = np.asarray(ma.transition(logits, keep=slice(1, None), mask=key))
    assert out.shape == (2, 5, 5) and np.all(out[..., ~key[1:]] == 0)


def test_transition_gradient_finite_with_masked_rows(x64):
    m = np.ones((4, 4), bool)
    m[1] = False
    g = jax.grad(lambda s: jnp.sum(ma.transition(s, mask=m) ** 2))(jnp.ones((4, 4)))
    assert np.all(np.isfinite(g))


def test_transition_bf16_input():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(5, 5)), jnp.bfloat16)
    out = ma.transition(logits)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out.sum(-1), 1, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"keep": np.ones(3, bool)}, "boolean keep"),
        ({"keep": [0, 0]}, "repeat"),
        ({"keep": [9]}, "must lie in"),
        ({"keep": slice(5, 5)}, "no token"),
        ({"keep": np.array([0.5])}, "slice, an integer"),
        ({"mask": np.ones(5)}, "boolean"),
        ({"mask": np.ones(3, bool)}, "mask must have shape"),
    ],
)
def test_transition_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ma.transition(np.zeros((5, 5)), **kwargs)


def test_transition_traced_keep_is_rejected():
    with pytest.raises(ValueError, match="concrete"):
        jax.jit(lambda k: ma.transition(jnp.zeros((3, 3)), keep=k))(jnp.array([0, 1]))


def test_not_square_error_names_fix():
    with pytest.raises(ValueError, match=r"square.*\(\.\.\., 197, 196\).*keep="):
        ma.tokenrank(np.ones((197, 196)))
    with pytest.raises(ValueError, match="at least two axes"):
        ma.bounce(np.ones(4), 0, steps=1)


def test_normalize(rng):
    w = rng.uniform(size=(3, 7, 7))
    np.testing.assert_allclose(ma.normalize(w), w / w.sum(-1, keepdims=True), rtol=1e-6)
    with pytest.raises(ValueError, match="non-negative"):
        ma.normalize(-w)
    with pytest.raises(ValueError, match="NaN"):
        ma.normalize(np.full((2, 2), np.nan))


def test_teleport(rng):
    a = testing.random_chains(rng, (3,), 8)
    v = rng.dirichlet(np.ones(8))
    out = ma.teleport(a.astype(np.float32), alpha=0.9, v=v)
    np.testing.assert_allclose(out, 0.9 * a + 0.1 * v[None, None, :], atol=1e-6)
    np.testing.assert_allclose(ma.teleport(a, alpha=1.0), a, atol=1e-6)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="alpha must lie in"):
            ma.teleport(a, alpha=bad)


def test_reverse_and_column_select(rng):
    a = testing.random_chains(rng, (2, 3), 11)
    r = np.asarray(ma.reverse(a.astype(np.float32)))
    np.testing.assert_allclose(r, reverse(a), rtol=2e-5)
    np.testing.assert_allclose(r.sum(-1), 1, atol=1e-5)
    j = 4
    col = a[..., :, j] / a[..., :, j].sum(-1, keepdims=True)
    np.testing.assert_allclose(ma.column_select(a, j), col, rtol=2e-5)
    # column select = first reverse bounce from one-hot(j)
    np.testing.assert_allclose(
        ma.bounce(a, j, steps=1, alpha=1.0, direction="reverse")[..., 1, :], col, rtol=2e-5
    )
    # a column nobody attends to gives a uniform row of the reverse chain
    z = np.array([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.2, 0.8, 0.0]])
    np.testing.assert_allclose(ma.reverse(z)[2], 1 / 3, atol=1e-7)


def test_row_select_index_array_broadcasts(rng):
    a = testing.random_chains(rng, (2, 3), 6).astype(np.float32)
    idx = np.array([0, 2, 5])
    out = ma.row_select(a, idx)
    np.testing.assert_allclose(out, a[:, np.arange(3), idx, :], atol=1e-7)
    with pytest.raises(ValueError, match="must lie in"):
        ma.row_select(a, 6)
    with pytest.raises(ValueError, match="integer"):
        ma.row_select(a, 1.5)


def test_check_chain_accepts_and_rejects(rng):
    a = testing.random_chains(rng, (2,), 9)
    assert ma.check_chain(a).shape == a.shape
    ma.check_chain(jnp.asarray(a, jnp.bfloat16))  # bf16 rounding is within the default atol
    bad_sum = a.copy()
    bad_sum[1, 3] *= 1.2
    with pytest.raises(ValueError, match=r"row \(1, 3\).*ma.normalize"):
        ma.check_chain(bad_sum)
    neg = a.copy()
    neg[0, 0, 0] = -0.1
    with pytest.raises(ValueError, match="negative.*ma.transition"):
        ma.check_chain(neg)
    nan = a.copy()
    nan[0, 2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        ma.check_chain(nan)
    with pytest.raises(ValueError, match="square"):
        ma.check_chain(a[..., :-1])
    with pytest.raises(ValueError, match="alpha"):
        ma.check_chain(a, alpha=2.0)
    with pytest.raises(ValueError, match="cannot run inside jit"):
        jax.jit(ma.check_chain)(a)


def test_invalid_matrices_flags_every_bad_entry(rng):
    """The cheap check (row sums + column minima) flags exactly the matrices with a NaN, ±inf
    or negative entry, wherever it is."""
    from markov_attn._util import invalid_matrices

    n = 33
    a = testing.random_chains(rng, (40,), n).astype(np.float32)
    want = np.zeros(40, bool)
    for i, bad in enumerate([np.nan, np.inf, -np.inf, -1e-30, -0.5] * 4):
        r, c = rng.integers(0, n, 2)
        a[2 * i, r, c] = bad
        want[2 * i] = True
    a[1, 0] = 0.0  # a zero row is valid
    np.testing.assert_array_equal(np.asarray(invalid_matrices(jnp.asarray(a))), want)


@pytest.mark.parametrize("n", [5, 64, 65, 130, 1025])
def test_double_float_product_is_accurate(rng, n):
    """The residual product of the iterative solvers (markov_attn._df): the double-float
    ``A^T x`` is within a fraction of an ulp of the float64 product, where the plain float32
    product is not."""
    from markov_attn import _df
    from markov_attn._util import matvec_t

    a = testing.random_chains(rng, (2,), n).astype(np.float32)
    x = rng.uniform(size=(2, n)).astype(np.float32)
    ref = np.einsum("bij,bi->bj", a.astype(np.float64), x.astype(np.float64))
    blocks = _df.row_blocks(jnp.asarray(a), 8)
    hi, lo = _df.matvec_t(blocks, _df.pad_last(jnp.asarray(x), blocks.shape[-3] * 8))
    out = np.asarray(hi, np.float64) + np.asarray(lo, np.float64)
    err = np.abs(out - ref) / np.abs(ref)
    eps = np.finfo(np.float32).eps
    # the rounding of 8-term partial sums, relative to the whole when there are many blocks
    assert err.max() <= (eps if n < 1025 else 0.5 * eps), err.max() / eps
    if n >= 130:  # one block of 8 terms is a plain sum
        plain = np.asarray(matvec_t(jnp.asarray(a), jnp.asarray(x)), np.float64)
        assert (np.abs(plain - ref) / np.abs(ref)).max() > err.max()


def test_error_free_transformations(rng):
    from markov_attn import _df

    a = (rng.standard_normal(10_000) * np.exp(rng.uniform(-20, 20, 10_000))).astype(np.float32)
    b = (rng.standard_normal(10_000) * np.exp(rng.uniform(-20, 20, 10_000))).astype(np.float32)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    s, e = (np.asarray(t, np.float64) for t in jax.jit(_df.two_sum)(a, b))
    np.testing.assert_array_equal(s + e, a64 + b64)  # exact: both fit in a float64
    p, e = (np.asarray(t, np.float64) for t in jax.jit(_df.two_prod)(a, b))
    np.testing.assert_array_equal(p + e, a64 * b64)
    x = rng.uniform(size=(3, 1000)).astype(np.float32)
    hi, lo = jax.jit(lambda x: _df.sum_blocked(x, axis=-1))(x)
    ref = x.astype(np.float64).sum(-1)
    got = np.asarray(hi, np.float64) + np.asarray(lo, np.float64)
    assert np.abs(got - ref).max() <= 0.05 * np.finfo(np.float32).eps * ref.max()
