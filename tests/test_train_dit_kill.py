"""experiments.train_dit as a process: SIGKILL mid-run, rerun, same trajectory as a full run."""

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def _lines(workdir: pathlib.Path) -> list[dict]:
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_killed_process_resumes(tmp_path):
    """Kill the CLI after step 5 (last checkpoint 4), rerun it, and compare with an
    uninterrupted run of the same command (the processes share a compilation cache)."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }

    def cli(workdir, *extra):
        argv = ["--preset", "smoke", "--data", "synthetic", "--no-progress",
                "--workdir", str(tmp_path / workdir), *extra]  # fmt: skip
        cmd = [sys.executable, "-m", "experiments.train_dit", *argv]
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, timeout=300)

    killed = cli("run", "--kill-at-step", "5")
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    assert not (tmp_path / "run" / "summary.json").exists()
    assert [r["step"] for r in _lines(tmp_path / "run")] == [2, 4]  # step 5 not logged
    for workdir in ("run", "full"):
        done = cli(workdir)
        assert done.returncode == 0, done.stderr.decode()[-2000:]
    resumed = json.loads((tmp_path / "run" / "summary.json").read_text())
    full = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert resumed["resumed_from"] == 4 and full["resumed_from"] == 0
    timing = ("step_time_ms", "img_per_s", "elapsed_s")
    strip = lambda w: [{k: r[k] for k in r if k not in timing} for r in _lines(tmp_path / w)]
    assert strip("run") == strip("full")  # losses, gradient norms, test loss: all equal
    assert resumed["test_loss"] == full["test_loss"]
