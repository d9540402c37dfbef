"""The main job (``make demo``): train the TokenRank-head ViT and show what its attention does.

Trains the ``demo`` preset (the ``cpu`` preset with 2,000 steps) with the TokenRank pooling
head into ``runs/demo`` (resuming from a checkpoint there, or only evaluating if the run is
complete), evaluates it on the benchmark's test split, and writes figures: for a grid of test
images, the image, the TokenRank map, the bounce maps n = 1..4 from the CLS token and the
column sum, each overlaid on the image.

Which chain each map reads (last layer, as the pooling head does):

- TokenRank: the head's own weights ``π``, the stationary distribution of the last layer's
  attention restricted to the patch tokens (CLS removed before the softmax), heads averaged with
  ``|λ2|`` weights.
- Bounces and column sum: the full last-layer chain including CLS (heads ``|λ2|``-weighted),
  ``markov_attn.bounce`` from the CLS token with the default teleportation ``α = 0.99``;
  the maps are shown over the patch tokens, each rescaled on its own.

Also draws the learning curve (training loss and accuracy, and the test accuracy every
``eval_every`` steps) into ``runs/demo/learning_curve.png``.

The preset trains and tests on the benchmark itself (the ``"standard"`` level); a
run on another level (``--set difficulty=plain`` in ``experiments.train``) also reports the
standard level in its summary.

Command: ``python -m experiments.demo`` (no arguments). Runtime: the preset's training (about
9 min on 2 idle cores of the AMD EPYC of 2026-12-07 at ~270 ms a step, data generation ~27 s;
the step time differs by up to 2.6x between this project's 2-core machines, README) plus
under a minute for evaluation and figures.
"""

import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from markov_attn import segmentation as seg
from markov_attn.data import CLASSES, make_split
from markov_attn.nn import CheckpointError, TokenRankPool, load_run
from markov_attn.viz import bounce_strip

from .configs import get_preset
from .curves import plot_learning_curve
from .train import train_and_evaluate

WORKDIR = pathlib.Path("runs/demo")
NUM_IMAGES = 8
BOUNCES = 4


def attention_maps(model, images: np.ndarray, /, *, steps: int = BOUNCES) -> dict:
    """Token maps of ``images`` (float NHWC in [0, 1]) from a trained ViT's last layer.

    Returns ``{"logits", "TokenRank", "bounce 1".."bounce <steps>", "column sum"}``; the maps
    are ``(N, gh, gw)`` numpy arrays over the patch grid. TokenRank is the pooling head's
    (``TokenRankPool.weights``); the bounces (from CLS, or from the uniform distribution for a
    model without CLS) and the column sum are :class:`markov_attn.segmentation.MapMethod` s on
    the λ2-weighted last-layer chain, with the head's Krylov dimension.
    """
    graphdef, state = nnx.split(model)
    cfg = model.cfg
    p = cfg.num_prefix
    grid = (images.shape[1] // cfg.patch_size, images.shape[2] // cfg.patch_size)
    weighted = dict(weighting="lambda2", krylov=cfg.tokenrank_krylov)
    start = "cls" if cfg.cls_token else "uniform"
    methods = {
        f"bounce {k}": seg.MapMethod("bounce", steps=k, start=start, **weighted)
        for k in range(1, steps + 1)
    }
    methods["column sum"] = seg.MapMethod("column_sum", **weighted)

    @jax.jit
    def run(state, x):
        logits, aux = nnx.merge(graphdef, state)(x, return_attn_logits=True)
        pi = TokenRankPool(cfg).weights(aux["attn_logits"][:, -1], num_prefix=p)
        return logits, pi, seg.compute_maps(aux["attn"], methods, num_prefix=p, grid=grid)

    logits, pi, maps = jax.device_get(run(state, jnp.asarray(images)))
    return {"logits": logits, "TokenRank": pi.reshape(-1, *grid), **maps}


def write_figures(
    model,
    data_seed: int,
    outdir: pathlib.Path,
    /,
    *,
    n: int = NUM_IMAGES,
    difficulty: str = "standard",
):
    """Draws the bounce strip for the first ``n`` test images (of the benchmark generated with
    ``data_seed`` at level ``difficulty``); returns the written paths."""
    outdir.mkdir(parents=True, exist_ok=True)
    test = make_split("test", n, size=model.cfg.image_size, seed=data_seed, difficulty=difficulty)
    maps = attention_maps(model, test["images"])
    pred = np.argmax(maps.pop("logits"), -1)
    labels = [
        f"{CLASSES[t]} / {CLASSES[q]}" + ("" if t == q else " ✗")
        for t, q in zip(test["labels"], pred)
    ]
    paths = []
    for method in ("bilinear", "nearest"):
        path = outdir / f"bounce_strip_{method}.png"
        bounce_strip(
            test["images"],
            maps,
            path=path,
            method=method,
            row_labels=labels,
            title="last layer: TokenRank (pooling weights), bounces n=1..4 from CLS, column sum"
            "  (label: true / predicted)",
        )
        paths.append(str(path))
    np.savez_compressed(
        outdir / "maps.npz",
        images=test["images"],
        labels=test["labels"],
        predictions=pred,
        **{k.replace(" ", "_"): v for k, v in maps.items()},
    )
    paths.append(str(outdir / "maps.npz"))
    return paths


def main() -> int:
    t0 = time.perf_counter()
    cfg = get_preset("demo", pool="tokenrank")
    print(f"training the '{cfg.name}' preset with the TokenRank head into {WORKDIR} ...")
    try:
        summary = train_and_evaluate(cfg, WORKDIR)
    # a runs/demo of another preset (e.g. the 1,800-step one before 2026-12-07), missing data,
    # a damaged checkpoint or a diverged run: one line, as experiments.train prints it
    except (CheckpointError, FileNotFoundError, ValueError, FloatingPointError) as e:
        print(f"make demo: {e}", file=sys.stderr)
        return 2
    model, run = load_run(WORKDIR)  # run: the stored training config (a dict)
    paths = [str(plot_learning_curve(WORKDIR, title=f"make demo: {run['name']} preset, "
                                     f"{model.cfg.pool} head"))]  # fmt: skip
    level = run.get("difficulty", "standard")
    paths += write_figures(model, run["data_seed"], WORKDIR / "figures", difficulty=level)
    wall = time.perf_counter() - t0
    keys = ("test_acc", "test_acc_standard", "test_loss", "images_per_s", "step_time_ms")
    keys = tuple(k for k in (*keys, "train_time_s") if k in summary)
    print(json.dumps({k: summary[k] for k in keys}, indent=1))
    print(
        f"test accuracy {summary['test_acc']:.3f} on {summary['test_size']} test images of the "
        f"benchmark's '{level}' level"
    )
    if "test_acc_standard" in summary:
        print(
            f"test accuracy {summary['test_acc_standard']:.3f} on the same test images at the "
            "benchmark's hardest, 'standard' level (camouflage and distractors)"
        )
    print(f"run directory: {WORKDIR.absolute()} (checkpoints/, metrics.jsonl, summary.json)")
    print("figures:")
    for p in paths:
        print(f"  {pathlib.Path(p).absolute()}")
    print(f"demo wall time {wall / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
