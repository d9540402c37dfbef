"""Tests for markov_attn.segmentation: protocol, metrics (vs scikit-learn), map methods, loader."""

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import average_precision_score, confusion_matrix

from markov_attn import segmentation as seg

# ----------------------------------------------------------------------------- protocol


def test_minmax_and_constant_maps():
    rng = np.random.default_rng(0)
    m = rng.normal(size=(3, 4, 5)).astype(np.float32)
    out = np.asarray(seg.minmax(m))
    lo = m.min(axis=(1, 2), keepdims=True)
    hi = m.max(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(out, (m - lo) / (hi - lo), rtol=1e-6, atol=1e-6)
    const = np.asarray(seg.minmax(np.full((2, 3, 3), 4.0)))
    assert np.all(const == 0.0)
    assert np.all(np.isfinite(const))


def test_upsample_nearest_matches_repeat():
    rng = np.random.default_rng(1)
    m = rng.random((2, 3, 4)).astype(np.float32)
    up = np.asarray(seg.upsample(m, size=(12, 8)))
    np.testing.assert_array_equal(up, np.repeat(np.repeat(m, 4, axis=1), 2, axis=2))
    # non-integer factor: PyTorch nearest (floor(y * gh / H))
    up2 = np.asarray(seg.upsample(m, size=(5, 7)))
    rows, cols = (np.arange(5) * 3) // 5, (np.arange(7) * 4) // 7
    np.testing.assert_array_equal(up2, m[:, rows][:, :, cols])
    assert seg.upsample(m, size=(6, 8), method="bilinear").shape == (2, 6, 8)
    with pytest.raises(ValueError, match="method"):
        seg.upsample(m, size=(6, 8), method="cubic")


def test_threshold_options():
    m = jnp.array([[0.0, 0.1], [0.2, 1.0]])
    np.testing.assert_array_equal(seg.threshold(m), [[False, False], [False, True]])
    np.testing.assert_array_equal(seg.threshold(m, thresh=0.15), [[False, False], [True, True]])
    np.testing.assert_array_equal(seg.threshold(m, thresh="median"), [[False, False], [True, True]])
    with pytest.raises(ValueError, match="threshold"):
        seg.threshold(m, thresh="otsu")
    scores, mask = seg.map_to_mask(jnp.full((2, 2), 3.0), size=(4, 4))
    assert not bool(mask.any()) and float(scores.max()) == 0.0


# ----------------------------------------------------------------------------- metrics


def test_average_precision_matches_sklearn_with_ties():
    rng = np.random.default_rng(2)
    scores = np.round(rng.random((6, 200)), 1).astype(np.float32)  # many ties
    targets = rng.random((6, 200)) < np.linspace(0.05, 0.6, 6)[:, None]
    got = np.asarray(seg.average_precision(scores, targets))
    want = [average_precision_score(t, s) for s, t in zip(scores, targets)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # batching: vmap == broadcast, jit == eager
    got_v = jax.vmap(seg.average_precision)(scores, targets)
    np.testing.assert_allclose(got_v, got, rtol=1e-6)
    # no positives: defined as 0, not NaN
    assert float(seg.average_precision(scores[0], np.zeros(200, bool))) == 0.0


def test_hand_computed_confusion():
    # 2x2 token map on a 4x4 image: tokens (0,0) and (1,1) high, mean 0.5 -> both predicted.
    m = jnp.array([[[0.9, 0.1], [0.1, 0.9]]])
    gt = np.zeros((1, 4, 4), bool)
    gt[0, :2, :] = True  # top half is the object
    st = seg.image_stats(m, gt)
    # predicted: top-left and bottom-right 2x2 blocks
    assert [int(v[0]) for v in (st.tp, st.fp, st.fn, st.tn)] == [4, 4, 4, 4]
    pred = np.zeros((4, 4), bool)
    pred[:2, :2] = pred[2:, 2:] = True
    tn, fp, fn, tp = confusion_matrix(gt[0].ravel(), pred.ravel()).ravel()
    assert (tp, fp, fn, tn) == (4, 4, 4, 4)
    r = seg.summarize(st)
    assert r["pixel_acc"] == 0.5
    assert r["iou_fg"] == pytest.approx(4 / 12) and r["iou_bg"] == pytest.approx(4 / 12)
    assert r["miou"] == pytest.approx(1 / 3)
    # AP: threshold 1 (8 px, 4 positive) then 0 (all): 0.5 * 0.5 + 0.5 * 0.5
    assert r["map"] == pytest.approx(0.5)


def _reference_metrics(maps, masks):
    """NumPy/scikit-learn reference of the protocol (integer upsampling factors)."""
    _, gh, gw = maps.shape
    fh, fw = masks.shape[1] // gh, masks.shape[2] // gw
    cm = np.zeros((2, 2), np.int64)
    aps, ap2 = [], []
    for m, y in zip(maps, masks):  # float32 like the code under test (ties in 1 - map)
        span = m.max() - m.min()
        m = (m - m.min()) / span if span > 0 else np.zeros_like(m)
        up = np.repeat(np.repeat(m, fh, axis=0), fw, axis=1)
        pred = up > up.mean()
        cm += confusion_matrix(y.ravel(), pred.ravel(), labels=[0, 1])
        if y.any():
            aps.append(average_precision_score(y.ravel(), up.ravel()))
        ap2.append(
            average_precision_score(
                np.concatenate([~y.ravel(), y.ravel()]),
                np.concatenate([1 - up.ravel(), up.ravel()]),
            )
        )
    (tn, fp), (fn, tp) = cm
    iou_fg, iou_bg = tp / (tp + fp + fn), tn / (tn + fp + fn)
    return {
        "pixel_acc": (tp + tn) / cm.sum(),
        "miou": (iou_fg + iou_bg) / 2,
        "iou_fg": iou_fg,
        "map": np.mean(aps),
        "map_2class": np.mean(ap2),
    }


def test_summary_matches_sklearn_reference():
    rng = np.random.default_rng(3)
    maps = rng.random((7, 4, 4)).astype(np.float32)
    maps[2] = 0.5  # a constant map
    masks = np.zeros((7, 16, 16), bool)
    for i in range(7):
        y0, x0 = rng.integers(0, 8, 2)
        masks[i, y0 : y0 + 7, x0 : x0 + 6] = True
    masks[5] = False  # an empty mask: left out of mAP
    got = seg.summarize(seg.image_stats(maps, masks))
    want = _reference_metrics(maps, masks)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-5), k
    assert got["n_images"] == 7
    assert all(np.isfinite(v) for v in got.values())


def test_image_stats_batching_jit_and_accumulator():
    rng = np.random.default_rng(4)
    maps = rng.random((3, 5, 4, 4)).astype(np.float32)  # (methods, images, gh, gw)
    masks = rng.random((5, 8, 8)) < 0.3
    st = seg.image_stats(maps, masks[None])
    assert st.tp.shape == (3, 5)
    for k in range(3):
        one = seg.image_stats(maps[k], masks)
        for a, b in zip(st, one):
            np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b), rtol=1e-6)
    acc = seg.SegAccumulator()
    acc.update(maps[0, :2], masks[:2])
    acc.update(maps[0, 2:], masks[2:])
    assert len(acc) == 5
    assert acc.summary() == seg.summarize(seg.image_stats(maps[0], masks))
    with pytest.raises(ValueError, match="same rank"):
        seg.image_stats(maps, masks)
    with pytest.raises(ValueError, match="one axis of images"):
        seg.summarize(st)


