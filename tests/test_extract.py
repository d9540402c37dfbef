"""Capturing attention from NNX and Linen models whose attention is computed independently."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from markov_attn.extract import capture_attention, capture_attention_linen
from markov_attn.nn import ViT, ViTConfig

HEADS, FEAT, N = 2, 8, 5


def _reference(x, q_kernel, q_bias, k_kernel, k_bias, mask=None):
    """float64 softmax(q kᵀ/√d) from DenseGeneral kernels (in, heads, head_dim)."""
    x = np.asarray(x, np.float64)
    q = np.einsum("bnd,dhe->bnhe", x, np.asarray(q_kernel, np.float64)) + np.asarray(q_bias)
    k = np.einsum("bnd,dhe->bnhe", x, np.asarray(k_kernel, np.float64)) + np.asarray(k_bias)
    s = np.einsum("bqhe,bkhe->bhqk", q, k) / np.sqrt(q.shape[-1])
    if mask is not None:
        s = np.where(mask, s, -np.inf)
    s = s - s.max(-1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(-1, keepdims=True)


class _NNXBlock(nnx.Module):
    def __init__(self, rngs):
        self.norm = nnx.LayerNorm(FEAT, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(HEADS, FEAT, decode=False, rngs=rngs)

    def __call__(self, x, mask=None):
        h = self.norm(x)
        return x + self.attn(h, mask=mask), h


class _NNXModel(nnx.Module):
    def __init__(self, rngs):
        self.blocks = nnx.List([_NNXBlock(rngs), _NNXBlock(rngs)])

    def __call__(self, x, mask=None):
        inputs = []
        for b in self.blocks:
            x, h = b(x, mask)
            inputs.append(h)
        return x, inputs


def _x(seed=0, b=2):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(b, N, FEAT)), jnp.float32)


def test_nnx_multihead_attention_matches_reference():
    model = _NNXModel(nnx.Rngs(0))
    x = _x()
    (out, inputs) = model(x)
    maps = capture_attention(model, x)
    assert sorted(maps) == ["blocks/0/attn", "blocks/1/attn"]
    for i, h in enumerate(inputs):
        a = model.blocks[i].attn
        want = _reference(
            h, a.query.kernel[...], a.query.bias[...], a.key.kernel[...], a.key.bias[...]
        )
        got = np.asarray(maps[f"blocks/{i}/attn"])
        assert got.shape == (2, HEADS, N, N)
        np.testing.assert_allclose(got, want, atol=1e-6)
        np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-6)
    # the model is restored: its own attention_fn is back and outputs are unchanged
    assert model.blocks[0].attn.attention_fn is nnx.dot_product_attention
    np.testing.assert_allclose(model(x)[0], out, atol=1e-6)


def test_nnx_mask_and_kwargs_pass_through():
    model = _NNXModel(nnx.Rngs(1))
    x = _x(1, b=1)
    mask = jnp.asarray(np.tril(np.ones((N, N), bool)))[None, None]
    maps = capture_attention(model, x, mask=mask)
    got = np.asarray(maps["blocks/0/attn"])
    assert np.all(got[..., np.triu_indices(N, 1)[0], np.triu_indices(N, 1)[1]] == 0)
    _, inputs = model(x, mask)
    a = model.blocks[0].attn
    want = _reference(
        inputs[0],
        a.query.kernel[...],
        a.query.bias[...],
        a.key.kernel[...],
        a.key.bias[...],
        mask=np.asarray(mask),
    )
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_nnx_custom_attention_fn_is_bypassed_and_restored():
    calls = []

    def fused(q, k, v, **kw):
        calls.append(1)
        return nnx.dot_product_attention(q, k, v, **kw)

    mha = nnx.MultiHeadAttention(HEADS, FEAT, decode=False, attention_fn=fused, rngs=nnx.Rngs(2))
    maps = capture_attention(mha, _x(2))
    assert list(maps) == [""] and maps[""].shape == (2, HEADS, N, N)
    assert not calls and mha.attention_fn is fused


def test_nnx_shared_module_called_twice():
    mha = nnx.MultiHeadAttention(HEADS, FEAT, decode=False, rngs=nnx.Rngs(3))

    class Twice(nnx.Module):
        def __init__(self):
            self.mha = mha

        def __call__(self, x):
            return self.mha(self.mha(x))

    maps = capture_attention(Twice(), _x(3))
    assert sorted(maps) == ["mha#0", "mha#1"]


def test_project_vit_sown_attention():
    cfg = ViTConfig(
        image_size=16, patch_size=8, width=16, depth=2, num_heads=2, mlp_dim=32, num_classes=3
    )
    model = ViT(cfg, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).random((2, 16, 16, 3)), jnp.float32)
    maps = capture_attention(model, x)
    _, aux = model(x)
    assert sorted(maps) == ["blocks/0/attn", "blocks/1/attn"]
    for i in range(cfg.depth):
        np.testing.assert_allclose(maps[f"blocks/{i}/attn"], aux["attn"][:, i], atol=1e-7)


class _LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm()(x)
        self.sow("intermediates", "h", h)
        return x + nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=FEAT)(h)


class _LinenModel(nn.Module):
    @nn.compact
    def __call__(self, x):
        for _ in range(2):
            x = _LinenBlock()(x)
        return x


def test_linen_matches_reference():
    model = _LinenModel()
    x = _x(4)
    variables = model.init(jax.random.key(0), x)
    maps = capture_attention_linen(model, variables, x)
    assert sorted(maps) == [
        "_LinenBlock_0/MultiHeadDotProductAttention_0",
        "_LinenBlock_1/MultiHeadDotProductAttention_0",
    ]
    _, state = model.apply(variables, x, mutable=["intermediates"])
    for i in range(2):
        p = variables["params"][f"_LinenBlock_{i}"]["MultiHeadDotProductAttention_0"]
        h = state["intermediates"][f"_LinenBlock_{i}"]["h"][0]
        want = _reference(
            h, p["query"]["kernel"], p["query"]["bias"], p["key"]["kernel"], p["key"]["bias"]
        )
        got = np.asarray(maps[f"_LinenBlock_{i}/MultiHeadDotProductAttention_0"])
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_linen_custom_attention_fn_bypassed():
    calls = []

    def fused(q, k, v, **kw):
        calls.append(1)
        return nn.dot_product_attention(q, k, v, **kw)

    mha = nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=FEAT, attention_fn=fused)
    x = _x(5)
    variables = mha.init(jax.random.key(1), x)
    calls.clear()
    maps = capture_attention_linen(mha, variables, x)
    assert list(maps) == [""] and maps[""].shape == (2, HEADS, N, N)
    assert not calls
    mha.apply(variables, x)
    assert calls  # the module definition itself was not changed


def test_linen_bad_variables():
    model = _LinenModel()
    with pytest.raises(Exception, match="params"):
        capture_attention_linen(model, {}, _x())


def _reference_cross(xq, xk, q_kernel, q_bias, k_kernel, k_bias):
    """float64 softmax(q kᵀ/√d) with queries from ``xq`` and keys from ``xk``."""
    xq, xk = np.asarray(xq, np.float64), np.asarray(xk, np.float64)
    q = np.einsum("bnd,dhe->bnhe", xq, np.asarray(q_kernel, np.float64)) + np.asarray(q_bias)
    k = np.einsum("bnd,dhe->bnhe", xk, np.asarray(k_kernel, np.float64)) + np.asarray(k_bias)
    s = np.einsum("bqhe,bkhe->bhqk", q, k) / np.sqrt(q.shape[-1])
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


class _NNXDecoderBlock(nnx.Module):
    """Self-attention over ``x`` then cross-attention from ``x`` to a separate ``context``."""

    def __init__(self, rngs):
        self.self_attn = nnx.MultiHeadAttention(HEADS, FEAT, decode=False, rngs=rngs)
        self.cross_attn = nnx.MultiHeadAttention(HEADS, FEAT, decode=False, rngs=rngs)

    def __call__(self, x, context):
        h = x + self.self_attn(x)
        return h + self.cross_attn(h, context), h


def test_nnx_cross_attention_is_returned():
    n_ctx = 3  # != N: the cross-attention map is (N, n_ctx), not square
    model = _NNXDecoderBlock(nnx.Rngs(6))
    x = _x(6)
    ctx = jnp.asarray(np.random.default_rng(7).normal(size=(2, n_ctx, FEAT)), jnp.float32)
    maps = capture_attention(model, x, ctx)
    assert sorted(maps) == ["cross_attn", "self_attn"]
    assert maps["self_attn"].shape == (2, HEADS, N, N)
    got = np.asarray(maps["cross_attn"])
    assert got.shape == (2, HEADS, N, n_ctx)
    _, h = model(x, ctx)
    a = model.cross_attn
    want = _reference_cross(
        h, ctx, a.query.kernel[...], a.query.bias[...], a.key.kernel[...], a.key.bias[...]
    )
    np.testing.assert_allclose(got, want, atol=1e-6)


class _LinenCross(nn.Module):
    @nn.compact
    def __call__(self, x, context):
        return nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=FEAT)(x, context)


def test_nnx_and_linen_agree_on_cross_attention_shapes():
    x = _x(8)
    ctx = jnp.asarray(np.random.default_rng(9).normal(size=(2, 3, FEAT)), jnp.float32)
    linen = _LinenCross()
    variables = linen.init(jax.random.key(2), x, ctx)
    (lin,) = capture_attention_linen(linen, variables, x, ctx).values()
    mha = nnx.MultiHeadAttention(HEADS, FEAT, decode=False, rngs=nnx.Rngs(10))
    (nx,) = capture_attention(mha, x, ctx).values()
    assert lin.shape == nx.shape == (2, HEADS, N, 3)


def test_nothing_captured_is_an_error():
    with pytest.raises(ValueError, match=r"no attention probabilities.*Linear.*sow"):
        capture_attention(nnx.Linear(FEAT, FEAT, rngs=nnx.Rngs(0)), _x())
    dense = nn.Dense(FEAT)
    variables = dense.init(jax.random.key(0), _x())
    with pytest.raises(ValueError, match=r"no attention probabilities.*Dense.*sow"):
        capture_attention_linen(dense, variables, _x())
