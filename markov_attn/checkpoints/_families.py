"""Per-family parameter mappings: PyTorch state dicts -> markov_attn.nn.ViT parameters.

Each supported family has one :class:`Converter` in :data:`CONVERTERS`. A converter takes the
state dict (numpy arrays, PyTorch layouts), the parsed ``config.json`` (or ``None``) and an
optional head count, and returns a :class:`Converted`: the ViTConfig keyword arguments, the
ViT parameters in Flax layout, the keys it did not consume, the keys it ignored on purpose and
notes. Leftover keys make :func:`markov_attn.checkpoints.load` fail: nothing is dropped
silently. The record also holds the family's :class:`Signature` (the parameter names that
:func:`detect` recognises it by) and its :class:`~._pixels.Preprocessing` defaults (read by
:mod:`._preprocess`), so that the registry is the one place that describes a family.
"""

import dataclasses
import functools
import math
import re
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from ._pixels import (
    CLIP_MEAN,
    CLIP_STD,
    HALF_MEAN,
    HALF_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocessing,
)


class Converted(NamedTuple):
    """What a converter made of a state dict (a NamedTuple, so it also unpacks as a 5-tuple).

    Attributes:
      vit_kwargs: keyword arguments of :class:`markov_attn.nn.ViTConfig`.
      params: ``{ViT parameter path: array in Flax layout}``.
      leftover: state-dict entries the mapping neither consumed nor ignored (must be empty).
      ignored: keys deliberately not loaded (poolers, text towers, mask tokens...).
      notes: assumptions made, in words.
    """

    vit_kwargs: dict
    params: dict
    leftover: dict
    ignored: list[str]
    notes: list[str]


def _has(keys, names) -> bool:
    """Whether, for every name in ``names``, some key ends with it (prefixes are allowed)."""
    return all(any(k.endswith(n) for k in keys) for n in names)


@dataclasses.dataclass(frozen=True)
class Signature:
    """The parameter names that identify a family.

    Attributes:
      requires: a state dict is of the family when, for each of these names, one of its keys
        ends with it.
      precedence: :func:`detect` tries the families in increasing precedence and takes the
        first that matches, so a signature that contains another must come first
        (``hf_dinov2_reg`` before ``hf_dinov2``); the registry checks this.
    """

    requires: tuple[str, ...]
    precedence: int

    def matches(self, keys) -> bool:
        return _has(keys, self.requires)


@dataclasses.dataclass(frozen=True)
class Converter:
    """One supported checkpoint family: its name, description, state-dict mapping, detection
    signature and preprocessing defaults."""

    family: str
    description: str
    convert: Callable[..., Converted]
    signature: Signature
    preprocessing: Preprocessing

    def __call__(self, sd: dict, config: dict | None, *, num_heads=None) -> Converted:
        return self.convert(sd, config, num_heads=num_heads)


_GELU = {
    "gelu": "exact",
    "gelu_python": "exact",
    "gelu_new": "tanh",
    "gelu_pytorch_tanh": "tanh",
    "gelu_fast": "tanh",
    "quick_gelu": "quick",
}

_CLIP_EPS = 1e-5  # HF CLIPVisionConfig's layer_norm_eps, used when config.json is missing


def _strip_prefix(sd: dict, prefixes) -> dict:
    for p in prefixes:
        if any(k.startswith(p) for k in sd):
            return {k[len(p) :] if k.startswith(p) else k: v for k, v in sd.items()}
    return sd


def detect(sd: dict) -> str:
    """The family of a state dict from its parameter names (raises ``ValueError`` if unknown).

    The families' :class:`Signature` s are tried in order of precedence; the first that matches
    wins.
    """
    keys = set(sd)
    for c in sorted(CONVERTERS.values(), key=lambda c: c.signature.precedence):
        if c.signature.matches(keys):
            return c.family
    sample = sorted(keys)[:12]
    hint = ""
    if any(
        _has(keys, [n])
        for n in ("transformer.resblocks.0.attn.in_proj_weight", "visual.conv1.weight")
    ):
        hint = " (this looks like an OpenAI/open_clip checkpoint, which is not supported yet)"
    raise ValueError(
        f"could not recognise the checkpoint family from its {len(keys)} parameter names{hint}; "
        f"found e.g. {sample}. Supported: " + "; ".join(f"{k}: {v}" for k, v in FAMILIES.items())
    )


