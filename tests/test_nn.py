"""Tests for markov_attn.nn: the ViT, its aux outputs, the pooling heads and TokenRank gradients."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import markov_attn as ma
from markov_attn.nn import MAPHead, TokenRankPool, ViT, ViTConfig

SMALL = ViTConfig(
    image_size=16, patch_size=4, width=16, depth=2, num_heads=2, mlp_dim=32, num_classes=5
)


def _model(**kw) -> ViT:
    return ViT(dataclasses.replace(SMALL, **kw), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def images():
    return jax.random.uniform(jax.random.key(1), (3, 16, 16, 3))


def _np(x):
    return np.asarray(x[...] if isinstance(x, nnx.Variable) else x, np.float64)


@pytest.mark.parametrize(
    ("pool", "registers"), [("cls", 0), ("cls", 2), ("mean", 2), ("map", 2), ("tokenrank", 2)]
)
def test_shapes_and_aux(images, pool, registers):
    model = _model(pool=pool, num_registers=registers)
    logits, aux = model(images, return_attn_logits=True, return_hidden=True)
    n = 1 + registers + 16
    assert logits.shape == (3, 5)
    assert aux["attn"].shape == (3, 2, 2, n, n)
    assert aux["attn"].dtype == jnp.float32
    assert aux["attn_logits"].shape == (3, 2, 2, n, n)
    assert aux["hidden"].shape == (3, 3, n, 16)
    assert aux["tokens"].shape == (3, n, 16)
    assert aux["pooled"].shape == (3, 16)
    assert aux["num_prefix"] == 1 + registers
    np.testing.assert_allclose(aux["attn"].sum(-1), 1.0, atol=1e-5)
    assert np.all(np.asarray(aux["attn"]) >= 0)
    np.testing.assert_allclose(
        aux["attn"], jax.nn.softmax(aux["attn_logits"], axis=-1), rtol=1e-5, atol=1e-7
    )
    # final_norm="all": tokens are the final norm of the last hidden state
    np.testing.assert_allclose(aux["tokens"], model.norm(aux["hidden"][:, -1]), atol=1e-5)
    assert ("pool_weights" in aux) == (pool == "tokenrank")
    assert "attn_logits" not in model(images)[1]


def test_parameter_names_follow_the_contract():
    model = _model(num_registers=2, layer_scale=0.1, pool="map")
    assert model.patch_embed.kernel.shape == (4, 4, 3, 16)
    assert model.cls.shape == (1, 1, 16)
    assert model.registers.shape == (1, 2, 16)
    assert model.pos_embed.shape == (1, 17, 16)
    assert len(model.blocks) == 2
    blk = model.blocks[0]
    assert blk.attn.qkv.kernel.shape == (16, 48)
    assert blk.attn.proj.kernel.shape == (16, 16)
    assert blk.ls1.shape == blk.ls2.shape == (16,)
    assert blk.mlp.fc1.kernel.shape == (16, 32) and blk.mlp.fc2.kernel.shape == (32, 16)
    assert model.head.kernel.shape == (16, 5)
    assert isinstance(model.map_head, MAPHead)
    assert model.pre_norm is None
    assert _model(pos_embed_cls=False).pos_embed.shape == (1, 16, 16)
    assert _model(layer_scale=None).blocks[0].ls1 is None


def test_attention_matches_a_float64_reference(images):
    model = _model()
    _, aux = model(images, return_hidden=True)
    blk = model.blocks[1]
    x = _np(aux["hidden"][:, 1])
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    y = (x - mu) / np.sqrt(var + 1e-6) * _np(blk.norm1.scale) + _np(blk.norm1.bias)
    qkv = y @ _np(blk.attn.qkv.kernel) + _np(blk.attn.qkv.bias)
    b, n, _ = qkv.shape
    q, k = qkv[..., :16].reshape(b, n, 2, 8), qkv[..., 16:32].reshape(b, n, 2, 8)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(aux["attn"][:, 1], p, atol=2e-5)


def test_attention_is_sown(images):
    model = _model()
    (_, aux), sown = nnx.capture(model, nnx.Intermediate)(images)
    got = [sown["blocks"][i]["attn"]["attn"].get_value()[0] for i in range(2)]
    np.testing.assert_array_equal(np.stack(got, axis=1), aux["attn"])
    # plain calls store nothing on the model
    model(images)
    assert not jax.tree.leaves(nnx.state(model, nnx.Intermediate))


def test_jit_equals_eager(images):
    model = _model(pool="tokenrank")
    eager, _ = model(images)
    graphdef, state = nnx.split(model)

    @jax.jit
    def f(state, x):
        return nnx.merge(graphdef, state)(x)[0]

    np.testing.assert_allclose(f(state, images), eager, atol=1e-5)


def test_pools(images):
    for pool in ("cls", "mean", "map"):
        _, aux = _model(pool=pool, num_registers=1)(images)
        toks = np.asarray(aux["tokens"])
        if pool == "cls":
            np.testing.assert_allclose(aux["pooled"], toks[:, 0], atol=1e-6)
        elif pool == "mean":
            np.testing.assert_allclose(aux["pooled"], toks[:, 2:].mean(1), atol=1e-6)
        else:  # MAP attends to the patch tokens only: changing CLS/register tokens is ignored
            m = _model(pool="map", num_registers=1)
            toks2 = jnp.asarray(toks).at[:, :2].set(5.0)
            np.testing.assert_allclose(
                m.map_head(toks2[:, 2:]), m.map_head(jnp.asarray(toks)[:, 2:]), atol=1e-6
            )
            assert not np.allclose(m.map_head(toks2), m.map_head(jnp.asarray(toks)))


@pytest.mark.parametrize("weighting", ["lambda2", "uniform"])
def test_tokenrank_pool_weights(images, weighting):
    model = _model(pool="tokenrank", num_registers=1, tokenrank_weighting=weighting)
    _, aux = model(images, return_attn_logits=True)
    pi = np.asarray(aux["pool_weights"])
    assert pi.shape == (3, 16)
    np.testing.assert_allclose(pi.sum(-1), 1.0, atol=1e-5)
    # reference: chain over the patch tokens only, heads averaged, stationary distribution
    s = np.asarray(aux["attn_logits"][:, -1], np.float64)[:, :, 2:, 2:]
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    if weighting == "uniform":
        w = np.full(p.shape[:2], 0.5)
    else:
        lam = np.sort(np.abs(np.linalg.eigvals(p)), axis=-1)[..., -2]
        w = lam / lam.sum(-1, keepdims=True)
    chain = np.einsum("bh,bhij->bij", w, p)
    for b in range(3):
        t = 0.99 * chain[b] + 0.01 / 16
        vals, vecs = np.linalg.eig(t.T)
        ref = np.real(vecs[:, np.argmax(np.real(vals))])
        np.testing.assert_allclose(pi[b], ref / ref.sum(), atol=1e-4)
    pooled = np.einsum("bm,bmd->bd", pi, np.asarray(aux["tokens"])[:, 2:])
    np.testing.assert_allclose(aux["pooled"], pooled, atol=1e-5)


def _tokenrank_only_loss(model, x, probe, *, stop_pi=False, tokens=None):
    """A loss that depends on the parameters only through the TokenRank weights: the tokens
    being pooled (the values path) are frozen (``tokens``, or stop_gradient of the model's)."""
    _, aux = model(x, return_attn_logits=True)
    p = aux["num_prefix"]
    pi = model.tokenrank_pool.weights(aux["attn_logits"][:, -1], num_prefix=p)
    if stop_pi:
        pi = jax.lax.stop_gradient(pi)
    if tokens is None:
        tokens = jax.lax.stop_gradient(aux["tokens"][:, p:])
    return jnp.sum(jnp.einsum("bm,bmd->bd", pi, tokens) * probe)


@pytest.mark.parametrize("weighting", ["lambda2", "uniform"])
def test_gradient_reaches_attention_through_tokenrank(images, weighting):
    model = _model(pool="tokenrank", tokenrank_weighting=weighting)
    probe = jax.random.normal(jax.random.key(2), (3, 16))
    grad = nnx.grad(lambda m: _tokenrank_only_loss(m, images, probe))(model)
    g = np.asarray(grad["blocks"][1]["attn"]["qkv"]["kernel"][...])
    assert np.abs(g[:, :16]).max() > 1e-6  # queries
    assert np.abs(g[:, 16:32]).max() > 1e-6  # keys
    np.testing.assert_array_equal(g[:, 32:], 0.0)  # values: frozen path
    # control: with stop_gradient on pi nothing reaches any parameter
    grad0 = nnx.grad(lambda m: _tokenrank_only_loss(m, images, probe, stop_pi=True))(model)
    assert all(float(jnp.abs(v).max()) == 0.0 for v in jax.tree.leaves(grad0))

    if weighting != "uniform":
        return  # the λ2 head weights are stop_gradient'ed, so finite differences differ
    # the gradient is right: directional finite difference on the last qkv kernel, with the
    # pooled tokens held at their unperturbed values
    tokens = model(images)[1]["tokens"][:, 1:]
    direction = np.asarray(jax.random.normal(jax.random.key(3), g.shape))
    kernel = model.blocks[1].attn.qkv.kernel[...]

    def loss_at(t):
        m = nnx.clone(model)
        m.blocks[1].attn.qkv.kernel[...] = kernel + t * direction
        return float(_tokenrank_only_loss(m, images, probe, tokens=tokens))

    eps = 1e-2
    fd = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    analytic = float(np.sum(g * direction))
    assert abs(fd - analytic) <= 0.05 * abs(analytic) + 1e-4


def test_full_model_gradient_flows(images):
    model = _model(pool="tokenrank")
    labels = jnp.array([0, 1, 2])

    def loss(m):
        logits, _ = m(images)
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(3), labels])

    grad = nnx.grad(loss)(model)
    for leaf in jax.tree.leaves(grad):
        assert np.all(np.isfinite(np.asarray(leaf)))
    # the head starts at zero, so its gradient is what makes training move
    assert float(jnp.abs(grad["head"]["kernel"][...]).max()) > 0


