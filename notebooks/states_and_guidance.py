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
# # Metastable states, TokenRank guidance and label-token maps
#
# The tour (`notebooks/tour.py`) shows bounces, |λ2| and single-object segmentation. This
# notebook shows the paper's other two claims, and the variant of the first that gives its best
# numbers, on this repository's models:
#
# 1. **Metastable states** of the committed reference ViT's last-layer chain on images with
#    2–4 objects: the leading eigenvalue moduli, the number of states chosen from their largest
#    gap, one colour per state, the coarse-grained chain, and the adjusted Rand index against
#    the exact instance masks.
# 2. **TokenRank as a global importance** in Self-Attention Guidance (SAG) of the small
#    diffusion transformer (DiT): the token mask from column sums (SAG's rule) against the mask
#    from TokenRank, and samples without guidance and with each mask.
# 3. **Bounces from the label tokens** through the DiT's joint label–image attention, read over
#    the image tokens, with the true and a wrong label.
#
# Run it as a script (`python notebooks/states_and_guidance.py`) or open it with jupytext. The
# ViT is the committed reference (`experiments/reference/vit_reference.npz`, 77 % test
# accuracy); the DiT is `runs/dit_cpu_tokens` when it exists (`python -m experiments.train_dit
# --preset cpu_tokens --workdir runs/dit_cpu_tokens`, set `MARKOV_ATTN_DIT_RUN` for another),
# otherwise the tiny `smoke` preset trained here for a few steps (expect noise, not objects).
# With `MARKOV_ATTN_NOTEBOOK_SMOKE=1` (CI) it uses fewer images and sampling steps. **The data
# are synthetic; no number here is comparable with a published benchmark.**

# %%
import importlib.util
import os
import pathlib
import sys
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")


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
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt

import markov_attn as ma

SMOKE = os.environ.get("MARKOV_ATTN_NOTEBOOK_SMOKE") == "1"
OUT = pathlib.Path(os.environ.get("MARKOV_ATTN_NOTEBOOK_OUT", tempfile.mkdtemp(prefix="states_")))
DIT_RUN = pathlib.Path(os.environ.get("MARKOV_ATTN_DIT_RUN", ROOT / "runs" / "dit_cpu_tokens"))
N_IMAGES = 4 if SMOKE else 12
OUT.mkdir(parents=True, exist_ok=True)
print(f"smoke={SMOKE}  figures -> {OUT}")

# %% [markdown]
# ## 1. Metastable states of a ViT's attention chain
# The chain is the last layer's attention over the patch tokens (the CLS row and column
# dropped, rows renormalised), heads averaged with |λ2| weights. A chain with m metastable
# sets has m eigenvalues near 1 and then a gap; `ma.metastable_states(k=None)` takes the k with
# the largest modulus gap in `k_range` and finds the states by G-PCCA (soft memberships χ, a
# crisp assignment, and the coarse-grained k-state chain whose trace is the metastability).

# %%
from markov_attn.data import make_multi_split
from markov_attn.nn import load_run

vit, _ = load_run(ROOT / "experiments" / "reference" / "vit_reference.npz")
vcfg = vit.cfg
grid = vcfg.image_size // vcfg.patch_size
multi = make_multi_split("test", N_IMAGES, size=vcfg.image_size)
_, aux = jax.jit(lambda x: vit(x))(jnp.asarray(multi["images"]))
P = aux["num_prefix"]
patch = ma.normalize(aux["attn"][:, -1, :, P:, P:])  # (B, heads, m, m) patch-token chains
chains = ma.average(patch, weights=ma.head_weights(ma.second_eigenvalue(patch)), axis=-3)
print("chains", chains.shape, f"({grid}x{grid} patch tokens)")

# %%
from sklearn.metrics import adjusted_rand_score

states = []
for i in range(N_IMAGES):
    ms = ma.metastable_states(chains[i], k=None, k_range=(2, 6), split="nan")
    rep = vcfg.image_size // grid  # each patch token's pixels
    pixels = np.kron(np.asarray(ms.assignment).reshape(grid, grid), np.ones((rep, rep), int))
    ari = adjusted_rand_score(multi["instances"][i].ravel(), pixels.ravel())
    states.append(ms)
    print(
        f"image {i}: {multi['num_objects'][i]} objects + background -> k = {ms.k} states, "
        f"metastability {float(ms.metastability):.2f} of {ms.k}, ARI {ari:.2f}, "
        f"converged {bool(ms.converged)}"
    )
print("coarse-grained chain of image 0 (rows: from state, columns: to state):")
print(np.array2string(np.asarray(states[0].coarse), precision=2))

