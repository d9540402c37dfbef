"""Multi-bounce maps against float64 references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import markov_attn as ma
from markov_attn import testing
from tests._refs import PAPER_A, bounces, reverse, stationary


def test_paper_vectors():
    xs = ma.bounce(PAPER_A, 4, steps=2, alpha=1.0)
    assert xs.shape == (3, 5)
    np.testing.assert_allclose(xs[0], np.eye(5)[4])
    np.testing.assert_allclose(xs[1], [0.53, 0.03, 0.03, 0.06, 0.35], atol=1e-6)
    np.testing.assert_allclose(xs[2], [0.243, 0.039, 0.026, 0.476, 0.217], atol=6e-4)
    xs = ma.bounce(PAPER_A, np.full(5, 0.2), steps=2, alpha=1.0)
    np.testing.assert_allclose(xs[1], [0.444, 0.048, 0.036, 0.202, 0.270], atol=6e-4)
    np.testing.assert_allclose(xs[2], [0.228, 0.042, 0.027, 0.404, 0.298], atol=6e-4)


@pytest.mark.parametrize("alpha", [1.0, 0.99, 0.7])
@pytest.mark.parametrize("direction", ["forward", "reverse", "reverse-teleport-last"])
def test_matches_float64(rng, alpha, direction):
    a = testing.random_chains(rng, (2, 3), 13, kind="metastable")
    if direction == "forward":
        chain, step_alpha, kw = a, alpha, {}
    elif direction == "reverse":  # the paper's order: reverse(teleport(A)), not re-teleported
        chain, step_alpha, kw = reverse(alpha * a + (1 - alpha) / 13), 1.0, {}
    else:
        chain, step_alpha, kw = reverse(a), alpha, {"teleport_first": False}
    kw["direction"] = direction.split("-")[0]
    x0 = rng.dirichlet(np.ones(13), size=(2, 3))
    out = ma.bounce(a.astype(np.float32), x0, steps=5, alpha=alpha, **kw)
    assert out.shape == (2, 3, 6, 13) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, bounces(chain, x0, 5, step_alpha), atol=2e-6)
    # index start = one-hot start, an index array broadcasts over the batch axes
    idx = np.array([0, 5, 12])
    out = ma.bounce(a.astype(np.float32), idx, steps=3, alpha=alpha, **kw)
    ref = bounces(chain, np.broadcast_to(np.eye(13)[idx], (2, 3, 13)), 3, step_alpha)
    np.testing.assert_allclose(out, ref, atol=2e-6)


def test_converges_to_tokenrank(rng):
    a = testing.random_chains(rng, (3,), 20, kind="attention")
    xs = ma.bounce(a, 0, steps=400, alpha=0.99)
    np.testing.assert_allclose(xs[..., -1, :], stationary(a, 0.99), atol=1e-5)
    err = np.abs(np.asarray(xs) - stationary(a, 0.99)[:, None, :]).sum(-1)
    assert np.all(err[:, 50] < err[:, 1])


def test_extra_start_axes_and_zero_steps(rng):
    a = testing.random_chains(rng, (), 9).astype(np.float32)
    x0 = rng.dirichlet(np.ones(9), size=(4,))
    out = ma.bounce(a, x0, steps=2)
    assert out.shape == (4, 3, 9)
    np.testing.assert_allclose(out[2], ma.bounce(a, x0[2], steps=2), atol=1e-7)
    np.testing.assert_allclose(ma.bounce(a, 3, steps=0)[..., 0, :], np.eye(9)[3])


def test_vmap_jit(rng):
    a = testing.random_chains(rng, (4, 2), 11).astype(np.float32)
    f = lambda x: ma.bounce(x, 0, steps=3)
    full = f(a)
    np.testing.assert_allclose(jax.vmap(f)(a), full, atol=1e-7)
    np.testing.assert_allclose(jax.jit(f)(a), full, atol=1e-7)
    g = lambda x, al: ma.bounce(x, 1, steps=2, alpha=al, direction="reverse")
    np.testing.assert_allclose(jax.jit(g)(a, 0.9), g(a, 0.9), atol=1e-7)


def test_gradients(rng, x64):
    a = jnp.asarray(testing.random_chains(rng, (2,), 7))
    w = jnp.asarray(rng.normal(size=(2, 4, 7)))
    for direction in ("forward", "reverse"):
        f = lambda x: jnp.sum(ma.bounce(x, 2, steps=3, direction=direction) * w)
        check_grads(f, (a,), order=2, modes=["rev"])
    x0 = jnp.asarray(rng.dirichlet(np.ones(7)))
    check_grads(
        lambda x: jnp.sum(ma.bounce(a, x, steps=3)[0] * w[0]), (x0,), order=1, modes=["rev"]
    )


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((5,), {"steps": 2}, "must lie in"),
        ((0,), {"steps": -1}, "non-negative int"),
        ((0,), {"steps": 2.0}, "non-negative int"),
        ((np.ones(4) / 4,), {"steps": 2}, "distribution over the 5"),
        ((0,), {"steps": 2, "alpha": 1.01}, "alpha"),
        ((0,), {"steps": 2, "direction": "backward"}, "direction"),
    ],
)
def test_bad_arguments(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ma.bounce(PAPER_A, *args, **kwargs)


def test_reverse_bounce_of_unnormalised_weights_is_that_of_their_chain(rng):
    """Rows are renormalised first: the reverse chain is that of the normalised chain, not of
    the raw weights (which gave a different chain until this was fixed)."""
    n = 11
    w = testing.random_chains(rng, (2,), n) * rng.uniform(0.1, 30.0, (2, n, 1))
    chain = w / w.sum(-1, keepdims=True)
    for tf in (True, False):
        out = ma.bounce(w, 3, steps=4, direction="reverse", teleport_first=tf)
        want = ma.bounce(chain, 3, steps=4, direction="reverse", teleport_first=tf)
        np.testing.assert_allclose(out, want, atol=2e-6)
