"""Layers shared by the ViT, its pooling heads and the diffusion transformer: the non-fused
multi-head attention core (which hands out its probabilities) and the two-layer MLP."""

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from ._config import GELUS, ViTConfig


def gelu(kind: str):
    """The GELU called ``kind`` (one of :data:`GELUS`) as a function."""
    if kind == "exact":
        return lambda x: jax.nn.gelu(x, approximate=False)
    if kind == "tanh":
        return lambda x: jax.nn.gelu(x, approximate=True)
    if kind == "quick":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    raise ValueError(f"gelu must be one of {GELUS}, got {kind!r}")


def attend(module: nnx.Module, qkv: Float[Array, "b n 3d"], num_heads: int):
    """Multi-head attention from a fused ``[q; k; v]`` projection, non-fused.

    ``qkv`` holds ``q``, ``k``, ``v`` one after the other on its last axis, heads contiguous
    inside each. The scores ``S = q kᵀ / √d`` and their softmax are computed in float32 whatever
    the input dtype. Under ``nnx.capture(model, nnx.Intermediate)`` the probabilities are sown
    on ``module`` as ``"attn"`` (Flax 0.12.8 deprecates ``sow`` outside ``capture``).

    Returns:
      ``(out (b, n, d), probs (b, heads, n, n), scores (b, heads, n, n))``, rows = queries.
    """
    b, n, three_d = qkv.shape
    d = three_d // 3
    head_dim = d // num_heads
    qkv = qkv.reshape(b, n, 3, num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    scale = jnp.float32(1.0 / math.sqrt(head_dim))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    probs = jax.nn.softmax(scores, axis=-1)
    if hasattr(module, "__captures__"):  # inside nnx.capture: sowing elsewhere is deprecated
        module.sow(nnx.Intermediate, "attn", probs)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v).reshape(b, n, d)
    return out, probs, scores


class Mlp(nnx.Module):
    """Two dense layers (Xavier-uniform kernels, zero biases) with a GELU between them.

    Args:
      width: input and output width.
      hidden: hidden width.
      act: the GELU variant (:data:`GELUS`).
      dtype: computation dtype (``None`` = from the inputs and parameters).
      param_dtype: parameter dtype.
      rngs: random streams for the initialisation.
    """

    def __init__(self, width: int, hidden: int, *, act: str = "exact", dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):  # fmt: skip
        kw = dict(
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=nnx.initializers.xavier_uniform(),
            bias_init=nnx.initializers.zeros_init(),
            rngs=rngs,
        )
        self.fc1 = nnx.Linear(width, hidden, **kw)
        self.fc2 = nnx.Linear(hidden, width, **kw)
        self.act = gelu(act)

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))


def vit_mlp(cfg: ViTConfig, *, rngs: nnx.Rngs) -> Mlp:
    """The MLP of a ViT block (and of the MAP head): ``width → mlp_dim → width``, ``cfg.gelu``."""
    return Mlp(cfg.width, cfg.mlp_dim, act=cfg.gelu, dtype=cfg.dtype,
               param_dtype=cfg.param_dtype, rngs=rngs)  # fmt: skip
