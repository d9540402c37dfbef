"""Training the class-conditional DiT (``markov_attn.nn.DiT``) as an ε-prediction diffusion model.

Library: :func:`train_and_evaluate` ``(config, workdir) -> summary dict`` and
:func:`load_dit` ``(workdir) -> (model, config)``. CLI::

    python -m experiments.train_dit --preset cpu --workdir runs/dit_cpu

Loss: ``‖ε̂(x_t, t, y) − ε‖²`` averaged over pixels, ``t`` uniform over ``0 … T-1``, images in
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
import math
import os
import pathlib
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from markov_attn.nn import DiT, config_to_dict, q_sample
from markov_attn.nn import config_from_dict as _from_dict

from .ckpt import Checkpointer, CheckpointError
from .dit_configs import PRESETS, DiTTrainConfig, get_preset
from .train import (
    _count_params,
    _to_uint8,
    _truncate_metrics,
    batch_indices,
    make_optimizer,
    synthetic_data,
)

__all__ = ["config_from_dict", "load_data", "load_dit", "main", "train_and_evaluate"]

# Fields that do not change the trajectory: a resumed run may change them.
_FREE_FIELDS = ("name", "data_root", "test_size", "ckpt_every", "keep_checkpoints",
                "eval_batch_size")  # fmt: skip


def load_data(cfg: DiTTrainConfig, /) -> dict:
    """``{"train": {"images", "labels"}, "test": {...}}``, images uint8 at the model's size."""
    size = cfg.model.image_size
    if cfg.data == "synthetic":
        return {
            split: synthetic_data(n, size=size, seed=cfg.data_seed, split=split)
            for split, n in (("train", cfg.train_size), ("test", cfg.test_size))
        }
    from markov_attn.data import make_split

    out = {}
    for split, n in (("train", cfg.train_size), ("test", cfg.test_size)):
        d = make_split(split, n, size=size, seed=cfg.data_seed, root=cfg.data_root)
        out[split] = {"images": _to_uint8(d["images"]), "labels": d["labels"].astype(np.int32)}
    return out


def _new_model(cfg: DiTTrainConfig) -> DiT:
    return DiT(cfg.model, rngs=nnx.Rngs(params=cfg.seed))


def _denoising_loss(model_fn, params, images_u8, labels, key, *, cfg, train):
    """Mean ``‖ε̂ − ε‖²`` of one batch; ``key`` draws t, ε, label dropout and flips."""
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
    return jnp.mean((eps - noise) ** 2, axis=(1, 2, 3))


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
    """Held-out denoising loss: each test image at its own fixed ``(t, ε)`` (key ``(seed, i)``),
    no label dropout, last batch padded and dropped."""
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


def _check_same_run(stored: dict, cfg: DiTTrainConfig, workdir) -> None:
    current = config_to_dict(cfg)
    for key in sorted(set(stored) | set(current)):
        if key not in _FREE_FIELDS and stored.get(key) != current.get(key):
            raise ValueError(
                f"{workdir} holds a checkpoint of a different run ({key}: stored "
                f"{stored.get(key)!r}, now {current.get(key)!r}); use another --workdir or "
                f"delete {workdir}"
            )


class _Log:
    """Windowed training metrics: one ``metrics.jsonl`` line per ``log_every`` steps."""

    def __init__(self, cfg, path, start):
        self.cfg, self.file, self.start = cfg, path.open("a"), start
        self.window, self.window_start, self.t = [], start, time.perf_counter()
        self.timed_steps, self.timed_s, self.paused, self.t0 = 0, 0.0, 0.0, time.perf_counter()
        self.last = {}

    def step(self, done, metrics):
        self.window.append(metrics)
        if done % self.cfg.log_every and done != self.cfg.steps:
            return None
        window = jax.device_get(self.window)
        now = time.perf_counter()
        dt, k = now - self.t - self.paused, done - self.window_start
        if self.window_start > self.start:  # the first window of a session holds compilation
            self.timed_steps, self.timed_s = self.timed_steps + k, self.timed_s + dt
        self.last = {
            "step": done,
            "loss": float(np.mean([w["loss"] for w in window])),
            "grad_norm": float(np.mean([w["grad_norm"] for w in window])),
            "step_time_ms": 1e3 * dt / k,
            "img_per_s": k * self.cfg.batch_size / dt,
            "elapsed_s": now - self.t0,
        }
        self.file.write(json.dumps(self.last) + "\n")
        self.file.flush()
        self.window, self.window_start, self.t, self.paused = [], done, time.perf_counter(), 0.0
        return self.last

    def close(self):
        self.file.close()


