"""Tests for the diffusion utilities and Self-Attention Guidance in markov_attn.nn."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from markov_attn.nn import (
    DiT,
    DiTConfig,
    alphas_cumprod,
    ddim_sample,
    ddpm_sample,
    q_sample,
    sag_degrade,
    sag_mask,
    sample,
    timesteps,
)

ABAR = alphas_cumprod(1000)


def test_schedules():
    lin = alphas_cumprod(1000, schedule="linear")
    assert ABAR[499] == pytest.approx(0.49, abs=0.01) and lin[499] == pytest.approx(
        0.079, abs=0.002
    )
    assert ABAR[-1] == pytest.approx(2.4e-9, rel=0.1) and lin[-1] == pytest.approx(4e-5, rel=0.1)
    assert np.all(np.diff(ABAR) < 0) and ABAR[0] < 1
    assert timesteps(50).tolist()[:3] == [999, 979, 958] and timesteps(50)[-1] == 0
    assert timesteps(1000).tolist() == list(range(999, -1, -1))
    with pytest.raises(ValueError, match="steps"):
        timesteps(0)
    with pytest.raises(ValueError, match="schedule"):
        alphas_cumprod(10, schedule="sigmoid")


def test_q_sample(rng):
    x0, noise = rng.normal(size=(4, 3, 2)), rng.normal(size=(4, 3, 2))
    t = np.array([0, 10, 500, 999])
    a = ABAR[t][:, None, None]
    want = np.sqrt(a) * x0 + np.sqrt(1 - a) * noise
    np.testing.assert_allclose(q_sample(x0, t, noise), want, rtol=1e-5, atol=1e-5)


def _one_point(x_star):
    """The exact ε of data concentrated on ``x_star``; no attention."""
    abar = jnp.asarray(ABAR, jnp.float32)

    def fn(x, t, y):
        a = abar[t][:, None, None, None]
        return (x - jnp.sqrt(a) * x_star[None]) / jnp.sqrt(1 - a), {}

    return fn


def _gaussian(sd):
    """The exact ε of data ~ N(0, sd²): ε = √(1−ᾱ) x / (ᾱ sd² + 1 − ᾱ)."""
    abar = jnp.asarray(ABAR, jnp.float32)

    def fn(x, t, y):
        a = abar[t][:, None, None, None]
        return jnp.sqrt(1 - a) * x / (a * sd**2 + 1 - a), {}

    return fn


def test_ddim_recovers_a_single_point(rng):
    x_star = jnp.asarray(rng.uniform(-0.9, 0.9, size=(4, 4, 1)), jnp.float32)
    out = ddim_sample(_one_point(x_star), jnp.zeros(3, jnp.int32), shape=(4, 4, 1), steps=20)
    np.testing.assert_allclose(out, np.broadcast_to((x_star + 1) / 2, out.shape), atol=1e-5)


def test_samplers_on_gaussian_data():
    fn, y = _gaussian(0.25), jnp.zeros(512, jnp.int32)
    kw = dict(shape=(4, 4, 1), clip=False)
    for sampler, steps in (("ddpm", 250), ("ddim", 50)):
        out = np.asarray(sample(fn, y, sampler=sampler, steps=steps, seed=1, **kw)) * 2 - 1
        assert abs(out.mean()) < 0.01
        assert out.std() == pytest.approx(0.25, abs=0.015), sampler
    # one DDPM step is the DDIM step with eta = 1 (same noise keys)
    a = ddpm_sample(fn, y[:8], steps=20, seed=3, **kw)
    b = ddim_sample(fn, y[:8], steps=20, seed=3, eta=1.0, **kw)
    np.testing.assert_allclose(a, b, atol=2e-5)
    # seeds repeat and differ
    np.testing.assert_array_equal(a, ddpm_sample(fn, y[:8], steps=20, seed=3, **kw))
    assert np.abs(a - ddpm_sample(fn, y[:8], steps=20, seed=4, **kw)).max() > 1e-2


# ----------------------------------------------------------------------------------------------
# guided sampling with a DiT


@pytest.fixture(scope="module")
def dit():
    cfg = DiTConfig(image_size=8, patch_size=2, width=32, depth=2, num_heads=2, num_classes=3,
                    n_label=2)  # fmt: skip
    model = DiT(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    leaves, tree = jax.tree.flatten(state)
    rng = np.random.default_rng(5)
    leaves = [x + np.float32(0.1) * rng.normal(size=x.shape).astype(np.float32) for x in leaves]
    return nnx.merge(graphdef, jax.tree.unflatten(tree, leaves))


def test_sag_scale_zero_is_unguided_and_seeds_repeat(dit):
    y = jnp.array([0, 1, 3, 3])  # 3 = null label
    kw = dict(steps=6, seed=2)
    plain = np.asarray(ddim_sample(dit, y, **kw))
    assert plain.shape == (4, 8, 8, 3) and plain.min() >= 0 and plain.max() <= 1
    for kind in ("colsum", "tokenrank"):
        zero = np.asarray(ddim_sample(dit, y, sag=kind, sag_scale=0.0, **kw))
        np.testing.assert_array_equal(zero, plain)
        guided = np.asarray(ddim_sample(dit, y, sag=kind, sag_scale=1.0, **kw))
        again = np.asarray(ddim_sample(dit, y, sag=kind, sag_scale=1.0, **kw))
        np.testing.assert_array_equal(guided, again)
        assert np.abs(guided - plain).max() > 1e-4
    np.testing.assert_array_equal(plain, ddim_sample(dit, y, **kw))
    assert np.abs(plain - np.asarray(ddim_sample(dit, y, steps=6, seed=3))).max() > 1e-3


def test_sag_reads_the_attention_of_the_same_forward(dit):
    """A wrapper that records each call's input and attention: the degraded input must equal
    sag_degrade of the first call's x̂0 and ε̂ under the mask of the first call's attention."""
    records = []
    graphdef, state = nnx.split(dit)

    def fn(x, t, y):
        eps, aux = nnx.merge(graphdef, state)(x, t, y)
        jax.debug.callback(lambda *a: records.append(a), x, t, eps, aux["attn"], ordered=True)
        return eps, aux

    y = jnp.array([0, 3])
    sample(fn, y, steps=2, sag="tokenrank", sag_scale=0.5, shape=(8, 8, 3), n_label=2,
           sag_layer=1, seed=0)  # fmt: skip
    assert len(records) == 4  # two forwards per step
    x, t, eps, attn = (np.asarray(r) for r in records[0])
    a = ABAR[int(t[0])]
    x0 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
    mask = sag_mask(attn[:, 1], kind="tokenrank", n_label=2)
    want = sag_degrade(jnp.asarray(x0), jnp.asarray(eps), mask, jnp.float32(a))
    np.testing.assert_allclose(np.asarray(records[1][0]), want, atol=1e-4)
