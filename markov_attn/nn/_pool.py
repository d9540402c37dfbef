"""Pooling heads: big_vision's MAP head and the differentiable TokenRank head."""

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

import markov_attn as ma

from ._config import ViTConfig
from ._layers import vit_mlp


class MAPHead(nnx.Module):
    """Multihead attention pooling (big_vision ``MAPHead``).

    A learned probe query attends to the tokens with a multi-head attention layer
    (``cfg.num_heads`` heads), then a residual MLP (``cfg.mlp_dim``) with a pre-LayerNorm; the
    probe's output is the pooled vector.

    Args:
      cfg: the ViT configuration (``width``, ``num_heads``, ``mlp_dim``, ``gelu``).
      rngs: random streams for the initialisation.
    """

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        xavier = nnx.initializers.xavier_uniform()
        self.probe = nnx.Param(xavier(rngs.params(), (1, 1, cfg.width), cfg.param_dtype))
        self.attn = nnx.MultiHeadAttention(
            cfg.num_heads,
            cfg.width,
            kernel_init=xavier,
            decode=False,
            keep_rngs=False,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            rngs=rngs,
        )
        self.norm = nnx.LayerNorm(
            cfg.width, epsilon=cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs
        )
        self.mlp = vit_mlp(cfg, rngs=rngs)

    def __call__(self, tokens: Float[Array, "b n d"]) -> Float[Array, "b d"]:
        b = tokens.shape[0]
        probe = jnp.broadcast_to(self.probe[...], (b, 1, tokens.shape[-1])).astype(tokens.dtype)
        x = self.attn(probe, tokens, deterministic=True)
        x = x + self.mlp(self.norm(x))
        return x[:, 0]


class TokenRankPool(nnx.Module):
    """Pools the patch tokens with TokenRank weights from the last layer's attention.

    Which tokens take part: the chain is built over the **patch tokens only**. CLS and the
    registers are removed from the last layer's pre-softmax scores *before* the softmax
    (``markov_attn.transition(scores, keep=slice(num_prefix, None))``, as the reference code
    does for CLS), so every row is a distribution over patch keys. The heads' chains
    ``P_h`` are averaged with weights ``w_h`` from their ``|λ2|``
    (``markov_attn.head_weights(second_eigenvalue(P), weighting=cfg.tokenrank_weighting)``), and the
    pooled vector is

    .. math::

       \\mathrm{pooled} = \\sum_j \\pi_j\\, t_j, \\qquad
       \\pi = \\mathrm{TokenRank}_{\\alpha}\\Big(\\sum_h w_h P_h\\Big),

    with ``t_j`` the final patch tokens. Gradients flow through ``π`` by the implicit VJP of
    :func:`markov_attn.tokenrank` into the last layer's queries and keys, and through the
    tokens as usual. The head weights ``w`` are wrapped in ``jax.lax.stop_gradient``: the
    eigenvalue estimator's derivative is expensive and ill-conditioned near repeated
    eigenvalues, so no gradient flows through ``w``; ``|λ2|`` comes from a short Arnoldi run
    (``cfg.tokenrank_krylov`` steps). The head has no parameters.

    Args:
      cfg: the ViT configuration (``tokenrank_alpha``, ``tokenrank_weighting``).
    """

    def __init__(self, cfg: ViTConfig):
        self.alpha = cfg.tokenrank_alpha
        self.weighting = cfg.tokenrank_weighting
        self.krylov = cfg.tokenrank_krylov

    def weights(
        self, scores: Float[Array, "b h n n"], /, *, num_prefix: int
    ) -> Float[Array, "b m"]:
        """TokenRank ``π`` over the ``m = n - num_prefix`` patch tokens (sums to 1)."""
        keep = slice(num_prefix, None) if num_prefix else None
        chains = ma.transition(scores, keep=keep)  # (b, h, m, m), float32
        if self.weighting == "uniform":
            w = jnp.full(chains.shape[:-2], 1.0 / chains.shape[-3], jnp.float32)
        else:
            lam2 = ma.second_eigenvalue(jax.lax.stop_gradient(chains), krylov=self.krylov)
            w = ma.head_weights(lam2, weighting=self.weighting)
        w = jax.lax.stop_gradient(w)
        chain = ma.average(chains, weights=w, axis=-3)  # (b, m, m)
        return ma.tokenrank(chain, alpha=self.alpha)

    def __call__(
        self, scores: Float[Array, "b h n n"], tokens: Float[Array, "b n d"], /, *, num_prefix: int
    ):
        """Returns ``(pooled (b, d), π (b, m))`` from the last layer's scores and final tokens."""
        pi = self.weights(scores, num_prefix=num_prefix)
        patches = tokens[:, num_prefix:]
        pooled = jnp.einsum("bm,bmd->bd", pi.astype(patches.dtype), patches)
        return pooled, pi