def _after_step(cfg, done, state, metrics, *, log, ckpt, bar) -> None:
    """Logging, progress bar and checkpointing after global step ``done``."""
    line = log.step(done, metrics)
    if line is not None and bar is not None:
        bar.set_postfix(loss=f"{line['loss']:.4f}", img_s=f"{line['img_per_s']:.0f}")
    if done % cfg.ckpt_every == 0 or done == cfg.steps:
        t_save = time.perf_counter()
        params, ema, opt_state = state
        meta = {"step": done, "config": config_to_dict(cfg)}
        ckpt.save(done, {"params": params, "ema": ema, "opt_state": opt_state}, meta)
        log.paused += time.perf_counter() - t_save
    if bar is not None:
        bar.update(1)


def train_and_evaluate(
    config: DiTTrainConfig,
    workdir: str | os.PathLike,
    /,
    *,
    data: dict | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    kill_at_step: int | None = None,
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
      kill_at_step: SIGKILL this process after that step (tests).

    Returns:
      The summary (``test_loss``, ``train_loss``, step time, images/s, parameters, config).
    """
    t_start = time.perf_counter()
    cfg, workdir = config, pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    metrics_path = workdir / "metrics.jsonl"
    ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=cfg.keep_checkpoints)
    latest = ckpt.latest_step()
    if latest is not None:
        _check_same_run(ckpt.read_meta(step=latest).get("config", {}), cfg, workdir)
    data = load_data(cfg) if data is None else data
    images = _to_uint8(data["train"]["images"])
    labels = np.asarray(data["train"]["labels"], np.int32)

    tx, init, train_step, eval_step = _compiled(_normalised(cfg))
    start = 0
    if latest is None:
        params, ema, opt_state = init()
    else:
        state, meta = ckpt.restore(_abstract_state(cfg, tx), step=latest)
        params, ema, opt_state = state["params"], state["ema"], state["opt_state"]
        start = int(meta["step"])
    _truncate_metrics(metrics_path, start)

    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = None
    if progress and start < end:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc=f"dit/{cfg.name}", dynamic_ncols=True)
    log = _Log(cfg, metrics_path, start)
    try:
        state = (params, ema, opt_state)
        for step in range(start, end):
            idx = batch_indices(step, n=len(labels), batch_size=cfg.batch_size, seed=cfg.seed)
            *state, m = train_step(*state, images[idx], labels[idx], jnp.int32(step))
            _after_step(cfg, step + 1, state, m, log=log, ckpt=ckpt, bar=bar)
            if kill_at_step is not None and step + 1 == kill_at_step:
                jax.block_until_ready(state)
                os.kill(os.getpid(), signal.SIGKILL)
        params, ema, opt_state = state
    finally:
        log.close()
        ckpt.close()
        if bar is not None:
            bar.close()
    train_time = time.perf_counter() - log.t0
    if end < cfg.steps:
        return {"step": end, "params": params, "ema": ema, "last": log.last}

    test_data = {k: np.asarray(v) for k, v in data["test"].items()}
    test_data["images"] = _to_uint8(test_data["images"])
    test = evaluate(eval_step, ema, test_data, batch_size=cfg.eval_batch_size, seed=cfg.seed)
    with metrics_path.open("a") as f:
        f.write(json.dumps({"step": cfg.steps, "split": "test", "final": True, **test}) + "\n")
    history = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()]
    train_lines = [h for h in history if "loss" in h]
    timed, secs = log.timed_steps, log.timed_s
    if timed == 0 and start < end:
        timed, secs = end - start, train_time
    step_time = secs / timed if timed else float("nan")
    summary = {
        "name": cfg.name,
        "seed": cfg.seed,
        "steps": cfg.steps,
        "resumed_from": start,
        **test,
        "first_loss": train_lines[0]["loss"] if train_lines else None,
        "train_loss": train_lines[-1]["loss"] if train_lines else None,
        "step_time_ms": 1e3 * step_time if math.isfinite(step_time) else None,
        "images_per_s": cfg.batch_size / step_time if math.isfinite(step_time) else None,
        "params": _count_params(params),
        "train_time_s": train_time,
        "wall_time_s": time.perf_counter() - t_start,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "config": config_to_dict(cfg),
    }
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def load_dit(workdir: str | os.PathLike, /, *, step: int | None = None, ema: bool = True):
    """The trained DiT of a run directory, ``(model, config)``; EMA weights unless ``ema=False``."""
    workdir = pathlib.Path(workdir)
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
    cfg = config_from_args(argv)
    try:
        summary = train_and_evaluate(
            cfg, a.workdir, progress=not a.no_progress, kill_at_step=a.kill_at_step
        )
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    keys = ("first_loss", "train_loss", "test_loss", "step_time_ms", "images_per_s")
    print(json.dumps({k: summary[k] for k in keys}))
    print(f"wrote {pathlib.Path(a.workdir) / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
