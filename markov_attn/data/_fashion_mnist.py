"""Fashion-MNIST from the standard IDX files (the Debian package or any directory).

The Debian package ``dataset-fashion-mnist`` puts the four files under
``/usr/share/datasets/fashion-mnist/``::

    train-images-idx3-ubyte.gz  train-labels-idx1-ubyte.gz
    t10k-images-idx3-ubyte.gz   t10k-labels-idx1-ubyte.gz

Any directory holding these files, gzipped or not (``train-images.idx3-ubyte`` spellings are
accepted too), works through ``root=`` or the ``MARKOV_ATTN_FASHION_MNIST`` environment variable.
"""

import functools
import gzip
import os
import zlib
from pathlib import Path

import numpy as np
from jaxtyping import Int64, UInt8

__all__ = ["CLASSES", "DEFAULT_ROOT", "ENV_VAR", "DataMissingError", "load_fashion_mnist"]

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
"""Where the Debian package ``dataset-fashion-mnist`` installs the IDX files."""

ENV_VAR = "MARKOV_ATTN_FASHION_MNIST"
"""Environment variable naming a directory with the IDX files (overrides the default)."""

CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
"""The official Fashion-MNIST label names, indexed by label."""

_PREFIX = {"train": "train", "test": "t10k"}


class DataMissingError(FileNotFoundError):
    """A data set the code needs is not on disk; the message says how to install it."""


def _candidates(root: Path, prefix: str, kind: str) -> list[Path]:
    dims = "idx3" if kind == "images" else "idx1"
    names = [f"{prefix}-{kind}-{dims}-ubyte", f"{prefix}-{kind}.{dims}-ubyte"]
    return [root / (n + ext) for n in names for ext in (".gz", "")]


def _find(root: Path, prefix: str, kind: str) -> Path:
    for path in _candidates(root, prefix, kind):
        if path.is_file():
            return path
    raise DataMissingError(
        f"Fashion-MNIST file {prefix}-{kind}-{'idx3' if kind == 'images' else 'idx1'}-ubyte[.gz] "
        f"not found in {root}. Install it with `sudo apt-get install dataset-fashion-mnist` "
        f"(files go to {DEFAULT_ROOT}), or pass root= / set ${ENV_VAR} to a directory holding "
        "the standard IDX files."
    )


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Reads one IDX file of unsigned bytes with ``ndim`` dimensions; ValueError if corrupt."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise ValueError(
            f"corrupt IDX file {path}: cannot decompress ({e}); delete it and reinstall "
            "`dataset-fashion-mnist` or download the file again"
        ) from e
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"corrupt IDX file {path}: {len(raw)} bytes, shorter than its header")
    zero, dtype_code, got_ndim = raw[0:2], raw[2], raw[3]
    if zero != b"\x00\x00" or dtype_code != 0x08 or got_ndim != ndim:
        raise ValueError(
            f"corrupt IDX file {path}: bad magic number {raw[:4].hex()} (expected "
            f"0000080{ndim}, unsigned bytes with {ndim} dimensions)"
        )
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise ValueError(
            f"corrupt IDX file {path}: header says shape {shape} ({expected} bytes of data) "
            f"but the file holds {len(raw) - header}; the file is truncated or damaged"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape).copy()


@functools.cache
def _load_cached(split: str, root: str) -> tuple[np.ndarray, np.ndarray]:
    base = Path(root)
    prefix = _PREFIX[split]
    images = _read_idx(_find(base, prefix, "images"), 3)
    labels = _read_idx(_find(base, prefix, "labels"), 1).astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"Fashion-MNIST {split} files in {base} disagree: {images.shape[0]} images but "
            f"{labels.shape[0]} labels; reinstall `dataset-fashion-mnist`"
        )
    if labels.size and labels.max() >= len(CLASSES):
        raise ValueError(
            f"Fashion-MNIST {split} labels in {base} go up to {labels.max()}, expected 0..9; "
            "the labels file is damaged"
        )
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def load_fashion_mnist(
    split: str = "train", /, *, root: str | os.PathLike | None = None
) -> tuple[UInt8[np.ndarray, "n 28 28"], Int64[np.ndarray, " n"]]:
    """Loads a Fashion-MNIST split from the standard IDX files.

    The result is cached per process (per split and directory) and returned read-only; copy it
    before writing into it.

    Args:
      split: ``"train"`` (60,000 images) or ``"test"`` (10,000 images).
      root: directory holding the IDX files, gzipped or not. ``None`` reads
        ``$MARKOV_ATTN_FASHION_MNIST`` if set, else ``/usr/share/datasets/fashion-mnist`` (the
        Debian package ``dataset-fashion-mnist``).

    Returns:
      ``(images, labels)``: ``images`` uint8 of shape ``(n, 28, 28)`` (row, column; 0 is
      background), ``labels`` int64 of shape ``(n,)`` in ``0..9`` (see :data:`CLASSES`).

    Raises:
      DataMissingError: the files are not there (a ``FileNotFoundError``; the message says to
        ``sudo apt-get install dataset-fashion-mnist`` or to pass ``root=``).
      ValueError: a file is corrupt (bad magic number, truncated, undecompressable); the
        message names the file.
    """
    if split not in _PREFIX:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if root is None:
        root = os.environ.get(ENV_VAR) or DEFAULT_ROOT
    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
        raise DataMissingError(
            f"Fashion-MNIST directory {root} does not exist. Install the data with "
            f"`sudo apt-get install dataset-fashion-mnist` (files go to {DEFAULT_ROOT}), or "
            f"pass root= / set ${ENV_VAR} to a directory holding the standard IDX files."
        )
    return _load_cached(split, root)
