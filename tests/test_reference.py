"""The committed reference model (experiments/reference/): it loads, it is the ``gpu`` preset,
and it classifies a slice of the benchmark's test split as well as its record says."""

import dataclasses
import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

train = pytest.importorskip("experiments.train")
configs = pytest.importorskip("experiments.configs")

REF = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "reference"


@pytest.fixture(scope="module")
def reference():
    record = json.loads((REF / "reference.json").read_text())
    model, cfg = train.load_weights(REF / record["file"])
    return model, cfg, record


def test_reference_model_accuracy_on_a_test_slice(reference):
    from markov_attn.data import make_split

    model, cfg, record = reference
    assert dataclasses.asdict(cfg) == dataclasses.asdict(
        configs.get_preset("gpu", pool="tokenrank")
    )
    d = make_split("test", 100)
    logits, aux = model(jnp.asarray(d["images"]))
    acc = float((np.asarray(logits).argmax(-1) == d["labels"]).mean())
    # the record: 0.82 on this slice on CPU (0.7725 on all 2,000 test images on the GPU)
    assert acc == pytest.approx(record["cpu_check"]["test_acc"], abs=0.02)
    assert acc > 0.7  # chance is 0.1
    assert aux["attn"].shape == (100, cfg.model.depth, cfg.model.num_heads, 65, 65)


def test_weights_file_round_trip(reference, tmp_path):
    model, cfg, _ = reference
    path = train.write_weights(model, cfg, tmp_path / "w.npz")
    loaded, lcfg = train.load_weights(path)
    assert lcfg == cfg
    x = jnp.linspace(0, 1, 2 * 64 * 64 * 3).reshape(2, 64, 64, 3)
    np.testing.assert_array_equal(np.asarray(loaded(x)[0]), np.asarray(model(x)[0]))
    with np.load(path) as z:  # a file whose arrays do not fit its config
        arrays = {k: z[k] for k in z.files}
    name = next(k for k in arrays if k.startswith("param:") and arrays[k].ndim == 2)
    arrays[name] = arrays[name][:, :-1]
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(train.CheckpointError, match="another model"):
        train.load_weights(tmp_path / "bad.npz")


def test_cli_set_overrides_any_field():
    cfg = train.config_from_args(
        ["--preset", "smoke", "--workdir", "x", "--set", "shift=3", "--set", "conv_stem=(8, 16)",
         "--set", "pool=mean", "--set", "label_smoothing=0.1"]
    )  # fmt: skip
    assert (cfg.shift, cfg.model.conv_stem, cfg.model.pool, cfg.label_smoothing) == (
        3, (8, 16), "mean", 0.1
    )  # fmt: skip
    with pytest.raises(ValueError, match="unknown config field"):
        train.config_from_args(["--preset", "smoke", "--workdir", "x", "--set", "nope=1"])


def test_gpu_report_regenerates_the_readme_blocks(tmp_path):
    """The README's GPU tables come from the committed results by one command."""
    gpu_report = pytest.importorskip("experiments.gpu_report")
    readme = tmp_path / "README.md"
    names = ("gpu-bench", "gpu-recipe", "gpu-heads")
    readme.write_text(
        "".join(f"<!-- {n}:start -->\nSTALE-BLOCK\n<!-- {n}:end -->\n" for n in names)
    )
    assert gpu_report.main(["--update-readme", str(readme)]) == 0
    text = readme.read_text()
    assert "STALE-BLOCK" not in text
    assert "NVIDIA H100" in text and "| tokenrank |" in text and "| stem_fresh |" in text
    training = json.loads((gpu_report.RESULTS / "training.json").read_text())
    best = max(r["test_acc"] for r in training["sweep"].values())
    assert f"{best:.3f}" in text


def test_confusion_script_on_the_reference(tmp_path, reference):
    from experiments import confusion

    _, _, record = reference
    weights = str(REF / record["file"])
    assert confusion.main(["--weights", weights, "--out", str(tmp_path), "--n-images", "60"]) == 0
    result = json.loads((tmp_path / "confusion.json").read_text())
    counts = np.asarray(result["counts"])
    assert counts.shape == (10, 10) and counts.sum() == 60
    assert result["accuracy"] == pytest.approx(np.trace(counts) / 60)
    assert result["accuracy"] > 0.6  # chance is 0.1
    assert (tmp_path / "confusion.png").stat().st_size > 10_000


def test_confusion_summary():
    from experiments.confusion import summary

    counts = np.diag([9, 8, 7, 6, 10]).astype(np.int64)
    counts[0, 1], counts[1, 0], counts[1, 2], counts[2, 3] = 1, 1, 1, 3
    out = summary(counts, ["a", "b", "c", "d", "e"])
    recall = [r["recall"] for r in out["classes"]]
    np.testing.assert_allclose(recall, [0.9, 0.8, 0.7, 1.0, 1.0])
    assert out["classes"][2]["most_confused_with"] == "d"
    assert out["classes"][1]["share_of_misses"] == 0.5
    for r in out["classes"]:
        lo, hi = r["recall_ci"]
        assert lo - 1e-12 <= r["recall"] <= hi + 1e-12
    # misses: 1, 2, 3, 0, 0; the four lowest-recall classes hold all of them
    assert out["lowest4_share_of_misses"] == 1.0
    assert out["accuracy"] == pytest.approx(40 / 46)