def _t(w: np.ndarray) -> np.ndarray:  # torch Linear (out, in) -> Flax (in, out)
    return np.ascontiguousarray(np.asarray(w).T)


def _conv(w: np.ndarray) -> np.ndarray:  # torch (out, in, kh, kw) -> Flax (kh, kw, in, out)
    return np.ascontiguousarray(np.asarray(w).transpose(2, 3, 1, 0))


def _depth(sd: dict, pattern: str) -> int:
    rx = re.compile(pattern)
    idx = {int(m.group(1)) for k in sd if (m := rx.match(k))}
    if not idx or idx != set(range(max(idx) + 1)):
        raise ValueError(f"block indices {sorted(idx)} are not 0..L-1; the checkpoint is truncated")
    return max(idx) + 1


def _gelu(act, default: str) -> str:
    if act is None:
        return default
    if act not in _GELU:
        raise ValueError(f"hidden_act {act!r} is not supported; supported: {sorted(_GELU)}")
    return _GELU[act]


def _heads(width: int, given, config_value, notes: list) -> int:
    if given is not None:
        return int(given)
    if config_value is not None:
        return int(config_value)
    if width % 64 == 0:
        notes.append(f"num_heads not in a config; assumed head_dim 64 -> {width // 64} heads")
        return width // 64
    raise ValueError(
        f"cannot tell the number of attention heads of a width-{width} model from its weights; "
        "pass num_heads= to load() or put a config.json next to the weights"
    )


def _grid_from_pos(n_pos: int, extra: int) -> int | None:
    side = math.isqrt(max(n_pos - extra, 0))
    return side if side * side == n_pos - extra and side > 0 else None


class _Taker:
    """Pops keys from a state dict so that leftovers can be reported."""

    def __init__(self, sd: dict):
        self.sd = dict(sd)

    def __call__(self, key: str) -> np.ndarray:
        if key not in self.sd:
            raise ValueError(f"parameter {key!r} is missing from the checkpoint")
        return np.asarray(self.sd.pop(key))

    def maybe(self, key: str):
        return np.asarray(self.sd.pop(key)) if key in self.sd else None

    def has(self, key: str) -> bool:
        return key in self.sd

    def ignore(self, *patterns: str) -> list[str]:
        gone = [k for k in self.sd if any(re.fullmatch(p, k) for p in patterns)]
        for k in gone:
            del self.sd[k]
        return gone


def _norm(take, src: str, dst: str, p: dict) -> None:
    p[f"{dst}.scale"] = take(f"{src}.weight")
    p[f"{dst}.bias"] = take(f"{src}.bias")


def _linear(take, src: str, dst: str, p: dict, *, bias: bool = True) -> None:
    p[f"{dst}.kernel"] = _t(take(f"{src}.weight"))
    if bias:
        p[f"{dst}.bias"] = take(f"{src}.bias")


def _qkv(take, q: str, k: str, v: str, dst: str, p: dict) -> bool:
    ws = [take(f"{n}.weight") for n in (q, k, v)]
    p[f"{dst}.kernel"] = _t(np.concatenate(ws, axis=0))
    bs = [take.maybe(f"{n}.bias") for n in (q, k, v)]
    if all(b is None for b in bs):
        return False
    if any(b is None for b in bs):
        raise ValueError(f"only some of the q/k/v biases of {dst} are present")
    p[f"{dst}.bias"] = np.concatenate(bs, axis=0)
    return True


def _patch(take, src: str, p: dict) -> tuple[int, int, bool]:
    w = take(f"{src}.weight")
    p["patch_embed.kernel"] = _conv(w)
    b = take.maybe(f"{src}.bias")
    if b is not None:
        p["patch_embed.bias"] = b
    return int(w.shape[-1]), int(w.shape[1]), b is not None


