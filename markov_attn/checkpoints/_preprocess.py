"""The image preprocessing each checkpoint family expects (resize, crop, mean/std).

Defaults per family, used when the checkpoint directory has no ``preprocessor_config.json``
(HF) or ``pretrained_cfg`` in ``config.json`` (timm); those files override them, and
:func:`~markov_attn.checkpoints.load` warns (:class:`AssumedDefaultsWarning`) when it has to
fall back on these defaults:

============  ===========================================  ==================  =================
family        resize / crop                                mean                std
============  ===========================================  ==================  =================
hf_vit        resize to size x size (bilinear), no crop    0.5                 0.5
hf_dinov2     shortest edge 256/224·size (bicubic),        ImageNet            ImageNet
(+ _reg)      center crop size
hf_clip       shortest edge size (bicubic), center crop    CLIP                CLIP
timm          shortest edge floor(size / crop_pct)         ImageNet            ImageNet
              (bicubic, crop_pct 0.875), center crop
============  ===========================================  ==================  =================

ImageNet mean/std = (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225); CLIP mean/std =
(0.48145466, 0.4578275, 0.40821073) / (0.26862954, 0.26130258, 0.27577711). ``hf_vit`` follows
HF's ``ViTImageProcessor`` defaults (mean = std = 0.5, as Google's supervised ViTs ship);
DINO v1 in HF format ships a ``preprocessor_config.json`` with ImageNet mean/std, which is read
when present. ``hf_dinov2`` follows the ``preprocessor_config.json`` every official DINOv2
checkpoint ships (HF's ``BitImageProcessor`` class defaults, CLIP mean/std at shortest edge
224, are not what DINOv2 was trained with); ``hf_clip`` is ``CLIPImageProcessor``'s defaults;
``timm`` is timm's global defaults (many timm ViTs, e.g. the AugReg ones, use mean = std = 0.5
instead, stated in their ``pretrained_cfg``). Pixels are scaled to [0, 1] before normalising.
Resizing uses PIL, as the HuggingFace image processors and torchvision (on PIL images) do.
The defaults are the ``preprocessing`` of each family's record in the checkpoint registry.
"""

import math
import os

import numpy as np

from ._families import CONVERTERS
from ._pixels import CLIP_MEAN as CLIP_MEAN
from ._pixels import CLIP_STD as CLIP_STD
from ._pixels import HALF_MEAN as HALF_MEAN
from ._pixels import HALF_STD as HALF_STD
from ._pixels import IMAGENET_MEAN as IMAGENET_MEAN
from ._pixels import IMAGENET_STD as IMAGENET_STD
from ._pixels import Preprocessing


class AssumedDefaultsWarning(UserWarning):
    """A checkpoint lacks a file saying how it was trained, and defaults were assumed."""


# PIL resample codes as HF writes them in preprocessor_config.json
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def _defaults(family: str) -> Preprocessing:
    """The registered preprocessing defaults of ``family`` (``ValueError`` if unknown)."""
    conv = CONVERTERS.get(family) if isinstance(family, str) else None
    if conv is None:
        raise ValueError(
            f"unknown family {family!r}; pass one of {', '.join(map(repr, CONVERTERS))} "
            "or the CheckpointInfo returned by load()"
        )
    return conv.preprocessing


def _side(v) -> int | None:
    if v is None:
        return None
    if isinstance(v, dict):
        for k in ("shortest_edge", "height", "width"):
            if k in v:
                return int(v[k])
        return None
    if isinstance(v, list | tuple):
        return int(v[-1])
    return int(v)


