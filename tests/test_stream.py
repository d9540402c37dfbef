"""Streaming (Q, K) chain functions against the dense ones: values, gradients, memory."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import markov_attn as ma
from markov_attn import _stream
from markov_attn._stream import bounce_qk, second_eigenvalue_qk, tokenrank_qk
from tests._refs import bounces, lambda2, stationary


def _qk(rng, batch, n, d=16, temp=1.5):
    q = (rng.normal(size=(*batch, n, d)) * temp).astype(np.float32)
    k = (rng.normal(size=(*batch, n, d)) * temp).astype(np.float32)
    return q, k


def _logits(q, k, scale=None):
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    return jnp.einsum("...id,...jd->...ij", q, k, precision=jax.lax.Precision.HIGHEST) * scale


def _softmax64(q, k, *, scale=None, keep=None, mask=None):
    """Float64 NumPy transition matrix (the reference)."""
    q = np.asarray(q, np.float64)
    k = np.asarray(k, np.float64)
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    if keep is not None:
        idx = np.arange(q.shape[-2])[keep]
        q, k = q[..., idx, :], k[..., idx, :]
        mask = None if mask is None else mask[..., idx]
    s = np.einsum("...id,...jd->...ij", q, k) * scale
    if mask is not None:
        s = np.where(mask[..., None, :], s, -np.inf)
        dead = ~mask.any(-1)
        s = np.where(dead[..., None, None], 0.0, s)
    s = s - s.max(-1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(-1, keepdims=True)


CASES = {
    "plain": dict(),
    "keep_cls": dict(keep=slice(1, None)),
    "mask": dict(mask=True),
    "mask_keep": dict(mask=True, keep=np.arange(1, 70, 2)[::-1]),
    "scale": dict(scale=0.3),
}


def _case(rng, name, batch, n):
    kw = dict(CASES[name])
    if kw.pop("mask", False):
        m = rng.random((*batch, n)) > 0.3
        m[..., 0] = True
        kw["mask"] = m
    return kw


def _stream_kw(kw):
    out = {k: v for k, v in kw.items() if k != "mask"}
    if "mask" in kw:
        out["key_mask"] = kw["mask"]
    return out


@pytest.mark.parametrize(
    "case,method",
    [("plain", "gmres"), ("mask_keep", "gmres"), ("mask", "power")],
)
def test_tokenrank_matches_float64(rng, case, method):
    batch, n = (2, 2), 70
    q, k = _qk(rng, batch, n)
    kw = _case(rng, case, batch, n)
    ref = stationary(_softmax64(q, k, **kw))
    out = np.asarray(tokenrank_qk(q, k, block=32, method=method, **_stream_kw(kw)))
    assert out.dtype == np.float32 and out.shape == ref.shape and np.all(out >= 0)
    np.testing.assert_allclose(out.sum(-1), 1.0, atol=1e-6)
    assert np.abs(out - ref).sum(-1).max() <= 1e-5
    # the logit scale is traced: a new value reuses the compiled function
    ref = stationary(_softmax64(q, k, scale=0.3, **kw))
    out = np.asarray(tokenrank_qk(q, k, block=32, method=method, scale=0.3, **_stream_kw(kw)))
    assert np.abs(out - ref).sum(-1).max() <= 1e-5


@pytest.mark.parametrize("n,block", [(150, 48), (97, 1000)])
def test_tokenrank_block_sizes(rng, n, block):
    # blocks that do not divide n (zero-padded queries) and a block larger than n
    q, k = _qk(rng, (3,), n)
    out = tokenrank_qk(q, k, block=block, keep=slice(1, None))
    ref = stationary(_softmax64(q, k, keep=slice(1, None)))
    assert np.abs(np.asarray(out) - ref).sum(-1).max() <= 1e-5


def test_tokenrank_teleport_and_all_masked(rng):
    n = 60
    q, k = _qk(rng, (3,), n)
    mask = rng.random((3, n)) > 0.5
    mask[1] = False  # no valid key: the chain is uniform, as in ma.transition
    v = rng.dirichlet(np.ones(n), size=3).astype(np.float32)
    alpha = np.array([0.5, 0.9, 0.99], np.float32)
    out = tokenrank_qk(q, k, key_mask=mask, alpha=alpha, v=v, block=16)
    a64 = _softmax64(q, k, mask=mask)
    for b in range(3):
        np.testing.assert_allclose(out[b], stationary(a64[b], alpha[b], v[b]), atol=2e-6)
    np.testing.assert_allclose(
        out[1], stationary(np.full((n, n), 1.0 / n), alpha[1], v[1]), atol=2e-6
    )


def test_broadcast_batch_vmap_and_bf16(rng):
    q, k = _qk(rng, (2, 3), 40)
    k1 = k[:1]  # keys broadcast over the first batch axis
    out = tokenrank_qk(q, k1, block=16)
    ref = stationary(_softmax64(q, np.broadcast_to(k1, q.shape)))
    assert np.abs(np.asarray(out) - ref).sum(-1).max() <= 1e-5
    vm = jax.vmap(functools.partial(tokenrank_qk, block=16))(q, np.broadcast_to(k1, q.shape))
    np.testing.assert_allclose(vm, out, atol=1e-6)
    bf = tokenrank_qk(q.astype(jnp.bfloat16), k1.astype(jnp.bfloat16), block=16)
    assert bf.dtype == jnp.float32
    rounded = [np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32) for x in (q, k1)]
    ref = stationary(_softmax64(rounded[0], np.broadcast_to(rounded[1], q.shape)))
    assert np.abs(np.asarray(bf) - ref).sum(-1).max() <= 1e-5


def test_tokenrank_gradients_equal_dense(rng):
    case = "mask_keep"
    batch, n = (2,), 70
    q, k = _qk(rng, batch, n)
    kw = _case(rng, case, batch, n)
    m = 35 if "keep" in kw else n
    w = rng.normal(size=(*batch, m)).astype(np.float32)
    v = rng.dirichlet(np.ones(m), size=batch).astype(np.float32)

    def loss_stream(q, k, alpha, v):
        return jnp.sum(w * tokenrank_qk(q, k, alpha=alpha, v=v, block=16, **_stream_kw(kw)))

    def loss_dense(q, k, alpha, v):
        a = ma.transition(_logits(q, k), **kw)
        return jnp.sum(w * ma.tokenrank(a, alpha=alpha, v=v))

    gs = jax.grad(loss_stream, argnums=(0, 1, 2, 3))(q, k, 0.9, v)
    gd = jax.grad(loss_dense, argnums=(0, 1, 2, 3))(q, k, 0.9, v)
    for a, b in zip(gs, gd, strict=True):
        scale = float(np.abs(b).max())
        assert scale > 0
        np.testing.assert_allclose(a, b, atol=1e-4 * scale)


def test_tokenrank_gradients_finite_differences(rng, x64):
    q, k = _qk(rng, (2,), 24, d=4, temp=1.0)
    q, k = q.astype(np.float64), k.astype(np.float64)
    mask = rng.random((2, 24)) > 0.3
    w = rng.normal(size=(2, 24))

    def f(q, k):
        return jnp.sum(w * tokenrank_qk(q, k, key_mask=mask, block=8, alpha=0.9))

    check_grads(f, (q, k), order=1, modes=["rev"], eps=1e-5, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("op", ["lse", "at", "a"])
def test_streaming_operators_gradients(rng, x64, op):
    n, d, r, block = 20, 4, 3, 8
    qs = rng.normal(size=(2, n, d))
    k = rng.normal(size=(2, n, d))
    x = rng.normal(size=(2, n, r))
    km = rng.random((2, n)) > 0.3
    live = km.any(-1)
    km = km | ~live[:, None]
    lse = _stream._lse_pass(qs, k, km, live, block)

    if op == "lse":
        f = lambda qs, k: _stream._lse_op(qs, k, km, live, block)
        check_grads(f, (qs, k), order=1, modes=["rev"], atol=1e-6, rtol=1e-5)
        return
    fn = _stream._at_op if op == "at" else _stream._a_op
    f = lambda qs, k, lse, x: fn(qs, k, lse, km, live, x, block)
    check_grads(f, (qs, k, lse, x), order=1, modes=["rev"], atol=1e-6, rtol=1e-5)
    # and the values against the dense matrix
    a = _softmax64(qs, k, scale=1.0, mask=km)
    want = np.einsum("...ij,...ir->...jr", a, x) if op == "at" else a @ x
    np.testing.assert_allclose(f(qs, k, lse, x), want, atol=1e-12)


def _causal64(q, k, mask=None):
    """Float64 causal transition matrix: query i sees keys j <= i (and the mask); a row with
    no visible key is uniform over every token, as ``ma.transition(..., causal=True)``."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    n = q.shape[-2]
    s = np.einsum("...id,...jd->...ij", q, k) / np.sqrt(q.shape[-1])
    vis = np.tril(np.ones((n, n), bool))
    if mask is not None:
        vis = vis & mask[..., None, :]
    vis = np.broadcast_to(vis, s.shape)
    dead = ~vis.any(-1)
    vis = vis | dead[..., None]
    s = np.where(dead[..., None], 0.0, s)
    e = np.where(vis, np.exp(s - np.where(vis, s, -np.inf).max(-1, keepdims=True)), 0.0)
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("with_mask", [False, True])
def test_causal_streaming_equals_the_causal_chain(rng, with_mask):
    """causal=True streams ma.transition(..., causal=True): TokenRank, bounces (and their
    gradients) and |λ2| (exact: the diagonal), with masked keys, rows whose visible keys are
    all masked (uniform) and a matrix with every key masked."""
    q, k = _qk(rng, (3,), 37, d=8, temp=1.0)
    mask = None
    if with_mask:
        mask = rng.random((3, 37)) > 0.3
        mask[1, :5] = False  # rows 0-4 of matrix 1 see no key
        mask[2] = False  # every key masked
    a = _causal64(q, k, mask)
    np.testing.assert_allclose(
        ma.transition(_logits(q, k), causal=True, mask=mask), a, atol=1e-6
    )  # the reference is the library's causal chain
    pi = tokenrank_qk(q, k, causal=True, key_mask=mask, block=8)
    np.testing.assert_allclose(pi, stationary(a), atol=2e-6)
    xs = bounce_qk(q, k, 0, steps=3, alpha=0.9, causal=True, key_mask=mask, block=8)
    np.testing.assert_allclose(xs, bounces(a, np.eye(37)[[0, 0, 0]], 3, 0.9), atol=1e-6)
    lam = second_eigenvalue_qk(q, k, causal=True, key_mask=mask, block=8)
    np.testing.assert_allclose(lam, lambda2(a), atol=1e-6)  # closed form, dead rows included
    if not with_mask:  # triangular: |λ2| is the second largest diagonal entry, exactly
        want = np.sort(np.abs(np.diagonal(a, axis1=-2, axis2=-1)), -1)[:, -2]
        np.testing.assert_allclose(lam, want, rtol=1e-5)
    # keep: the causal order of the kept tokens; unsorted keep is refused
    kept = tokenrank_qk(q, k, causal=True, key_mask=mask, keep=slice(2, None), block=8)
    dense = ma.tokenrank(ma.transition(_logits(q, k), causal=True, mask=mask, keep=slice(2, None)))
    np.testing.assert_allclose(kept, dense, atol=2e-6)
    with pytest.raises(ValueError, match="increasing token order"):
        tokenrank_qk(q, k, causal=True, keep=np.array([3, 1, 2]))

    def dense_loss(q, k):
        c = ma.transition(_logits(q, k), causal=True, mask=mask)
        return jnp.sum(ma.tokenrank(c) ** 2) + jnp.sum(ma.bounce(c, 0, steps=2)[..., -1, :] ** 2)

    def stream_loss(q, k):
        pi = tokenrank_qk(q, k, causal=True, key_mask=mask, block=8)
        xs = bounce_qk(q, k, 0, steps=2, causal=True, key_mask=mask, block=8)
        return jnp.sum(pi**2) + jnp.sum(xs[..., -1, :] ** 2)

    gd = jax.grad(dense_loss, argnums=(0, 1))(q, k)
    gs = jax.grad(stream_loss, argnums=(0, 1))(q, k)
    for x, y in zip(gd, gs):
        np.testing.assert_allclose(y, x, atol=5e-4 * float(jnp.abs(x).max()))  # float32 solves


