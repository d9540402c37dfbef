"""Tests for experiments.train / experiments.ckpt: smoke run, checkpoints, kill-and-resume."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from experiments.ckpt import Checkpointer, CheckpointError
from experiments.configs import PRESETS, TrainConfig, get_preset
from experiments.train import (
    batch_indices,
    load_model,
    synthetic_data,
    train_and_evaluate,
)
from markov_attn.nn import ViTConfig

REPO = pathlib.Path(__file__).resolve().parents[1]

TINY = TrainConfig(
    model=ViTConfig(
        image_size=16, patch_size=4, width=16, depth=1, num_heads=2, mlp_dim=32, pool="tokenrank"
    ),
    name="tiny",
    data="synthetic",
    train_size=64,
    test_size=40,
    batch_size=16,
    steps=6,
    lr=1e-2,
    warmup_steps=1,
    ckpt_every=2,
    log_every=1,
    eval_batch_size=32,
)


def _tiny(**kw) -> TrainConfig:
    return dataclasses.replace(TINY, **kw)


def _losses(workdir) -> list[tuple]:
    lines = [
        json.loads(x) for x in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    ]
    return [(r["step"], r.get("loss"), r.get("acc"), r.get("test_acc")) for r in lines]


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """An uninterrupted tiny run: (workdir, summary)."""
    workdir = tmp_path_factory.mktemp("full")
    return workdir, train_and_evaluate(TINY, workdir, progress=False)


def test_training_learns_the_synthetic_task(finished_run):
    workdir, summary = finished_run
    for key in ("test_acc", "test_loss", "train_loss", "step_time_ms", "images_per_s", "params"):
        assert key in summary
    assert summary["pool"] == "tokenrank" and summary["test_size"] == 40
    assert json.loads((workdir / "summary.json").read_text())["steps"] == 6
    assert [r[0] for r in _losses(workdir)] == [1, 2, 3, 4, 5, 6, 6]  # 6 train lines + test
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [4, 6]
    assert summary["resumed_from"] == 0
    assert summary["test_loss"] < np.log(10) - 0.05  # chance level: log(10), accuracy 0.1
    assert summary["test_acc"] > 0.2


def test_checkpoint_round_trip(tmp_path):
    state = {
        "params": {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.float32(0.5)},
        "opt_state": (np.int32(7), {"mu": np.ones(3, np.float32)}),
    }
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() is None
        ckpt.save(3, state, {"step": 3, "note": "x"})
        ckpt.save(5, jax.tree.map(lambda x: x + 1, state), {"step": 5})
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), state)
        restored, meta = ckpt.restore(abstract, step=3)
        assert meta == {"step": 3, "note": "x"}
        for a, b in zip(_leaves(restored), _leaves(state)):
            np.testing.assert_array_equal(a, b)
            assert a.dtype == b.dtype
        assert ckpt.latest_step() == 5
        assert ckpt.read_meta()["step"] == 5


def test_model_round_trip(finished_run):
    workdir, summary = finished_run
    model, cfg = load_model(workdir)
    assert cfg == TINY
    data = synthetic_data(40, size=16, split="test")
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0])
    logits = forward(state, data["images"].astype(np.float32) / 255.0)
    acc = float(np.mean(np.argmax(np.asarray(logits), -1) == data["labels"]))
    assert acc == pytest.approx(summary["test_acc"], abs=1e-6)


def test_library_load_run_reads_weights_only(finished_run, tmp_path):
    """``markov_attn.nn.load_run`` (what the CLI uses, no ``experiments`` needed) gives the same
    model as ``load_model`` and the stored config as a dict; a weights file written from it
    loads the same."""
    from markov_attn.nn import config_to_dict, load_run, write_weights

    workdir, _ = finished_run
    reference, _ = load_model(workdir)
    model, config = load_run(workdir)
    assert config == config_to_dict(TINY) and model.cfg == TINY.model
    for a, b in zip(_leaves(model), _leaves(reference)):
        np.testing.assert_array_equal(a, b)
    path = write_weights(model, config, tmp_path / "w.npz")
    again, stored = load_run(path)
    assert stored == config
    for a, b in zip(_leaves(again), _leaves(reference)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(FileNotFoundError):
        load_run(tmp_path / "nothing")


def test_kill_and_resume_follows_the_same_trajectory(tmp_path, finished_run):
    full_dir, full = finished_run
    # "killed" after step 5: the last checkpoint is step 4, steps 5 is lost and recomputed
    partial = train_and_evaluate(TINY, tmp_path, stop_after=5, progress=False)
    assert partial["step"] == 5 and not (tmp_path / "summary.json").exists()
    assert Checkpointer(tmp_path / "checkpoints").latest_step() == 4
    resumed = train_and_evaluate(TINY, tmp_path, progress=False)
    assert resumed["resumed_from"] == 4
    assert _losses(tmp_path) == _losses(full_dir)  # identical metric lines, no duplicates
    assert resumed["test_acc"] == full["test_acc"]
    for a, b in zip(_leaves(load_model(tmp_path)[0]), _leaves(load_model(full_dir)[0])):
        np.testing.assert_array_equal(a, b)
    # a finished run restarts as a no-op and reports the same numbers
    again = train_and_evaluate(TINY, tmp_path, progress=False)
    assert again["resumed_from"] == 6 and again["test_acc"] == full["test_acc"]


def test_killed_process_resumes(tmp_path):
    """SIGKILL the CLI mid-run (after step 3; last checkpoint 2), rerun it, and compare with an
    uninterrupted run of the same command (the processes share a compilation cache, and
    compile without LLVM's optimisations: the same flags for all three, half the compile time)."""
    env = {
        **os.environ,
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0",
        "PYTHONPATH": str(REPO),
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }

    def cli(workdir, *extra):
        argv = [
            "--preset", "smoke", "--data", "synthetic", "--steps", "5", "--no-progress",
            "--workdir", str(tmp_path / workdir), *extra,
        ]  # fmt: skip
        cmd = [sys.executable, "-m", "experiments.train", *argv]
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, timeout=300)

    killed = cli("run", "--kill-at-step", "3")
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    assert not (tmp_path / "run" / "summary.json").exists()
    assert [r[0] for r in _losses(tmp_path / "run")] == [2]  # log_every=2; step 3 not logged
    for workdir in ("run", "full"):
        done = cli(workdir)
        assert done.returncode == 0, done.stderr.decode()[-2000:]
    resumed = json.loads((tmp_path / "run" / "summary.json").read_text())
    full = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert resumed["resumed_from"] == 2 and full["resumed_from"] == 0
    assert _losses(tmp_path / "run") == _losses(tmp_path / "full")
    assert [r[0] for r in _losses(tmp_path / "run")] == [2, 4, 5, 5]
    assert resumed["test_acc"] == full["test_acc"]
    assert resumed["test_loss"] == full["test_loss"]