def missing_preprocessing(family: str, config: dict | None, preprocessor: dict | None) -> str:
    """What is assumed for a checkpoint without its preprocessing file, in words, or ``""``."""
    d = _defaults(family)
    if d.source == "pretrained_cfg":
        pc = (config or {}).get("pretrained_cfg") or {}
        if "mean" in pc and "std" in pc:
            return ""
        what, fix = (
            "no pretrained_cfg mean/std in config.json",
            "put timm's pretrained_cfg (mean, std, crop_pct, interpolation) into config.json",
        )
    else:
        if preprocessor:
            return ""
        what, fix = (
            "no preprocessor_config.json next to the weights",
            "copy the model's preprocessor_config.json next to the weights",
        )
    crop = "resize to a square" if d.mode == "square" else "shortest-edge resize + centre crop"
    return (
        f"{what}: assuming the {family} defaults ({crop}, {d.resample}, "
        f"mean={tuple(d.mean)}, std={tuple(d.std)}); if the model was trained otherwise "
        f"its maps are computed on wrongly normalised pixels: {fix}"
    )


def recipe(family_or_info, /, *, size: int | None = None) -> dict:
    """The preprocessing recipe: ``mode`` (``"square"``: resize to the side; ``"short_crop"``:
    shortest edge to ``resize``, then a centre crop; ``"square_crop"``: ``resize`` x ``resize``,
    then a centre crop), ``resize`` (side), ``crop`` (side), ``center`` (``"round"``: the crop
    offset rounded as torchvision does, timm; ``"floor"``: HF), ``resample``, ``mean``,
    ``std``.

    Args:
      family_or_info: a family name or a :class:`CheckpointInfo` (whose preprocessor /
        timm ``pretrained_cfg`` override the family defaults).
      size: the output side in pixels (default: the checkpoint's ``image_size`` from its
        config, else 224).

    Examples:
      >>> r = recipe("hf_clip", size=224)
      >>> r["resize"], r["crop"], r["resample"]
      (224, 224, 'bicubic')
    """
    info = None if isinstance(family_or_info, str) else family_or_info
    family = family_or_info if info is None else info.family
    d = _defaults(family)
    r = dict(mode=d.mode, scale=d.scale, resample=d.resample, mean=d.mean, std=d.std)
    # timm's torchvision CenterCrop rounds the offset (half to even); HF processors floor it
    r["center"] = "round" if d.source == "pretrained_cfg" else "floor"
    native = None
    if info is not None:
        cfg = info.config.get("vision_config") or info.config
        native = _config_size(cfg.get("image_size"))
        pre = info.preprocessor
        if d.source == "pretrained_cfg":
            pc = info.config.get("pretrained_cfg") or {}
            img = (info.config.get("model_args") or {}).get("img_size")
            if img is not None:  # the size the model was built for, without pretrained_cfg
                native = int(img if np.isscalar(img) else img[-1])
            if "input_size" in pc:
                native = int(pc["input_size"][-1])
            if "crop_pct" in pc:
                r["scale"] = 1.0 / float(pc["crop_pct"])
            r["resample"] = pc.get("interpolation", r["resample"])
            r["mean"] = tuple(pc.get("mean", r["mean"]))
            r["std"] = tuple(pc.get("std", r["std"]))
        if pre:
            r["mean"] = tuple(pre.get("image_mean", r["mean"]))
            r["std"] = tuple(pre.get("image_std", r["std"]))
            if "resample" in pre:
                r["resample"] = _PIL_RESAMPLE.get(int(pre["resample"]), "bicubic")
            try:
                crop = _side(pre.get("crop_size")) if pre.get("do_center_crop", False) else None
                size_v = pre.get("size")
                short = _side(size_v)
            except (TypeError, ValueError) as e:
                raise ValueError(
                    f"preprocessor_config.json has a size or crop_size that is not a number of "
                    f"pixels ({e}): fix or delete it"
                ) from e
            for key, v in (("crop_size", crop), ("size", short)):
                if v is not None and v <= 0:
                    raise ValueError(
                        f"preprocessor_config.json sets {key} = {pre.get(key)!r}; it must be a "
                        "positive number of pixels: fix or delete it"
                    )
            # {"height", "width"} (and a bare int for ViT/DeiT processors) resize to exactly
            # that size; only {"shortest_edge"} (and a bare int for CLIP-like ones) keeps the
            # aspect ratio (a DeiT-style 256 -> crop 224 config was read as shortest edge)
            exact = (isinstance(size_v, dict) and "shortest_edge" not in size_v) or (
                isinstance(size_v, int | float) and family == "hf_vit"
            )
            if crop:
                native = crop
                if short:
                    r["mode"] = "square_crop" if exact else "short_crop"
                    r["scale"] = short / crop
            elif short:
                native = short
                r["mode"], r["scale"] = "square", 1.0
            if pre.get("do_normalize", True) is False:  # HF skips mean/std entirely
                r["mean"], r["std"] = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
            rescale = pre.get("rescale_factor", 1 / 255)
            if pre.get("do_rescale", True) is False or not math.isclose(rescale, 1 / 255):
                raise ValueError(
                    f"preprocessor_config.json sets do_rescale={pre.get('do_rescale', True)}, "
                    f"rescale_factor={rescale}; only pixels scaled by 1/255 are supported: "
                    "preprocess the images yourself and call the model on them"
                )
    _check_recipe(r, "preprocessor_config.json" if info is not None and info.preprocessor
                  else "the checkpoint's pretrained_cfg" if d.source == "pretrained_cfg"
                  else "the family defaults")  # fmt: skip
    out = int(size or native or 224)
    r["crop"] = out
    if r["mode"] == "square":
        r["resize"] = out
    else:  # the native ratio exactly (float rounding made 30 / 22 * 22 come out as 29)
        r["resize"] = math.floor(out * r["scale"] + 1e-9)
    return r