def test_tokenrank_pool_without_prefix(images):
    model = _model(pool="tokenrank", cls_token=False)
    _, aux = model(images)
    assert aux["num_prefix"] == 0 and aux["pool_weights"].shape == (3, 16)
    assert isinstance(model.tokenrank_pool, TokenRankPool)


def test_backbone_only_and_final_norm_variants(images):
    logits, aux = _model(num_classes=0)(images)
    np.testing.assert_array_equal(logits, aux["pooled"])
    model = _model(final_norm="pooled", pre_norm=True, gelu="quick")
    logits, aux = model(images, return_hidden=True)
    np.testing.assert_array_equal(aux["tokens"], aux["hidden"][:, -1])
    np.testing.assert_allclose(aux["pooled"], model.norm(aux["hidden"][:, -1, 0]), atol=1e-5)
    _, aux = _model(final_norm="none", gelu="tanh")(images, return_hidden=True)
    np.testing.assert_array_equal(aux["tokens"], aux["hidden"][:, -1])


def test_gelu_variants_differ(images):
    outs = [_model(gelu=g)(images)[1]["tokens"] for g in ("exact", "tanh", "quick")]
    assert not np.allclose(outs[0], outs[1], atol=1e-7)
    assert not np.allclose(outs[0], outs[2], atol=1e-4)