def test_token_path_equals_pixel_path_non_integer_factor():
    rng = np.random.default_rng(8)
    maps = np.round(rng.random((4, 3, 3)), 1).astype(np.float32)  # ties between tokens
    masks = rng.random((4, 8, 7)) < 0.4
    st = seg.image_stats(maps, masks)  # nearest: token-grid path
    scores, pred = seg.map_to_mask(maps, size=(8, 7))
    scores, pred = np.asarray(scores), np.asarray(pred)
    np.testing.assert_array_equal(st.tp, (pred & masks).sum(axis=(1, 2)))
    np.testing.assert_array_equal(st.fp, (pred & ~masks).sum(axis=(1, 2)))
    np.testing.assert_array_equal(st.fn, (~pred & masks).sum(axis=(1, 2)))
    want = [average_precision_score(y.ravel(), s.ravel()) for s, y in zip(scores, masks)]
    np.testing.assert_allclose(st.ap, want, rtol=1e-5)
    # the pixel path (median threshold) agrees on AP
    np.testing.assert_allclose(seg.image_stats(maps, masks, thresh="median").ap, want, rtol=1e-5)


def test_edge_cases_no_nan():
    masks = np.zeros((2, 8, 8), bool)  # no foreground anywhere
    maps = np.zeros((2, 2, 2), np.float32)  # constant maps
    st = seg.image_stats(maps, masks)
    assert not np.asarray(st.has_fg).any()
    r = seg.summarize(st)
    # nothing predicted, nothing there: perfect accuracy, empty-union IoU is 1, no mAP images
    assert r["pixel_acc"] == 1.0 and r["iou_fg"] == 1.0 and r["miou"] == 1.0
    assert r["map"] == 0.0
    assert all(np.isfinite(v) for v in r.values())
    ci = seg.bootstrap(st, n_resamples=20)
    assert all(np.isfinite(lo) and np.isfinite(hi) for lo, hi in ci.values())
    # constant map on a non-empty mask: empty prediction, AP = foreground fraction
    masks[0, :4, :4] = True
    st = seg.image_stats(maps, masks)
    assert int(st.tp[0]) == 0 and int(st.fn[0]) == 16
    assert float(st.ap[0]) == pytest.approx(16 / 64)


