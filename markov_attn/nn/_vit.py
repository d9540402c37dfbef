"""A Vision Transformer in Flax NNX that returns its attention explicitly."""

import itertools

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from ._config import ViTConfig
from ._layers import attend, vit_mlp
from ._pool import MAPHead, TokenRankPool
from ._posembed import resize_pos_embed

_xavier = nnx.initializers.xavier_uniform()
_zeros = nnx.initializers.zeros_init()


def _layer_norm(cfg: ViTConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(
        cfg.width, epsilon=cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs
    )


class Attention(nnx.Module):
    """Multi-head self-attention, non-fused, returning the attention probabilities.

    The fused ``qkv`` projection puts ``[q; k; v]`` on its output axis, heads contiguous inside
    each (``q = out[..., :width]`` reshaped to ``(heads, head_dim)``); the core is
    :func:`markov_attn.nn._layers.attend` (scores ``S = q kᵀ / √d`` and their softmax in float32
    whatever ``cfg.dtype`` is), shared with the diffusion transformer's joint attention.
    Capturing the probabilities rules out fused (flash) attention kernels.
    """

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.num_heads = cfg.num_heads
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, kernel_init=_xavier, rngs=rngs)
        self.qkv = nnx.Linear(cfg.width, 3 * cfg.width, use_bias=cfg.qkv_bias, **kw)
        self.proj = nnx.Linear(cfg.width, cfg.width, **kw)

    def __call__(self, x: Float[Array, "b n d"]):
        """Returns ``(out (b, n, d), probs (b, h, n, n), scores (b, h, n, n))``."""
        out, probs, scores = attend(self, self.qkv(x), self.num_heads)
        return self.proj(out), probs, scores


