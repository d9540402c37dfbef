"""Segmentation by bouncing from the label tokens through the DiT's joint attention (issue #15).

The paper's best zero-shot numbers come from a diffusion transformer with joint text–image
attention: bounce from the class-name token through the chain and read the map over the image
tokens. Here the class-conditional DiT of ``experiments/train_dit.py`` plays that part on the
benchmark's test images (one object, exact mask), at 32 px (8×8 image tokens):

1. each test image is noised to timestep ``t`` (several levels) and run through the model with
   its true label, and again with a wrong one (``(label + 1) % 10``, the control);
2. per layer, heads averaged (uniform or λ2-weighted), the joint ``(L + N)`` chain gives maps
   over the image tokens only (the label tokens stay states of the chain, as in the paper):
   the label tokens' attention row (one step), forward bounces from the label tokens
   (``n = 1 … 10``), reverse bounces (to the label tokens) and TokenRank;
3. maps are scored with ``markov_attn.segmentation`` (per-map min–max, nearest upsampling,
   threshold at the mean; mIoU, mAP, pixel accuracy with bootstrap intervals), next to the
   centre prior and the per-token oracle at the same resolution.

Command::

    python -m experiments.label_bounce --workdir runs/dit_cpu [--update-readme]
"""

import argparse
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import markov_attn as ma
from markov_attn import segmentation as seg

from .readme import publish

LEVELS = (100, 300, 500, 800)
STEPS = 10
LAST_K = "last 3"  # the mean chain of the last three layers, next to each single layer
TRUE, WRONG = "true label", "wrong label"
HEADS = ("uniform", "lambda2")
LABEL_ROW = "label row (one step, no teleport)"
# Krylov dimension of the |λ2| behind the λ2 head weights. On the 68-token joint chains of the
# cpu DiT (4 levels × 7 layers × 50 test images), 32 gives |λ2| within 7e-7 of float64
# eigenvalues and the head weights within 3e-7 of the default's (128, capped at n - 1), at a
# fifth of its cost; the default made |λ2| most of this script's time.
KRYLOV = 32
FAMILIES = {
    "label row": [LABEL_ROW],
    "forward bounce": [f"forward bounce n={s}" for s in range(1, STEPS + 1)],
    "reverse bounce": [f"reverse bounce n={s}" for s in range(1, STEPS + 1)],
    "TokenRank": ["TokenRank"],
}


def _maps(attn, n_label: int, heads: str):
    """``attn`` ``(B, H, L+N, L+N)`` of one layer -> dict name -> ``(B, N)`` maps."""
    if heads == "lambda2":
        w = ma.head_weights(ma.second_eigenvalue(attn, krylov=KRYLOV))
        chain = ma.average(attn, weights=w, axis=-3)
    else:
        chain = ma.average(attn, axis=-3)
    b, n = chain.shape[0], chain.shape[-1]
    start = jnp.zeros((b, n), jnp.float32).at[:, :n_label].set(1.0 / n_label)
    fwd = ma.bounce(chain, start, steps=STEPS, direction="forward")  # (B, STEPS+1, n)
    rev = ma.bounce(chain, start, steps=STEPS, direction="reverse")
    out = {LABEL_ROW: jnp.einsum("bn,bnm->bm", start, chain)}
    for s in range(1, STEPS + 1):
        out[f"forward bounce n={s}"] = fwd[:, s]
        out[f"reverse bounce n={s}"] = rev[:, s]
    out["TokenRank"] = ma.tokenrank(chain)
    return {k: v[:, n_label:] for k, v in out.items()}


