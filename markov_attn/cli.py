"""The ``markov-attn`` command line: attention maps of a ViT checkpoint on your images.

Usage::

    markov-attn maps --checkpoint DIR --image a.jpg b.png [--method bounce --steps 2
                     --layer -1 --alpha 0.99 --heads lambda2 --size 224 --out maps/]

``DIR`` is a supported pretrained checkpoint (HF ViT / DINO / DINOv2 / CLIP, timm; see
:func:`markov_attn.checkpoints.load`) or a run directory of this project's training script
(``runs/<name>/`` with ``checkpoints/``; needs the repository's ``experiments`` package on the
path, i.e. run from the repository root). For every image it writes a PNG overlay of the chosen
map(s) and prints the TokenRank statistics (entropy, top tokens) and each head's ``|λ2|`` for the
chosen layer. The heads of that layer are combined into one chain with λ2 weights
(``--heads``) before computing the maps, except for ``rollout`` which uses all layers.

Methods (all maps are over the patch grid, from the layer's head-averaged chain ``A``):

- ``bounce``: multi-bounce maps from the CLS token (uniform start without CLS), one per step
  ``1..steps``, with teleportation ``alpha``.
- ``tokenrank``: the stationary distribution of ``A`` (with teleportation ``alpha``).
- ``colsum``: mean incoming attention, the columns of ``A`` summed.
- ``rollout``: attention rollout over layers ``0..layer``, the CLS row.
- ``cls``: the CLS row of ``A`` (one bounce without teleportation).
"""

import argparse
import json
import math
import os
import pathlib
import sys

import numpy as np

METHODS = ("bounce", "tokenrank", "colsum", "rollout", "cls")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="markov-attn", description="Transformer attention read as a Markov chain."
    )
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser(
        "maps",
        help="write attention-map overlays and print TokenRank / |λ2| for images",
        description="Attention maps (bounce, TokenRank, column sum, rollout, CLS) of a ViT "
        "checkpoint on images, written as PNG overlays.",
    )
    m.add_argument("--checkpoint", required=True, help="checkpoint directory/file or run dir")
    m.add_argument("--image", required=True, nargs="+", help="image file(s)")
    m.add_argument("--method", choices=METHODS, default="bounce")
    m.add_argument("--steps", type=int, default=2, help="bounce steps (default 2)")
    m.add_argument("--layer", type=int, default=-1, help="layer index (default -1, the last)")
    m.add_argument("--alpha", type=float, default=0.99, help="teleportation weight (0.99)")
    m.add_argument(
        "--heads",
        choices=("lambda2", "gap", "uniform"),
        default="lambda2",
        help="how heads are averaged into one chain (default lambda2)",
    )
    m.add_argument("--size", type=int, default=None, help="input side in pixels (default: native)")
    m.add_argument("--top", type=int, default=5, help="top TokenRank tokens to print")
    m.add_argument("--out", default="maps", help="output directory (default ./maps)")
    m.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _is_run_dir(path: pathlib.Path) -> bool:
    return path.is_dir() and (path / "checkpoints").is_dir()


class _Loaded:
    """A model plus the function turning image files into its input batch."""

    def __init__(self, model, cfg, prepare, unnormalize, description):
        self.model, self.cfg = model, cfg
        self.prepare, self.unnormalize = prepare, unnormalize
        self.description = description


def _load_run(path: pathlib.Path, size) -> _Loaded:
    try:
        from experiments.train import load_model
    except ImportError as e:
        raise SystemExit(
            f"{path} is a training run directory; loading it needs the repository's "
            f"'experiments' package: run markov-attn from the repository root ({e})"
        ) from e
    model, tcfg = load_model(path)
    cfg = tcfg.model
    side = size or cfg.image_size

    def prepare(image_path):
        from PIL import Image

        with Image.open(image_path) as im:
            im = im.convert("RGB").resize((side, side), Image.Resampling.BILINEAR)
            return np.asarray(im, np.float32)[None] / np.float32(255.0)

    return _Loaded(model, cfg, prepare, lambda x: x, f"training run {path}")


def _load_pretrained(path: pathlib.Path, size) -> _Loaded:
    from markov_attn.checkpoints import load, preprocess, recipe

    model, cfg, info = load(path)
    r = recipe(info, size=size)
    mean, std = np.asarray(r["mean"], np.float32), np.asarray(r["std"], np.float32)

    def prepare(image_path):
        return preprocess([image_path], info, size=size)

    def unnormalize(x):
        return np.clip(x * std + mean, 0.0, 1.0)

    return _Loaded(model, cfg, prepare, unnormalize, f"{info.family} checkpoint {info.path}")


def _token_name(i: int, num_prefix: int, has_cls: bool, gw: int) -> str:
    if has_cls and i == 0:
        return "CLS"
    if i < num_prefix:
        return f"reg{i - int(has_cls)}"
    r, c = divmod(i - num_prefix, gw)
    return f"patch({r},{c})"