# %% [markdown]
# The leading eigenvalue moduli (float64 NumPy, for the picture): a gap after the k-th marks k
# metastable states.

# %%
fig, ax = plt.subplots(1, 2, figsize=(10, 3.4))
for i in range(N_IMAGES):
    mod = np.sort(np.abs(np.linalg.eigvals(np.asarray(chains[i], np.float64))))[::-1][:10]
    ax[0].plot(np.arange(1, 11), mod, "o-", ms=3, label=f"image {i}: k = {states[i].k}")
ax[0].set_xlabel("index j")
ax[0].set_ylabel("|λ_j|")
ax[0].set_title("leading eigenvalue moduli")
ax[0].legend(fontsize=7)
sizes = np.array([s.k for s in states])
ax[1].scatter(multi["num_objects"] + 1, sizes, alpha=0.6)
ax[1].plot([2, 6], [2, 6], "k--", lw=0.8)
ax[1].set_xlabel("objects + background")
ax[1].set_ylabel("k chosen from the gap")
fig.tight_layout()
fig.savefig(OUT / "eigenvalues.png", dpi=90)

# %% [markdown]
# **What the full run shows on the reference ViT** (12 images; the smoke run's 4 say little).
# Its last-layer chains have one eigenvalue at 1 and the others far below it (|λ2| about 0.5
# or less): no metastable sets. So `k=None` mostly picks k = 2 whatever the number of
# objects, the metastability is about 1 of k (the coarse chain's rows are nearly equal: the
# walk leaves every state at once), the ARI against the instances stays low, and an
# `UnresolvedGapWarning` says where the gap did not stand out. The states do converge (the
# chains mix fast, so their leading subspace is well determined): it just holds no objects. On
# this model the paper's metastable states do not appear; the README's multi-object table
# measures it on 1,000 images.

# %%
from markov_attn.viz import states_figure

i = 0
chi = np.asarray(states[i].memberships).reshape(grid, grid, -1)
assign = np.asarray(states[i].assignment).reshape(grid, grid)
states_figure(multi["images"][i], assign, chi, path=OUT / "states.png", title="reference ViT")
print("figure:", OUT / "states.png")

# %% [markdown]
# ## 2. TokenRank against column sums as SAG's mask
# SAG blurs the denoised image where the attention is high and guides away from the blurred
# prediction. Its mask marks the image tokens whose attention column sum is above average;
# `sag_mask(kind="tokenrank")` marks those with above-uniform TokenRank (the chain's stationary
# distribution) instead. Both read the image→image block of the middle layer.

# %%
from experiments.dit_configs import get_preset as dit_preset
from experiments.train_dit import load_dit, load_split
from experiments.train_dit import train_and_evaluate as train_dit
from markov_attn.nn import ddim_sample, q_sample, sag_mask

dit = None
if (DIT_RUN / "checkpoints").is_dir():
    try:
        dit, dcfg = load_dit(DIT_RUN)  # its latest kept checkpoint (EMA weights)
        source = f"{DIT_RUN} (latest checkpoint; preset {dcfg.name}, {dcfg.steps} steps planned)"
    except FileNotFoundError:  # a run that has not written its first checkpoint yet
        print(f"{DIT_RUN} has no checkpoint yet")
if dit is None:
    workdir = OUT / "smoke_dit"
    train_dit(dit_preset("smoke"), workdir, progress=False)
    dit, dcfg = load_dit(workdir)
    source = f"smoke preset trained in {workdir}"
L, depth = dcfg.model.n_label, dcfg.model.depth
dgrid = dcfg.model.grid
print(f"DiT from {source}: depth {depth}, {L} label tokens, {dgrid}x{dgrid} image tokens")