def evaluate(workdir, *, n_images=1000, levels=LEVELS, batch_size=100, seed=0, progress=True):
    from markov_attn.data import centre_prior, oracle_map

    from .train_dit import load_dit, load_split

    t0 = time.perf_counter()
    model, cfg = load_dit(workdir)
    if cfg.data == "synthetic":
        raise ValueError(
            f"{workdir} trained on synthetic data, which has no object masks to score maps "
            "against; train on the benchmark (the default data)"
        )
    mc = cfg.model
    grid = mc.image_size // mc.patch_size
    # the run's own test images (its data root), quantised to uint8 as in training
    d = load_split(cfg, "test", n_images, masks=True)
    masks, labels = d["masks"], d["labels"].astype(np.int32)
    x0 = d["images"].astype(np.float32) / 255.0 * 2.0 - 1.0
    noise = np.asarray(jax.random.normal(jax.random.key(seed), x0.shape), np.float32)

    @jax.jit
    def attention(x, t, y):
        return model(x, t, y)[1]["attn"]  # (B, depth, H, L+N, L+N)

    @jax.jit
    def layer_maps(attn):
        return {h: _maps(attn, mc.n_label, h) for h in HEADS}

    layers = [*range(mc.depth), LAST_K]
    k_last = min(3, mc.depth)

    @jax.jit
    def last_k(attn):  # the mean chain of the last k layers (a mean of chains is a chain)
        return jnp.mean(attn[:, -k_last:], axis=1)

    def run(t, y, layer_list, keep=None):
        """Per-image statistics of the maps at noise level ``t`` with labels ``y``, keyed
        ``(layer, heads, map)`` (only the keys in ``keep`` when given)."""
        per = {}
        for s in range(0, n_images, batch_size):
            xt = ma_q_sample(x0[s : s + batch_size], t, noise[s : s + batch_size], cfg)
            attn = attention(xt, jnp.full((len(xt),), t), jnp.asarray(y[s : s + batch_size]))
            for layer in layer_list:
                a = attn[:, layer] if isinstance(layer, int) else last_k(attn)
                for h, maps in layer_maps(a).items():
                    for name, m in maps.items():
                        if keep is None or (layer, h, name) in keep:
                            per.setdefault((layer, h, name), []).append(np.asarray(m))
        return {
            k: seg.image_stats(np.concatenate(p).reshape(n_images, grid, grid), masks)
            for k, p in per.items()
        }

    rows, best = {}, []
    counts = seg.bootstrap_counts(n_images, n_resamples=1000, seed=0)
    wrong_labels = (labels + 1) % mc.num_classes
    for t in levels:
        stats = run(t, labels, layers)
        res = {k: seg.summarize(v) for k, v in stats.items()}
        rows.update({"|".join(map(str, (t, TRUE, *k))): v for k, v in res.items()})
        picks = {
            family: max(
                (res[(layer, h, nm)]["miou"], str(layer), layer, h, nm)
                 for layer in layers for h in HEADS for nm in names
            )[2:]
            for family, names in FAMILIES.items()
        }  # fmt: skip
        # the control: the wrong label, only for the maps chosen with the true one
        chosen = [layer for layer in layers if any(p[0] == layer for p in picks.values())]
        wrong = run(t, wrong_labels, chosen, keep=set(picks.values()))
        best += _best_rows(t, picks, stats, res, wrong, counts)
        if progress:
            print(f"  t={t}: {time.perf_counter() - t0:.0f} s", flush=True)
    refs = {
        "centre prior": np.broadcast_to(centre_prior(mc.image_size, grid), (n_images, grid, grid)),
        "oracle (mask averaged per token)": oracle_map(masks, grid),
    }
    ref_rows = {}
    for name, m in refs.items():
        st = seg.image_stats(np.asarray(m).reshape(n_images, grid, grid), masks)
        ref_rows[name] = {**seg.summarize(st), "ci": seg.bootstrap(st, counts=counts)}
    return {
        "workdir": str(workdir),
        "n_images": n_images,
        "levels": list(levels),
        "layers": [str(x) for x in layers],
        "rows": rows,
        "best": best,
        "refs": ref_rows,
        "total_s": time.perf_counter() - t0,
        "backend": jax.default_backend(),
    }


