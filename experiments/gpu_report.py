"""README tables from the runs made on a lent GPU (``experiments/gpu_session*.sh``).

The GPU sessions' results are committed, small, under ``experiments/results/gpu_h100/``
(``bench_gpu.json`` from ``experiments.bench_gpu``, ``training.json`` collected from the runs'
``summary.json``/``metrics.jsonl`` files). This command turns them into three README blocks::

    python -m experiments.gpu_report                  # print the tables
    python -m experiments.gpu_report --update-readme  # and replace the README blocks

Blocks: ``gpu-bench`` (the accelerator benchmark), ``gpu-recipe`` (the recipe sweep at the
``make demo`` budget and the longer reference runs) and ``gpu-heads`` (the pooling heads over
seeds, with paired differences against CLS and t intervals over seeds).
"""

import argparse
import json
import pathlib
import sys

import numpy as np

from .ablation import describe
from .bench_gpu import _markdown as bench_markdown
from .compare_heads import paired_difference
from .readme import replace_block

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "gpu_h100"
POOLS = ("cls", "mean", "map", "tokenrank")


def bench_table(bench: dict, /) -> str:
    return bench_markdown(bench) + (
        "\nCommand: `python -m experiments.bench_gpu --repeats 2` (inside "
        "`experiments/gpu_session.sh`), alone on the GPU. Rows: medians of 2 timed calls after "
        "one warm-up/compile call.\n"
    )


def recipe_table(training: dict, /) -> str:
    lines = [
        "| variant | change against the old `cpu` recipe (patch embedding, 20,000 images) "
        "| steps × batch | train images | test acc | train acc (last 20 steps) |",
        "|---|---|---|---|---|---|",
    ]
    rows = sorted(training["sweep"].values(), key=lambda r: r["test_acc"])
    for r in rows:
        lines.append(
            f"| {r['variant']} | {describe(r['overrides'])} | {r['steps']} × {r['batch_size']} "
            f"| {r['train_size']} | {r['test_acc']:.3f} | {r['train_acc']:.3f} |"
        )
    lines += [
        "",
        "Longer runs (`gpu` preset family: width 160, depth 6, 5 heads, patch 8, `patch_norm`, "
        "shifts ±4 px, label smoothing 0.1, 5,000 steps × 256 on 60,000 images):",
        "",
        "| run | change against the `gpu` preset | test acc every 1,000 steps | final test acc "
        "| train acc | parameters |",
        "|---|---|---|---|---|---|",
    ]
    names = {
        "stem": "conv_stem=(32, 64, 128) (the `gpu` preset now; the committed reference)",
        "gpu": "no stem (plain patch embedding)",
        "small": "no stem, width 96, depth 4, 4 heads (the `make demo` transformer until 2026-11)",
    }
    for key in ("stem", "gpu", "small"):
        r = training["references"][key]
        curve = ", ".join(f"{a:.2f}" for s, a in r["curve"] if s % 1000 == 0)
        lines.append(
            f"| {key} | {names[key]} | {curve} | **{r['test_acc']:.3f}** | "
            f"{r['train_acc']:.3f} | {r['params']:,} |"
        )
    lines += [
        "",
        f"{training['device']} ({training['software']}). Test accuracy on the benchmark's 2,000 "
        "test images (chance 0.1), TokenRank head everywhere. All runs of a table were trained "
        "at the same time as parallel processes on the one GPU (`experiments/gpu_session.sh`); "
        "their numbers are from `experiments/results/gpu_h100/training.json`.",
    ]
    return "\n".join(lines) + "\n"


def heads_table(training: dict, /) -> str:
    runs = training["heads"]
    acc = {(r["pool"], r["seed"]): r["test_acc"] for r in runs.values()}
    seeds = sorted({s for _, s in acc})
    lines = [
        "| head | seeds finished | test acc (mean ± sd) | paired difference vs CLS "
        "(mean, 95 % t interval over seeds) |",
        "|---|---|---|---|",
    ]
    for pool in POOLS:
        vals = [acc[pool, s] for s in seeds if (pool, s) in acc]
        if not vals:
            lines.append(f"| {pool} | 0 | — | — |")
            continue
        spread = f" ± {np.std(vals, ddof=1):.3f}" if len(vals) > 1 else ""
        text = f"{np.mean(vals):.3f}{spread}"
        diff = "—"
        d = paired_difference(list(runs.values()), pool, "cls")
        if d is not None and d["ci"] is not None:
            lo, hi = d["ci"]
            diff = f"{d['mean']:+.3f} [{lo:+.3f}, {hi:+.3f}] ({d['pairs']} pairs)"
        elif d is not None:
            diff = f"{d['mean']:+.3f} (1 pair: no interval)"
        lines.append(f"| {pool} | {len(vals)} of {len(seeds)} | {text} | {diff} |")
    cfg = next(iter(runs.values()))["config"]
    m = cfg["model"]
    lines += [
        "",
        f"Recipe: {m['image_size']} px, conv stem {tuple(m['conv_stem'])} with "
        f"`conv_stem_downsample={m.get('conv_stem_downsample', 'maxpool')!r}`, width "
        f"{m['width']}, depth {m['depth']}, {cfg['steps']} steps × {cfg['batch_size']} on "
        f"{cfg['train_size']:,} images; seeds {seeds}. "
        f"{training['device']}; {training['sessions']['2']}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.gpu_report", description=__doc__)
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--update-readme", nargs="?", const="README.md", metavar="README")
    a = p.parse_args(argv)
    root = pathlib.Path(a.results)
    bench = json.loads((root / "bench_gpu.json").read_text())
    training = json.loads((root / "training.json").read_text())
    blocks = {
        "gpu-bench": bench_table(bench),
        "gpu-recipe": recipe_table(training),
        "gpu-heads": heads_table(training),
    }
    for name, text in blocks.items():
        print(f"## {name}\n\n{text}")
        if a.update_readme:
            replace_block(a.update_readme, name, text)
    if a.update_readme:
        print(f"updated {a.update_readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
