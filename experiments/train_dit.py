"""Training the class-conditional DiT (``markov_attn.nn.DiT``) as an ε-prediction diffusion model.

Library: :func:`train_and_evaluate` ``(config, workdir) -> summary dict`` and
:func:`load_dit` ``(workdir) -> (model, config)``. CLI::

    python -m experiments.train_dit --preset cpu --workdir runs/dit_cpu

Loss: ``‖ε̂(x_t, t, y) − ε‖²`` averaged over pixels (weighted per t with ``loss_weight="v"``,
see :class:`~experiments.dit_configs.DiTTrainConfig`), ``t`` uniform over ``0 … T-1``, images in
``[-1, 1]``, labels replaced by the null label with probability ``label_dropout``. Everything
random derives from ``(seed, step)`` (data order per epoch as in ``experiments.train``; the
timesteps, noise, label dropout and flips from ``fold_in(key(seed), step)``), so a checkpoint
(parameters, EMA, optimiser state, step) resumes a killed run on the same trajectory.

The run directory holds ``checkpoints/<step>/`` (Orbax), ``metrics.jsonl`` and
``summary.json``; the held-out denoising loss of the EMA weights closes ``metrics.jsonl``.
"""

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from markov_attn.nn import DiT, alphas_cumprod, q_sample
from markov_attn.nn import config_from_dict as _from_dict

from ._loop import TrainingRun, count_params, sigkill_at
from .ckpt import Checkpointer, CheckpointError
from .dit_configs import PRESETS, DiTTrainConfig, get_preset
from .train import _to_uint8, batch_indices, make_optimizer, synthetic_data

__all__ = [
    "config_from_dict",
    "load_data",
    "load_dit",
    "load_split",
    "main",
    "train_and_evaluate",
]

# Fields that do not change the trajectory: a resumed run may change them.
_FREE_FIELDS = ("name", "data_root", "test_size", "ckpt_every", "keep_checkpoints",
                "eval_batch_size")  # fmt: skip


def load_split(
    cfg: DiTTrainConfig, split: str, n: int, /, *, masks: bool = False, start: int = 0
) -> dict:
    """``{"images", "labels"}`` of ``n`` images of ``split`` as the run trains on them: uint8 at
    the model's size, from ``cfg.data`` (the benchmark under ``cfg.data_root``, or synthetic);
    with ``masks=True`` also the benchmark's object masks ``"masks"`` (none for synthetic).
    ``start``: the index of the first benchmark image (held-out images after a run's own test
    images); synthetic data takes the last ``n`` of ``start + n`` draws (independent noise
    images of the same distribution, not the same images as a shorter call's)."""
    size = cfg.model.image_size
    if cfg.data == "synthetic":
        d = synthetic_data(start + n, size=size, seed=cfg.data_seed, split=split)
        return {k: v[start:] for k, v in d.items()}
    from markov_attn.data import make_split

    d = make_split(split, n, size=size, seed=cfg.data_seed, root=cfg.data_root, start=start)
    out = {"images": _to_uint8(d["images"]), "labels": d["labels"].astype(np.int32)}
    return {**out, "masks": d["masks"]} if masks else out


def load_data(cfg: DiTTrainConfig, /) -> dict:
    """``{"train": {"images", "labels"}, "test": {...}}``, images uint8 at the model's size."""
    return {
        split: load_split(cfg, split, n)
        for split, n in (("train", cfg.train_size), ("test", cfg.test_size))
    }


def _new_model(cfg: DiTTrainConfig) -> DiT:
    return DiT(cfg.model, rngs=nnx.Rngs(params=cfg.seed))


def loss_weights(cfg: DiTTrainConfig) -> np.ndarray:
    """``(T,)`` float32 training weight of each timestep's ε-MSE (``cfg.loss_weight``)."""
    if cfg.loss_weight == "eps":
        return np.ones(cfg.num_timesteps, np.float32)
    abar = alphas_cumprod(cfg.num_timesteps, schedule=cfg.schedule)
    with np.errstate(divide="ignore"):
        inv_snr = (1.0 - abar) / abar  # inf where abar underflows to 0
    return np.minimum(1.0 + inv_snr, cfg.loss_weight_cap).astype(np.float32)