def _best_rows(t, picks, stats, res, wrong, counts) -> list[dict]:
    """Rows of one noise level: per map family the best ``(layer, heads, map)`` by mIoU with
    the true label, its interval, and paired differences (same images, same resamples)
    against the wrong-label control and, for bounces and TokenRank, against the best one-step
    label row (the family's winner, at its own layer and heads)."""
    out = []
    base = picks["label row"]
    for family, key in picks.items():
        layer, h, nm = key
        row = {
            "t": t, "family": family, "layer": str(layer), "heads": h, "map": nm,
            "true": res[key], "true_ci": seg.bootstrap(stats[key], counts=counts),
            "wrong": seg.summarize(wrong[key]),
            "minus_wrong_ci": seg.bootstrap(stats[key], counts=counts, baseline=wrong[key]),
        }  # fmt: skip
        if key != base:
            row["label_row"] = res[base]
            row["minus_label_row_ci"] = seg.bootstrap(
                stats[key], counts=counts, baseline=stats[base]
            )
        out.append(row)
    return out


def ma_q_sample(x0, t, noise, cfg):
    from markov_attn.nn import q_sample

    t = jnp.full((x0.shape[0],), t, jnp.int32)
    return q_sample(x0, t, noise, schedule=cfg.schedule, num_timesteps=cfg.num_timesteps)


def _pct(m: dict, ci: dict, key: str) -> str:
    lo, hi = ci[key]
    return f"{100 * m[key]:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def _diff(a: dict, b: dict, ci: dict, key: str) -> str:
    lo, hi = ci[key]
    return f"{100 * (a[key] - b[key]):+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def table(res: dict, block: str = "") -> str:
    """Per noise level and map family, the best layer / heads / map with intervals, and the
    paired differences against the one-step label row and the wrong-label control; ``block``
    (e.g. ``" --block NAME"``) ends the command line that the note gives."""
    lines = [
        "| t | best map of its family (layer, heads) | mIoU | mAP | − label row (mIoU) "
        "| − wrong label (mIoU) |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["best"]:
        vs_row = (
            _diff(r["true"], r["label_row"], r["minus_label_row_ci"], "miou")
            if "label_row" in r
            else "—"
        )
        lines.append(
            f"| {r['t']} | {r['map']} (layer {r['layer']}, {r['heads']}) "
            f"| {_pct(r['true'], r['true_ci'], 'miou')} | {_pct(r['true'], r['true_ci'], 'map')} "
            f"| {vs_row} | {_diff(r['true'], r['wrong'], r['minus_wrong_ci'], 'miou')} |"
        )
    for name, r in res["refs"].items():
        lines.append(
            f"| — | {name} | {_pct(r, r['ci'], 'miou')} | {_pct(r, r['ci'], 'map')} | — | — |"
        )
    lines += [
        "",
        f"{res['n_images']} benchmark test images at 32 px (8×8 image tokens), DiT "
        f"`{res['workdir']}`, noised to t and run with the true label (and a wrong one, "
        "`(y + 1) mod 10`, for the control). Layers 0–"
        f"{len(res['layers']) - 2} and `last 3` (the mean chain of the last three layers); the "
        "best layer, head weighting and n per family are chosen on these same images (an "
        "optimistic selection; the table says which won). Differences are paired (same images, "
        'same bootstrap resamples; 95 % intervals); "− label row" compares with the best '
        "one-step label row of the same t (first row of each block); the wrong-label control "
        "is run for the chosen maps only. "
        f"Total {res['total_s']:.0f} s on {res['backend']}. Command: "
        f"`python -m experiments.label_bounce --workdir {res['workdir']} --update-readme"
        f"{block}`.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.label_bounce", description=__doc__)
    p.add_argument("--workdir", required=True, help="a train_dit run directory")
    p.add_argument("--n-images", type=int, default=1000)
    p.add_argument("--out", default=None, help="default: <workdir>/label_bounce")
    p.add_argument("--update-readme", nargs="?", const="README.md", metavar="README")
    p.add_argument("--block", default="label-bounce", help="the README block to replace")
    a = p.parse_args(argv)
    res = evaluate(a.workdir, n_images=a.n_images)
    out = pathlib.Path(a.out or pathlib.Path(a.workdir) / "label_bounce")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1, default=list))
    block = "" if a.block == "label-bounce" else f" --block {a.block}"
    md = table(res, block)
    (out / "results.md").write_text(md)
    publish(md, a.update_readme, a.block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