def _hf_embeddings(take, c: dict, p: dict, patch_key: str, cls_key: str, pos_key: str):
    """Patch embedding, CLS token and position embedding (CLS slot + square grid) of the
    HuggingFace layouts, checked against config.json; fills ``p``."""
    patch, chans, patch_bias = _patch(take, patch_key, p)
    _check(c.get("patch_size"), patch, "patch_size")
    cls = take(cls_key)
    width = int(cls.shape[-1])
    _check(c.get("hidden_size"), width, "hidden_size")
    p["cls"] = cls.reshape(1, 1, width)
    pos = take(pos_key).reshape(1, -1, width)
    grid = _grid_from_pos(pos.shape[1], 1)
    if grid is None:
        raise ValueError(f"position embeddings of length {pos.shape[1]} are not 1 + a square grid")
    p["pos_embed"] = pos
    return patch, chans, patch_bias, width, grid


def _check(cfg_val, shape_val, what: str):
    if cfg_val is not None and int(cfg_val) != int(shape_val):
        raise ValueError(
            f"config.json says {what}={cfg_val} but the weights have {shape_val}; the config "
            "does not belong to these weights"
        )


def hf(sd: dict, config: dict | None, *, num_heads=None, default_eps: float,
       dinov2: bool = False, pos_interp: str = "bicubic"):  # fmt: skip
    """HF ViT / DINOv2 / DINOv2-with-registers (``default_eps``: the family's LayerNorm eps in
    HF, used without config.json; ``dinov2``: the Dinov2 block layout (``norm1``/``norm2``,
    ``mlp.fc1``/``fc2``, layer scale) instead of ViT's; ``pos_interp``: how HF resizes its
    position embedding)."""
    notes: list[str] = []
    sd = _strip_prefix(sd, ("vit.", "dinov2.", "dinov2_with_registers."))
    take = _Taker(sd)
    c = dict(config or {})
    if config is None:
        notes.append(f"no config.json: eps {default_eps} and exact GELU assumed")
    p: dict[str, np.ndarray] = {}
    patch, chans, patch_bias, width, grid = _hf_embeddings(
        take,
        c,
        p,
        "embeddings.patch_embeddings.projection",
        "embeddings.cls_token",
        "embeddings.position_embeddings",
    )
    regs = take.maybe("embeddings.register_tokens")
    if regs is not None:
        p["registers"] = regs.reshape(1, -1, width)
    if dinov2 and c.get("use_swiglu_ffn"):
        raise ValueError("DINOv2 checkpoints with the SwiGLU FFN (giant) are not supported")
    depth = _depth(take.sd, r"encoder\.layer\.(\d+)\.")
    _check(c.get("num_hidden_layers"), depth, "num_hidden_layers")
    qkv_bias = True
    mlp_dim = None
    for i in range(depth):
        s, d = f"encoder.layer.{i}.", f"blocks.{i}."
        att = s + "attention.attention."
        qkv_bias = _qkv(take, att + "query", att + "key", att + "value", d + "attn.qkv", p)
        _linear(take, s + "attention.output.dense", d + "attn.proj", p)
        if dinov2:
            _norm(take, s + "norm1", d + "norm1", p)
            _norm(take, s + "norm2", d + "norm2", p)
            _linear(take, s + "mlp.fc1", d + "mlp.fc1", p)
            _linear(take, s + "mlp.fc2", d + "mlp.fc2", p)
            p[d + "ls1"] = take(s + "layer_scale1.lambda1")
            p[d + "ls2"] = take(s + "layer_scale2.lambda1")
        else:
            _norm(take, s + "layernorm_before", d + "norm1", p)
            _norm(take, s + "layernorm_after", d + "norm2", p)
            _linear(take, s + "intermediate.dense", d + "mlp.fc1", p)
            _linear(take, s + "output.dense", d + "mlp.fc2", p)
        mlp_dim = p[d + "mlp.fc1.kernel"].shape[1]
    _norm(take, "layernorm", "norm", p)
    num_classes = 0
    ignore = [r"pooler\..*", r"embeddings\.mask_token", r".*position_ids"]
    clf = take.maybe("classifier.weight")
    if clf is not None and not dinov2 and clf.shape[1] == width:
        p["head.kernel"] = _t(clf)
        p["head.bias"] = take("classifier.bias")
        num_classes = int(clf.shape[0])
    elif clf is not None:
        take.sd["classifier.weight"] = clf
        ignore.append(r"classifier\..*")
        notes.append("the DINOv2 classifier (on [CLS, mean patch]) is not loaded; backbone only")
    ignored = take.ignore(*ignore)
    kwargs = dict(
        image_size=grid * patch,
        patch_size=patch,
        in_channels=chans,
        width=width,
        depth=depth,
        num_heads=_heads(width, num_heads, c.get("num_attention_heads"), notes),
        mlp_dim=int(mlp_dim),
        num_classes=num_classes,
        cls_token=True,
        num_registers=0 if regs is None else int(regs.shape[1]),
        pos_embed_cls=True,
        pos_interp=pos_interp,
        pool="cls",
        gelu=_gelu(c.get("hidden_act"), "exact"),
        layer_scale=1.0 if dinov2 else None,
        norm_eps=float(c.get("layer_norm_eps", default_eps)),
        pre_norm=False,
        final_norm="all",
        qkv_bias=qkv_bias,
        patch_bias=patch_bias,
    )
    return Converted(kwargs, p, take.sd, ignored, notes)


