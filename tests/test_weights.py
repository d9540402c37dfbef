"""head_weights, average and rollout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import markov_attn as ma
from markov_attn import testing


def test_head_weights_modes(rng):
    lam = rng.uniform(0.1, 0.99, size=(2, 3, 4))
    w = ma.head_weights(lam)
    np.testing.assert_allclose(w, lam / lam.sum(-1, keepdims=True), rtol=1e-6)
    g = ma.head_weights(lam, weighting="gap", axis=1)
    np.testing.assert_allclose(g, (1 - lam) / (1 - lam).sum(1, keepdims=True), rtol=1e-6)
    np.testing.assert_allclose(ma.head_weights(lam, weighting="uniform"), 0.25)
    np.testing.assert_allclose(ma.head_weights(np.zeros(4)), 0.25)  # all-zero falls back
    np.testing.assert_allclose(ma.head_weights(np.ones(3), weighting="gap"), 1 / 3)


def test_head_weights_bad_input():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ma.head_weights(np.array([0.5, 1.5]))
    with pytest.raises(ValueError, match="weighting"):
        ma.head_weights(np.array([0.5]), weighting="softmax")
    with pytest.raises(ValueError, match="axis"):
        ma.head_weights(np.array([0.5]), axis=3)


def test_average_chains_and_maps(rng):
    a = testing.random_chains(rng, (2, 3, 4), 6)
    lam = np.asarray(ma.second_eigenvalue(a.astype(np.float32)))
    w = np.asarray(ma.head_weights(lam))
    out = np.asarray(ma.average(a, weights=w))
    ref = np.einsum("blh,blhij->blij", w, a)
    np.testing.assert_allclose(out, ref, atol=1e-6)
    np.testing.assert_allclose(out.sum(-1), 1, atol=1e-6)  # a convex combination is a chain
    maps = rng.uniform(size=(2, 3, 4, 6))
    np.testing.assert_allclose(
        ma.average(maps, weights=w, axis=-2), np.einsum("blh,blhn->bln", w, maps), atol=1e-6
    )
    # layers instead of heads; weights renormalised over the averaged axis
    wl = rng.uniform(size=(2, 3))
    np.testing.assert_allclose(
        ma.average(a, weights=wl, axis=1),
        np.einsum("bl,blhij->bhij", wl / wl.sum(1, keepdims=True), a),
        atol=1e-6,
    )
    np.testing.assert_allclose(ma.average(a), a.mean(-3), atol=1e-6)
    f = lambda x, ww: ma.average(x, weights=ww)
    np.testing.assert_allclose(jax.vmap(f)(a, w), f(a, w), atol=1e-7)
    np.testing.assert_allclose(jax.jit(f)(a, w), f(a, w), atol=1e-7)


def test_average_bad_input(rng):
    a = rng.uniform(size=(2, 3, 5, 5))
    with pytest.raises(ValueError, match="leading axes"):
        ma.average(a, weights=np.ones(3))
    with pytest.raises(ValueError, match="leading axes"):
        ma.average(a, weights=np.ones((2, 3)), axis=-2)
    with pytest.raises(ValueError, match="non-negative"):
        ma.average(a, weights=-np.ones((2, 3)))
    with pytest.raises(ValueError, match="out of range"):
        ma.average(a, axis=4)


def _rollout_ref(attn, residual, fusion):
    fused = getattr(np, fusion)(attn, axis=-3)
    n = attn.shape[-1]
    out = None
    for layer in np.moveaxis(fused, -3, 0):
        layer = residual * np.eye(n) + (1 - residual) * layer
        layer = layer / layer.sum(-1, keepdims=True)
        out = layer if out is None else layer @ out
    return out


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
def test_rollout_matches_float64(rng, fusion):
    attn = testing.random_chains(rng, (2, 4, 3), 10)
    out = ma.rollout(attn.astype(np.float32), head_fusion=fusion)
    np.testing.assert_allclose(out, _rollout_ref(attn, 0.5, fusion), atol=1e-6)
    np.testing.assert_allclose(out.sum(-1), 1, atol=1e-6)
    np.testing.assert_allclose(jax.vmap(ma.rollout)(attn), ma.rollout(attn), atol=1e-6)
    np.testing.assert_allclose(jax.jit(ma.rollout)(attn), ma.rollout(attn), atol=1e-6)


def test_rollout_gradient(rng, x64):
    from jax.test_util import check_grads

    attn = jnp.asarray(testing.random_chains(rng, (3, 2), 6))
    check_grads(lambda x: jnp.sum(ma.rollout(x)[0] ** 2), (attn,), order=1, modes=["rev"])


def test_rollout_bad_input():
    with pytest.raises(ValueError, match="layers, heads"):
        ma.rollout(np.ones((3, 4, 4)) / 4)
    with pytest.raises(ValueError, match="head_fusion"):
        ma.rollout(np.ones((1, 1, 4, 4)) / 4, head_fusion="median")
    with pytest.raises(ValueError, match="residual"):
        ma.rollout(np.ones((1, 1, 4, 4)) / 4, residual=2.0)
