"""DiffSeg iterative attention merging (Tian et al., CVPR 2024) with grid or TokenRank anchors.

Plain NumPy (float64) on the host; a loop over the leading (batch) axes. The sizes this is
meant for take about a millisecond per image (64 tokens, 16 anchors).
"""

import math
from collections.abc import Sequence

import numpy as np

#: Entries are clipped from below at this value before taking logarithms in the KL divergence,
#: so that exact zeros (hand-made chains) give large but finite divergences.
KL_EPS = 1e-12


def _grid_side(n: int) -> int:
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(
            f"grid anchors need a square number of tokens (a g×g patch grid), got n={n}; drop "
            "prefix tokens (CLS, registers) first, or pass explicit anchor indices"
        )
    return g


def grid_anchors(grid: int, num_per_side: int, /) -> np.ndarray:
    """DiffSeg's uniform anchor grid: ``num_per_side ** 2`` token indices on a ``grid × grid``
    patch grid (row-major token order).

    The positions per axis follow DiffSeg's reference code: a step of
    ``(grid - 1) // (num_per_side - 1)`` patches, the span centred (``grid=8``,
    ``num_per_side=4`` gives rows and columns 0, 2, 4, 6); one anchor per side is the centre
    patch ``(grid - 1) // 2``.

    Args:
      grid: side ``g`` of the patch grid (``n = g * g`` tokens).
      num_per_side: anchors per side ``M``, ``1 <= M <= g``.

    Returns:
      int ``(M * M,)`` token indices ``row * g + col``, sorted.

    Raises:
      ValueError: ``M < 1``, ``g < 1`` or ``M > g``.
    """
    g, m = int(grid), int(num_per_side)
    if g < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    if m < 1:
        raise ValueError(f"num_per_side (M) must be >= 1, got {num_per_side}")
    if m > g:
        raise ValueError(
            f"num_per_side (M={m}) is larger than the grid side (g={g}); use M <= g anchors per "
            "side"
        )
    if m == 1:
        pos = np.array([(g - 1) // 2])
    else:
        step = (g - 1) // (m - 1)
        start = (g - 1 - step * (m - 1)) // 2
        pos = start + step * np.arange(m)
    return (pos[:, None] * g + pos[None, :]).ravel().astype(np.int64)


def tokenrank_anchors(
    attn,
    num_anchors: int,
    /,
    *,
    mode: str = "sample",
    seed: int | np.random.Generator = 0,
    alpha: float = 0.99,
) -> np.ndarray:
    """Anchor tokens chosen by TokenRank (Erel et al. 2025) for :func:`diffseg`.

    ``mode="sample"`` (default, the paper's variant) draws ``num_anchors`` distinct tokens
    with probability proportional to the chain's TokenRank :math:`\\pi` (``ma.tokenrank`` with
    teleportation ``alpha``; successive draws without replacement, each proportional to the
    TokenRank of the tokens not yet drawn, ``numpy.random.Generator.choice``); ``mode="top"``
    takes the ``num_anchors`` tokens of largest TokenRank (deterministic).

    Args:
      attn: row-stochastic attention ``(..., n, n)`` (the chain whose TokenRank is used).
      num_anchors: anchors per matrix, ``1 <= num_anchors <= n``.
      mode: ``"sample"`` or ``"top"``.
      seed: seed or ``numpy.random.Generator`` of the sampling; one generator serves the
        matrices in row-major batch order, so the same seed gives the same anchors.
      alpha: TokenRank teleportation weight.

    Returns:
      int ``(..., num_anchors)`` token indices (sorted per matrix).

    Raises:
      ValueError: a bad ``mode``, ``num_anchors`` outside ``[1, n]``, or an invalid chain.
    """
    from .._tokenrank import tokenrank

    a = _check_attn(attn)
    n = a.shape[-1]
    k = int(num_anchors)
    if not 1 <= k <= n:
        raise ValueError(f"num_anchors must be in [1, n={n}], got {num_anchors}")
    if mode not in ("sample", "top"):
        raise ValueError(f"mode must be 'sample' or 'top', got {mode!r}")
    pi = np.asarray(tokenrank(a.astype(np.float32), alpha=alpha), np.float64)
    flat = pi.reshape(-1, n)
    out = np.empty((len(flat), k), np.int64)
    rng = np.random.default_rng(seed)
    for i, p in enumerate(flat):
        if mode == "top":
            out[i] = np.sort(np.argsort(-p, kind="stable")[:k])
        else:
            p = np.clip(p, 0, None)
            out[i] = np.sort(rng.choice(n, size=k, replace=False, p=p / p.sum()))
    return out.reshape(*a.shape[:-2], k)


def symmetric_kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """DiffSeg's symmetric KL divergence ``(KL(p‖q) + KL(q‖p)) / 2`` over the last axis
    (broadcasting; entries clipped at :data:`KL_EPS` inside the logarithm)."""
    quot = np.log(np.maximum(p, KL_EPS)) - np.log(np.maximum(q, KL_EPS))
    return 0.5 * ((p - q) * quot).sum(-1)


def _check_attn(attn) -> np.ndarray:
    a = np.asarray(attn, np.float64)
    if a.ndim < 2 or a.shape[-1] != a.shape[-2]:
        raise ValueError(
            f"attention must be square over its last two axes, (..., n, n), got shape {a.shape}; "
            "pass the patch-to-patch block (rows = each token's attention over the patches)"
        )
    if not np.all(np.isfinite(a)) or np.any(a < 0):
        raise ValueError("attention has negative or non-finite entries; pass probabilities")
    return a


def _merge_one(a, anchors, thresholds, k=None):
    # round 1: each anchor's map becomes the mean of the maps of all tokens within the threshold
    kl = symmetric_kl(a[anchors][:, None, :], a[None, :, :])  # (K, n)
    close = kl < thresholds[0]
    props = (close.astype(np.float64) @ a) / close.sum(1, keepdims=True)
    # later rounds: greedy merging of the proposals among themselves
    for thr in thresholds[1:]:
        kl = symmetric_kl(props[:, None, :], props[None, :, :])  # (P, P)
        done = np.zeros(len(props), bool)
        merged = []
        for i in range(len(props)):
            if done[i]:
                continue
            group = kl[i] < thr  # includes i itself (KL 0)
            done |= group
            merged.append(props[group].mean(0))
        props = np.stack(merged)
    # non-maximum suppression: each token goes to the proposal with the largest value on it
    winner = props.argmax(0)
    _, labels = np.unique(winner, return_inverse=True)
    if k is not None:  # merge the closest segments until k are left
        props = props[np.unique(winner)]  # one proposal per segment, in label order
        while len(props) > k:
            kl = symmetric_kl(props[:, None, :], props[None, :, :])
            kl[np.diag_indices(len(props))] = np.inf
            i, j = sorted(np.unravel_index(np.argmin(kl), kl.shape))
            props[i] = 0.5 * (props[i] + props[j])
            props = np.delete(props, j, axis=0)
            labels = np.where(labels == j, i, labels)  # segment j joins segment i
            labels = np.where(labels > j, labels - 1, labels)
    return labels.astype(np.int32), int(labels.max()) + 1


def diffseg(
    attn,
    /,
    *,
    anchors: str | Sequence[int] | np.ndarray = "grid",
    num_per_side: int = 4,
    kl_threshold: float | Sequence[float] = 1.1,
    iterations: int = 3,
    seed: int | np.random.Generator = 0,
    num_segments: int | Sequence[int] | np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    r"""Unsupervised segmentation by DiffSeg's iterative attention merging.

    Tian et al., "Diffuse, Attend, and Segment" (CVPR 2024), on a token-to-token attention
    ``A`` whose row :math:`A_i` is token ``i``'s attention distribution over the ``n`` patches
    (a ``g × g`` grid for ``anchors="grid"``, ``n = g * g``, row-major):

    1. Anchors: ``K`` token indices (a uniform ``M × M`` grid, :func:`grid_anchors`; TokenRank
       samples, :func:`tokenrank_anchors`; or explicit indices).
    2. First merge: for each anchor ``a``, the proposal is the mean of all rows :math:`A_j`
       (every token, not only anchors) with symmetric KL :math:`D(A_a, A_j) < \tau_1`, where
       :math:`D(p, q) = (\mathrm{KL}(p\|q) + \mathrm{KL}(q\|p))/2` (:func:`symmetric_kl`).
    3. Later merges (rounds 2..``iterations``): greedily, in proposal order, each proposal not
       yet merged takes the mean of all proposals within :math:`D < \tau_r` of it (as in
       DiffSeg's code, a proposal already merged may join a later group too).
    4. Non-maximum suppression: token ``t`` is labelled with the proposal :math:`P` of largest
       :math:`P_t` (the proposal that puts most attention mass on it).

    The number of segments is whatever survives: the proposals that win at least one token,
    relabelled ``0 .. k-1`` in proposal order. With ``num_segments`` (a true number of
    segments, for comparison with methods that are told it) these segments are then merged
    pairwise, the two whose proposals have the smallest symmetric KL first (the union of their
    tokens; the mean of their proposals stands for it in later merges), until that many are
    left; a matrix with fewer segments keeps them (merging cannot split a segment). DiffSeg's
    optional k-means refinement and the upsampling of the maps before the NMS are not part of
    this function (upsample the labels).
    Rows are renormalised to sum to 1 (an all-zero row becomes uniform).

    Args:
      attn: row-stochastic attention ``(..., n, n)`` over patch tokens (drop CLS/prefix tokens
        and renormalise first); any leading batch axes.
      anchors: ``"grid"`` (``num_per_side ** 2`` anchors on the grid, DiffSeg's default),
        ``"tokenrank"`` (``num_per_side ** 2`` distinct tokens sampled proportionally to each
        matrix's TokenRank, seeded by ``seed``, the variant of Erel et al. 2025), or explicit
        int token indices ``(K,)`` or ``(..., K)`` (one set per matrix).
      num_per_side: ``M``, anchors per grid side (``M * M`` anchors for ``"grid"`` and
        ``"tokenrank"``); ``1 <= M <= g``.
      kl_threshold: :math:`\tau > 0`, one for every round (DiffSeg's default 1.1) or a
        sequence of per-round thresholds (its length is then the number of rounds).
      iterations: number of merging rounds, including the first (anchor vs all tokens) one;
        ignored when ``kl_threshold`` is a sequence.
      seed: seed or generator of the TokenRank sampling (unused otherwise).
      num_segments: ``None`` (DiffSeg: as many segments as the thresholds leave), or how many
        segments to merge down to (fewer only where fewer survive the thresholds), an int or
        one per matrix ``(...)``, each ``>= 1``.

    Returns:
      ``(labels, num_segments)``: int32 ``(..., n)`` segment labels ``0 .. k-1`` per token and
      int32 ``(...)`` the number of segments ``k`` per matrix.

    Raises:
      ValueError: non-square attention, negative or non-finite entries, ``n`` not a square
        number for ``"grid"``, ``M`` larger than ``g`` or below 1, anchors out of range, a
        threshold that is not positive, or ``iterations < 1``.

    Examples:
      >>> import numpy as np
      >>> from markov_attn.segmentation import diffseg
      >>> right = np.arange(16) % 4 >= 2  # 4×4 grid: left and right halves
      >>> A = (right[:, None] == right[None, :]) / 8.0  # uniform attention within each half
      >>> labels, k = diffseg(A, anchors="grid", num_per_side=2)
      >>> labels.reshape(4, 4).tolist(), int(k)
      ([[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1]], 2)
    """
    a = _check_attn(attn)
    n = a.shape[-1]
    batch = a.shape[:-2]
    if isinstance(kl_threshold, (int, float, np.integer, np.floating)):
        if int(iterations) < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        thresholds = [float(kl_threshold)] * int(iterations)
    else:
        thresholds = [float(t) for t in kl_threshold]
        if not thresholds:
            raise ValueError("kl_threshold is an empty sequence; give at least one threshold")
    if not all(t > 0 for t in thresholds):
        raise ValueError(f"kl_threshold must be > 0 (a KL divergence bound), got {kl_threshold}")
    s = a.sum(-1, keepdims=True)
    a = np.where(s > 0, a / np.where(s > 0, s, 1), 1.0 / n)

    if isinstance(anchors, str):
        if anchors == "grid":
            ga = grid_anchors(_grid_side(n), num_per_side)
            idx = np.broadcast_to(ga, (*batch, len(ga)))
        elif anchors == "tokenrank":
            g = math.isqrt(n)
            m = int(num_per_side)
            if m < 1 or (g * g == n and m > g) or m * m > n:
                raise ValueError(
                    f"num_per_side (M={num_per_side}) must be >= 1 and M * M at most the number "
                    f"of tokens (n={n}); use M <= g anchors per side"
                )
            idx = tokenrank_anchors(a, m * m, seed=seed)
        else:
            raise ValueError(
                f"anchors must be 'grid', 'tokenrank' or token indices, got {anchors!r}"
            )
    else:
        idx = np.asarray(anchors)
        if idx.ndim == 0 or idx.shape[-1] == 0 or not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(
                f"explicit anchors must be a non-empty int array (K,) or (..., K), got {anchors!r}"
            )
        if np.any(idx < 0) or np.any(idx >= n):
            raise ValueError(f"anchor indices must lie in [0, n={n})")
        try:
            idx = np.broadcast_to(idx, (*batch, idx.shape[-1]))
        except ValueError:
            raise ValueError(
                f"anchors of shape {idx.shape} do not match the batch shape {batch}; pass (K,) "
                "or (..., K) with the attention's leading axes"
            ) from None

    flat_a = a.reshape(-1, n, n)
    flat_i = idx.reshape(len(flat_a), idx.shape[-1])  # -1 fails on an empty batch
    if num_segments is None:
        flat_k = [None] * len(flat_a)
    else:
        ks = np.asarray(num_segments)
        if not np.issubdtype(ks.dtype, np.integer) or np.any(ks < 1):
            raise ValueError(
                f"num_segments must be None or int(s) >= 1 (one per matrix), got {num_segments!r}"
            )
        try:
            flat_k = [int(x) for x in np.broadcast_to(ks, batch).reshape(-1)]
        except ValueError:
            raise ValueError(
                f"num_segments of shape {ks.shape} does not match the batch shape {batch}"
            ) from None
    labels = np.empty((len(flat_a), n), np.int32)
    counts = np.empty(len(flat_a), np.int32)
    for b in range(len(flat_a)):
        labels[b], counts[b] = _merge_one(flat_a[b], flat_i[b], thresholds, flat_k[b])
    return labels.reshape(*batch, n), counts.reshape(batch)