def clip(sd: dict, config: dict | None, *, num_heads=None):
    """HF CLIPVisionModel, CLIPVisionModelWithProjection, or the vision tower of CLIPModel."""
    notes: list[str] = []
    c = dict(config or {})
    if "vision_config" in c:
        c = dict(c["vision_config"] or {})
    if config is None:
        notes.append("no config.json: eps 1e-5 and quick-GELU assumed")
    ignored = [
        k
        for k in sd
        if not k.startswith(
            ("vision_model.", "embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.")
        )
    ]
    sd = {k: v for k, v in sd.items() if k not in set(ignored)}
    sd = _strip_prefix(sd, ("vision_model.",))
    take = _Taker(sd)
    p: dict[str, np.ndarray] = {}
    patch, chans, patch_bias, width, grid = _hf_embeddings(
        take,
        c,
        p,
        "embeddings.patch_embedding",
        "embeddings.class_embedding",
        "embeddings.position_embedding.weight",
    )
    _norm(take, "pre_layrnorm", "pre_norm", p)
    depth = _depth(take.sd, r"encoder\.layers\.(\d+)\.")
    _check(c.get("num_hidden_layers"), depth, "num_hidden_layers")
    qkv_bias = True
    for i in range(depth):
        s, d = f"encoder.layers.{i}.", f"blocks.{i}."
        a = s + "self_attn."
        qkv_bias = _qkv(take, a + "q_proj", a + "k_proj", a + "v_proj", d + "attn.qkv", p)
        _linear(take, a + "out_proj", d + "attn.proj", p)
        _norm(take, s + "layer_norm1", d + "norm1", p)
        _norm(take, s + "layer_norm2", d + "norm2", p)
        _linear(take, s + "mlp.fc1", d + "mlp.fc1", p)
        _linear(take, s + "mlp.fc2", d + "mlp.fc2", p)
    _norm(take, "post_layernorm", "norm", p)
    ignored += take.ignore(r".*position_ids")
    if any(k.startswith("visual_projection") for k in ignored):
        notes.append(
            "visual_projection is not applied: the pooled output is the CLS after "
            "post_layernorm (CLIPVisionModel's pooler_output)"
        )
    kwargs = dict(
        image_size=grid * patch,
        patch_size=patch,
        in_channels=chans,
        width=width,
        depth=depth,
        num_heads=_heads(width, num_heads, c.get("num_attention_heads"), notes),
        mlp_dim=int(p["blocks.0.mlp.fc1.kernel"].shape[1]),
        num_classes=0,
        cls_token=True,
        num_registers=0,
        pos_embed_cls=True,
        pos_interp="bicubic",
        pool="cls",
        gelu=_gelu(c.get("hidden_act"), "quick"),
        layer_scale=None,
        norm_eps=float(c.get("layer_norm_eps", _CLIP_EPS)),
        pre_norm=True,
        final_norm="pooled",
        qkv_bias=qkv_bias,
        patch_bias=patch_bias,
    )
    return Converted(kwargs, p, take.sd, ignored, notes)


