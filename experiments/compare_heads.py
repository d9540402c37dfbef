"""The four pooling heads (cls, mean, map, tokenrank) at equal budget over several seeds.

Command (the default: the ``compare`` preset, seeds 0 and 1, about 2 min per run on 2 cores,
so ~16 min for the 8 runs)::

    python -m experiments.compare_heads                       # runs/compare/{results.json,.md}
    python -m experiments.compare_heads --update-readme       # also copy the table into README.md

Each run goes to ``<out>/<pool>_s<seed>`` and is resumed (or skipped when finished) on a rerun.
Seeds are the outer loop and heads the inner one, so a change in machine load hits all heads
alike. The table gives mean ± standard deviation over seeds of the test accuracy, the paired
differences against CLS and against mean pooling (same seed = same initialisation seed, data
order and augmentation; mean over seeds with a 95 % Student t interval over the seeds), the
steady-state images/s and step time, and the step-time overhead of each head over CLS.
``--difficulty`` trains and tests on another level of the generator (e.g. ``clutter``).
``--update-readme`` replaces only the text between ``<!-- heads:start -->`` and
``<!-- heads:end -->`` in the README.
"""

import argparse
import json
import math
import pathlib
import platform
import sys

import numpy as np

from markov_attn.nn import config_to_dict

from ._loop import TrainingDiverged, same_config
from .configs import PRESETS, TrainConfig, get_preset, override
from .readme import command_line, markers, replace_block
from .timing import interleaved
from .train import load_data, train_and_evaluate

POOLS = ("cls", "mean", "map", "tokenrank")
DATA_NOTES = {
    "bench": "the benchmark's classification task (Fashion-MNIST objects composited on natural "
    "photos; test = held-out objects and photos), synthetic and not comparable to any "
    "published benchmark.",
    "synthetic": "random class colours plus noise (a pipeline check, not a benchmark).",
}
START, END = markers("heads")


def run_all(
    base: TrainConfig,
    /,
    *,
    pools=POOLS,
    seeds=(0, 1),
    out: str | pathlib.Path = "runs/compare",
    data: dict | None = None,
    progress: bool = True,
    train: bool = True,
) -> list[dict]:
    """Trains every ``(seed, pool)`` of ``base`` and returns the runs' summaries; with
    ``train=False`` only the runs already finished (the others are left out, and said so)."""
    out = pathlib.Path(out)
    summaries = []
    for seed in seeds:
        for pool in pools:
            cfg = override(base, pool=pool, seed=seed)
            workdir = out / f"{pool}_s{seed}"
            done = workdir / "summary.json"
            s = None
            failed = workdir / "diverged.json"
            if failed.exists():  # diverged earlier: the same config diverges again
                s = json.loads(failed.read_text())
                if not same_config(s.get("config"), cfg):
                    s = None
                else:
                    summaries.append(s)
                    continue
            if done.exists():  # finished earlier: keep its numbers (timings included)
                s = json.loads(done.read_text())
                if not same_config(s.get("config"), cfg):
                    print(f"another configuration, not reused: {workdir}", file=sys.stderr)
                    s = None
            if s is None and not train:
                print(f"not finished, left out: {workdir}", file=sys.stderr)
                continue
            if s is None:
                try:
                    s = train_and_evaluate(cfg, workdir, data=data, progress=progress)
                except TrainingDiverged as e:  # no accuracy: a diverged run is counted as such
                    print(f"diverged: {e}", file=sys.stderr)
                    s = {
                        "pool": pool,
                        "seed": seed,
                        "steps": cfg.steps,
                        "test_acc": None,
                        "diverged_at": e.step,
                        "images_per_s": None,
                        "step_time_ms": None,
                        "config": config_to_dict(cfg),
                    }
                    failed.write_text(json.dumps(s, indent=1) + "\n")
                    summaries.append(s)
                    continue
            at = left_chance_at(workdir / "metrics.jsonl", cfg.model.num_classes)
            nan_at = first_nonfinite_loss(workdir / "metrics.jsonl")
            if nan_at is not None:  # trained on through a NaN loss (before the loop stopped it)
                s = {**s, "test_acc": None, "diverged_at": nan_at}
            summaries.append({**s, "left_chance_at": at})
    return summaries


