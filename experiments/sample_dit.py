"""Sample grids, SAG masks and the cost of guidance for a trained DiT (``experiments.train_dit``).

CLI::

    python -m experiments.sample_dit --workdir runs/dit_cpu --scale 0.75 --steps 50

writes, under ``<workdir>/samples``: ``grid_<setting>.png`` per guidance setting (rows =
classes 0 … K-1, then the null label; the same seed for every setting; ``--cfg w`` adds
classifier-free guidance to every setting), ``masks.png`` (the column-sum and TokenRank
masks of the same forward on held-out images) and ``sampling.json`` (settings, per-step
times, the guided/unguided ratio, mask statistics, and the agreement of the two masks per
timestep and layer on 64 held-out images).
"""

import argparse
import dataclasses
import json
import pathlib
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from markov_attn.nn import MASK_KINDS, alphas_cumprod, ddim_sample, sag_mask, upsample_mask

from .timing import interleaved
from .train_dit import load_data, load_dit

__all__ = [
    "grid_image",
    "main",
    "mask_agreement",
    "mask_figure",
    "sample_grids",
    "time_sampling",
]


def grid_image(images: np.ndarray, /, *, rows: int, pad: int = 2) -> np.ndarray:
    """Tiles ``(rows·cols, H, W, C)`` images in [0, 1] row by row into one uint8 image."""
    n, h, w, c = images.shape
    cols = n // rows
    out = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.float32)
    for i in range(rows * cols):
        r, k = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + k * (w + pad)
        out[y : y + h, x : x + w] = images[i]
    return np.clip(np.rint(out * 255), 0, 255).astype(np.uint8)


class Setting(NamedTuple):
    """One guidance setting: ``label`` for tables (``"tokenrank s=0.5"``), ``tag`` for file
    names (``"tokenrank_s0.5"``), the SAG mask ``kind`` (``None`` = unguided) and ``scale``."""

    label: str
    tag: str
    kind: str | None
    scale: float


def guidance_settings(scales) -> list[Setting]:
    """Unguided sampling, then SAG with every mask kind (:data:`MASK_KINDS`) at each scale."""
    out = [Setting("none", "none", None, 0.0)]
    for s in scales:
        out += [Setting(f"{k} s={s:g}", f"{k}_s{s:g}", k, float(s)) for k in MASK_KINDS]
    return out


def sample_grids(model, out: pathlib.Path, /, *, scale: float = 0.75, per_row: int = 8,
                 steps: int = 50, seed: int = 0, schedule: str = "cosine",
                 cfg_scale: float | None = None, num_timesteps: int = 1000) -> dict:  # fmt: skip
    """One PNG per guidance setting (unguided, column-sum SAG, TokenRank SAG), same seed;
    ``cfg_scale`` adds classifier-free guidance to every setting (``_cfg<w>`` in the names)."""
    from PIL import Image

    k = model.cfg.num_classes
    labels = np.repeat(np.arange(k + 1), per_row)  # the last row is the null label
    files = {}
    for setting in guidance_settings([scale]):
        name = setting.tag
        images = ddim_sample(model, labels, steps=steps, seed=seed, sag=setting.kind,
                             sag_scale=setting.scale, schedule=schedule,
                             num_timesteps=num_timesteps, cfg_scale=cfg_scale)  # fmt: skip
        if cfg_scale is not None:
            name = f"{name}_cfg{cfg_scale:g}"
        path = out / f"grid_{name}.png"
        Image.fromarray(grid_image(np.asarray(images), rows=k + 1)).save(path)
        files[name] = path.name
    return files


def time_sampling(model, /, *, batch: int = 64, steps: int = 10, rounds: int = 7,
                  schedule: str = "cosine", num_timesteps: int = 1000) -> dict:  # fmt: skip
    """Milliseconds per sampling step for each setting (unguided and each SAG mask), and the
    guided/unguided ratios.

    After one compiling call per setting, the settings are timed in ``rounds`` interleaved
    rounds (unguided, column sum, TokenRank, then again), so that a change in the machine's
    load hits all settings alike; each ratio is taken within a round and the medians over
    rounds are reported, with the range of the per-round ratios.
    """
    labels = np.full(batch, model.cfg.null_label)
    opts = {"steps": steps, "schedule": schedule, "num_timesteps": num_timesteps}
    calls = {
        k or "none": (lambda k=k: ddim_sample(model, labels, sag=k, **opts))
        for k in (None, *MASK_KINDS)
    }
    t = interleaved(calls, rounds=rounds, baseline="none")
    return {
        "batch": batch,
        "steps": steps,
        "rounds": rounds,
        "ms_per_step": {k: ms / steps for k, ms in t["ms"].items()},
        "ratio_vs_unguided": t["ratio"],
        "ratio_range": t["ratio_range"],
    }