def test_causal_lambda2_is_exact_and_differentiable_with_masks(rng):
    """|λ2| of masked causal chains in closed form (dead rows are a prefix forming a uniform
    block): equal to float64 eigenvalues for every block size, with finite gradients equal to
    the dense function's (a Krylov branch once gave NaN gradients with any key_mask)."""
    q, k = _qk(rng, (6,), 11, d=4, temp=1.0)
    mask = rng.random((6, 11)) > 0.3
    mask[0, :3] = False  # a dead prefix of 3 rows
    mask[1] = False  # all masked
    mask[2] = True
    a = _causal64(q, k, mask)
    for block in (1, 4, 11):
        lam = second_eigenvalue_qk(q, k, causal=True, key_mask=mask, block=block)
        np.testing.assert_allclose(lam, lambda2(a), atol=1e-6)
    gs = jax.grad(lambda q: jnp.sum(second_eigenvalue_qk(q, k, causal=True, key_mask=mask)))(q)
    dense = lambda q: jnp.sum(
        ma.second_eigenvalue(ma.transition(_logits(q, k), causal=True, mask=mask))
    )
    gd = jax.grad(dense)(q)
    assert np.all(np.isfinite(gs))
    np.testing.assert_allclose(gs, gd, atol=1e-4 * float(jnp.abs(gd).max()) + 1e-7)
    # one alpha per chain, more chains than q/k have
    al = np.array([0.5, 0.9, 1.0], np.float32)
    xs = bounce_qk(q[3], k[3], 2, steps=3, alpha=al, causal=True)
    assert xs.shape == (3, 4, 11)
    np.testing.assert_allclose(xs[1], bounce_qk(q[3], k[3], 2, steps=3, alpha=0.9, causal=True))


