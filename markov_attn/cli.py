"""The ``markov-attn`` command line: attention maps of a ViT checkpoint on your images.

Usage::

    markov-attn maps --checkpoint DIR --image a.jpg b.png [--method bounce --steps 2
                     --layer -1 --alpha 0.99 --weighting lambda2 --size 224 --out maps/
                     --overwrite]

``DIR`` is a supported pretrained checkpoint (HF ViT / DINO / DINOv2 / CLIP, timm; see
:func:`markov_attn.checkpoints.load`) or a run directory of this project's training script
(``runs/<name>/`` with ``checkpoints/``) or a weights file of it (``.npz``, e.g. the committed
reference model ``experiments/reference/vit_reference.npz``), both read by
:func:`markov_attn.nn.load_run`. For every image it writes a PNG overlay of the chosen map(s)
and prints the TokenRank statistics (entropy, top tokens) and each head's ``|λ2|`` for the
chosen layer. The heads of that layer are combined into one chain with λ2
weights (``--weighting``, one of ``markov_attn.HEAD_WEIGHTINGS``; ``--heads`` is accepted as
its old name) before computing the maps, except for ``rollout`` which uses all layers and
the plain mean over heads. Existing output files (``<image stem>_<method>.png``, ``stats.json``)
are not replaced unless ``--overwrite`` is given.

Figures are drawn on one colour scale for all panels of a figure, in units of the uniform
distribution (patch mass × number of patches: 1 = uniform, so a flat map looks flat), with a
colour bar. Bad input (a file that is not a checkpoint or not an image, a ``--size`` the model
cannot take) ends with one line on stderr saying what to change, and exit status 1.

Methods (all maps are over the patch grid, from the layer's head-averaged chain ``A`` with CLS
and registers kept; each is a :class:`markov_attn.segmentation.MapMethod` computed by
:func:`markov_attn.segmentation.compute_maps`, the project's one attention → map
implementation, and its panel is titled by the method's ``title``):

- ``bounce``: multi-bounce maps from the CLS token (uniform start without CLS), one per step
  ``1..steps``, with teleportation ``alpha``.
- ``tokenrank``: the stationary distribution of ``A`` (with teleportation ``alpha``).
- ``column_sum``: mean incoming attention, the columns of ``A`` summed (``colsum`` is accepted
  as its old name).
- ``rollout``: attention rollout over layers ``0..layer``, the CLS row.
- ``cls``: the CLS row of ``A`` (one bounce without teleportation).
- ``metastable``: metastable states (``markov_attn.metastable_states``, G-PCCA) of the chain
  restricted to the patch tokens and renormalised: a colour per state over the image, and each
  token's membership in its state; ``--states K`` fixes their number, otherwise it is chosen
  from the largest gap among the leading eigenvalue moduli (2 to 10 states).
"""

import argparse
import json
import math
import os
import pathlib
import sys

import numpy as np

from markov_attn._util import MissingExtraError, caught_warnings
from markov_attn._weights import HEAD_WEIGHTINGS

METHODS = ("bounce", "tokenrank", "column_sum", "rollout", "cls", "metastable")
_OLD_METHOD_NAMES = {"colsum": "column_sum"}  # still accepted on the command line