def test_bootstrap_intervals():
    rng = np.random.default_rng(5)
    maps = rng.random((40, 4, 4)).astype(np.float32)
    masks = rng.random((40, 8, 8)) < 0.3
    st = seg.image_stats(maps, masks)
    point = seg.summarize(st)
    ci = seg.bootstrap(st, n_resamples=300, seed=1)
    assert set(ci) == set(seg.METRICS)
    for k in ("miou", "map", "pixel_acc"):
        lo, hi = ci[k]
        assert lo < point[k] < hi
    assert ci == seg.bootstrap(st, n_resamples=300, seed=1)  # deterministic
    counts = seg.bootstrap_counts(40, n_resamples=300, seed=1)
    assert seg.bootstrap(st, counts=counts) == ci
    paired = seg.bootstrap(st, counts=counts, baseline=st)
    assert all(lo == hi == 0.0 for lo, hi in paired.values())
    with pytest.raises(ValueError, match="bootstrap_counts"):
        seg.bootstrap(st, counts=counts[:, :10])


# ----------------------------------------------------------------------------- .mat loader


def _write_gtsegs(path, images, masks):
    """Writes images/masks in the layout of gtsegs_ijcv.mat (MATLAB v7.3 cell arrays)."""
    with h5py.File(path, "w") as f:
        refs = f.create_group("#refs#")
        img_ds = f.create_dataset("value/img", (len(images), 1), dtype=h5py.ref_dtype)
        gt_ds = f.create_dataset("value/gt", (len(images), 1), dtype=h5py.ref_dtype)
        for i, (img, m) in enumerate(zip(images, masks)):
            stored = img.T  # MATLAB order: (H, W, C) -> (C, W, H); grayscale (H, W) -> (W, H)
            img_ds[i, 0] = refs.create_dataset(f"img{i}", data=stored).ref
            mask_ref = refs.create_dataset(f"mask{i}", data=m.astype(np.uint8).T).ref
            cell = refs.create_dataset(f"cell{i}", (1, 1), dtype=h5py.ref_dtype)
            cell[0, 0] = mask_ref
            gt_ds[i, 0] = cell.ref


def test_imagenet_seg_loader(tmp_path):
    rng = np.random.default_rng(6)
    images = [
        rng.integers(0, 256, (5, 7, 3), dtype=np.uint8),
        rng.integers(0, 256, (6, 4), dtype=np.uint8),  # grayscale
        rng.integers(0, 256, (9, 8, 3), dtype=np.uint8),
    ]
    masks = [rng.random(im.shape[:2]) < 0.4 for im in images]
    path = tmp_path / "gtsegs_ijcv.mat"
    _write_gtsegs(path, images, masks)
    with seg.ImageNetSeg(path) as ds:
        assert len(ds) == 3
        img, m = ds[0]
        np.testing.assert_array_equal(img, images[0])
        np.testing.assert_array_equal(m, masks[0])
        img1, _ = ds[1]
        assert img1.shape == (6, 4, 3)
        np.testing.assert_array_equal(img1[..., 2], images[1])
        np.testing.assert_array_equal(ds.mask(-1), masks[2])
        with pytest.raises(IndexError):
            ds[3]
    out = seg.load_imagenet_seg(path, size=(16, 12))
    assert out["images"].shape == (3, 16, 12, 3) and out["images"].dtype == np.float32
    assert out["masks"].shape == (3, 16, 12) and out["masks"].dtype == bool
    assert 0.0 <= out["images"].min() and out["images"].max() <= 1.0
    # nearest resizing of the mask to its own size is the identity
    same = seg.load_imagenet_seg(path, indices=[2], size=(9, 8))
    np.testing.assert_array_equal(same["masks"][0], masks[2])


def test_imagenet_seg_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="gtsegs_ijcv"):
        seg.ImageNetSeg(tmp_path / "missing.mat")
    bad = tmp_path / "bad.mat"
    with h5py.File(bad, "w") as f:
        f.create_dataset("x", data=np.zeros(3))
    with pytest.raises(ValueError, match="value/img"):
        seg.ImageNetSeg(bad)


