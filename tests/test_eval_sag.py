"""The generation metrics of experiments/eval_sag.py against independent formulas."""

import numpy as np
import pytest

from experiments import eval_sag


def _fid_reference(f1, f2):
    """Fréchet distance with SciPy's general matrix square root of C1 C2 (float64)."""
    from scipy import linalg

    m1, m2 = f1.mean(0), f2.mean(0)
    c1, c2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = np.real(linalg.sqrtm(c1 @ c2))
    return np.sum((m1 - m2) ** 2) + np.trace(c1 + c2 - 2 * covmean)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fid_matches_scipy_sqrtm(seed):
    rng = np.random.default_rng(seed)
    f1 = rng.normal(size=(300, 8)) @ rng.normal(size=(8, 8))
    f2 = rng.normal(size=(200, 8)) * rng.uniform(0.5, 2, 8) + rng.normal(size=8)
    np.testing.assert_allclose(eval_sag.fid(f1, f2), _fid_reference(f1, f2), rtol=1e-6)
    s1 = eval_sag._sqrtm_psd(np.cov(f1, rowvar=False))
    np.testing.assert_allclose(eval_sag.fid(f1, f2, sqrt_c1=s1), eval_sag.fid(f1, f2), rtol=1e-9)
    assert abs(eval_sag.fid(f1, f1)) < 1e-6
    # a pure mean shift adds exactly its squared length
    shift = rng.normal(size=8)
    np.testing.assert_allclose(eval_sag.fid(f1, f1 + shift), shift @ shift, rtol=1e-6)


def test_inception_score_bounds():
    k = 5
    onehot = np.eye(k)[np.arange(100) % k]
    np.testing.assert_allclose(eval_sag.inception_score(onehot), k, rtol=1e-6)
    same = np.tile(np.random.default_rng(0).dirichlet(np.ones(k)), (50, 1))
    np.testing.assert_allclose(eval_sag.inception_score(same), 1.0, rtol=1e-6)


def test_precision_recall_by_hand():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(100, 4))
    precise, recalled = eval_sag.precision_recall(real, real.copy())
    assert precise.all() and recalled.all()
    precise, recalled = eval_sag.precision_recall(real, real + 100.0)
    assert not precise.any() and not recalled.any()
    # fakes collapsed onto one real point: precise, but they recall only a few reals
    fake = np.repeat(real[:1], 100, axis=0) + 1e-9 * rng.normal(size=(100, 4))
    precise, recalled = eval_sag.precision_recall(real, fake)
    assert precise.all() and recalled.mean() < 0.05


def test_recall_intervals_resample_the_generated_samples():
    """The recall draws resample the generated set (its manifold), not only the real one: with
    a real set of identical points (nothing to resample there), half of the generated samples
    far away and half on it, recall varies between draws (its interval had width 0 before);
    a draw's recall equals precision_recall on its distinct generated samples."""
    rng = np.random.default_rng(0)
    real = np.zeros((40, 3)) + 1e-3 * rng.normal(size=(40, 3))
    fake = np.concatenate([real[:4] + 1e-4, 50.0 + rng.normal(size=(36, 3))])
    probs = rng.dirichlet(np.ones(4), 40)
    stats = eval_sag._bootstrap(real, {"x": (fake, probs)}, n_boot=200)["x"]
    assert stats["point"]["recall"] == 1.0
    assert stats["boot"]["recall"].min() < 1.0 and np.ptp(stats["boot"]["recall"]) > 0.1
    i, r = rng.integers(0, 40, 40), np.arange(40)
    d_fr = np.sqrt(np.maximum(eval_sag._sqdist(fake, real), 0))
    d_ff = np.sqrt(np.maximum(eval_sag._sqdist(fake, fake), 0))
    _, recalled = eval_sag.precision_recall(real, fake[np.unique(i)])
    assert eval_sag._resampled_recall(d_fr, d_ff, i, r) == recalled.mean()


def test_summary_and_verdict_follow_the_intervals():
    rng = np.random.default_rng(0)
    n = 200
    boot = lambda centre: {k: centre[k] + 0.01 * rng.normal(size=n) for k in centre}
    point = lambda f, i: {"fid": f, "is": i, "precision": 0.5, "recall": 0.5}
    stats = {
        name: {"point": point(f, i), "boot": boot(point(f, i))}
        for name, f, i in [("none", 10.0, 2.0), ("column_sum s=1", 9.0, 2.0),
                           ("tokenrank s=1", 8.0, 2.0)]
    }  # fmt: skip
    pairs = [
        ("column_sum s=1", "none"),
        ("tokenrank s=1", "none"),
        ("tokenrank s=1", "column_sum s=1"),
    ]
    rep = eval_sag._summarise(stats, pairs)
    d = rep["differences"]["tokenrank s=1 - column_sum s=1"]
    assert d["fid"]["value"] == pytest.approx(-1.0) and d["fid"]["ci"][1] < 0
    verdict = eval_sag._verdict(rep)
    assert "FID -1.00" in verdict and "(better)" in verdict and "IS +0.000" in verdict
    assert "(no different)" in verdict


@pytest.mark.slow
def test_evaluate_smoke(tmp_path):
    """The whole evaluation on a smoke DiT: it runs, samples are cached per checkpoint step,
    and every setting gets a row with a recall interval in [0, 1]."""
    from experiments.dit_configs import get_preset
    from experiments.train_dit import train_and_evaluate

    cfg = get_preset("smoke", data="synthetic")
    train_and_evaluate(cfg, tmp_path / "run", progress=False)
    rep = eval_sag.evaluate(tmp_path / "run", samples=8, steps=2, batch=8, scales=(1.0,),
                            classifier_dir=tmp_path / "clf", classifier_steps=2,
                            progress=False)  # fmt: skip
    assert {"none", "real (other images)"} <= set(rep["rows"])
    for row in rep["rows"].values():
        lo, hi = row["recall"]["ci"]
        assert 0.0 <= lo <= hi <= 1.0
    cached = sorted(p.name for p in (tmp_path / "run" / "eval").glob("samples_*.npz"))
    assert cached and all(f"_step{cfg.steps}_" in name for name in cached)
