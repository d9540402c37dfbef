"""Parity of the checkpoint loaders with PyTorch (committed fixtures + a live test)."""

import dataclasses
import importlib.util
import json
import pathlib
import shutil
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from markov_attn import checkpoints as ck
from markov_attn.nn import ViT, bicubic_matrix, resize_pos_embed

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "checkpoints"
FAMILY_OF = {
    "vit": "hf_vit",
    "vit_cls": "hf_vit",
    "dinov2": "hf_dinov2",
    "dinov2_reg": "hf_dinov2_reg",
    "clip": "hf_clip",
    "clip_full": "hf_clip",
    "timm": "timm",
    "timm_reg": "timm",
}
HIDDEN_TOL, ATTN_TOL = 1e-5, 1e-6

# The HF fixtures ship no preprocessor_config.json; the warning that load() gives about it is
# tested in test_missing_preprocessor_config_*, and noise everywhere else.
pytestmark = pytest.mark.filterwarnings("ignore::markov_attn.checkpoints.AssumedDefaultsWarning")


def _run(model, expected, tag):
    px = jnp.asarray(expected[f"{tag}_pixels"]).transpose(0, 2, 3, 1)  # NCHW -> NHWC
    logits, aux = model(px, return_hidden=True)
    kind = str(expected[f"{tag}_out_kind"])
    out = {"tokens": aux["tokens"], "pooled": aux["pooled"], "logits": logits}[kind]
    return np.asarray(aux["hidden"]), np.asarray(aux["attn"]), np.asarray(out)


def _errors(model, expected, tag):
    hidden, attn, out = _run(model, expected, tag)
    assert hidden.shape == expected[f"{tag}_hidden"].shape
    assert attn.shape == expected[f"{tag}_attn"].shape
    return (
        float(np.abs(hidden - expected[f"{tag}_hidden"]).max()),
        float(np.abs(attn - expected[f"{tag}_attn"]).max()),
        float(np.abs(out - expected[f"{tag}_out"]).max()),
    )


@pytest.fixture(scope="module", params=sorted(FAMILY_OF))
def loaded(request):
    d = FIXTURES / request.param
    model, cfg, info = ck.load(d)
    return request.param, model, cfg, info, dict(np.load(d / "expected.npz"))


@pytest.mark.parametrize("tag", ["native", "second"])
def test_fixture_parity(loaded, tag):
    name, model, cfg, info, expected = loaded
    assert info.family == FAMILY_OF[name]
    dh, da, do = _errors(model, expected, tag)
    assert dh <= HIDDEN_TOL, f"{name} {tag}: hidden states off by {dh:.2e}"
    assert da <= ATTN_TOL, f"{name} {tag}: attention off by {da:.2e}"
    assert do <= HIDDEN_TOL, f"{name} {tag}: output off by {do:.2e}"
    if tag == "second":  # the second resolution really does resample the position embedding
        assert expected["second_pixels"].shape[-2:] != (cfg.image_size, cfg.image_size)


def test_wrong_interpolation_is_detected():
    # The parity test can fail: the other resampling rule misses by far more than the tolerance.
    for name in ("vit", "timm"):
        d = FIXTURES / name
        model, cfg, _ = ck.load(d)
        other = "bicubic" if cfg.pos_interp == "bicubic_antialias" else "bicubic_antialias"
        model.cfg = dataclasses.replace(cfg, pos_interp=other)
        dh, _, _ = _errors(model, dict(np.load(d / "expected.npz")), "second")
        assert dh > 100 * HIDDEN_TOL