@pytest.mark.parametrize("masked", [False, True])
def test_second_eigenvalue_qk_gradients_equal_dense(rng, masked):
    """The eigenvector-formula gradient, not one through the Arnoldi recursion (which was off
    by up to 66 % on 10-token heads and NaN with a key mask, in 8 of 12 draws)."""
    q, k = _qk(rng, (12,), 10, d=4, temp=1.0)
    mask = None
    if masked:
        mask = rng.random((12, 10)) > 0.3
        mask[:, 0] = True
        mask[5] = False  # every key masked: the uniform chain

    def stream(q, k):
        return jnp.sum(second_eigenvalue_qk(q, k, key_mask=mask) ** 2)

    def dense(q, k):
        return jnp.sum(ma.second_eigenvalue(ma.transition(_logits(q, k), mask=mask)) ** 2)

    gs, gd = jax.grad(stream, argnums=(0, 1))(q, k), jax.grad(dense, argnums=(0, 1))(q, k)
    for x, y in zip(gd, gs):
        assert np.all(np.isfinite(y))
        np.testing.assert_allclose(y, x, atol=1e-5 * float(jnp.abs(x).max()) + 1e-8)


def test_bounce_equals_dense_with_gradients(rng):
    case = "mask_keep"
    batch, n = (2,), 70
    q, k = _qk(rng, batch, n)
    kw = _case(rng, case, batch, n)
    m = 35 if "keep" in kw else n
    w = rng.normal(size=(*batch, 4, m)).astype(np.float32)
    x0 = np.array([0, 7])

    def stream(q, k):
        return bounce_qk(q, k, x0, steps=3, alpha=0.9, block=16, **_stream_kw(kw))

    def dense(q, k):
        return ma.bounce(ma.transition(_logits(q, k), **kw), x0, steps=3, alpha=0.9)

    np.testing.assert_allclose(stream(q, k), dense(q, k), atol=1e-6)
    gs = jax.grad(lambda q, k: jnp.sum(w * stream(q, k)), argnums=(0, 1))(q, k)
    gd = jax.grad(lambda q, k: jnp.sum(w * dense(q, k)), argnums=(0, 1))(q, k)
    for a, b in zip(gs, gd, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5 * float(np.abs(b).max()))


