"""Tests for experiments.sample_dit: the grid layout and the SAG mask figure."""

import types

import numpy as np
from flax import nnx

from experiments import sample_dit as sd
from experiments.sample_dit import grid_image, mask_agreement, mask_figure
from markov_attn.nn import DiT, DiTConfig


def test_grid_image_layout():
    images = np.stack([np.full((4, 4, 3), i / 5.0) for i in range(6)])
    grid = grid_image(images, rows=2, pad=1)
    assert grid.shape == (2 * 5 + 1, 3 * 5 + 1, 3) and grid.dtype == np.uint8
    assert grid[1, 1, 0] == 0 and grid[6, 1, 0] == round(3 / 5 * 255)  # row 2 starts at image 3
    assert grid[0, 0, 0] == 255  # padding is white


def test_mask_figure(tmp_path, rng):
    cfg = DiTConfig(image_size=16, patch_size=4, width=32, depth=2, num_heads=2, n_label=2)
    model = DiT(cfg, rngs=nnx.Rngs(0))
    images = rng.random((2, 16, 16, 3)).astype(np.float32)
    stats = mask_figure(model, images, tmp_path / "m.png", t=300)
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert stats["layer"] == 1 and 0 <= stats["agreement"] <= 1
    assert 0 < stats["column_sum_fraction"] < 1 and 0 < stats["tokenrank_fraction"] < 1
    rows = mask_agreement(model, images, ts=(100, 700))
    assert [(r["t"], r["layer"]) for r in rows] == [(100, 0), (100, 1), (700, 0), (700, 1)]
    assert all(0 <= r["agreement"] <= 1 for r in rows)


def test_time_sampling_interleaves_rounds_and_reports_medians(monkeypatch):
    import experiments.sample_dit as sd

    cfg = DiTConfig(image_size=8, patch_size=4, width=16, depth=2, num_heads=2, n_label=2)
    model = DiT(cfg, rngs=nnx.Rngs(0))
    order = []
    real = sd.ddim_sample

    def spy(*a, sag=None, **kw):
        order.append(sag)
        return real(*a, sag=sag, **kw)

    monkeypatch.setattr(sd, "ddim_sample", spy)
    out = sd.time_sampling(model, batch=2, steps=1, rounds=3)
    kinds = [None, *sd.MASK_KINDS]
    assert order == kinds * 4  # one compiling call each, then 3 interleaved rounds
    assert set(out["ms_per_step"]) == {"none", *sd.MASK_KINDS} and out["rounds"] == 3
    for k in sd.MASK_KINDS:
        lo, hi = out["ratio_range"][k]
        assert 0 < lo <= out["ratio_vs_unguided"][k] <= hi


def test_sampling_uses_the_models_number_of_timesteps(monkeypatch, tmp_path):
    """A model trained with T != 1000 must be sampled on its own alpha-bar table: the SAG
    evaluation and the grids/timing passed only the schedule (T fell back to 1000)."""
    import markov_attn.nn
    from experiments import dit_configs, eval_sag

    seen = []

    def fake(model, labels, **kw):
        seen.append(kw.get("num_timesteps"))
        return np.zeros((len(labels), 4, 4, 3), np.float32)

    monkeypatch.setattr(markov_attn.nn, "ddim_sample", fake)
    monkeypatch.setattr(sd, "ddim_sample", fake)
    cfg = dit_configs.get_preset("smoke", num_timesteps=200)
    model = types.SimpleNamespace(cfg=types.SimpleNamespace(null_label=3, num_classes=3))
    eval_sag._sample_setting(model, cfg, "tokenrank", 0.5, n=2, batch=2, steps=5, seed=0)
    sd.sample_grids(model, tmp_path, per_row=1, steps=1, num_timesteps=200)
    assert seen and set(seen) == {200}
