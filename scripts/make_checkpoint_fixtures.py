"""Generates the tiny PyTorch checkpoint fixtures under tests/fixtures/checkpoints/.

Run once, in a separate environment with torch, transformers and timm (NOT the project's venv):

    python3 -m venv /tmp/fx
    /tmp/fx/bin/pip install torch==2.13.0 "transformers>=5" safetensors numpy pillow pyyaml
    /tmp/fx/bin/pip install --no-deps timm
    /tmp/fx/bin/python scripts/make_checkpoint_fixtures.py

timm's ``VisionTransformer`` never calls torchvision, but ``import timm`` imports it (through
``timm.data``), and the only torchvision wheel that imports here needs torch 2.14.1. When
torchvision is missing this script installs an import stub for it (``_stub_torchvision``) so the
REAL timm model code runs; nothing in the ViT forward pass touches the stub.

Every family gets a tiny random model (hidden 32, 2 layers, 4 heads, patch 4, 16x16 images) in
which every 1-D parameter (norm scales and biases, all biases, layer scales) and every constant
tensor (zero-initialised tokens) is perturbed, so a mapping mistake cannot hide behind ones and
zeros. Each fixture directory holds:

- ``config.json`` and ``model.safetensors`` exactly as the family writes them
  (``save_pretrained`` for HuggingFace, a timm hub-style ``config.json`` + state dict for timm);
- ``expected.npz``: for the native resolution (``native_*``) and a second, non-square resolution
  that resamples the position embeddings (``second_*``): ``pixels`` (B, 3, H, W) float32,
  ``hidden`` (B, L+1, n, D) (embeddings, then each block's output, before the final norm),
  ``attn`` (B, L, heads, n, n) and ``out`` (final tokens, pooled features or logits, see
  ``out_kind``).

The test-suite imports ``build`` and ``reference`` from this file for its live parity test (run
only where torch and transformers are importable).
"""

import importlib.abc
import importlib.machinery
import json
import math
import os
import pathlib
import sys

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "checkpoints"

#: family name -> what it exercises
FAMILIES = {
    "vit": "HF ViTModel (with pooler, ignored by the loader), eps 1e-12, exact GELU",
    "vit_cls": "HF ViTForImageClassification ('vit.' prefix, classifier head)",
    "dinov2": "HF Dinov2Model, layer scale, eps 1e-6",
    "dinov2_reg": "HF Dinov2WithRegistersModel, 2 registers, antialiased pos-embed resize",
    "clip": "HF CLIPVisionModel, quick-GELU, pre_layrnorm, post_layernorm on pooled CLS",
    "clip_full": "HF CLIPModel (vision tower read from a full CLIP checkpoint)",
    "timm": "timm VisionTransformer, layer scale, pos-embed with CLS slot",
    "timm_reg": "timm VisionTransformer, 2 registers, no_embed_class, norm_pre, classifier",
}

WIDTH, DEPTH, HEADS, MLP, PATCH, IMAGE = 32, 2, 4, 64, 4, 16
#: second resolution: (H, W) in pixels, grid 6x3, so one axis up- and one down-samples
SECOND = (24, 12)
BATCH = 2


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        from unittest import mock

        module = mock.MagicMock(name=spec.name)
        module.__path__ = []
        module.__spec__ = spec
        module.__name__ = spec.name
        return module

    def exec_module(self, module):
        pass


def _stub_torchvision():
    try:
        import torchvision  # noqa: F401
    except Exception:
        for name in [m for m in sys.modules if m.startswith("torchvision")]:
            del sys.modules[name]
        sys.meta_path.insert(0, _StubFinder())