# timm's standard ViT sizes (head_dim 64 except where listed)
_TIMM_ARCH_HEADS = {"tiny": 3, "small": 6, "base": 12, "large": 16, "huge": 16, "giant": 16}


_TIMM_GELU = {"gelu": "exact", "gelu_tanh": "tanh", "quick_gelu": "quick"}


def _timm_act_norm(c: dict, margs: dict, notes: list[str]) -> tuple[str, float]:
    """The activation and LayerNorm eps of a timm ViT from its config: ``model_args.act_layer``
    (or ``quickgelu`` in the architecture name) and, for timm's CLIP towers (``clip`` in the
    architecture name, built with ``norm_layer=nn.LayerNorm``), eps 1e-5; timm's default
    ``partial(LayerNorm, eps=1e-6)`` otherwise. Both were fixed at GELU and 1e-6, which
    silently ran a quick-GELU CLIP tower with the wrong activation and eps."""
    arch = str(c.get("architecture", ""))
    act = margs.get("act_layer")
    if act is None and "quickgelu" in arch:
        act = "quick_gelu"
    if act is not None and str(act) not in _TIMM_GELU:
        raise ValueError(
            f"timm act_layer {act!r} is not supported (supported: {sorted(_TIMM_GELU)})"
        )
    gelu = _TIMM_GELU[str(act)] if act is not None else "exact"
    eps = 1e-5 if "clip" in arch else 1e-6
    if "clip" in arch:
        notes.append(f"LayerNorm eps 1e-5 for timm's CLIP architecture {arch!r}")
    return gelu, eps