# ----------------------------------------------------------------------------- map methods

B, L, H, GRID, P = 2, 2, 3, (3, 3), 1
N = P + GRID[0] * GRID[1]


@pytest.fixture(scope="module")
def stack():
    """A small model-like attention stack with its logits (CLS + 3x3 patches)."""
    logits = 2.0 * jax.random.normal(jax.random.key(7), (B, L, H, N, N))
    return jax.nn.softmax(logits, axis=-1), logits


_TESTED = {
    "cls_attn": seg.METHODS["cls_attn"],
    "column_sum": seg.METHODS["column_sum"],
    "rollout": seg.METHODS["rollout"],
    "bounce_fwd_1": seg.METHODS["bounce_fwd_1"],
    "bounce_fwd_3": seg.METHODS["bounce_fwd_3"],
    "bounce_rev_2": seg.METHODS["bounce_rev_2"],
    "tokenrank_in": seg.METHODS["tokenrank_in"],
    "tokenrank_out": seg.METHODS["tokenrank_out"],
    "bounce_fwd_1_patches": seg.MapMethod("bounce", steps=1, chain="patches"),
    "bounce_fwd_2_patches": seg.MapMethod("bounce", steps=2, chain="patches"),
    "bounce_fwd_2_l2": seg.METHODS["bounce_fwd_2_l2"],
    "tokenrank_in_last2": seg.MapMethod(
        "tokenrank", direction="in", chain="patches", layers=(-2, -1)
    ),
    "uniform_start": seg.MapMethod("bounce", steps=1, start="uniform"),
}


@pytest.fixture(scope="module")
def maps(stack):
    attn, logits = stack
    return seg.compute_maps(attn, _TESTED, num_prefix=P, grid=GRID, logits=logits)


def test_methods_shapes_and_normalisation(maps):
    assert set(maps) == set(_TESTED)
    for name, m in maps.items():
        m = np.asarray(m)
        assert m.shape == (B, *GRID) and m.dtype == np.float32, name
        assert np.all(np.isfinite(m)) and np.all(m >= 0), name
    # distributions over the patch chain sum to one
    for name in ("tokenrank_in", "tokenrank_out", "tokenrank_in_last2", "bounce_fwd_2_patches"):
        np.testing.assert_allclose(np.asarray(maps[name]).sum(axis=(1, 2)), 1.0, rtol=1e-5)


def test_methods_match_core_definitions(stack, maps):
    import markov_attn as ma

    attn, _ = stack
    a = np.asarray(attn, np.float64)
    last = a[:, -1].mean(axis=1)  # (B, N, N) head mean of the last layer
    flat = lambda x: np.asarray(x).reshape(B, -1)
    np.testing.assert_allclose(flat(maps["cls_attn"]), last[:, 0, P:], rtol=1e-5)
    np.testing.assert_allclose(flat(maps["column_sum"]), last.mean(axis=1)[:, P:], rtol=1e-5)
    # forward bounces from CLS with teleportation (alpha = 0.99), float64 reference
    x = np.zeros((B, N))
    x[:, 0] = 1.0
    for k in range(1, 4):
        x = np.einsum("bij,bi->bj", 0.99 * last + 0.01 / N, x)
        x /= x.sum(axis=1, keepdims=True)
        if k in (1, 3):
            np.testing.assert_allclose(flat(maps[f"bounce_fwd_{k}"]), x[:, P:], rtol=1e-4)
    rev = ma.bounce(jnp.asarray(last, jnp.float32), 0, steps=2, direction="reverse")
    np.testing.assert_allclose(flat(maps["bounce_rev_2"]), np.asarray(rev)[:, 2, P:], rtol=1e-5)
    rolled = ma.rollout(attn)
    np.testing.assert_allclose(flat(maps["rollout"]), np.asarray(rolled)[:, 0, P:], rtol=1e-5)
    # patch chain: CLS removed before the softmax, rows renormalised per head, then averaged
    patch = a[:, -1, :, P:, P:]
    patch = (patch / patch.sum(axis=-1, keepdims=True)).mean(axis=1)
    pi = ma.tokenrank(jnp.asarray(patch, jnp.float32), direction="in")
    np.testing.assert_allclose(flat(maps["tokenrank_in"]), np.asarray(pi), rtol=1e-4, atol=1e-6)
    # a bounce in the patch chain starts from CLS's attention row over the patches
    first = last[:, 0, P:] / last[:, 0, P:].sum(axis=1, keepdims=True)
    np.testing.assert_allclose(flat(maps["bounce_fwd_1_patches"]), first, rtol=1e-5)
    second = np.einsum("bij,bi->bj", 0.99 * patch + 0.01 / (N - P), first)
    np.testing.assert_allclose(flat(maps["bounce_fwd_2_patches"]), second, rtol=1e-4)
    # one bounce from uniform ranks the patches as the column sum does
    np.testing.assert_array_equal(
        np.argsort(flat(maps["uniform_start"]), axis=1),
        np.argsort(flat(maps["column_sum"]), axis=1),
    )


