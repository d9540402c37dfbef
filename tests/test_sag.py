"""Tests for the SAG masks, the blur and the degraded input (markov_attn.nn._sag)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import markov_attn as ma
from markov_attn.nn import gaussian_blur, sag_degrade, sag_mask, sample, upsample_mask

# ----------------------------------------------------------------------------------------------
# SAG masks


def _random_attn(rng, shape, scale=2.0):
    logits = scale * rng.normal(size=shape)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)).astype(np.float32)


def _stationary(p, alpha=0.99):
    """float64 TokenRank reference: π of α P + (1 − α)/n."""
    n = p.shape[-1]
    t = alpha * p + (1 - alpha) / n
    w, v = np.linalg.eig(t.T)
    pi = np.real(v[:, np.argmax(np.real(w))])
    return pi / pi.sum()


def test_column_sum_mask_is_sags_rule(rng):
    attn = _random_attn(rng, (2, 3, 2 + 16, 2 + 16))  # (B, heads, L+N, L+N), L = 2
    mask = np.asarray(sag_mask(attn, kind="column_sum", n_label=2))
    a = attn.astype(np.float64).mean(1)[:, 2:, 2:]
    a /= a.sum(-1, keepdims=True)
    colsum = a.sum(1)  # over the queries
    np.testing.assert_array_equal(mask, colsum > 1.0)
    np.testing.assert_array_equal(mask, 16 * np.asarray(ma.column_sum(a.astype(np.float32))) > 1)
    assert 0 < mask.sum() < mask.size
    # no label tokens: the plain head-averaged column sum
    attn0 = _random_attn(rng, (4, 16, 16))
    np.testing.assert_array_equal(sag_mask(attn0), attn0.astype(np.float64).mean(0).sum(0) > 1)


def test_tokenrank_mask_and_chains(rng):
    attn = _random_attn(rng, (2, 3, 3 + 16, 3 + 16))
    mask = np.asarray(sag_mask(attn, kind="tokenrank", n_label=3))
    joint_mask = np.asarray(sag_mask(attn, kind="tokenrank", n_label=3, chain="joint"))
    for b in range(2):
        a = attn[b].astype(np.float64).mean(0)[3:, 3:]
        pi = _stationary(a / a.sum(-1, keepdims=True))
        np.testing.assert_array_equal(mask[b], 16 * pi > 1)
        joint = _stationary(attn[b].astype(np.float64).mean(0))[3:]
        np.testing.assert_array_equal(joint_mask[b], joint > joint.mean())
    # hand-made: everything flows to token 0, which feeds token 2 (two hops: TokenRank only)
    a = np.full((4, 4), 0.05, np.float32)
    a[:, 0] = 0.85
    a[0] = [0.05, 0.05, 0.8, 0.1]
    assert np.asarray(sag_mask(a[None], kind="tokenrank")).tolist() == [True, False, True, False]
    assert np.asarray(sag_mask(a[None], kind="column_sum")).tolist() == [True, False, False, False]
    # the name before the library's vocabulary ("colsum") is still accepted
    assert np.asarray(sag_mask(a[None], kind="colsum")).tolist() == [True, False, False, False]


def test_tokenrank_mask_calls_the_public_tokenrank(rng, monkeypatch):
    calls = []
    real = ma.tokenrank

    def spy(a, /, **kw):
        calls.append((a.shape, kw))
        return real(a, **kw)

    monkeypatch.setattr(ma, "tokenrank", spy)
    sag_mask(_random_attn(rng, (2, 1 + 9, 1 + 9)), kind="tokenrank", n_label=1, alpha=0.9)
    assert len(calls) == 1 and calls[0][0] == (9, 9) and float(calls[0][1]["alpha"]) == 0.9


def test_mask_errors(rng):
    with pytest.raises(ValueError, match="kind"):
        sag_mask(_random_attn(rng, (1, 4, 4)), kind="rollout")
    with pytest.raises(ValueError, match="heads, n, n"):
        sag_mask(_random_attn(rng, (4, 4)))
    with pytest.raises(ValueError, match="sag"):
        sample(lambda x, t, y: (x, {}), jnp.zeros(1, jnp.int32), shape=(4, 4, 1), sag="x")


# ----------------------------------------------------------------------------------------------
# blur and degradation


def test_gaussian_blur_matches_scipy(rng):
    from scipy import ndimage

    x = rng.normal(size=(2, 12, 10, 3))
    got = np.asarray(gaussian_blur(x.astype(np.float32), sigma=1.3))
    # scipy's "mirror" = PyTorch's "reflect"; radius 4 = truncate·σ with truncate = 4/σ
    want = ndimage.gaussian_filter(x, sigma=(0, 1.3, 1.3, 0), mode="mirror", truncate=4 / 1.3)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(gaussian_blur(np.full((8, 8, 1), 0.7, np.float32)), 0.7, atol=1e-6)


def test_upsample_mask_follows_the_patch_order():
    mask = np.zeros((1, 16), bool)
    mask[0, 6] = True  # grid row 1, column 2
    m = np.asarray(upsample_mask(jnp.asarray(mask), image_size=16))
    assert m.shape == (1, 16, 16, 1)
    want = np.zeros((16, 16))
    want[4:8, 8:12] = 1
    np.testing.assert_array_equal(m[0, ..., 0], want)


def test_sag_degrade_empty_and_full_masks(rng):
    x0 = jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32)
    eps = jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32)
    a = jnp.float32(0.3)
    xt = jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * eps
    empty = sag_degrade(x0, eps, jnp.zeros((2, 4), bool), a)
    np.testing.assert_allclose(empty, xt, atol=1e-6)
    full = sag_degrade(x0, eps, jnp.ones((2, 4), bool), a)
    want = jnp.sqrt(a) * gaussian_blur(x0) + jnp.sqrt(1 - a) * eps
    np.testing.assert_allclose(full, want, atol=1e-6)
    half = np.zeros((2, 4), bool)
    half[:, 0] = True  # only the top-left 4x4 quadrant changes
    d = np.abs(np.asarray(sag_degrade(x0, eps, jnp.asarray(half), a) - xt))
    assert d[:, :4, :4].max() > 1e-2 and d[:, 4:].max() == 0 and d[:, :, 4:].max() == 0


def test_batching_is_vmap(rng):
    attn = _random_attn(rng, (3, 2, 1 + 9, 1 + 9))
    for kind in ("column_sum", "tokenrank"):
        f = lambda a, kind=kind: sag_mask(a, kind=kind, n_label=1)
        np.testing.assert_array_equal(jax.vmap(f)(attn), f(attn))
    x = rng.normal(size=(3, 8, 8, 2)).astype(np.float32)
    np.testing.assert_allclose(jax.vmap(gaussian_blur)(x), gaussian_blur(x), atol=1e-6)