def _method_name(name: str) -> str:
    return _OLD_METHOD_NAMES.get(name, name)


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
    m.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint directory or file (.safetensors, .pth, .pt, .bin), a training "
        "run directory, or a run's .npz weights file",
    )
    m.add_argument("--image", required=True, nargs="+", help="image file(s)")
    m.add_argument("--method", type=_method_name, choices=METHODS, default="bounce")
    m.add_argument("--steps", type=int, default=2, help="bounce steps (default 2)")
    m.add_argument("--layer", type=int, default=-1, help="layer index (default -1, the last)")
    m.add_argument("--alpha", type=float, default=0.99, help="teleportation weight (0.99)")
    m.add_argument(
        "--weighting",
        "--heads",
        dest="weighting",
        choices=HEAD_WEIGHTINGS,
        default="lambda2",
        help="how heads are weighted into one chain (default lambda2; --heads: the old name)",
    )
    m.add_argument(
        "--size",
        type=int,
        default=None,
        help="input side in pixels, a multiple of the patch size (default: native)",
    )
    m.add_argument(
        "--states",
        type=int,
        default=None,
        help="number of metastable states for --method metastable (default: chosen by the "
        "largest eigenvalue gap)",
    )
    m.add_argument("--top", type=int, default=5, help="top TokenRank tokens to print")
    m.add_argument("--out", default="maps", help="output directory (default ./maps)")
    m.add_argument(
        "--overwrite", action="store_true", help="replace existing output files in --out"
    )
    m.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _fail(message: str):
    """Ends the command with ``markov-attn: error: message`` on stderr and exit status 1, on
    one line (messages of other libraries, such as torch.load's, can hold newlines)."""
    raise SystemExit(f"markov-attn: error: {' '.join(str(message).split())}")


def _is_run_dir(path: pathlib.Path) -> bool:
    """A training run directory, or a weights file (:func:`markov_attn.nn.write_weights`, such
    as the committed reference model ``experiments/reference/vit_reference.npz``)."""
    if path.is_file() and path.suffix == ".npz":
        return True
    return path.is_dir() and (path / "checkpoints").is_dir()


class _Loaded:
    """A model plus the function turning image files into its input batch (of ``side`` x
    ``side`` pixels: the run's image size, or the checkpoint's preprocessing crop)."""

    def __init__(self, model, cfg, prepare, unnormalize, description, side):
        self.model, self.cfg = model, cfg
        self.prepare, self.unnormalize = prepare, unnormalize
        self.description = description
        self.side = int(side)


def _readable(image_path):
    """Opens ``image_path`` with PIL and decodes it, or ends the command saying it is no image."""
    from PIL import Image, UnidentifiedImageError

    from markov_attn.checkpoints._preprocess import to_rgb

    try:
        im = Image.open(image_path)
        im.load()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        _fail(f"{image_path} is not an image PIL can read ({e}); pass PNG or JPEG files")
    try:  # a pixel format the models cannot take (e.g. a float TIFF), before any output
        to_rgb(im)
    except ValueError as e:
        im.close()
        _fail(f"image {image_path}: {e}")
    return im


#: ``--size`` may give at most this many patch tokens (a 64 x 64 grid): each head's attention
#: matrix holds tokens² float32 values (64 MiB at 4,096 tokens), and larger inputs only
#: exhaust memory.
MAX_TOKENS = 4096


