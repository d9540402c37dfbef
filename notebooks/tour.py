# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # A tour of `markov_attn`: attention as a Markov chain, on a trained ViT
#
# Every attention matrix is row-stochastic, so it is the transition matrix of a Markov chain
# over tokens. This tour loads the ViT trained on the synthetic segmentation benchmark
# (Fashion-MNIST objects on natural photos; `make demo` writes `runs/demo`), or trains the tiny
# `smoke` preset when there is no checkpoint, and shows on real test images:
#
# 1. bounces from the CLS token converging to TokenRank (at the rate |λ2|ⁿ),
# 2. the |λ2| of every head,
# 3. λ2-weighted against uniform head averaging,
# 4. zero-shot segmentation of a few images, with the metrics.
#
# Run it as a script (`python notebooks/tour.py`) or open it with jupytext. With
# `MARKOV_ATTN_NOTEBOOK_SMOKE=1` (CI) it uses fewer images. **The data are synthetic; no number
# here is comparable with ImageNet-Segmentation.**

# %%
import importlib.util
import os
import pathlib
import sys
import tempfile

# XLA CPU settings of experiments/segment.py (a multi-threaded Eigen pool occasionally wedged)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
if "xla_cpu_multi_thread_eigen" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_cpu_multi_thread_eigen=false"


_spec = importlib.util.find_spec("markov_attn")  # the repository: above here, cwd or package
_here = [pathlib.Path(__file__).resolve().parent] if "__file__" in globals() else []
_pkg = [pathlib.Path(_spec.origin).parent] if _spec and _spec.origin else []
_up = [d for s in [*_here, pathlib.Path.cwd(), *_pkg] for d in (s, *s.parents)]
ROOT = next(
    (d for d in _up if (d / "experiments").is_dir() and (d / "markov_attn").is_dir()), _up[0]
)
sys.path.insert(0, str(ROOT))

import jax
import jax.numpy as jnp
import numpy as np

import markov_attn as ma
from markov_attn import segmentation as seg

SMOKE = os.environ.get("MARKOV_ATTN_NOTEBOOK_SMOKE") == "1"
RUN = pathlib.Path(os.environ.get("MARKOV_ATTN_RUN", ROOT / "runs" / "demo"))
OUT = pathlib.Path(os.environ.get("MARKOV_ATTN_NOTEBOOK_OUT", tempfile.mkdtemp(prefix="tour_")))
N_IMAGES = 16 if SMOKE else 200
OUT.mkdir(parents=True, exist_ok=True)
print(f"smoke={SMOKE}  run={RUN}  figures -> {OUT}")

# %% [markdown]
# ## The model
# A trained checkpoint if there is one; otherwise the `smoke` preset is trained for a few steps
# (its attention is barely trained, so expect weak maps).

# %%
from markov_attn.nn import load_run

if (RUN / "checkpoints").is_dir():
    model, run = load_run(RUN)  # run: the training config stored with the checkpoint (a dict)
    source = str(RUN)
else:
    from experiments.configs import get_preset
    from experiments.train import train_and_evaluate

    workdir = pathlib.Path(tempfile.mkdtemp(prefix="tour_smoke_"))
    train_and_evaluate(get_preset("smoke"), workdir, progress=False)
    model, run = load_run(workdir)
    source = f"smoke preset trained in {workdir}"
