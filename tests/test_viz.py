"""Tests for markov_attn.viz and the demo's figure code."""

import numpy as np
import pytest
from PIL import Image

from markov_attn.viz import bounce_strip, overlay
from markov_attn.viz._overlay import _upsample as upsample  # segmentation.upsample, one map


def test_upsample_nearest_repeats_each_token():
    m = np.arange(6, dtype=np.float32).reshape(2, 3)
    up = upsample(m, (4, 6), method="nearest")
    np.testing.assert_array_equal(up, np.kron(m, np.ones((2, 2))))


def test_upsample_bilinear():
    rng = np.random.default_rng(0)
    m = rng.random((4, 4)).astype(np.float32)
    up = upsample(m, (16, 16), method="bilinear")
    assert up.shape == (16, 16)
    np.testing.assert_allclose(up[0, 0], m[0, 0], rtol=1e-6)  # clamped corner
    np.testing.assert_allclose(up[-1, -1], m[-1, -1], rtol=1e-6)
    # token j's centre is pixel 4j + 1.5; pixel 4 lies 0.625 of the way from token 0 to 1
    np.testing.assert_allclose(up[1, 4], m[0, 0] * 0.375 + m[0, 1] * 0.625, rtol=1e-5)
    assert up.min() >= m.min() - 1e-6 and up.max() <= m.max() + 1e-6
    const = upsample(np.full((3, 3), 2.0), (10, 7), method="bilinear")
    np.testing.assert_allclose(const, 2.0)


def test_overlay_alpha_limits():
    img = np.random.default_rng(1).random((8, 8, 3)).astype(np.float32)
    m = np.array([[0.0, 1.0], [0.5, 0.25]])
    np.testing.assert_allclose(overlay(img, m, alpha=0.0), img, atol=1e-7)
    only = overlay(img, m, alpha=1.0, method="nearest", cmap="gray")
    np.testing.assert_allclose(only[0, 0], 0.0, atol=1e-6)  # min -> black
    np.testing.assert_allclose(only[0, 7], 1.0, atol=1e-6)  # max -> white
    u8 = overlay((img * 255).astype(np.uint8), m, alpha=0.3)
    assert u8.shape == (8, 8, 3) and u8.dtype == np.float32
    assert 0.0 <= u8.min() and u8.max() <= 1.0
    assert overlay(img[..., 0], m).shape == (8, 8, 3)  # grey image


def test_bounce_strip_writes_a_png(tmp_path):
    rng = np.random.default_rng(2)
    images = rng.random((3, 16, 16, 3))
    maps = {name: rng.random((3, 2, 2)) for name in ("TokenRank", "bounce 1", "column sum")}
    path = tmp_path / "sub" / "strip.png"
    fig = bounce_strip(images, maps, path=path, title="t", row_labels=["a", "b", "c"], dpi=50)
    assert len(fig.axes) == 3 * 4 + 1  # panels + the colour bar
    assert "one scale" in fig.axes[-1].get_ylabel()
    with Image.open(path) as im:
        assert im.format == "PNG"
        w, h = im.size
    assert w > h  # 4 columns, 3 rows


def _panel_contrast(fig, col):
    """Largest per-channel standard deviation over the pixels of panel ``col`` (first row)."""
    rgb = np.asarray(fig.axes[col].images[0].get_array(), np.float64)
    return float(np.std(rgb, axis=(0, 1)).max())


def _flat_and_peaked(rng, g=4):
    flat = np.full((1, g, g), 1.0 / g**2) + 1e-4 * rng.random((1, g, g))  # uniform + noise
    peaked = np.full((1, g, g), 0.2 / (g**2 - 1))
    peaked[0, 1, 2] = 0.8
    return flat / flat.sum(), peaked


def test_shared_scale_shows_a_flat_map_flat():
    flat, peaked = _flat_and_peaked(np.random.default_rng(3))
    images = np.zeros((1, 16, 16, 3))
    fig = bounce_strip(images, {"flat": flat, "peaked": peaked}, alpha=1.0, method="nearest")
    assert _panel_contrast(fig, 1) < 0.05 * _panel_contrast(fig, 2)
    # the colour bar spans the shared range [0, largest value] and says what it shows
    bar = fig.axes[-1]
    assert bar.get_ylim() == pytest.approx((0.0, 0.8))
    assert "one scale" in bar.get_ylabel()
    # alone in its own figure the flat map is still flat: the scale starts at 0, not its min
    alone = bounce_strip(images, {"flat": flat}, alpha=1.0, method="nearest")
    assert _panel_contrast(alone, 1) < 0.05 * _panel_contrast(fig, 2)


def test_minmax_scale_is_stated():
    flat, peaked = _flat_and_peaked(np.random.default_rng(4))
    images = np.zeros((1, 16, 16, 3))
    fig = bounce_strip(
        images, {"flat": flat, "peaked": peaked}, alpha=1.0, method="nearest", scale="minmax"
    )
    # per-panel stretch: the flat map's noise fills the colour range too ...
    assert _panel_contrast(fig, 1) > 0.2 * _panel_contrast(fig, 2)
    # ... and the colour bar says so
    assert "min–max" in fig.axes[-1].get_ylabel()
    assert fig.axes[-1].get_ylim() == pytest.approx((0.0, 1.0))


