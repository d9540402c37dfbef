"""Zero-shot segmentation from a trained ViT's attention chains, every map method side by side.

Evaluates :data:`markov_attn.segmentation.METHODS` (CLS attention, column sum, rollout,
bounces n = 1..5 forward from / reverse to CLS, TokenRank in/out, each uniform and
λ2-weighted) plus the centre prior and the token-grid oracle on the benchmark's test split
(Fashion-MNIST objects composited onto held-out natural photos, exact masks), with the
protocol of ``docs/data.md`` §3 and percentile-bootstrap 95 % intervals (1,000 resamples of
images, shared by all methods so differences between methods are paired).

Command: ``python -m experiments.segment --run runs/demo`` (2,000 images; add ``--extended``
for per-layer / last-3-layer / prefix-handling ablations, ``--update-readme`` to regenerate
the README table). Writes ``runs/<name>/segment.json``, ``segment.md``,
``segment_grid.png`` and ``segment_curves.png``.

Runtime on 2 CPU cores (the ``cpu`` preset: width-96 depth-4 ViT, 64 px, 65 tokens): 66 s for
the main table on 2,000 images (``timing`` in ``segment.json``; budget 5 minutes).

The data are synthetic and the numbers are not comparable with ImageNet-Segmentation.
"""

import os

# On this 2-core CPU the big jitted step (forward + every map + metrics) intermittently wedged
# XLA's multi-threaded Eigen pool (all threads in futex wait, never returning); single-threaded
# Eigen avoids it (same symptom and workaround: PyAutoLabs/PyAutoFit#1530). One OpenBLAS thread
# for the LAPACK calls (LU, eig) as well. Effective only before jax initialises its backend
# (i.e. when run as a script); set XLA_FLAGS yourself otherwise.
if "xla_cpu_multi_thread_eigen" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
        + " --xla_cpu_multi_thread_eigen=false"
    ).strip()
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import dataclasses
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import markov_attn as ma
from markov_attn import segmentation as seg

SYNTHETIC_NOTE = (
    "The data are synthetic (Fashion-MNIST objects composited onto held-out natural photos, "
    "with exact masks); these numbers are not comparable with ImageNet-Segmentation results."
)

#: Reference rows (not attention methods).
REFERENCES = {
    "centre_prior": "centre prior (Gaussian)",
    "oracle": "oracle (mask averaged per token)",
}

#: Methods shown in the figure grid.
FIGURE_METHODS = (
    "cls_attn",
    "column_sum",
    "rollout",
    "bounce_fwd_1",
    "bounce_fwd_2",
    "bounce_fwd_5",
    "bounce_rev_2",
    "tokenrank_in",
    "tokenrank_out",
    "bounce_fwd_2_l2",
    "oracle",
)

README_START, README_END = "<!-- seg:start -->", "<!-- seg:end -->"


def label(name: str, method: "seg.MapMethod | None" = None) -> str:
    """Human-readable row label: a reference row's, else ``method.label`` (the registry's
    method of that name when ``method`` is not given)."""
    if name in REFERENCES:
        return REFERENCES[name]
    return (seg.METHODS[name] if method is None else method).label


def _spec(res: dict, name: str) -> "seg.MapMethod | None":
    """The :class:`MapMethod` of a result row (``None`` for the reference rows)."""
    spec = res[name].get("spec")
    return None if spec is None else seg.MapMethod(**spec)


def _twin(index: dict, method: "seg.MapMethod | None", **changes) -> str | None:
    """The name, in ``index`` (method -> name), of ``method`` with ``changes``, if evaluated."""
    if method is None:
        return None
    return index.get(dataclasses.replace(method, **changes))


# ----------------------------------------------------------------------------------- model


def _load(source):
    """``(model, info)`` from a run directory or an in-memory ``markov_attn.nn.ViT``."""
    if isinstance(source, str | os.PathLike):
        from markov_attn.nn import load_run

        model, cfg = load_run(source)  # the run's stored config, a dict
        info = {"run": str(source), "data_seed": cfg["data_seed"], "preset": cfg["name"]}
    else:
        model, info = source, {"run": None, "data_seed": 0, "preset": None}
    mcfg = model.cfg
    info.update(
        image_size=mcfg.image_size,
        patch_size=mcfg.patch_size,
        depth=mcfg.depth,
        heads=mcfg.num_heads,
        width=mcfg.width,
        pool=mcfg.pool,
        num_prefix=mcfg.num_prefix,
    )
    return model, info


