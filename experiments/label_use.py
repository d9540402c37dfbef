"""Does a trained DiT use its label? Its held-out denoising loss with the true, a wrong and the
null label (issue #15's precondition: a label-token map can only be about the class if the
model reads the class).

Each test image is noised once per level ``t`` with one fixed ``ε`` (the same for every label
and every checkpoint), and the EMA model predicts ``ε`` three times: with the image's label
``y``, with a wrong one ``(y + 1) % 10`` and with the null label (the unconditional path that
label dropout trains). A model that reads its label predicts better with the true one:
``gain = L(wrong) − L(true) > 0``, reported relative to ``L(true)`` with a percentile bootstrap
interval over images (paired: the same images, noise and ``t`` in both terms). Read at every
kept checkpoint of a run, this is the curve of label use over training.

Command::

    python -m experiments.label_use --workdir runs/dit_cpu_long [--update-readme]
"""

import argparse
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from markov_attn.segmentation import bootstrap_mean

from .readme import command_line, publish

LEVELS = (100, 300, 500, 800)
CONDITIONS = ("true", "wrong", "null")


def losses(model, cfg, images, labels, *, levels=LEVELS, batch_size=100, seed=0) -> dict:
    """Per-image denoising losses ``{condition: (n_images, len(levels))}`` of ``model``
    (a :class:`markov_attn.nn.DiT`) on ``images`` ``(n, H, W, 3)`` in ``[0, 1]``."""
    from markov_attn.nn import q_sample

    x0 = np.asarray(images, np.float32) * 2.0 - 1.0
    labels = np.asarray(labels, np.int32)
    noise = np.asarray(jax.random.normal(jax.random.key(seed), x0.shape), np.float32)
    null = cfg.model.null_label

    @jax.jit
    def per_image(x0, eps, t, y):
        xt = q_sample(x0, t, eps, schedule=cfg.schedule, num_timesteps=cfg.num_timesteps)
        ys = {"true": y, "wrong": (y + 1) % cfg.model.num_classes, "null": jnp.full_like(y, null)}
        return {c: jnp.mean((model(xt, t, ys[c])[0] - eps) ** 2, axis=(1, 2, 3)) for c in ys}

    out = {c: np.zeros((len(labels), len(levels)), np.float64) for c in CONDITIONS}
    for j, level in enumerate(levels):
        for s in range(0, len(labels), batch_size):
            sl = slice(s, s + batch_size)
            t = jnp.full((len(labels[sl]),), level, jnp.int32)
            got = per_image(x0[sl], noise[sl], t, labels[sl])
            for c in CONDITIONS:
                out[c][sl, j] = np.asarray(got[c])
    return out


def _gain(a, b, ref):
    """Mean of ``a − b`` relative to the mean of ``ref``, in %, with its bootstrap interval."""
    scale = 100.0 / float(np.mean(ref))
    lo, hi = bootstrap_mean(a - b)
    return [float(np.mean(a - b)) * scale, lo * scale, hi * scale]


def summarise(step: int, per: dict, levels=LEVELS) -> dict:
    """One checkpoint's row: mean losses, and the relative gains of the true label over the
    wrong and the null one (all levels, and per level)."""
    true, wrong, null = (per[c] for c in CONDITIONS)
    row = {
        "step": step,
        "loss": {c: float(np.mean(per[c])) for c in CONDITIONS},
        "gain_wrong": _gain(wrong.mean(1), true.mean(1), true),
        "gain_null": _gain(null.mean(1), true.mean(1), true),
        "gain_wrong_by_t": {
            str(t): _gain(wrong[:, j], true[:, j], true[:, j]) for j, t in enumerate(levels)
        },
    }
    return row


def evaluate(workdir, *, steps=None, n_images=1000, levels=LEVELS, seed=0) -> dict:
    """The label-use rows of a run's kept checkpoints (``steps``: a subset, default all)."""
    from markov_attn.data import make_split

    from .ckpt import Checkpointer
    from .train_dit import load_dit

    workdir = pathlib.Path(workdir)
    with Checkpointer(workdir / "checkpoints") as ck:
        kept = ck.all_steps()
    if not kept:
        raise FileNotFoundError(f"no checkpoint under {workdir / 'checkpoints'}; train first")
    missing = sorted(set(steps or ()) - set(kept))
    if missing:
        raise ValueError(f"steps {missing} are not kept in {workdir}; kept: {kept}")
    steps = sorted(steps or kept)
    _, cfg = load_dit(workdir, step=steps[-1])
    d = make_split("test", n_images, size=cfg.model.image_size, seed=cfg.data_seed)
    rows = []
    for step in steps:
        t0 = time.perf_counter()
        model, _ = load_dit(workdir, step=step)
        per = losses(model, cfg, d["images"], d["labels"], levels=levels, seed=seed)
        rows.append({**summarise(step, per, levels), "seconds": time.perf_counter() - t0})
        g = rows[-1]["gain_wrong"]
        print(f"step {step}: L(wrong) - L(true) = {g[0]:+.2f} % [{g[1]:+.2f}, {g[2]:+.2f}]")
    return {
        "workdir": str(workdir),
        "preset": cfg.name,
        "total_steps": cfg.steps,
        "n_images": n_images,
        "levels": list(levels),
        "rows": rows,
    }


def _fmt(g) -> str:
    return f"{g[0]:+.2f} [{g[1]:+.2f}, {g[2]:+.2f}]"


def table(res: dict, command: str) -> str:
    levels = res["levels"]
    head = (
        "| step | L(true) | L(wrong) − L(true), % | L(null) − L(true), % | "
        + " | ".join(f"wrong − true at t = {t}, %" for t in levels)
        + " |"
    )
    lines = [head, "|" + "---|" * (4 + len(levels))]
    for r in res["rows"]:
        by_t = " | ".join(_fmt(r["gain_wrong_by_t"][str(t)]) for t in levels)
        lines.append(
            f"| {r['step']} | {r['loss']['true']:.4f} | {_fmt(r['gain_wrong'])} | "
            f"{_fmt(r['gain_null'])} | {by_t} |"
        )
    note = (
        f"\nEMA weights of `{res['workdir']}` (preset `{res['preset']}`, {res['total_steps']} "
        f"steps in all) at each kept checkpoint; {res['n_images']} benchmark test images, each "
        f"noised at t ∈ {{{', '.join(map(str, levels))}}} with one fixed ε, predicted with the "
        "true label, a wrong one ((y + 1) mod 10) and the null label. Losses are the mean "
        "ε-MSE; differences are relative to L(true), with 95 % percentile bootstrap intervals "
        "over images (paired). Positive: the model predicts better with the true label. "
        f"Command: `{command}`."
    )
    return "\n".join(lines) + "\n" + note


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.label_use", description=__doc__)
    p.add_argument("--workdir", required=True, help="a train_dit run directory")
    p.add_argument("--steps", type=int, nargs="+", help="checkpoints to read (default: all kept)")
    p.add_argument("--n-images", type=int, default=1000)
    p.add_argument("--update-readme", nargs="?", const="README.md", metavar="README")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    a = _parser().parse_args(argv)
    try:
        res = evaluate(a.workdir, steps=a.steps, n_images=a.n_images)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = pathlib.Path(a.workdir) / "label_use.json"
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")
    publish(table(res, command_line("experiments.label_use", argv)), a.update_readme, "label-use")
    return 0


if __name__ == "__main__":
    sys.exit(main())
