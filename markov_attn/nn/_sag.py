"""Self-Attention Guidance (Hong et al. 2023) with a column-sum or a TokenRank mask.

SAG blurs the predicted clean image where one layer's self-attention concentrates, re-noises
it to the current step and pushes the sampler away from the model's prediction on that
degraded input. The reference (diffusers' ``StableDiffusionSAGPipeline``) masks the tokens
whose attention column sum, averaged over heads, exceeds 1; the TokenRank variant masks the
tokens whose stationary probability exceeds uniform.
"""

import math

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

import markov_attn as ma
from markov_attn._util import is_concrete

#: The SAG mask kinds: SAG's column sum (``ma.column_sum``) and TokenRank (``ma.tokenrank``).
MASK_KINDS = ("column_sum", "tokenrank")
CHAINS = ("image", "joint")
_OLD_KIND_NAMES = {"colsum": "column_sum"}  # the name before the library's vocabulary; accepted


def mask_kind(kind: str, /, *, what: str = "kind") -> str:
    """``kind`` as one of :data:`MASK_KINDS` (``"colsum"`` is accepted for ``"column_sum"``);
    ``ValueError`` naming the choices otherwise."""
    kind = _OLD_KIND_NAMES.get(kind, kind)
    if kind not in MASK_KINDS:
        raise ValueError(f"{what} must be one of {MASK_KINDS}, got {kind!r}")
    return kind


def sag_mask(
    attn: Float[Array, "*batch heads n n"],
    /,
    *,
    kind: str = "column_sum",
    n_label: int = 0,
    chain: str = "image",
    alpha: float = 0.99,
) -> Bool[Array, "*batch n_image"]:
    r"""The SAG mask of one layer's attention: the image tokens that draw above-uniform attention.

    The heads are averaged first (a mean of chains is a chain). With ``chain="image"`` (the
    default) the chain is the image→image block ``A[L:, L:]`` of that mean with its rows
    renormalised: close to the pure image self-attention that SAG reads in Stable Diffusion,
    but not equal to it: renormalising each head before the mean (which equals slicing each
    head's logits before its softmax) would weight the heads equally, while renormalising the
    mean weights each head by the mass its image rows keep after the label tokens. Over its
    :math:`n` tokens, with :math:`d` a distribution,

    .. math:: M_j = [\, n\, d_j > 1 \,],

    where :math:`d` = ``ma.column_sum(A)`` for ``kind="column_sum"`` (so :math:`n d_j` is column
    :math:`j`'s sum, SAG's rule ``> 1``) and :math:`d` = ``ma.tokenrank(A, alpha=alpha)`` for
    ``kind="tokenrank"``. With ``chain="joint"`` the distribution is taken over all
    :math:`L + N` tokens and the image part thresholded at its own mean.

    Args:
      attn: one layer's attention probabilities ``(..., heads, L+N, L+N)``, rows = queries.
      kind: ``"column_sum"`` or ``"tokenrank"`` (:data:`MASK_KINDS`; the old name
        ``"colsum"`` is accepted).
      n_label: tokens before the image tokens (``L``; ``DiTConfig.n_label``).
      chain: ``"image"`` or ``"joint"``.
      alpha: TokenRank teleportation (traced).

    Returns:
      ``(..., N)`` boolean mask over the image tokens (in their row-major patch order). Where
      the distribution is NaN (NaN attention, or under ``jit`` an ``alpha`` outside [0, 1])
      the mask is empty; :func:`sample` turns such samples NaN instead of unguided.

    Examples:
      >>> import jax.numpy as jnp
      >>> a = jnp.array([[[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.5, 0.1, 0.4]]])
      >>> sag_mask(a).tolist(), sag_mask(a, kind="tokenrank").tolist()
      ([True, False, False], [True, False, False])
    """
    kind = mask_kind(kind)
    if chain not in CHAINS:
        raise ValueError(f"chain must be one of {CHAINS}, got {chain!r}")
    attn = jnp.asarray(attn)
    if attn.ndim < 3 or attn.shape[-1] != attn.shape[-2] or not 0 <= n_label < attn.shape[-1]:
        raise ValueError(
            f"attn must be (..., heads, n, n) with n > n_label={n_label}, got {attn.shape}; "
            "pass one layer, e.g. aux['attn'][:, layer]"
        )
    return _mask_and_ok(attn, kind, n_label, chain, alpha)[0]