def _step_fn(model, names: tuple[str, ...], methods: dict, *, grid, num_prefix, thresh):
    """One jitted function: forward pass → all maps → per-image statistics of every method."""
    from flax import nnx

    graphdef, state = nnx.split(model)
    items = {k: methods[k] for k in names if k in methods}

    @jax.jit
    def step(state, images, masks, prior, oracle):
        m = nnx.merge(graphdef, state)
        logits, aux = m(images, return_attn_logits=True)
        maps = seg.compute_maps(
            aux["attn"], items, num_prefix=num_prefix, grid=grid, logits=aux["attn_logits"]
        )
        maps["centre_prior"] = jnp.broadcast_to(prior, oracle.shape)
        maps["oracle"] = oracle
        stacked = jnp.stack([maps[k] for k in names])
        stats = seg.image_stats(stacked, masks[None], thresh=thresh)
        # |λ2| of each last-layer head's patch chain: what the λ2-weighted methods weight by
        lam2 = ma.second_eigenvalue(
            ma.transition(aux["attn_logits"][:, -1], keep=slice(num_prefix, None))
        )
        return jnp.argmax(logits, axis=-1), stats, maps, lam2

    return lambda images, masks, prior, oracle: step(state, images, masks, prior, oracle)


def _lambda2_summary(lam2: np.ndarray) -> dict:
    """Per-head mean and spread of the last layer's |λ2| and of the λ2 head weights."""
    w = np.asarray(ma.head_weights(jnp.asarray(lam2), axis=-1))
    return {
        "mean": lam2.mean(0).round(4).tolist(),
        "sd": lam2.std(0).round(4).tolist(),
        "weights_mean": w.mean(0).round(4).tolist(),
    }


# ----------------------------------------------------------------------------------- evaluate


