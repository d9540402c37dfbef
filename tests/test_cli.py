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
    with pytest.raises(SystemExit):  # argparse: unknown method
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