def _corrupt(step_dir: pathlib.Path) -> None:
    for f in (step_dir / "state").rglob("*"):
        if f.is_file() and f.name != "commit_success.txt":
            f.write_bytes(b"\x00garbage" * 3)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    train_and_evaluate(TINY, tmp_path, stop_after=2, progress=False)
    _corrupt(tmp_path / "checkpoints" / "2")
    with pytest.raises(CheckpointError, match=r"checkpoints/2 cannot be restored.*Delete"):
        train_and_evaluate(TINY, tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="cannot be restored"):
        load_model(tmp_path)


def test_resume_with_another_config_is_refused(tmp_path):
    train_and_evaluate(TINY, tmp_path, stop_after=2, progress=False)
    with pytest.raises(ValueError, match="different run"):
        train_and_evaluate(_tiny(lr=0.5), tmp_path, progress=False)


def test_missing_dataset_is_surfaced(tmp_path):
    from markov_attn.data import DataMissingError

    cfg = _tiny(data="bench", data_root=str(tmp_path / "nowhere"))
    with pytest.raises(DataMissingError, match="apt-get install dataset-fashion-mnist"):
        train_and_evaluate(cfg, tmp_path / "run", progress=False)


def test_bench_data_smoke(tmp_path):
    """A 2-step run of the CI smoke preset on the real generator (needs the Debian package)."""
    from markov_attn.data import DataMissingError

    cfg = get_preset("smoke", steps=2, warmup_steps=0, train_size=64, test_size=32)
    try:
        summary = train_and_evaluate(cfg, tmp_path, progress=False)
    except DataMissingError:
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    assert summary["test_size"] == 32 and np.isfinite(summary["test_loss"])
    assert summary["steps"] == 2 and (tmp_path / "checkpoints" / "2").is_dir()
    assert [r[0] for r in _losses(tmp_path)] == [2, 2]  # log_every=2, then the test line