def interleaved_step_times(base: TrainConfig, /, *, pools=POOLS, rounds: int = 8) -> dict:
    """Steady-state training-step time of each head, timed in one process in interleaved
    rounds (one step of every head per round, after one compiling step each), so that a change
    in the machine's load hits every head alike: per head the median milliseconds over rounds,
    and per head the median and range over rounds of its ratio to CLS's step of the same round.
    Random uint8 images and labels of ``base``'s shapes; nothing is written."""
    import jax.numpy as jnp

    from .train import _compiled, _normalised

    rng = np.random.default_rng(0)
    size = base.model.image_size
    x = jnp.asarray(rng.integers(0, 256, (base.batch_size, size, size, 3), dtype=np.uint8))
    y = jnp.asarray(rng.integers(0, base.model.num_classes, base.batch_size), jnp.int32)

    def one_step(pool):
        fns = _compiled(_normalised(override(base, pool=pool)))
        state, step = fns.init(), 0

        def call():
            nonlocal state, step
            *state, metrics = fns.train_step(*state, x, y, jnp.int32(step))
            step += 1
            return metrics

        return call

    t = interleaved(
        {p: one_step(p) for p in pools}, rounds=rounds, baseline="cls" if "cls" in pools else None
    )
    out = {"rounds": rounds, "ms": t["ms"]}
    if "ratio" in t:
        out["vs_cls"], out["vs_cls_range"] = t["ratio"], t["ratio_range"]
    return out


