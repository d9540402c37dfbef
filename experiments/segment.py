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

Runtime on 2 CPU cores (a width-96 depth-4 ViT at 64 px, 65 tokens, the ``cpu64`` preset's
model): 66 s for the main table on 2,000 images (``timing`` in ``segment.json``; budget 5
minutes).

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
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import markov_attn as ma
from markov_attn import segmentation as seg

from .segment_report import (
    REFERENCES,
    label,
    main_table,
    summary_lines,
    twin,
    update_readme,
    write_outputs,
)

SYNTHETIC_NOTE = (
    "The data are synthetic (Fashion-MNIST objects composited onto held-out natural photos, "
    "with exact masks); these numbers are not comparable with ImageNet-Segmentation results."
)

PROTOCOL = (
    "per-map min-max, nearest upsampling, mask = map > mean(map); "
    "mIoU and pixel accuracy accumulated over images; mAP = mean per-image "
    "AP of the continuous map (images with an empty mask left out)"
)

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


def _prepare_methods(methods: dict | None, *, extended: bool, info: dict) -> dict:
    """Name → ``MapMethod`` to evaluate: ``methods`` (default the registry), plus the
    extended ablations if asked, less the CLS-based maps of a model without a CLS token."""
    table = dict(seg.METHODS if methods is None else methods)
    if extended:
        table.update(seg.extended_methods(info["depth"]))
    if info["num_prefix"] < 1:
        table = {k: m for k, m in table.items() if not m.needs_cls}
    return table


def _figure_data(batch: dict, maps: dict, k: int) -> dict:
    """The first ``k`` images, masks and :data:`FIGURE_METHODS` maps of a batch."""
    return {
        "images": batch["images"][:k],
        "masks": batch["masks"][:k],
        "maps": {m: np.asarray(maps[m][:k]) for m in FIGURE_METHODS if m in maps},
    }


@dataclasses.dataclass
class _Pass:
    """What the pass over the test images accumulates, batch by batch."""

    parts: list = dataclasses.field(default_factory=list)  # per-batch SegStats
    lams: list = dataclasses.field(default_factory=list)  # per-batch last-layer |λ2|
    correct: int = 0
    fig_data: dict | None = None
    t_data: float = 0.0
    t_compute: float = 0.0
    first_step: float | None = None

    def stats(self) -> "seg.SegStats":
        """All images' statistics, ``(methods, images)`` per field."""
        return seg.SegStats(*(np.concatenate(v, axis=1) for v in zip(*self.parts)))


def _run_batches(
    step, n_images, batch_size, *, size, grid, data_seed, figure_images, progress, t_all
) -> _Pass:
    """Runs ``step`` over test images ``0 .. n_images - 1`` in batches."""
    from markov_attn.data import centre_prior, make_split, oracle_map

    prior = jnp.asarray(centre_prior(size, grid[0]))
    acc = _Pass()
    for start in range(0, n_images, batch_size):
        n = min(batch_size, n_images - start)
        t0 = time.perf_counter()
        batch = make_split("test", n, size=size, seed=data_seed, start=start)
        oracle = oracle_map(batch["masks"], grid[0])
        t1 = time.perf_counter()
        pred, stats, maps, lam2 = step(batch["images"], batch["masks"], prior, oracle)
        acc.parts.append(jax.device_get(stats))
        acc.lams.append(np.asarray(lam2))
        t2 = time.perf_counter()
        acc.t_data += t1 - t0
        acc.t_compute += t2 - t1
        if acc.first_step is None:
            acc.first_step = t2 - t1
        acc.correct += int(np.sum(np.asarray(pred) == batch["labels"]))
        if acc.fig_data is None and figure_images:
            acc.fig_data = _figure_data(batch, maps, min(figure_images, n))
        if progress:
            print(
                f"[segment] {start + n}/{n_images} images, {time.perf_counter() - t_all:.1f}s",
                file=sys.stderr,
                flush=True,
            )
    return acc