def test_fixed_scale_and_label():
    _, peaked = _flat_and_peaked(np.random.default_rng(5))
    fig = bounce_strip(
        np.zeros((1, 16, 16, 3)), {"p": peaked}, vmax=2.0, label="mass / uniform", alpha=1.0
    )
    assert fig.axes[-1].get_ylim() == pytest.approx((0.0, 2.0))
    assert fig.axes[-1].get_ylabel() == "mass / uniform"
    np.testing.assert_allclose(
        overlay(np.zeros((4, 4, 3)), np.full((2, 2), 3.0), vmax=2.0, alpha=1.0, cmap="gray"), 1.0
    )  # clipped at vmax


def test_bad_inputs():
    with pytest.raises(ValueError, match="grid"):
        upsample(np.zeros(4), (8, 8), method="nearest")
    with pytest.raises(ValueError, match="method"):
        upsample(np.zeros((2, 2)), (8, 8), method="cubic")
    with pytest.raises(ValueError, match="alpha"):
        overlay(np.zeros((8, 8, 3)), np.zeros((2, 2)), alpha=2.0)
    with pytest.raises(ValueError, match=r"\(2, gh, gw\)"):
        bounce_strip(np.zeros((2, 8, 8, 3)), {"x": np.zeros((3, 2, 2))})
    with pytest.raises(ValueError, match="row_labels"):
        bounce_strip(np.zeros((2, 8, 8, 3)), {"x": np.zeros((2, 2, 2))}, row_labels=["a"])
    with pytest.raises(ValueError, match="scale must be one of"):
        bounce_strip(np.zeros((1, 8, 8, 3)), {"x": np.zeros((1, 2, 2))}, scale="log")
    with pytest.raises(ValueError, match='pass scale="shared"'):
        bounce_strip(np.zeros((1, 8, 8, 3)), {"x": np.zeros((1, 2, 2))}, scale="minmax", vmax=1)
    with pytest.raises(ValueError, match="vmax must exceed vmin"):
        bounce_strip(np.zeros((1, 8, 8, 3)), {"x": np.zeros((1, 2, 2))}, vmin=1.0, vmax=1.0)
    with pytest.raises(ValueError, match="NaN"):
        bounce_strip(np.zeros((1, 8, 8, 3)), {"x": np.full((1, 2, 2), np.nan)})
    with pytest.raises(ValueError, match="maps is empty"):
        bounce_strip(np.zeros((1, 8, 8, 3)), {})
    with pytest.raises(ValueError, match="vmax must exceed vmin"):
        overlay(np.zeros((8, 8, 3)), np.zeros((2, 2)), vmin=0.5, vmax=0.5)


def test_demo_maps_on_a_small_model():
    import jax
    from flax import nnx

    from experiments.demo import attention_maps
    from markov_attn.nn import ViT, ViTConfig

    cfg = ViTConfig(
        image_size=16, patch_size=4, width=16, depth=2, num_heads=2, mlp_dim=32,
        num_classes=10, pool="tokenrank", tokenrank_krylov=4,
    )  # fmt: skip
    model = ViT(cfg, rngs=nnx.Rngs(0))
    images = np.asarray(jax.random.uniform(jax.random.key(0), (2, 16, 16, 3)))
    maps = attention_maps(model, images)
    assert list(maps) == [
        "logits", "TokenRank", "bounce 1", "bounce 2", "bounce 3", "bounce 4", "column sum"
    ]  # fmt: skip
    for name, m in maps.items():
        if name != "logits":
            assert m.shape == (2, 4, 4) and np.all(np.asarray(m) >= 0)
    _, aux = model(images)
    np.testing.assert_allclose(maps["TokenRank"].reshape(2, 16), aux["pool_weights"], atol=1e-5)


def test_demo_reports_a_run_of_another_preset_in_one_line(tmp_path, monkeypatch, capsys):
    # an old runs/demo (the 1,800-step cpu preset) must not end make demo in a traceback
    from experiments import demo

    def mismatch(cfg, workdir):
        raise ValueError(f"{workdir} holds a checkpoint of a different run (steps: stored 1800)")

    monkeypatch.setattr(demo, "train_and_evaluate", mismatch)
    assert demo.main() == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different run" in err[0] and err[0].startswith("make demo:")


def test_maps_with_nan_are_refused_not_drawn_flat():
    from markov_attn.viz.seg import seg_grid

    img = np.zeros((8, 8, 3), np.float32)
    bad = np.array([[0.0, 1.0], [2.0, np.nan]], np.float32)
    with pytest.raises(ValueError, match="NaN"):
        overlay(img, bad, method="nearest")
    masks = np.zeros((1, 8, 8), bool)
    with pytest.raises(ValueError, match="NaN"):
        seg_grid(img[None], masks, {"m": bad[None]})


def test_states_figure_gives_every_state_its_own_colour():
    import matplotlib

    from markov_attn.viz import states_figure

    k = 22
    states = np.arange(k * 2).reshape(4, 11) % k
    fig = states_figure(np.zeros((8, 22, 3), np.float32), states)
    legend = fig.axes[1].get_legend()
    colours = {tuple(np.round(h.get_facecolor(), 4)) for h in legend.legend_handles}
    assert len(colours) == k  # tab20 repeated state 0's colour for state 20
    matplotlib.pyplot.close(fig)