def _mean_spread(values) -> tuple[float, float]:
    v = np.asarray([x for x in values if x is not None], np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def t_interval(d, /, *, level: float = 0.95) -> tuple[float, float]:
    """Student t interval for the mean of ``d`` (at least 2 values): ``mean ± t · sd / √n``.

    Over a handful of seeds a percentile bootstrap of the mean is far too narrow (simulated
    coverage of its nominal 95 %: 84 % with 5 normal values, 51 % with 2): it resamples only
    the values it has. The t interval is exact for normal differences.
    """
    from scipy import stats

    d = np.asarray(d, np.float64)
    if d.size < 2:
        raise ValueError(f"a t interval needs at least 2 values, got {d.size}")
    half = stats.t.ppf(0.5 + level / 2, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size)
    return float(d.mean() - half), float(d.mean() + half)


def paired_difference(summaries: list[dict], pool: str, base: str, /) -> dict | None:
    """``test_acc(pool) - test_acc(base)`` over the seeds both have: mean, 95 % t interval
    over seeds (:func:`t_interval`; ``None`` with fewer than 2 pairs) and the number of
    pairs."""
    acc = {(s["pool"], s["seed"]): s["test_acc"] for s in summaries if s["test_acc"] is not None}
    seeds = sorted(seed for p, seed in acc if p == pool and (base, seed) in acc)
    if pool == base or not seeds:
        return None
    d = np.array([acc[pool, seed] - acc[base, seed] for seed in seeds])
    ci = t_interval(d) if len(d) > 1 else None
    return {"mean": float(d.mean()), "ci": ci, "pairs": len(d)}


def _fmt_diff(d: dict | None) -> str:
    if d is None:
        return "—"
    if d["ci"] is None:
        return f"{d['mean']:+.3f} (1 pair)"
    return f"{d['mean']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] ({d['pairs']})"


CHANCE_MARGIN = 0.05  # a run has left chance once its test accuracy is 5 points above it


def _first_step(metrics_path: str | pathlib.Path, match) -> int | None:
    """The step of the first line of a run's ``metrics.jsonl`` for which ``match(record)``
    holds (``None``: no such line, or no file)."""
    path = pathlib.Path(metrics_path)
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        rec = json.loads(line) if line.strip() else {}
        if match(rec):
            return int(rec["step"])
    return None


def first_nonfinite_loss(metrics_path: str | pathlib.Path, /) -> int | None:
    """The step of a run's first training log line whose loss is NaN or infinite (``None``:
    none, or no ``metrics.jsonl``). Runs from before the training loop stopped at such a loss
    trained on and were evaluated with non-finite weights; their accuracy means nothing."""
    return _first_step(metrics_path, lambda r: "loss" in r and not math.isfinite(r["loss"]))


def left_chance_at(metrics_path: str | pathlib.Path, num_classes: int, /) -> int | None:
    """The first evaluation step of a run (``metrics.jsonl``) whose test accuracy is at least
    ``1 / num_classes + CHANCE_MARGIN``, or ``None`` if no evaluation reached it (the run stayed
    on the chance plateau)."""
    level = 1.0 / num_classes + CHANCE_MARGIN
    return _first_step(
        metrics_path, lambda r: r.get("split") == "test" and r.get("test_acc", 0.0) >= level
    )


def aggregate(summaries: list[dict], /) -> list[dict]:
    """Per head: mean and standard deviation over seeds, the paired differences against CLS
    and mean pooling, and the step-time overhead over CLS."""
    pools = list(dict.fromkeys(s["pool"] for s in summaries))
    rows = []
    for pool in pools:
        runs = [s for s in summaries if s["pool"] == pool]
        acc, acc_sd = _mean_spread(s["test_acc"] for s in runs)
        ips, ips_sd = _mean_spread(s["images_per_s"] for s in runs)
        ms, ms_sd = _mean_spread(s["step_time_ms"] for s in runs)
        rows.append({
            "pool": pool, "seeds": [s["seed"] for s in runs], "test_acc": acc,
            "test_acc_sd": acc_sd, "images_per_s": ips, "images_per_s_sd": ips_sd,
            "step_time_ms": ms, "step_time_ms_sd": ms_sd,
            "vs_cls": paired_difference(summaries, pool, "cls"),
            "vs_mean": paired_difference(summaries, pool, "mean"),
            "per_seed": {s["seed"]: s["test_acc"] for s in runs},
            "left_chance_at": {s["seed"]: s.get("left_chance_at") for s in runs},
            "diverged_at": {s["seed"]: s["diverged_at"] for s in runs if s.get("diverged_at")},
        })  # fmt: skip
    cls = next((r for r in rows if r["pool"] == "cls"), None)
    for r in rows:
        r["overhead_vs_cls_pct"] = (
            100.0 * (r["step_time_ms"] / cls["step_time_ms"] - 1.0) if cls else None
        )
    return rows


def _diverged_note(row: dict) -> str:
    """`` (3 of 5 runs; 2 diverged)`` when some of the head's runs diverged, else ``""``."""
    div = row.get("diverged_at") or {}
    if not div:
        return ""
    n = len(row["per_seed"])
    return f" ({n - len(div)} of {n} runs; {len(div)} diverged)"


def table(rows: list[dict], /, *, meta: dict, per_seed: bool = False) -> str:
    """The Markdown results table with the command and the setting it came from. With
    ``meta["interleaved"]`` (:func:`interleaved_step_times`) the overhead column is that
    measurement; otherwise it compares the runs' own step times. ``per_seed`` adds a second
    table: each seed's test accuracy and the step at which the run left chance
    (:func:`left_chance_at`)."""
    timing = meta.get("interleaved") or {}
    interleaved = timing.get("vs_cls", {})
    lines = [
        f"Preset `{meta['preset']}` ({meta['budget']}), seeds {meta['seeds']}; "
        f"{meta['device']}. Mean ± standard deviation over seeds.",
        "",
        "| head | test acc | − CLS (paired; 95 % t interval; pairs) | − mean (paired) | images/s "
        f"| step time (ms) | overhead vs CLS{' (interleaved)' if interleaved else ''} |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["pool"] == "cls":
            ov = "—"
        elif interleaved:
            lo, hi = timing["vs_cls_range"][r["pool"]]
            ov = (
                f"{100 * (interleaved[r['pool']] - 1):+.1f} % "
                f"[{100 * (lo - 1):+.1f}, {100 * (hi - 1):+.1f}]"
            )
        else:
            pct = r["overhead_vs_cls_pct"]
            ov = "—" if pct is None else f"{pct:+.1f} %"
        lines.append(
            f"| {r['pool']} | {r['test_acc']:.3f} ± {r['test_acc_sd']:.3f}{_diverged_note(r)} "
            f"| {_fmt_diff(r.get('vs_cls'))} | {_fmt_diff(r.get('vs_mean'))} "
            f"| {r['images_per_s']:.1f} ± {r['images_per_s_sd']:.1f} "
            f"| {r['step_time_ms']:.0f} ± {r['step_time_ms_sd']:.0f} | {ov} |"
        )
    if per_seed:
        seeds = meta["seeds"]
        lines += [
            "",
            "| head | "
            + " | ".join(f"seed {s}: test acc (left chance at step)" for s in seeds)
            + " |",
            "|---|" + "---|" * len(seeds),
        ]
        for r in rows:
            cells = []
            for seed in seeds:
                acc = r["per_seed"].get(seed, r["per_seed"].get(str(seed)))
                at = r["left_chance_at"].get(seed, r["left_chance_at"].get(str(seed)))
                div = r.get("diverged_at", {})
                div = div.get(seed, div.get(str(seed)))
                if div is not None:
                    cells.append(f"diverged (NaN loss by step {div})")
                else:
                    left = "never" if at is None else at
                    cells.append("—" if acc is None else f"{acc:.3f} ({left})")
            lines.append(f"| {r['pool']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Command: `{meta['command']}`. Data: {meta.get('data', DATA_NOTES['bench'])} "
        "Step times and images/s are the runs' steady state (compilation and checkpoint "
        "writes excluded).",
    ]
    if per_seed:
        lines[-1] += (
            f" A run has left chance at the first evaluation with a test accuracy of at least "
            f"chance + {100 * CHANCE_MARGIN:.0f} points (never: it stayed on the plateau)."
        )
    if any(r.get("diverged_at") for r in rows):
        lines[-1] += (
            " A diverged run (its training loss became NaN; the training stops there) has no "
            "accuracy: means, spreads and paired differences are over the finished runs."
        )
    if interleaved:
        lines[-1] += (
            " The overhead column was timed separately, in one process with the heads' "
            f"training steps interleaved ({timing['rounds']} rounds after compilation; median "
            f"and range over rounds of the ratio to CLS's step, {timing['ms']['cls']:.0f} ms): "
            "the runs themselves ran at different moments of the machine's load."
        )
    return "\n".join(lines) + "\n"


def update_readme(readme: str | pathlib.Path, text: str, /, *, block: str = "heads") -> None:
    """Replaces the text between the ``block`` markers of ``readme`` (default ``heads``) with
    ``text``.

    Raises:
      ValueError: if the markers are missing or out of order (nothing is written).
    """
    replace_block(readme, block, text)


def _write(out: pathlib.Path, md: str, payload: dict, readme, block: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(payload, indent=1) + "\n")
    (out / "results.md").write_text(md)
    print(md)
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    if readme:
        update_readme(readme, md, block=block)
        print(f"updated {readme} between the {block} markers")


def _retabulate(a) -> int:
    out = pathlib.Path(a.out)
    path = out / "results.json"
    if not path.exists():
        print(f"--retabulate: no {path}", file=sys.stderr)
        return 1
    stored = json.loads(path.read_text())
    summaries = stored["runs"]
    rows = aggregate(summaries)
    md = table(rows, meta=stored["meta"], per_seed=a.per_seed)
    payload = {"meta": stored["meta"], "heads": rows, "runs": summaries}
    _write(out, md, payload, a.update_readme, a.readme_block)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.compare_heads", description=__doc__)
    p.add_argument("--preset", default="compare", choices=sorted(PRESETS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--pools", nargs="+", default=list(POOLS), choices=POOLS)
    p.add_argument(
        "--steps",
        type=int,
        help="override the preset's steps (for quick checks; the preset's training images are "
        "kept, so more steps than train_size / batch_size see images twice)",
    )
    p.add_argument("--data", choices=("bench", "synthetic"))
    p.add_argument("--difficulty", help="generator level (markov_attn.data.DIFFICULTIES)")
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--update-readme", nargs="?", const="README.md", metavar="README")
    p.add_argument(
        "--readme-block", default="heads", help="the README block to replace (default: heads)"
    )
    p.add_argument(
        "--time-rounds",
        type=int,
        default=0,
        help="also time the heads' training steps interleaved in this process, this many "
        "rounds (0: no)",
    )
    p.add_argument(
        "--no-train",
        action="store_true",
        help="tabulate the finished runs only (e.g. runs trained elsewhere); train nothing",
    )
    p.add_argument(
        "--retabulate",
        action="store_true",
        help="rebuild the table from <out>/results.json (its runs and its meta, the command and "
        "any interleaved timing included) with this version's statistics; trains and times "
        "nothing",
    )
    p.add_argument(
        "--per-seed",
        action="store_true",
        help="also tabulate each seed's accuracy and the step at which it left chance",
    )
    a = p.parse_args(argv)
    if a.retabulate:
        return _retabulate(a)
    over = {"data": a.data, "difficulty": a.difficulty}
    if a.steps is not None:
        over.update(
            steps=a.steps, warmup_steps=min(PRESETS[a.preset]().warmup_steps, a.steps // 10)
        )
    base = get_preset(a.preset, **over)
    # every head and seed trains on the same images: generate them once
    data = None if a.no_train else load_data(base)
    summaries = run_all(
        base,
        pools=a.pools,
        seeds=a.seeds,
        out=a.out,
        data=data,
        progress=not a.no_progress,
        train=not a.no_train,
    )
    if not summaries:
        print(f"no finished runs under {a.out}", file=sys.stderr)
        return 1
    rows = aggregate(summaries)
    command = command_line(
        "experiments.compare_heads",
        sys.argv[1:] if argv is None else argv,
        drop=("--update-readme", "--no-train"),
    )
    meta = {
        "preset": base.name,
        "budget": f"{base.steps} steps x {base.batch_size} images, level {base.difficulty}, "
        f"{base.model.image_size} px / patch {base.model.patch_size}, width {base.model.width}, "
        f"depth {base.model.depth}",
        "seeds": sorted({s["seed"] for s in summaries}),
        "data": DATA_NOTES[base.data],
        "device": f"{summaries[0]['backend']} ({summaries[0]['device']}), {platform.machine()}",
        "command": command,
    }
    if a.time_rounds:
        meta["interleaved"] = interleaved_step_times(base, pools=a.pools, rounds=a.time_rounds)
    md = table(rows, meta=meta, per_seed=a.per_seed)
    payload = {"meta": meta, "heads": rows, "runs": summaries}
    _write(pathlib.Path(a.out), md, payload, a.update_readme, a.readme_block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
