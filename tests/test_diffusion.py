"""Tests for the diffusion utilities and Self-Attention Guidance in markov_attn.nn."""

import jax.numpy as jnp
import numpy as np
import pytest

from markov_attn.nn import (
    alphas_cumprod,
    ddim_sample,
    ddpm_sample,
    q_sample,
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


def test_linear_schedule_refuses_too_few_timesteps():
    """Its betas scale as 1000 / T: at T <= 20 alpha_bar reached 0 or below, and q_sample and
    the sampler returned NaN."""
    for t in (10, 19, 20):
        with pytest.raises(ValueError, match="num_timesteps > 20"):
            alphas_cumprod(t, schedule="linear")
    a = alphas_cumprod(21, schedule="linear")
    assert np.all((a > 0) & (a < 1)) and np.all(np.diff(a) < 0)
