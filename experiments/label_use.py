"""Does a trained DiT use its label? Its held-out denoising loss with the true, a wrong and the
null label (issue #15's precondition: a label-token map can only be about the class if the
model reads the class).

Each test image is noised once per level ``t`` with one fixed ``ε`` (the same for every label
and every checkpoint), and the EMA model predicts ``ε`` three times: with the image's label
``y``, with a wrong one ``(y + 1) % 10`` and with the null label (the unconditional path that
label dropout trains). A model that reads its label predicts better with the true one:
``gain = L(wrong) − L(true) > 0``, reported relative to ``L(true)`` with a percentile bootstrap
interval over images (paired: the same images, noise and ``t`` in both terms). Read at every
kept checkpoint of a run, this is the curve of label use over training. On the benchmark the
label can help only where the object is (the photo behind it does not depend on the class), so
the gain is also given over the object's pixels alone (its mask, ``alpha > 0.5``: about a sixth
of a 32-px image on average, 3–35 %; the soft rim below 0.5 counts as background), where a
whole-image average would dilute it. Each image counts once in that average, whatever the size
of its object.

Command::

    python -m experiments.label_use --workdir runs/dit_cpu_long [--update-readme]
"""

import argparse
import functools
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from .readme import command_line, publish

LEVELS = (100, 300, 500, 800)
CONDITIONS = ("true", "wrong", "null")


def losses(
    model, cfg, images, labels, *, masks=None, levels=LEVELS, batch_size=100, seed=0
) -> dict:
    """Per-image denoising losses ``{condition: (n_images, len(levels))}`` of ``model``
    (a :class:`markov_attn.nn.DiT`, or any ``(x_t, t, y) -> (eps, aux)``) on ``images``
    ``(n, H, W, 3)``: uint8 (as in training) or floats in ``[0, 1]``. With ``masks``
    ``(n, H, W)`` bool (the objects), also ``{condition + "_object": ...}``: the loss over the
    mask's pixels only (NaN for an empty mask)."""
    from flax import nnx

    images = np.asarray(images)
    x0 = images / 127.5 - 1.0 if images.dtype == np.uint8 else images * 2.0 - 1.0
    x0 = x0.astype(np.float32)
    labels = np.asarray(labels, np.int32)
    if max(levels) >= cfg.num_timesteps or min(levels) < 0:
        raise ValueError(f"levels must lie in [0, {cfg.num_timesteps}), got {tuple(levels)}")
    noise = np.asarray(jax.random.normal(jax.random.key(seed), x0.shape), np.float32)
    weights = np.ones(x0.shape[:3], np.float32) if masks is None else np.asarray(masks, np.float32)
    if weights.shape != x0.shape[:3]:
        raise ValueError(f"masks must have shape {x0.shape[:3]}, got {weights.shape}")
    keys = [*CONDITIONS, *(f"{c}_object" for c in CONDITIONS if masks is not None)]
    if isinstance(model, nnx.Module):  # weights as arguments: one program for every checkpoint
        graphdef, state = nnx.split(model)
        fn = _per_image(graphdef, cfg)
    else:
        state, fn = None, jax.jit(lambda _, *a: _per_image_body(model, cfg, *a))
    out = {c: np.zeros((len(labels), len(levels)), np.float64) for c in keys}
    for j, level in enumerate(levels):
        for s in range(0, len(labels), batch_size):
            sl = slice(s, s + batch_size)
            t = jnp.full((len(labels[sl]),), level, jnp.int32)
            got = fn(state, x0[sl], noise[sl], t, labels[sl], weights[sl])
            for c in keys:
                out[c][sl, j] = np.asarray(got[c])
    return out


def _per_image_body(model, cfg, x0, eps, t, y, w):
    from markov_attn.nn import q_sample

    xt = q_sample(x0, t, eps, schedule=cfg.schedule, num_timesteps=cfg.num_timesteps)
    k = cfg.model.num_classes
    ys = {"true": y, "wrong": (y + 1) % k, "null": jnp.full_like(y, cfg.model.null_label)}
    out = {}
    for c, label in ys.items():
        err = jnp.mean((model(xt, t, label)[0] - eps) ** 2, axis=-1)  # (b, H, W)
        out[c] = jnp.mean(err, axis=(1, 2))
        out[c + "_object"] = jnp.sum(err * w, axis=(1, 2)) / jnp.sum(w, axis=(1, 2))
    return out


@functools.lru_cache(maxsize=4)
def _per_image(graphdef, cfg):
    from flax import nnx

    return jax.jit(lambda st, *a: _per_image_body(nnx.merge(graphdef, st), cfg, *a))


def _gain(a, b, ref, *, n_resamples=1000, seed=0):
    """``mean(a − b) / mean(ref)`` in %, with a percentile bootstrap interval that resamples
    the images of numerator and denominator together (paired)."""
    d, ref = np.asarray(a - b, np.float64), np.asarray(ref, np.float64)
    idx = np.random.default_rng(seed).integers(0, len(d), (n_resamples, len(d)))
    ratios = 100.0 * d[idx].mean(1) / ref[idx].mean(1)
    lo, hi = np.quantile(ratios, (0.025, 0.975))
    return [100.0 * float(d.mean() / ref.mean()), float(lo), float(hi)]


