"""Tests for experiments._loop, the training-run machinery shared by train.py and train_dit.py:
the windowed log's timing, the resume check, truncation on resume, and a whole run on a
stand-in step (no model, no compilation)."""

import dataclasses
import json

import numpy as np
import pytest

from experiments._loop import (
    MetricsLog,
    TrainingDiverged,
    TrainingRun,
    check_same_run,
    sigkill_at,
    truncate_metrics,
)


class _Clock:
    """A clock that moves only when told to."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _log(tmp_path, clock, *, start=0, steps=6):
    return MetricsLog(
        tmp_path / "metrics.jsonl",
        start=start,
        steps=steps,
        log_every=2,
        batch_size=4,
        summarise=lambda window: {"loss": float(np.mean([w["loss"] for w in window]))},
        position=lambda step: {"epoch": step // 3},
        clock=clock,
    )


def test_window_timing_leaves_out_checkpoints_and_the_first_window(tmp_path):
    clock = _Clock()
    log = _log(tmp_path, clock)
    clock.now += 50.0  # compilation, inside the first window
    for done in range(1, 7):
        clock.now += 1.0  # one second per step
        line = log.step(done, {"loss": float(done)})
        assert (line is None) == (done % 2 == 1)
        with log.untimed():  # a checkpoint of 100 s after every step
            clock.now += 100.0
    log.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [list(r) for r in lines] == [
        ["step", "epoch", "loss", "step_time_ms", "img_per_s", "elapsed_s"]
    ] * 3
    assert [(r["step"], r["epoch"], r["loss"]) for r in lines] == [
        (2, 0, 1.5),
        (4, 1, 3.5),
        (6, 2, 5.5),
    ]
    assert [r["step_time_ms"] for r in lines] == pytest.approx([26_000.0, 1_000.0, 1_000.0])
    assert lines[1]["img_per_s"] == pytest.approx(4.0)
    assert lines[2]["elapsed_s"] == pytest.approx(50.0 + 6.0 + 500.0)  # wall time since start
    # the steady state: the windows after the first (steps 3-6), without the checkpoints
    assert log.step_time(fallback_steps=6, fallback_s=999.0) == (4, pytest.approx(1.0))


def test_a_session_with_a_single_window_falls_back_to_its_whole_time(tmp_path):
    clock = _Clock()
    log = _log(tmp_path, clock, start=4)  # resumed at step 4: one window (5-6) to the end
    for done in (5, 6):
        clock.now += 3.0
        log.step(done, {"loss": 0.0})
    log.close()
    assert log.step_time(fallback_steps=2, fallback_s=6.0) == (2, pytest.approx(3.0))
    steps, seconds = log.step_time(fallback_steps=0, fallback_s=0.0)  # no step ran
    assert steps == 0 and np.isnan(seconds)


def test_resume_check_names_the_differing_field(tmp_path):
    stored = {"lr": 0.1, "name": "a", "seed": 0}
    check_same_run(stored, {**stored, "name": "b"}, tmp_path, free_fields=("name",))
    with pytest.raises(ValueError, match=r"different run \(lr: stored 0.1, now 0.5\)"):
        check_same_run(stored, {**stored, "lr": 0.5, "seed": 1}, tmp_path)  # first in order
    with pytest.raises(ValueError, match=r"level: stored None, now 'plain'"):
        check_same_run(stored, {**stored, "level": "plain"}, tmp_path)
    # a field older runs did not store: compared with its assumed value
    check_same_run(stored, {**stored, "level": "std"}, tmp_path, assumed={"level": "std"})
    with pytest.raises(ValueError, match=r"level: stored 'std', now 'plain'"):
        check_same_run(stored, {**stored, "level": "plain"}, tmp_path, assumed={"level": "std"})
    # a nested field (a model option added later): the old run's model dict lacks it
    old = {**stored, "model": {"width": 8}}
    assumed = {"model": {"label_adaln": True}}
    new = {**stored, "model": {"width": 8, "label_adaln": True}}
    with pytest.raises(ValueError, match="model: stored"):
        check_same_run(old, new, tmp_path)  # without the assumption: a different run
    check_same_run(old, new, tmp_path, assumed=assumed)
    with pytest.raises(ValueError, match="model: stored"):
        off = {**stored, "model": {"width": 8, "label_adaln": False}}
        check_same_run(old, off, tmp_path, assumed=assumed)


def test_truncate_metrics_drops_later_and_final_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    truncate_metrics(path, 3)  # no file yet: nothing to do
    assert not path.exists()
    records = [{"step": 2, "loss": 1.0}, {"step": 2, "split": "test"}, {"step": 4, "loss": 0.5},
               {"step": 3, "final": True}]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "\n")
    truncate_metrics(path, 3)
    assert [json.loads(x) for x in path.read_text().splitlines()] == records[:2]


@dataclasses.dataclass(frozen=True)
class _Cfg:
    name: str = "toy"
    lr: float = 0.5
    steps: int = 6
    batch_size: int = 4
    log_every: int = 2
    ckpt_every: int = 2
    keep_checkpoints: int = 2


def _toy_run(workdir, cfg=_Cfg(), **kw):
    """A run whose "training" step halves a vector; evaluates every 4 steps."""
    run = TrainingRun(cfg, workdir, free_fields=("name",), **kw)
    abstract = {"w": np.zeros(3, np.float32)}
    state = {"w": np.ones(3, np.float32)} if run.latest is None else run.restore(abstract)[0]

    def step_fn(state, step):
        w = state["w"] * np.float32(cfg.lr)
        return {"w": w}, {"loss": float(w.sum()), "step": step}

    state = run.train(
        state,
        step_fn,
        summarise=lambda window: {"loss": window[-1]["loss"]},
        postfix=lambda line: {"loss": f"{line['loss']:.3f}"},
        position=lambda step: {"epoch": step // 3},
        evaluate=lambda state: {"test_loss": float(state["w"].sum())},
        eval_every=4,
    )
    return run, state


def test_a_stopped_run_resumes_on_the_same_lines(tmp_path):
    full, full_state = _toy_run(tmp_path / "full")
    assert not full.stopped_early and full.start == 0
    summary = full.summary({"x": 1}, head={"name": "toy"}, params=3, extra={"y": 2})
    assert list(summary) == [
        "name", "steps", "resumed_from", "x", "step_time_ms", "images_per_s", "y", "params",
        "train_time_s", "wall_time_s", "backend", "device", "config",
    ]  # fmt: skip
    assert summary["config"] == dataclasses.asdict(_Cfg()) and summary["resumed_from"] == 0
    assert json.loads((tmp_path / "full" / "summary.json").read_text()) == summary

    part, _ = _toy_run(tmp_path / "part", stop_after=5)
    assert part.stopped_early and part.last["step"] == 4
    resumed, state = _toy_run(tmp_path / "part", progress={"desc": "toy"})  # with a bar
    assert resumed.start == 4 and resumed.latest == 4
    np.testing.assert_array_equal(state["w"], full_state["w"])

    def lines(name):
        text = (tmp_path / name / "metrics.jsonl").read_text()
        return [{k: v for k, v in json.loads(x).items() if "time" not in k and "per_s" not in k
                 and k != "elapsed_s"} for x in text.splitlines()]  # fmt: skip

    assert (
        lines("part")
        == lines("full")
        == [
            {"step": 2, "epoch": 0, "loss": 0.75},
            {"step": 4, "epoch": 1, "loss": 0.1875},
            {"step": 4, "split": "test", "test_loss": 0.1875},
            {"step": 6, "epoch": 2, "loss": 0.046875},
        ]
    )  # the step-4 evaluation once, no evaluation at the last step
    meta = resumed.ckpt.read_meta(step=6)
    assert meta == {"step": 6, "epoch": 2, "config": dataclasses.asdict(_Cfg())}

    _toy_run(tmp_path / "part", cfg=_Cfg(name="renamed"))  # a free field may change
    with pytest.raises(ValueError, match=r"part holds a checkpoint of a different run \(lr:"):
        _toy_run(tmp_path / "part", cfg=_Cfg(lr=0.25))


def test_a_non_finite_loss_stops_the_run_before_its_checkpoint(tmp_path):
    run = TrainingRun(_Cfg(), tmp_path, free_fields=())

    def step_fn(state, step):  # the loss turns NaN at step 3 (the second log window, 3-4)
        return state, {"loss": float("nan") if step >= 2 else 1.0}

    with pytest.raises(TrainingDiverged, match=r"became nan in steps 3-4.*last checkpoint: 2") as e:
        run.train(
            {"w": np.ones(3, np.float32)},
            step_fn,
            summarise=lambda window: {"loss": float(np.mean([w["loss"] for w in window]))},
            postfix=lambda line: {},
        )
    assert (e.value.step, e.value.checkpoint) == (4, 2)
    assert isinstance(e.value, FloatingPointError)
    assert TrainingRun(_Cfg(), tmp_path, free_fields=()).latest == 2  # no step-4 checkpoint
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4] and np.isnan(lines[-1]["loss"])


def test_on_step_sees_every_step_after_its_checkpoint(tmp_path):
    seen = []

    def on_step(done, state):
        # the checkpoint of a step divisible by ckpt_every is on disk before the callback runs
        on_disk = (tmp_path / "r" / "checkpoints" / str(done)).exists()
        seen.append((done, float(state["w"][0]), on_disk))

    _toy_run(tmp_path / "r", on_step=on_step)
    cfg = _Cfg()
    assert [d for d, _, _ in seen] == list(range(1, cfg.steps + 1))
    np.testing.assert_allclose([w for _, w, _ in seen], cfg.lr ** np.arange(1, cfg.steps + 1))
    assert all(disk for d, _, disk in seen if d % cfg.ckpt_every == 0 or d == cfg.steps)
    assert sigkill_at(None) is None


def test_truncate_metrics_drops_a_torn_last_line_and_names_a_bad_one(tmp_path):
    """A crash mid-write leaves half a line at the end: the resume dropped with a bare JSON
    error that named no file."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 2, "loss": 1.0}\n{"step": 4, "loss": 0.9}\n{"step": 6, "lo')
    truncate_metrics(path, 4)
    assert path.read_text() == '{"step": 2, "loss": 1.0}\n{"step": 4, "loss": 0.9}\n'
    path.write_text('{"step": 2, "loss": 1.0}\n{"step": 4, "lo\n{"step": 6, "loss": 0.9}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not JSON"):
        truncate_metrics(path, 6)