def test_logits_path_equals_probability_path(stack, maps):
    attn, _ = stack
    m = {k: _TESTED[k] for k in ("tokenrank_in", "bounce_fwd_2_patches")}
    no_logits = seg.compute_maps(attn, m, num_prefix=P, grid=GRID)
    for k in m:
        np.testing.assert_allclose(np.asarray(no_logits[k]), np.asarray(maps[k]), rtol=1e-5)


def test_lambda2_weighting_of_identical_heads_is_uniform(stack):
    attn, _ = stack
    same = jnp.broadcast_to(attn[:, :, :1], attn.shape)  # every head equal
    m = {"u": seg.METHODS["bounce_fwd_2"], "w": seg.METHODS["bounce_fwd_2_l2"]}
    out = seg.compute_maps(same, m, num_prefix=P, grid=GRID)
    np.testing.assert_allclose(np.asarray(out["w"]), np.asarray(out["u"]), rtol=1e-5)
    # single method call == registry call
    one = seg.METHODS["bounce_fwd_2"](same, num_prefix=P, grid=GRID)
    np.testing.assert_allclose(np.asarray(one), np.asarray(out["u"]), rtol=1e-6)


def test_registry_and_errors(stack):
    attn, _ = stack
    for name in (
        "cls_attn",
        "column_sum",
        "rollout",
        "tokenrank_in",
        "tokenrank_out",
        *(f"bounce_{d}_{n}" for d in ("fwd", "rev") for n in range(1, 6)),
    ):
        assert name in seg.METHODS and f"{name}_l2" in seg.METHODS
    assert seg.METHODS["bounce_fwd_2"].chain == "full"
    assert seg.METHODS["tokenrank_in"].chain == "patches"
    ext = seg.extended_methods(L)
    assert "bounce_fwd_2_last2" in ext and "cls_attn@L0" in ext and "tokenrank_in_full" in ext
    with pytest.raises(ValueError, match="token layout"):
        seg.compute_maps(attn, {"c": seg.METHODS["cls_attn"]}, num_prefix=0, grid=GRID)
    with pytest.raises(ValueError, match="needs a CLS token"):
        seg.compute_maps(attn[..., 1:, 1:], {"c": seg.METHODS["cls_attn"]}, num_prefix=0, grid=GRID)
    with pytest.raises(ValueError, match="out of range"):
        seg.compute_maps(attn, {"c": seg.MapMethod("cls", layers=5)}, num_prefix=P, grid=GRID)
    with pytest.raises(ValueError, match="kind"):
        seg.MapMethod("attention")
    with pytest.raises(ValueError, match="TokenRank direction"):
        seg.MapMethod("tokenrank", direction="forward")
    assert seg.MapMethod("tokenrank").direction == "in"  # the default per kind
    assert seg.MapMethod("bounce").direction == "forward"
    assert not seg.MapMethod("tokenrank", direction="in").needs_cls
    assert seg.METHODS["bounce_rev_1"].needs_cls


def test_every_method_carries_its_label():
    """Labels come from the fields (reports never parse method names), one per method."""
    table = {**seg.METHODS, **seg.extended_methods(4)}
    labels = [m.label for m in table.values()]
    assert len(set(labels)) == len(labels)
    assert seg.METHODS["bounce_rev_3_l2"].label == "bounce n=3 reverse to CLS, λ2-weighted"
    assert seg.METHODS["rollout"].label == "attention rollout"
    assert table["tokenrank_in_last3"].label == "TokenRank in (last 3 layers)"
    assert table["cls_attn@L2"].label == "CLS attention (head mean) (layer 2)"
    assert seg.MapMethod("bounce", start="uniform", alpha=0.5).label == (
        "bounce n=1 forward from uniform (α=0.5)"
    )
    assert seg.MapMethod("rollout", layers=(0, 1, 2)).title == "attention rollout"
    assert seg.MapMethod("rollout", layers=(0, 1, 2)).label == "attention rollout (layers 0–2)"


# ----------------------------------------------------------------------------- experiment