def test_bounce_several_starts_share_a_pass(rng):
    q, k = _qk(rng, (2,), 40)
    a = _softmax64(q, k)
    starts = np.array([[0, 3, 5], [1, 2, 39]])
    out = bounce_qk(q, k, starts, steps=2, batch_starts=True, block=16, alpha=1.0)
    assert out.shape == (2, 3, 3, 40)
    for j in range(3):
        np.testing.assert_allclose(
            out[:, j], bounces(a, np.eye(40)[starts[:, j]], 2, 1.0), atol=1e-6
        )
    dists = rng.dirichlet(np.ones(40), size=(2, 3)).astype(np.float32)
    out = bounce_qk(q, k, dists, steps=2, batch_starts=True, block=16, alpha=1.0)
    for j in range(3):
        np.testing.assert_allclose(out[:, j], bounces(a, dists[:, j], 2, 1.0), atol=1e-6)
    single = bounce_qk(q, k, dists[:, 0], steps=2, block=16, alpha=1.0)
    np.testing.assert_allclose(single, out[:, 0], atol=1e-7)


@pytest.mark.parametrize("case", ["plain", "mask_keep"])
def test_second_eigenvalue_matches_eigvals(rng, case):
    batch, n = (3,), 70
    q, k = _qk(rng, batch, n)
    kw = _case(rng, case, batch, n)
    out = second_eigenvalue_qk(q, k, block=32, **_stream_kw(kw))
    assert out.shape == batch and out.dtype == np.float32
    np.testing.assert_allclose(out, lambda2(_softmax64(q, k, **kw)), atol=1e-4)