def test_configs_read_from_files():
    _, cfg, info = ck.load(FIXTURES / "vit")
    assert (cfg.norm_eps, cfg.gelu, cfg.num_classes, cfg.final_norm) == (1e-12, "exact", 0, "all")
    assert "pooler.dense.weight" in info.ignored
    _, cfg, _ = ck.load(FIXTURES / "vit_cls")
    assert cfg.num_classes == 3
    _, cfg, _ = ck.load(FIXTURES / "dinov2_reg")
    assert (cfg.num_registers, cfg.layer_scale, cfg.pos_interp) == (2, 1.0, "bicubic_antialias")
    _, cfg, info = ck.load(FIXTURES / "clip_full")
    assert (cfg.gelu, cfg.pre_norm, cfg.final_norm, cfg.patch_bias) == (
        "quick",
        True,
        "pooled",
        False,
    )
    assert cfg.norm_eps == 1e-5
    assert any(k.startswith("text_model.") for k in info.ignored)
    _, cfg, _ = ck.load(FIXTURES / "timm_reg")
    assert (cfg.num_registers, cfg.pos_embed_cls, cfg.pre_norm, cfg.num_classes) == (
        2,
        False,
        True,
        3,
    )


def test_detect_family_and_file_path():
    for name, fam in FAMILY_OF.items():
        assert ck.detect_family(FIXTURES / name) == fam
    # a weight file works as well as its directory
    model, _cfg, info = ck.load(FIXTURES / "timm" / "model.safetensors")
    assert info.family == "timm" and isinstance(model, ViT)


def test_image_size_keeps_the_checkpoint_grid():
    d = FIXTURES / "dinov2"
    model, cfg, _ = ck.load(d, image_size=24)
    base, base_cfg, _ = ck.load(d)
    assert cfg.image_size == 24 and cfg.pos_size == base_cfg.image_size
    assert model.pos_embed[...].shape == base.pos_embed[...].shape  # the checkpoint's grid
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 24, 24, 3)), jnp.float32)
    a = np.asarray(model(x)[1]["attn"])
    b = np.asarray(base(x)[1]["attn"])
    np.testing.assert_allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        ck.load(d, image_size=25)


@pytest.mark.parametrize("size", [8, 32])
def test_a_third_size_is_resized_from_the_checkpoint_grid(size):
    """load(image_size=X) then a call at a third size: PyTorch resizes the checkpoint's own
    grid; resampling it at load made the call resize an already resized grid (off by 1.4e-3
    at X = 32 and 5.5e-2 at X = 8 in the hidden states)."""
    d = FIXTURES / "dinov2"
    expected = dict(np.load(d / "expected.npz"))
    model, _, _ = ck.load(d, image_size=size)
    dh, da, _ = _errors(model, expected, "second")
    assert dh <= HIDDEN_TOL and da <= ATTN_TOL, (dh, da)


def test_timm_without_config_needs_heads(tmp_path):
    shutil.copy(FIXTURES / "timm" / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="num_heads="):
        ck.load(tmp_path)
    _, cfg, _ = ck.load(tmp_path, num_heads=4)
    assert cfg.num_heads == 4 and cfg.image_size == 16