def test_segment_experiment_on_a_tiny_model(tmp_path):
    nnx = pytest.importorskip("flax.nnx")
    from experiments import segment, segment_report
    from markov_attn.nn import ViT, ViTConfig

    cfg = ViTConfig(image_size=32, patch_size=8, width=16, depth=2, num_heads=2, mlp_dim=32)
    model = ViT(cfg, rngs=nnx.Rngs(0))
    methods = {k: seg.METHODS[k] for k in ("cls_attn", "bounce_fwd_1", "bounce_fwd_2")}
    res = segment.evaluate(
        model,
        n_images=12,
        batch_size=8,
        methods=methods,
        n_resamples=50,
        out_dir=tmp_path,
        figure_images=2,
        progress=False,
    )
    assert res["order"] == [*methods, "centre_prior", "oracle"]
    for name in res["order"]:
        r = res["methods"][name]
        assert r["metrics"]["n_images"] == 12
        lo, hi = r["ci"]["miou"]
        assert lo <= r["metrics"]["miou"] <= hi
    # the oracle is the best map a token grid allows; CLS attention is its own baseline
    assert (
        res["methods"]["oracle"]["metrics"]["miou"] > res["methods"]["cls_attn"]["metrics"]["miou"]
    )
    assert "delta_vs_n1" in res["methods"]["bounce_fwd_2"]
    for f in ("segment.json", "segment.md", "segment_grid.png", "segment_curves.png"):
        assert (tmp_path / f).stat().st_size > 0
    assert "not comparable with ImageNet-Segmentation" in (tmp_path / "segment.md").read_text()
    readme = tmp_path / "README.md"
    readme.write_text(f"a\n{segment_report.README_START}\nold\n{segment_report.README_END}\nb\n")
    segment_report.update_readme(res, readme)
    text = readme.read_text()
    assert "old" not in text and "| map | mIoU |" in text and text.endswith("b\n")
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="seg:start"):
        segment_report.update_readme(res, readme)


def test_multiseg_scores_are_permutation_invariant():
    multiseg = pytest.importorskip("experiments.multiseg")
    inst = np.zeros((8, 8), np.uint8)
    inst[:4, :4], inst[4:, 4:] = 1, 2
    perm = np.array([5, 3, 7])[inst]  # the same segments under other labels
    assert multiseg.scores(perm, inst) == pytest.approx((1.0, 1.0, 1.0))
    one = np.zeros_like(inst)  # everything in one segment: the background IoU only
    miou, ari, macc = multiseg.scores(one, inst)
    assert miou == pytest.approx((64 - 32) / 64 / 3) and ari == pytest.approx(0.0)
    assert macc == pytest.approx(32 / 64)  # the background's pixels are matched correctly


def test_multiseg_true_k_that_cuts_a_complex_pair_falls_back():
    """A true K that cuts a complex-conjugate pair gave an image no states (assignment -1 on
    every token), scored as one segment while the table said k = true; now the nearest k
    that cuts no pair is used and recorded."""
    multiseg = pytest.importorskip("experiments.multiseg")
    # three blocks of 4 tokens that the chain visits in turn (0 -> 1 -> 2 -> 0) with a
    # little mixing: eigenvalues 1 and a complex pair of modulus about 0.9 lead
    n, blocks = 12, np.repeat(np.arange(3), 4)
    rot = (blocks[None, :] == (blocks[:, None] + 1) % 3).astype(np.float64)
    chain = 0.9 * rot / 4 + 0.1 / n
    metastable = np.kron(np.eye(3), np.ones((4, 4))) * 0.9 / 4 + 0.1 / n
    chains = np.stack([chain, metastable, chain]).astype(np.float32)
    ks = np.array([2, 2, 3], np.int32)
    states, used = multiseg._metastable(chains, ks, auto=False)
    assert used.tolist() == [3, 2, 3]  # the cut K = 2 falls back to 3 (the whole pair)
    assert np.all(states >= 0)
    for i in (0, 2):  # the three visited blocks are the three states
        assert len(np.unique(states[i])) == 3
        assert all(len(np.unique(states[i][blocks == b])) == 1 for b in range(3))


def test_batched_kmeans_matches_scikit_learn_on_separated_clusters():
    """The multi-object table's batched k-means (JAX) finds the same partitions as
    scikit-learn's KMeans where the answer is clear, for several k in one call."""
    km = pytest.importorskip("experiments.kmeans")
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    rng = np.random.default_rng(3)
    sets, ks = [], []
    for i in range(12):
        k = 2 + i % 3
        centres = rng.normal(0, 10, (k, 3))
        lab = np.concatenate([np.arange(k), rng.integers(0, k, 64 - k)])
        sets.append(centres[lab] + rng.normal(0, 0.3, (64, 3)))
        ks.append(k)
    pts, ks = np.stack(sets), np.array(ks)
    out = km.kmeans(pts, ks, n_init=5)
    assert out.shape == (12, 64) and out.dtype == np.int32
    for i in range(12):
        ref = KMeans(int(ks[i]), n_init=5, random_state=0).fit_predict(pts[i])
        assert adjusted_rand_score(ref, out[i]) == 1.0
        assert len(np.unique(out[i])) == ks[i]
    np.testing.assert_array_equal(out, km.kmeans(pts, ks, n_init=5))  # deterministic


