"""Reading state dicts and configs from checkpoint files and directories."""

import json
import os
import pathlib

import numpy as np

#: file names looked for, in order, inside a checkpoint directory
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")

# Wrappers some training codes put around a state dict (DINO "teacher", Lightning "state_dict").
_NESTED = ("state_dict", "model", "teacher", "model_ema", "module")
# Prefixes of wrapped models (DataParallel, DINO backbones).
_STRIP = ("module.", "backbone.", "_orig_mod.")


def find_weights(path: str | os.PathLike) -> pathlib.Path:
    """The weight file for ``path`` (a file, or a directory holding one)."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {str(path)!r} does not exist")
    if path.is_file():
        return path
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
    found = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if len(found) == 1:
        return found[0]
    listing = sorted(p.name for p in path.iterdir())[:20]
    if found:
        raise ValueError(
            f"{str(path)!r} holds several weight files {[p.name for p in found]}; pass the "
            "file itself to load()"
        )
    raise ValueError(
        f"no weights found in {str(path)!r} (it holds {listing}); expected one of "
        f"{list(WEIGHT_FILES)} or a single *{'/*'.join(WEIGHT_SUFFIXES)} file"
    )


def find_json(weights: pathlib.Path, name: str) -> dict | None:
    """``name`` (e.g. ``config.json``) next to the weights, parsed, or ``None``."""
    f = weights.parent / name
    if not f.is_file():
        return None
    try:
        out = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{str(f)!r} is not valid JSON ({e}); fix or delete it") from e
    if not isinstance(out, dict):
        raise ValueError(
            f"{str(f)!r} holds a JSON {type(out).__name__}, not an object of settings; fix or "
            "delete it"
        )
    return out


def _read_safetensors(f: pathlib.Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(f))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(
            f"{str(f)!r} is not a readable safetensors file ({e}); re-download or re-save it"
        ) from e
    except TypeError as e:  # bf16 tensors: numpy has no bfloat16, go through torch or ml_dtypes
        return _read_safetensors_bf16(f, e)


def _read_safetensors_bf16(f: pathlib.Path, err: Exception) -> dict[str, np.ndarray]:
    import ml_dtypes  # installed with jax
    from safetensors import safe_open

    out = {}
    try:
        with safe_open(str(f), "numpy") as fh:
            for k in fh.keys():
                out[k] = fh.get_tensor(k)
    except TypeError:
        raw = f.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + n])
        base = 8 + n
        dtypes = {
            "BF16": ml_dtypes.bfloat16,
            "F16": np.float16,
            "F32": np.float32,
            "F64": np.float64,
            "I64": np.int64,
            "I32": np.int32,
        }
        for k, meta in header.items():
            if k == "__metadata__":
                continue
            if meta["dtype"] not in dtypes:
                raise ValueError(f"unsupported dtype {meta['dtype']} in {str(f)!r}") from err
            a, b = meta["data_offsets"]
            arr = np.frombuffer(raw[base + a : base + b], dtype=dtypes[meta["dtype"]])
            out[k] = arr.reshape(meta["shape"])
    return out


def _read_torch(f: pathlib.Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ValueError(
            f"{str(f)!r} is a PyTorch pickle; reading it needs torch (pip install torch), or "
            "convert it to safetensors once with safetensors.torch.save_file"
        ) from e
    try:
        obj = torch.load(str(f), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{str(f)!r} could not be read by torch.load ({e})") from e
    while isinstance(obj, dict) and not any(hasattr(v, "shape") for v in obj.values()):
        keys = [k for k in _NESTED if k in obj]
        if not keys:
            break
        obj = obj[keys[0]]
    if not isinstance(obj, dict):
        raise ValueError(f"{str(f)!r} does not hold a state dict (found {type(obj).__name__})")
    return {
        k: v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy()
        for k, v in obj.items()
        if hasattr(v, "detach")
    }


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], pathlib.Path]:
    """Reads the tensors of a checkpoint -> ``({name: array}, weight file)``.

    Args:
      path: a checkpoint directory or file: ``*.safetensors`` (also sharded, through its
        ``*.index.json``), or ``*.pth`` / ``*.pt`` / ``*.bin`` (needs torch, imported lazily).

    Returns:
      The state dict with wrapper prefixes (``module.``, ``backbone.``) removed, and the file.
    """
    f = find_weights(path)
    if f.name.endswith(".index.json"):
        index = find_json(f, f.name) or {}
        shards = sorted(set(index.get("weight_map", {}).values()))
        if not shards:
            raise ValueError(f"{str(f)!r} has no weight_map; re-save the checkpoint")
        sd = {}
        for shard in shards:
            sd.update(_read_one(f.parent / shard))
    else:
        sd = _read_one(f)
    if not sd:
        raise ValueError(f"{str(f)!r} holds no tensors")
    for prefix in _STRIP:
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd, f


def _read_one(f: pathlib.Path) -> dict[str, np.ndarray]:
    if not f.is_file():
        raise FileNotFoundError(f"weight file {str(f)!r} is missing")
    if f.suffix == ".safetensors":
        return _read_safetensors(f)
    if f.suffix in (".pth", ".pt", ".bin"):
        return _read_torch(f)
    raise ValueError(f"{str(f)!r} has an unsupported extension; supported: {list(WEIGHT_SUFFIXES)}")