def test_patch_norm_removes_global_colour_and_contrast(images):
    # Per-channel offsets and a global contrast change of the input shift and scale every patch
    # embedding alike, so the instance-normalised tokens do not change; without the option they do.
    shifted = 0.5 * images + jnp.array([0.1, -0.2, 0.3]).reshape(1, 1, 1, 3)
    for patch_norm in (True, False):
        model = _model(patch_norm=patch_norm)
        a, b = model(images)[1]["tokens"], model(shifted)[1]["tokens"]
        assert np.allclose(a, b, atol=1e-4) == patch_norm
    x = _model(patch_norm=True).patch_embed(images)
    assert x.shape == (3, 4, 4, 16)  # the option adds no parameters: same patch_embed


def test_other_resolution_resizes_the_position_grid(images):
    model = _model(pool="mean")
    x = jax.random.uniform(jax.random.key(4), (2, 24, 20, 3))
    logits, aux = model(x)
    assert logits.shape == (2, 5)
    assert aux["attn"].shape == (2, 2, 2, 31, 31)
    np.testing.assert_allclose(aux["attn"].sum(-1), 1.0, atol=1e-5)


def test_bad_inputs_and_configs():
    with pytest.raises(ValueError, match="multiples of patch_size"):
        _model()(jnp.ones((1, 18, 16, 3)))
    with pytest.raises(ValueError, match="pool"):
        ViTConfig(pool="max")
    with pytest.raises(ValueError, match="cls_token"):
        ViTConfig(pool="cls", cls_token=False)
    with pytest.raises(ValueError, match="divisible"):
        ViTConfig(width=30, num_heads=4)
    with pytest.raises(ValueError, match="gelu"):
        ViTConfig(gelu="relu")