class Block(nnx.Module):
    """Pre-norm transformer block: ``x + ls1·attn(norm1(x))``, then ``x + ls2·mlp(norm2(x))``."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.norm1 = _layer_norm(cfg, rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.norm2 = _layer_norm(cfg, rngs)
        self.mlp = vit_mlp(cfg, rngs=rngs)
        if cfg.layer_scale is None:
            self.ls1 = self.ls2 = None
        else:
            init = jnp.full((cfg.width,), cfg.layer_scale, cfg.param_dtype)
            self.ls1 = nnx.Param(init)
            self.ls2 = nnx.Param(init)

    def __call__(self, x):
        y, probs, scores = self.attn(self.norm1(x))
        if self.ls1 is not None:
            y = y * self.ls1[...][None, None, :]
        x = x + y
        y = self.mlp(self.norm2(x))
        if self.ls2 is not None:
            y = y * self.ls2[...][None, None, :]
        return x + y, probs, scores


class ConvStem(nnx.Module):
    """Convolutional stem (``cfg.conv_stem``): per stage a 3×3 convolution (no bias), a
    ``BatchNorm``, a ReLU and a 2×2 max-pool, halving the resolution each time; with
    ``cfg.conv_stem_downsample == "stride"`` the convolutions have stride 2 and there is no
    pool (the early-convolution stem of Xiao et al., 2021: 4× fewer convolution outputs, so
    faster steps, but it learns more slowly here: see the README's ablation and
    ``docs/benchmarks.md``).

    The batch norms start in inference mode (running statistics, ``use_running_average=True``);
    training switches them with ``model.set_attributes(use_running_average=False)`` and carries
    their ``nnx.BatchStat`` state along with the parameters.
    """

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        chans = (cfg.in_channels, *cfg.conv_stem)
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.strided = cfg.conv_stem_downsample == "stride"
        stride = (2, 2) if self.strided else (1, 1)
        self.convs = nnx.List([
            nnx.Conv(cin, cout, (3, 3), strides=stride, padding="SAME", use_bias=False, **kw)
            for cin, cout in itertools.pairwise(chans)
        ])  # fmt: skip
        self.norms = nnx.List([
            nnx.BatchNorm(c, use_running_average=True, momentum=0.9, epsilon=1e-5, **kw)
            for c in cfg.conv_stem
        ])  # fmt: skip

    def __call__(self, x: Float[Array, "b h w c"]) -> Float[Array, "b h2 w2 c2"]:
        for conv, norm in zip(self.convs, self.norms):
            x = jax.nn.relu(norm(conv(x)))
            if not self.strided:
                x = nnx.max_pool(x, (2, 2), strides=(2, 2))
        return x


class ViT(nnx.Module):
    """Vision Transformer whose call returns every layer's attention as Markov chains.

    Tokens are ordered ``[CLS] [registers...] [patches, row-major]``. Each block is pre-norm;
    the attention is written out explicitly (no fused kernel) so that its probabilities, a
    row-stochastic chain per head (``attn[..., i, j]`` = weight query ``i`` puts on key ``j``),
    are returned in ``aux`` and can be differentiated through. They are also sown as
    ``nnx.Intermediate`` under the name ``"attn"`` in each ``blocks[i].attn`` when the model runs
    under ``nnx.capture(model, nnx.Intermediate)`` (Flax 0.12.8 deprecates ``sow`` outside
    ``capture``, so nothing is stored on plain calls).

    Pooling (``cfg.pool``):

    - ``"cls"``: the CLS token.
    - ``"mean"``: mean of the patch tokens (CLS and registers excluded).
    - ``"map"``: big_vision's MAP head, a learned probe query attending to the patch tokens
      (:class:`MAPHead`).
    - ``"tokenrank"``: TokenRank-weighted sum of the patch tokens, the weights taken from the
      last layer's attention (:class:`TokenRankPool`; no parameters of its own).

    Args:
      cfg: the configuration.
      rngs: random streams for the initialisation.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from markov_attn.nn import ViT, ViTConfig
      >>> cfg = ViTConfig(image_size=16, patch_size=8, width=16, depth=2, num_heads=2,
      ...                 mlp_dim=32, num_classes=3)
      >>> model = ViT(cfg, rngs=nnx.Rngs(0))
      >>> logits, aux = model(jnp.ones((2, 16, 16, 3)))
      >>> logits.shape, aux["attn"].shape
      ((2, 3), (2, 2, 2, 5, 5))
    """

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        p = cfg.patch_size // 2 ** len(cfg.conv_stem)
        self.stem = ConvStem(cfg, rngs=rngs) if cfg.conv_stem else None
        self.patch_embed = nnx.Conv(
            cfg.conv_stem[-1] if cfg.conv_stem else cfg.in_channels,
            cfg.width,
            (p, p),
            strides=(p, p),
            padding="VALID",
            use_bias=cfg.patch_bias,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            rngs=rngs,
        )
        std = nnx.initializers.normal(0.02)
        self.cls = (
            nnx.Param(std(rngs.params(), (1, 1, cfg.width), cfg.param_dtype))
            if (cfg.cls_token)
            else None
        )
        self.registers = (
            nnx.Param(std(rngs.params(), (1, cfg.num_registers, cfg.width), cfg.param_dtype))
            if cfg.num_registers
            else None
        )
        n_pos = (1 if cfg.cls_token and cfg.pos_embed_cls else 0) + cfg.pos_grid**2
        self.pos_embed = nnx.Param(std(rngs.params(), (1, n_pos, cfg.width), cfg.param_dtype))
        self.pre_norm = _layer_norm(cfg, rngs) if cfg.pre_norm else None
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.depth)])
        self.norm = _layer_norm(cfg, rngs) if cfg.final_norm != "none" else None
        self.map_head = MAPHead(cfg, rngs=rngs) if cfg.pool == "map" else None
        self.tokenrank_pool = TokenRankPool(cfg) if cfg.pool == "tokenrank" else None
        self.head = (
            nnx.Linear(
                cfg.width,
                cfg.num_classes,
                kernel_init=_zeros,
                dtype=cfg.dtype,
                param_dtype=cfg.param_dtype,
                rngs=rngs,
            )
            if cfg.num_classes
            else None
        )

    def _pos_embed(self, gh: int, gw: int):
        cfg = self.cfg
        pos = self.pos_embed[...]
        n_cls = 1 if cfg.cls_token and cfg.pos_embed_cls else 0
        pos_cls, pos_grid = pos[:, :n_cls], pos[:, n_cls:]
        g = cfg.pos_grid
        if (gh, gw) != (g, g):
            grid = pos_grid[0].reshape(g, g, cfg.width)
            grid = resize_pos_embed(grid, (gh, gw), method=cfg.pos_interp)
            pos_grid = grid.reshape(1, gh * gw, cfg.width).astype(pos.dtype)
        return pos_cls, pos_grid

    def __call__(
        self,
        images: Float[Array, "b h w c"],
        *,
        return_attn_logits: bool = False,
        return_hidden: bool = False,
    ):
        """Runs the model.

        Args:
          images: ``(B, H, W, C)`` float NHWC; ``H`` and ``W`` multiples of ``patch_size``.
            Other sizes than ``image_size`` resize the position-embedding grid
            (``cfg.pos_interp``).
          return_attn_logits: also return the attention logits, the pre-softmax scores
            ``q·k/√d`` (``aux["attn_logits"]``; what ``markov_attn.transition`` takes). The
            first output is the classifier's logits either way.
          return_hidden: also return the residual stream before each block and at the end.

        Returns:
          ``(logits, aux)``: ``logits`` ``(B, num_classes)``, or the pooled features
          ``(B, width)`` if ``num_classes == 0``. ``aux`` holds ``"attn"``
          ``(B, depth, heads, n, n)`` float32 probabilities (``n`` counts CLS and registers),
          ``"attn_logits"`` (same shape, if asked), ``"hidden"`` ``(B, depth + 1, n, width)``
          (embeddings, then each block's output before the final norm; if asked),
          ``"tokens"`` ``(B, n, width)`` (after the final norm if ``final_norm == "all"``),
          ``"pooled"`` ``(B, width)``, ``"num_prefix"`` (python int) and, for the TokenRank
          head, ``"pool_weights"`` ``(B, gh·gw)`` (TokenRank over the patch tokens).
        """
        cfg = self.cfg
        b, h, w, _ = images.shape
        if h % cfg.patch_size or w % cfg.patch_size:
            raise ValueError(
                f"image sides must be multiples of patch_size={cfg.patch_size}, got {h}x{w}; "
                "resize or crop the images"
            )
        x = self.patch_embed(images if self.stem is None else self.stem(images))
        if cfg.patch_norm:
            mean = jnp.mean(x, axis=(1, 2), keepdims=True)
            var = jnp.var(x, axis=(1, 2), keepdims=True)
            x = (x - mean) * jax.lax.rsqrt(var + cfg.norm_eps)
        gh, gw = x.shape[1], x.shape[2]
        x = x.reshape(b, gh * gw, cfg.width)
        pos_cls, pos_grid = self._pos_embed(gh, gw)
        x = x + pos_grid.astype(x.dtype)
        prefix = []
        if self.cls is not None:
            cls = self.cls[...]
            if cfg.pos_embed_cls:
                cls = cls + pos_cls
            prefix.append(jnp.broadcast_to(cls, (b, 1, cfg.width)).astype(x.dtype))
        if self.registers is not None:
            reg = self.registers[...]
            prefix.append(jnp.broadcast_to(reg, (b, *reg.shape[1:])).astype(x.dtype))
        if prefix:
            x = jnp.concatenate([*prefix, x], axis=1)
        if self.pre_norm is not None:
            x = self.pre_norm(x)

        hidden, attn, scores = [x], [], []
        for block in self.blocks:
            x, p, s = block(x)
            hidden.append(x)
            attn.append(p)
            scores.append(s)

        tokens = self.norm(x) if cfg.final_norm == "all" else x
        num_prefix = cfg.num_prefix
        aux = {"attn": jnp.stack(attn, axis=1), "num_prefix": num_prefix}
        if cfg.pool == "cls":
            pooled = tokens[:, 0]
        elif cfg.pool == "mean":
            pooled = tokens[:, num_prefix:].mean(axis=1)
        elif cfg.pool == "map":
            pooled = self.map_head(tokens[:, num_prefix:])
        else:
            pooled, weights = self.tokenrank_pool(scores[-1], tokens, num_prefix=num_prefix)
            aux["pool_weights"] = weights
        if cfg.final_norm == "pooled":
            pooled = self.norm(pooled)
        logits = self.head(pooled) if self.head is not None else pooled

        if return_attn_logits:
            aux["attn_logits"] = jnp.stack(scores, axis=1)
        if return_hidden:
            aux["hidden"] = jnp.stack(hidden, axis=1)
        aux["tokens"] = tokens
        aux["pooled"] = pooled
        return logits, aux