def _mask_and_ok(attn, kind, n_label, chain, alpha):
    """:func:`sag_mask` (checked arguments) and ``(...)`` flags of the masks that came from a
    finite distribution: a NaN one (NaN attention, or an ``alpha`` outside [0, 1] under
    ``jit``) compares False everywhere, an empty mask that would silently switch SAG off."""
    a = jnp.mean(attn.astype(jnp.float32), axis=-3)
    if chain == "image":
        a = a[..., n_label:, n_label:]
        a = a / jnp.sum(a, axis=-1, keepdims=True)
    dist = ma.column_sum(a) if kind == "column_sum" else ma.tokenrank(a, alpha=alpha)
    if chain == "joint":
        dist = dist[..., n_label:]
    mask = dist * dist.shape[-1] > jnp.sum(dist, axis=-1, keepdims=True)
    return mask, ~jnp.any(jnp.isnan(dist), axis=-1)


def gaussian_blur(
    x: Float[Array, "*batch h w c"], /, *, sigma: float = 1.0, size: int = 9
) -> Float[Array, "*batch h w c"]:
    """Separable Gaussian blur with reflect padding (diffusers' ``gaussian_blur_2d``).

    Taps :math:`\\propto e^{-x^2/2\\sigma^2}` on :math:`x = -(size-1)/2 … (size-1)/2`,
    normalised; padding repeats no edge pixel (PyTorch's ``"reflect"``).

    Args:
      x: images ``(..., H, W, C)``.
      sigma: standard deviation in pixels (traced).
      size: odd kernel size, smaller than ``2·min(H, W)``.

    Returns:
      The blurred images, float32.

    Examples:
      >>> float(gaussian_blur(jnp.full((8, 8, 1), 0.3)).max().round(6))
      0.3
    """
    if size % 2 != 1:
        raise ValueError(f"size must be odd, got {size}")
    if is_concrete(sigma) and not float(sigma) > 0:
        raise ValueError(f"sigma must be > 0 (pixels), got {sigma}; a blur of width 0 is no blur")
    x = jnp.asarray(x, jnp.float32)
    r = size // 2
    pos = jnp.arange(-r, r + 1, dtype=jnp.float32)
    taps = jnp.exp(-0.5 * (pos / jnp.asarray(sigma, jnp.float32)) ** 2)
    taps = taps / jnp.sum(taps)
    lead = [(0, 0)] * (x.ndim - 3)
    xp = jnp.pad(x, [*lead, (r, r), (0, 0), (0, 0)], mode="reflect")
    h = x.shape[-3]
    x = sum(taps[i] * xp[..., i : i + h, :, :] for i in range(size))
    xp = jnp.pad(x, [*lead, (0, 0), (r, r), (0, 0)], mode="reflect")
    w = x.shape[-2]
    return sum(taps[i] * xp[..., :, i : i + w, :] for i in range(size))


def upsample_mask(mask: Bool[Array, "*batch n"], /, *, image_size: int) -> Float[Array, "..."]:
    """Token mask ``(..., g²)`` (row-major grid) → pixel mask ``(..., H, W, 1)`` in {0, 1}, each
    token repeated over its patch (nearest upsampling)."""
    n = mask.shape[-1]
    g = math.isqrt(n)
    if g * g != n or image_size % g:
        raise ValueError(f"{n} tokens do not tile a {image_size}-px square image")
    p = image_size // g
    m = mask.reshape(*mask.shape[:-1], g, 1, g, 1).astype(jnp.float32)
    m = jnp.broadcast_to(m, (*mask.shape[:-1], g, p, g, p))
    return m.reshape(*mask.shape[:-1], image_size, image_size, 1)


def sag_degrade(
    x0: Float[Array, "b h w c"],
    eps: Float[Array, "b h w c"],
    mask: Bool[Array, "b n"],
    abar: Float[Array, ""],
    /,
    *,
    sigma: float = 1.0,
    size: int = 9,
) -> Float[Array, "b h w c"]:
    """SAG's degraded input: blur ``x0`` inside the (upsampled) mask and re-noise it at the same
    step with the same predicted noise, ``x̄_t = √ᾱ (M⊙blur(x̂0) + (1−M)⊙x̂0) + √(1−ᾱ) ε̂``.

    With ``x̂0`` and ``ε̂`` derived from one another (not clipped) this equals
    ``x_t + √ᾱ M⊙(blur(x̂0) − x̂0)``: outside the mask the input is unchanged.
    """
    m = upsample_mask(mask, image_size=x0.shape[-3])
    x0_bar = m * gaussian_blur(x0, sigma=sigma, size=size) + (1.0 - m) * x0
    return jnp.sqrt(abar) * x0_bar + jnp.sqrt(1.0 - abar) * eps


__all__ = [
    "CHAINS",
    "MASK_KINDS",
    "gaussian_blur",
    "mask_kind",
    "sag_degrade",
    "sag_mask",
    "upsample_mask",
]