def test_core_functions_used_by_the_head_exist():
    for name in ("transition", "second_eigenvalue", "head_weights", "average", "tokenrank"):
        assert callable(getattr(ma, name))


def test_conv_stem_keeps_the_token_grid(images):
    model = _model(conv_stem=(4,), pool="tokenrank")
    assert model.patch_embed.kernel.shape == (2, 2, 4, 16)  # patch 4 after one halving
    assert model.stem.convs[0].kernel.shape == (3, 3, 3, 4)
    logits, aux = model(images)
    assert logits.shape == (3, 5) and aux["attn"].shape == (3, 2, 2, 17, 17)
    assert aux["pool_weights"].shape == (3, 16)
    assert _model().stem is None  # the default: the plain patch embedding, no extra parameters
    with pytest.raises(ValueError, match="multiple of 8"):
        _model(conv_stem=(4, 4, 4))  # patch 4 cannot be halved three times
    cfg = dataclasses.replace(SMALL, conv_stem=[4])  # lists (JSON) become tuples (hashable)
    assert cfg.conv_stem == (4,) and hash(cfg)


def test_strided_conv_stem_keeps_the_token_grid(images):
    model = _model(conv_stem=(4,), conv_stem_downsample="stride")
    plain = _model(conv_stem=(4,))
    (_, aux), (_, auxb) = model(images), plain(images)
    assert aux["attn"].shape == auxb["attn"].shape
    assert model.stem.convs[0].strides == (2, 2) and plain.stem.convs[0].strides == (1, 1)
    with pytest.raises(ValueError, match="conv_stem_downsample"):
        _model(conv_stem=(4,), conv_stem_downsample="avg")


def test_conv_stem_batch_norm_modes(images):
    # Inference mode (the default): running statistics, so an image's output does not depend on
    # the other images of the batch. Training mode: batch statistics, so it does.
    model = _model(conv_stem=(4,))
    alone = model(images[:1])[0]
    np.testing.assert_allclose(model(images)[0][:1], alone, atol=1e-5)
    model.set_attributes(use_running_average=False, raise_if_not_found=False)
    x = jax.random.normal(jax.random.key(9), images.shape)
    y = model(images)[1]["tokens"]
    assert not np.allclose(y[:1], model(jnp.concatenate([images[:1], x[1:]]))[1]["tokens"][:1])
    assert np.abs(np.asarray(model.stem.norms[0].mean[...])).max() > 0  # running mean updated