def test_multiseg_spectral_matches_scikit_learn_on_block_chains():
    """Batched spectral clustering recovers the blocks of nearly block-diagonal chains, as
    scikit-learn's SpectralClustering does, and its eigengap picks the number of blocks."""
    multiseg = pytest.importorskip("experiments.multiseg")
    from sklearn.cluster import SpectralClustering
    from sklearn.metrics import adjusted_rand_score

    rng = np.random.default_rng(4)
    chains, truth, ks = [], [], []
    for i in range(6):
        k = 2 + i % 3
        lab = rng.permutation(np.arange(64) % k)
        w = np.where(lab[:, None] == lab[None, :], 1.0, 0.01) * rng.uniform(0.5, 1.5, (64, 64))
        chains.append(w / w.sum(1, keepdims=True))
        truth.append(lab)
        ks.append(k)
    chains, ks = np.stack(chains), np.array(ks)
    for auto in (False, True):
        states, used = multiseg._spectral(chains, ks, auto)
        np.testing.assert_array_equal(used, ks)
        for i in range(6):
            assert adjusted_rand_score(truth[i], states[i]) == 1.0
            sym = (chains[i] + chains[i].T) / 2
            ref = SpectralClustering(int(ks[i]), affinity="precomputed", random_state=0)
            assert adjusted_rand_score(ref.fit_predict(sym), states[i]) == 1.0


def test_multiseg_silhouette_matches_scikit_learn_and_picks_the_clusters():
    """The batched silhouette equals scikit-learn's ``silhouette_score`` (singletons count 0,
    one cluster gives 0), and k-means with automatic k finds the number of separated blobs."""
    multiseg = pytest.importorskip("experiments.multiseg")
    from sklearn.metrics import adjusted_rand_score, silhouette_score

    rng = np.random.default_rng(5)
    x = rng.normal(size=(4, 64, 3))
    lab = rng.integers(0, 4, size=(4, 64))
    lab[0] = 0  # one cluster
    lab[1, 0], lab[1, 1:] = 3, rng.integers(0, 3, 63)  # a singleton
    ours = multiseg.silhouette(x, lab, 4)
    ref = [silhouette_score(x[i], lab[i]) if len(np.unique(lab[i])) > 1 else 0.0 for i in range(4)]
    np.testing.assert_allclose(ours, ref, atol=1e-12)
    truth, pts = [], []
    for i in range(4):
        k = 2 + i
        t = np.arange(64) % k
        centres = rng.normal(scale=20.0, size=(k, 3))
        pts.append(centres[t] + rng.normal(size=(64, 3)))
        truth.append(t)
    states, used = multiseg._kmeans_auto(np.stack(pts).astype(np.float32))
    assert used.tolist() == [2, 3, 4, 5]
    for i in range(4):
        assert adjusted_rand_score(truth[i], states[i]) == 1.0


