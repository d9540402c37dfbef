"""Training a ViT (any pooling head) on the benchmark's classification task.

Library: :func:`train_and_evaluate` ``(config, workdir) -> summary dict``. CLI::

    python -m experiments.train --preset cpu --pool tokenrank --workdir runs/x --seed 0

Everything random derives from ``(seed, step)``: the data order is a per-epoch permutation
seeded with ``(seed, epoch)``, the flip augmentation (inside the jitted step) uses
``fold_in(key(seed), step)``. A checkpoint therefore only needs the parameters, the optimiser
state and the step; a run killed at any point resumes from its last checkpoint on the same
trajectory (metric lines past the checkpoint are dropped and rewritten).

The run directory holds ``checkpoints/<step>/`` (Orbax), ``metrics.jsonl`` (one JSON object per
logged step, plus a final ``"split": "test"`` line) and ``summary.json``.
"""

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import sys
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from markov_attn.nn import ViT, load_run, write_weights
from markov_attn.nn import config_from_dict as _from_dict

from ._loop import VIT_ASSUMED, TrainingRun, count_params, sigkill_at
from .ckpt import CheckpointError
from .configs import PRESETS, TrainConfig, parse_set, replace_fields

__all__ = [
    "CheckpointError",
    "config_from_args",
    "config_from_dict",
    "load_data",
    "load_model",
    "main",
    "save_weights",
    "synthetic_data",
    "train_and_evaluate",
    "training_loss",
    "write_weights",
]

# Fields that do not change the trajectory: a resumed run may change them.
_FREE_FIELDS = (
    "name",
    "data_root",
    "test_size",
    "ckpt_every",
    "keep_checkpoints",
    "eval_batch_size",
    "eval_every",
)


# ----------------------------------------------------------------------------------------------
# data


def _to_uint8(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    return np.clip(np.rint(images * 255.0), 0, 255).astype(np.uint8)


def synthetic_data(n: int, /, *, size: int, seed: int = 0, split: str = "train") -> dict:
    """A learnable stand-in for the benchmark: one colour per class plus pixel noise.

    Needs no data package (tests, quick checks). Images ``uint8 (n, size, size, 3)``, labels
    ``int32 (n,)``; deterministic per ``(seed, split)``; train and test share the colours.
    """
    colours = np.random.default_rng([seed, 7]).random((10, 1, 1, 3), dtype=np.float32)
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    labels = rng.integers(0, 10, n).astype(np.int32)
    noise = rng.random((n, size, size, 3), dtype=np.float32)
    return {"images": _to_uint8(0.6 * colours[labels] + 0.4 * noise), "labels": labels}


def load_data(cfg: TrainConfig, /) -> dict:
    """``{"train": {"images", "labels"}, "test": {...}}`` in memory (images as uint8).

    ``cfg.data == "bench"`` uses ``markov_attn.data.make_split`` at ``cfg.difficulty``; its
    ``DataMissingError`` (no Fashion-MNIST installed) propagates with install instructions.
    Another level than ``"standard"`` adds ``"test_standard"``, the benchmark's test split.
    """
    size = cfg.model.image_size
    if cfg.data == "synthetic":
        return {
            "train": synthetic_data(cfg.train_size, size=size, seed=cfg.data_seed, split="train"),
            "test": synthetic_data(cfg.test_size, size=size, seed=cfg.data_seed, split="test"),
        }
    from markov_attn.data import make_split

    out = {}
    parts = [("train", "train", cfg.train_size, cfg.difficulty)]
    parts.append(("test", "test", cfg.test_size, cfg.difficulty))
    if cfg.difficulty != "standard":
        parts.append(("test_standard", "test", cfg.test_size, "standard"))
    for key, split, n, level in parts:
        # in chunks, so that the float32 images of a chunk, not of the whole split, are held
        # at once (92,160 images at 64 px are 4.5 GB in float32, 1.1 GB as uint8)
        images = np.empty((n, size, size, 3), np.uint8)
        labels = np.empty((n,), np.int32)
        for start in range(0, n, _DATA_CHUNK):
            m = min(_DATA_CHUNK, n - start)
            d = make_split(
                split,
                m,
                size=size,
                seed=cfg.data_seed,
                start=start,
                root=cfg.data_root,
                difficulty=level,
            )
            images[start : start + m] = _to_uint8(d["images"])
            labels[start : start + m] = d["labels"]
        out[key] = {"images": images, "labels": labels}
    return out


_DATA_CHUNK = 4096


def _check_data(data: dict, cfg: TrainConfig) -> dict:
    out = {}
    for split in ("train", "test", "test_standard"):
        if split == "test_standard" and split not in data:
            continue  # optional: the benchmark's test split of a run on another level
        if split not in data or "images" not in data[split] or "labels" not in data[split]:
            raise ValueError(
                "data= must be {'train': {'images', 'labels'}, 'test': {'images', 'labels'}}"
            )
        images, labels = _to_uint8(data[split]["images"]), np.asarray(data[split]["labels"])
        s = cfg.model.image_size
        if images.ndim != 4 or images.shape[1:] != (s, s, cfg.model.in_channels):
            raise ValueError(
                f"{split} images must have shape (N, {s}, {s}, {cfg.model.in_channels}) to match "
                f"the model config, got {images.shape}"
            )
        if labels.shape != images.shape[:1]:
            raise ValueError(f"{split} labels must have shape ({len(images)},), got {labels.shape}")
        out[split] = {"images": images, "labels": labels.astype(np.int32)}
    if len(out["train"]["images"]) < cfg.batch_size:
        raise ValueError(
            f"{len(out['train']['images'])} training images < batch_size {cfg.batch_size}"
        )
    return out


def batch_indices(step: int, /, *, n: int, batch_size: int, seed: int) -> np.ndarray:
    """Indices of the training batch at ``step``: epoch ``e`` uses the permutation seeded with
    ``(seed, e)``; each epoch yields ``n // batch_size`` full batches (the rest is dropped)."""
    per_epoch = n // batch_size
    epoch, i = divmod(step, per_epoch)
    perm = _permutation(seed, epoch, n)
    return perm[i * batch_size : (i + 1) * batch_size]


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


# ----------------------------------------------------------------------------------------------
# model, optimiser, steps


def _schedule(cfg: TrainConfig):
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        decay_steps=cfg.steps,
        end_value=cfg.lr * cfg.end_lr_ratio,
    )


