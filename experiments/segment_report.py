"""The reports of ``experiments.segment``: Markdown tables, ``segment.md``, ``segment.json``,
the two figures and the README block.

Everything here reads the result dict of :func:`experiments.segment.evaluate` (no jax work).
"""

import dataclasses
import json
import os
import pathlib

from markov_attn import segmentation as seg

from .readme import markers, replace_block

#: Reference rows (not attention methods).
REFERENCES = {
    "centre_prior": "centre prior (Gaussian)",
    "oracle": "oracle (mask averaged per token)",
}

README_START, README_END = markers("seg")

#: The main table's rows, in order (their λ2-weighted twins follow).
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

TABLE_HEAD = ["| map | mIoU | mAP | pixel acc |", "|---|---|---|---|"]
DELTA_HEAD = ["| map | ΔmIoU | ΔmAP |", "|---|---|---|"]


def label(name: str, method: "seg.MapMethod | None" = None) -> str:
    """Human-readable row label: a reference row's, else ``method.label`` (the registry's
    method of that name when ``method`` is not given)."""
    if name in REFERENCES:
        return REFERENCES[name]
    return (seg.METHODS[name] if method is None else method).label


def spec(res: dict, name: str) -> "seg.MapMethod | None":
    """The :class:`MapMethod` of a result row (``None`` for the reference rows)."""
    fields = res[name].get("spec")
    return None if fields is None else seg.MapMethod(**fields)


def twin(index: dict, method: "seg.MapMethod | None", **changes) -> str | None:
    """The name, in ``index`` (method -> name), of ``method`` with ``changes``, if evaluated."""
    if method is None:
        return None
    return index.get(dataclasses.replace(method, **changes))


# ----------------------------------------------------------------------------------- tables


def _fmt(value: float, ci) -> str:
    return f"{100 * value:.1f} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _row(name: str, r: dict) -> str:
    m, ci = r["metrics"], r["ci"]
    return (
        f"| {r['label']} | {_fmt(m['miou'], ci['miou'])} | {_fmt(m['map'], ci['map'])} | "
        f"{_fmt(m['pixel_acc'], ci['pixel_acc'])} |"
    )


def _main_rows(res: dict) -> list[str]:
    """The rows of :data:`MAIN_ORDER` present in ``res``, then their λ2-weighted twins."""
    main = [n for n in MAIN_ORDER if n in res]
    index = {m: n for n in res if (m := spec(res, n)) is not None}
    weighted = [twin(index, spec(res, n), weighting="lambda2") for n in main]
    return main + [n for n in weighted if n is not None and n not in main]


def main_table(results: dict) -> str:
    """The results table in Markdown (main rows, then their λ2-weighted variants)."""
    res = results["methods"]
    meta = results["meta"]
    head = [
        f"Zero-shot segmentation, {meta['n_images']} test images of the synthetic benchmark "
        f"({meta['image_size']} px, {meta['grid'][0]}×{meta['grid'][1]} tokens, ViT depth "
        f"{meta['depth']}, {meta['heads']} heads, `{meta['pool']}` pooling). Last layer unless "
        "stated (rollout: all layers). Values in %, 95 % bootstrap intervals in brackets.",
        "",
        *TABLE_HEAD,
    ]
    return "\n".join(head + [_row(n, res[n]) for n in _main_rows(res)]) + "\n"


def _fmt_delta(d: dict, metric: str) -> str:
    lo, hi = d[metric]
    sig = "" if lo <= 0 <= hi else (" (better)" if lo > 0 else " (worse)")
    return f"[{100 * lo:+.1f}, {100 * hi:+.1f}]{sig}"


def _delta_table(res: dict, names: list[str], key: str, caption: str) -> list[str]:
    """A table of the paired differences ``res[n][key]`` of ``names`` (none if empty)."""
    if not names:
        return []
    rows = [
        f"| {res[n]['label']} | {_fmt_delta(res[n][key], 'miou')} | "
        f"{_fmt_delta(res[n][key], 'map')} |"
        for n in names
    ]
    return ["", caption, "", *DELTA_HEAD, *rows]


def _delta_lines(results: dict) -> list[str]:
    res = results["methods"]
    named = [n for n in res if "delta_vs_cls" in res[n] and n not in REFERENCES]
    l2 = [n for n in res if "delta_vs_uniform" in res[n]]
    return _delta_table(
        res,
        named,
        "delta_vs_cls",
        "Paired differences against CLS attention (percentage points, 95 % "
        'bootstrap interval; "better"/"worse" where it excludes 0):',
    ) + _delta_table(
        res, l2, "delta_vs_uniform", "λ2-weighted minus uniform heads (same method, paired):"
    )


# ----------------------------------------------------------------------------------- summary


