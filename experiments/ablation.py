"""What each change of the ``make demo`` recipe buys: short runs of named variants.

Each variant is a set of overrides of a base preset (``cpu`` by default), trained for the same
(short) budget with the TokenRank head into ``<out>/<variant>_<steps>``; finished runs are
skipped on a rerun. The results (test accuracy, train accuracy over the last logged window,
steady-state step time, wall time) go to ``<out>/results.json`` (every run ever made there,
keyed by variant and budget) and ``<out>/results.md``::

    python -m experiments.ablation --steps 240 --variants old stem stem_shift
    python -m experiments.ablation --steps 240 --variants old stem --update-readme

Step times depend on the machine's load; the table says what the load was at the start of each
run (``os.getloadavg``, 1-minute average).

``--runs DIR ...`` trains nothing: it tabulates finished (or stopped) run directories of
``experiments.train`` against the base preset, each row's change read from its stored config,
with the test accuracy at every evaluation (the README's ``demo-ablation`` block)::

    python -m experiments.ablation --runs runs/demo runs/trials/plain --update-readme
"""

import argparse
import json
import os
import pathlib
import platform
import sys
import time

from ._loop import read_metrics, same_config
from .configs import PRESETS, get_preset
from .readme import check_block, publish
from .train import load_data, train_and_evaluate

STEM = (32, 64, 128)
VARIANTS = {
    "old": {},
    "stem": {"conv_stem": STEM},
    "stem_nopn": {"conv_stem": STEM, "patch_norm": False},
    "stem_shift": {"conv_stem": STEM, "shift": 4},
    "stem64": {"conv_stem": (32, 64), "patch_size": 8},
    "stem_ls": {"conv_stem": STEM, "label_smoothing": 0.1},
    "stem_lr2": {"conv_stem": STEM, "lr": 2e-3},
    "stem_lr3": {"conv_stem": STEM, "lr": 3e-3},
    "lr3e-4": {"lr": 3e-4},
    "stem_shift_ls": {"conv_stem": STEM, "shift": 4, "label_smoothing": 0.1},
    "shift": {"shift": 4},
    "shift_ls": {"shift": 4, "label_smoothing": 0.1},
    "lr2": {"lr": 2e-3},
    "deep": {"depth": 6, "width": 128, "mlp_dim": 512},
    "fresh": {"train_size": 92_160},
    "stem_fresh": {"conv_stem": STEM, "train_size": 92_160},
    "fresh_shift_ls": {"train_size": 92_160, "shift": 4, "label_smoothing": 0.1},
    # overrides of the new ``cpu`` preset (strided stem, 92,160 images)
    "base": {},
    "base_shift": {"shift": 4},
    "base_ls": {"label_smoothing": 0.1},
    "base_lr2": {"lr": 2e-3},
    "base_wide_stem": {"conv_stem": (48, 96, 192)},
    "base_maxpool": {"conv_stem_downsample": "maxpool"},
    "base_20k": {"train_size": 20_000},
    "base_nopn": {"patch_norm": False},
}
"""Variant name -> overrides of the base preset (training or ViT fields)."""


def describe(overrides: dict, /) -> str:
    return ", ".join(f"{k}={v}" for k, v in overrides.items()) or "(base preset)"