test = load_split(dcfg, "test", N_IMAGES, masks=True)  # uint8, as the run was trained on
images = test["images"] / 255.0
x0 = jnp.asarray(images * 2.0 - 1.0, jnp.float32)
t = jnp.full((N_IMAGES,), 500)
eps = jax.random.normal(jax.random.key(0), x0.shape)
xt = q_sample(x0, t, eps, schedule=dcfg.schedule, num_timesteps=dcfg.num_timesteps)
labels = jnp.asarray(test["labels"])
_, daux = jax.jit(lambda x, t, y: dit(x, t, y))(xt, t, labels)
mid = daux["attn"][:, depth // 2]  # (B, heads, L+N, L+N)
masks = {
    kind: np.asarray(sag_mask(mid, kind=kind, n_label=L)) for kind in ("column_sum", "tokenrank")
}
both = masks["column_sum"] & masks["tokenrank"]
either = masks["column_sum"] | masks["tokenrank"]
for kind, m in masks.items():
    print(f"{kind:10s}: {m.mean():.0%} of the image tokens masked")
print(f"agreement of the two masks (IoU): {both.sum() / max(either.sum(), 1):.2f}")

# %%
steps = 4 if SMOKE else 50
null = jnp.full((8,), dcfg.model.null_label)
sched = {"schedule": dcfg.schedule, "num_timesteps": dcfg.num_timesteps}
rows = {"no guidance": ddim_sample(dit, null, steps=steps, seed=0, **sched)}
for kind in ("column_sum", "tokenrank"):
    rows[f"SAG, {kind}"] = ddim_sample(
        dit, null, steps=steps, seed=0, sag=kind, sag_scale=0.75, **sched
    )
fig, axes = plt.subplots(len(rows) + 2, 8, figsize=(8 * 1.2, (len(rows) + 2) * 1.3))
for j in range(8):
    for r, (name, imgs) in enumerate(rows.items()):
        axes[r, j].imshow(np.clip(np.asarray(imgs[j]), 0, 1))
        if j == 0:
            axes[r, j].set_title(name, fontsize=7, loc="left")
    for r, kind in enumerate(masks, start=len(rows)):
        if j >= N_IMAGES:
            continue
        rep = dcfg.model.image_size // dgrid
        up = np.kron(masks[kind][j].reshape(dgrid, dgrid), np.ones((rep, rep)))[..., None]
        axes[r, j].imshow(images[j] * (0.35 + 0.65 * up))  # dimmed outside the mask
        if j == 0:
            title = f"{kind} mask: test image at t = 500, true label"
            axes[r, j].set_title(title, fontsize=7, loc="left")
for a in axes.ravel():
    a.set_axis_off()
fig.tight_layout()
fig.savefig(OUT / "sag.png", dpi=90)
print("figure:", OUT / "sag.png", f"({steps} DDIM steps, unconditional, the same seed per column)")
print("(the mask rows show the masks of the forward pass above, not those of the samples)")

# %% [markdown]
# ## 3. Bounces from the label tokens
# The paper's best segmentation bounces from the class-name token through FLUX's joint
# attention. Here the chain is the DiT's last-layer joint chain (heads averaged) over its
# `L + N` tokens; the walk starts uniform on the label tokens, and the map is read over the
# image tokens only (the label tokens stay states of the chain). A map that is about the class
# should segment the object with the true label and get worse with a wrong one;
# `python -m experiments.label_bounce` runs the full table.

# %%
from markov_attn import segmentation as seg


def label_maps(y, n=3):
    _, a = jax.jit(lambda x, t, y: dit(x, t, y))(xt, t, y)
    chain = ma.average(a["attn"][:, -1], axis=-3)  # (B, L+N, L+N)
    start = jnp.zeros(chain.shape[:-1]).at[:, :L].set(1.0 / L)
    xs = ma.bounce(chain, start, steps=n)  # (B, n+1, L+N)
    return np.asarray(xs[:, 1:, L:]).reshape(N_IMAGES, n, dgrid, dgrid)


true_maps = label_maps(labels)
wrong_maps = label_maps((labels + 1) % dcfg.model.num_classes)
for n in range(true_maps.shape[1]):
    r_true = seg.summarize(seg.image_stats(true_maps[:, n], test["masks"]))
    r_wrong = seg.summarize(seg.image_stats(wrong_maps[:, n], test["masks"]))
    print(f"n = {n + 1}: mIoU true label {r_true['miou']:.3f}, wrong label {r_wrong['miou']:.3f}")
fig, axes = plt.subplots(3, N_IMAGES, figsize=(N_IMAGES * 1.6, 5), squeeze=False)
for j in range(N_IMAGES):
    axes[0, j].imshow(images[j])
    axes[1, j].imshow(true_maps[j, 0], cmap="inferno")
    axes[2, j].imshow(wrong_maps[j, 0], cmap="inferno")
axes[0, 0].set_title("noised at t = 500 (shown clean)", fontsize=7, loc="left")
axes[1, 0].set_title("n = 1 from the true label", fontsize=7, loc="left")
axes[2, 0].set_title("n = 1 from a wrong label", fontsize=7, loc="left")
for a in axes.ravel():
    a.set_axis_off()
fig.tight_layout()
fig.savefig(OUT / "label_bounce.png", dpi=90)
print("figure:", OUT / "label_bounce.png")

# %% [markdown]
# **What the full run shows** (the `cpu_tokens` DiT): the true and the wrong label give the
# same mIoU to about 0.001 at every n, and the two map rows look alike. The label tokens' maps
# of this DiT do not depend on its label, so they cannot test the paper's claim yet: no DiT
# trained on this CPU reads its label enough (README, "The label-token bounce").