def _denoising_loss(model_fn, params, images_u8, labels, key, *, cfg, train):
    """Per-image ``‖ε̂ − ε‖²`` of one batch (times the ``cfg.loss_weight`` weight of its t when
    ``train``); ``key`` draws t, ε, label dropout and flips."""
    k_t, k_noise, k_drop, k_flip = jax.random.split(key, 4)
    x0 = images_u8.astype(jnp.float32) / 127.5 - 1.0
    b = x0.shape[0]
    if train and cfg.flip:
        flip = jax.random.bernoulli(k_flip, 0.5, (b,))
        x0 = jnp.where(flip[:, None, None, None], x0[:, :, ::-1], x0)
    if train and cfg.label_dropout:
        drop = jax.random.bernoulli(k_drop, cfg.label_dropout, (b,))
        labels = jnp.where(drop, cfg.model.null_label, labels)
    t = jax.random.randint(k_t, (b,), 0, cfg.num_timesteps)
    noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
    xt = q_sample(x0, t, noise, schedule=cfg.schedule, num_timesteps=cfg.num_timesteps)
    eps, _ = model_fn(params, xt, t, labels)
    per = jnp.mean((eps - noise) ** 2, axis=(1, 2, 3))
    if train and cfg.loss_weight != "eps":
        per = per * jnp.asarray(loss_weights(cfg))[t]
    return per


@functools.lru_cache(maxsize=8)
def _compiled(cfg: DiTTrainConfig):
    """``(tx, init, train_step, eval_step)`` of a configuration (free fields normalised)."""
    tx = make_optimizer(cfg)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: _new_model(cfg)))
    model_fn = lambda p, *a: nnx.merge(graphdef, p)(*a)
    base = jax.random.key(cfg.seed)

    def init_fn():
        params = nnx.state(_new_model(cfg), nnx.Param)
        return params, tx.init(params)

    def init():
        compiled = jax.jit(init_fn).lower().compile({"xla_backend_optimization_level": 0})
        params, opt_state = jax.device_put(compiled(), jax.devices()[0])
        ema = jax.tree.map(lambda x: jnp.array(x, copy=True), params)  # own buffers (donated)
        return params, ema, opt_state

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def train_step(params, ema, opt_state, images_u8, labels, step):
        key = jax.random.fold_in(base, step)

        def loss_fn(p):
            per = _denoising_loss(model_fn, p, images_u8, labels, key, cfg=cfg, train=True)
            return jnp.mean(per)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        k = step.astype(jnp.float32)
        decay = jnp.minimum(cfg.ema_decay, (1.0 + k) / (10.0 + k))
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
        gnorm = optax.tree.norm(grads)
        return params, ema, opt_state, {"loss": loss, "grad_norm": gnorm}

    @jax.jit
    def eval_step(params, images_u8, labels, key):
        return _denoising_loss(model_fn, params, images_u8, labels, key, cfg=cfg, train=False)

    return tx, init, train_step, eval_step


def _normalised(cfg: DiTTrainConfig) -> DiTTrainConfig:
    defaults = {f.name: f.default for f in dataclasses.fields(DiTTrainConfig)}
    return dataclasses.replace(cfg, **{k: defaults[k] for k in _FREE_FIELDS})


def _abstract_state(cfg: DiTTrainConfig, tx) -> dict:
    params = nnx.state(nnx.eval_shape(lambda: _new_model(cfg)), nnx.Param)
    return {"params": params, "ema": params, "opt_state": jax.eval_shape(tx.init, params)}


def evaluate(eval_step, params, data: dict, *, batch_size: int, seed: int) -> dict:
    """Held-out denoising loss: fixed ``(t, ε)`` per test image, drawn per batch from the key
    ``(seed, first index of the batch)``, so the same for every checkpoint of a run but not
    for another ``eval_batch_size`` (compare losses at one batch size); no label dropout, last
    batch padded and dropped."""
    images, labels = data["images"], data["labels"]
    n = len(labels)
    losses = []
    for start in range(0, n, batch_size):
        x, y = images[start : start + batch_size], labels[start : start + batch_size]
        m = len(y)
        if m < batch_size:
            x = np.concatenate([x, np.zeros((batch_size - m, *x.shape[1:]), x.dtype)])
            y = np.concatenate([y, np.zeros(batch_size - m, y.dtype)])
        key = jax.random.fold_in(jax.random.key(seed + 1_000_003), start)
        losses.append(np.asarray(eval_step(params, x, y, key))[:m])
    return {"test_loss": float(np.mean(np.concatenate(losses))), "test_size": n}


def config_from_dict(d: dict, /) -> DiTTrainConfig:
    """Inverse of the stored config (checkpoint meta, ``summary.json``;
    :func:`markov_attn.nn.config_to_dict`)."""
    return _from_dict(DiTTrainConfig, d)