def _best_lines(res: dict, cand: list[str]) -> list[str]:
    out = []
    for metric in ("miou", "map"):
        best = max(cand, key=lambda n: res[n]["metrics"][metric])
        out.append(
            f"- best by {metric}: {res[best]['label']} ({100 * res[best]['metrics'][metric]:.1f})"
        )
    return out


def _best_n_lines(res: dict, cand: list[str]) -> list[str]:
    """The best bounce count by mIoU of each family of last-layer, full-chain bounces."""
    families = {
        "bounce_fwd": ("forward", "uniform"),
        "bounce_rev": ("reverse", "uniform"),
        "bounce_fwd_l2": ("forward", "lambda2"),
    }
    specs = {n: spec(res, n) for n in cand}
    out = []
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
    return out


def _prior_lines(res: dict, cand: list[str]) -> list[str]:
    prior = res.get("centre_prior", {}).get("metrics", {}).get("miou")
    if prior is None:
        return []
    beat = [n for n in cand if res[n]["ci"]["miou"][0] > prior]
    return [
        f"- {len(beat)} of {len(cand)} maps beat the centre prior's mIoU "
        f"({100 * prior:.1f}) with their whole interval"
    ]


def summary_lines(results: dict) -> list[str]:
    """Which maps work best (by mIoU and mAP point estimates), for the closing note."""
    res = results["methods"]
    cand = [n for n in res if n not in REFERENCES]
    if not cand:
        return []
    return _best_lines(res, cand) + _best_n_lines(res, cand) + _prior_lines(res, cand)


# ----------------------------------------------------------------------------------- segment.md


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


def _protocol_lines(meta: dict, t: dict) -> list[str]:
    return [
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


def markdown(results: dict) -> str:
    """``segment.md``: note, main table, all other rows, paired differences, timing."""
    res = results["methods"]
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
        lines += ["## Ablations", "", *TABLE_HEAD, *(_row(n, res[n]) for n in extra)]
    lines += _delta_lines(results)
    lines += ["", "## Summary", "", *summary_lines(results)]
    lines += _protocol_lines(results["meta"], results["timing"])
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- files


def _grid_titles(res: dict, names) -> dict:
    """Short panel titles of the figure grid's maps."""
    titles = {
        k: res[k]["label"]
        .replace(" (head mean)", "")
        .replace(", ", "\n")
        .replace(" forward from CLS", " fwd")
        .replace(" reverse to CLS", " rev")
        for k in names
    }
    titles.update({"oracle": "oracle", "centre_prior": "centre prior"})
    return titles


def _write_figures(results: dict, out_dir: pathlib.Path, fig_data: dict | None) -> dict:
    """``segment_grid.png`` (if ``fig_data``) and ``segment_curves.png``; their paths."""
    try:
        from markov_attn.viz.seg import metric_curves, save_figure, seg_grid
    except ImportError:  # pragma: no cover - matplotlib missing
        return {}
    res, paths = results["methods"], {}
    if fig_data is not None:
        titles = _grid_titles(res, fig_data["maps"])
        fig = seg_grid(fig_data["images"], fig_data["masks"], fig_data["maps"], titles=titles)
        paths["grid"] = save_figure(fig, out_dir / "segment_grid.png", dpi=80)
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


def write_outputs(results: dict, out_dir, /, *, fig_data: dict | None = None) -> dict:
    """Writes ``segment.json``, ``segment.md`` and the two figures into ``out_dir``."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "segment.json", "md": out_dir / "segment.md"}
    paths["json"].write_text(json.dumps(results, indent=1) + "\n")
    paths["md"].write_text(markdown(results))
    return paths | _write_figures(results, out_dir, fig_data)


def readme_block(results: dict) -> str:
    """The README block: the synthetic-data statement, the main table and the command."""
    run = results["meta"]["run"] or "<run>"
    out = f"runs/{pathlib.Path(run).stem}" if run.endswith(".npz") else run
    extended = " --extended" if results["meta"].get("extended") else ""
    return "\n".join(
        [
            "",
            f"*{results['note']}*",
            "",
            main_table(results).rstrip(),
            "",
            *summary_lines(results),
            "",
            f"Generated by `python -m experiments.segment --run {run}{extended} --update-readme` "
            f"({results['timing']['total_s']:.0f} s on {results['meta']['backend']}); "
            f"full results in `{out}/segment.md`.",
        ]
    )


def update_readme(results: dict, readme: str | os.PathLike = "README.md", /) -> str:
    """Replaces the README text between ``<!-- seg:start -->`` and ``<!-- seg:end -->`` with
    :func:`readme_block` (``ValueError`` if the markers are missing); returns the block."""
    block = readme_block(results)
    replace_block(readme, "seg", block)
    return block
