"""The label-token maps of experiments/label_bounce.py against their definitions."""

import jax
import jax.numpy as jnp
import numpy as np

import markov_attn as ma
from experiments import label_bounce as lb


def _attn(b=3, h=2, n=12, seed=0):
    x = jax.random.normal(jax.random.key(seed), (b, h, n, n))
    return jax.nn.softmax(2.0 * x, axis=-1)


def test_maps_follow_their_definitions():
    attn, n_label = _attn(), 2
    maps = lb._maps(attn, n_label, "uniform")
    chain = np.asarray(attn, np.float64).mean(1)
    start = np.zeros(chain.shape[-1])
    start[:n_label] = 1 / n_label
    row = start @ chain  # one step from the label tokens, no teleport
    np.testing.assert_allclose(maps[lb.LABEL_ROW], row[:, n_label:], rtol=1e-5, atol=1e-7)
    tele = 0.99 * chain + 0.01 / chain.shape[-1]  # bounces step the teleported chain
    one = start @ tele
    two = np.einsum("bn,bnm->bm", one, tele)
    np.testing.assert_allclose(maps["forward bounce n=1"], one[:, n_label:], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(maps["forward bounce n=2"], two[:, n_label:], rtol=1e-5, atol=1e-7)
    rev = np.asarray(ma.bounce(jnp.asarray(chain, jnp.float32), start, steps=3,
                               direction="reverse"))  # fmt: skip
    np.testing.assert_allclose(maps["reverse bounce n=3"], rev[:, 3, n_label:], rtol=1e-5)
    np.testing.assert_allclose(maps["TokenRank"], np.asarray(ma.tokenrank(chain))[:, n_label:],
                               rtol=1e-4, atol=1e-6)  # fmt: skip
    assert set(maps) == {
        *lb.FAMILIES["label row"], *lb.FAMILIES["forward bounce"],
        *lb.FAMILIES["reverse bounce"], "TokenRank",
    }  # fmt: skip
    assert all(m.shape == (3, 10) for m in maps.values())


def test_table_reports_the_paired_differences():
    m = {"miou": 0.4, "map": 0.5, "pixel_acc": 0.7}
    ci = {"miou": (0.38, 0.42), "map": (0.48, 0.52)}
    best = [
        {"t": 100, "family": "label row", "layer": "4", "heads": "uniform", "map": lb.LABEL_ROW,
         "true": m, "true_ci": ci, "wrong": {**m, "miou": 0.39},
         "minus_wrong_ci": {"miou": (0.0, 0.02)}},
        {"t": 100, "family": "reverse bounce", "layer": "0", "heads": "lambda2",
         "map": "reverse bounce n=3", "true": {**m, "miou": 0.45}, "true_ci": ci, "wrong": m,
         "minus_wrong_ci": {"miou": (0.03, 0.07)}, "label_row": m,
         "minus_label_row_ci": {"miou": (0.02, 0.08)}},
    ]  # fmt: skip
    res = {"best": best, "refs": {"centre prior": {**m, "ci": ci}}, "n_images": 10,
           "workdir": "w", "layers": ["0", "1", "last 3"], "total_s": 1.0,
           "backend": "cpu"}  # fmt: skip
    text = lb.table(res)
    assert "| 100 | reverse bounce n=3 (layer 0, lambda2) | 45.0 [38.0, 42.0]" in text
    assert "+5.0 [+2.0, +8.0] | +5.0 [+3.0, +7.0] |" in text
    assert "| — | centre prior | 40.0 [38.0, 42.0]" in text


def test_evaluate_reads_the_runs_data_and_refuses_synthetic_runs(monkeypatch):
    """label_bounce took the benchmark at the default root whatever the run's data_root, as
    floats where the run trained on uint8 (review); a synthetic run has no masks."""
    import dataclasses

    import pytest

    from experiments import train_dit
    from experiments.dit_configs import get_preset

    cfg = get_preset("smoke", data="synthetic")
    monkeypatch.setattr(train_dit, "load_dit", lambda workdir: (None, cfg))
    with pytest.raises(ValueError, match="synthetic data, which has no object masks"):
        lb.evaluate("somewhere", n_images=2)
    asked = {}

    def load_split(c, split, n, **kw):
        asked.update(cfg=c, split=split, n=n, **kw)
        raise RuntimeError("stop here")

    bench = dataclasses.replace(cfg, data="bench", data_root="/elsewhere")
    monkeypatch.setattr(train_dit, "load_dit", lambda workdir: (None, bench))
    monkeypatch.setattr(train_dit, "load_split", load_split)
    with pytest.raises(RuntimeError, match="stop here"):
        lb.evaluate("somewhere", n_images=3)
    assert asked == {"cfg": bench, "split": "test", "n": 3, "masks": True}
