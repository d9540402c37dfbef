"""The notebooks run as scripts in their reduced-size (smoke) mode, as CI executes them."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.py"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_a_percent_format_notebook(path):
    jupytext = pytest.importorskip("jupytext")
    nb = jupytext.read(path)
    kinds = [c.cell_type for c in nb.cells]
    assert kinds.count("markdown") >= 4 and kinds.count("code") >= 6


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_smoke_mode(path, tmp_path):
    env = dict(os.environ)
    env.update(
        MARKOV_ATTN_NOTEBOOK_SMOKE="1",
        MARKOV_ATTN_RUN=str(tmp_path / "no_checkpoint"),  # always the smoke preset
        MARKOV_ATTN_DIT_RUN=str(tmp_path / "no_dit_checkpoint"),  # always the smoke DiT
        MARKOV_ATTN_NOTEBOOK_OUT=str(tmp_path),
        MPLBACKEND="Agg",
        PYTHONPATH=str(ROOT),
    )
    env.setdefault("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
    # a smoke run is compile-bound (a training step, then one program per cell, each run once):
    # without LLVM's optimisations it compiles in half the time (~90 s -> ~40 s on 2 cores)
    env["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
    proc = subprocess.run(
        [sys.executable, str(path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    if path.stem == "tour":
        for name in ("bounces.png", "lambda2_heads.png", "segmentation.png"):
            assert (tmp_path / name).stat().st_size > 0, name
        assert "oracle" in proc.stdout
    if path.stem == "states_and_guidance":
        for name in ("eigenvalues.png", "states.png", "sag.png", "label_bounce.png"):
            assert (tmp_path / name).stat().st_size > 0, name
        assert "metastability" in proc.stdout and "wrong label" in proc.stdout
