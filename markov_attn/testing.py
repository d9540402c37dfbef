"""Synthetic attention chains for tests, benchmarks and examples (NumPy, float64).

Attention heads differ a lot in how they mix, and every numerical method here has a regime
where it struggles, so the generators cover the kinds seen in real ViTs:

- ``"diffuse"``: ``softmax(q kᵀ / sqrt(d))`` at a high temperature (logits scaled down),
  close to uniform; tiny |λ2|.
- ``"attention"``: ``softmax(q kᵀ / sqrt(d))`` with random per-head temperature, the bulk case.
- ``"metastable"``: tokens in a few clusters that attend mostly within their cluster;
  |λ2| close to 1 (``strength`` controls how close; large values are nearly reducible).
- ``"circulant"``: each token attends to a smooth window around a shifted position (a
  positional head); a near-circulant matrix whose λ2 is a complex pair.
- ``"permutation"``: each token attends mostly to one shifted token (a "previous token" head):
  nearly a permutation, so all eigenvalues have almost the same modulus. The hard case for
  Krylov estimates of |λ2| (see ``second_eigenvalue``).
- ``"dirichlet"``: independent Dirichlet rows.
- ``"reducible"``: two halves of the tokens whose attention across the halves is damped by
  ``e^-strength`` (12 gives |λ2| within ~1e-5 of 1): nearly reducible, the ill-conditioned
  case for stationary solvers.
- ``"causal"``: decoder attention, a row softmax over keys ``j <= i`` with an attention sink at
  token 0: lower triangular, so its eigenvalues are its diagonal (ill-conditioned ones).

Examples:
  >>> import numpy as np
  >>> from markov_attn import testing
  >>> A = testing.random_chains(np.random.default_rng(0), (2, 3), 16, kind="metastable")
  >>> A.shape, bool(np.allclose(A.sum(-1), 1.0))
  ((2, 3, 16, 16), True)
"""

import numpy as np

KINDS = (
    "diffuse",
    "attention",
    "metastable",
    "circulant",
    "permutation",
    "dirichlet",
    "reducible",
    "causal",
)


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def random_chains(
    rng: np.random.Generator,
    batch: tuple[int, ...],
    n: int,
    *,
    kind: str = "attention",
    d: int = 64,
    strength: float = 6.0,
    clusters: int = 4,
) -> np.ndarray:
    """Random row-stochastic ``(*batch, n, n)`` float64 matrices of the given ``kind``.

    Args:
      rng: NumPy generator (fresh randomness per call).
      batch: leading shape.
      n: number of tokens.
      kind: one of :data:`KINDS`.
      d: head dimension of the synthetic queries and keys.
      strength: logit margin of the structure (metastable clusters, circulant shift, the
        damping of the reducible halves, the causal sink); 6 gives |λ2| around 0.9–0.99 for
        metastable chains (0.75–0.9 for circulant ones at n = 16), 14 gives nearly reducible
        chains (|λ2| > 0.999). The causal sink saturates at strength 6 (its logit is
        ``min(strength, 6) / 2``): larger strengths give the same causal chains.
      clusters: number of metastable clusters.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    shape = (*batch, n)
    if kind == "dirichlet":
        return rng.dirichlet(np.ones(n), size=(*batch, n))
    q = rng.standard_normal((*shape, d))
    k = rng.standard_normal((*shape, d))
    s = np.einsum("...id,...jd->...ij", q, k) / np.sqrt(d)
    if kind == "diffuse":
        return _softmax(0.3 * s)
    temp = np.exp(rng.normal(0.0, 0.5, size=(*batch, 1, 1)))
    if kind == "attention":
        return _softmax(temp * s)
    if kind == "reducible":
        half = np.arange(n) < n // 2
        return _softmax(s + strength * (half[:, None] == half[None, :]))
    if kind == "causal":
        causal = np.tril(np.ones((n, n), bool))
        sink = np.zeros(n)
        sink[0] = min(strength, 6.0) * 0.5
        return _softmax(np.where(causal, 2.0 * temp * s + sink, -np.inf))
    if kind == "metastable":
        labels = rng.integers(0, clusters, size=(*batch, n))
        same = labels[..., :, None] == labels[..., None, :]
        return _softmax(s + strength * same)
    idx = np.arange(n)
    shift = rng.integers(1, max(2, n // 4), size=(*batch, 1, 1))
    dist = (idx[None, :] - idx[:, None] - shift) % n
    dist = np.minimum(dist, n - dist)
    if kind == "permutation":  # attend to the token `shift` places ahead, plus a little content
        return _softmax(0.5 * s + strength * (dist == 0))
    width = rng.uniform(1.5, 4.0, size=(*batch, 1, 1))  # circulant: a smooth window
    return _softmax(0.3 * s + strength * np.exp(-0.5 * (dist / width) ** 2))
