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


def test_sample_refuses_bad_sag_alpha_and_nan_masks_give_nan(dit):
    """sag_alpha=1.5 was traced past TokenRank's check: NaN TokenRank, an empty mask, and the
    samples of unguided sampling (to 1e-7). Eagerly it is refused; traced, the samples are NaN
    (review)."""
    y = jnp.array([0, 1])
    kw = dict(steps=3, seed=0, sag="tokenrank")
    for bad in (1.5, -0.2, float("nan")):
        with pytest.raises(ValueError, match="alpha"):
            sample(dit, y, sag_alpha=bad, **kw)
    traced = jax.jit(lambda a: sample(dit, y, sag_alpha=a, **kw))
    assert np.isnan(np.asarray(traced(1.5))).all()
    good = np.asarray(traced(0.99))
    assert np.isfinite(good).all()
    np.testing.assert_allclose(good, sample(dit, y, sag_alpha=0.99, **kw), atol=1e-5)
    assert np.abs(good - np.asarray(sample(dit, y, steps=3, seed=0))).max() > 1e-4


def test_sample_refuses_a_sag_layer_past_a_functions_attention(dit):
    """With a plain function (no .cfg) the sag_layer check runs on the attention's static
    depth: sag_layer=7 on two layers was clamped to the last one (review)."""
    graphdef, state = nnx.split(dit)

    def fn(x, t, y):
        return nnx.merge(graphdef, state)(x, t, y)

    kw = dict(steps=2, sag="column_sum", shape=(8, 8, 3), n_label=2, seed=0)
    with pytest.raises(ValueError, match="sag_layer must index one of the model's 2"):
        sample(fn, jnp.array([0, 3]), sag_layer=7, **kw)
    np.testing.assert_array_equal(
        sample(fn, jnp.array([0, 3]), sag_layer=-1, **kw),
        sample(fn, jnp.array([0, 3]), sag_layer=1, **kw),
    )


def test_labels_outside_the_classes_are_refused_or_nan(dit):
    """Labels past the null label (num_classes = 3 here) were clamped to it and negative ones
    wrapped (-1 gave the null label's output exactly): refused eagerly, NaN under jit (review)."""
    x = jnp.zeros((2, 8, 8, 3))
    t = jnp.array([10, 500])
    for bad in ([0, 4], [-1, 0], [0, 7]):
        with pytest.raises(ValueError, match=r"labels must lie in 0 \.\. 3"):
            dit(x, t, jnp.array(bad))
        with pytest.raises(ValueError, match=r"labels must lie in 0 \.\. 3"):
            sample(dit, jnp.array(bad), steps=2)
    eps = np.asarray(jax.jit(lambda y: dit(x, t, y)[0])(jnp.array([-1, 3])))
    assert np.isnan(eps[0]).all() and np.isfinite(eps[1]).all()
    with pytest.raises(ValueError, match="integers"):
        dit(x, t, jnp.array([0.0, 1.0]))