def _check_size(size, patch: int, native: int) -> None:
    if size is not None and (size < patch or size % patch):
        lo = max(patch, size // patch * patch) if size > 0 else patch
        _fail(
            f"--size {size} is not a positive multiple of the model's patch size {patch}; "
            f"pass e.g. --size {lo} or --size {lo + patch} (native: {native})"
        )
    if size is not None and (size // patch) ** 2 > MAX_TOKENS:
        grid, top = size // patch, int(MAX_TOKENS**0.5) * patch
        gib = grid**4 * 4 / 2**30
        _fail(
            f"--size {size} gives {grid}x{grid} = {grid * grid} patch tokens, whose attention "
            f"matrices would take {gib:,.1f} GiB per head; pass --size {top} or less "
            f"(at most {MAX_TOKENS} tokens; native: {native})"
        )


def _outputs(images, method: str, out_dir: pathlib.Path, overwrite: bool) -> list[pathlib.Path]:
    """The PNG path of each image; refuses clashes and, without ``overwrite``, existing files."""
    if out_dir.exists() and not out_dir.is_dir():
        _fail(f"--out {out_dir} is a file; pass a directory")
    pngs = [out_dir / f"{pathlib.Path(p).stem}_{method}.png" for p in images]
    seen = {}
    for img, png in zip(images, pngs):
        if png in seen:
            _fail(
                f"{seen[png]} and {img} would both be written to {png}; rename one of them or "
                "run them with different --out directories"
            )
        seen[png] = img
    if not overwrite:
        existing = [str(p) for p in [*pngs, out_dir / "stats.json"] if p.exists()]
        if existing:
            more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
            _fail(
                f"{existing[0]}{more} already exists; pass --overwrite to replace it or "
                "choose another --out directory"
            )
    return pngs


def _load_run(path: pathlib.Path, size) -> _Loaded:
    from markov_attn.nn import CheckpointError, load_run

    try:
        model, _ = load_run(path)
    except (CheckpointError, ValueError, OSError) as e:
        _fail(f"cannot load the training run {path}: {e}")
    cfg = model.cfg
    side = size or cfg.image_size

    def prepare(image_path):
        from PIL import Image

        from markov_attn.checkpoints._preprocess import to_rgb

        with _readable(image_path) as im:
            try:
                im = to_rgb(im).resize((side, side), Image.Resampling.BILINEAR)
            except ValueError as e:
                _fail(f"image {image_path}: {e}")
            return np.asarray(im, np.float32)[None] / np.float32(255.0)

    return _Loaded(model, cfg, prepare, lambda x: x, f"training run {path}", side)


def _print_warnings(caught) -> None:
    """One ``markov-attn: warning:`` line per caught warning (:func:`caught_warnings`)."""
    for w in caught:
        print(f"markov-attn: warning: {w.message}", file=sys.stderr)


def _load_pretrained(path: pathlib.Path, size) -> _Loaded:
    from markov_attn.checkpoints import AssumedDefaultsWarning, load, preprocess, recipe

    with caught_warnings(AssumedDefaultsWarning) as assumed:
        try:
            model, cfg, info = load(path)
        except (ValueError, OSError) as e:
            if path.is_dir():
                hint = " (a training run directory needs a checkpoints/ folder)"
            elif path.suffix not in (".safetensors", ".pth", ".pt", ".bin"):
                hint = " (or a training run's .npz weights file, written by write_weights)"
            else:
                hint = ""
            _fail(f"cannot load the checkpoint {path}: {e}{hint}")
    _print_warnings(assumed)
    try:
        r = recipe(info, size=size)
    except ValueError as e:
        _fail(f"cannot preprocess images for {path}: {e}")
    mean, std = np.asarray(r["mean"], np.float32), np.asarray(r["std"], np.float32)

    def prepare(image_path):
        with _readable(image_path) as im:
            try:
                return preprocess([im], info, size=size)
            except ValueError as e:
                _fail(f"image {image_path}: {e}")

    def unnormalize(x):
        return np.clip(x * std + mean, 0.0, 1.0)

    description = f"{info.family} checkpoint {info.path}"
    return _Loaded(model, cfg, prepare, unnormalize, description, r["crop"])


def _token_name(i: int, num_prefix: int, has_cls: bool, gw: int) -> str:
    if has_cls and i == 0:
        return "CLS"
    if i < num_prefix:
        return f"reg{i - int(has_cls)}"
    r, c = divmod(i - num_prefix, gw)
    return f"patch({r},{c})"


def _map_methods(method, *, layer, steps, alpha, weighting, has_cls) -> dict:
    """``--method`` as :class:`markov_attn.segmentation.MapMethod` s, keyed by their titles
    (the figure's panel titles); ``layer`` is non-negative."""
    from markov_attn.segmentation import MapMethod

    if method == "bounce":
        start = "cls" if has_cls else "uniform"
        chosen = [
            MapMethod(
                "bounce", steps=t, weighting=weighting, layers=layer, start=start, alpha=alpha
            )
            for t in range(1, steps + 1)
        ]
    elif method == "tokenrank":
        chosen = [
            MapMethod("tokenrank", direction="in", weighting=weighting, layers=layer, alpha=alpha)
        ]
    elif method == "column_sum":
        chosen = [MapMethod("column_sum", weighting=weighting, layers=layer)]
    elif method == "rollout":  # all layers up to --layer, plain mean over heads
        chosen = [MapMethod("rollout", layers=tuple(range(layer + 1)))]
    else:
        chosen = [MapMethod("cls", weighting=weighting, layers=layer)]
    if not has_cls and any(m.needs_cls for m in chosen):
        _fail(
            f"--method {method} needs a CLS token; this model has none "
            "(use bounce, tokenrank or column_sum)"
        )
    return {m.title: m for m in chosen}


def _metastable_panel(args, chain, x, loaded, png, img_path, stem, gh, gw, num_prefix) -> dict:
    """Metastable states of the patch-token chain of one image, drawn and summarised."""
    import markov_attn as ma
    from markov_attn.viz import states_figure

    patches = ma.normalize(chain[num_prefix:, num_prefix:])
    n = patches.shape[-1]
    if args.states is not None and not 2 <= args.states < n:
        _fail(f"--states must lie in [2, {n - 1}] for {n} patch tokens, got {args.states}")
    with caught_warnings(ma.UnresolvedGapWarning) as unresolved:
        ms = ma.metastable_states(patches, k=args.states, k_range=(2, min(10, n - 1)), split="nan")
    _print_warnings(unresolved)
    k = int(ms.k)
    assign = np.asarray(ms.assignment).reshape(gh, gw)
    chi = np.asarray(ms.memberships).reshape(gh, gw, k)
    metastability = float(ms.metastability)
    converged = bool(ms.converged)
    how = "given" if args.states is not None else "chosen by the eigenvalue gap"
    if unresolved:
        how += ", which does not stand out: pass --states"
    title = (
        f"{stem}: layer {args.layer % loaded.cfg.depth}, heads weighted by {args.weighting}; "
        f"k = {k} ({how}), metastability {metastability:.2f} of {k}"
        + ("" if converged else ", NOT converged")
    )
    states_figure(np.asarray(loaded.unnormalize(x))[0], assign, chi, path=png, title=title)
    sizes = [int((assign == s).sum()) for s in range(k)]
    if np.isnan(metastability):  # split="nan": k cuts a complex-conjugate pair (no real basis)
        fix = (
            "choose another --states, or omit it to choose k by the eigenvalue gap"
            if args.states is not None
            else "pass --states to choose k yourself"
        )
        state_text = (
            f"no states at k = {k}: it would split a complex-conjugate pair of the chain's "
            f"leading eigenvalues ({fix})"
        )
        metastability = None  # null in stats.json (NaN is not JSON)
    else:
        state_text = f"sizes {sizes}; metastability {metastability:.3f} of {k}"
    return {
        "image": str(img_path),
        "png": str(png),
        "layer": args.layer % loaded.cfg.depth,
        "states": k,
        "states_chosen_by": how,
        "metastability": metastability,
        "converged": converged,
        "state_sizes": sizes,
        "summary": f"{k} metastable states ({how}); {state_text}"
        + ("" if converged else "; the Schur basis did NOT converge"),
    }


def _entropy(p: np.ndarray) -> float:
    q = p[p > 0]
    return float(-(q * np.log(q)).sum())


def maps_command(args) -> int:
    import jax
    import jax.numpy as jnp

    import markov_attn as ma
    from markov_attn.segmentation import compute_maps
    from markov_attn.viz import bounce_strip

    if args.steps < 1:
        _fail(f"--steps must be >= 1, got {args.steps}")
    if not 0.0 <= args.alpha <= 1.0:
        _fail(f"--alpha must lie in [0, 1], got {args.alpha}")
    if args.top < 0:
        _fail(f"--top must be >= 0, got {args.top}")
    if args.states is not None and args.method != "metastable":
        _fail(f"--states applies to --method metastable only (got --method {args.method})")
    if args.size is not None and args.size <= 0:
        _fail(f"--size must be a positive number of pixels, got {args.size}")
    path = pathlib.Path(args.checkpoint)
    if not path.exists():
        _fail(f"checkpoint {path} does not exist")
    for img in args.image:
        if os.path.isdir(img):
            _fail(f"image {img} is a directory; pass image files")
        if not os.path.isfile(img):
            _fail(f"image {img} does not exist")
        _readable(img).close()
    loaded = _load_run(path, args.size) if _is_run_dir(path) else _load_pretrained(path, args.size)
    model, cfg = loaded.model, loaded.cfg
    depth = cfg.depth
    if not -depth <= args.layer < depth:
        _fail(f"--layer must lie in [-{depth}, {depth - 1}], got {args.layer}")
    _check_size(args.size, cfg.patch_size, cfg.image_size)
    out_dir = pathlib.Path(args.out)
    pngs = _outputs(args.image, args.method, out_dir, args.overwrite)
    has_cls = bool(cfg.cls_token)
    num_prefix = int(cfg.num_prefix)
    if args.method == "metastable":
        n = (loaded.side // cfg.patch_size) ** 2  # the patch tokens of the prepared image
        if n < 3:
            _fail(
                f"--method metastable needs at least 3 patch tokens, and --size {loaded.side} "
                f"gives {n}: pass a larger --size"
            )
        if args.states is not None and not 2 <= args.states < n:
            _fail(f"--states must lie in [2, {n - 1}] for {n} patch tokens, got {args.states}")
    methods = None
    if args.method != "metastable":
        methods = _map_methods(
            args.method,
            layer=args.layer % depth,
            steps=args.steps,
            alpha=args.alpha,
            weighting=args.weighting,
            has_cls=has_cls,
        )
    try:  # after every refusal that needs no image, so that a refusal leaves no empty --out
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _fail(f"cannot create --out {out_dir}: {e}")
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
    for img_path, png in zip(iterator, pngs):
        x = loaded.prepare(img_path)
        attn = forward(jnp.asarray(x))[0]  # (L, H, n, n)
        layer_attn = attn[args.layer]  # (H, n, n)
        lam2 = ma.second_eigenvalue(layer_attn)  # (H,)
        w = ma.head_weights(lam2, weighting=args.weighting)
        chain = ma.average(layer_attn, weights=w, axis=-3)  # (n, n)
        tr = np.asarray(ma.tokenrank(chain, alpha=args.alpha), np.float64)
        gh, gw = x.shape[1] // cfg.patch_size, x.shape[2] // cfg.patch_size
        stem = pathlib.Path(img_path).stem
        if args.method == "metastable":
            report.append(
                _metastable_panel(args, chain, x, loaded, png, img_path, stem, gh, gw, num_prefix)
            )
            text = f"{img_path} -> {png}\n  " + report[-1]["summary"]
            if progress is not None:
                progress.write(text, file=sys.stdout)
            else:
                print(text)
            continue
        maps = compute_maps(attn[None], methods, num_prefix=num_prefix, grid=(gh, gw))
        # units of the uniform distribution over patches: 1 = uniform, on one scale
        grids = {k: np.asarray(v) * (gh * gw) for k, v in maps.items()}
        if args.method == "rollout":
            title = f"{stem}: rollout of layers 0-{args.layer % depth}, mean of heads"
        else:
            title = f"{stem}: layer {args.layer % depth}, heads weighted by {args.weighting}"
            if args.method in ("bounce", "tokenrank"):
                title += f", alpha {args.alpha:g}"
        bounce_strip(
            loaded.unnormalize(x),
            grids,
            path=png,
            title=title,
            label="patch mass × number\nof patches (1 = uniform)",
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


# third-party modules the ``cli`` extra installs (import names)
CLI_MODULES = ("flax", "optax", "orbax", "PIL", "matplotlib", "safetensors", "h5py", "tqdm")


def main(argv=None) -> int:
    """Entry point of ``markov-attn`` (``argv`` defaults to ``sys.argv[1:]``)."""
    args = _parser().parse_args(argv)
    if args.command == "maps":
        try:
            return maps_command(args)
        except MissingExtraError as err:  # a subpackage's extra is missing: its message says which
            _fail(str(err))
        except ModuleNotFoundError as err:  # a third-party module of the cli extra is missing
            top = (err.name or "").split(".")[0]
            if top not in CLI_MODULES:
                raise  # anything else is a bug, not a missing install
            _fail(f"needs {top}; pip install 'markov_attn[cli]'")
    _fail(f"unknown command {args.command}")  # pragma: no cover


if __name__ == "__main__":
    raise SystemExit(main())