def summarise(step: int, per: dict, levels=LEVELS) -> dict:
    """One checkpoint's row: mean losses, and the relative gains of the true label over the
    wrong and the null one (all levels, and per level); with the object losses of
    :func:`losses` also the gains over the objects' pixels (images with an object)."""
    true, wrong, null = (per[c] for c in CONDITIONS)
    extra = {}
    ok = ~np.isnan(per["true_object"]).any(axis=1) if "true_object" in per else None
    if ok is not None and ok.any():  # (no object gains when no image has an object)
        t_o, w_o, n_o = (per[c + "_object"][ok].mean(1) for c in CONDITIONS)
        extra = {
            "loss_object": {
                "true": float(t_o.mean()),
                "wrong": float(w_o.mean()),
                "null": float(n_o.mean()),
            },
            "gain_wrong_object": _gain(w_o, t_o, t_o),
            "gain_null_object": _gain(n_o, t_o, t_o),
        }
    return {
        "step": step,
        "loss": {c: float(np.mean(per[c])) for c in CONDITIONS},
        "gain_wrong": _gain(wrong.mean(1), true.mean(1), true.mean(1)),
        "gain_null": _gain(null.mean(1), true.mean(1), true.mean(1)),
        "gain_wrong_by_t": {
            str(t): _gain(wrong[:, j], true[:, j], true[:, j]) for j, t in enumerate(levels)
        },
        **extra,
    }


def evaluate(workdir, *, steps=None, n_images=1000, levels=LEVELS, seed=0) -> dict:
    """The label-use rows of a run's kept checkpoints (``steps``: a subset, default all)."""
    from .ckpt import Checkpointer
    from .train_dit import config_from_dict, load_dit, load_split

    workdir = pathlib.Path(workdir)
    if not (workdir / "checkpoints").is_dir():
        raise FileNotFoundError(f"no checkpoint under {workdir / 'checkpoints'}; train first")
    with Checkpointer(workdir / "checkpoints") as ck:
        kept = ck.all_steps()
        if not kept:
            raise FileNotFoundError(f"no checkpoint under {workdir / 'checkpoints'}; train first")
        missing = sorted(set(steps or ()) - set(kept))
        if missing:
            raise ValueError(f"steps {missing} are not kept in {workdir}; kept: {kept}")
        steps = sorted(steps or kept)
        cfg = config_from_dict(ck.read_meta(step=steps[-1])["config"])
    test = load_split(cfg, "test", n_images, masks=True)
    images, labels = test["images"], np.asarray(test["labels"], np.int32)
    masks = test.get("masks")
    rows = []
    for step in steps:
        t0 = time.perf_counter()
        model, _ = load_dit(workdir, step=step)
        per = losses(model, cfg, images, labels, masks=masks, levels=levels, seed=seed)
        rows.append({**summarise(step, per, levels), "seconds": time.perf_counter() - t0})
        g = rows[-1]["gain_wrong"]
        print(f"step {step}: L(wrong) - L(true) = {g[0]:+.3f} % [{g[1]:+.3f}, {g[2]:+.3f}]")
    return {
        "workdir": str(workdir),
        "preset": cfg.name,
        "total_steps": cfg.steps,
        "num_classes": cfg.model.num_classes,
        "n_images": n_images,
        "levels": list(levels),
        "rows": rows,
    }


def _fmt(g) -> str:
    return f"{g[0]:+.3f} [{g[1]:+.3f}, {g[2]:+.3f}]"


def table(res: dict, command: str) -> str:
    levels = res["levels"]
    head = (
        "| step | L(true) | L(wrong) − L(true), % | L(null) − L(true), % | "
        + " | ".join(f"wrong − true at t = {t}, %" for t in levels)
        + " |"
    )
    obj = all("gain_wrong_object" in r for r in res["rows"])
    if obj:
        head += " object: L(true) | object: L(wrong) − L(true), % | object: L(null) − L(true), % |"
    lines = [head, "|" + "---|" * (4 + len(levels) + 3 * obj)]
    for r in res["rows"]:
        by_t = " | ".join(_fmt(r["gain_wrong_by_t"][str(t)]) for t in levels)
        line = (
            f"| {r['step']} | {r['loss']['true']:.4f} | {_fmt(r['gain_wrong'])} | "
            f"{_fmt(r['gain_null'])} | {by_t} |"
        )
        if obj:
            line += (
                f" {r['loss_object']['true']:.4f} | {_fmt(r['gain_wrong_object'])} | "
                f"{_fmt(r['gain_null_object'])} |"
            )
        lines.append(line)
    note = (
        f"\nEMA weights of `{res['workdir']}` (preset `{res['preset']}`, {res['total_steps']} "
        f"steps in all) at each kept checkpoint; {res['n_images']} benchmark test images, each "
        f"noised at t ∈ {{{', '.join(map(str, levels))}}} with one fixed ε, predicted with the "
        f"true label, a wrong one ((y + 1) mod {res['num_classes']}) and the null label. "
        "Losses are the mean "
        "ε-MSE; differences are relative to L(true), with 95 % percentile bootstrap intervals "
        "over images (paired). Positive: the model predicts better with the true label. "
        + (
            "The object columns average the squared error over each image's object mask only "
            "(alpha > 0.5; the photo behind the object does not depend on the label), each "
            "image counted once. "
            if obj
            else ""
        )
        + f"Command: `{command}`."
    )
    return "\n".join(lines) + "\n" + note


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.label_use", description=__doc__)
    p.add_argument("--workdir", required=True, help="a train_dit run directory")
    p.add_argument("--steps", type=int, nargs="+", help="checkpoints to read (default: all kept)")
    p.add_argument("--n-images", type=_positive, default=1000)
    p.add_argument("--update-readme", nargs="?", const="README.md", metavar="README")
    p.add_argument("--block", default="label-use", help="the README block to replace")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    a = _parser().parse_args(argv)
    try:
        res = evaluate(a.workdir, steps=a.steps, n_images=a.n_images)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    name = "label_use.json" if not a.steps else f"label_use_{'_'.join(map(str, a.steps))}.json"
    out = pathlib.Path(a.workdir) / name
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")
    try:
        text = table(res, command_line("experiments.label_use", argv))
        publish(text, a.update_readme, a.block)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