def perturb(model, seed: int) -> None:
    """Adds noise to every 1-D parameter and to every constant tensor of ``model``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            constant = p.numel() == 1 or float(p.std()) == 0.0
            if p.ndim == 1 or constant:
                p.add_(0.2 * noise)


def _hf_config(family: str):
    import transformers as tf

    common = dict(
        hidden_size=WIDTH,
        num_hidden_layers=DEPTH,
        num_attention_heads=HEADS,
        image_size=IMAGE,
        patch_size=PATCH,
        num_channels=3,
    )
    if family in ("vit", "vit_cls"):
        cfg = tf.ViTConfig(intermediate_size=MLP, num_labels=3, **common)
    elif family == "dinov2":
        cfg = tf.Dinov2Config(mlp_ratio=MLP // WIDTH, **common)
    elif family == "dinov2_reg":
        cfg = tf.Dinov2WithRegistersConfig(mlp_ratio=MLP // WIDTH, num_register_tokens=2, **common)
    elif family == "clip":
        cfg = tf.CLIPVisionConfig(intermediate_size=MLP, projection_dim=16, **common)
    elif family == "clip_full":
        vision = dict(intermediate_size=MLP, **common)
        text = dict(
            vocab_size=50,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=8,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
        cfg = tf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    else:
        raise ValueError(family)
    return cfg


def build(family: str, seed: int = 0):
    """A tiny random PyTorch model of ``family`` with perturbed 1-D parameters (eval mode)."""
    import torch

    torch.manual_seed(seed)
    if family.startswith("timm"):
        _stub_torchvision()
        import timm

        kwargs = dict(
            img_size=IMAGE,
            patch_size=PATCH,
            embed_dim=WIDTH,
            depth=DEPTH,
            num_heads=HEADS,
            mlp_ratio=MLP / WIDTH,
            dynamic_img_size=True,
        )
        if family == "timm":
            kwargs.update(num_classes=0, init_values=1e-1)
        else:
            kwargs.update(num_classes=3, reg_tokens=2, no_embed_class=True, pre_norm=True)
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs)
        for blk in model.blocks:
            blk.attn.fused_attn = False
    else:
        import transformers as tf

        cfg = _hf_config(family)
        cls = {
            "vit": tf.ViTModel,
            "vit_cls": tf.ViTForImageClassification,
            "dinov2": tf.Dinov2Model,
            "dinov2_reg": tf.Dinov2WithRegistersModel,
            "clip": tf.CLIPVisionModel,
            "clip_full": tf.CLIPModel,
        }[family]
        model = cls._from_config(cfg, attn_implementation="eager")
    perturb(model, seed + 1)
    return model.eval()


def _timm_reference(model, pixels):
    hidden, attn = [], []
    hooks = [model.blocks[0].register_forward_pre_hook(lambda m, a: hidden.append(a[0]))]
    for blk in model.blocks:
        hooks.append(blk.register_forward_hook(lambda m, a, o: hidden.append(o)))
        hooks.append(blk.attn.attn_drop.register_forward_hook(lambda m, a, o: attn.append(a[0])))
    try:
        out = model(pixels)
    finally:
        for h in hooks:
            h.remove()
    return hidden, attn, out, ("logits" if model.num_classes else "pooled")


def reference(family: str, model, pixels):
    """Runs ``model`` on NCHW ``pixels`` (numpy) -> dict of float32 numpy arrays."""
    import torch

    x = torch.from_numpy(np.asarray(pixels, np.float32))
    native = x.shape[-2:] == (IMAGE, IMAGE)
    with torch.no_grad():
        if family.startswith("timm"):
            hidden, attn, out, kind = _timm_reference(model, x)
        else:
            kw = dict(output_attentions=True, output_hidden_states=True)
            if not native:
                kw["interpolate_pos_encoding"] = True
            if family == "clip_full":
                res = model.vision_model(pixel_values=x, **kw)
            else:
                res = model(pixel_values=x, **kw)
            hidden, attn = res.hidden_states, res.attentions
            if family == "vit_cls":
                out, kind = res.logits, "logits"
            elif family.startswith("clip"):
                out, kind = res.pooler_output, "pooled"
            else:
                out, kind = res.last_hidden_state, "tokens"
    return {
        "hidden": torch.stack(list(hidden), 1).float().numpy(),
        "attn": torch.stack(list(attn), 1).float().numpy(),
        "out": out.float().numpy(),
        "out_kind": np.asarray(kind),
    }


def pixels_for(family: str, seed: int = 0):
    rng = np.random.default_rng(1000 + seed + sum(map(ord, family)))
    native = rng.normal(size=(BATCH, 3, IMAGE, IMAGE)).astype(np.float32)
    second = rng.normal(size=(BATCH, 3, *SECOND)).astype(np.float32)
    return native, second


def _timm_config(model) -> dict:
    import torch

    name = "vit_tiny_patch16_224"
    return {
        "architecture": name,
        "num_classes": int(model.num_classes),
        "num_features": int(model.num_features),
        "global_pool": model.global_pool,
        "model_args": {
            "img_size": IMAGE,
            "patch_size": PATCH,
            "embed_dim": WIDTH,
            "depth": DEPTH,
            "num_heads": HEADS,
            "mlp_ratio": MLP / WIDTH,
            "reg_tokens": int(model.num_reg_tokens),
            "no_embed_class": bool(model.no_embed_class),
            "pre_norm": not isinstance(model.norm_pre, torch.nn.Identity),
        },
        "pretrained_cfg": {
            "input_size": [3, IMAGE, IMAGE],
            "interpolation": "bicubic",
            "crop_pct": 0.9,
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
        },
    }


def save(family: str, model, directory: pathlib.Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for f in directory.iterdir():
        f.unlink()
    if family.startswith("timm"):
        from safetensors.torch import save_file

        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(sd, str(directory / "model.safetensors"), metadata={"format": "pt"})
        (directory / "config.json").write_text(json.dumps(_timm_config(model), indent=2) + "\n")
    else:
        model.save_pretrained(str(directory), safe_serialization=True)
    native, second = pixels_for(family)
    arrays = {}
    for tag, px in (("native", native), ("second", second)):
        ref = reference(family, model, px)
        arrays[f"{tag}_pixels"] = px
        for k, v in ref.items():
            arrays[f"{tag}_{k}"] = v
    np.savez_compressed(directory / "expected.npz", **arrays)


def main(argv=None) -> int:
    families = (argv if argv else sys.argv[1:]) or list(FAMILIES)
    for family in families:
        model = build(family)
        save(family, model, OUT / family)
        size = sum(f.stat().st_size for f in (OUT / family).iterdir())
        print(f"{family:11s} {size / 1024:7.1f} KiB  {FAMILIES[family]}")
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"total {total / 1024:.1f} KiB in {OUT}")
    assert math.isfinite(total)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