def _config_size(v) -> int | None:
    """``config.json``'s ``image_size``: an int or ``[h, w]`` (the last), positive, or None."""
    if v is None:
        return None
    if isinstance(v, list | tuple) and v:
        v = v[-1]
    if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0 or v != int(v):
        raise ValueError(
            f"config.json sets image_size = {v!r}; it must be a positive number of pixels (or "
            "[height, width]): fix it"
        )
    return int(v)


def _check_recipe(r: dict, where: str) -> None:
    """Mean and std of three finite numbers (std > 0) and a positive scale, or a ValueError
    naming where they came from (a zero std gave NaN pixels, a string a float error)."""
    for key in ("mean", "std"):
        try:
            v = np.asarray(r[key], np.float64)
        except (TypeError, ValueError):
            v = None
        if (
            v is None
            or v.shape != (3,)
            or not np.all(np.isfinite(v))
            or (key == "std" and not np.all(v > 0))
        ):
            rule = "three finite numbers" + (" above 0" if key == "std" else "")
            raise ValueError(
                f"{where} sets image_{key} = {r[key]!r}; it must be {rule} (one per RGB "
                "channel): fix or delete it"
            )
    if not (np.isfinite(float(r["scale"])) and float(r["scale"]) > 0):
        raise ValueError(f"{where} gives a resize scale of {r['scale']!r}; it must be positive")


def _to_uint8(a, scale: float) -> np.ndarray:
    """Pixel values divided by ``scale`` (257 maps 16-bit onto 8-bit), rounded, as uint8."""
    return np.clip(np.round(np.asarray(a, np.float64) / scale), 0, 255).astype(np.uint8)


def to_rgb(im):
    """A PIL image as 8-bit RGB. 16-bit greyscale (``I;16`` PNGs, PNGs in mode ``I`` as older
    Pillow opens them, or other mode-``I`` images with values in ``[0, 65535]`` beyond 255) is
    scaled to 8 bits (PIL's
    ``convert("RGB")`` clips it, which turned a mid-grey 16-bit image nearly white); mode ``I``
    with values in ``[0, 255]`` is taken as 8-bit; other 32-bit integer and float images have
    no known range and are refused."""
    from PIL import Image

    def grey(a, scale):
        return Image.fromarray(_to_uint8(a, scale), "L").convert("RGB")

    if im.mode.startswith("I;16"):
        return grey(im, 257.0)
    if im.mode == "I":
        lo, hi = im.getextrema()
        if 0 <= lo and hi <= 65535:
            # a PNG in mode I is 16-bit (8-bit grey opens as L); elsewhere judge by the range
            return grey(im, 257.0 if im.format == "PNG" or hi > 255 else 1.0)
    if im.mode in ("I", "F"):
        raise ValueError(
            f"image mode {im.mode!r} (32-bit integer or float pixels) has no known range; "
            "save it as an 8-bit (or 16-bit) image first"
        )
    return im.convert("RGB")