def make_optimizer(cfg: TrainConfig, /) -> optax.GradientTransformation:
    """AdamW with linear warm-up and cosine decay; weight decay on arrays of rank >= 2 only."""
    adamw = optax.adamw(
        _schedule(cfg),
        weight_decay=cfg.weight_decay,
        mask=lambda params: jax.tree.map(lambda x: x.ndim >= 2, params),
    )
    if cfg.grad_clip:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)
    return adamw


class _Compiled(NamedTuple):
    graphdef: object  # inference mode (batch norms on running statistics)
    rest: object
    tx: optax.GradientTransformation
    init: object  # () -> (params, batch_stats, opt_state)
    train_step: object
    eval_step: object


def training_loss(logits, labels, /, *, label_smoothing: float = 0.0):
    """Mean cross-entropy against one-hot targets mixed with ``label_smoothing`` of the uniform
    distribution (``optax.smooth_labels``)."""
    if not label_smoothing:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets).mean()


def _random_shift(key, images, shift: int, /):
    """Translates each image of ``images`` (B, H, W, C) by its own random offset in
    ``[-shift, shift]`` pixels per axis, filling with the edge pixels."""
    b, h, w, _ = images.shape
    padded = jnp.pad(images, ((0, 0), (shift, shift), (shift, shift), (0, 0)), mode="edge")
    offsets = jax.random.randint(key, (b, 2), 0, 2 * shift + 1)

    def crop(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, image.shape[-1]))

    return jax.vmap(crop)(padded, offsets)


def _new_model(cfg: TrainConfig) -> ViT:
    return ViT(cfg.model, rngs=nnx.Rngs(params=cfg.seed))