def _maps(method, attn_all, chain, *, layer, steps, alpha, has_cls, num_prefix):
    """-> {title: (n,) distribution over all tokens}."""
    import jax.numpy as jnp

    import markov_attn as ma

    n = chain.shape[-1]
    if method == "bounce":
        x0 = 0 if has_cls else jnp.full((n,), 1.0 / n, jnp.float32)
        xs = ma.bounce(chain, x0, steps=steps, alpha=alpha)
        return {f"bounce {t}": xs[t] for t in range(1, steps + 1)}
    if method == "tokenrank":
        return {"TokenRank": ma.tokenrank(chain, alpha=alpha)}
    if method == "colsum":
        return {"column sum": ma.column_sum(chain)}
    if not has_cls:
        raise SystemExit(
            f"--method {method} needs a CLS token; this model has none "
            "(use bounce, tokenrank or colsum)"
        )
    if method == "rollout":
        depth = attn_all.shape[0]
        last = layer % depth
        roll = ma.rollout(attn_all[: last + 1])
        return {"rollout": ma.row_select(roll, 0)}
    return {"CLS row": ma.row_select(chain, 0)}


def _entropy(p: np.ndarray) -> float:
    q = p[p > 0]
    return float(-(q * np.log(q)).sum())


def maps_command(args) -> int:
    import jax
    import jax.numpy as jnp

    import markov_attn as ma
    from markov_attn.viz import bounce_strip

    if args.steps < 1:
        raise SystemExit("--steps must be >= 1")
    if not 0.0 <= args.alpha <= 1.0:
        raise SystemExit("--alpha must lie in [0, 1]")
    path = pathlib.Path(args.checkpoint)
    if not path.exists():
        raise SystemExit(f"checkpoint {path} does not exist")
    for img in args.image:
        if not os.path.isfile(img):
            raise SystemExit(f"image {img} does not exist")
    loaded = _load_run(path, args.size) if _is_run_dir(path) else _load_pretrained(path, args.size)
    model, cfg = loaded.model, loaded.cfg
    depth = cfg.depth
    if not -depth <= args.layer < depth:
        raise SystemExit(f"--layer must lie in [-{depth}, {depth - 1}], got {args.layer}")
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    has_cls = bool(cfg.cls_token)
    num_prefix = int(cfg.num_prefix)
    print(
        f"model: {loaded.description} (depth {depth}, {cfg.num_heads} heads, "
        f"width {cfg.width}, patch {cfg.patch_size})"
    )

    @jax.jit
    def forward(x):
        _, aux = model(x)
        return aux["attn"]

    images = list(args.image)
    progress = None
    if not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(images, desc="images", unit="img", file=sys.stderr)
        iterator = progress
    else:
        iterator = images
    report = []
    for img_path in iterator:
        x = loaded.prepare(img_path)
        attn = forward(jnp.asarray(x))[0]  # (L, H, n, n)
        layer_attn = attn[args.layer]  # (H, n, n)
        lam2 = ma.second_eigenvalue(layer_attn)  # (H,)
        w = ma.head_weights(lam2, mode=args.heads)
        chain = ma.average(layer_attn, weights=w, axis=-3)  # (n, n)
        tr = np.asarray(ma.tokenrank(chain, alpha=args.alpha), np.float64)
        gh, gw = x.shape[1] // cfg.patch_size, x.shape[2] // cfg.patch_size
        maps = _maps(
            args.method,
            attn,
            chain,
            layer=args.layer,
            steps=args.steps,
            alpha=args.alpha,
            has_cls=has_cls,
            num_prefix=num_prefix,
        )
        grids = {k: np.asarray(v)[num_prefix:].reshape(1, gh, gw) for k, v in maps.items()}
        stem = pathlib.Path(img_path).stem
        png = out_dir / f"{stem}_{args.method}.png"
        bounce_strip(
            loaded.unnormalize(x),
            grids,
            path=png,
            title=f"{stem}: layer {args.layer % depth}, {args.heads} heads",
        )
        top = np.argsort(-tr)[: args.top]
        n = tr.shape[0]
        stats = {
            "image": str(img_path),
            "png": str(png),
            "layer": args.layer % depth,
            "tokenrank_entropy": _entropy(tr),
            "tokenrank_entropy_normalized": _entropy(tr) / math.log(n),
            "tokenrank_top": [
                {
                    "token": int(i),
                    "name": _token_name(int(i), num_prefix, has_cls, gw),
                    "mass": float(tr[i]),
                }
                for i in top
            ],
            "lambda2": [float(v) for v in np.asarray(lam2)],
            "head_weights": [float(v) for v in np.asarray(w)],
        }
        report.append(stats)
        lines = [
            f"{img_path} -> {png}",
            f"  TokenRank (layer {stats['layer']}): entropy {stats['tokenrank_entropy']:.4f} nats "
            f"({stats['tokenrank_entropy_normalized']:.3f} of log n, n={n})",
            "  top tokens: "
            + ", ".join(f"{t['name']} {t['mass']:.4f}" for t in stats["tokenrank_top"]),
            "  |λ2| per head: " + " ".join(f"{v:.4f}" for v in stats["lambda2"]),
        ]
        text = "\n".join(lines)
        if progress is not None:
            progress.write(text, file=sys.stdout)
        else:
            print(text)
    if progress is not None:
        progress.close()
    (out_dir / "stats.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {len(report)} PNG(s) and {out_dir / 'stats.json'}")
    return 0


def main(argv=None) -> int:
    """Entry point of ``markov-attn`` (``argv`` defaults to ``sys.argv[1:]``)."""
    args = _parser().parse_args(argv)
    if args.command == "maps":
        return maps_command(args)
    raise SystemExit(f"unknown command {args.command}")  # pragma: no cover


if __name__ == "__main__":
    raise SystemExit(main())
