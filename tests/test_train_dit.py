"""Tests for experiments.train_dit: smoke run, exact kill-and-resume, model loading, sampling."""

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.ckpt import Checkpointer
from experiments.dit_configs import PRESETS, get_preset
from experiments.train_dit import _denoising_loss, load_dit, loss_weights, train_and_evaluate
from markov_attn.nn import alphas_cumprod, ddim_sample

SMOKE = get_preset("smoke", data="synthetic")


def _lines(workdir) -> list[dict]:
    text = (pathlib.Path(workdir) / "metrics.jsonl").read_text()
    return [json.loads(x) for x in text.splitlines()]


def _trajectory(workdir) -> list[tuple]:
    return [(r["step"], r.get("loss"), r.get("grad_norm"), r.get("test_loss"))
            for r in _lines(workdir)]  # fmt: skip


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("dit_full")
    return workdir, train_and_evaluate(SMOKE, workdir, progress=False)


def test_smoke_run_writes_its_files(finished):
    workdir, summary = finished
    assert [r["step"] for r in _lines(workdir)] == [2, 4, 6, 6]
    assert json.loads((workdir / "summary.json").read_text())["steps"] == 6
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [4, 6]
    for key in ("test_loss", "train_loss", "first_loss", "step_time_ms", "params"):
        assert summary[key] is not None
    assert np.isfinite(summary["test_loss"]) and 0.2 < summary["train_loss"] < 2.0


def test_kill_and_resume_follows_the_same_trajectory(tmp_path, finished):
    full_dir, full = finished
    partial = train_and_evaluate(SMOKE, tmp_path, stop_after=5, progress=False)
    assert partial["step"] == 5 and not (tmp_path / "summary.json").exists()
    assert Checkpointer(tmp_path / "checkpoints").latest_step() == 4
    resumed = train_and_evaluate(SMOKE, tmp_path, progress=False)
    assert resumed["resumed_from"] == 4
    assert _trajectory(tmp_path) == _trajectory(full_dir)
    assert resumed["test_loss"] == full["test_loss"]
    for ema in (True, False):
        a, b = load_dit(tmp_path, ema=ema)[0], load_dit(full_dir, ema=ema)[0]
        from flax import nnx

        for x, y in zip(jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b))):
            np.testing.assert_array_equal(x, y)


def test_loaded_model_samples(finished):
    model, cfg = load_dit(finished[0])
    assert cfg == SMOKE and model.cfg == SMOKE.model
    y = np.array([0, cfg.model.null_label])
    out = np.asarray(ddim_sample(model, y, steps=2, sag="column_sum", sag_scale=0.5))
    assert out.shape == (2, 32, 32, 3) and np.isfinite(out).all()


def test_resume_with_another_config_is_refused(tmp_path):
    train_and_evaluate(SMOKE, tmp_path, stop_after=2, progress=False)
    with pytest.raises(ValueError, match="different run"):
        train_and_evaluate(dataclasses.replace(SMOKE, lr=0.5), tmp_path, progress=False)


def test_presets():
    for name in PRESETS:
        cfg = get_preset(name)
        assert cfg.name == name and cfg.ckpt_every % cfg.log_every == 0
        assert cfg.model.image_size == 32 and cfg.model.grid == 8  # SAG reads an 8x8 grid
    assert get_preset("cpu").model.width == 128 and get_preset("cpu").model.depth == 6
    with pytest.raises(ValueError, match="unknown config field"):
        get_preset("cpu", colour="red")


def test_v_loss_weight():
    eps = get_preset("cpu")
    assert np.all(loss_weights(eps) == 1.0)
    cfg = dataclasses.replace(eps, loss_weight="v", loss_weight_cap=10.0)
    w = loss_weights(cfg)
    abar = alphas_cumprod(cfg.num_timesteps)
    snr = abar / (1 - abar)
    # (1 + SNR) on the implied clean image's error = (1 + SNR) / SNR on the ε-MSE, capped
    np.testing.assert_allclose(w[:700], (1 + snr[:700]) / snr[:700], rtol=1e-6)
    assert w.max() == 10.0 and w[-1] == 10.0 and np.all(np.diff(w) >= 0) and np.isfinite(w).all()
    assert np.argmax(w >= 10.0) == 793  # the docstring's "t >= 793"
    assert get_preset("cpu_tokens_v").loss_weight == "v"
    for bad in ({"loss_weight": "x0"}, {"loss_weight_cap": 0.5}, {"loss_weight_cap": float("inf")}):
        with pytest.raises(ValueError, match="loss_weight"):
            dataclasses.replace(eps, **bad)


def test_v_loss_weight_weights_the_training_loss_only():
    cfg = dataclasses.replace(SMOKE, loss_weight="v", flip=False, label_dropout=0.0)
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    labels = jnp.zeros(4, jnp.int32)
    fake = lambda params, xt, t, y: (jnp.zeros_like(xt), None)  # ε̂ = 0: per-image MSE = mean ε²
    key = jax.random.key(3)
    plain = _denoising_loss(fake, None, images, labels, key, cfg=cfg, train=False)
    weighted = _denoising_loss(fake, None, images, labels, key, cfg=cfg, train=True)
    t = jax.random.randint(jax.random.split(key, 4)[0], (4,), 0, cfg.num_timesteps)
    np.testing.assert_allclose(weighted, plain * loss_weights(cfg)[np.asarray(t)], rtol=1e-6)
    assert not np.allclose(weighted, plain)


def test_load_split_start_is_an_offset_into_the_runs_data(monkeypatch):
    """load_split(start=s) gives the images after a run's own test images from the run's data:
    eval_sag's held-out reals came from the benchmark even for a synthetic run, and
    label_bounce ignored data_root (review)."""
    from experiments import train_dit

    whole = train_dit.load_split(SMOKE, "test", 5)  # synthetic: the last 3 of 5 draws
    tail = train_dit.load_split(SMOKE, "test", 3, start=2)
    assert tail["images"].shape == (3, *whole["images"].shape[1:]) and len(tail["labels"]) == 3
    seen = {}

    def fake(split, n, **kw):
        seen.update(kw)
        return {"images": np.zeros((n, 2, 2, 3), np.float32), "labels": np.zeros(n, np.int32)}

    monkeypatch.setattr("markov_attn.data.make_split", fake)
    bench = dataclasses.replace(SMOKE, data="bench", data_root="/elsewhere")
    out = train_dit.load_split(bench, "test", 4, start=7)
    assert seen["start"] == 7 and seen["root"] == "/elsewhere"
    assert out["images"].dtype == np.uint8 and len(out["labels"]) == 4