def _to_pil(img):
    from PIL import Image

    if isinstance(img, str | os.PathLike):
        with Image.open(img) as im:
            return to_rgb(im)
    if isinstance(img, Image.Image):
        return to_rgb(img)
    a = np.asarray(img)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise ValueError(f"images must be (H, W, C) with C in 1/3/4, got shape {a.shape}")
    if a.dtype == np.uint16:  # 16-bit pixels: scaled, not clipped to white
        a = _to_uint8(a, 257.0)
    elif np.issubdtype(a.dtype, np.integer) and a.dtype != np.uint8 and a.size and a.max() > 255:
        raise ValueError(
            f"integer images must hold 8-bit (or uint16) values, got {a.dtype} up to {a.max()}"
        )
    if a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.floating) and a.min() >= 0 and a.max() <= 1:
            a = np.round(a * 255)
        a = np.clip(a, 0, 255).astype(np.uint8)
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    return Image.fromarray(a[..., :3])


def preprocess(images, family_or_info, /, *, size: int | None = None) -> np.ndarray:
    """Turns images into the normalised NHWC float32 batch a checkpoint family expects.

    Args:
      images: one image or a list of them: file paths, PIL images, or ``(H, W, C)`` arrays
        (uint8, or floats in [0, 1]); also a stacked ``(N, H, W, C)`` array.
      family_or_info: a family name (``"hf_vit"``, ``"hf_dinov2"``, ``"hf_dinov2_reg"``,
        ``"hf_clip"``, ``"timm"``) or the :class:`CheckpointInfo` from :func:`load`, whose
        preprocessing files take precedence over the family defaults (table in the module
        docstring).
      size: output side in pixels (default: the checkpoint's native input size, else 224).

    Returns:
      ``(N, size, size, 3)`` float32 array, ``(x / 255 - mean) / std``.

    Examples:
      >>> x = preprocess(np.full((40, 30, 3), 255, np.uint8), "hf_clip", size=16)
      >>> x.shape, x.dtype
      ((1, 16, 16, 3), dtype('float32'))
    """
    from PIL import Image

    r = recipe(family_or_info, size=size)
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    elif not isinstance(images, list | tuple):
        images = [images]
    resample = getattr(Image.Resampling, r["resample"].upper())
    out = []
    for img in images:
        im = _to_pil(img)
        w, h = im.size
        if r["mode"] == "square":
            im = im.resize((r["resize"], r["resize"]), resample=resample)
        else:
            short = r["resize"]
            if r["mode"] == "square_crop":
                nw = nh = short
            elif w <= h:
                nw, nh = short, int(short * h / w)
            else:
                nw, nh = int(short * w / h), short
            im = im.resize((nw, nh), resample=resample)
            c = r["crop"]
            if r["center"] == "round":  # torchvision: int(round((nh - c) / 2)), half to even
                top, left = round((nh - c) / 2.0), round((nw - c) / 2.0)
            else:  # HF image processors: floor
                top, left = (nh - c) // 2, (nw - c) // 2
            im = im.crop((left, top, left + c, top + c))
        a = np.asarray(im, np.float32) / np.float32(255.0)
        mean = np.asarray(r["mean"], np.float32)
        std = np.asarray(r["std"], np.float32)
        out.append((a - mean) / std)
    return np.stack(out).astype(np.float32)
