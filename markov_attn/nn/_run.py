"""Trained ViTs on disk: a training run's checkpoints or a weights file, and their configuration.

Two formats, both written by this project's training script (``experiments/train.py``):

- a **run directory** ``<run>/checkpoints/<step>/`` (Orbax): the parameters, batch-norm
  statistics (models with a convolutional stem only) and optimiser state, plus a JSON ``meta``
  whose ``"config"`` entry is the run's configuration as :func:`config_to_dict` writes it;
- a **weights file** ``.npz`` (:func:`write_weights`): one array per parameter
  (``"param:blocks/0/attn/qkv/kernel"``) and batch statistic (``"stat:..."``), and the
  configuration as UTF-8 JSON bytes under ``"config.json"``; no optimiser state, about a third
  of a checkpoint. The committed reference model ``experiments/reference/vit_reference.npz``
  is one.

In both, the configuration is a dict whose ``"model"`` entry holds the :class:`ViTConfig`
fields; the other entries (seed, data, optimiser...) belong to the training script and are
returned as they are stored.
"""

import dataclasses
import json
import os
import pathlib
import zipfile
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ._checkpoint import Checkpointer, CheckpointError
from ._config import ViTConfig
from ._vit import ViT

_DTYPE_FIELDS = ("dtype", "param_dtype")


def config_to_dict(config, /) -> dict:
    """A configuration dataclass (nested ones included) as JSON stores it.

    Dtype fields (``dtype``, ``param_dtype``) become their names, tuples become lists; the
    inverse is :func:`config_from_dict`.

    Examples:
      >>> from markov_attn.nn import ViTConfig, config_from_dict, config_to_dict
      >>> d = config_to_dict(ViTConfig(conv_stem=(8,)))
      >>> d["param_dtype"], d["conv_stem"]
      ('float32', [8])
      >>> config_from_dict(ViTConfig, d) == ViTConfig(conv_stem=(8,))
      True
    """
    return json.loads(json.dumps(_named_dtypes(dataclasses.asdict(config))))


def _named_dtypes(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            v = _named_dtypes(v)
        elif k in _DTYPE_FIELDS and v is not None:
            v = jnp.dtype(v).name
        out[k] = v
    return out


def config_from_dict(cls, d: dict, /):
    """``cls(**d)`` for a configuration dataclass ``cls``, the inverse of :func:`config_to_dict`.

    Fields whose declared type is a dataclass are built from their nested dicts, dtype names
    become dtypes; the dataclass checks its own values (``ViTConfig`` turns lists back into
    tuples).

    Raises:
      TypeError: ``d`` has a key that is no field of ``cls``, or lacks a required one.
      ValueError: a value the dataclass refuses.
    """
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in d.items():
        t = types.get(k)
        if isinstance(t, type) and dataclasses.is_dataclass(t) and isinstance(v, dict):
            v = config_from_dict(t, v)
        elif k in _DTYPE_FIELDS and v is not None:
            v = jnp.dtype(v)
        kwargs[k] = v
    return cls(**kwargs)


def _vit_config(config: dict, where: str) -> ViTConfig:
    try:
        return config_from_dict(ViTConfig, config["model"])
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{where} holds no usable config ({e})") from e


def _abstract(cfg: ViTConfig):
    """``(graphdef, params, batch_stats, rest)`` of an abstract ViT (no memory spent)."""
    return nnx.split(
        nnx.eval_shape(lambda: ViT(cfg, rngs=nnx.Rngs(0))), nnx.Param, nnx.BatchStat, ...
    )


def _array_name(tag: str, keys) -> str:
    """The ``.npz`` key of one state leaf: ``"param:blocks/0/attn/qkv/kernel"``."""
    return f"{tag}:" + "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in keys)


_KINDS = ((nnx.Param, "param"), (nnx.BatchStat, "stat"))


def write_weights(model: ViT, config, path: str | os.PathLike, /) -> pathlib.Path:
    """Writes ``model``'s parameters and batch statistics and its run ``config`` to one ``.npz``.

    Args:
      model: a :class:`ViT`.
      config: the run's configuration, a dict or a dataclass (:func:`config_to_dict`), whose
        ``"model"`` entry is ``model.cfg``; :func:`load_run` reads it back.
      path: the file to write (parent directories are created).

    Returns:
      ``path`` as a ``pathlib.Path``.
    """
    if not isinstance(config, dict):
        config = config_to_dict(config)
    flat = {}
    for kind, tag in _KINDS:
        pure = nnx.to_pure_dict(nnx.state(model, kind))
        for keys, leaf in jax.tree_util.tree_flatten_with_path(pure)[0]:
            a = np.asarray(leaf)
            if a.dtype.kind not in "biuf":
                # .npz has no bfloat16 (it was stored as raw bytes that did not load back):
                # float32 holds bf16 exactly, and the loader casts back to the model's dtype
                a = np.asarray(leaf, np.float32)
            flat[_array_name(tag, keys)] = a
    flat["config.json"] = np.frombuffer(json.dumps(config).encode(), np.uint8)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        np.savez_compressed(f, **flat)
    return path


def _load_weights_file(path: pathlib.Path):
    not_weights = (
        f"{path} is not a weights file written by markov_attn.nn.write_weights (a .npz of "
        "named arrays and a config); re-export it with write_weights, or pass the run directory"
    )
    broken = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error)
    with path.open("rb") as f:  # our own handle: np.load leaks its own when the zip is bad
        if f.read(4) not in (b"PK\x03\x04", b"PK\x05\x06"):  # .npz is a zip archive
            raise CheckpointError(f"{not_weights} (it is not a .npz archive)")
        f.seek(0)
        try:
            arrays = dict(np.load(f, allow_pickle=False))
        except broken as e:
            raise CheckpointError(f"{not_weights} ({type(e).__name__}: {e})") from e
    try:
        config = json.loads(arrays.pop("config.json").tobytes().decode())
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path} holds no usable config ({e}); re-export it") from e
    graphdef, *states = _abstract(_vit_config(config, f"{path}"))
    for state, (_, tag) in zip(states, _KINDS):
        pure = nnx.to_pure_dict(state)
        leaves, treedef = jax.tree_util.tree_flatten_with_path(pure)
        new = []
        for keys, leaf in leaves:
            name = _array_name(tag, keys)
            if name not in arrays or arrays[name].shape != leaf.shape:
                raise CheckpointError(
                    f"{path} has no array {name!r} of shape {leaf.shape}; it was written for "
                    "another model"
                )
            new.append(jnp.asarray(arrays[name], leaf.dtype))
        nnx.replace_by_pure_dict(state, jax.tree_util.tree_unflatten(treedef, new))
    return nnx.merge(graphdef, *states), config