def evaluate(
    source,
    /,
    *,
    n_images: int = 2000,
    batch_size: int = 250,
    extended: bool = False,
    methods: dict | None = None,
    thresh: str | float = "mean",
    n_resamples: int = 1000,
    seed: int = 0,
    data_seed: int | None = None,
    out_dir: str | os.PathLike | None = None,
    figure_images: int = 6,
    progress: bool = True,
) -> dict:
    """Scores every map method on ``n_images`` test images of the benchmark.

    Args:
        source: a run directory with a checkpoint (``experiments.train``), or an in-memory
            ``markov_attn.nn.ViT``.
        n_images: test images (indices ``0 .. n_images - 1`` of the test split).
        batch_size: images per jitted step (one forward pass + all maps + all statistics).
        extended: add :func:`markov_attn.segmentation.extended_methods` (per layer, last 3
            layers, other prefix handling).
        methods: name → ``MapMethod`` instead of the registry (reference rows always added).
        thresh: threshold of the protocol (``"mean"``).
        n_resamples: bootstrap resamples (shared by all methods).
        seed: bootstrap seed.
        data_seed: benchmark seed (default: the run's ``data_seed``, 0 for a bare model).
        out_dir: if given, writes ``segment.json``, ``segment.md`` and the figures there.
        figure_images: images in the figure grid.
        progress: print progress lines to stderr.

    Returns:
        ``{"meta": ..., "timing": ..., "methods": {name: {"label", "spec", "metrics", "ci",
        "delta_vs_cls", "delta_vs_uniform"?}}, "order": [...], "note": ...}``.
    """
    from markov_attn.data import centre_prior, make_split, oracle_map

    t_all = time.perf_counter()
    model, info = _load(source)
    size, patch = info["image_size"], info["patch_size"]
    grid = (size // patch, size // patch)
    table = dict(seg.METHODS if methods is None else methods)
    if extended:
        table.update(seg.extended_methods(info["depth"]))
    if info["num_prefix"] < 1:
        table = {k: m for k, m in table.items() if not m.needs_cls}
    names = tuple(table) + tuple(REFERENCES)
    step = _step_fn(model, names, table, grid=grid, num_prefix=info["num_prefix"], thresh=thresh)
    prior = jnp.asarray(centre_prior(size, grid[0]))
    dseed = info["data_seed"] if data_seed is None else data_seed

    parts, lams, correct, fig_data = [], [], 0, None
    t_data = t_compute = 0.0
    first_step = None
    for start in range(0, n_images, batch_size):
        n = min(batch_size, n_images - start)
        t0 = time.perf_counter()
        batch = make_split("test", n, size=size, seed=dseed, start=start)
        oracle = oracle_map(batch["masks"], grid[0])
        t1 = time.perf_counter()
        pred, stats, maps, lam2 = step(batch["images"], batch["masks"], prior, oracle)
        stats = jax.device_get(stats)
        lams.append(np.asarray(lam2))
        t2 = time.perf_counter()
        t_data += t1 - t0
        t_compute += t2 - t1
        if first_step is None:
            first_step = t2 - t1
        correct += int(np.sum(np.asarray(pred) == batch["labels"]))
        parts.append(stats)
        if fig_data is None and figure_images:
            k = min(figure_images, n)
            fig_data = {
                "images": batch["images"][:k],
                "masks": batch["masks"][:k],
                "maps": {m: np.asarray(maps[m][:k]) for m in FIGURE_METHODS if m in maps},
            }
        if progress:
            print(
                f"[segment] {start + n}/{n_images} images, {time.perf_counter() - t_all:.1f}s",
                file=sys.stderr,
                flush=True,
            )
    all_stats = seg.SegStats(*(np.concatenate(v, axis=1) for v in zip(*parts)))

    t0 = time.perf_counter()
    counts = seg.bootstrap_counts(n_images, n_resamples=n_resamples, seed=seed)
    per = {k: seg.SegStats(*(v[i] for v in all_stats)) for i, k in enumerate(names)}
    results = {}
    base = "cls_attn" if "cls_attn" in per else None
    index = {m: k for k, m in table.items()}
    for k in names:
        st, m = per[k], table.get(k)
        entry = {
            "label": label(k, m),
            "spec": dataclasses.asdict(m) if m is not None else None,
            "metrics": seg.summarize(st),
            "ci": seg.bootstrap(st, counts=counts),
        }
        if base is not None and k != base:
            entry["delta_vs_cls"] = seg.bootstrap(st, counts=counts, baseline=per[base])
        uniform = _twin(index, m, weighting="uniform")  # the same map with uniform heads
        if uniform is not None and uniform != k:
            entry["delta_vs_uniform"] = seg.bootstrap(st, counts=counts, baseline=per[uniform])
        if m is not None and m.kind == "bounce" and m.steps > 1:  # the same bounce at n = 1
            first = _twin(index, m, steps=1)
            if first is not None:
                entry["delta_vs_n1"] = seg.bootstrap(st, counts=counts, baseline=per[first])
        results[k] = entry
    t_boot = time.perf_counter() - t0

    out = {
        "note": SYNTHETIC_NOTE,
        "meta": {
            **info,
            "n_images": n_images,
            "grid": list(grid),
            "thresh": thresh,
            "protocol": "per-map min-max, nearest upsampling, mask = map > mean(map); "
            "mIoU and pixel accuracy accumulated over images; mAP = mean per-image "
            "AP of the continuous map (images with an empty mask left out)",
            "bootstrap": {"n_resamples": n_resamples, "seed": seed, "level": 0.95},
            "classification_acc": correct / n_images,
            "last_layer_lambda2": _lambda2_summary(np.concatenate(lams)),
            "backend": jax.default_backend(),
            "methods_evaluated": len(names),
            "extended": bool(extended),
        },
        "timing": {
            "total_s": time.perf_counter() - t_all,
            "data_s": t_data,
            "model_maps_stats_s": t_compute,
            "first_step_incl_compile_s": first_step,
            "bootstrap_s": t_boot,
            "images_per_s_steady": (n_images - min(batch_size, n_images))
            / max(t_compute - first_step, 1e-9)
            if n_images > batch_size
            else None,
        },
        "order": list(names),
        "methods": results,
    }
    if out_dir is not None:
        write_outputs(out, out_dir, fig_data=fig_data)
    return out


# ----------------------------------------------------------------------------------- outputs


def _fmt(value: float, ci) -> str:
    return f"{100 * value:.1f} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _row(name: str, r: dict) -> str:
    m, ci = r["metrics"], r["ci"]
    return (
        f"| {r['label']} | {_fmt(m['miou'], ci['miou'])} | {_fmt(m['map'], ci['map'])} | "
        f"{_fmt(m['pixel_acc'], ci['pixel_acc'])} |"
    )


MAIN_ORDER = (
    "centre_prior",
    "oracle",
    "cls_attn",
    "column_sum",
    "rollout",
    *(f"bounce_fwd_{n}" for n in range(1, 6)),
    *(f"bounce_rev_{n}" for n in range(1, 6)),
    "tokenrank_in",
    "tokenrank_out",
)


def _main_rows(res: dict) -> list[str]:
    """The rows of :data:`MAIN_ORDER` present in ``res``, then their λ2-weighted twins."""
    main = [n for n in MAIN_ORDER if n in res]
    index = {m: n for n in res if (m := _spec(res, n)) is not None}
    weighted = [_twin(index, _spec(res, n), weighting="lambda2") for n in main]
    return main + [n for n in weighted if n is not None and n not in main]


def main_table(results: dict) -> str:
    """The results table in Markdown (main rows, then their λ2-weighted variants)."""
    res = results["methods"]
    meta = results["meta"]
    rows = _main_rows(res)
    head = [
        f"Zero-shot segmentation, {meta['n_images']} test images of the synthetic benchmark "
        f"({meta['image_size']} px, {meta['grid'][0]}×{meta['grid'][1]} tokens, ViT depth "
        f"{meta['depth']}, {meta['heads']} heads, `{meta['pool']}` pooling). Last layer unless "
        "stated (rollout: all layers). Values in %, 95 % bootstrap intervals in brackets.",
        "",
        "| map | mIoU | mAP | pixel acc |",
        "|---|---|---|---|",
    ]
    return "\n".join(head + [_row(n, res[n]) for n in rows]) + "\n"


def _delta_lines(results: dict) -> list[str]:
    res = results["methods"]
    lines = []

    def fmt_delta(d, metric):
        lo, hi = d[metric]
        sig = "" if lo <= 0 <= hi else (" (better)" if lo > 0 else " (worse)")
        return f"[{100 * lo:+.1f}, {100 * hi:+.1f}]{sig}"

    named = [n for n in res if "delta_vs_cls" in res[n] and n not in REFERENCES]
    if named:
        lines += [
            "",
            "Paired differences against CLS attention (percentage points, 95 % "
            'bootstrap interval; "better"/"worse" where it excludes 0):',
            "",
            "| map | ΔmIoU | ΔmAP |",
            "|---|---|---|",
        ]
        for n in named:
            d = res[n]["delta_vs_cls"]
            lines.append(f"| {res[n]['label']} | {fmt_delta(d, 'miou')} | {fmt_delta(d, 'map')} |")
    l2 = [n for n in res if "delta_vs_uniform" in res[n]]
    if l2:
        lines += [
            "",
            "λ2-weighted minus uniform heads (same method, paired):",
            "",
            "| map | ΔmIoU | ΔmAP |",
            "|---|---|---|",
        ]
        for n in l2:
            d = res[n]["delta_vs_uniform"]
            lines.append(f"| {res[n]['label']} | {fmt_delta(d, 'miou')} | {fmt_delta(d, 'map')} |")
    return lines


def summary_lines(results: dict) -> list[str]:
    """Which maps work best (by mIoU and mAP point estimates), for the closing note."""
    res = results["methods"]
    cand = [n for n in res if n not in REFERENCES]
    if not cand:
        return []
    out = []
    for metric in ("miou", "map"):
        best = max(cand, key=lambda n: res[n]["metrics"][metric])
        out.append(
            f"- best by {metric}: {res[best]['label']} ({100 * res[best]['metrics'][metric]:.1f})"
        )
    families = {
        "bounce_fwd": ("forward", "uniform"),
        "bounce_rev": ("reverse", "uniform"),
        "bounce_fwd_l2": ("forward", "lambda2"),
    }
    specs = {n: _spec(res, n) for n in cand}
    for fam, (direction, weighting) in families.items():
        # the last-layer, full-chain bounces n = 1..5 of the family (the registry's)
        steps = {
            seg.MapMethod("bounce", steps=k, direction=direction, weighting=weighting): k
            for k in range(1, 6)
        }
        names = [n for n in cand if specs[n] in steps]
        if names:
            best = max(names, key=lambda n: res[n]["metrics"]["miou"])
            out.append(f"- {fam}: best n by mIoU = {specs[best].steps}")
    prior = res.get("centre_prior", {}).get("metrics", {}).get("miou")
    if prior is not None:
        beat = [n for n in cand if res[n]["ci"]["miou"][0] > prior]
        out.append(
            f"- {len(beat)} of {len(cand)} maps beat the centre prior's mIoU "
            f"({100 * prior:.1f}) with their whole interval"
        )
    return out


def markdown(results: dict) -> str:
    """``segment.md``: note, main table, all other rows, paired differences, timing."""
    res, meta, t = results["methods"], results["meta"], results["timing"]
    lines = [
        "# Zero-shot segmentation from attention chains",
        "",
        f"**{results['note']}**",
        "",
        main_table(results),
    ]
    main = set(_main_rows(res))
    extra = [n for n in results["order"] if n not in main and n not in MAIN_ORDER]
    if extra:
        lines += ["## Ablations", "", "| map | mIoU | mAP | pixel acc |", "|---|---|---|---|"]
        lines += [_row(n, res[n]) for n in extra]
    lines += _delta_lines(results)
    lines += ["", "## Summary", "", *summary_lines(results)]
    lines += [
        "",
        "## Protocol and run",
        "",
        f"- {meta['protocol']}; threshold `{meta['thresh']}`.",
        "- mAP (two-class, as the reference code's `get_ap_scores`) is in `segment.json` as "
        "`map_2class`.",
        f"- checkpoint: `{meta['run']}`; classifier test accuracy on these images "
        f"{100 * meta['classification_acc']:.1f} %.",
        *_lambda2_lines(meta),
        f"- {meta['methods_evaluated']} maps on {meta['n_images']} images in "
        f"{t['total_s']:.1f} s wall ({t['model_maps_stats_s']:.1f} s forward + maps + metrics, "
        f"first step incl. compilation {t['first_step_incl_compile_s']:.1f} s; data "
        f"generation {t['data_s']:.1f} s; bootstrap {t['bootstrap_s']:.1f} s), backend "
        f"{meta['backend']}.",
        "- figures: `segment_grid.png` (image, mask, each map and its mask), "
        "`segment_curves.png` (mIoU and mAP against bounce count).",
        "",
    ]
    return "\n".join(lines)


def _lambda2_lines(meta: dict) -> list[str]:
    lam = meta.get("last_layer_lambda2")
    if not lam:
        return []
    mean, sd, w = (", ".join(f"{x:.2f}" for x in lam[k]) for k in ("mean", "sd", "weights_mean"))
    uniform = 1 / len(lam["mean"])
    return [
        f"- last layer, per head: mean |λ2| of the patch chain [{mean}] (sd over images [{sd}]); "
        f"mean λ2 head weights [{w}] (uniform would be {uniform:.2f} each)."
    ]


def write_outputs(results: dict, out_dir, /, *, fig_data: dict | None = None) -> dict:
    """Writes ``segment.json``, ``segment.md`` and the two figures into ``out_dir``."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "segment.json", "md": out_dir / "segment.md"}
    paths["json"].write_text(json.dumps(results, indent=1) + "\n")
    paths["md"].write_text(markdown(results))
    try:
        from markov_attn.viz.seg import metric_curves, save_figure, seg_grid
    except ImportError:  # pragma: no cover - matplotlib missing
        return paths
    if fig_data is not None:
        res = results["methods"]
        titles = {
            k: res[k]["label"].replace(" (head mean)", "").replace(", ", "\n")
            for k in fig_data["maps"]
        }
        titles = {
            k: v.replace(" forward from CLS", " fwd").replace(" reverse to CLS", " rev")
            for k, v in titles.items()
        }
        titles.update({"oracle": "oracle", "centre_prior": "centre prior"})
        fig = seg_grid(fig_data["images"], fig_data["masks"], fig_data["maps"], titles=titles)
        paths["grid"] = save_figure(fig, out_dir / "segment_grid.png", dpi=80)
    res = results["methods"]
    fams = {
        "forward from CLS": [f"bounce_fwd_{n}" for n in range(1, 6)],
        "reverse to CLS": [f"bounce_rev_{n}" for n in range(1, 6)],
        "forward, λ2 heads": [f"bounce_fwd_{n}_l2" for n in range(1, 6)],
        "reverse, λ2 heads": [f"bounce_rev_{n}_l2" for n in range(1, 6)],
    }
    refs = {
        "CLS attention": "cls_attn",
        "column sum": "column_sum",
        "rollout": "rollout",
        "TokenRank in": "tokenrank_in",
        "centre prior": "centre_prior",
    }
    fig = metric_curves(res, fams, references=refs)
    paths["curves"] = save_figure(fig, out_dir / "segment_curves.png")
    return paths


def update_readme(results: dict, readme: str | os.PathLike = "README.md", /) -> str:
    """Replaces the README text between ``<!-- seg:start -->`` and ``<!-- seg:end -->`` with
    the main table, the synthetic-data statement and the command."""
    path = pathlib.Path(readme)
    text = path.read_text()
    i, j = text.find(README_START), text.find(README_END)
    if i < 0 or j < i:
        raise ValueError(
            f"{path} has no {README_START} ... {README_END} block; add the two markers where "
            "the segmentation table belongs"
        )
    run = results["meta"]["run"] or "<run>"
    out = f"runs/{pathlib.Path(run).stem}" if run.endswith(".npz") else run
    block = "\n".join(
        [
            README_START,
            "",
            f"*{results['note']}*",
            "",
            main_table(results).rstrip(),
            "",
            *summary_lines(results),
            "",
            f"Generated by `python -m experiments.segment --run {run}"
            f"{' --extended' if results['meta'].get('extended') else ''} --update-readme` "
            f"({results['timing']['total_s']:.0f} s on {results['meta']['backend']}); "
            f"full results in `{out}/segment.md`.",
            "",
            README_END,
        ]
    )
    path.write_text(text[:i] + block + text[j + len(README_END) :])
    return block


# ----------------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m experiments.segment",
        description="Zero-shot segmentation from a trained ViT's attention (synthetic benchmark).",
    )
    p.add_argument(
        "--run",
        default="runs/demo",
        help="run directory with a checkpoint, or a weights file (.npz) from save_weights, "
        "such as the committed reference model experiments/reference/vit_reference.npz",
    )
    p.add_argument("--n-images", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--extended", action="store_true", help="add per-layer and other ablations")
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--out", help="output directory (default: the run directory)")
    p.add_argument(
        "--update-readme",
        action="store_true",
        help="replace the README's seg:start/seg:end block with the table",
    )
    p.add_argument("--readme", default="README.md")
    a = p.parse_args(argv)
    out = a.out or (f"runs/{pathlib.Path(a.run).stem}" if a.run.endswith(".npz") else a.run)
    try:
        results = evaluate(
            a.run,
            n_images=a.n_images,
            batch_size=a.batch_size,
            extended=a.extended,
            n_resamples=a.resamples,
            out_dir=out,
        )
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(main_table(results))
    print("\n".join(summary_lines(results)))
    print(f"total {results['timing']['total_s']:.1f} s; wrote {out}/segment.md")
    if a.update_readme:
        update_readme(results, a.readme)
        print(f"updated {a.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