def run_variants(
    names,
    /,
    *,
    base: str = "cpu",
    steps: int,
    train_size: int | None = None,
    batch_size: int | None = None,
    out: str | pathlib.Path = "runs/ablation",
    progress: bool = True,
) -> list[dict]:
    """Trains each variant of ``names`` for ``steps`` steps; returns one row per variant."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    common = {"steps": steps, "warmup_steps": max(1, steps // 12), "ckpt_every": steps}
    common["log_every"] = next(k for k in (20, 10, 5, 4, 2, 1) if steps % k == 0)
    if train_size is not None:
        common["train_size"] = train_size
    if batch_size is not None:
        common["batch_size"] = batch_size
    data, rows = {}, []
    for name in names:
        cfg = get_preset(base, pool="tokenrank", **common, **VARIANTS[name])
        # the base in the key unless it is the default (keys of earlier cpu runs stay valid)
        key = ("" if base == "cpu" else f"{base}-") + f"{name}_{steps}"
        key += f"_n{train_size}" if train_size else ""
        key += f"_b{batch_size}" if batch_size else ""
        workdir = out / key
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        summary = None
        if (workdir / "summary.json").exists():
            summary = json.loads((workdir / "summary.json").read_text())
            if not same_config(summary.get("config"), cfg):
                raise ValueError(
                    f"{workdir} holds a finished run of another configuration; use another "
                    "--out or delete it"
                )
        if summary is None:
            size = (cfg.model.image_size, cfg.train_size, cfg.test_size, cfg.data_seed,
                    cfg.difficulty)  # fmt: skip
            if size not in data:  # variants with the same images share one generation
                data = {size: load_data(cfg)}
            summary = train_and_evaluate(cfg, workdir, data=data[size], progress=progress)
            results[key] = {
                "variant": name,
                "overrides": {k: list(v) if isinstance(v, tuple) else v
                              for k, v in VARIANTS[name].items()},
                "base": base,
                "steps": steps,
                "batch_size": cfg.batch_size,
                "train_size": cfg.train_size,
                "test_size": summary["test_size"],
                "test_acc": summary["test_acc"],
                "train_acc": summary["train_acc"],
                "step_time_ms": summary["step_time_ms"],
                "params": summary["params"],
                "wall_time_s": time.perf_counter() - t0,
                "load_at_start": load,
                "command": f"python -m experiments.ablation --base {base} --steps {steps}"
                + (f" --train-size {train_size}" if train_size else "")
                + (f" --batch-size {batch_size}" if batch_size else "")
                + f" --variants {name}",
            }  # fmt: skip
            results_path.write_text(json.dumps(results, indent=1) + "\n")
        rows.append(results[key])
    return rows


def table(rows: list[dict], /) -> str:
    """The Markdown ablation table of ``rows`` (as stored in ``results.json``)."""
    lines = [
        "| variant | change against the old `cpu` recipe | steps × batch | train images "
        "| test acc | train acc (last log window) | step time (ms) | load | wall (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {describe(r['overrides'])} | {r['steps']} × {r['batch_size']} "
            f"| {r['train_size']} | {r['test_acc']:.3f} | {r['train_acc']:.3f} "
            f"| {r['step_time_ms']:.0f} | {r['load_at_start']:.1f} | {r['wall_time_s']:.0f} |"
        )
    lines += [
        "",
        f"TokenRank head, test accuracy on {rows[0]['test_size']} benchmark test images "
        f"(chance 0.1); {platform.machine()}, {os.cpu_count()} CPUs shared with other jobs "
        "(load = 1-minute load average when the run started). Rows from "
        "`python -m experiments.ablation` (each row's command is in `runs/ablation/results.json`).",
    ]
    return "\n".join(lines) + "\n"


def _run_record(workdir: pathlib.Path) -> dict:
    """The stored config, the test lines and (if finished) the summary of one run directory."""
    from .ckpt import Checkpointer

    lines = [rec for _, rec in read_metrics(workdir / "metrics.jsonl")]
    summary_path = workdir / "summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        config = summary["config"]
    else:  # stopped: the config of its last checkpoint
        summary = None
        ckpt = Checkpointer(workdir / "checkpoints")
        config = ckpt.read_meta(step=ckpt.latest_step())["config"]
        ckpt.close()
    return {"config": config, "lines": lines, "summary": summary}


#: README block of a ``--runs`` table (``--block`` names another).
RUNS_BLOCK = "demo-ablation"


def _changes(config: dict, base: dict) -> dict:
    out = {}
    for k, v in config.items():
        if k == "model":
            out |= {m: w for m, w in v.items() if base["model"].get(m) != w}
        elif k not in ("name", "ckpt_every", "eval_every", "log_every") and base.get(k) != v:
            out[k] = v
    return out


def runs_table(workdirs, /, *, base: str = "cpu", block: str = RUNS_BLOCK) -> str:
    """The Markdown table of finished or stopped training runs against preset ``base`` (its
    caption's command names the README ``block`` it is written to)."""
    from markov_attn.nn import config_to_dict

    base_cfg = config_to_dict(get_preset(base, pool="tokenrank"))
    lines = [
        f"| run | change against the `{base}` preset | steps × batch | train images | level "
        "| test acc at each evaluation (that level) | final test acc | standard-level test acc "
        "| step time (ms) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for workdir in map(pathlib.Path, workdirs):
        rec = _run_record(workdir)
        cfg, s = rec["config"], rec["summary"]
        tests = [r for r in rec["lines"] if r.get("split") == "test"]
        curve = ", ".join(f"{r['test_acc']:.3f}" for r in tests)
        change = ", ".join(f"{k}={v}" for k, v in _changes(cfg, base_cfg).items()) or "(preset)"
        level = cfg.get("difficulty", "standard")
        if s is None:
            done = max(r["step"] for r in rec["lines"])
            final = f"stopped at step {done}"
            std, step_ms = "—", "—"
        else:
            final = f"**{s['test_acc']:.3f}**"
            std = f"{s.get('test_acc_standard', s['test_acc']):.3f}"
            step_ms = "—" if s.get("step_time_ms") is None else f"{s['step_time_ms']:.0f}"
        lines.append(
            f"| `{workdir}` | {change} | {cfg['steps']} × {cfg['batch_size']} "
            f"| {cfg['train_size']} | {level} | {curve} | {final} | {std} | {step_ms} |"
        )
    sizes = sorted({_run_record(pathlib.Path(w))["config"].get("test_size") for w in workdirs})
    lines += [
        "",
        f"Test accuracy on the runs' {' or '.join(f'{n:,}' for n in sizes)} test images "
        "(chance 0.1) at the run's own "
        "level and, for runs on another level, on the same images at the standard level (the "
        f"benchmark). {platform.machine()}, {os.cpu_count()} CPUs, step times with the cores "
        "shared between runs (not comparable across rows). Table: `python -m "
        "experiments.ablation --runs "
        + " ".join(map(str, workdirs))
        + ("" if base == "cpu" else f" --base {base}")
        + ("" if block == RUNS_BLOCK else f" --block {block}")
        + "`.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.ablation", description=__doc__)
    p.add_argument("--base", default="cpu", choices=sorted(PRESETS))
    p.add_argument("--steps", type=int, help="steps of every variant (required unless --all)")
    p.add_argument("--train-size", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=sorted(VARIANTS))
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--all", action="store_true", help="train nothing; tabulate every run in <out>")
    p.add_argument("--runs", nargs="+", metavar="DIR", help="train nothing; tabulate these runs")
    p.add_argument("--update-readme", nargs="?", const="README.md", metavar="README")
    p.add_argument(
        "--block",
        help=f"README block to write (--runs: {RUNS_BLOCK} by default; the variants table has "
        "no block in the README: name one)",
    )
    a = p.parse_args(argv)
    if a.runs and a.block is None:
        a.block = RUNS_BLOCK
    if a.update_readme:
        if a.block is None:
            p.error("--update-readme needs --block NAME for the variants table")
        try:
            check_block(a.update_readme, a.block)  # before any training
        except ValueError as e:
            p.error(str(e))
    if a.runs:
        md = runs_table(a.runs, base=a.base, block=a.block)
        publish(md, a.update_readme, a.block)
        return 0
    if a.all:
        stored = json.loads((pathlib.Path(a.out) / "results.json").read_text()).values()
        rows = sorted(stored, key=lambda r: (r["steps"] * r["batch_size"], r["batch_size"]))
    elif a.steps is None:
        p.error("--steps is required (or --all to tabulate the stored runs)")
    else:
        rows = run_variants(
            a.variants, base=a.base, steps=a.steps, train_size=a.train_size,
            batch_size=a.batch_size, out=a.out, progress=not a.no_progress,
        )  # fmt: skip
    md = table(rows)
    (pathlib.Path(a.out) / "results.md").write_text(md)
    publish(md, a.update_readme, a.block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
