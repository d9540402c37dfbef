"""Multi-object segmentation without labels from a trained ViT's attention (issue #13).

Images: ``markov_attn.data.make_multi_split("test", N)`` (2–4 Fashion-MNIST objects on held-out
photos, exact instance masks). Every method splits the 8×8 patch grid into segments; segments
are compared with the true ones (background + each visible object) after nearest upsampling to
pixels. Methods, each with the true number of segments ``K`` and with its own automatic choice:

- ``metastable``: G-PCCA states (``ma.metastable_states``) of the last layer's patch-token chain
  (CLS dropped, rows renormalised), heads averaged uniformly or with λ2 weights, and of the
  product of the last three layers' head-averaged chains; automatic ``k`` = the largest gap
  among the leading eigenvalue moduli (``k=None``, range 2–6);
- ``spectral``: spectral clustering of the symmetrised last-layer chain ``(A + Aᵀ) / 2``
  (k-means of the normalised Laplacian's leading eigenvectors, as scikit-learn's
  ``SpectralClustering(affinity="precomputed")``, batched over images); automatic ``k`` = the
  largest eigengap of the Laplacian (2–6);
- ``DiffSeg``: DiffSeg's iterative attention merging (Tian et al., CVPR 2024;
  ``markov_attn.segmentation.diffseg``: anchor rows as proposals, merged while their
  symmetric KL is below a threshold, three rounds, then each patch to the proposal with the
  largest value) on the same last-layer uniform chain, with 16 anchors either on DiffSeg's
  uniform 4×4 grid or sampled proportionally to the chain's TokenRank (Erel et al. 2025,
  ``segmentation.tokenrank_anchors``, seed 0); automatic ``k``: whatever the merging leaves;
  true ``K``: the surviving proposals then merged pairwise, closest (symmetric KL) first, down
  to ``K`` (an image left with fewer keeps them). One KL threshold serves both anchor
  choices: the one of ``DIFFSEG_THRESHOLDS`` with
  the best train ARI, averaged over the two anchor choices, on ``DIFFSEG_TUNE_IMAGES`` images
  of the *train* split, never the test images (on train, mIoU alone favours the most segments
  and mACC alone one segment); the sweep is kept in ``results.json`` (``diffseg_tuning``);
- ``kmeans``: k-means of the last layer's patch tokens; automatic ``k`` = the best mean
  silhouette (Euclidean, 2–6) per image; every k-means here is
  :func:`experiments.kmeans.kmeans` (k-means++, best of 10 seedings, batched in JAX);
- ``colour kmeans``: k-means of the patches' mean colours, a baseline that sees no attention
  (true ``K`` and silhouette ``k``);
- ``oracle``: each patch labelled with its majority true segment (the best an 8×8 grid can do).

Metrics per image: Hungarian-matched mIoU over the true segments (``scipy``
``linear_sum_assignment``; an unmatched true segment scores 0), the pixel accuracy after the
same matching (``mACC``: the fraction of pixels whose predicted segment is matched to their
true one; DiffSeg's metric, here per image rather than matched over the whole data set) and the
adjusted Rand index (scikit-learn) over pixels; means with 95 % bootstrap intervals over
images, and a paired bootstrap of the per-image differences TokenRank − grid anchors for
DiffSeg. Command::

    python -m experiments.multiseg                       # reference model, 1,000 images
    python -m experiments.multiseg --update-readme       # and the README's multiseg block
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
from markov_attn._util import caught_warnings

from .kmeans import kmeans
from .readme import command_line, publish

REFERENCE = pathlib.Path(__file__).resolve().parent / "reference" / "vit_reference.npz"
AUTO_RANGE = (2, 6)
DIFFSEG_M = 4  # anchors per side of DiffSeg's grid: 16 anchors on the 8×8 patch grid
DIFFSEG_ITERATIONS = 3  # DiffSeg's default number of merging rounds
DIFFSEG_THRESHOLDS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.5, 1.1)  # 1.1: DiffSeg's
KMEANS_INIT = 10  # k-means++ seedings per image (scikit-learn's default for spectral clustering)
DIFFSEG_TUNE_IMAGES = 100  # train-split images for the threshold
DIFFSEG_ROWS = {
    "grid": f"DiffSeg, {DIFFSEG_M}×{DIFFSEG_M} grid anchors, auto k",
    "tokenrank": f"DiffSeg, {DIFFSEG_M**2} TokenRank-sampled anchors, auto k",
}
DIFFSEG_TRUE_K = {a: name.replace("auto k", "true K") for a, name in DIFFSEG_ROWS.items()}


def _load(path):
    from markov_attn.nn import load_run

    model, _ = load_run(path)
    return model, model.cfg


def _attention(model, images, batch_size: int):
    """Last-three-layer attention ``(N, 3, H, n, n)`` and last-layer tokens ``(N, n, d)``."""

    @jax.jit
    def fwd(x):
        _, aux = model(x)
        return aux["attn"][:, -3:], aux["tokens"]

    attn, tokens = [], []
    for s in range(0, len(images), batch_size):
        a, t = fwd(jnp.asarray(images[s : s + batch_size]))
        attn.append(np.asarray(a))
        tokens.append(np.asarray(t))
    return np.concatenate(attn), np.concatenate(tokens)


def _chains(attn, num_prefix: int) -> dict[str, np.ndarray]:
    """Patch-token chains ``(N, n, n)`` per method."""
    pa = ma.normalize(jnp.asarray(attn[..., num_prefix:, num_prefix:]))  # (N, 3, H, m, m)
    last = pa[:, -1]
    uniform = ma.average(last, axis=-3)
    lam2 = ma.second_eigenvalue(last)
    weighted = ma.average(last, weights=ma.head_weights(lam2), axis=-3)
    means = ma.average(pa, axis=-3)  # (N, 3, m, m)
    product = ma.normalize(means[:, 0] @ means[:, 1] @ means[:, 2])
    return {
        "uniform": np.asarray(uniform),
        "λ2-weighted": np.asarray(weighted),
        "last 3 layers": np.asarray(product),
    }


def _metastable(
    chains: np.ndarray, ks: np.ndarray, auto: bool, notes: dict | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Crisp states ``(N, m)`` and the ``k`` used per image; with ``auto``, ``notes["unresolved"]``
    counts the images whose ``k=None`` choice came with an ``UnresolvedGapWarning``."""
    out = np.zeros(chains.shape[:2], np.int32)
    used = np.zeros(len(chains), np.int32)
    if auto:
        unresolved = 0
        for i, c in enumerate(chains):
            with caught_warnings(ma.UnresolvedGapWarning) as flagged:  # counted, not printed
                ms = ma.metastable_states(c, k=None, k_range=AUTO_RANGE, split="nan")
            unresolved += len(flagged)
            out[i], used[i] = np.asarray(ms.assignment), int(ms.k)
        if notes is not None:
            notes["unresolved"] = unresolved
        return out, used
    for k in np.unique(ks):
        sel = np.flatnonzero(ks == k)
        ms = ma.metastable_states(jnp.asarray(chains[sel]), k=int(k), split="nan")
        out[sel], used[sel] = np.asarray(ms.assignment), k
    # a true K that cuts a complex-conjugate pair of an image's chain leaves it no states (NaN
    # memberships, assignment -1 everywhere): take the nearest k that cuts none, K + 1 (the
    # whole pair) before K - 1, and record it; an image with none keeps -1 (no states)
    for step in (1, -1):
        failed = np.flatnonzero(np.all(out < 0, axis=1) & (ks + step >= 2))
        for k in np.unique(ks[failed] + step):
            sel = failed[ks[failed] + step == k]
            a = np.asarray(ma.metastable_states(jnp.asarray(chains[sel]), k=int(k), split="nan")
                           .assignment)  # fmt: skip
            ok = np.all(a >= 0, axis=1)
            out[sel[ok]], used[sel[ok]] = a[ok], k
    used[np.all(out < 0, axis=1)] = 0  # no states at K or K ± 1
    return out, used