mcfg = model.cfg
grid = (mcfg.image_size // mcfg.patch_size,) * 2
print(
    f"model from {source}: {mcfg.depth} layers, {mcfg.num_heads} heads, {grid} patches, "
    f"pool={mcfg.pool}"
)

# %%
from markov_attn.data import make_split

test = make_split("test", N_IMAGES, size=mcfg.image_size, seed=run["data_seed"])
forward = jax.jit(lambda x: model(x, return_attn_logits=True))
logits, aux = forward(jnp.asarray(test["images"]))
attn, P = aux["attn"], aux["num_prefix"]  # (B, L, H, n, n), number of prefix tokens
print(
    "attention",
    attn.shape,
    "prefix tokens",
    P,
    "classification accuracy",
    float(np.mean(np.argmax(logits, -1) == test["labels"])),
)

# %% [markdown]
# ## 1. Bounces converge to TokenRank
# The last layer's head-mean chain A; x₀ = one-hot(CLS), xₙ = Tᵀxₙ₋₁ with teleportation
# T = 0.99 A + 0.01/n. The distance to the stationary distribution π (TokenRank) shrinks like
# |λ2(T)|ⁿ.

# %%
chain = attn[:, -1].mean(axis=1)  # (B, n, n)
steps = 12
xs = ma.bounce(chain, 0, steps=steps)  # (B, steps + 1, n)
pi = ma.tokenrank(chain)  # (B, n)
dist = np.asarray(jnp.abs(xs - pi[:, None]).sum(-1))  # L1 distance per image and step
lam2 = np.asarray(ma.second_eigenvalue(chain)) * 0.99
for n in (1, 2, 3, 5, 8, 12):
    print(
        f"n={n:2d}  mean |x_n - pi|_1 = {dist[:, n].mean():.2e}   mean |λ2|^n = "
        f"{np.mean(lam2**n):.2e}"
    )

# %%
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
ax[0].semilogy(np.arange(steps + 1), dist.mean(0), "o-", label="mean ‖xₙ − π‖₁")
ax[0].semilogy(
    np.arange(steps + 1),
    np.mean(lam2[:, None] ** np.arange(steps + 1), 0),
    "--",
    label="mean |λ2(T)|ⁿ",
)
ax[0].set_xlabel("bounces n")
ax[0].legend()
i = 0
maps_i = [np.asarray(xs[i, n, P:]).reshape(grid) for n in (1, 2, 5)] + [
    np.asarray(pi[i, P:]).reshape(grid)
]
ax[1].imshow(np.concatenate([m / m.max() for m in maps_i], axis=1), cmap="inferno")
ax[1].set_title("image 0: n = 1, 2, 5, TokenRank")
ax[1].set_axis_off()
fig.tight_layout()
fig.savefig(OUT / "bounces.png", dpi=90)

# %% [markdown]
# ## 2. |λ2| per head
# |λ2| near 1 means slow mixing and strong metastable clusters; near 0, the head forgets its
# start in one step.

# %%
lam2_heads = np.asarray(ma.second_eigenvalue(attn)).mean(0)  # (L, H), mean over images
print("mean |λ2| per layer (rows) and head (columns):")
print(np.array2string(lam2_heads, precision=3))
fig, ax = plt.subplots(figsize=(3 + 0.4 * mcfg.num_heads, 2 + 0.3 * mcfg.depth))
im = ax.imshow(lam2_heads, vmin=0, vmax=1, cmap="viridis")
ax.set_xlabel("head")
ax.set_ylabel("layer")
fig.colorbar(im, label="|λ2|")
fig.tight_layout()
fig.savefig(OUT / "lambda2_heads.png", dpi=90)

# %% [markdown]
# ## 3. λ2-weighted against uniform head averaging
# Heads of the last layer averaged with weights ∝ |λ2| (`ma.head_weights`) before the chain
# operation, against the plain mean; scored with the segmentation protocol.

# %%
w = ma.head_weights(ma.second_eigenvalue(attn[:, -1]), weighting="lambda2")  # (B, H)
print("mean λ2 weights of the last layer's heads:", np.round(np.asarray(w).mean(0), 3))
pairs = ["bounce_fwd_2", "bounce_rev_2", "tokenrank_out", "cls_attn"]
show = ["cls_attn", "rollout", "bounce_fwd_2", "bounce_rev_2", "tokenrank_in", "tokenrank_out"]
methods = {k: seg.METHODS[k] for name in pairs for k in (name, f"{name}_l2")}
methods.update({k: seg.METHODS[k] for k in show})
# one jitted call computes every map (shared chains, one bounce trajectory per chain)
all_maps = seg.compute_maps(attn, methods, num_prefix=P, grid=grid, logits=aux["attn_logits"])
stats = {k: seg.summarize(seg.image_stats(all_maps[k], test["masks"])) for k in methods}
print(f"{'map':16s} {'mIoU unif':>9s} {'mIoU λ2':>8s} {'mAP unif':>9s} {'mAP λ2':>7s}")
for name in pairs:
    u, l2 = stats[name], stats[f"{name}_l2"]
    print(f"{name:16s} {u['miou']:9.3f} {l2['miou']:8.3f} {u['map']:9.3f} {l2['map']:7.3f}")

# %% [markdown]
# ## 4. Zero-shot segmentation
# Each map is min–max normalised, upsampled (nearest) and thresholded at its mean; the centre
# prior and the token-grid oracle bracket what a map over this grid can do. `experiments/segment.py`
# runs the full table (2,000 images, every method, bootstrap intervals).

# %%
from markov_attn.data import centre_prior, oracle_map
from markov_attn.viz.seg import save_figure, seg_grid

maps = {k: all_maps[k] for k in show}
maps["centre_prior"] = np.broadcast_to(centre_prior(mcfg.image_size, grid[0]), (N_IMAGES, *grid))
maps["oracle"] = oracle_map(test["masks"], grid[0])
print(f"{'map':14s} {'mIoU':>6s} {'mAP':>6s} {'pix acc':>8s}   ({N_IMAGES} images)")
for k, v in maps.items():
    r = seg.summarize(seg.image_stats(np.asarray(v), test["masks"]))
    print(f"{k:14s} {r['miou']:6.3f} {r['map']:6.3f} {r['pixel_acc']:8.3f}")
fig = seg_grid(
    test["images"][:4], test["masks"][:4], {k: np.asarray(v)[:4] for k, v in maps.items()}
)
print("figure:", save_figure(fig, OUT / "segmentation.png", dpi=70))
