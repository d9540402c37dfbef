"""Tests for markov_attn.segmentation.diffseg: DiffSeg merging with grid and TokenRank anchors."""

import numpy as np
import pytest

from markov_attn.segmentation import diffseg, grid_anchors, symmetric_kl, tokenrank_anchors

G = 8  # 8×8 patch grid, 64 tokens


def _block_chain(blocks: np.ndarray, *, leak=None, noise=0.0, seed=0) -> np.ndarray:
    """Row-stochastic chain over ``blocks.size`` tokens: each token attends uniformly to its own
    block (0.9 of its mass if ``leak`` names a block that every other token also attends to with
    0.1), a little uniform background (1e-3) and optional multiplicative noise."""
    b = blocks.ravel()
    same = (b[:, None] == b[None, :]).astype(np.float64)
    a = same / same.sum(1, keepdims=True)
    if leak is not None:
        to = (b == leak).astype(np.float64)
        out = b != leak
        a[out] = 0.9 * a[out] + 0.1 * to / to.sum()
    a = a + 1e-3 / len(b)
    if noise:
        a *= 1 + noise * np.random.default_rng(seed).random(a.shape)
    return a / a.sum(1, keepdims=True)


def _same_partition(labels: np.ndarray, blocks: np.ndarray) -> bool:
    lab, b = labels.ravel(), blocks.ravel()
    return bool(np.array_equal(lab[:, None] == lab[None, :], b[:, None] == b[None, :]))


def _quadrants():
    r, c = np.divmod(np.arange(G * G), G)
    return ((r >= 4) * 2 + (c >= 4)).reshape(G, G)


def _objects():
    """Background, a 3×3 object and a 2×5 object (every block holds a grid anchor)."""
    b = np.zeros((G, G), int)
    b[1:4, 1:4] = 1
    b[5:7, 2:7] = 2
    return b


def _small_salient():
    """Quadrants plus a 1×2 object at the bottom right, away from every grid anchor."""
    b = _quadrants()
    b[7, 6:] = 4
    return b


def test_grid_anchors_follow_diffseg():
    assert grid_anchors(8, 4).tolist() == [r * 8 + c for r in (0, 2, 4, 6) for c in (0, 2, 4, 6)]
    # DiffSeg's 64×64 map, 16 per side: rows and columns 1, 5, 9, ..., 61
    assert grid_anchors(64, 16).reshape(16, 16)[0, :3].tolist() == [65, 69, 73]
    assert grid_anchors(8, 1).tolist() == [3 * 8 + 3]
    assert grid_anchors(8, 8).tolist() == list(range(64))


def test_symmetric_kl_is_half_the_sum_of_both_directions():
    rng = np.random.default_rng(0)
    p, q = rng.dirichlet(np.ones(10), 2)
    kl = lambda x, y: float((x * np.log(x / y)).sum())
    assert symmetric_kl(p, q) == pytest.approx((kl(p, q) + kl(q, p)) / 2)
    assert symmetric_kl(p, p) == 0.0
    assert np.isfinite(symmetric_kl(np.array([1.0, 0.0]), np.array([0.0, 1.0])))


@pytest.mark.parametrize("blocks", [_quadrants(), _objects()], ids=["quadrants", "objects"])
@pytest.mark.parametrize("anchors", ["grid", "tokenrank"])
def test_recovers_known_blocks_exactly(blocks, anchors):
    a = _block_chain(blocks, noise=0.2)
    labels, k = diffseg(a, anchors=anchors, num_per_side=4, kl_threshold=0.5)
    assert labels.shape == (G * G,) and labels.dtype == np.int32
    assert int(k) == len(np.unique(blocks))
    assert _same_partition(labels, blocks)
    assert sorted(np.unique(labels).tolist()) == list(range(int(k)))


