"""Guided sampling with a DiT: SAG inside the samplers (same forward, s = 0) and CFG."""

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
    sag_degrade,
    sag_mask,
    sample,
)

ABAR = alphas_cumprod(1000)


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
    for kind in ("column_sum", "tokenrank"):
        zero = np.asarray(ddim_sample(dit, y, sag=kind, sag_scale=0.0, **kw))
        np.testing.assert_allclose(zero, plain, rtol=0, atol=1e-6)  # another program: rounding
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
        jax.debug.callback(lambda *a: records.append(a), x, t, eps, aux["attn"], y, ordered=True)
        return eps, aux

    y = jnp.array([0, 3])
    sample(fn, y, steps=2, sag="tokenrank", sag_scale=0.5, shape=(8, 8, 3), n_label=2,
           sag_layer=1, seed=0)  # fmt: skip
    assert len(records) == 4  # two forwards per step
    x, t, eps, attn, _ = (np.asarray(r) for r in records[0])
    a = ABAR[int(t[0])]
    x0 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
    mask = sag_mask(attn[:, 1], kind="tokenrank", n_label=2)
    want = sag_degrade(jnp.asarray(x0), jnp.asarray(eps), mask, jnp.float32(a))
    np.testing.assert_allclose(np.asarray(records[1][0]), want, atol=1e-4)
    # with CFG: one forward on [uncond; cond], the degraded one on the uncond half
    records.clear()
    sample(fn, y, steps=1, sag="column_sum", cfg_scale=2.0, null_label=3, shape=(8, 8, 3),
           n_label=2, sag_layer=1)  # fmt: skip
    assert [r[0].shape[0] for r in records] == [4, 2]
    assert np.asarray(records[0][4]).tolist() == [3, 3, 0, 3]
    assert np.asarray(records[1][4]).tolist() == [3, 3]


def test_classifier_free_guidance(dit):
    y = jnp.array([0, 1, 2, 0])
    kw = dict(steps=4, seed=1)
    cond = np.asarray(ddim_sample(dit, y, **kw))
    uncond = np.asarray(ddim_sample(dit, jnp.full(4, 3), **kw))  # 3 = the null label
    np.testing.assert_allclose(ddim_sample(dit, y, cfg_scale=1.0, **kw), cond, atol=1e-4)
    np.testing.assert_allclose(ddim_sample(dit, y, cfg_scale=0.0, **kw), uncond, atol=1e-4)
    strong = np.asarray(ddim_sample(dit, y, cfg_scale=3.0, **kw))
    assert np.abs(strong - cond).max() > 1e-3
    # SAG on top of CFG: s = 0 is CFG alone; the degraded forward sees the null label
    plain = ddim_sample(dit, y, cfg_scale=3.0, sag="column_sum", sag_scale=0.0, **kw)
    np.testing.assert_allclose(plain, strong, rtol=0, atol=1e-6)  # another program: rounding
    with pytest.raises(ValueError, match="null_label"):
        sample(lambda x, t, y: (x, {}), y, shape=(4, 4, 1), cfg_scale=2.0)


def test_sample_refuses_a_sag_layer_past_the_end_and_a_zero_blur():
    """sag_layer=7 on a 2-block model was clamped to the last block under jit (bitwise the
    samples of sag_layer=1); blur_sigma=0 gave NaN samples; a legacy uint32 key was refused."""
    from markov_attn.nn import DiT, DiTConfig, gaussian_blur, sample

    dit = DiT(DiTConfig(width=16, depth=2, num_heads=2, n_label=2), rngs=nnx.Rngs(0))
    y = np.zeros(2, np.int32)
    with pytest.raises(ValueError, match="sag_layer"):
        sample(dit, y, steps=2, sag="column_sum", sag_layer=7)
    with pytest.raises(ValueError, match="blur_sigma"):
        sample(dit, y, steps=2, sag="column_sum", blur_sigma=0.0)
    with pytest.raises(ValueError, match="sigma"):
        gaussian_blur(jnp.ones((8, 8, 1)), sigma=0.0)
    last = sample(dit, y, steps=2, sag="column_sum", sag_layer=-1)
    np.testing.assert_array_equal(last, sample(dit, y, steps=2, sag="column_sum", sag_layer=1))
    legacy = sample(dit, y, steps=2, seed=jax.random.PRNGKey(3))
    np.testing.assert_array_equal(legacy, sample(dit, y, steps=2, seed=jax.random.key(3)))


def test_sample_takes_a_traced_blur_sigma():
    from markov_attn.nn import DiT, DiTConfig, sample

    dit = DiT(DiTConfig(width=16, depth=2, num_heads=2, n_label=2), rngs=nnx.Rngs(0))
    y = np.zeros(2, np.int32)
    out = jax.jit(lambda s: sample(dit, y, steps=2, sag="column_sum", blur_sigma=s))(1.5)
    want = sample(dit, y, steps=2, sag="column_sum", blur_sigma=1.5)
    np.testing.assert_allclose(out, want, atol=1e-6)
