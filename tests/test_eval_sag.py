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