def test_easier_level_is_also_scored_on_the_benchmark(tmp_path):
    """A run on another generator level trains and tests on it, and reports the standard test
    split (the benchmark) as well; the level is part of the run's identity."""
    from experiments.train import load_data
    from markov_attn.data import DataMissingError

    cfg = get_preset(
        "smoke", steps=2, warmup_steps=0, train_size=64, test_size=32, difficulty="plain"
    )
    try:
        data = load_data(cfg)
    except DataMissingError:
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    assert set(data) == {"train", "test", "test_standard"}
    np.testing.assert_array_equal(data["test"]["labels"], data["test_standard"]["labels"])
    assert not np.array_equal(data["test"]["images"], data["test_standard"]["images"])
    summary = train_and_evaluate(cfg, tmp_path, data=data, progress=False)
    assert {"test_acc_standard", "test_loss_standard"} <= set(summary)
    assert summary["config"]["difficulty"] == "plain"
    with pytest.raises(ValueError, match="difficulty"):
        train_and_evaluate(dataclasses.replace(cfg, difficulty="clutter"), tmp_path)
    with pytest.raises(ValueError, match="difficulty must be one of"):
        get_preset("smoke", difficulty="easy")


def test_batches_are_a_function_of_seed_and_step():
    a = [batch_indices(s, n=50, batch_size=16, seed=0) for s in range(6)]
    b = [batch_indices(s, n=50, batch_size=16, seed=0) for s in range(6)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    epoch0 = np.concatenate(a[:3])
    assert len(np.unique(epoch0)) == 48  # no repeats inside an epoch
    assert not np.array_equal(a[0], a[3])  # a new permutation per epoch
    assert not np.array_equal(a[0], batch_indices(0, n=50, batch_size=16, seed=1))


def test_presets_and_overrides():
    for name in PRESETS:
        cfg = get_preset(name)
        assert cfg.name == name and cfg.ckpt_every % cfg.log_every == 0
    cfg = get_preset("cpu", pool="tokenrank", seed=3)
    assert cfg.model.pool == "tokenrank" and cfg.seed == 3
    assert cfg.model.image_size == 32 and cfg.model.width == 96 and cfg.model.depth == 2
    assert cfg.difficulty == "standard" and get_preset("cpu64").difficulty == "standard"
    assert cfg.train_size >= cfg.steps * cfg.batch_size  # each training image seen once
    assert cfg.model.patch_norm  # without it the cpu budget stays at chance
    # compare is the cpu recipe with fewer steps, still one pass over fresh images
    small = get_preset("compare")
    assert small.model == get_preset("cpu").model and small.lr == cfg.lr
    assert small.steps < cfg.steps and small.train_size >= small.steps * small.batch_size
    long = get_preset("cpu_long")  # the longer CPU run: same family, wider, fresh images
    assert long.model.conv_stem == cfg.model.conv_stem and long.model.width > cfg.model.width
    assert long.model.depth == cfg.model.depth and long.lr == cfg.lr
    assert long.steps > cfg.steps and long.train_size >= long.steps * long.batch_size
    from experiments.train import config_from_args

    args = ["--workdir", "w", "--pool", "cls", "--no-patch-norm"]
    assert not config_from_args(args).model.patch_norm
    assert config_from_args(["--workdir", "w"]).model.patch_norm
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("tpu")
    with pytest.raises(ValueError, match="unknown config field"):
        get_preset("cpu", colour="red")
    with pytest.raises(ValueError, match="multiple of log_every"):
        _tiny(ckpt_every=3, log_every=2)


def test_compare_heads_table_and_readme(tmp_path, finished_run):
    from experiments.compare_heads import END, START, aggregate, run_all, table, update_readme

    base = dataclasses.replace(TINY, model=dataclasses.replace(TINY.model, pool="mean"))
    summaries = run_all(base, pools=("tokenrank",), seeds=(0,), out=tmp_path, progress=False)
    assert summaries[0]["test_acc"] == finished_run[1]["test_acc"]  # same config as TINY
    fake = [
        {"pool": p, "seed": s, "test_acc": a, "images_per_s": 100.0 / t, "step_time_ms": t}
        for p, s, a, t in [("cls", 0, 0.5, 10.0), ("cls", 1, 0.7, 10.0),
                           ("tokenrank", 0, 0.6, 12.0), ("tokenrank", 1, 0.6, 13.0)]
    ]  # fmt: skip
    rows = aggregate(fake)
    assert rows[0]["test_acc"] == pytest.approx(0.6)
    assert rows[0]["test_acc_sd"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert rows[1]["overhead_vs_cls_pct"] == pytest.approx(25.0)
    # paired by seed: tokenrank - cls = +0.1 (seed 0) and -0.1 (seed 1)
    diff = rows[1]["vs_cls"]
    assert diff["mean"] == pytest.approx(0.0) and diff["pairs"] == 2
    # a t interval over the 2 pairs: 0 ± t(0.975, 1) · sd / √2 = ± 12.706 · 0.1414 / 1.414
    assert diff["ci"] == pytest.approx((-1.2706, 1.2706), abs=1e-4)
    assert rows[0]["vs_cls"] is None and rows[1]["vs_mean"] is None  # no mean-pooling runs
    meta = {"preset": "x", "budget": "b", "seeds": [0, 1], "device": "cpu", "command": "c"}
    md = table(rows, meta=meta)
    assert "| tokenrank | 0.600 ± 0.000 | +0.000 [-1.271, +1.271] (2) | — |" in md
    assert "+25.0 %" in md
    readme = tmp_path / "README.md"
    readme.write_text(f"# T\n\nbefore\n{START}\nold table\n{END}\nafter\n")
    update_readme(readme, md)
    text = readme.read_text()
    assert "old table" not in text and md in text
    assert text.startswith("# T\n\nbefore\n") and text.endswith(f"{END}\nafter\n")
    update_readme(readme, md)
    assert readme.read_text() == text  # idempotent
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        update_readme(readme, md)


def test_compare_heads_t_interval_and_retabulate(tmp_path, capsys):
    from scipy import stats

    from experiments.compare_heads import aggregate, main, t_interval

    d = np.random.default_rng(0).normal(0.02, 0.03, 5)
    want = stats.t.interval(0.95, 4, loc=d.mean(), scale=stats.sem(d))
    assert t_interval(d) == pytest.approx(want)
    with pytest.raises(ValueError, match="at least 2"):
        t_interval([0.1])
    # its coverage over many draws of 5 normal values is the nominal 95 %
    rng = np.random.default_rng(1)
    hits = [lo <= 0 <= hi for lo, hi in (t_interval(rng.normal(0, 1, 5)) for _ in range(2000))]
    assert 0.93 < np.mean(hits) < 0.97
    runs = [
        {"pool": p, "seed": s, "test_acc": a, "images_per_s": 1.0, "step_time_ms": 1.0}
        for p, s, a in [("cls", 0, 0.5), ("cls", 1, 0.7), ("mean", 0, 0.4), ("mean", 1, 0.8)]
    ]
    meta = {"preset": "x", "budget": "b", "seeds": [0, 1], "device": "cpu", "command": "orig"}
    stale = {"meta": meta, "heads": [{"stale": True}], "runs": runs}
    (tmp_path / "results.json").write_text(json.dumps(stale))
    assert main(["--out", str(tmp_path), "--retabulate"]) == 0
    out = json.loads((tmp_path / "results.json").read_text())
    assert out["heads"] == json.loads(json.dumps(aggregate(runs))) and out["runs"] == runs
    md = (tmp_path / "results.md").read_text()
    assert "Command: `orig`" in md and "[-" in md
    assert main(["--out", str(tmp_path / "none"), "--retabulate"]) == 1


def test_compare_heads_interleaved_timing_and_finished_runs_only(tmp_path, capsys):
    from experiments.compare_heads import interleaved_step_times, run_all, table

    timing = interleaved_step_times(TINY, pools=("cls", "tokenrank"), rounds=3)
    assert timing["rounds"] == 3 and set(timing["ms"]) == {"cls", "tokenrank"}
    lo, hi = timing["vs_cls_range"]["tokenrank"]
    assert 0 < lo <= timing["vs_cls"]["tokenrank"] <= hi
    meta = {"preset": "x", "budget": "b", "seeds": [0], "device": "cpu", "command": "c",
            "interleaved": timing}  # fmt: skip
    row = {"pool": "cls", "test_acc": 0.5, "test_acc_sd": 0.0, "images_per_s": 1.0,
           "images_per_s_sd": 0.0, "step_time_ms": 1.0, "step_time_ms_sd": 0.0,
           "overhead_vs_cls_pct": None}  # fmt: skip
    tr = {**row, "pool": "tokenrank"}
    md = table([row, tr], meta=meta)
    assert "overhead vs CLS (interleaved) |" in md and "3 rounds after compilation" in md
    v, (lo, hi) = timing["vs_cls"]["tokenrank"], timing["vs_cls_range"]["tokenrank"]
    assert f"| {100 * (v - 1):+.1f} % [{100 * (lo - 1):+.1f}, {100 * (hi - 1):+.1f}] |" in md
    # train=False tabulates finished runs only and trains nothing
    assert run_all(TINY, pools=("cls",), seeds=(0,), out=tmp_path, train=False) == []
    assert "not finished, left out" in capsys.readouterr().err
    assert not (tmp_path / "cls_s0").exists()


def test_compare_heads_per_seed_table_and_leaving_chance(tmp_path, capsys):
    import json

    from experiments.compare_heads import aggregate, left_chance_at, table

    lines = [{"step": 20, "loss": 2.3}, {"step": 180, "split": "test", "test_acc": 0.149},
             {"step": 360, "split": "test", "test_acc": 0.151},
             {"step": 540, "split": "test", "test_acc": 0.40}]  # fmt: skip
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert left_chance_at(path, 10) == 360  # the first evaluation at chance + 5 points or more
    assert left_chance_at(path, 2) is None  # 0.40 < 0.55: never left chance
    assert left_chance_at(tmp_path / "missing.jsonl", 10) is None
    fake = [
        {"pool": p, "seed": s, "test_acc": a, "images_per_s": 1.0, "step_time_ms": 1.0,
         "left_chance_at": at}
        for p, s, a, at in [("cls", 0, 0.5, 180), ("cls", 1, 0.1, None),
                            ("mean", 0, 0.3, 540), ("mean", 1, 0.35, 360)]
    ]  # fmt: skip
    rows = aggregate(fake)
    meta = {"preset": "x", "budget": "b", "seeds": [0, 1], "device": "cpu", "command": "c"}
    md = table(rows, meta=meta, per_seed=True)
    assert "| cls | 0.500 (180) | 0.100 (never) |" in md
    assert "| mean | 0.300 (540) | 0.350 (360) |" in md
    assert "left chance at the first evaluation" in md
    assert "(never)" not in table(rows, meta=meta)  # off by default
    # rows read back from results.json have string seeds
    back = json.loads(json.dumps(rows))
    assert "| cls | 0.500 (180) | 0.100 (never) |" in table(back, meta=meta, per_seed=True)
    # a diverged run has no accuracy: left out of means and pairs, and said so
    div = {"pool": "mean", "seed": 2, "steps": 1, "test_acc": None, "diverged_at": 540,
           "images_per_s": None, "step_time_ms": None}  # fmt: skip
    cls2 = {**fake[0], "seed": 2, "test_acc": 0.9}
    rows = aggregate([*fake, cls2, div])
    mean = next(r for r in rows if r["pool"] == "mean")
    assert mean["test_acc"] == pytest.approx(0.325) and mean["vs_cls"]["pairs"] == 2
    meta["seeds"] = [0, 1, 2]
    md = table(rows, meta=meta, per_seed=True)
    assert "| mean | 0.325 ± 0.035 (2 of 3 runs; 1 diverged) |" in md
    assert "diverged (NaN loss by step 540) |" in md and "has no accuracy" in md
    # run_all counts a run that diverged earlier without training it again
    from experiments.compare_heads import run_all
    from experiments.configs import override
    from markov_attn.nn import config_to_dict

    def stored(pool, seed, cfg=TINY):
        return config_to_dict(override(cfg, pool=pool, seed=seed))

    (tmp_path / "cls_s0").mkdir()
    earlier = {**div, "pool": "cls", "seed": 0, "steps": TINY.steps, "config": stored("cls", 0)}
    (tmp_path / "cls_s0" / "diverged.json").write_text(json.dumps(earlier))
    got = run_all(TINY, pools=("cls",), seeds=(0,), out=tmp_path, train=False)
    assert got[0]["diverged_at"] == 540 and got[0]["test_acc"] is None
    # a run that trained on through a NaN loss (older code) has its accuracy discounted
    from experiments.compare_heads import first_nonfinite_loss

    run = tmp_path / "mean_s0"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({**fake[2], "steps": TINY.steps,
                                                  "config": stored("mean", 0)}))  # fmt: skip
    (run / "metrics.jsonl").write_text('{"step": 20, "loss": 2.3}\n{"step": 40, "loss": NaN}\n')
    assert first_nonfinite_loss(run / "metrics.jsonl") == 40
    assert first_nonfinite_loss(path) is None
    got = run_all(TINY, pools=("mean",), seeds=(0,), out=tmp_path, train=False)
    assert got[0]["diverged_at"] == 40 and got[0]["test_acc"] is None
    # a finished run of another configuration with the same steps is not reused (it was: its
    # numbers went into the table under this preset's name); evaluation cadence does not count
    wider = stored("mean", 0, override(TINY, width=TINY.model.width * 2))
    (run / "summary.json").write_text(json.dumps({**fake[2], "config": wider}))
    assert run_all(TINY, pools=("mean",), seeds=(0,), out=tmp_path, train=False) == []
    assert "another configuration, not reused" in capsys.readouterr().err
    cadence = stored("mean", 0, override(TINY, eval_every=0, eval_batch_size=7))
    (run / "summary.json").write_text(json.dumps({**fake[2], "config": cadence}))
    assert len(run_all(TINY, pools=("mean",), seeds=(0,), out=tmp_path, train=False)) == 1


def test_conv_stem_run_checkpoints_its_batch_statistics(tmp_path):
    model = dataclasses.replace(TINY.model, conv_stem=(4,))
    cfg = _tiny(model=model, eval_every=2, steps=4)
    summary = train_and_evaluate(cfg, tmp_path, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    tests = [r for r in lines if r.get("split") == "test"]
    assert [r["step"] for r in tests] == [2, 4] and tests[-1]["final"]  # periodic + final eval
    assert summary["test_acc"] == tests[-1]["test_acc"]
    loaded, stored = load_model(tmp_path)
    assert stored == cfg and loaded.stem.norms[0].use_running_average  # inference mode
    mean = np.asarray(loaded.stem.norms[0].mean[...])
    assert np.abs(mean).max() > 0  # the running statistics were trained and restored
    data = synthetic_data(40, size=16, split="test")
    logits = loaded(data["images"].astype(np.float32) / 255.0)[0]
    acc = float(np.mean(np.argmax(np.asarray(logits), -1) == data["labels"]))
    assert acc == pytest.approx(summary["test_acc"], abs=1e-6)
    # a killed run resumes its batch statistics too
    other = tmp_path / "resumed"
    train_and_evaluate(cfg, other, stop_after=3, progress=False)
    again = train_and_evaluate(cfg, other, progress=False)
    assert again["resumed_from"] == 2 and again["test_acc"] == summary["test_acc"]
    np.testing.assert_array_equal(load_model(other)[0].stem.norms[0].mean[...], mean)


def test_random_shift_translates_each_image():
    from experiments.train import _random_shift

    images = jax.random.uniform(jax.random.key(0), (6, 12, 12, 3))
    out = np.asarray(_random_shift(jax.random.key(1), images, 2))
    assert out.shape == images.shape
    padded = np.pad(np.asarray(images), ((0, 0), (2, 2), (2, 2), (0, 0)), mode="edge")
    moved = 0
    for i in range(6):  # each output is one crop of its edge-padded input
        crops = [(a, b) for a in range(5) for b in range(5)
                 if np.array_equal(padded[i, a : a + 12, b : b + 12], out[i])]  # fmt: skip
        assert crops
        moved += crops[0] != (2, 2)
    assert moved > 0
    np.testing.assert_array_equal(_random_shift(jax.random.key(1), images, 2), out)


def test_label_smoothing_and_shift_change_the_trajectory(finished_run, tmp_path):
    # one run with both (each compile costs seconds); the shift itself is tested above
    # same schedule and batches as the plain run; its first two steps are enough
    train_and_evaluate(_tiny(label_smoothing=0.2, shift=2), tmp_path, stop_after=2, progress=False)
    plain = next(r for r in _losses(finished_run[0]) if r[0] == 2)
    assert next(r for r in _losses(tmp_path) if r[0] == 2)[1] != plain[1]


def test_label_smoothing_loss_matches_its_formula():
    from experiments.train import training_loss

    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(5, 4)), rng.integers(0, 4, 5)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    for eps in (0.0, 0.1, 0.5):
        targets = (1 - eps) * np.eye(4)[labels] + eps / 4
        want = -(targets * logp).sum(-1).mean()
        got = training_loss(np.float32(logits), labels, label_smoothing=eps)
        assert float(got) == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="eval_every"):
        _tiny(eval_every=3, log_every=2, ckpt_every=2)


