"""Tests for markov_attn.data: IDX loader, segmentation benchmark generator, reference maps.

Most generator tests run on a tiny synthetic Fashion-MNIST written to a temporary directory
(hermetic and fast, with shapes whose silhouettes are known exactly); two tests use the real
data set from the Debian package ``dataset-fashion-mnist`` (installed by ``make test``).
"""

import gzip

import numpy as np
import pytest

from markov_attn import data
from markov_attn.data import (
    DataMissingError,
    SegBench,
    _segbench,
    centre_prior,
    load_fashion_mnist,
    make_split,
    oracle_map,
)


def _idx_bytes(arr: np.ndarray) -> bytes:
    arr = np.asarray(arr, np.uint8)
    header = bytes([0, 0, 8, arr.ndim]) + np.asarray(arr.shape, ">u4").tobytes()
    return header + arr.tobytes()


def _write_split(root, prefix: str, images, labels, *, gz: bool) -> None:
    for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
        raw = _idx_bytes(arr)
        path = root / f"{prefix}-{kind}-ubyte"
        if gz:
            with gzip.open(str(path) + ".gz", "wb") as f:
                f.write(raw)
        else:
            path.write_bytes(raw)


def _shapes() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Synthetic 28x28 objects and their expected holes-filled silhouettes."""
    out = {}
    ring = np.zeros((28, 28), np.uint8)
    ring[4:24, 4:24] = 200
    ring[8:20, 8:20] = 0  # a hole: filled in the silhouette
    sil = np.zeros((28, 28), bool)
    sil[4:24, 4:24] = True
    out["ring"] = ring, sil
    cup = ring.copy()
    cup[0:8, 10:18] = 0  # opens the ring to the border: a bay, not a hole
    cup[8:20, 8:20] = 0
    sil_cup = cup > 16
    out["cup"] = cup, sil_cup
    full = np.full((28, 28), 255, np.uint8)
    out["full"] = full, np.ones((28, 28), bool)
    return out


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    """A Fashion-MNIST directory with 3 train objects (labels 0-2, plain IDX) and 3 test
    objects (labels 7-9, gzipped)."""
    root = tmp_path_factory.mktemp("fmnist")
    imgs = np.stack([img for img, _ in _shapes().values()])
    _write_split(root, "train", imgs, np.array([0, 1, 2]), gz=False)
    _write_split(root, "t10k", imgs, np.array([7, 8, 9]), gz=True)
    return root


# --------------------------------------------------------------------------- loader


def test_loader_reads_plain_and_gzipped_idx(fake_root):
    imgs = np.stack([img for img, _ in _shapes().values()])
    x, y = load_fashion_mnist("train", root=fake_root)
    assert x.dtype == np.uint8 and x.shape == (3, 28, 28)
    assert y.dtype == np.int64 and y.tolist() == [0, 1, 2]
    np.testing.assert_array_equal(x, imgs)
    xt, yt = load_fashion_mnist("test", root=str(fake_root))  # .gz files
    np.testing.assert_array_equal(xt, imgs)
    assert yt.tolist() == [7, 8, 9]


def test_loader_env_var(fake_root, monkeypatch):
    monkeypatch.setenv(data._fashion_mnist.ENV_VAR, str(fake_root))
    _, y = load_fashion_mnist("test")
    assert y.tolist() == [7, 8, 9]


def test_loader_missing_says_how_to_install(tmp_path):
    for root in (tmp_path / "does-not-exist", tmp_path):  # no directory / no files
        with pytest.raises(DataMissingError) as err:
            load_fashion_mnist("train", root=root)
        assert isinstance(err.value, FileNotFoundError)
        msg = str(err.value)
        assert "apt-get install dataset-fashion-mnist" in msg
        assert "root=" in msg and "MARKOV_ATTN_FASHION_MNIST" in msg


def test_loader_bad_split(fake_root):
    with pytest.raises(ValueError, match="'train' or 'test'"):
        load_fashion_mnist("val", root=fake_root)


@pytest.mark.parametrize("damage", ["magic", "truncated", "gzip", "count"])
def test_loader_corrupt_file_names_the_file(tmp_path, damage):
    imgs = np.zeros((2, 28, 28), np.uint8)
    _write_split(tmp_path, "train", imgs, np.array([1, 2]), gz=False)
    target = tmp_path / "train-images-idx3-ubyte"
    raw = target.read_bytes()
    if damage == "magic":
        target.write_bytes(b"\x00\x00\x09\x03" + raw[4:])
    elif damage == "truncated":
        target.write_bytes(raw[:-100])
    elif damage == "gzip":
        target.unlink()
        target = tmp_path / "train-images-idx3-ubyte.gz"
        target.write_bytes(gzip.compress(raw)[:-20])
    else:
        target = tmp_path / "train-labels-idx1-ubyte"
        target.write_bytes(_idx_bytes(np.array([1, 2, 3])))
    with pytest.raises(ValueError, match=target.name if damage != "count" else "3 labels"):
        load_fashion_mnist("train", root=tmp_path)


# --------------------------------------------------------------------------- silhouettes


def test_silhouettes_fill_holes_not_bays():
    shapes = _shapes()
    sils = _segbench._fill_holes(np.stack([img for img, _ in shapes.values()]))
    for got, (_, expected) in zip(sils, shapes.values()):
        np.testing.assert_array_equal(got, expected)


# --------------------------------------------------------------------------- generator


def test_make_split_shapes_dtypes_ranges(fake_root):
    for size in (32, 64):
        out = make_split("test", 5, size=size, root=fake_root, alpha=True)
        assert out["images"].shape == (5, size, size, 3) and out["images"].dtype == np.float32
        assert out["masks"].shape == (5, size, size) and out["masks"].dtype == np.bool_
        assert out["labels"].shape == (5,) and out["labels"].dtype == np.int32
        assert out["alpha"].shape == (5, size, size) and out["alpha"].dtype == np.float32
        assert 0.0 <= out["images"].min() and out["images"].max() <= 1.0
        assert 0.0 <= out["alpha"].min() and out["alpha"].max() <= 1.0
        assert np.isfinite(out["images"]).all()
    assert set(make_split("train", 8, root=fake_root).keys()) == {"images", "masks", "labels"}


def test_make_split_deterministic_per_index(fake_root):
    a = make_split("test", 6, root=fake_root, alpha=True)
    b = make_split("test", 6, root=fake_root, alpha=True)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    # sample i does not depend on the batch it is generated in
    c = make_split("test", 2, start=3, root=fake_root)
    np.testing.assert_array_equal(c["images"], a["images"][3:5])
    np.testing.assert_array_equal(c["masks"], a["masks"][3:5])
    # different indices, seeds and splits give different images
    imgs = a["images"].reshape(6, -1)
    assert all(not np.array_equal(imgs[i], imgs[j]) for i in range(6) for j in range(i))
    other_seed = make_split("test", 6, seed=1, root=fake_root)["images"]
    assert not np.array_equal(other_seed, a["images"])
    train = make_split("train", 6, root=fake_root)["images"]
    assert not np.array_equal(train, a["images"])


def test_segbench_matches_make_split(fake_root):
    bench = SegBench("test", root=fake_root)
    ref = make_split("test", 4, root=fake_root)
    image, mask, label = bench[2]
    np.testing.assert_array_equal(image, ref["images"][2])
    np.testing.assert_array_equal(mask, ref["masks"][2])
    assert label == ref["labels"][2] and isinstance(label, int)
    np.testing.assert_array_equal(bench.batch(1, 3)["images"], ref["images"][1:4])
    with pytest.raises(TypeError, match="n="):
        len(bench)
    with pytest.raises(IndexError):
        bench[-1]
    sized = SegBench("test", n=4, root=fake_root)
    assert len(sized) == 4 and len(list(sized)) == 4
    np.testing.assert_array_equal(sized[-1][0], ref["images"][3])
    with pytest.raises(IndexError):
        sized[4]


def test_mask_is_alpha_of_object(fake_root):
    n = 24
    out = _segbench._generate("test", 0, n, 64, 0, fake_root, alpha=True, meta=True)
    np.testing.assert_array_equal(out["masks"], out["alpha"] > 0.5)
    for i, info in enumerate(out["meta"]):
        obj, side, y, x = info["object"], info["side"], info["y"], info["x"]
        assert 29 <= side <= 45 and 0 <= y <= 64 - side and 0 <= x <= 64 - side
        assert out["labels"][i] == [7, 8, 9][obj]
        mask = out["masks"][i]
        ys, xs = np.nonzero(mask)
        # nothing of the mask outside the object's box
        assert ys.min() >= y and ys.max() < y + side and xs.min() >= x and xs.max() < x + side
        name = list(_shapes())[obj]
        if name == "full":  # the object fills its box: the mask is exactly the box
            assert mask.sum() == side * side
        if name == "ring":  # the hole is filled: a solid square of side 20/28 of the box
            box = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
            assert box[1:-1].all() and box[:, 1:-1].all()  # bilinear may round the corners
            assert abs(box.shape[0] - side * 20 / 28) <= 1.5
        if name == "cup":  # the bay stays open: background inside the bounding box
            box = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
            assert not box.all()
            expected = _shapes()["cup"][1].mean() * side * side
            assert abs(mask.sum() - expected) < 0.2 * expected  # 4 px bands quantise
    assert {info["object"] for info in out["meta"]} == {0, 1, 2}


def test_object_is_composited_where_the_mask_is(fake_root):
    # the "full" object (index 2) is opaque with constant intensity: where its alpha is 1,
    # an uncamouflaged one shows a single colour, whatever the background and distractors
    out = _segbench._generate("test", 0, 40, 64, 0, fake_root, alpha=True, meta=True)
    colour_full = [i for i, m in enumerate(out["meta"]) if m["object"] == 2 and not m["camo"]]
    assert colour_full, "no uncamouflaged 'full' object in 40 samples"
    for i in colour_full:
        inside = out["images"][i][out["alpha"][i] > 0.9999]
        assert inside.shape[0] > 0
        np.testing.assert_allclose(inside, np.broadcast_to(inside[0], inside.shape), atol=1e-6)


def test_train_and_test_backgrounds_are_disjoint(fake_root):
    assert set(data.TRAIN_PHOTOS).isdisjoint(data.TEST_PHOTOS)
    assert len(data.TRAIN_PHOTOS) >= 10 and len(data.TEST_PHOTOS) >= 4
    assert data.PHOTO_SPLITS == {"train": data.TRAIN_PHOTOS, "test": data.TEST_PHOTOS}
    for split in ("train", "test"):
        out = _segbench._generate(split, 0, 30, 64, 0, fake_root, alpha=False, meta=True)
        used = {data.PHOTO_SPLITS[split][m["background"]] for m in out["meta"]}
        assert used <= set(data.PHOTO_SPLITS[split]) and len(used) >= 3
    # test labels come from the test objects
    assert set(make_split("test", 20, root=fake_root)["labels"].tolist()) <= {7, 8, 9}
    assert set(make_split("train", 20, root=fake_root)["labels"].tolist()) <= {0, 1, 2}


def test_photos_are_cached_float32():
    test_photos = data.photos("test")
    assert tuple(test_photos) == data.TEST_PHOTOS
    for img in test_photos.values():
        assert img.dtype == np.float32 and img.ndim == 3 and img.shape[2] == 3
        assert min(img.shape[:2]) >= 192 and 0 <= img.min() and img.max() <= 1
        assert not img.flags.writeable
    assert data.photos("test") is test_photos
    with pytest.raises(ValueError, match="'train' or 'test'"):
        data.photos("val")


def test_bad_arguments(fake_root):
    with pytest.raises(ValueError, match="'train' or 'test'"):
        make_split("validation", 2, root=fake_root)
    with pytest.raises(ValueError, match="size"):
        make_split("test", 2, size=8, root=fake_root)
    with pytest.raises(ValueError, match=">= 0"):
        make_split("test", 2, start=-1, root=fake_root)
    with pytest.raises(DataMissingError):
        make_split("test", 2, root=fake_root / "missing")


def test_real_benchmark_statistics():
    """On the real Fashion-MNIST test split: foreground share and class coverage as designed."""
    out = make_split("test", 400)
    fg = out["masks"].mean()
    assert 0.13 < fg < 0.20, fg
    assert set(out["labels"].tolist()) == set(range(10))
    per_image = out["masks"].mean(axis=(1, 2))
    assert per_image.min() > 0.02  # every image has an object
    # no gross brightness cue: object and background pixels have similar mean intensity
    img = out["images"]
    assert abs(img[out["masks"]].mean() - img[~out["masks"]].mean()) < 0.15


def test_real_loader_sizes():
    x, y = load_fashion_mnist("test")
    assert x.shape == (10000, 28, 28) and y.shape == (10000,)
    assert np.bincount(y).tolist() == [1000] * 10
    assert not x.flags.writeable


# --------------------------------------------------------------------------- reference maps


def test_oracle_map_hand_made():
    m = np.zeros((2, 8, 8), bool)
    m[0, :4, :4] = True  # top-left patch of a 2x2 grid, fully
    m[1, 0, :] = True  # one row: 1/4 of the top two patches
    got = oracle_map(m, 2)
    assert got.dtype == np.float32 and got.shape == (2, 2, 2)
    np.testing.assert_array_equal(got[0], [[1, 0], [0, 0]])
    np.testing.assert_array_equal(got[1], [[0.25, 0.25], [0, 0]])
    np.testing.assert_array_equal(oracle_map(m, grid=8), m.astype(np.float32))
    np.testing.assert_allclose(oracle_map(m[:, None], 4)[:, 0], oracle_map(m, 4))
    np.testing.assert_allclose(oracle_map(m, 1)[:, 0, 0], m.mean(axis=(1, 2)))
    with pytest.raises(ValueError, match="multiple of grid"):
        oracle_map(m, 3)


def test_centre_prior():
    for size, grid in ((64, 8), (64, 16), (224, 14)):
        p = centre_prior(size, grid)
        assert p.shape == (grid, grid) and p.dtype == np.float32
        np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-6)
        assert (p > 0).all()
        np.testing.assert_allclose(p, p.T)
        np.testing.assert_allclose(p, p[::-1, ::-1])
        c = grid // 2
        assert p[c, c] == p.max() and p[0, 0] == p.min()
    # a float64 reference
    r = (np.arange(8) + 0.5) * 8 - 32
    ref = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * 10.0**2))
    np.testing.assert_allclose(centre_prior(64, 8, sigma=10.0), ref / ref.sum(), rtol=1e-5)
    assert centre_prior(64, 8, sigma=4.0).max() > centre_prior(64, 8).max()
    with pytest.raises(ValueError, match="sigma"):
        centre_prior(64, 8, sigma=0.0)


def test_multi_object_split_masks_and_determinism():
    from markov_attn.data import make_multi_split

    d = make_multi_split("test", 12, size=32)
    e = make_multi_split("test", 4, size=32, start=8)
    np.testing.assert_array_equal(d["images"][8:], e["images"])
    np.testing.assert_array_equal(d["instances"][8:], e["instances"])
    assert d["images"].shape == (12, 32, 32, 3) and d["instances"].dtype == np.uint8
    assert np.all((d["num_objects"] >= 2) & (d["num_objects"] <= 4))
    for i in range(12):
        m = d["num_objects"][i]
        assert np.all(d["labels"][i, :m] >= 0) and np.all(d["labels"][i, m:] == -1)
        assert d["instances"][i].max() <= m
        for j in range(4):
            assert d["visible"][i, j] == (d["instances"][i] == j + 1).sum()
    train = make_multi_split("train", 2, size=32)
    assert not np.array_equal(train["images"], d["images"][:2])
    with pytest.raises(ValueError, match="objects"):
        make_multi_split("test", 1, objects=(3, 2))


# --------------------------------------------------------------------------- difficulty levels


def test_difficulty_levels_are_paired_and_do_what_they_say(fake_root):
    n = 60
    runs = {
        name: _segbench._generate(
            "test", 0, n, 64, 0, fake_root, alpha=False, meta=True, difficulty=name
        )
        for name in data.DIFFICULTIES
    }
    std, plain, clutter = runs["standard"], runs["plain"], runs["clutter"]
    # paired: the same object (so label), photo and mirroring in every level
    for other in (plain, clutter):
        np.testing.assert_array_equal(other["labels"], std["labels"])
        for a, b in zip(std["meta"], other["meta"]):
            keys = ("object", "background", "flip")
            assert [a[k] for k in keys] == [b[k] for k in keys]
    # the default is the standard level, bit for bit
    default = make_split("test", n, root=fake_root)
    np.testing.assert_array_equal(default["images"], std["images"])
    # plain: no camouflage, no blobs; standard: 0-3 blobs, both fills occur
    assert not any(m["camo"] for m in plain["meta"]) and {m["blobs"] for m in plain["meta"]} == {0}
    assert {m["blobs"] for m in std["meta"]} == {0, 1, 2, 3}
    assert 0 < sum(m["camo"] for m in std["meta"]) < n
    # clutter: 4-8 blobs (past the 3 fixed slots), smaller objects (22-34 px)
    assert {m["blobs"] for m in clutter["meta"]} <= set(range(4, 9))
    assert max(m["blobs"] for m in clutter["meta"]) > 3
    assert all(22 <= m["side"] <= 34 for m in clutter["meta"])
    assert clutter["masks"].mean() < std["masks"].mean()
    # a level is a value: SegBench carries it, and a custom Difficulty works
    bench = SegBench("test", n=n, root=fake_root, difficulty="clutter")
    np.testing.assert_array_equal(bench.batch(5, 3)["images"], clutter["images"][5:8])
    assert "clutter" in repr(bench)
    custom = make_split("test", 4, root=fake_root, difficulty=data.Difficulty(blobs=(9, 9)))
    assert custom["images"].shape == (4, 64, 64, 3)


def test_difficulty_bad_values(fake_root):
    with pytest.raises(ValueError, match="difficulty must be one of"):
        make_split("test", 2, root=fake_root, difficulty="hard")
    with pytest.raises(ValueError, match="difficulty must be one of"):
        SegBench("test", root=fake_root, difficulty="easy")
    with pytest.raises(ValueError, match="camouflage"):
        data.Difficulty(camouflage=1.5)
    with pytest.raises(ValueError, match="blobs"):
        data.Difficulty(blobs=(3, 1))
    with pytest.raises(ValueError, match="object_side"):
        data.Difficulty(object_side=(40.0, 80.0))


def test_a_crop_larger_than_the_photo_does_not_wrap_around():
    """An output side above the photo's shorter side: the crop is the photo's full height,
    upsampled (it started above the top and wrapped the bottom rows over it)."""
    from markov_attn.data._photos import _random_crop

    h, w = 10, 14
    grad = np.repeat(np.arange(h, dtype=np.uint8)[:, None, None] * 20, w, 1).repeat(3, 2)
    for u in ([0.99, 0.99, 0.5, 0.9], [0.5, 0.0, 0.3, 0.9], [0.0, 0.7, 0.99, 0.1]):
        out = _random_crop(np.asarray(u), (grad,) * 8, 16, 16)
        col = out[:, 0, 0]
        assert np.all(np.diff(col) >= 0), col  # top to bottom of the photo, no seam
        assert col[0] == 0.0 and col[-1] == np.float32((h - 1) * 20 / 255)
