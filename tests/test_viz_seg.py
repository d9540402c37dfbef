"""Tests for the segmentation figures of markov_attn.viz.seg."""

import numpy as np

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
