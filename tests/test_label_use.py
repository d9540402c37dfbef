"""experiments/label_use.py: the label-use losses against their definition, the gains' arithmetic,
and a run read end to end."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import label_use as lu
from experiments.dit_configs import get_preset
from experiments.train_dit import load_split, train_and_evaluate

SMOKE = get_preset("smoke", data="synthetic", keep_checkpoints=3)


def _images(n=6, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 1, (n, 32, 32, 3)).astype(np.float32), rng.integers(0, 10, n)


def test_a_model_blind_to_its_label_has_no_gain_and_one_that_reads_it_has():
    images, labels = _images()
    blind = lambda x, t, y: (0.5 * x, None)
    per = lu.losses(blind, SMOKE, images, labels, levels=(100, 700), batch_size=4)
    assert per["true"].shape == (6, 2)
    np.testing.assert_array_equal(per["true"], per["wrong"])
    np.testing.assert_array_equal(per["true"], per["null"])
    # the loss is that of the blind prediction against one fixed noise per image
    import jax

    from markov_attn.nn import q_sample

    x0 = images * 2.0 - 1.0
    eps = np.asarray(jax.random.normal(jax.random.key(0), x0.shape))
    for j, level in enumerate((100, 700)):
        t = jnp.full((6,), level)
        xt = np.asarray(q_sample(x0, t, eps, schedule=SMOKE.schedule))
        want = np.mean((0.5 * xt - eps) ** 2, axis=(1, 2, 3))
        np.testing.assert_allclose(per["true"][:, j], want, rtol=1e-5)

    # a model that knows the clean images and reads its label: 0.9 of the noise with the true
    # label, half of it with a wrong one, nothing with the null label
    from markov_attn.nn import alphas_cumprod

    abar = jnp.asarray(alphas_cumprod(SMOKE.num_timesteps, schedule=SMOKE.schedule), jnp.float32)

    def reads(x, t, y):
        a = abar[t][:, None, None, None]
        noise = (x - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)
        scale = jnp.where(y == labels, 0.9, jnp.where(y == SMOKE.model.null_label, 0.0, 0.5))
        return scale[:, None, None, None] * noise, None

    row = lu.summarise(0, lu.losses(reads, SMOKE, images, labels, batch_size=6))
    loss = row["loss"]
    np.testing.assert_allclose([loss["true"], loss["wrong"], loss["null"]], [0.01, 0.25, 1.0],
                               rtol=0.1)  # fmt: skip
    assert row["gain_wrong"][1] > 0 and row["gain_null"][1] > row["gain_wrong"][2]


def test_object_losses_average_over_the_mask_only():
    """The object loss is the squared error averaged over the mask's pixels; a model that errs
    only on the object with a wrong label shows a larger relative gain there than over the
    whole image, and an image with an empty mask is left out of the object gains."""
    images, labels = _images(n=8, seed=2)
    masks = np.zeros((8, 32, 32), bool)
    for i in range(8):  # a different box per image (a misaligned batch slice would show)
        masks[i, 2 * i : 2 * i + 9, 3 * i : 3 * i + 7] = True
    masks[3] = False  # no object
    blind = lambda x, t, y: (0.5 * x, None)
    per = lu.losses(blind, SMOKE, images, labels, masks=masks, levels=(100, 700), batch_size=4)
    assert set(per) == {"true", "wrong", "null", "true_object", "wrong_object", "null_object"}
    import jax

    from markov_attn.nn import q_sample

    x0 = images * 2.0 - 1.0
    eps = np.asarray(jax.random.normal(jax.random.key(0), x0.shape))
    xt = np.asarray(q_sample(x0, jnp.full((8,), 700), eps, schedule=SMOKE.schedule))
    err = np.mean((0.5 * xt - eps) ** 2, axis=-1)
    want = np.array([e[m].mean() if m.any() else np.nan for e, m in zip(err, masks)])
    np.testing.assert_allclose(per["true_object"][:, 1], want, rtol=1e-5)
    assert np.isnan(per["true_object"][3]).all()

    def object_only(x, t, y):  # a wrong label adds an error of 1 on the object's pixels
        wrong = (y != labels[: len(y)])[:, None, None, None] & masks[: len(y), :, :, None]
        return eps[: len(y)] * 0 + 0.1 + wrong, None

    row = lu.summarise(0, lu.losses(object_only, SMOKE, images, labels, masks=masks, batch_size=8))
    assert np.isfinite(row["gain_wrong_object"]).all()
    assert row["gain_wrong_object"][0] > 5 * row["gain_wrong"][0] > 0
    assert row["gain_null_object"][0] > 0  # the null label is not the true one either
    text = lu.table({"levels": list(lu.LEVELS), "rows": [row], "workdir": "w", "preset": "p",
                     "total_steps": 1, "n_images": 8, "num_classes": 10}, "cmd")  # fmt: skip
    assert "object: L(wrong) − L(true), %" in text and "object mask only" in text
    empty = {k: v * np.nan if k.endswith("_object") else v for k, v in per.items()}
    assert "gain_wrong_object" not in lu.summarise(0, empty, (100, 700))  # no image has one
    with pytest.raises(ValueError, match="masks must have shape"):
        lu.losses(blind, SMOKE, images, labels, masks=masks[:, :16])


def test_gains_are_relative_paired_differences():
    """Point values are mean differences over mean L(true), in %; the interval resamples the
    images of both together, so with a constant difference only the denominator varies."""
    rng = np.random.default_rng(1)
    true = rng.uniform(0.1, 0.2, (400, 4))
    per = {"true": true, "wrong": true + 0.01, "null": true - 0.02}
    row = lu.summarise(7, per)
    assert row["step"] == 7

    def check(g, want, ref):
        assert g[0] == pytest.approx(want, rel=1e-9)
        lo, hi = sorted(want * ref.mean() / np.quantile(_means(ref), [0.975, 0.025]))
        assert g[1] == pytest.approx(lo, rel=1e-6) and g[2] == pytest.approx(hi, rel=1e-6)
        assert g[1] < g[0] < g[2] and g[2] - g[1] < 0.05 * abs(g[0])

    def _means(ref):  # the same resamples as lu._gain (seed 0, 1000 resamples)
        idx = np.random.default_rng(0).integers(0, len(ref), (1000, len(ref)))
        return ref[idx].mean(1)

    check(row["gain_wrong"], 100 * 0.01 / true.mean(), true.mean(1))
    check(row["gain_null"], -100 * 0.02 / true.mean(), true.mean(1))
    for j, t in enumerate(lu.LEVELS):
        check(row["gain_wrong_by_t"][str(t)], 100 * 0.01 / true[:, j].mean(), true[:, j])


def test_reads_every_kept_checkpoint_of_a_run(tmp_path):
    train_and_evaluate(SMOKE, tmp_path, progress=False)
    assert lu.main(["--workdir", str(tmp_path), "--n-images", "8"]) == 0
    res = json.loads((tmp_path / "label_use.json").read_text())
    assert [r["step"] for r in res["rows"]] == [2, 4, 6]
    assert res["n_images"] == 8 and res["total_steps"] == SMOKE.steps
    assert lu.main(["--workdir", str(tmp_path), "--steps", "5"]) == 2  # not kept
    with pytest.raises(FileNotFoundError, match="train first"):
        lu.evaluate(tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()  # a mistyped run directory is not created
    with pytest.raises(SystemExit) as exit_info:
        lu.main(["--workdir", str(tmp_path), "--n-images", "0"])
    assert exit_info.value.code == 2  # argparse refused the count
    test = load_split(SMOKE, "test", 4)
    assert test["images"].dtype == np.uint8 and test["images"].shape == (4, 32, 32, 3)
    with pytest.raises(ValueError, match="levels must lie in"):
        blind = lambda x, t, y: (x, None)
        lu.losses(blind, SMOKE, test["images"], test["labels"], levels=(100, 1000))
