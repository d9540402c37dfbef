"""Reader for the ImageNet-Segmentation file ``gtsegs_ijcv.mat`` (Guillaumin et al., IJCV 2014).

The file is a MATLAB v7.3 ``.mat``, i.e. HDF5, holding 4,276 ImageNet validation images with
binary object masks; the attention-explainability literature (Chefer et al. 2021 and the
works that reuse their ``imagenet_seg`` loader, including the attention-chains paper) evaluates
on it. Layout (as MATLAB writes a struct ``value`` with cell arrays ``img`` and ``gt``):

- ``/value/img``: an ``(N, 1)`` dataset of HDF5 object references, one per image. Each one
  points to a ``uint8`` dataset of shape ``(C, W, H)``: MATLAB's column-major ``(H, W, C)``
  array read in HDF5's row-major order, i.e. with all axes reversed. ``transpose(2, 1, 0)``
  gives the usual ``(H, W, C)``. A grayscale image may be stored as ``(W, H)``.
- ``/value/gt``: an ``(N, 1)`` dataset of references, each pointing to a ``(1, 1)`` dataset of
  references (a MATLAB cell), whose ``[0, 0]`` element points to the ``uint8`` mask of shape
  ``(W, H)``; ``transpose(1, 0)`` gives ``(H, W)``. Non-zero = object.

Images have their original (varying) sizes; :meth:`ImageNetSeg.batch` resizes them (bilinear
for images, nearest for masks, as the reference transforms do) to a fixed size.
"""

import os

import numpy as np

__all__ = ["ImageNetSeg", "load_imagenet_seg"]


def _h5py():
    try:
        import h5py
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "reading gtsegs_ijcv.mat needs h5py: pip install 'markov_attn[checkpoints]' "
            "(or pip install h5py)"
        ) from e
    return h5py


def _image_from(arr: np.ndarray) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim == 2:  # grayscale, stored (W, H)
        return np.repeat(arr.T[:, :, None], 3, axis=2)
    if arr.ndim != 3:
        raise ValueError(f"expected an image stored as (C, W, H), got shape {arr.shape}")
    img = arr.transpose(2, 1, 0)
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    return img[:, :, :3]


class ImageNetSeg:
    """Random access to ``gtsegs_ijcv.mat``: ``ds[i] -> (image uint8 (H, W, 3), mask bool (H, W))``.

    The file stays open (read only) until :meth:`close` or the end of a ``with`` block.

    Args:
        path: path to ``gtsegs_ijcv.mat`` (MATLAB v7.3 / HDF5).

    Raises:
        FileNotFoundError: the file does not exist (it is not on PyPI or Debian; get it from
            the ImageNet-Segmentation authors or Chefer et al.'s instructions).
        ValueError: the file lacks ``/value/img`` or ``/value/gt``.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise FileNotFoundError(
                f"{self.path} not found; ImageNet-Segmentation (gtsegs_ijcv.mat) is not "
                "available from a package registry: download it yourself and pass its path"
            )
        h5py = _h5py()
        self._file = h5py.File(self.path, "r")
        for key in ("value/img", "value/gt"):
            if key not in self._file:
                self._file.close()
                raise ValueError(
                    f"{self.path} has no /{key}; expected the MATLAB v7.3 layout of "
                    "gtsegs_ijcv.mat (struct 'value' with cells 'img' and 'gt')"
                )
        self._img = self._file["value/img"]
        self._gt = self._file["value/gt"]
        if self._img.shape[0] != self._gt.shape[0]:
            raise ValueError(
                f"{self.path}: {self._img.shape[0]} images but {self._gt.shape[0]} masks"
            )

    def __len__(self) -> int:
        return int(self._img.shape[0])

    def image(self, index: int, /) -> np.ndarray:
        """The ``index``-th image, ``uint8 (H, W, 3)``."""
        return _image_from(self._file[self._img[self._index(index), 0]][()])

    def mask(self, index: int, /) -> np.ndarray:
        """The ``index``-th mask, ``bool (H, W)``, ``True`` = object."""
        cell = self._file[self._gt[self._index(index), 0]]
        return np.asarray(self._file[cell[0, 0]][()]).T > 0

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self.image(index), self.mask(index)

    def _index(self, index: int) -> int:
        n = len(self)
        i = int(index)
        if not -n <= i < n:
            raise IndexError(f"index {index} out of range for {n} images")
        return i % n

    def batch(self, indices, /, *, size: tuple[int, int] = (224, 224)) -> dict[str, np.ndarray]:
        """Images and masks resized to ``size``: ``{"images": float32 (n, H, W, 3) in [0, 1],
        "masks": bool (n, H, W)}`` (bilinear for images, nearest for masks)."""
        from PIL import Image

        h, w = size
        images, masks = [], []
        for i in indices:
            img, m = self[i]
            images.append(np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR)))
            mi = Image.fromarray(m.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)
            masks.append(np.asarray(mi) > 127)
        return {
            "images": np.stack(images).astype(np.float32) / 255.0,
            "masks": np.stack(masks),
        }

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load_imagenet_seg(
    path: str | os.PathLike, /, *, indices=None, size: tuple[int, int] = (224, 224)
) -> dict[str, np.ndarray]:
    """Loads (a subset of) ``gtsegs_ijcv.mat`` resized to ``size``.

    Args:
        path: the ``.mat`` file.
        indices: which images (default all 4,276; about 2.6 GB as float32 at 224², so
            prefer :class:`ImageNetSeg` and :meth:`ImageNetSeg.batch` for the full set).
        size: ``(H, W)`` output size.

    Returns:
        ``{"images": float32 (n, H, W, 3), "masks": bool (n, H, W)}``.
    """
    with ImageNetSeg(path) as ds:
        idx = range(len(ds)) if indices is None else indices
        return ds.batch(idx, size=size)