def _entry(k: str, m, per: dict, *, counts, base: str | None, index: dict) -> dict:
    """The result row of method ``k``: metrics, intervals and paired differences against CLS
    attention, the same map with uniform heads and the same bounce at n = 1."""
    st = per[k]
    entry = {
        "label": label(k, m),
        "spec": dataclasses.asdict(m) if m is not None else None,
        "metrics": seg.summarize(st),
        "ci": seg.bootstrap(st, counts=counts),
    }
    if base is not None and k != base:
        entry["delta_vs_cls"] = seg.bootstrap(st, counts=counts, baseline=per[base])
    uniform = twin(index, m, weighting="uniform")  # the same map with uniform heads
    if uniform is not None and uniform != k:
        entry["delta_vs_uniform"] = seg.bootstrap(st, counts=counts, baseline=per[uniform])
    if m is not None and m.kind == "bounce" and m.steps > 1:  # the same bounce at n = 1
        first = twin(index, m, steps=1)
        if first is not None:
            entry["delta_vs_n1"] = seg.bootstrap(st, counts=counts, baseline=per[first])
    return entry


def _score(names: tuple, table: dict, all_stats, *, n_images, n_resamples, seed) -> dict:
    """Name → result row of every evaluated map (bootstrap resamples shared by all)."""
    counts = seg.bootstrap_counts(n_images, n_resamples=n_resamples, seed=seed)
    per = {k: seg.SegStats(*(v[i] for v in all_stats)) for i, k in enumerate(names)}
    base = "cls_attn" if "cls_attn" in per else None
    index = {m: k for k, m in table.items()}
    return {k: _entry(k, table.get(k), per, counts=counts, base=base, index=index) for k in names}


def _meta(
    info: dict, acc: _Pass, *, n_images, grid, thresh, bootstrap, methods_evaluated, extended
) -> dict:
    """The run's description: model, data, protocol, accuracy, |λ2| summary, backend."""
    return {
        **info,
        "n_images": n_images,
        "grid": list(grid),
        "thresh": thresh,
        "protocol": PROTOCOL,
        "bootstrap": bootstrap,
        "classification_acc": acc.correct / n_images,
        "last_layer_lambda2": _lambda2_summary(np.concatenate(acc.lams)),
        "backend": jax.default_backend(),
        "methods_evaluated": methods_evaluated,
        "extended": bool(extended),
    }


def _timing(acc: _Pass, *, t_all, t_boot, n_images, batch_size) -> dict:
    return {
        "total_s": time.perf_counter() - t_all,
        "data_s": acc.t_data,
        "model_maps_stats_s": acc.t_compute,
        "first_step_incl_compile_s": acc.first_step,
        "bootstrap_s": t_boot,
        "images_per_s_steady": (n_images - min(batch_size, n_images))
        / max(acc.t_compute - acc.first_step, 1e-9)
        if n_images > batch_size
        else None,
    }


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
    t_all = time.perf_counter()
    model, info = _load(source)
    size, patch = info["image_size"], info["patch_size"]
    grid = (size // patch, size // patch)
    table = _prepare_methods(methods, extended=extended, info=info)
    names = tuple(table) + tuple(REFERENCES)
    step = _step_fn(model, names, table, grid=grid, num_prefix=info["num_prefix"], thresh=thresh)
    acc = _run_batches(
        step,
        n_images,
        batch_size,
        size=size,
        grid=grid,
        data_seed=info["data_seed"] if data_seed is None else data_seed,
        figure_images=figure_images,
        progress=progress,
        t_all=t_all,
    )
    all_stats = acc.stats()
    t0 = time.perf_counter()
    results = _score(names, table, all_stats, n_images=n_images, n_resamples=n_resamples, seed=seed)
    t_boot = time.perf_counter() - t0
    out = {
        "note": SYNTHETIC_NOTE,
        "meta": _meta(
            info,
            acc,
            n_images=n_images,
            grid=grid,
            thresh=thresh,
            bootstrap={"n_resamples": n_resamples, "seed": seed, "level": 0.95},
            methods_evaluated=len(names),
            extended=extended,
        ),
        "timing": _timing(
            acc, t_all=t_all, t_boot=t_boot, n_images=n_images, batch_size=batch_size
        ),
        "order": list(names),
        "methods": results,
    }
    if out_dir is not None:
        write_outputs(out, out_dir, fig_data=acc.fig_data)
    return out


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