def _laplacian_eigh(chains: np.ndarray):
    """Eigenvalues (ascending) and the spectral embedding of the normalised Laplacian of each
    symmetrised chain ``(A + Aᵀ) / 2`` (self-loops ignored, as ``scipy.sparse.csgraph.laplacian``
    does): ``L = I − D^{-1/2} W D^{-1/2}``; embedding ``D^{-1/2}`` times its eigenvectors, as
    scikit-learn's ``spectral_embedding`` returns them. One batched ``eigh`` for all images."""
    sym = (chains + np.swapaxes(chains, -1, -2)) / 2
    m = sym.shape[-1]
    sym = sym * (1.0 - np.eye(m))
    isq = 1.0 / np.sqrt(np.maximum(sym.sum(-1), 1e-12))
    lap = np.eye(m) - isq[..., :, None] * sym * isq[..., None, :]
    ev, vec = np.linalg.eigh(lap.astype(np.float64))
    return ev, vec * isq[..., :, None]


def _eigengap_k(ev: np.ndarray) -> np.ndarray:
    """Per image, the ``k`` in ``AUTO_RANGE`` after which the Laplacian's eigenvalues jump most."""
    lo, hi = AUTO_RANGE
    gaps = ev[..., lo : hi + 1] - ev[..., lo - 1 : hi]  # gap after the k-th smallest eigenvalue
    return (lo + np.argmax(gaps, axis=-1)).astype(np.int32)