def timm(sd: dict, config: dict | None, *, num_heads=None):
    """timm VisionTransformer state dicts (also the original DINO / DINOv2 .pth layout)."""
    notes: list[str] = []
    c = dict(config or {})
    margs = dict(c.get("model_args") or {})
    take = _Taker(sd)
    p: dict[str, np.ndarray] = {}
    patch, chans, patch_bias = _patch(take, "patch_embed.proj", p)
    _check(margs.get("patch_size"), patch, "patch_size")
    width = int(p["patch_embed.kernel"].shape[-1])
    _check(margs.get("embed_dim"), width, "embed_dim")
    cls = take.maybe("cls_token")
    regs = take.maybe("reg_token")
    if regs is None:
        regs = take.maybe("register_tokens")  # DINOv2 original layout
    n_reg = 0 if regs is None else int(regs.shape[1])
    pos = take.maybe("pos_embed")
    if pos is None:
        raise ValueError(
            "timm checkpoints without an absolute pos_embed (RoPE, etc.) are not supported"
        )
    pos = pos.reshape(1, -1, width)
    n_pos = pos.shape[1]
    n_cls = 0 if cls is None else 1
    img = margs.get("img_size")
    if img is not None:
        grid = int(img if np.isscalar(img) else img[0]) // patch
        extra = n_pos - grid * grid
    else:
        # try: patches only (no_embed_class), CLS slot, CLS + register slots
        for extra in (0, n_cls, n_cls + n_reg):
            grid = _grid_from_pos(n_pos, extra)
            if grid:
                break
        else:
            raise ValueError(f"pos_embed of length {n_pos} does not fit a square patch grid")
    if extra == 0:
        pos_embed_cls = False
    elif extra == n_cls:
        pos_embed_cls = cls is not None
    elif extra == n_cls + n_reg and n_reg:
        # timm with registers and no_embed_class=False: the register slots of the position
        # embedding are constants added to constant tokens, so fold them into the registers.
        pos_embed_cls = cls is not None
        regs = regs + pos[:, n_cls:extra]
        pos = np.concatenate([pos[:, :n_cls], pos[:, extra:]], axis=1)
        notes.append("register position embeddings folded into the register tokens")
    else:
        raise ValueError(
            f"pos_embed of length {n_pos} does not match a {grid}x{grid} grid "
            f"with {n_cls} class and {n_reg} register tokens"
        )
    if cls is not None:
        p["cls"] = cls.reshape(1, 1, width)
    if regs is not None:
        p["registers"] = regs.reshape(1, -1, width)
    p["pos_embed"] = pos
    pre_norm = take.has("norm_pre.weight")
    if pre_norm:
        _norm(take, "norm_pre", "pre_norm", p)
    depth = _depth(take.sd, r"blocks\.(\d+)\.")
    layer_scale = take.has("blocks.0.ls1.gamma") or take.has("blocks.0.ls1.weight")
    qkv_bias = take.has("blocks.0.attn.qkv.bias")
    for i in range(depth):
        s, d = f"blocks.{i}.", f"blocks.{i}."
        _linear(take, s + "attn.qkv", d + "attn.qkv", p, bias=qkv_bias)
        if take.has(s + "attn.q_bias"):
            raise ValueError("BEiT-style q_bias/v_bias attention is not supported")
        _linear(take, s + "attn.proj", d + "attn.proj", p)
        _norm(take, s + "norm1", d + "norm1", p)
        _norm(take, s + "norm2", d + "norm2", p)
        _linear(take, s + "mlp.fc1", d + "mlp.fc1", p)
        _linear(take, s + "mlp.fc2", d + "mlp.fc2", p)
        if layer_scale:
            for j in (1, 2):
                g = take.maybe(f"{s}ls{j}.gamma")
                p[f"{d}ls{j}"] = g if g is not None else take(f"{s}ls{j}.weight")
    fc_norm = take.has("fc_norm.weight")
    global_pool = c.get("global_pool") or margs.get("global_pool")
    if fc_norm:
        _norm(take, "fc_norm", "norm", p)
        final_norm, pool = "pooled", "mean"
        if take.has("norm.weight"):
            raise ValueError("checkpoint has both norm and fc_norm; not a timm ViT layout")
    else:
        _norm(take, "norm", "norm", p)
        final_norm = "all"
        pool = "mean" if global_pool == "avg" else "cls" if cls is not None else "mean"
    num_classes = 0
    head = take.maybe("head.weight")
    if head is not None:
        if head.ndim != 2 or head.shape[1] != width:
            raise ValueError(f"head.weight of shape {head.shape} is not a linear classifier")
        p["head.kernel"] = _t(head)
        p["head.bias"] = take("head.bias")
        num_classes = int(head.shape[0])
    # the original DINOv2 code's layout (its mask_token, which timm drops): without registers
    # its checkpoints resize the position embedding by a scale factor with a 0.1 offset and
    # no antialias; its register models, like timm, with antialias and no offset
    pos_interp = "bicubic_antialias"
    if take.has("mask_token") and not n_reg:
        pos_interp = "bicubic_offset"
        notes.append(
            "original DINOv2 layout (mask_token): position embeddings resized as its code does "
            "(scale factor (g + 0.1) / M, bicubic, no antialias)"
        )
    ignored = take.ignore(r"mask_token", r".*\.attn\.(q|k)_norm\..*", r"head\.fc\..*")
    if any(".q_norm." in k for k in ignored):
        raise ValueError("timm ViTs with qk-norm are not supported")
    if num_heads is None and margs.get("num_heads") is None:
        arch = str(c.get("architecture", ""))
        size = next((s for s in _TIMM_ARCH_HEADS if f"_{s}_" in f"_{arch}_"), None)
        if size is not None and width == 64 * _TIMM_ARCH_HEADS[size]:
            num_heads = _TIMM_ARCH_HEADS[size]
    mlp_dim = int(p["blocks.0.mlp.fc1.kernel"].shape[1])
    gelu, norm_eps = _timm_act_norm(c, margs, notes)
    kwargs = dict(
        image_size=grid * patch,
        patch_size=patch,
        in_channels=chans,
        width=width,
        depth=depth,
        num_heads=_heads(width, num_heads, margs.get("num_heads"), notes),
        mlp_dim=mlp_dim,
        num_classes=num_classes,
        cls_token=cls is not None,
        num_registers=n_reg,
        pos_embed_cls=pos_embed_cls,
        pos_interp=pos_interp,
        pool=pool,
        gelu=gelu,
        layer_scale=1.0 if layer_scale else None,
        norm_eps=norm_eps,
        pre_norm=pre_norm,
        final_norm=final_norm,
        qkv_bias=qkv_bias,
        patch_bias=patch_bias,
    )
    return Converted(kwargs, p, take.sd, ignored, notes)


