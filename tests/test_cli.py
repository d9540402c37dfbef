"""The markov-attn CLI on a tiny fixture checkpoint, a tiny training run and tiny PNGs."""

import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from markov_attn import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "checkpoints"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    paths = []
    for i, shape in enumerate([(20, 24, 3), (16, 16, 3)]):
        a = (np.random.default_rng(i).random(shape) * 255).astype(np.uint8)
        p = d / f"img{i}.png"
        Image.fromarray(a).save(p)
        paths.append(str(p))
    return paths


def _is_png(path: pathlib.Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_maps_bounce_on_pretrained_fixture(images, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(
        [
            "maps",
            "--checkpoint",
            str(FIXTURES / "dinov2_reg"),
            "--image",
            *images,
            "--method",
            "bounce",
            "--steps",
            "2",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "TokenRank (layer 1)" in printed and "|λ2| per head" in printed
    for p in images:
        assert _is_png(out / f"{pathlib.Path(p).stem}_bounce.png")
    stats = json.loads((out / "stats.json").read_text())
    assert len(stats) == 2
    for s in stats:
        assert len(s["lambda2"]) == 4 and all(0 <= v <= 1 + 1e-6 for v in s["lambda2"])
        assert abs(sum(s["head_weights"]) - 1) < 1e-5
        assert 0 < s["tokenrank_entropy_normalized"] <= 1 + 1e-6
        assert len(s["tokenrank_top"]) == 5
        assert s["tokenrank_top"][0]["mass"] >= s["tokenrank_top"][-1]["mass"]


def test_maps_other_methods_and_errors(images, tmp_path, capsys):
    out = tmp_path / "o"
    for method in ("rollout",):
        rc = cli.main(
            [
                "maps",
                "--checkpoint",
                str(FIXTURES / "vit"),
                "--image",
                images[1],
                "--method",
                method,
                "--layer",
                "0",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        assert rc == 0 and _is_png(out / f"img1_{method}.png")
    assert "layer 0" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--layer"):
        cli.main(
            [
                "maps",
                "--checkpoint",
                str(FIXTURES / "vit"),
                "--image",
                images[1],
                "--layer",
                "5",
                "--out",
                str(out),
            ]
        )
    with pytest.raises(SystemExit, match="does not exist"):
        cli.main(["maps", "--checkpoint", str(tmp_path / "none"), "--image", images[1]])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:  # argparse: unknown method
        cli.main(
            [
                "maps",
                "--checkpoint",
                str(FIXTURES / "vit"),
                "--image",
                images[1],
                "--method",
                "magic",
            ]
        )
    assert exit_info.value.code == 2 and "invalid choice: 'magic'" in capsys.readouterr().err


def test_maps_on_training_run(images, tmp_path, capsys):
    train = pytest.importorskip("experiments.train")
    configs = pytest.importorskip("experiments.configs")
    from markov_attn.nn import ViTConfig

    cfg = configs.TrainConfig(
        model=ViTConfig(image_size=16, patch_size=4, width=16, depth=1, num_heads=2, mlp_dim=32),
        name="cli",
        data="synthetic",
        train_size=32,
        test_size=16,
        batch_size=16,
        steps=2,
        warmup_steps=1,
        ckpt_every=1,
        log_every=1,
        eval_batch_size=16,
    )
    run = tmp_path / "run"
    train.train_and_evaluate(cfg, run, progress=False)
    out = tmp_path / "o"
    rc = cli.main(
        [
            "maps",
            "--checkpoint",
            str(run),
            "--image",
            images[0],
            "--method",
            "tokenrank",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0 and _is_png(out / "img0_tokenrank.png")
    assert "training run" in capsys.readouterr().out


def _maps_args(checkpoint, image, out, *extra):
    return ["maps", "--checkpoint", str(checkpoint), "--image", *image, "--out", str(out),
            "--no-progress", *extra]  # fmt: skip


def _one_line_error(argv) -> str:
    """Runs the CLI expecting a clean failure: a one-line message, no traceback."""
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    msg = e.value.code
    assert isinstance(msg, str) and "\n" not in msg, msg  # a str code prints, exit status 1
    assert msg.startswith("markov-attn: error: ")
    return msg


def test_truncated_safetensors_is_a_one_line_error(images, tmp_path):
    data = (FIXTURES / "vit" / "model.safetensors").read_bytes()
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    msg = _one_line_error(_maps_args(bad, images[1:], tmp_path / "o"))
    assert "not a readable safetensors file" in msg and "re-download" in msg
    assert not (tmp_path / "o").exists()  # nothing written


def test_directory_that_is_not_a_checkpoint(images, tmp_path):
    d = tmp_path / "notes"
    d.mkdir()
    (d / "readme.txt").write_text("hello")
    msg = _one_line_error(_maps_args(d, images[1:], tmp_path / "o"))
    assert "no weights found" in msg and "model.safetensors" in msg and "checkpoints/" in msg


def test_text_file_as_image(images, tmp_path):
    txt = tmp_path / "cat.png"
    txt.write_text("not really a picture")
    msg = _one_line_error(_maps_args(FIXTURES / "vit", [images[1], str(txt)], tmp_path / "o"))
    assert str(txt) in msg and "not an image" in msg and "PNG or JPEG" in msg
    assert not (tmp_path / "o").exists()  # refused before the first image was processed


@pytest.mark.parametrize("size", [13, 2, 0, -8, 100_000, 260])
def test_unsupported_size(images, tmp_path, size):
    msg = _one_line_error(
        _maps_args(FIXTURES / "vit", images[1:], tmp_path / "o", "--size", str(size))
    )
    assert "--size" in msg
    if size > 256:  # too many tokens: refused before anything is resized (100,000 px: OOM)
        assert f"{size // 4 * size // 4} patch tokens" in msg and "--size 256 or less" in msg
    elif size > 0:  # names the nearest sizes that work
        assert "multiple of the model's patch size 4" in msg
        assert f"--size {max(4, size // 4 * 4)} or" in msg


def test_errors_reach_stderr_as_one_line_from_the_shell(images, tmp_path):
    import subprocess
    import sys

    txt = tmp_path / "x.png"
    txt.write_text("text")
    argv = _maps_args(FIXTURES / "vit", [str(txt)], tmp_path / "o")
    r = subprocess.run(
        [sys.executable, "-m", "markov_attn.cli", *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("markov-attn: error: ") and "not an image" in r.stderr


def test_existing_outputs_are_not_overwritten(images, tmp_path, capsys):
    out = tmp_path / "o"
    argv = _maps_args(FIXTURES / "vit", images[1:], out, "--method", "cls")
    assert cli.main(argv) == 0
    png = out / "img1_cls.png"
    before = png.read_bytes()
    msg = _one_line_error(argv)
    assert str(png) in msg and "--overwrite" in msg
    assert png.read_bytes() == before
    assert cli.main([*argv, "--overwrite", "--alpha", "0.5"]) == 0
    assert _is_png(png)
    # another method in the same directory would still replace stats.json
    assert "stats.json" in _one_line_error(_maps_args(FIXTURES / "vit", images[1:], out))
    # two images with the same stem would write the same PNG
    other = tmp_path / "elsewhere"
    other.mkdir()
    twin = other / pathlib.Path(images[1]).name
    twin.write_bytes(pathlib.Path(images[1]).read_bytes())
    msg = _one_line_error(_maps_args(FIXTURES / "vit", [images[1], str(twin)], tmp_path / "o2"))
    assert "would both be written" in msg
    f = tmp_path / "file"
    f.write_text("")
    assert "is a file" in _one_line_error(_maps_args(FIXTURES / "vit", images[1:], f))
    capsys.readouterr()


@pytest.fixture
def drawn(monkeypatch):
    """Records the arguments of every figure the CLI draws (no PNG is written)."""
    import markov_attn.viz

    calls = []

    def fake(images, maps, /, **kwargs):
        calls.append(dict(kwargs, maps={k: np.asarray(v) for k, v in maps.items()}))

    monkeypatch.setattr(markov_attn.viz, "bounce_strip", fake)
    return calls


def test_figure_titles_name_what_was_computed(images, tmp_path, drawn, capsys):
    vit = FIXTURES / "vit"
    cli.main(_maps_args(vit, images[1:], tmp_path / "a", "--method", "rollout", "--layer", "0"))
    cli.main(_maps_args(vit, images[1:], tmp_path / "b", "--weighting", "gap", "--alpha", "0.9"))
    cli.main(_maps_args(vit, images[1:], tmp_path / "c", "--method", "column_sum"))
    # the old spellings still work: --heads for --weighting, colsum for column_sum
    cli.main(_maps_args(vit, images[1:], tmp_path / "d", "--heads", "gap", "--method", "colsum"))
    rollout, bounce, colsum, old = drawn
    # rollout fuses every layer up to --layer with the plain head mean, not lambda2 weights
    assert rollout["title"] == "img1: rollout of layers 0-0, mean of heads"
    assert list(rollout["maps"]) == ["attention rollout"]  # panels: the MapMethod titles
    assert bounce["title"] == "img1: layer 1, heads weighted by gap, alpha 0.9"
    assert list(bounce["maps"]) == ["bounce n=1 forward from CLS", "bounce n=2 forward from CLS"]
    assert colsum["title"] == "img1: layer 1, heads weighted by lambda2"
    assert old["title"] == "img1: layer 1, heads weighted by gap"
    assert list(old["maps"]) == list(colsum["maps"]) == ["column sum"]
    (stats,) = json.loads((tmp_path / "d" / "stats.json").read_text())
    assert stats["png"].endswith("img1_column_sum.png")
    capsys.readouterr()


def test_figures_are_on_a_stated_uniform_scale(images, tmp_path, drawn, capsys):
    cli.main(_maps_args(FIXTURES / "vit", images[1:], tmp_path / "o", "--method", "tokenrank"))
    (call,) = drawn
    assert "1 = uniform" in call["label"] and call.get("scale", "shared") == "shared"
    (grid,) = call["maps"].values()
    # patch masses times the number of patches: mean <= 1 (the CLS keeps the rest)
    assert grid.shape == (1, 4, 4) and 0.5 < grid.mean() <= 1 + 1e-5
    capsys.readouterr()


def test_missing_preprocessor_config_is_a_warning_line(images, tmp_path, capsys):
    assert cli.main(_maps_args(FIXTURES / "vit", images[1:], tmp_path / "o")) == 0
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("markov-attn: warning: ")]
    assert "preprocessor_config.json" in line and "mean=(0.5, 0.5, 0.5)" in line


def test_unsupported_preprocessor_config(images, tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    for f in ("model.safetensors", "config.json"):
        (d / f).write_bytes((FIXTURES / "vit" / f).read_bytes())
    (d / "preprocessor_config.json").write_text(json.dumps({"rescale_factor": 1.0}))
    msg = _one_line_error(_maps_args(d, images[1:], tmp_path / "o"))
    assert "rescale_factor=1.0" in msg and "preprocess the images yourself" in msg


def test_maps_metastable_states(images, tmp_path, capsys):
    out = tmp_path / "ms"
    base = ["maps", "--checkpoint", str(FIXTURES / "vit"), "--image", images[1], "--out"]
    assert cli.main([*base, str(out), "--method", "metastable", "--states", "2"]) == 0
    assert _is_png(out / "img1_metastable.png")
    (s,) = json.loads((out / "stats.json").read_text())
    assert s["states"] == 2 and s["states_chosen_by"] == "given"
    printed = capsys.readouterr().out
    assert "2 metastable states (given)" in printed
    # The fixture's random-weight chain is nearly rank one (|λ2| ≈ |λ3| ≈ 2e-4): k = 2 has no
    # modulus gap, and float32 rounding decides whether its Ritz values there are a complex
    # pair (NaN states, said so) or two real values (states, not converged). Both are reported.
    if s["metastability"] is None:  # null in the JSON
        assert s["state_sizes"] == [0, 0] and "would split a complex-conjugate pair" in printed
        assert "choose another --states" in printed
    else:
        assert sum(s["state_sizes"]) == 16 and 0 < s["metastability"] <= 2 + 1e-5
    assert s["converged"] or "did NOT converge" in printed
    auto = tmp_path / "auto"
    assert cli.main([*base, str(auto), "--method", "metastable", "--no-progress"]) == 0
    (s,) = json.loads((auto / "stats.json").read_text())
    # a nearly rank-one chain has no gap to choose k by: said on stderr and in the stats
    assert 2 <= s["states"] <= 10
    assert (
        s["states_chosen_by"]
        == "chosen by the eigenvalue gap, which does not stand out: pass --states"
    )
    assert "markov-attn: warning: metastable_states(k=None)" in capsys.readouterr().err
    # k=None skips a k that cuts a pair of every matrix (here the only one), so there are states
    assert sum(s["state_sizes"]) == 16 and 0 < s["metastability"] <= s["states"] + 1e-5
    with pytest.raises(SystemExit, match=r"--states must lie in \[2, 15\]"):
        cli.main([*base, str(tmp_path / "bad"), "--method", "metastable", "--states", "1"])


def test_sixteen_bit_images_are_scaled_not_clipped(images, tmp_path):
    """A 16-bit greyscale PNG is scaled to 8 bits (PIL's convert("RGB") clipped it to white)."""
    from markov_attn.checkpoints._preprocess import to_rgb

    a = (np.random.default_rng(0).random((16, 16)) * 65535).astype(np.uint16)
    p = tmp_path / "deep.png"
    Image.fromarray(a).save(p)
    with Image.open(p) as im:
        assert im.mode.startswith("I;16")
        rgb = np.asarray(to_rgb(im), np.float64)
    np.testing.assert_allclose(rgb[..., 0], a / 257.0, atol=0.5)
    with pytest.raises(ValueError, match="no known range"):
        to_rgb(Image.fromarray(a.astype(np.float32)))
    out = tmp_path / "o"
    cli.main(_maps_args(FIXTURES / "vit", [str(p)], out))
    assert any(_is_png(f) for f in out.glob("*.png"))


def test_garbage_pth_and_out_below_a_file_are_one_line_errors(images, tmp_path):
    bad = tmp_path / "x.pth"
    bad.write_text("garbage\n")
    _one_line_error(_maps_args(bad, images[1:], tmp_path / "o"))
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    msg = _one_line_error(_maps_args(FIXTURES / "vit", images[1:], blocker / "sub"))
    assert "cannot create --out" in msg


def test_a_refusal_for_a_model_without_cls_leaves_no_output_directory(images, tmp_path):
    from flax import nnx

    from markov_attn.nn import ViT, ViTConfig, config_to_dict, write_weights

    cfg = ViTConfig(image_size=16, patch_size=4, width=16, depth=1, num_heads=2, mlp_dim=32,
                    cls_token=False, pool="mean")  # fmt: skip
    run = {"model": config_to_dict(cfg)}
    weights = write_weights(ViT(cfg, rngs=nnx.Rngs(0)), run, tmp_path / "w.npz")
    out = tmp_path / "o"
    msg = _one_line_error(_maps_args(weights, images[1:], out, "--method", "cls"))
    assert "CLS" in msg
    assert not out.exists()


def test_states_out_of_range_is_refused_before_out_is_created(images, tmp_path):
    out = tmp_path / "o"
    argv = _maps_args(FIXTURES / "vit", images[1:], out, "--method", "metastable", "--states", "1")
    assert "--states must lie" in _one_line_error(argv)
    assert not out.exists()


def test_mode_i_images_are_read_by_their_range():
    from markov_attn.checkpoints._preprocess import to_rgb

    deep = Image.fromarray(np.full((4, 4), 40000, np.int32), "I")
    np.testing.assert_array_equal(np.asarray(to_rgb(deep))[..., 0], round(40000 / 257))
    flat = Image.fromarray(np.full((4, 4), 200, np.int32), "I")
    np.testing.assert_array_equal(np.asarray(to_rgb(flat))[..., 0], 200)
    with pytest.raises(ValueError, match="no known range"):
        to_rgb(Image.fromarray(np.full((4, 4), -5, np.int32), "I"))
    dark = Image.fromarray(np.full((4, 4), 200, np.int32), "I")
    dark.format = "PNG"  # as older Pillow opens a 16-bit PNG: always 16-bit, dark or not
    np.testing.assert_array_equal(np.asarray(to_rgb(dark))[..., 0], round(200 / 257))


@pytest.mark.parametrize("crop,states,ok", [(32, 20, True), (8, 5, False)])
def test_states_are_checked_against_the_prepared_image(images, tmp_path, crop, states, ok):
    """The early --states check counts the patches of the image as the checkpoint's
    preprocessing crops it, not of the position-embedding grid (16 patches here)."""
    import shutil

    ck = tmp_path / "dino"
    shutil.copytree(FIXTURES / "dinov2", ck)
    (ck / "preprocessor_config.json").write_text(json.dumps({
        "do_center_crop": True, "crop_size": {"height": crop, "width": crop},
        "size": {"shortest_edge": crop}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
    }))  # fmt: skip
    out = tmp_path / "o"
    argv = _maps_args(ck, images[:1], out, "--method", "metastable", "--states", str(states))
    if ok:
        assert cli.main(argv) == 0
        assert json.loads((out / "stats.json").read_text())[0]["states"] == states
    else:
        assert "--states must lie in [2, 3]" in _one_line_error(argv)
        assert not out.exists()


def test_a_missing_extra_is_one_line_and_other_import_errors_are_not_hidden(monkeypatch):
    from markov_attn import cli
    from markov_attn._util import MissingExtraError

    def raising(err):
        def command(args):
            raise err

        return command

    argv = ["maps", "--checkpoint", "x", "--image", "y.png"]
    monkeypatch.setattr(cli, "maps_command", raising(ModuleNotFoundError("x", name="PIL.Image")))
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert str(info.value) == "markov-attn: error: needs PIL; pip install 'markov_attn[cli]'"
    extra = MissingExtraError("markov_attn.nn needs flax: pip install 'markov_attn[nn]'")
    monkeypatch.setattr(cli, "maps_command", raising(extra))
    with pytest.raises(SystemExit, match=r"needs flax: pip install 'markov_attn\[nn\]'"):
        cli.main(argv)
    # a real bug (a missing name, a module of this package) is not dressed up as an install
    bug = ImportError("cannot import name 'gone' from 'markov_attn.segmentation'")
    monkeypatch.setattr(cli, "maps_command", raising(bug))
    with pytest.raises(ImportError, match="gone"):
        cli.main(argv)
    own = ModuleNotFoundError("x", name="markov_attn.missing")
    monkeypatch.setattr(cli, "maps_command", raising(own))
    with pytest.raises(ModuleNotFoundError):
        cli.main(argv)


def test_a_bad_npz_weights_file_is_a_one_line_error(images, tmp_path):
    """A truncated .npz raised BadZipFile, a bare .npy under a .npz name a TypeError, and a
    text file got numpy's advice to load it with allow_pickle (review)."""
    data = (ROOT / "experiments" / "reference" / "vit_reference.npz").read_bytes()
    cases = {
        "trunc.npz": data[:3000],
        "text.npz": b"x\n",
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    np.save(tmp_path / "arr.npy", np.zeros(3))
    (tmp_path / "arr.npz").write_bytes((tmp_path / "arr.npy").read_bytes())
    for name in (*cases, "arr.npz"):
        msg = _one_line_error(_maps_args(tmp_path / name, images[1:], tmp_path / "o"))
        assert "is not a weights file written by markov_attn.nn.write_weights" in msg, msg
        assert "allow_pickle" not in msg
    msg = _one_line_error(_maps_args(tmp_path / "arr.npy", images[1:], tmp_path / "o"))
    assert "unsupported extension" in msg and ".npz weights file" in msg


def test_bad_preprocessor_values_are_one_line_errors(images, tmp_path):
    """A zero std gave NaN attention (a traceback from second_eigenvalue), a string mean a
    float error, two means a broadcasting error blamed on the image, and a zero size or a JSON
    list were taken silently (review)."""
    import shutil

    cases = [
        ({"image_std": [0, 0, 0]}, "image_std"),
        ({"image_mean": "x"}, "image_mean"),
        ({"image_mean": [0.5, 0.5]}, "image_mean"),
        ({"size": {"height": 0, "width": 0}}, "size"),
        ({"do_center_crop": True, "crop_size": "big"}, "not a number of pixels"),
        ([], "JSON list"),
    ]
    for i, (pre, word) in enumerate(cases):
        d = tmp_path / f"ck{i}"
        shutil.copytree(FIXTURES / "vit", d)
        (d / "preprocessor_config.json").write_text(json.dumps(pre))
        msg = _one_line_error(_maps_args(d, images[1:], tmp_path / "o"))
        assert word in msg and "preprocessor_config.json" in msg, msg


def test_metastable_on_too_few_tokens_and_misplaced_options(images, tmp_path):
    """--method metastable at --size 8 (one patch token) raised a k_range traceback after
    creating --out; --states with another method was silently ignored; a directory given as
    an image was reported as missing (review)."""
    ref = ROOT / "experiments" / "reference" / "vit_reference.npz"
    out = tmp_path / "o"
    msg = _one_line_error(_maps_args(ref, images[1:], out, "--method", "metastable", "--size", "8"))
    assert "at least 3 patch tokens" in msg and not out.exists()
    msg = _one_line_error(_maps_args(ref, images[1:], out, "--method", "bounce", "--states", "3"))
    assert "--states applies to --method metastable only" in msg
    msg = _one_line_error(_maps_args(ref, [str(tmp_path)], out))
    assert "is a directory" in msg


def test_an_unsupported_pixel_format_is_refused_before_any_output(images, tmp_path):
    """A float TIFF after a good image: the first overlay was written, then the command
    failed without stats.json, and a rerun needed --overwrite (review)."""
    from PIL import Image

    bad = tmp_path / "float.tiff"
    Image.fromarray(np.ones((16, 16), np.float32), mode="F").save(bad)
    out = tmp_path / "o"
    msg = _one_line_error(_maps_args(FIXTURES / "vit", [images[1], str(bad)], out))
    assert "float.tiff" in msg and "no known range" in msg
    assert not out.exists()


def test_a_bad_image_size_in_config_json_is_named(images, tmp_path):
    """config.json's image_size 0 was blamed on preprocessor_config.json (or "the family
    defaults"), and [224, 224] raised a TypeError (review)."""
    import shutil

    for size, word in ((0, "image_size = 0"), ("x", "image_size = 'x'")):
        d = tmp_path / f"ck{size}"
        shutil.copytree(FIXTURES / "vit", d)
        cfg = json.loads((d / "config.json").read_text())
        cfg["image_size"] = size
        (d / "config.json").write_text(json.dumps(cfg))
        msg = _one_line_error(_maps_args(d, images[1:], tmp_path / "o"))
        assert "config.json" in msg and word in msg, msg