def _forward_at(model, x0, t, *, seed, schedule, num_timesteps: int = 1000):
    """x̂0 and every layer's attention of one unconditional forward at timestep ``t`` on
    noised ``x0`` (in [-1, 1])."""
    if not 0 <= t < num_timesteps:
        raise ValueError(f"t must lie in [0, {num_timesteps}), got {t}")
    abar = float(alphas_cumprod(num_timesteps, schedule=schedule)[t])
    noise = jax.random.normal(jax.random.key(seed), x0.shape)
    xt = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise
    labels = jnp.full(len(x0), model.cfg.null_label)
    eps, aux = model(xt, jnp.full(len(x0), t), labels)
    return np.asarray((xt - np.sqrt(1 - abar) * eps) / np.sqrt(abar)), aux["attn"]


def _masks(model, attn, layer):
    return {k: np.asarray(sag_mask(attn[:, layer], kind=k, n_label=model.cfg.n_label))
            for k in MASK_KINDS}  # fmt: skip


def mask_agreement(model, images, /, *, ts=(100, 300, 500, 700, 900), seed=0,
                   schedule: str = "cosine", num_timesteps: int = 1000) -> list[dict]:  # fmt: skip
    """Per timestep and layer: the share of image tokens on which the column-sum and TokenRank
    masks agree, and the share each masks (unconditional forwards on noised ``images``)."""
    x0 = jnp.asarray(images, jnp.float32) * 2 - 1
    rows = []
    for t in ts:
        _, attn = _forward_at(model, x0, t, seed=seed + t, schedule=schedule,
                              num_timesteps=num_timesteps)  # fmt: skip
        for layer in range(model.cfg.depth):
            m = _masks(model, attn, layer)
            rows.append({"t": t, "layer": layer, **_mask_stats(m)})
    return rows


def _mask_stats(masks: dict) -> dict:
    """The share of image tokens on which the two masks agree, and the share each masks."""
    c, r = masks["column_sum"], masks["tokenrank"]
    return {
        "agreement": float(np.mean(c == r)),
        "column_sum_fraction": float(c.mean()),
        "tokenrank_fraction": float(r.mean()),
    }


def mask_figure(model, images, path: pathlib.Path, /, *, t: int = 500, seed: int = 0,
                schedule: str = "cosine", num_timesteps: int = 1000) -> dict:  # fmt: skip
    """Rows = images; columns: the image, x̂0 at ``t`` (unconditional), the column-sum mask, the
    TokenRank mask (both from the same forward). Returns mask statistics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x0 = jnp.asarray(images, jnp.float32) * 2 - 1
    x0_hat, attn = _forward_at(model, x0, t, seed=seed, schedule=schedule,
                               num_timesteps=num_timesteps)  # fmt: skip
    masks = _masks(model, attn, model.cfg.depth // 2)
    size = model.cfg.image_size
    fig, axes = plt.subplots(len(x0), 4, figsize=(8, 2 * len(x0)), squeeze=False)
    titles = ["image", f"x̂0 (t={t})", "mask: column sum", "mask: TokenRank"]
    for i in range(len(x0)):
        panels = [np.asarray(images[i]), np.clip((x0_hat[i] + 1) / 2, 0, 1)]
        for k in MASK_KINDS:
            m = np.asarray(upsample_mask(jnp.asarray(masks[k][i]), image_size=size))
            panels.append(0.35 * panels[1] + 0.65 * m * np.array([1.0, 0.2, 0.2]))
        for ax, p, title in zip(axes[i], panels, titles):
            ax.imshow(p, interpolation="nearest")
            ax.set_axis_off()
            if i == 0:
                ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return {"t": t, "layer": model.cfg.depth // 2, **_mask_stats(masks)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.sample_dit", description=__doc__)
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", help="default: <workdir>/samples")
    p.add_argument("--scale", type=float, default=0.75)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--per-row", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cfg", type=float, help="classifier-free guidance weight (default: none)")
    p.add_argument("--time-batch", type=int, default=64, help="0 = skip the timing")
    a = p.parse_args(argv)
    model, cfg = load_dit(a.workdir)
    out = pathlib.Path(a.out or pathlib.Path(a.workdir) / "samples")
    out.mkdir(parents=True, exist_ok=True)
    report = {"workdir": str(a.workdir), "steps": a.steps, "scale": a.scale, "seed": a.seed,
              "sampler": "ddim", "eta": 0.0, "sag_layer": cfg.model.depth // 2,
              "cfg_scale": a.cfg}  # fmt: skip
    report["grids"] = sample_grids(model, out, scale=a.scale, per_row=a.per_row, steps=a.steps,
                                   seed=a.seed, schedule=cfg.schedule,
                                   num_timesteps=cfg.num_timesteps, cfg_scale=a.cfg)  # fmt: skip
    test = load_data(dataclasses.replace(cfg, train_size=cfg.batch_size))["test"]
    report["masks"] = mask_figure(model, test["images"][:6] / 255.0, out / "masks.png",
                                  schedule=cfg.schedule,
                                  num_timesteps=cfg.num_timesteps)  # fmt: skip
    report["mask_agreement"] = mask_agreement(model, test["images"][:64] / 255.0,
                                              schedule=cfg.schedule,
                                              num_timesteps=cfg.num_timesteps)  # fmt: skip
    if a.time_batch:
        report["timing"] = time_sampling(model, batch=a.time_batch, schedule=cfg.schedule,
                                         num_timesteps=cfg.num_timesteps)  # fmt: skip
    (out / "sampling.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