def test_maps_with_nan_are_never_scored_as_blank_maps():
    import jax

    from markov_attn import segmentation as seg

    gt = np.zeros((2, 4, 4), bool)
    gt[:, :2, :2] = True
    m = np.array([[[1.0, 0.0], [0.0, 0.0]]] * 2, np.float32)
    assert seg.summarize(seg.image_stats(m, gt))["miou"] == 1.0
    m[1, 1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        seg.image_stats(m, gt)
    stats = jax.jit(seg.image_stats)(m, gt)  # traced: the APs say it
    assert np.isnan(np.asarray(stats.ap)[1]) and not np.isnan(np.asarray(stats.ap)[0])
    with pytest.raises(ValueError, match="NaN"):
        seg.summarize(stats)
    with pytest.raises(ValueError, match="NaN"):
        seg.bootstrap(stats, n_resamples=10)


def test_metric_arguments_are_checked():
    from markov_attn import segmentation as seg

    gt = np.zeros((1, 4, 4), bool)
    gt[:, :2, :2] = True
    m = np.array([[[1.0, 0.0], [0.0, 0.0]]], np.float32)
    with pytest.raises(ValueError, match="thresh"):
        seg.image_stats(m, gt, thresh="otsu")
    stats = seg.image_stats(m, gt)
    for level in (0.0, 1.0):
        with pytest.raises(ValueError, match="level"):
            seg.bootstrap(stats, level=level)
    empty = seg.SegStats(*(np.asarray(v)[:0] for v in stats))
    with pytest.raises(ValueError, match="no images"):
        seg.summarize(empty)


def test_bilinear_downsampling_matches_pytorch_without_antialiasing():
    """PyTorch's bilinear (align_corners=False) has no antialiasing when it shrinks: values
    from the half-pixel formula, written out here for a 4x4 map to 3x3."""
    from markov_attn import segmentation as seg

    m = np.arange(16, dtype=np.float32).reshape(4, 4)
    src = (np.arange(3) + 0.5) * 4 / 3 - 0.5  # source coordinates of the 3 outputs
    lo = np.floor(src).astype(int)
    f = src - lo
    rows = m[lo] * (1 - f)[:, None] + m[np.minimum(lo + 1, 3)] * f[:, None]
    ref = rows[:, lo] * (1 - f) + rows[:, np.minimum(lo + 1, 3)] * f
    out = np.asarray(seg.upsample(m, size=(3, 3), method="bilinear"))
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_map_methods_and_compute_maps_check_their_inputs():
    from markov_attn.segmentation import MapMethod, compute_maps

    for steps in (2.5, True):
        with pytest.raises(ValueError, match="steps must be an integer"):
            MapMethod("bounce", steps=steps)
    with pytest.raises(ValueError, match="layers"):
        MapMethod("bounce", steps=1, layers=())
    attn = np.full((1, 1, 1, 5, 5), 0.2, np.float32)
    attn[0, 0, 0, 2, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        compute_maps(attn, {"b": MapMethod("bounce", steps=1)}, num_prefix=1, grid=(2, 2))


def test_bilinear_maps_are_min_maxed_after_upsampling():
    """The reference upsamples first and min-maxes the pixels; min-max first left bilinear
    scores short of [0, 1] (max 0.996-0.998), which moved fixed-threshold counts and ap_2class."""
    from markov_attn.segmentation import map_to_mask

    m = np.random.default_rng(0).random((2, 14, 14)).astype(np.float32)
    scores, _ = map_to_mask(m, size=(224, 224), method="bilinear")
    np.testing.assert_allclose(np.asarray(scores).max(axis=(-2, -1)), 1.0)
    np.testing.assert_allclose(np.asarray(scores).min(axis=(-2, -1)), 0.0)
    near, _ = map_to_mask(m, size=(224, 224), method="nearest")  # unchanged for the protocol
    from markov_attn.segmentation import minmax, upsample

    want = upsample(minmax(m), size=(224, 224), method="nearest")
    np.testing.assert_array_equal(np.asarray(near), np.asarray(want))


def test_image_smaller_than_the_token_grid_matches_map_to_mask():
    """The token path min-max scaled over every token, also those that reach no pixel of an
    image smaller than the grid: its scores then differed from map_to_mask's (the two-class AP
    0.5648 against 0.5619 from the pixels)."""
    m = np.array([[3, 1, 2], [3, 3, 0], [1, 3, 3], [1, 0, 2], [0, 3, 1]], np.float32)
    gt = np.zeros((1, 2, 3), bool)
    gt[0, 0, :2] = True
    gt[0, 1, 2] = True
    fast = seg.image_stats(m[None], gt)  # nearest, mean threshold: the token path if it can
    pixels = seg.image_stats(m[None], gt, thresh="median")  # always the pixel path
    assert float(fast.ap_2class[0]) == pytest.approx(float(pixels.ap_2class[0]), abs=1e-6)
    scores, pred = (np.asarray(x) for x in seg.map_to_mask(m[None], size=(2, 3)))
    t = scores.mean()
    assert np.array_equal(np.asarray(pred), scores > t)
    counts = [(pred & gt).sum(), (pred & ~gt).sum(), (~pred & gt).sum(), (~pred & ~gt).sum()]
    assert [int(np.asarray(x)[0]) for x in (fast.tp, fast.fp, fast.fn, fast.tn)] == counts


def test_bootstrap_map_interval_ignores_resamples_without_foreground():
    m = np.random.default_rng(0).random((3, 4, 4)).astype(np.float32)
    g = np.zeros((3, 8, 8), bool)
    g[0, :4] = True  # 1 of 3 images has foreground: about 30 % of resamples have none
    st = seg.image_stats(m, g)
    point = seg.summarize(st)["map"]
    lo, hi = seg.bootstrap(st, n_resamples=2000)["map"]
    assert lo == pytest.approx(point) and hi == pytest.approx(point)  # it was (0.0, point)
