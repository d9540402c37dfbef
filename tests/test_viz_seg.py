"""Tests for the segmentation figures of markov_attn.viz.seg."""

import numpy as np
import pytest

from markov_attn.viz.seg import seg_grid


def test_seg_grid_states_the_per_image_stretch():
    rng = np.random.default_rng(0)
    images = rng.random((2, 16, 16, 3))
    masks = np.zeros((2, 16, 16), bool)
    masks[:, 4:12, 4:12] = True
    fig = seg_grid(images, masks, {"bounce": rng.random((2, 4, 4))}, titles={"bounce": "B 1"})
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert any("min–max" in t and "per image" in t for t in texts)
    assert fig.axes[2].get_title() == "B 1"  # the method's display name over its column
    assert fig.axes[3 + 2].get_title().startswith("IoU ")


def test_seg_figures_scale_integer_images_and_keep_bounce_positions(tmp_path):
    """seg_grid clipped uint8 images to black and white; overlay clipped uint16 to white;
    metric_curves drew bounce_fwd_2..5 at n = 1..4 when n = 1 was missing."""
    from markov_attn.viz._overlay import _as_image
    from markov_attn.viz.seg import metric_curves

    img8 = np.arange(48, dtype=np.uint8).reshape(4, 4, 3) * 5
    np.testing.assert_allclose(_as_image(img8), img8 / 255.0, rtol=1e-6)
    img16 = (np.arange(48, dtype=np.uint16).reshape(4, 4, 3) * 1000).astype(np.uint16)
    np.testing.assert_allclose(_as_image(img16), img16 / 65535.0, rtol=1e-6)
    with pytest.raises(ValueError, match="unsigned"):
        _as_image(np.ones((4, 4, 3), np.int64))
    entry = lambda v: {"metrics": {"miou": v}, "ci": {"miou": [v - 0.01, v + 0.01]}}
    results = {f"bounce_fwd_{n}": entry(0.1 * n) for n in (2, 3, 4, 5)}
    fig = metric_curves(results, {"fwd": [f"bounce_fwd_{n}" for n in range(1, 6)]},
                        metrics=("miou",))  # fmt: skip
    xs = fig.axes[0].lines[0].get_xdata()
    np.testing.assert_array_equal(xs, [2, 3, 4, 5])