def test_unknown_family(tmp_path):
    from safetensors.numpy import save_file

    save_file({"conv1.weight": np.ones((2, 2), np.float32)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"could not recognise.*conv1\.weight.*Supported: hf_vit"):
        ck.load(tmp_path)


def test_converter_registry():
    from markov_attn.checkpoints import _families

    # one converter per supported family, and FAMILIES is the registry's list
    assert list(_families.CONVERTERS) == list(ck.FAMILIES)
    assert set(ck.FAMILIES) == set(FAMILY_OF.values())
    for name, conv in _families.CONVERTERS.items():
        assert conv.family == name and conv.description == ck.FAMILIES[name]
        assert _families.converter(name) is conv
    # the result has named fields and still unpacks like the former 5-tuple
    sd, _ = ck.read_state_dict(FIXTURES / "vit")
    sd = {k: np.asarray(v) for k, v in sd.items()}
    config = json.loads((FIXTURES / "vit" / "config.json").read_text())
    out = _families.converter("hf_vit")(sd, config)
    kwargs, params, left, ignored, notes = out
    named = (out.vit_kwargs, out.params, out.leftover, out.ignored, out.notes)
    assert all(a is b for a, b in zip((kwargs, params, left, ignored, notes), named, strict=True))
    assert kwargs["num_heads"] == ck.load(FIXTURES / "vit")[1].num_heads and not left
    # an unknown family is a clear error that names every supported one
    supported = r"\['hf_clip', 'hf_dinov2', 'hf_dinov2_reg', 'hf_vit', 'timm'\]"
    with pytest.raises(ValueError, match=rf"family must be one of {supported}, got 'resnet'"):
        _families.converter("resnet")
    with pytest.raises(ValueError, match=rf"family must be one of {supported}, got 'resnet'"):
        ck.load(FIXTURES / "vit", family="resnet")


def _docstring_table_rows() -> dict[str, str]:
    """The rows of the family table in _preprocess's docstring: {family: its text}."""
    from markov_attn.checkpoints import _preprocess

    lines = _preprocess.__doc__.splitlines()
    rules = [i for i, line in enumerate(lines) if line.startswith("====")]
    width = len(lines[rules[0]].split()[0])  # the first column
    rows: dict[str, str] = {}
    aliases: dict[str, str] = {}
    last = ""
    for line in lines[rules[1] + 1 : rules[2]]:
        first = line[:width].strip()
        if first.startswith("(+"):  # "(+ _reg)": the row above also describes family + "_reg"
            aliases[last + first[2:].strip(" )")] = last
        elif first:
            last = first
            rows[last] = ""
        rows[last] += " " + line[width:]
    return rows | {alias: rows[base] for alias, base in aliases.items()}


def test_registry_drives_detection_and_preprocessing():
    from markov_attn.checkpoints import _families, _pixels, _preprocess

    table = _docstring_table_rows()
    mean_label = {_pixels.IMAGENET_MEAN: "ImageNet", _pixels.CLIP_MEAN: "CLIP"}
    for name, conv in _families.CONVERTERS.items():
        sig, pre = conv.signature, conv.preprocessing
        assert isinstance(sig, _families.Signature) and sig.requires
        assert isinstance(pre, _pixels.Preprocessing)
        # a state dict made of the signature alone, bare, prefixed or among other names, is
        # detected as this family (so the precedence lets every family be reached)
        fake = {n: np.zeros(1, np.float32) for n in sig.requires}
        assert _families.detect(fake) == name
        assert _families.detect({f"model.{k}": v for k, v in fake.items()}) == name
        assert _families.detect({**fake, "head.weight": np.zeros(1)}) == name
        # the preprocessing defaults are the registry's
        assert _preprocess._defaults(name) is pre
        r = ck.recipe(name, size=224)
        assert (r["mode"], r["resample"], r["mean"], r["std"]) == (
            pre.mode,
            pre.resample,
            pre.mean,
            pre.std,
        )
        assert r["resize"] == (224 if pre.mode == "square" else int(224 * pre.scale))
        # and the docstring table says the same
        row = table[name]
        assert pre.resample in row, (name, row)
        assert ("no crop" in row) == (pre.mode == "square"), (name, row)
        assert mean_label.get(pre.mean, str(pre.mean[0])) in row, (name, row)
    assert set(table) == set(_families.CONVERTERS)
    # DINOv2 with registers contains DINOv2's signature and must win over it
    regs = _families.CONVERTERS["hf_dinov2_reg"].signature.requires
    assert _families.detect(dict.fromkeys(regs, np.zeros(1))) == "hf_dinov2_reg"
    # the registry refuses an order of precedence that would hide a family
    convs = list(_families.CONVERTERS.values())
    dv2, reg = _families.CONVERTERS["hf_dinov2"], _families.CONVERTERS["hf_dinov2_reg"]
    swapped = [
        dataclasses.replace(c, signature=dataclasses.replace(c.signature, precedence=p))
        for c, p in ((dv2, reg.signature.precedence), (reg, dv2.signature.precedence))
    ]
    with pytest.raises(RuntimeError, match="hf_dinov2_reg's signature contains hf_dinov2's"):
        _families._registry(*[c for c in convs if c not in (dv2, reg)], *swapped)
    # unknown families: the errors list the registry's names
    with pytest.raises(ValueError, match=", ".join(map(repr, _families.CONVERTERS))):
        ck.recipe("resnet")
    with pytest.raises(ValueError, match="Supported: " + ".*".join(_families.CONVERTERS)):
        _families.detect({"conv1.weight": np.zeros(1)})
    with pytest.raises(ValueError, match=r"OpenAI/open_clip checkpoint"):
        _families.detect({"visual.conv1.weight": np.zeros(1)})


def test_corrupt_and_missing(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        ck.load(tmp_path)
    with pytest.raises(FileNotFoundError):
        ck.load(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no weights found"):
        ck.load(empty)


def test_truncated_checkpoint_names_the_missing_tensor(tmp_path):
    from safetensors.numpy import load_file, save_file

    sd = load_file(str(FIXTURES / "vit" / "model.safetensors"))
    del sd["encoder.layer.1.output.dense.bias"]
    save_file(sd, str(tmp_path / "model.safetensors"))
    shutil.copy(FIXTURES / "vit" / "config.json", tmp_path / "config.json")
    with pytest.raises(ValueError, match=r"encoder\.layer\.1\.output\.dense\.bias"):
        ck.load(tmp_path)
    sd = load_file(str(FIXTURES / "vit" / "model.safetensors"))
    sd["encoder.layer.0.extra.weight"] = np.ones(3, np.float32)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="not understood"):
        ck.load(tmp_path)


def test_config_mismatch(tmp_path):
    shutil.copy(FIXTURES / "dinov2" / "model.safetensors", tmp_path / "model.safetensors")
    cfg = json.loads((FIXTURES / "dinov2" / "config.json").read_text())
    cfg["hidden_size"] = 64
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not belong to these weights"):
        ck.load(tmp_path)


def test_torch_pickle(tmp_path):
    torch = pytest.importorskip("torch", reason="torch not installed: .pth loading untested")
    from safetensors.torch import load_file

    sd = load_file(str(FIXTURES / "timm" / "model.safetensors"))
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "w.pth")
    shutil.copy(FIXTURES / "timm" / "config.json", tmp_path / "config.json")
    model, _, _info = ck.load(tmp_path / "w.pth")
    expected = dict(np.load(FIXTURES / "timm" / "expected.npz"))
    dh, da, _ = _errors(model, expected, "native")
    assert dh <= HIDDEN_TOL and da <= ATTN_TOL


# --- position embedding resampling --------------------------------------------------------------


def _bicubic_ref(n_in, n_out, s=None):
    """Float64 reference of PyTorch's upsample_bicubic2d (align_corners=False, a=-0.75):
    output i samples (i + 0.5) n_in / n_out - 0.5, or (i + 0.5) / s - 0.5 with a scale factor."""
    a = -0.75
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        x = (i + 0.5) * n_in / n_out - 0.5 if s is None else (i + 0.5) / s - 0.5
        f = int(np.floor(x))
        t = x - f
        for k, d in zip(range(-1, 3), (1 + t, t, 1 - t, 2 - t)):
            d = abs(d)
            w = (
                ((a + 2) * d - (a + 3)) * d * d + 1
                if d <= 1
                else ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
            )
            m[i, min(max(f + k, 0), n_in - 1)] += w
    return m


def test_bicubic_matrix_reference():
    for n_in, n_out in [(4, 6), (4, 3), (7, 16), (5, 2), (3, 3)]:
        np.testing.assert_allclose(
            bicubic_matrix(n_in, n_out), _bicubic_ref(n_in, n_out), atol=1e-6
        )


def test_bicubic_matrix_with_a_scale_factor():
    """interpolate(scale_factor=s) samples output i at (i + 0.5) / s - 0.5, not at the
    size-based (i + 0.5) n_in / n_out - 0.5 (the original DINO/DINOv2 rule, s = (g + 0.1) / M)."""
    for n_in, n_out in [(37, 16), (37, 37), (4, 6), (7, 3), (5, 5)]:
        s = (n_out + 0.1) / n_in
        got = bicubic_matrix(n_in, n_out, scale_factor=s)
        np.testing.assert_allclose(got, _bicubic_ref(n_in, n_out, s), atol=5e-6)  # float32 coords
        if n_in != n_out:  # the rule matters
            assert np.abs(got - bicubic_matrix(n_in, n_out)).max() > 1e-3
    with pytest.raises(ValueError, match="outputs from"):
        bicubic_matrix(4, 6, scale_factor=2.0)


def test_original_dinov2_layout_uses_the_offset_rule(tmp_path):
    """A state dict in the original DINOv2 code's layout (its mask_token, no registers) is
    read by the timm converter but resized with DINOv2's own rule; pos_interp= overrides."""
    from safetensors.numpy import load_file, save_file

    sd = load_file(str(FIXTURES / "timm" / "model.safetensors"))
    sd["mask_token"] = np.zeros((1, sd["cls_token"].shape[-1]), np.float32)
    save_file(sd, str(tmp_path / "model.safetensors"))
    shutil.copy(FIXTURES / "timm" / "config.json", tmp_path / "config.json")
    _, cfg, info = ck.load(tmp_path)
    assert cfg.pos_interp == "bicubic_offset" and "mask_token" in info.ignored
    assert any("original DINOv2" in n for n in info.notes)
    _, timm_cfg, _ = ck.load(FIXTURES / "timm")
    assert timm_cfg.pos_interp == "bicubic_antialias"
    _, cfg, _ = ck.load(FIXTURES / "timm", pos_interp="bicubic_offset")  # DINO v1 originals
    assert cfg.pos_interp == "bicubic_offset"
    with pytest.raises(ValueError, match="pos_interp"):
        ck.load(FIXTURES / "timm", pos_interp="nearest")


def test_offset_rule_matches_torch():
    torch = pytest.importorskip("torch", reason="torch not installed: checked against the formula")
    grid = np.random.default_rng(0).normal(size=(7, 7, 5)).astype(np.float32)
    for new in [(3, 3), (4, 9), (7, 7), (7, 3), (12, 12)]:
        got = np.asarray(resize_pos_embed(grid, new, method="bicubic_offset"))
        if new == (7, 7):
            np.testing.assert_array_equal(got, grid)  # DINOv2 returns the native grid as is
            continue
        x = torch.from_numpy(grid).permute(2, 0, 1)[None]
        s = (float(new[0] + 0.1) / 7, float(new[1] + 0.1) / 7)
        want = torch.nn.functional.interpolate(x, scale_factor=s, mode="bicubic", antialias=False)
        np.testing.assert_allclose(got, want[0].permute(1, 2, 0).numpy(), atol=5e-6)


def test_resize_pos_embed_shapes_and_errors():
    g = np.random.default_rng(0).normal(size=(2, 4, 4, 3)).astype(np.float32)
    assert resize_pos_embed(g, (6, 5)).shape == (2, 6, 5, 3)
    np.testing.assert_array_equal(resize_pos_embed(g, (4, 4)), g)
    # the two rules differ: PyTorch's non-antialiased cubic is not jax.image.resize's
    d = resize_pos_embed(g, (6, 3)) - resize_pos_embed(g, (6, 3), method="bicubic_antialias")
    assert float(jnp.abs(d).max()) > 1e-2
    with pytest.raises(ValueError, match="method must be one of"):
        resize_pos_embed(g, (2, 2), method="cubic")
    with pytest.raises(ValueError, match=r"\(gh, gw, D\)"):
        resize_pos_embed(g[0, 0], (2, 2))


# --- preprocessing -------------------------------------------------------------------------------


def test_preprocess_recipes(tmp_path):
    from PIL import Image

    img = (np.random.default_rng(0).random((30, 40, 3)) * 255).astype(np.uint8)
    path = tmp_path / "x.png"
    Image.fromarray(img).save(path)
    x = ck.preprocess(str(path), "hf_clip", size=16)
    assert x.shape == (1, 16, 16, 3) and x.dtype == np.float32
    # CLIP: shortest edge to 16 (bicubic), centre crop, CLIP mean/std
    im = Image.fromarray(img).resize((21, 16), Image.Resampling.BICUBIC).crop((2, 0, 18, 16))
    want = (np.asarray(im, np.float32) / 255 - np.float32(ck.CLIP_MEAN)) / np.float32(ck.CLIP_STD)
    np.testing.assert_allclose(x[0], want, atol=1e-6)
    # HF ViT: plain resize to a square, mean = std = 0.5 (ViTImageProcessor's defaults)
    y = ck.preprocess([img, img], "hf_vit", size=8)
    im = Image.fromarray(img).resize((8, 8), Image.Resampling.BILINEAR)
    want = (np.asarray(im, np.float32) / 255 - np.float32(0.5)) / np.float32(0.5)
    np.testing.assert_allclose(y[1], want, atol=1e-6)
    # info: native size from the checkpoint's config; timm reads its pretrained_cfg crop_pct
    _, _, info = ck.load(FIXTURES / "timm")
    r = ck.recipe(info)
    assert (r["crop"], r["resize"]) == (16, 17)
    assert ck.preprocess(img, info).shape == (1, 16, 16, 3)
    with pytest.raises(ValueError, match="unknown family"):
        ck.preprocess(img, "resnet")


def _copy_fixture(name, dest):
    dest.mkdir()
    for f in ("model.safetensors", "config.json"):
        shutil.copy(FIXTURES / name / f, dest / f)
    return dest


def test_missing_preprocessor_config_follows_hf_vit_defaults_and_warns(tmp_path):
    d = _copy_fixture("vit", tmp_path / "vit")
    with pytest.warns(ck.AssumedDefaultsWarning, match=r"preprocessor_config\.json") as rec:
        _, _, info = ck.load(d)
    msg = str(rec[0].message)
    assert "hf_vit defaults" in msg and "mean=(0.5, 0.5, 0.5)" in msg and "bilinear" in msg
    assert any("preprocessor_config.json" in n for n in info.notes)
    r = ck.recipe(info)
    assert (r["mean"], r["std"], r["mode"]) == (ck.HALF_MEAN, ck.HALF_STD, "square")
    # the file, when present, is read and silences the warning (DINO v1 ships ImageNet stats)
    pre = {"image_mean": list(ck.IMAGENET_MEAN), "image_std": list(ck.IMAGENET_STD)}
    (d / "preprocessor_config.json").write_text(json.dumps(pre))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, _, info = ck.load(d)
    assert ck.recipe(info)["mean"] == ck.IMAGENET_MEAN and not info.notes


@pytest.mark.parametrize(
    ("name", "stats"),
    [("dinov2", "mean=(0.485, 0.456, 0.406)"), ("clip", "mean=(0.48145466")],
)
def test_missing_preprocessor_config_other_hf_families_warn(tmp_path, name, stats):
    d = _copy_fixture(name, tmp_path / name)
    with pytest.warns(ck.AssumedDefaultsWarning, match=r"preprocessor_config\.json") as rec:
        ck.load(d)
    assert stats in str(rec[0].message)


def test_timm_pretrained_cfg_needs_no_warning_but_its_absence_does(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ck.load(FIXTURES / "timm")  # config.json carries pretrained_cfg mean/std
    d = _copy_fixture("timm", tmp_path / "timm")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["pretrained_cfg"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.warns(ck.AssumedDefaultsWarning, match="pretrained_cfg"):
        ck.load(d)


def test_preprocessor_flags_are_honoured(tmp_path):
    d = _copy_fixture("vit", tmp_path / "vit")
    (d / "preprocessor_config.json").write_text(json.dumps({"do_normalize": False}))
    _, _, info = ck.load(d)
    img = np.full((8, 8, 3), 51, np.uint8)
    np.testing.assert_allclose(ck.preprocess(img, info, size=4), 0.2, atol=1e-6)  # 51 / 255
    (d / "preprocessor_config.json").write_text(json.dumps({"do_rescale": False}))
    _, _, info = ck.load(d)
    with pytest.raises(ValueError, match="do_rescale=False.*preprocess the images yourself"):
        ck.recipe(info)


# --- live parity ---


def _script():
    spec = importlib.util.spec_from_file_location(
        "make_checkpoint_fixtures", ROOT / "scripts" / "make_checkpoint_fixtures.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", ["vit_cls", "dinov2_reg", "clip"])
def test_live_parity(name, tmp_path):
    pytest.importorskip("torch", reason="torch not installed: live parity needs torch")
    pytest.importorskip("transformers", reason="transformers not installed: live parity needs it")
    script = _script()
    model_pt = script.build(name, seed=7)
    script.save(name, model_pt, tmp_path / name)
    model, _, _ = ck.load(tmp_path / name)
    expected = dict(np.load(tmp_path / name / "expected.npz"))
    for tag in ("native", "second"):
        dh, da, do = _errors(model, expected, tag)
        assert dh <= HIDDEN_TOL and da <= ATTN_TOL and do <= HIDDEN_TOL, (name, tag, dh, da)


def _photo(h=427, w=640):
    from PIL import Image

    a = (np.random.default_rng(5).random((h, w, 3)) * 255).astype(np.uint8)
    return Image.fromarray(a)


def _normalised(im, mean, std):
    a = np.asarray(im, np.float32) / np.float32(255.0)
    return (a - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def test_height_width_size_resizes_exactly_before_the_crop(tmp_path):
    """A DeiT-style processor (size {height, width} 256, crop 224) stretches to 256 x 256 and
    crops; it was read as a shortest-edge resize (max |diff| 3.3 on random pixels)."""
    from PIL import Image

    pre = {"do_center_crop": True, "crop_size": {"height": 224, "width": 224},
           "size": {"height": 256, "width": 256}, "resample": 3,
           "image_mean": [0.5] * 3, "image_std": [0.5] * 3}  # fmt: skip
    info = ck.CheckpointInfo("hf_vit", tmp_path / "w", {"image_size": 224}, pre, (), (), 1)
    img = _photo()
    want = img.resize((256, 256), Image.Resampling.BICUBIC).crop((16, 16, 240, 240))
    got = ck.preprocess(img, info)[0]
    np.testing.assert_allclose(got, _normalised(want, [0.5] * 3, [0.5] * 3), atol=1e-6)


def test_timm_center_crop_rounds_like_torchvision():
    from PIL import Image

    r = ck.recipe("timm", size=224)
    img = _photo()
    nh, nw = r["resize"], int(r["resize"] * 640 / 427)
    top, left = round((nh - 224) / 2), round((nw - 224) / 2)  # torchvision CenterCrop
    want = img.resize((nw, nh), Image.Resampling.BICUBIC).crop((left, top, left + 224, top + 224))
    got = ck.preprocess(img, "timm", size=224)[0]
    np.testing.assert_allclose(got, _normalised(want, r["mean"], r["std"]), atol=1e-6)


def test_timm_native_size_and_activation_from_the_config(tmp_path):
    d = tmp_path / "timm"
    shutil.copytree(FIXTURES / "timm", d)
    c = json.loads((d / "config.json").read_text())
    del c["pretrained_cfg"]
    (d / "config.json").write_text(json.dumps(c))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, cfg, info = ck.load(d)
    assert ck.recipe(info)["crop"] == cfg.image_size == 16  # was 224
    d2 = tmp_path / "clip"
    shutil.copytree(FIXTURES / "timm_reg", d2)
    c = json.loads((d2 / "config.json").read_text())
    c["architecture"] = "vit_base_patch16_clip_quickgelu_224"
    (d2 / "config.json").write_text(json.dumps(c))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, cfg, _ = ck.load(d2)
    assert cfg.gelu == "quick" and cfg.norm_eps == 1e-5  # were "exact" and 1e-6


def test_preprocessing_edge_cases():
    a = np.full((8, 8, 3), 30000, np.uint16)  # 16-bit pixels: scaled, not white
    got = ck.preprocess(a, "hf_vit", size=8)[0]
    np.testing.assert_allclose(got, (round(30000 / 257) / 255 - 0.5) / 0.5, atol=1e-6)
    with pytest.raises(ValueError, match="8-bit"):
        ck.preprocess(np.full((8, 8, 3), 1000, np.int32), "hf_vit", size=8)
    pre = {"do_center_crop": True, "crop_size": 22, "size": {"shortest_edge": 30},
           "image_mean": [0.5] * 3, "image_std": [0.5] * 3}  # fmt: skip
    info = ck.CheckpointInfo("hf_clip", pathlib.Path("w"), {}, pre, (), (), 1)
    assert ck.recipe(info)["resize"] == 30  # float rounding gave 29