def test_tokenrank_anchors_find_a_small_salient_block_the_grid_misses():
    blocks = _small_salient()  # every token also attends to the 2-token block (attention sink)
    a = _block_chain(blocks, leak=4)
    assert not np.isin(np.flatnonzero(blocks.ravel() == 4), grid_anchors(G, 4)).any()
    grid_labels, grid_k = diffseg(a, anchors="grid", kl_threshold=0.5)
    assert int(grid_k) == 4 and not _same_partition(grid_labels, blocks)
    top = tokenrank_anchors(a, 16, mode="top")
    assert set(np.flatnonzero(blocks.ravel() == 4)) <= set(top.tolist())
    tr_labels, tr_k = diffseg(a, anchors="tokenrank", kl_threshold=0.5, seed=0)
    assert int(tr_k) == 5 and _same_partition(tr_labels, blocks)


def test_explicit_anchors_and_too_few_anchors():
    blocks = _quadrants()
    a = _block_chain(blocks, noise=0.1)
    labels, k = diffseg(a, anchors=[0, 7, 56, 63], kl_threshold=0.5)  # one corner per quadrant
    assert int(k) == 4 and _same_partition(labels, blocks)
    labels, k = diffseg(a, anchors=[0], kl_threshold=0.5)  # one proposal: one segment
    assert int(k) == 1 and np.all(labels == 0)


def test_threshold_controls_merging():
    a = _block_chain(_quadrants(), noise=0.5)
    _, k_small = diffseg(a, anchors="grid", kl_threshold=1e-6, iterations=1)
    _, k_large = diffseg(a, anchors="grid", kl_threshold=100.0)
    assert int(k_large) == 1 and int(k_small) > 4
    # a sequence of thresholds sets the rounds
    l1, k1 = diffseg(a, kl_threshold=[0.5, 0.5, 0.5])
    l2, k2 = diffseg(a, kl_threshold=0.5, iterations=3)
    np.testing.assert_array_equal(l1, l2)
    assert k1 == k2


def test_num_segments_merges_the_closest_proposals_down_to_k():
    blocks = _quadrants()
    a = _block_chain(blocks, noise=0.2)
    # a tiny threshold leaves many proposals; merged down to 4 they are the quadrants
    _, k_free = diffseg(a, anchors="grid", kl_threshold=1e-6, iterations=1)
    assert int(k_free) > 4
    labels, k = diffseg(a, anchors="grid", kl_threshold=1e-6, iterations=1, num_segments=4)
    assert int(k) == 4 and _same_partition(labels, blocks)
    # down to 2: two pairs of quadrants, each segment a union of whole quadrants
    labels, k = diffseg(a, anchors="grid", kl_threshold=1e-6, iterations=1, num_segments=2)
    assert int(k) == 2
    for q in range(4):
        assert len(np.unique(labels[blocks.ravel() == q])) == 1
    # fewer survivors than asked: kept (merging cannot split)
    _, k = diffseg(a, anchors="grid", kl_threshold=100.0, num_segments=3)
    assert int(k) == 1
    # exactly K whenever more survive: a merged proposal that wins no token once took two
    # segments away at a time (6 -> 4 on this chain)
    six = np.array(
        [
            [0.017, 0.005, 0.437, 0.063, 0.009, 0.47],
            [0.035, 0.018, 0.001, 0.223, 0.179, 0.544],
            [0.063, 0.261, 0.035, 0.119, 0.317, 0.206],
            [0.015, 0.182, 0.185, 0.471, 0.01, 0.136],
            [0.677, 0.16, 0.047, 0.011, 0.068, 0.038],
            [0.122, 0.008, 0.008, 0.021, 0.787, 0.054],
        ]
    )
    _, k6 = diffseg(six, anchors=np.arange(6), kl_threshold=[1e-12])
    assert int(k6) == 6
    rng = np.random.default_rng(0)
    for k in range(1, 7):
        lab, kk = diffseg(six, anchors=np.arange(6), kl_threshold=[1e-12], num_segments=k)
        assert int(kk) == k and sorted(np.unique(lab).tolist()) == list(range(k))
    for _ in range(50):
        d = rng.dirichlet(np.full(6, 0.5), 6)
        _, free = diffseg(d, anchors=np.arange(6), kl_threshold=[1e-12])
        for k in range(1, 7):
            _, kk = diffseg(d, anchors=np.arange(6), kl_threshold=[1e-12], num_segments=k)
            assert int(kk) == min(k, int(free))
    # one per matrix, and bad values
    both = np.stack([a, a])
    _, ks = diffseg(both, kl_threshold=1e-6, iterations=1, num_segments=[4, 2])
    assert ks.tolist() == [4, 2]
    for bad in (0, [4, 2, 1], 2.5):
        with pytest.raises(ValueError, match="num_segments"):
            diffseg(both, num_segments=bad)