def test_learning_curve_figure(finished_run, tmp_path):
    from experiments.curves import plot_learning_curve, read_metrics

    workdir, summary = finished_run
    train, test = read_metrics(workdir)
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert [r["test_acc"] for r in test] == [summary["test_acc"]]
    path = plot_learning_curve(workdir, path=tmp_path / "curve.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_readme_blocks_and_ablation_table(tmp_path):
    from experiments.ablation import table
    from experiments.readme import replace_block

    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- x:start -->\nold\n<!-- x:end -->\nb\n")
    replace_block(readme, "x", "new\n")
    assert readme.read_text() == "a\n<!-- x:start -->\nnew\n<!-- x:end -->\nb\n"
    with pytest.raises(ValueError, match="y:start"):
        replace_block(readme, "y", "z")
    row = {"variant": "v", "overrides": {"lr": 0.003}, "steps": 10, "batch_size": 8,
           "train_size": 80, "test_size": 40, "test_acc": 0.25, "train_acc": 0.5,
           "step_time_ms": 12.3, "load_at_start": 1.0, "wall_time_s": 9.0}  # fmt: skip
    md = table([row])
    assert "| v | lr=0.003 | 10 × 8 | 80 | 0.250 | 0.500 | 12 | 1.0 | 9 |" in md


def test_runs_table_reads_finished_and_stopped_runs(finished_run, tmp_path):
    from experiments.ablation import runs_table

    workdir, summary = finished_run
    stopped = tmp_path / "stopped"
    train_and_evaluate(_tiny(lr=0.02), stopped, stop_after=4, progress=False)
    md = runs_table([workdir, stopped], base="smoke")
    done_row = next(r for r in md.splitlines() if r.startswith(f"| `{workdir}`"))
    assert f"**{summary['test_acc']:.3f}**" in done_row and "data=synthetic" in done_row
    stop_row = next(r for r in md.splitlines() if r.startswith(f"| `{stopped}`"))
    assert "stopped at step 4" in stop_row and "lr=0.02" in stop_row


def test_published_command_line_drops_where_the_table_is_copied():
    from experiments.readme import command_line

    argv = ["--a", "1", "--update-readme", "R.md", "--b", "--update-readme"]
    assert command_line("experiments.x", argv) == "python -m experiments.x --a 1 --b"
    assert (
        command_line("experiments.x", ["--update-readme", "--c"]) == "python -m experiments.x --c"
    )
    assert command_line("m", ["--no-train", "--x"], drop=("--no-train",)) == "python -m m --x"


def test_bf16_weights_file_round_trips(tmp_path):
    """.npz has no bfloat16: such parameters were written as raw bytes that did not load."""
    import jax.numpy as jnp
    from flax import nnx

    from markov_attn.nn import ViT, ViTConfig, config_to_dict, load_run, write_weights

    cfg = ViTConfig(image_size=16, patch_size=4, width=16, depth=1, num_heads=2, mlp_dim=32,
                    num_classes=3, param_dtype=jnp.bfloat16)  # fmt: skip
    model = ViT(cfg, rngs=nnx.Rngs(0))
    path = write_weights(model, {"model": config_to_dict(cfg)}, tmp_path / "w.npz")
    again, _ = load_run(path)
    leaves = _leaves(model)
    assert len(leaves) > 5 and any(x.dtype == jnp.bfloat16 for x in leaves)
    for a, b in zip(_leaves(again), leaves, strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_evaluating_a_finished_run_again_keeps_its_timing(tmp_path):
    """A second `make demo` only evaluates the finished run: its summary lost the training
    timing (step time None, train time ~0), which broke the ablation table."""
    first = train_and_evaluate(TINY, tmp_path, progress=False)
    again = train_and_evaluate(TINY, tmp_path, progress=False)
    for key in ("step_time_ms", "images_per_s", "train_time_s", "timed_steps"):
        assert again[key] == first[key], key
    assert again["resumed_from"] == TINY.steps  # this session started at the end
    assert again["test_acc"] == first["test_acc"]
    assert json.loads((tmp_path / "summary.json").read_text())["step_time_ms"] is not None


def test_cli_warmup_and_steps_overrides():
    from experiments.train import config_from_args, main

    base = ["--preset", "cpu", "--workdir", "w", "--steps", "1000"]
    assert config_from_args(base).warmup_steps == min(get_preset("cpu").warmup_steps, 100)
    # an explicit --set warmup_steps= is not replaced by the derived warm-up
    assert config_from_args([*base, "--set", "warmup_steps=200"]).warmup_steps == 200
    # --set steps= also keeps the warm-up inside the run
    cfg = config_from_args(["--preset", "cpu", "--workdir", "w", "--set", "steps=50"])
    assert cfg.steps == 50 and cfg.warmup_steps <= 5
    # a config the presets refuse is one line and exit status 2, not a traceback
    assert main(["--preset", "cpu", "--workdir", "w", "--set", "warmup_steps=99999"]) == 2


def test_set_values_are_checked_against_the_field_type():
    """--set flip=false stored the string "false" (true); 4.0 steps, '0.1x' and None went
    through to a traceback or were dropped silently."""
    from experiments.train import config_from_args, main

    base = ["--preset", "cpu", "--workdir", "unused"]
    assert config_from_args([*base, "--set", "flip=false"]).flip is False
    assert config_from_args([*base, "--set", "flip=True"]).flip is True
    cfg = config_from_args([*base, "--set", "conv_stem=[16, 32]", "--set", "lr=1"])
    assert cfg.model.conv_stem == (16, 32) and cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert config_from_args([*base, "--set", "pool=mean"]).model.pool == "mean"
    for bad, msg in [("steps=4.0", "an integer"), ("label_smoothing=0.1x", "a number"),
                     ("conv_stem=None", "cannot be None"), ("flip=1", "True or False"),
                     ("nope=1", "unknown config field")]:  # fmt: skip
        with pytest.raises(ValueError, match=msg):
            config_from_args([*base, "--set", bad])
    assert config_from_args([*base, "--set", "dtype=None"]).model.dtype is None  # its default
    assert main([*base, "--set", "steps=4.0"]) == 2  # one line, no traceback, no run directory
    assert not pathlib.Path("unused").exists()


def test_configs_refuse_settings_that_fail_later():
    from experiments import dit_configs

    with pytest.raises(ValueError, match=r"warmup_steps \(4\) must lie in \[0, steps=4\)"):
        _tiny(steps=4, warmup_steps=4)  # optax's cosine has no decay step left
    for field in ("keep_checkpoints", "eval_batch_size", "test_size"):
        with pytest.raises(ValueError, match="must be >= 1"):
            _tiny(**{field: 0})
    with pytest.raises(ValueError, match="warmup_steps"):
        dit_configs.get_preset("smoke", steps=4, warmup_steps=4)


def test_train_dit_cli_errors_in_one_line_and_load_dit_creates_nothing(tmp_path, capsys):
    from experiments.train_dit import load_dit, main

    assert main(["--preset", "smoke", "--data", "synthetic", "--steps", "0",
                 "--workdir", str(tmp_path / "dit0")]) == 2  # fmt: skip
    assert capsys.readouterr().err.startswith("error: ")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_dit(tmp_path / "typo")
    assert not (tmp_path / "typo").exists()


def test_ablation_keys_the_base_and_checks_the_block_first(tmp_path, monkeypatch):
    from experiments import ablation

    seen = []

    def fake_train(cfg, workdir, **kw):
        seen.append(cfg.name)
        workdir.mkdir(parents=True)
        from markov_attn.nn import config_to_dict

        s = {"test_size": cfg.test_size, "test_acc": 0.5, "train_acc": 0.5, "step_time_ms": 1.0,
             "params": 1, "config": config_to_dict(cfg)}  # fmt: skip
        (workdir / "summary.json").write_text(json.dumps(s))
        return s

    monkeypatch.setattr(ablation, "train_and_evaluate", fake_train)
    monkeypatch.setattr(ablation, "load_data", lambda cfg: None)
    ablation.run_variants(["old"], base="cpu", steps=24, out=tmp_path, progress=False)
    ablation.run_variants(["old"], base="cpu64", steps=24, out=tmp_path, progress=False)
    assert len(seen) == 2  # the cpu64 row was the cpu run's before
    readme = tmp_path / "R.md"
    readme.write_text("no blocks\n")
    with pytest.raises(SystemExit):  # before any training
        ablation.main(["--steps", "4", "--out", str(tmp_path / "x"), "--update-readme",
                       str(readme), "--block", "demo-ablation"])  # fmt: skip
    assert len(seen) == 2


def test_runs_saved_before_pos_size_are_still_the_same_run():
    """ViTConfig.pos_size (new) made every stored model config differ from its own run's: no
    finished run was reused by compare_heads/ablation and none could resume."""
    from experiments._loop import VIT_ASSUMED, check_same_run, same_config
    from markov_attn.nn import config_to_dict

    stored = config_to_dict(TINY)
    del stored["model"]["pos_size"]  # as written before the field existed
    assert same_config(stored, TINY)
    assert not same_config(stored, _tiny(lr=TINY.lr * 2))
    check_same_run(stored, config_to_dict(TINY), "run", assumed=VIT_ASSUMED)  # resume: no error
    with pytest.raises(ValueError, match="different run"):
        check_same_run(stored, config_to_dict(TINY), "run", assumed={"difficulty": "standard"})
