"""load(): a PyTorch ViT checkpoint on disk -> markov_attn.nn.ViT with its weights."""

import dataclasses
import os
import pathlib
import warnings

import jax.numpy as jnp
import numpy as np

from . import _families
from ._io import find_json, read_state_dict
from ._preprocess import AssumedDefaultsWarning, missing_preprocessing


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """What :func:`load` found.

    Attributes:
      family: ``"hf_vit"``, ``"hf_dinov2"``, ``"hf_dinov2_reg"``, ``"hf_clip"`` or ``"timm"``.
      path: the weight file read.
      config: the parsed ``config.json`` (``{}`` when there was none).
      preprocessor: the parsed ``preprocessor_config.json`` (HF) or ``{}``.
      ignored: checkpoint keys deliberately not loaded (poolers, text towers, mask tokens...).
      notes: assumptions made, in words (defaults used for a missing config, folded tensors).
      num_prefix: tokens before the patches (CLS + registers).
    """

    family: str
    path: pathlib.Path
    config: dict
    preprocessor: dict
    ignored: tuple[str, ...]
    notes: tuple[str, ...]
    num_prefix: int


def detect_family(path: str | os.PathLike, /) -> str:
    """The family of the checkpoint at ``path``, from its parameter names.

    Raises:
      ValueError: the names match no supported family (the message lists what was found and
        what is supported), or the file cannot be read.
    """
    sd, _ = read_state_dict(path)
    return _families.detect(sd)


def _build(kwargs: dict, params: dict, image_size: int | None):
    from flax import nnx

    from markov_attn.nn import ViT, ViTConfig

    if image_size is not None and image_size != kwargs["image_size"]:
        p = kwargs["patch_size"]
        if image_size % p:
            raise ValueError(
                f"image_size={image_size} is not a multiple of the patch size {p}; pick a multiple"
            )
        # the checkpoint's grid stays: every input size is resized from it (PyTorch's rule);
        # resampling it here made a call at a third size resize an already resized grid
        kwargs["pos_size"] = kwargs["image_size"]
        kwargs["image_size"] = image_size
    cfg = ViTConfig(**kwargs)
    abstract = nnx.eval_shape(lambda: ViT(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))
    filled = {}
    for path, var in flat.items():
        name = ".".join(str(k) for k in path)
        if name not in params:
            raise ValueError(
                f"the checkpoint provides no value for the model parameter {name!r}; this is a "
                "loader bug or an unsupported variant"
            )
        value = np.asarray(params.pop(name))
        want = tuple(var.get_value().shape)
        if value.shape != want:
            raise ValueError(
                f"{name}: checkpoint shape {value.shape} does not match the model's {want}"
            )
        filled[path] = var.replace(jnp.asarray(value, dtype=jnp.float32))
    if params:
        raise ValueError(f"mapped parameters {sorted(params)} have no place in the model")
    state = nnx.from_flat_state(filled)
    return nnx.merge(graphdef, state), cfg


def load(
    path: str | os.PathLike,
    /,
    *,
    image_size: int | None = None,
    num_heads: int | None = None,
    family: str | None = None,
    pos_interp: str | None = None,
):
    """Loads a PyTorch ViT checkpoint from disk into a :class:`markov_attn.nn.ViT`.

    The family is detected from the parameter names (see :data:`FAMILIES`): HuggingFace
    ``ViTModel`` / ``ViTForImageClassification`` (also DINO v1 in that format), ``Dinov2Model``,
    ``Dinov2WithRegistersModel``, ``CLIPVisionModel`` / the vision tower of ``CLIPModel``, and
    timm ``VisionTransformer`` state dicts. ``config.json`` next to the weights, when present,
    supplies the LayerNorm eps, the activation (exact GELU, tanh GELU, quick-GELU) and the
    number of heads; layer sizes, patch size, image size and registers are read from the
    tensor shapes and checked against it. Every tensor of the checkpoint is either loaded or
    listed in ``info.ignored``; anything else is an error.

    Defaults assumed for missing files (preprocessing without ``preprocessor_config.json``,
    LayerNorm eps or heads without ``config.json``) are listed in ``info.notes`` and each raises
    an :class:`AssumedDefaultsWarning` naming the file to add.

    The model then reproduces the PyTorch forward pass (hidden states to ~1e-6, attention to
    ~1e-7 in float32) at the native resolution and, with the family's position-embedding
    interpolation (``cfg.pos_interp``), at other resolutions.

    Args:
      path: checkpoint directory (``model.safetensors`` or ``pytorch_model.bin`` plus
        ``config.json``), or a weight file (``.safetensors``; ``.pth``/``.pt``/``.bin`` need
        torch, imported only then).
      image_size: the model's default input side (pixels, a multiple of the patch size:
        ``cfg.image_size``). The position embeddings keep the checkpoint's grid
        (``cfg.pos_size``) and are resized from it at call time, with the family's rule, for
        any input size, as PyTorch does. Default: the checkpoint's native size.
      num_heads: number of attention heads, needed only when there is no config saying it and
        the width is not a multiple of 64.
      family: skip detection and use this family (one of :data:`FAMILIES`).
      pos_interp: override the family's position-embedding resize rule
        (:data:`markov_attn.nn.POS_INTERPS`). The loader tells the original DINOv2 code's
        checkpoints from timm's by their ``mask_token`` (``"bicubic_offset"``), but the
        original DINO v1 code's have timm's names: pass ``"bicubic_offset"`` for those.

    Returns:
      ``(model, cfg, info)``: the :class:`markov_attn.nn.ViT`, its
      :class:`markov_attn.nn.ViTConfig` and a :class:`CheckpointInfo`.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: unreadable or corrupt file, unknown family, or tensors that do not fit (the
        message says what was found and what is supported).
    """
    sd, weights = read_state_dict(path)
    convert = _families.converter(family or _families.detect(sd))
    fam = convert.family
    config = find_json(weights, "config.json")
    preproc = find_json(weights, "preprocessor_config.json") or {}
    sd = {k: np.asarray(v) for k, v in sd.items()}
    out = convert(sd, config, num_heads=num_heads)
    if out.leftover:
        raise ValueError(
            f"{len(out.leftover)} tensors of this {fam} checkpoint are not understood: "
            f"{sorted(out.leftover)[:10]}; it is probably a variant that is not supported "
            f"(supported: {', '.join(_families.CONVERTERS)})"
        )
    params = {k: np.asarray(v, np.float32) for k, v in out.params.items()}
    kwargs = dict(out.vit_kwargs)
    if pos_interp is not None:
        kwargs["pos_interp"] = pos_interp  # ViTConfig checks it
    model, cfg = _build(kwargs, params, image_size)
    assumed = missing_preprocessing(fam, config, preproc)
    notes = [*out.notes, assumed] if assumed else list(out.notes)
    for note in notes:
        if "assum" in note:
            warnings.warn(f"{weights}: {note}", AssumedDefaultsWarning, stacklevel=2)
    info = CheckpointInfo(
        family=fam,
        path=weights,
        config=dict(config or {}),
        preprocessor=dict(preproc),
        ignored=tuple(sorted(out.ignored)),
        notes=tuple(notes),
        num_prefix=cfg.num_prefix,
    )
    return model, cfg, info