def test_batched_leading_axes_match_single_calls():
    chains = np.stack([_block_chain(_quadrants(), noise=0.3, seed=s) for s in range(3)])
    chains = np.stack([chains, chains[::-1]])  # (2, 3, 64, 64)
    for anchors in ("grid", "tokenrank"):
        labels, k = diffseg(chains, anchors=anchors, kl_threshold=0.5, seed=1)
        assert labels.shape == (2, 3, 64) and k.shape == (2, 3)
        if anchors == "grid":
            for i in range(2):
                for j in range(3):
                    li, ki = diffseg(chains[i, j], anchors="grid", kl_threshold=0.5)
                    np.testing.assert_array_equal(labels[i, j], li)
                    assert k[i, j] == ki


def test_tokenrank_sampling_is_deterministic_with_a_seed():
    a = np.random.default_rng(0).dirichlet(np.ones(64) * 0.3, size=(2, 64))
    s1 = tokenrank_anchors(a, 16, seed=3)
    s2 = tokenrank_anchors(a, 16, seed=3)
    s3 = tokenrank_anchors(a, 16, seed=4)
    np.testing.assert_array_equal(s1, s2)
    assert not np.array_equal(s1, s3)
    assert s1.shape == (2, 16) and all(len(set(r)) == 16 for r in s1)  # distinct anchors
    np.testing.assert_array_equal(
        diffseg(a, anchors="tokenrank", kl_threshold=0.1, seed=3)[0],
        diffseg(a, anchors="tokenrank", kl_threshold=0.1, seed=3)[0],
    )


def test_tokenrank_sampling_follows_tokenrank():
    import markov_attn as ma

    a = np.random.default_rng(1).dirichlet(np.ones(16) * 0.2, size=16)
    pi = np.asarray(ma.tokenrank(a.astype(np.float32)))
    draws = tokenrank_anchors(np.broadcast_to(a, (4000, 16, 16)), 1, seed=0).ravel()
    freq = np.bincount(draws, minlength=16) / len(draws)
    np.testing.assert_allclose(freq, pi, atol=0.03)
    top = tokenrank_anchors(a, 3, mode="top")
    assert set(top.tolist()) == set(np.argsort(-pi)[:3].tolist())


def test_bad_inputs_raise_clear_errors():
    a = _block_chain(_quadrants())
    with pytest.raises(ValueError, match="square over its last two axes"):
        diffseg(a[:, :60])
    with pytest.raises(ValueError, match="square number of tokens.*prefix"):
        diffseg(_block_chain(np.arange(10) % 2))  # 10 tokens: not a g×g grid
    with pytest.raises(ValueError, match="M <= g"):
        diffseg(a, anchors="grid", num_per_side=9)
    with pytest.raises(ValueError, match="M <= g"):
        diffseg(a, anchors="tokenrank", num_per_side=9)
    with pytest.raises(ValueError, match=">= 1"):
        grid_anchors(8, 0)
    with pytest.raises(ValueError, match="kl_threshold must be > 0"):
        diffseg(a, kl_threshold=0.0)
    with pytest.raises(ValueError, match="iterations"):
        diffseg(a, iterations=0)
    with pytest.raises(ValueError, match=r"\[0, n=64\)"):
        diffseg(a, anchors=[0, 64])
    with pytest.raises(ValueError, match="'grid', 'tokenrank'"):
        diffseg(a, anchors="random")
    with pytest.raises(ValueError, match="negative or non-finite"):
        diffseg(-a)
    with pytest.raises(ValueError, match="mode"):
        tokenrank_anchors(a, 4, mode="max")
    with pytest.raises(ValueError, match="num_anchors"):
        tokenrank_anchors(a, 65)
