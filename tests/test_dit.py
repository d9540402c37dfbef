"""Tests for markov_attn.nn.DiT: shapes, adaLN-zero, attention contract, null label, capture."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import markov_attn as ma
from markov_attn.nn import DiT, DiTConfig

SMALL = DiTConfig(
    image_size=16, patch_size=4, width=32, depth=2, num_heads=2, num_classes=5, n_label=3
)


def _model(**kw) -> DiT:
    return DiT(dataclasses.replace(SMALL, **kw), rngs=nnx.Rngs(0))


def _perturbed(model: DiT, scale: float = 0.05) -> DiT:
    """The model with every parameter moved off its (partly zero) initialisation.

    The noise is drawn with NumPy: eager ``jax.random.normal`` compiles a threefry program per
    parameter shape (~50 programs, ~11 s on 2 cores)."""
    graphdef, state = nnx.split(model)
    leaves, tree = jax.tree.flatten(state)
    rng = np.random.default_rng(7)
    leaves = [x + (scale * rng.standard_normal(x.shape)).astype(x.dtype) for x in leaves]
    return nnx.merge(graphdef, jax.tree.unflatten(tree, leaves))


@pytest.fixture(scope="module")
def inputs():
    x = jax.random.normal(jax.random.key(1), (3, 16, 16, 3))
    return x, jnp.array([0, 400, 999]), jnp.array([1, 4, 5])


def test_shapes_and_zero_output_at_init(inputs):
    model = _model()
    eps, aux = model(*inputs)
    n = 3 + 16
    assert eps.shape == (3, 16, 16, 3) and eps.dtype == jnp.float32
    assert aux["attn"].shape == (3, 2, 2, n, n) and aux["attn"].dtype == jnp.float32
    assert aux["n_label"] == 3 == model.cfg.n_label
    assert model.cfg.num_tokens == n and model.cfg.n_image == 16 and model.cfg.null_label == 5
    np.testing.assert_array_equal(eps, 0.0)  # adaLN-zero: the network starts at 0


def test_attention_rows_are_distributions(inputs):
    _, aux = _perturbed(_model())(*inputs)
    a = np.asarray(aux["attn"], np.float64)
    assert np.all(a >= 0)
    np.testing.assert_allclose(a.sum(-1), 1.0, atol=1e-5)
    # markov_attn's functions apply unchanged to the layout
    pi = ma.tokenrank(aux["attn"])
    assert pi.shape == (3, 2, 2, 19)
    np.testing.assert_allclose(np.asarray(pi).sum(-1), 1.0, atol=1e-5)


def test_attention_matches_a_float64_reference(inputs):
    model = _perturbed(_model())
    x, t, y = inputs
    _, aux = model(x, t, y)
    # layer 0 recomputed by hand from the module's own pieces
    blk = model.blocks[0]
    img = model.patch_embed(model.patchify(x))
    from markov_attn.nn._dit import _modulate, sincos_pos_embed, timestep_features

    img = img + sincos_pos_embed(32, 4)[None]
    c = model.t_fc2(jax.nn.silu(model.t_fc1(timestep_features(t, 256)))) + model.y_embed[...][y]
    ctx = model.label_tokens[...][y]
    m_img = jnp.split(blk.ada(jax.nn.silu(c)), 6, axis=-1)
    m_ctx = jnp.split(blk.ada_ctx(jax.nn.silu(c)), 6, axis=-1)
    h_ctx = blk.attn.qkv_ctx(_modulate(blk.norm(ctx), m_ctx[0], m_ctx[1]))
    h_img = blk.attn.qkv(_modulate(blk.norm(img), m_img[0], m_img[1]))
    qkv = np.asarray(jnp.concatenate([h_ctx, h_img], axis=1), np.float64)
    q, k = qkv[..., :32].reshape(3, 19, 2, 16), qkv[..., 32:64].reshape(3, 19, 2, 16)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / 4.0
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(aux["attn"][:, 0], p, atol=2e-5)


def test_labels_and_null_label_change_the_output(inputs):
    model = _perturbed(_model())
    x, t, _ = inputs
    outs = [np.asarray(model(x, t, jnp.full((3,), y))[0]) for y in (0, 1, 5)]  # 5 = null
    assert all(np.isfinite(o).all() for o in outs)
    assert np.abs(outs[0] - outs[1]).max() > 1e-4
    assert np.abs(outs[0] - outs[2]).max() > 1e-4
    # the label tokens of the null row are what the null path reads
    _, aux = model(x, t, jnp.full((3,), 5))
    assert aux["attn"].shape[-1] == 19


def test_without_label_adaln_the_label_enters_only_through_its_tokens(inputs):
    plain = _model(label_adaln=False)
    assert not hasattr(plain, "y_embed")
    # every other weight starts as with the adaLN label (one seed, one draw order)
    ref = _model()
    np.testing.assert_array_equal(plain.label_tokens[...], ref.label_tokens[...])
    np.testing.assert_array_equal(plain.blocks[-1].attn.qkv.kernel[...],
                                  ref.blocks[-1].attn.qkv.kernel[...])  # fmt: skip
    model = _perturbed(plain)
    x, t, _ = inputs
    y0, y1 = jnp.zeros((3,), jnp.int32), jnp.ones((3,), jnp.int32)
    e0, e1 = (np.asarray(model(x, t, y)[0]) for y in (y0, y1))
    assert np.abs(e0 - e1).max() > 1e-4  # the label still matters ...
    tokens = model.label_tokens[...]
    model.label_tokens[...] = tokens.at[1].set(tokens[0])  # ... but only through its tokens
    np.testing.assert_array_equal(np.asarray(model(x, t, y1)[0]), e0)
    # with adaLN the same equal tokens still leave the two labels apart (y_embed differs)
    ada = _perturbed(_model())
    ada.label_tokens[...] = ada.label_tokens[...].at[1].set(ada.label_tokens[...][0])
    assert np.abs(np.asarray(ada(x, t, y0)[0]) - np.asarray(ada(x, t, y1)[0])).max() > 1e-4


def test_attention_is_sown_under_capture(inputs):
    model = _perturbed(_model())
    (_, aux), sown = nnx.capture(model, nnx.Intermediate)(*inputs)
    got = [sown["blocks"][i]["attn"]["attn"].get_value()[0] for i in range(2)]
    np.testing.assert_array_equal(np.stack(got, axis=1), aux["attn"])
    model(*inputs)
    assert not jax.tree.leaves(nnx.state(model, nnx.Intermediate))


def test_jit_equals_eager_and_single_stream(inputs):
    model = _perturbed(_model())
    eager, _ = model(*inputs)
    graphdef, state = nnx.split(model)
    jitted = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a)[0])(state, *inputs)
    np.testing.assert_allclose(jitted, eager, atol=1e-5)
    single = _model(single_stream=True)
    count = lambda m: sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
    assert single.blocks[0].attn.qkv_ctx is None and count(single) < count(model)
    eps, aux = _perturbed(single)(*inputs)
    assert eps.shape == (3, 16, 16, 3) and aux["attn"].shape == (3, 2, 2, 19, 19)


def test_patchify_round_trip_and_order():
    model = _model()
    x = jnp.arange(2 * 16 * 16 * 3, dtype=jnp.float32).reshape(2, 16, 16, 3)
    p = model.patchify(x)
    assert p.shape == (2, 16, 48)
    np.testing.assert_array_equal(model.unpatchify(p), x)
    # token 5 = grid row 1, column 1: pixels [4:8, 4:8]
    np.testing.assert_array_equal(p[0, 5], np.asarray(x[0, 4:8, 4:8]).reshape(-1))


def test_bad_configs_and_inputs():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        DiTConfig(width=30, num_heads=4)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        DiTConfig(image_size=30, patch_size=4)
    with pytest.raises(ValueError, match="n_label"):
        DiTConfig(n_label=0)
    with pytest.raises(ValueError, match="16x16"):
        _model()(jnp.zeros((1, 8, 8, 3)), jnp.zeros(1), jnp.zeros(1, jnp.int32))