@functools.lru_cache(maxsize=8)
def _compiled(cfg: TrainConfig) -> _Compiled:
    """The jitted functions of a configuration, cached so that runs of the same configuration in
    one process (resume, tests) compile once. ``cfg`` must have the free fields normalised."""
    tx = make_optimizer(cfg)
    schedule = _schedule(cfg)
    abstract = nnx.eval_shape(lambda: _new_model(cfg))
    graphdef, _, _, rest = nnx.split(abstract, nnx.Param, nnx.BatchStat, ...)
    # training mode: batch norms (the conv stem's, if any) normalise with batch statistics
    abstract.set_attributes(use_running_average=False, raise_if_not_found=False)
    train_graphdef = nnx.split(abstract, nnx.Param, nnx.BatchStat, ...)[0]
    aug_key = jax.random.fold_in(jax.random.key(cfg.seed), 1)
    shift_key = jax.random.fold_in(jax.random.key(cfg.seed), 2)

    def init_fn():
        model = _new_model(cfg)
        params = nnx.state(model, nnx.Param)
        return params, nnx.state(model, nnx.BatchStat), tx.init(params)

    def init():
        # One program for all initialisers, compiled without optimisation: XLA's optimising
        # compile of the random initialisers takes seconds on CPU, and it runs once.
        compiled = jax.jit(init_fn).lower().compile({"xla_backend_optimization_level": 0})
        # committed to the device like restored arrays, so both hit the same compiled step
        return jax.device_put(compiled(), jax.devices()[0])

    def forward(params, stats, images_u8, *, train=False):
        model = nnx.merge(train_graphdef if train else graphdef, params, stats, rest, copy=True)
        logits, _ = model(images_u8.astype(jnp.float32) / 255.0)
        return logits.astype(jnp.float32), nnx.state(model, nnx.BatchStat)

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def train_step(params, stats, opt_state, images_u8, labels, step):
        if cfg.flip:
            key = jax.random.fold_in(aug_key, step)
            flip = jax.random.bernoulli(key, 0.5, (images_u8.shape[0],))
            images_u8 = jnp.where(flip[:, None, None, None], images_u8[:, :, ::-1], images_u8)
        if cfg.shift:
            images_u8 = _random_shift(jax.random.fold_in(shift_key, step), images_u8, cfg.shift)

        def loss_fn(p):
            logits, new_stats = forward(p, stats, images_u8, train=True)
            loss = training_loss(logits, labels, label_smoothing=cfg.label_smoothing)
            return loss, (logits, new_stats)

        (loss, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        acc = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
        return params, stats, opt_state, {"loss": loss, "acc": acc, "lr": schedule(step)}

    @jax.jit
    def eval_step(params, stats, images_u8, labels, valid):
        logits, _ = forward(params, stats, images_u8)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        return jnp.sum(loss * valid), jnp.sum(correct * valid)

    return _Compiled(graphdef, rest, tx, init, train_step, eval_step)


def _normalised(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with the fields that do not change the computation reset (the cache key)."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    return dataclasses.replace(cfg, **{k: defaults[k] for k in _FREE_FIELDS})


def _abstract_train_state(cfg: TrainConfig, tx):
    model = nnx.eval_shape(lambda: _new_model(cfg))
    params = nnx.state(model, nnx.Param)
    opt_state = jax.eval_shape(tx.init, params)
    return _train_state(params, nnx.state(model, nnx.BatchStat), opt_state)


def _train_state(params, stats, opt_state) -> dict:
    """The checkpointed state; ``batch_stats`` only for models with batch norms, so that
    checkpoints of the others keep their layout."""
    state = {"params": params, "opt_state": opt_state}
    if jax.tree.leaves(stats):
        state["batch_stats"] = stats
    return state


def evaluate(eval_step, params, data: dict, *, batch_size: int, stats=None) -> dict:
    """Test loss and accuracy over ``data`` (last batch padded and masked); ``stats`` = the
    batch-norm statistics (an empty state for models without batch norms)."""
    images, labels = data["images"], data["labels"]
    n = len(labels)
    total_loss = total_correct = 0.0
    for start in range(0, n, batch_size):
        x, y = images[start : start + batch_size], labels[start : start + batch_size]
        m = len(y)
        valid = np.ones(batch_size, np.float32)
        if m < batch_size:
            pad = batch_size - m
            x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
            y = np.concatenate([y, np.zeros(pad, y.dtype)])
            valid[m:] = 0.0
        loss, correct = eval_step(params, stats, x, y, valid)
        total_loss += float(loss)
        total_correct += float(correct)
    return {"test_loss": total_loss / n, "test_acc": total_correct / n, "test_size": n}


# ----------------------------------------------------------------------------------------------
# config (de)serialisation (markov_attn.nn.config_to_dict / config_from_dict) and run helpers


def config_from_dict(d: dict, /) -> TrainConfig:
    """Inverse of :func:`markov_attn.nn.config_to_dict` (as stored in checkpoints and
    ``summary.json``)."""
    return _from_dict(TrainConfig, d)


def _trajectory_state(cfg: TrainConfig, step: int, n_train: int) -> dict:
    per_epoch = n_train // cfg.batch_size
    return {"step": step, "epoch": step // per_epoch, "batch_in_epoch": step % per_epoch}


# ----------------------------------------------------------------------------------------------
# the loop


def train_and_evaluate(
    config: TrainConfig,
    workdir: str | os.PathLike,
    /,
    *,
    data: dict | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    on_step: Callable[[int, object], None] | None = None,
) -> dict:
    """Trains ``config`` in ``workdir`` (resuming from its last checkpoint), evaluates, and
    writes ``metrics.jsonl`` and ``summary.json``.

    Args:
      config: the run (see :mod:`experiments.configs`).
      workdir: run directory; an existing checkpoint there is resumed (it must come from the
        same configuration, except for logging/checkpointing fields).
      data: optional in-memory data ``{"train": {"images", "labels"}, "test": {...}}``
        (images float in [0, 1] or uint8, NHWC) instead of ``config.data``.
      stop_after: stop after this global step without a final checkpoint or evaluation, as if
        the process had been killed there (for resume tests). Returns the partial state.
      progress: show a tqdm progress bar.
      on_step: ``(step, state) -> None`` after every step (:class:`experiments._loop.TrainingRun`).

    Returns:
      The summary dict (also written to ``workdir/summary.json``): test accuracy and loss,
      final training loss/accuracy, steady-state step time (ms) and images/s, parameter count,
      wall times and the config.

    Raises:
      markov_attn.data.DataMissingError: if the benchmark needs Fashion-MNIST and it is not
        installed (the message says how to install it).
      CheckpointError: if the last checkpoint cannot be restored.
      ValueError: if ``workdir`` holds a checkpoint of another configuration.
    """
    cfg = config
    run = TrainingRun(
        cfg,
        workdir,
        free_fields=_FREE_FIELDS,
        assumed=VIT_ASSUMED,  # runs from before the levels and pos_size existed
        stop_after=stop_after,
        on_step=on_step,
        progress={"desc": f"{cfg.name}/{cfg.model.pool}", "mininterval": 1.0} if progress else None,
    )

    t0 = time.perf_counter()
    data = _check_data(load_data(cfg) if data is None else data, cfg)
    data_time = time.perf_counter() - t0
    train_images, train_labels = data["train"]["images"], data["train"]["labels"]
    n_train = len(train_labels)

    fns = _compiled(_normalised(cfg))
    if run.latest is None:
        state = fns.init()
    else:
        restored, _ = run.restore(_abstract_train_state(cfg, fns.tx))
        stats = restored.get("batch_stats", nnx.State({}))
        state = (restored["params"], stats, restored["opt_state"])
    n_params = count_params(state[0])

    def train_step(state, step):
        idx = batch_indices(step, n=n_train, batch_size=cfg.batch_size, seed=cfg.seed)
        *state, m = fns.train_step(*state, train_images[idx], train_labels[idx], jnp.int32(step))
        return state, m

    def test(state, split="test"):
        params, stats, _ = state
        return evaluate(
            fns.eval_step, params, data[split], batch_size=cfg.eval_batch_size, stats=stats
        )

    params, stats, opt_state = run.train(
        state,
        train_step,
        summarise=lambda window: {
            "loss": float(np.mean([w["loss"] for w in window])),
            "acc": float(np.mean([w["acc"] for w in window])),
            "lr": float(window[-1]["lr"]),
        },
        postfix=lambda line: {
            "loss": f"{line['loss']:.3f}",
            "acc": f"{line['acc']:.3f}",
            "img_s": f"{line['img_per_s']:.0f}",
        },
        saved=lambda state: _train_state(*state),
        position=lambda step: _trajectory_state(cfg, step, n_train),
        evaluate=test,
        eval_every=cfg.eval_every,
    )
    if run.stopped_early:  # behave like a killed process (no summary)
        return {"step": run.end, "params": params, "opt_state": opt_state, "last": run.last}

    t0 = time.perf_counter()
    results = test((params, stats, opt_state))
    eval_time = time.perf_counter() - t0
    run.append({"step": cfg.steps, "split": "test", "final": True, **results})
    if "test_standard" in data:  # a run on an easier level: the benchmark's number as well
        std = test((params, stats, opt_state), "test_standard")
        results |= {f"{k}_standard": v for k, v in std.items() if k != "test_size"}
        run.append({"step": cfg.steps, "split": "test_standard", "final": True, **std})

    final = (run.train_lines() or [{}])[-1]
    timed_steps, _ = run.step_time()
    return run.summary(
        {**results, "train_loss": final.get("loss"), "train_acc": final.get("acc")},
        head={"name": cfg.name, "pool": cfg.model.pool, "seed": cfg.seed},
        params=n_params,
        extra={"timed_steps": timed_steps, "data_time_s": data_time, "eval_time_s": eval_time},
    )


def load_model(workdir: str | os.PathLike, /, *, step: int | None = None):
    """The trained model of a run directory: ``(model, config)`` from its checkpoint, the
    weights only (:func:`markov_attn.nn.load_run`) and the :class:`TrainConfig`.

    Raises:
      FileNotFoundError: if ``workdir`` has no checkpoint.
      CheckpointError: if it cannot be restored.
    """
    model, config = load_run(workdir, step=step)
    return model, config_from_dict(config)


def save_weights(workdir: str | os.PathLike, path: str | os.PathLike, /) -> pathlib.Path:
    """Writes the trained model of ``workdir`` to one ``.npz`` file: its parameters and batch
    statistics (no optimiser state, so about a third of a checkpoint) and its configuration
    (:func:`markov_attn.nn.write_weights`; :func:`markov_attn.nn.load_run` reads it back). This
    is the format of committed reference models."""
    model, config = load_run(workdir)
    return write_weights(model, config, path)


def load_weights(path: str | os.PathLike, /):
    """``(model, config)`` from a file written by :func:`save_weights`
    (:func:`markov_attn.nn.load_run` and the :class:`TrainConfig`).

    Raises:
      CheckpointError: if the file does not hold the parameters its configuration needs.
    """
    model, config = load_run(path)
    return model, config_from_dict(config)


# ----------------------------------------------------------------------------------------------
# CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.train", description="Train a ViT on the benchmark task."
    )
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    p.add_argument("--pool", choices=("cls", "mean", "map", "tokenrank"))
    p.add_argument("--workdir", required=True)
    p.add_argument("--seed", type=int)
    p.add_argument("--steps", type=int, help="override the preset's steps (warm-up <= 10%%)")
    p.add_argument("--data", choices=("bench", "synthetic"))
    p.add_argument("--data-root", help="Fashion-MNIST directory (default: the Debian package's)")
    p.add_argument(
        "--no-patch-norm",
        action="store_true",
        help="turn the ViT's patch_norm off (the ablation: the model then stays at chance)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override any TrainConfig or ViTConfig field (a Python literal, e.g. "
        "--set shift=4 --set 'conv_stem=(32, 64, 128)'); repeatable",
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--kill-at-step", type=int, help=argparse.SUPPRESS)  # for the resume tests
    return p


def config_from_args(argv=None) -> TrainConfig:
    """The :class:`TrainConfig` the CLI builds from ``argv`` (preset plus overrides)."""
    a, _ = _parser().parse_known_args(argv)
    base = PRESETS[a.preset]()
    sets = dict(parse_set(base, item) for item in a.set)  # ValueError: one line in main
    warmup = None
    steps = a.steps if a.steps is not None else sets.get("steps")
    if isinstance(steps, int) and "warmup_steps" not in sets:
        # keep the warm-up inside a shortened run (an explicit --set warmup_steps= wins)
        warmup = min(base.warmup_steps, steps // 10)
    flags = dict(
        pool=a.pool,
        seed=a.seed,
        steps=a.steps,
        data=a.data,
        data_root=a.data_root,
        warmup_steps=warmup,
        patch_norm=False if a.no_patch_norm else None,
    )
    # the named flags (None: not given) win over --set, whose None values are applied as such
    return replace_fields(base, {**sets, **{k: v for k, v in flags.items() if v is not None}})


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
    # DataMissingError is a FileNotFoundError; TrainingDiverged a FloatingPointError
    except (CheckpointError, FileNotFoundError, ValueError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    keys = ("pool", "seed", "test_acc", "train_loss", "step_time_ms", "images_per_s")
    print(json.dumps({k: summary[k] for k in keys}))
    print(f"wrote {pathlib.Path(a.workdir) / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