def train_and_evaluate(
    config: DiTTrainConfig,
    workdir: str | os.PathLike,
    /,
    *,
    data: dict | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    on_step: Callable[[int, object], None] | None = None,
) -> dict:
    """Trains ``config`` in ``workdir`` (resuming its last checkpoint), then writes the held-out
    denoising loss of the EMA weights and ``summary.json``.

    Args:
      config: the run (:mod:`experiments.dit_configs`).
      workdir: run directory; a checkpoint there must come from the same configuration.
      data: in-memory ``{"train": {"images", "labels"}, "test": {...}}`` instead of
        ``config.data``.
      stop_after: stop after this step without a final checkpoint, as if killed (tests).
      progress: tqdm progress bar.
      on_step: ``(step, state) -> None`` after every step (:class:`experiments._loop.TrainingRun`).

    Returns:
      The summary (``test_loss``, ``train_loss``, step time, images/s, parameters, config).
    """
    cfg = config
    run = TrainingRun(
        cfg,
        workdir,
        free_fields=_FREE_FIELDS,
        # runs from before these options existed
        assumed={"model": {"label_adaln": True}, "loss_weight": "eps", "loss_weight_cap": 10.0},
        stop_after=stop_after,
        on_step=on_step,
        progress={"desc": f"dit/{cfg.name}"} if progress else None,
    )
    data = load_data(cfg) if data is None else data
    images = _to_uint8(data["train"]["images"])
    labels = np.asarray(data["train"]["labels"], np.int32)

    tx, init, train_step, eval_step = _compiled(_normalised(cfg))
    if run.latest is None:
        state = init()
    else:
        restored, _ = run.restore(_abstract_state(cfg, tx))
        state = (restored["params"], restored["ema"], restored["opt_state"])

    def step_fn(state, step):
        idx = batch_indices(step, n=len(labels), batch_size=cfg.batch_size, seed=cfg.seed)
        *state, m = train_step(*state, images[idx], labels[idx], jnp.int32(step))
        return state, m

    params, ema, _ = run.train(
        state,
        step_fn,
        summarise=lambda window: {
            "loss": float(np.mean([w["loss"] for w in window])),
            "grad_norm": float(np.mean([w["grad_norm"] for w in window])),
        },
        postfix=lambda line: {"loss": f"{line['loss']:.4f}", "img_s": f"{line['img_per_s']:.0f}"},
        saved=lambda state: dict(zip(("params", "ema", "opt_state"), state)),
    )
    if run.stopped_early:
        return {"step": run.end, "params": params, "ema": ema, "last": run.last}

    test_data = {k: np.asarray(v) for k, v in data["test"].items()}
    test_data["images"] = _to_uint8(test_data["images"])
    test = evaluate(eval_step, ema, test_data, batch_size=cfg.eval_batch_size, seed=cfg.seed)
    run.append({"step": cfg.steps, "split": "test", "final": True, **test})
    train_lines = run.train_lines()
    return run.summary(
        {
            **test,
            "first_loss": train_lines[0]["loss"] if train_lines else None,
            "train_loss": train_lines[-1]["loss"] if train_lines else None,
        },
        head={"name": cfg.name, "seed": cfg.seed},
        params=count_params(params),
    )


def load_dit(workdir: str | os.PathLike, /, *, step: int | None = None, ema: bool = True):
    """The trained DiT of a run directory, ``(model, config)``; EMA weights unless ``ema=False``."""
    workdir = pathlib.Path(workdir)
    if not (workdir / "checkpoints").is_dir():  # the checkpointer would create it
        raise FileNotFoundError(f"no checkpoint under {workdir / 'checkpoints'}; train first")
    ckpt = Checkpointer(workdir / "checkpoints")
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {workdir / 'checkpoints'}; train first")
        cfg = config_from_dict(ckpt.read_meta(step=step)["config"])
        state, _ = ckpt.restore(_abstract_state(cfg, make_optimizer(cfg)), step=step)
    finally:
        ckpt.close()
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: _new_model(cfg)))
    return nnx.merge(graphdef, state["ema" if ema else "params"]), cfg


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.train_dit", description=__doc__)
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    p.add_argument("--workdir", required=True)
    p.add_argument("--seed", type=int)
    p.add_argument("--steps", type=int, help="override the preset's steps (warm-up <= 10%%)")
    p.add_argument("--data", choices=("bench", "synthetic"))
    p.add_argument("--data-root")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--kill-at-step", type=int, help=argparse.SUPPRESS)
    return p


def config_from_args(argv=None) -> DiTTrainConfig:
    a = _parser().parse_args(argv)
    warmup = None
    if a.steps is not None:
        warmup = min(PRESETS[a.preset]().warmup_steps, a.steps // 10)
    return get_preset(
        a.preset, seed=a.seed, steps=a.steps, data=a.data, data_root=a.data_root,
        warmup_steps=warmup,
    )  # fmt: skip


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    try:
        cfg = config_from_args(argv)
    except ValueError as err:  # a config the presets refuse: one line, not a traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        summary = train_and_evaluate(
            cfg, a.workdir, progress=not a.no_progress, on_step=sigkill_at(a.kill_at_step)
        )
    except (CheckpointError, FileNotFoundError, ValueError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    keys = ("first_loss", "train_loss", "test_loss", "step_time_ms", "images_per_s")
    print(json.dumps({k: summary[k] for k in keys}))
    print(f"wrote {pathlib.Path(a.workdir) / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