def _load_checkpoint(workdir: pathlib.Path, step: int | None):
    directory = workdir / "checkpoints"
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoint under {directory}; train first")
    ckpt = Checkpointer(directory)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {directory}; train first")
        config = ckpt.read_meta(step=step).get("config")
        where = f"checkpoint {directory / str(step)}"
        if not isinstance(config, dict):
            raise CheckpointError(f"{where} holds no usable config; delete it or retrain")
        graphdef, params, stats, rest = _abstract(_vit_config(config, where))
        wanted = {"params": params}
        if jax.tree.leaves(stats):  # stored only for models with batch norms
            wanted["batch_stats"] = stats
        state, _ = ckpt.restore(wanted, step=step, partial=True)
    finally:
        ckpt.close()
    return nnx.merge(graphdef, state["params"], state.get("batch_stats", stats), rest), config


def load_run(path: str | os.PathLike, /, *, step: int | None = None) -> tuple[ViT, dict]:
    """A trained :class:`ViT` from a training run directory or a weights file.

    Args:
      path: a run directory (``<run>/checkpoints/<step>/``, Orbax) or a weights file
        (``.npz``, :func:`write_weights`); the formats are described in this module's docstring.
        Only the weights are read, never the optimiser state.
      step: which checkpoint of a run directory (default: the latest); not for a weights file.

    Returns:
      ``(model, config)``: the model (its :class:`ViTConfig` is ``model.cfg``) and the run's
      configuration as stored, a dict (``config["model"]`` holds the ViT's fields); build the
      training script's own config type from it with :func:`config_from_dict`.

    Raises:
      FileNotFoundError: ``path`` does not exist, or a run directory has no checkpoint.
      CheckpointError: the checkpoint or file cannot be read, holds no usable configuration, or
        does not hold the arrays its configuration needs.
    """
    path = pathlib.Path(path)
    if path.is_file():
        if step is not None:
            raise ValueError(f"step= is for run directories; {path} is a weights file")
        return _load_weights_file(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    return _load_checkpoint(path, step)