def _registry(*converters: Converter) -> dict[str, Converter]:
    names = [c.family for c in converters]
    if len(set(names)) != len(names):
        raise RuntimeError(f"a checkpoint family is registered twice: {names}")
    order = sorted(converters, key=lambda c: c.signature.precedence)
    if len({c.signature.precedence for c in order}) != len(order):
        raise RuntimeError(f"two families share a detection precedence: {names}")
    for i, first in enumerate(order):
        for later in order[i + 1 :]:
            if set(first.signature.requires) <= set(later.signature.requires):
                raise RuntimeError(
                    f"{later.family}'s signature contains {first.family}'s, so it must come "
                    f"first in detection (lower precedence), or it is never detected"
                )
    return {c.family: c for c in converters}


_HF_PATCH = "embeddings.patch_embeddings.projection.weight"
_DINOV2_SIGNATURE = (_HF_PATCH, "encoder.layer.0.norm1.weight")
_DINOV2_PREPROCESSING = Preprocessing(
    "short_crop", 256 / 224, "bicubic", IMAGENET_MEAN, IMAGENET_STD
)

#: The registry: one converter per supported family (its order is that of :data:`FAMILIES`).
CONVERTERS = _registry(
    Converter(
        "hf_vit",
        "HuggingFace ViTModel / ViTForImageClassification (also DINO v1 in HF format): "
        "embeddings.patch_embeddings.projection + encoder.layer.N.layernorm_before",
        functools.partial(hf, default_eps=1e-12),
        signature=Signature((_HF_PATCH, "encoder.layer.0.layernorm_before.weight"), 4),
        preprocessing=Preprocessing("square", 1.0, "bilinear", HALF_MEAN, HALF_STD),
    ),
    Converter(
        "hf_dinov2",
        "HuggingFace Dinov2Model: encoder.layer.N.norm1 + layer_scale1.lambda1",
        functools.partial(hf, default_eps=1e-6, dinov2=True),
        signature=Signature(_DINOV2_SIGNATURE, 3),
        preprocessing=_DINOV2_PREPROCESSING,
    ),
    Converter(
        "hf_dinov2_reg",
        "HuggingFace Dinov2WithRegistersModel: as Dinov2 + embeddings.register_tokens",
        # HF DINOv2-with-registers resizes its position embedding with antialias=True
        functools.partial(hf, default_eps=1e-6, dinov2=True, pos_interp="bicubic_antialias"),
        signature=Signature((*_DINOV2_SIGNATURE, "embeddings.register_tokens"), 2),
        preprocessing=_DINOV2_PREPROCESSING,
    ),
    Converter(
        "hf_clip",
        "HuggingFace CLIPVisionModel / CLIPModel vision tower: "
        "[vision_model.]embeddings.class_embedding + encoder.layers.N.self_attn.q_proj",
        clip,
        signature=Signature(
            ("embeddings.class_embedding", "encoder.layers.0.self_attn.q_proj.weight"), 1
        ),
        preprocessing=Preprocessing("short_crop", 1.0, "bicubic", CLIP_MEAN, CLIP_STD),
    ),
    Converter(
        "timm",
        "timm VisionTransformer (also DINO v1 / DINOv2 original .pth): patch_embed.proj + "
        "blocks.N.attn.qkv",
        timm,
        signature=Signature(("blocks.0.attn.qkv.weight", "patch_embed.proj.weight"), 0),
        preprocessing=Preprocessing(
            "short_crop", 1 / 0.875, "bicubic", IMAGENET_MEAN, IMAGENET_STD, "pretrained_cfg"
        ),
    ),
)

#: Supported families and the parameter names that identify them.
FAMILIES = {name: c.description for name, c in CONVERTERS.items()}


def converter(family: str) -> Converter:
    """The registered converter of ``family`` (``ValueError`` naming the supported ones)."""
    try:
        return CONVERTERS[family]
    except (KeyError, TypeError):
        raise ValueError(f"family must be one of {sorted(CONVERTERS)}, got {family!r}") from None