def _temp_bytes(f, *args):
    return jax.jit(f).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_streaming_memory_stays_under_block_bound():
    # n x n float32 is 64 MiB here; the streaming path must stay near a few (block, n) tiles
    n, d, block = 4096, 32, 128
    spec = jax.ShapeDtypeStruct((n, d), jnp.float32)
    w = jnp.cos(jnp.arange(n, dtype=jnp.float32))
    nn_bytes = n * n * 4
    bound = 4 * (3 * block * n + 64 * n + 4 * n * d)  # tiles + O(n) vectors + O(n d) copies

    def stream(q, k):
        return jnp.sum(w * tokenrank_qk(q, k, block=block))

    def dense(q, k):
        return jnp.sum(w * ma.tokenrank(ma.transition(_logits(q, k)), method="gmres"))

    stream_fwd = _temp_bytes(stream, spec, spec)
    stream_bwd = _temp_bytes(jax.grad(stream, argnums=(0, 1)), spec, spec)
    dense_fwd = _temp_bytes(dense, spec, spec)
    assert stream_fwd <= bound, (stream_fwd, bound)
    assert stream_bwd <= bound, (stream_bwd, bound)
    assert bound < nn_bytes / 4
    assert dense_fwd >= nn_bytes  # the dense path holds the n x n matrix


def test_bad_inputs(rng):
    q, k = _qk(rng, (), 10)
    with pytest.raises(ValueError, match="same"):
        tokenrank_qk(q, k[:5])
    with pytest.raises(ValueError, match="key_mask"):
        tokenrank_qk(q, k, key_mask=np.ones(10))
    with pytest.raises(ValueError, match="key_mask"):
        tokenrank_qk(q, k, key_mask=np.ones((10, 10), bool))
    with pytest.raises(ValueError, match="block"):
        tokenrank_qk(q, k, block=0)
    with pytest.raises(ValueError, match="method"):
        tokenrank_qk(q, k, method="solve")
    with pytest.raises(ValueError, match="alpha"):
        tokenrank_qk(q, k, alpha=1.5)
    with pytest.raises(ValueError, match="steps"):
        bounce_qk(q, k, 0, steps=-1)
    with pytest.raises(ValueError, match="token index"):
        bounce_qk(q, k, 10, steps=1)
    with pytest.raises(ValueError, match="distributions"):
        bounce_qk(q, k, np.ones(9), steps=1)
    with pytest.raises(ValueError, match="batch_starts"):
        bounce_qk(q, k, 1, steps=1, batch_starts=True)
    with pytest.raises(ValueError, match="krylov"):
        second_eigenvalue_qk(q, k, krylov=0)
    with pytest.raises(ValueError, match="d\\)"):
        tokenrank_qk(q[0], k[0])