def _spectral(chains, ks, auto: bool):
    """Spectral clustering (Shi–Malik/Ng–Jordan–Weiss style, as scikit-learn's
    ``SpectralClustering(affinity="precomputed")``): k-means of the first ``k`` columns of the
    spectral embedding, batched over images."""
    ev, emb = _laplacian_eigh(chains)
    used = _eigengap_k(ev) if auto else ks.astype(np.int32)
    out = np.zeros(chains.shape[:2], np.int32)
    for k in np.unique(used):
        sel = np.flatnonzero(used == k)
        out[sel] = kmeans(emb[sel, :, :k], np.full(len(sel), k), n_init=KMEANS_INIT)
    return out, used


def _kmeans(features, ks):
    return kmeans(features, ks, n_init=KMEANS_INIT), ks.astype(np.int32)


def silhouette(features: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Mean silhouette per image (Euclidean; 0 for a point alone in its cluster, as
    scikit-learn's ``silhouette_score``), batched: ``features (N, m, d)``, ``labels (N, m)``."""
    x = features.astype(np.float64)
    sq = (x * x).sum(-1)
    dist = np.sqrt(np.maximum(sq[:, :, None] + sq[:, None, :] - 2 * x @ x.swapaxes(1, 2), 0))
    onehot = labels[..., None] == np.arange(k)  # (N, m, k)
    sums = dist @ onehot  # (N, m, k): distance of each point to each cluster, summed
    counts = onehot.sum(1)[:, None, :]  # (N, 1, k)
    size_own = (counts * onehot).sum(-1)  # (N, m): the size of each point's own cluster
    a = (sums * onehot).sum(-1) / np.maximum(size_own - 1, 1)
    other = np.where(onehot | (counts == 0), np.inf, sums / np.maximum(counts, 1))
    b = other.min(-1)
    with np.errstate(invalid="ignore"):  # inf - inf where an image has one cluster only
        s = np.where(size_own > 1, (b - a) / np.maximum(np.maximum(a, b), 1e-12), 0.0)
    s = np.where(np.isfinite(b), s, 0.0)  # one cluster only: no silhouette
    return s.mean(-1)


def _kmeans_auto(features):
    """k-means with the ``k`` in ``AUTO_RANGE`` of the best mean silhouette, per image."""
    lo, hi = AUTO_RANGE
    n = len(features)
    runs = [kmeans(features, np.full(n, k), n_init=KMEANS_INIT) for k in range(lo, hi + 1)]
    sil = np.stack([silhouette(features, r, lo + i) for i, r in enumerate(runs)], -1)
    best = sil.argmax(-1)
    states = np.stack(runs, 1)[np.arange(n), best]
    return states, (lo + best).astype(np.int32)


def _diffseg(chains, anchors: str, threshold: float, ks=None):
    from markov_attn.segmentation import diffseg

    return diffseg(
        chains,
        anchors=anchors,
        num_per_side=DIFFSEG_M,
        kl_threshold=threshold,
        iterations=DIFFSEG_ITERATIONS,
        seed=0,
        num_segments=ks,
    )


def _tune_diffseg(model, mcfg, batch_size: int) -> dict:
    """DiffSeg's KL threshold from train-split images: the candidate with the best train ARI,
    the mean over the grid and TokenRank anchors (one threshold for both).

    ARI, because it is corrected for chance and penalises both errors: on these images the
    Hungarian mIoU over the true segments is best for the smallest threshold (most segments),
    and the matched pixel accuracy for the largest (one segment, the background's ~3/4 of
    the pixels)."""
    from markov_attn.data import make_multi_split

    data = make_multi_split("train", DIFFSEG_TUNE_IMAGES, size=mcfg.image_size)
    attn, _ = _attention(model, data["images"], batch_size)
    chain = _chains(attn, mcfg.num_prefix)["uniform"]
    grid, size = mcfg.image_size // mcfg.patch_size, mcfg.image_size
    sweep = {}
    for thr in DIFFSEG_THRESHOLDS:
        sweep[thr] = {}
        for anchors in DIFFSEG_ROWS:
            states, used = _diffseg(chain, anchors, thr)
            px = _to_pixels(states, grid, size)
            s = np.array([scores(px[i], data["instances"][i]) for i in range(len(px))])
            sweep[thr][anchors] = {
                "miou": float(s[:, 0].mean()),
                "macc": float(s[:, 2].mean()),
                "ari": float(s[:, 1].mean()),
                "k_mean": float(used.mean()),
            }
    best = max(sweep, key=lambda t: np.mean([r["ari"] for r in sweep[t].values()]))
    return {
        "threshold": best,
        "n_images": DIFFSEG_TUNE_IMAGES,
        "sweep": {str(t): v for t, v in sweep.items()},
    }


def _to_pixels(states: np.ndarray, grid: int, size: int) -> np.ndarray:
    rep = size // grid
    return np.repeat(np.repeat(states.reshape(-1, grid, grid), rep, 1), rep, 2)


def _oracle(inst: np.ndarray, grid: int) -> np.ndarray:
    n, size, _ = inst.shape
    rep = size // grid
    blocks = inst.reshape(n, grid, rep, grid, rep).transpose(0, 1, 3, 2, 4).reshape(n, grid**2, -1)
    return np.array([[np.bincount(b).argmax() for b in img] for img in blocks], np.int32)


def scores(pred: np.ndarray, inst: np.ndarray) -> tuple[float, float, float]:
    """``(Hungarian mIoU over the true segments, adjusted Rand index, matched pixel accuracy)``
    of one image's pixel labels ``pred`` against its instance mask ``inst``.

    The matching maximises the summed IoU (one predicted segment per true one); the accuracy
    (DiffSeg's ``mACC``, per image) counts the pixels whose predicted segment is matched to
    their true segment."""
    from scipy.optimize import linear_sum_assignment
    from sklearn.metrics import adjusted_rand_score

    truth = np.unique(inst)
    segs = np.unique(pred)
    t = inst.ravel()[None, :] == truth[:, None]
    p = pred.ravel()[None, :] == segs[:, None]
    inter = t.astype(np.float64) @ p.T.astype(np.float64)
    union = t.sum(1)[:, None] + p.sum(1)[None, :] - inter
    iou = inter / np.maximum(union, 1)
    rows, cols = linear_sum_assignment(-iou)
    miou = iou[rows, cols].sum() / len(truth)
    acc = inter[rows, cols].sum() / inst.size
    return float(miou), float(adjusted_rand_score(inst.ravel(), pred.ravel())), float(acc)


def evaluate(run=REFERENCE, *, n_images: int = 1000, batch_size: int = 250, progress=True):
    from markov_attn.data import make_multi_split

    t0 = time.perf_counter()
    model, mcfg = _load(run)
    data = make_multi_split("test", n_images, size=mcfg.image_size)
    inst = data["instances"]
    # the true number of segments: the background + each object with visible pixels
    ks = np.array([1 + int((v > 0).sum()) for v in data["visible"]], np.int32)
    attn, tokens = _attention(model, data["images"], batch_size)
    num_prefix, grid, size = mcfg.num_prefix, mcfg.image_size // mcfg.patch_size, mcfg.image_size
    chains = _chains(attn, num_prefix)
    t_fwd = time.perf_counter() - t0
    tuning = _tune_diffseg(model, mcfg, batch_size)
    if progress:
        print(f"  DiffSeg KL threshold (train split): {tuning['threshold']}", flush=True)
    preds, timing = {}, {}

    def add(name, fn, *a):
        t = time.perf_counter()
        states, used = fn(*a)
        timing[name] = time.perf_counter() - t
        preds[name] = (states, used)
        if progress:
            print(f"  {name:45s} {timing[name]:6.1f} s", flush=True)

    unresolved = {}
    for cname, c in chains.items():
        add(f"metastable, {cname}, true K", _metastable, c, ks, False)
        unresolved[f"metastable, {cname}, auto k"] = notes = {}
        add(f"metastable, {cname}, auto k", _metastable, c, ks, True, notes)
    add("spectral, last layer, true K", _spectral, chains["uniform"], ks, False)
    add("spectral, last layer, auto k", _spectral, chains["uniform"], ks, True)
    for anchors, name in DIFFSEG_ROWS.items():
        add(DIFFSEG_TRUE_K[anchors], _diffseg, chains["uniform"], anchors, tuning["threshold"], ks)
        add(name, _diffseg, chains["uniform"], anchors, tuning["threshold"])
    patch_tokens = tokens[:, num_prefix:]
    add("kmeans of last-layer tokens, true K", _kmeans, patch_tokens, ks)
    add("kmeans of last-layer tokens, auto k", _kmeans_auto, patch_tokens)
    rep = size // grid
    colours = data["images"].reshape(n_images, grid, rep, grid, rep, 3).mean((2, 4))
    colours = colours.reshape(n_images, grid**2, 3)
    add("kmeans of patch colours, true K", _kmeans, colours, ks)
    add("kmeans of patch colours, auto k", _kmeans_auto, colours)
    add("oracle (majority segment per patch)", lambda: (_oracle(inst, grid), ks))
    rows, per_image = {}, {}
    for name, (states, used) in preds.items():
        px = _to_pixels(states, grid, size)
        s = per_image[name] = np.array([scores(px[i], inst[i]) for i in range(n_images)])
        rows[name] = {
            "miou": float(s[:, 0].mean()),
            "miou_ci": seg.bootstrap_mean(s[:, 0]),
            "ari": float(s[:, 1].mean()),
            "ari_ci": seg.bootstrap_mean(s[:, 1]),
            "macc": float(s[:, 2].mean()),
            "macc_ci": seg.bootstrap_mean(s[:, 2]),
            "k_mean": float(np.mean(used)),
            "k_exact": float(np.mean(used == ks)),
            "no_states": int(np.sum(np.all(states < 0, axis=1))),
            "unresolved": unresolved.get(name, {}).get("unresolved"),
            "seconds": timing[name],
        }
    # paired: the per-image differences TokenRank − grid anchors, resampled over images
    diff = per_image[DIFFSEG_ROWS["tokenrank"]] - per_image[DIFFSEG_ROWS["grid"]]
    paired = {
        m: {"mean": float(diff[:, j].mean()), "ci": seg.bootstrap_mean(diff[:, j])}
        for j, m in enumerate(("miou", "ari", "macc"))
    }
    try:
        shown = str(pathlib.Path(run).resolve().relative_to(pathlib.Path.cwd()))
    except ValueError:
        shown = str(run)
    return {
        "run": shown,
        "n_images": n_images,
        "true_k_mean": float(ks.mean()),
        "forward_s": t_fwd,
        "total_s": time.perf_counter() - t0,
        "backend": jax.default_backend(),
        "rows": rows,
        "diffseg_tuning": tuning,
        "diffseg_paired": paired,
        "examples": {k: v[0][:8].tolist() for k, v in preds.items()},
        "example_instances": inst[:8].tolist(),
    }


def table(res: dict) -> str:
    lines = [
        "| method | mIoU (Hungarian) | mACC (matched) | ARI | k used (mean; = true) | time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in res["rows"].items():
        lo, hi = r["miou_ci"]
        alo, ahi = r["ari_ci"]
        clo, chi = r["macc_ci"]
        lines.append(
            f"| {name} | {100 * r['miou']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] "
            f"| {100 * r['macc']:.1f} [{100 * clo:.1f}, {100 * chi:.1f}] "
            f"| {r['ari']:.3f} [{alo:.3f}, {ahi:.3f}] | {r['k_mean']:.2f}; "
            f"{100 * r['k_exact']:.0f} % | {r['seconds']:.1f} |"
        )
    p, tune = res["diffseg_paired"], res["diffseg_tuning"]

    def d(m, scale, fmt):
        lo, hi = p[m]["ci"]
        return f"{scale * p[m]['mean']:+{fmt}} [{scale * lo:+{fmt}}, {scale * hi:+{fmt}}]"

    lines += [
        "",
        f"DiffSeg, TokenRank − grid anchors (paired bootstrap over images): mIoU "
        f"{d('miou', 100, '.1f')}, mACC {d('macc', 100, '.1f')}, ARI {d('ari', 1, '.3f')}. "
        f"KL threshold {tune['threshold']} ({DIFFSEG_ITERATIONS} rounds): the best train ARI, "
        f"mean of the two anchor choices, on {tune['n_images']} train-split images among "
        f"{', '.join(str(t) for t in DIFFSEG_THRESHOLDS)}.",
        "",
        f"{res['n_images']} test images of `make_multi_split` (2–4 objects, mean true number of "
        f"segments {res['true_k_mean']:.2f} with the background), model `{res['run']}`; 95 % "
        "bootstrap intervals over images; pixel-level metrics after nearest upsampling of the 8×8 "
        "grid; mACC: pixel accuracy after the same Hungarian matching, per image. "
        f"Total {res['total_s']:.0f} s on {res['backend']} ({res['forward_s']:.0f} s of "
        "it data and forward passes).",
    ]
    refit = [n for n, r in res["rows"].items() if "true K" in n and n.startswith("metastable")]
    if refit:
        lines[-1] += (
            " Metastable states with the true K: where K cuts a complex-conjugate pair of an "
            "image's chain (no invariant subspace of that dimension, no states) the nearest k "
            "that cuts none is used, K + 1 before K − 1 (the `k used` column counts them)."
        )
    missing = {n: r["no_states"] for n, r in res["rows"].items() if r.get("no_states")}
    if missing:
        lines[-1] += (
            " Images with no states (scored as one segment): "
            + ", ".join(f"{n}: {c}" for n, c in missing.items())
            + "."
        )
    flagged = {
        n: r["unresolved"] for n, r in res["rows"].items() if r.get("unresolved") is not None
    }
    if flagged:
        lines[-1] += (
            " Metastable states with auto k: the chosen gap did not stand out from another "
            "candidate's within the Ritz moduli's uncertainty (`ma.UnresolvedGapWarning`: no "
            "clear gap) for "
            + ", ".join(f"{n.split(', ')[1]}: {c}" for n, c in flagged.items())
            + f" of the {res['n_images']} images."
        )
    lines[-1] += f" Command: `{res.get('command', 'python -m experiments.multiseg')}`."
    return "\n".join(lines) + "\n"


def figure(res: dict, path) -> None:
    from markov_attn.data import make_multi_split
    from markov_attn.viz._overlay import _matplotlib

    _, plt = _matplotlib()
    names = [
        "metastable, uniform, auto k",
        "metastable, last 3 layers, true K",
        "spectral, last layer, true K",
        *DIFFSEG_ROWS.values(),
        "kmeans of last-layer tokens, true K",
    ]
    imgs = make_multi_split("test", 6)["images"]
    inst = np.array(res["example_instances"])[:6]
    fig, axes = plt.subplots(6, 2 + len(names), figsize=(2 * (2 + len(names)), 12))
    for i in range(6):
        axes[i, 0].imshow(imgs[i])
        axes[i, 1].imshow(inst[i], cmap="tab10", vmin=0, vmax=9, interpolation="nearest")
        for j, name in enumerate(names):
            s = np.array(res["examples"][name][i]).reshape(8, 8)
            axes[i, 2 + j].imshow(s, cmap="tab10", vmin=0, vmax=9, interpolation="nearest")
    for j, title in enumerate(["image", "truth", *names]):
        axes[0, j].set_title(title.replace(", ", ",\n"), fontsize=8)
    for ax in axes.ravel():
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


MODEL_METHODS = (
    "metastable, uniform, true K",
    "metastable, λ2-weighted, true K",
    "metastable, uniform, auto k",
    "spectral, last layer, true K",
    DIFFSEG_ROWS["grid"],
    DIFFSEG_ROWS["tokenrank"],
    "kmeans of last-layer tokens, true K",
)
MODEL_BASELINES = ("kmeans of patch colours, true K", "oracle (majority segment per patch)")


def _test_acc(run) -> float | None:
    """The model's test accuracy on the classification benchmark, from its run's record."""
    run = pathlib.Path(run)
    for f in (run / "summary.json", run.with_name("reference.json")):
        if f.is_file():
            return json.loads(f.read_text()).get("test_acc")
    return None


def models_table(results: dict[str, dict], command: str) -> str:
    """One row per model: mIoU [95 % interval] of the main methods on the same images."""
    cols = [*MODEL_METHODS, *MODEL_BASELINES]
    lines = [
        "| model | test acc | " + " | ".join(cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for name, res in results.items():
        acc = res.get("test_acc")
        cells = []
        for c in cols:
            r = res["rows"][c]
            lo, hi = r["miou_ci"]
            cells.append(f"{100 * r['miou']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]")
        acc_s = "—" if acc is None else f"{100 * acc:.1f} %"
        lines.append(f"| {name} (`{res['run']}`) | {acc_s} | " + " | ".join(cells) + " |")
    first = next(iter(results.values()))
    total = sum(r["total_s"] for r in results.values())
    lines += [
        "",
        f"mIoU (Hungarian-matched, %) on the same {first['n_images']} test images of "
        "`make_multi_split` for every model (rendered at the model's image size), 95 % bootstrap "
        "intervals over images; the last two columns use no model and differ between rows only "
        "through that size (64 px for the reference model, 32 px for the others). Test acc: "
        "the model's accuracy on the single-object classification benchmark. Each model's full "
        f"table is in its `results.md`. Total {total:.0f} s on {first['backend']} for "
        f"{len(results)} models. Command: `{command}`.",
    ]
    return "\n".join(lines) + "\n"


def _write(res: dict, out: pathlib.Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    md = table(res)
    (out / "results.md").write_text(md)
    figure(res, out / "states_grid.png")
    return md


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.multiseg", description=__doc__)
    p.add_argument("--run", default=str(REFERENCE), help="weights file (.npz) or run directory")
    p.add_argument(
        "--models",
        nargs="+",
        metavar="NAME=RUN",
        help="several models, one row each, in the README block multiseg-models",
    )
    p.add_argument("--reuse", action="store_true", help="--models: tabulate existing results")
    p.add_argument("--n-images", type=int, default=1000)
    p.add_argument("--out", default="runs/multiseg")
    p.add_argument("--update-readme", nargs="?", const="README.md", metavar="README")
    a = p.parse_args(argv)
    out = pathlib.Path(a.out)
    if a.models:
        results = {}
        for spec in a.models:
            name, _, run = spec.partition("=")
            if not run:
                p.error(f"--models takes NAME=RUN, got {spec!r}")
            sub = out / name
            if a.reuse:
                res = json.loads((sub / "results.json").read_text())
            else:
                print(f"{name}: {run}", flush=True)
                res = evaluate(run, n_images=a.n_images)
                res["test_acc"] = _test_acc(run)
                _write(res, sub)
                # each model compiles its own programs, and XLA's CPU code stays mapped until
                # they are dropped: six models reached the kernel's limit of memory mappings
                # (65,530; "LLVM compilation error: Cannot allocate memory", a segfault)
                jax.clear_caches()
            results[name] = res
        argv = sys.argv[1:] if argv is None else argv
        cmd = command_line("experiments.multiseg", argv, drop=("--update-readme", "--reuse"))
        md = models_table(results, cmd)
        (out / "models.md").write_text(md)
        publish(md, a.update_readme, "multiseg-models")
        return 0
    res = evaluate(a.run, n_images=a.n_images)
    res["command"] = command_line("experiments.multiseg", sys.argv[1:] if argv is None else argv)
    md = _write(res, out)
    print(f"wrote {out}/results.json, results.md, states_grid.png")
    publish(md, a.update_readme, "multiseg")
    return 0


if __name__ == "__main__":
    sys.exit(main())
