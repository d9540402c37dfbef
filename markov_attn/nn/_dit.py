"""A small class-conditional diffusion transformer with joint (MM-DiT) attention, in Flax NNX.

Two token streams share one softmax: ``n_label`` label tokens followed by the image patches
(``[label | image]``, FLUX order). Each stream has its own adaLN-zero modulation, QKV and output
projections and MLP (SD3's joint block), all conditioned on ``c = t_emb + y_emb`` (DiT; or on
``c = t_emb`` alone with ``DiTConfig(label_adaln=False)``, the label then entering only through
its tokens). The attention probabilities of every block are returned explicitly, like the
:class:`ViT`'s.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from .._util import is_concrete
from ._layers import Mlp, attend

_xavier = nnx.initializers.xavier_uniform()
_zeros = nnx.initializers.zeros_init()


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """Hyper-parameters of :class:`markov_attn.nn.DiT`.

    Attributes:
      image_size: square image side in pixels.
      patch_size: side of the square patches (``image_size // patch_size`` tokens per side).
      in_channels: image channels (NHWC input, the model predicts the same channels).
      width: token width ``D``.
      depth: number of joint blocks.
      num_heads: attention heads (``width`` must be divisible by it).
      mlp_ratio: MLP hidden width as a multiple of ``width`` (tanh-GELU, as DiT).
      num_classes: class labels ``0 .. num_classes - 1``; label ``num_classes`` is the null
        label (unconditional sampling, label dropout in training).
      n_label: label tokens placed before the image tokens in the joint sequence (``L``).
      single_stream: share every weight between the label and the image stream (an ablation;
        the default gives each stream its own modulation, projections and MLP, as SD3).
      label_adaln: add the label embedding to the adaLN conditioning, ``c = t_emb + y_emb``
        (DiT; the default). ``False`` gives ``c = t_emb`` and no ``y_embed`` table: the label
        reaches the image tokens only through the label tokens in the joint attention, so
        whatever the model reads of its class passes through the attention chain (issue #15's
        label-token maps). FLUX and SD3 do both: a pooled text vector in the modulation, the
        per-token text content through the joint attention; the default is the closer analogue.
        Both settings initialise every other weight alike (same seed, same values).
      freq_dim: size of the sinusoidal timestep features.
      norm_eps: LayerNorm epsilon.
      dtype: computation dtype (``None`` = from the inputs). The softmax runs in float32.
      param_dtype: parameter dtype.
    """

    image_size: int = 32
    patch_size: int = 4
    in_channels: int = 3
    width: int = 128
    depth: int = 6
    num_heads: int = 4
    mlp_ratio: float = 4.0
    num_classes: int = 10
    n_label: int = 4
    single_stream: bool = False
    label_adaln: bool = True
    freq_dim: int = 256
    norm_eps: float = 1e-6
    dtype: object = None
    param_dtype: object = jnp.float32

    def __post_init__(self):
        if self.width % self.num_heads:
            raise ValueError(
                f"DiTConfig.width ({self.width}) must be divisible by num_heads "
                f"({self.num_heads}); change one of them"
            )
        if self.width % 4:
            raise ValueError(
                f"DiTConfig.width ({self.width}) must be a multiple of 4 (2-D sin-cos "
                "position embedding)"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"DiTConfig.image_size ({self.image_size}) must be a multiple of patch_size "
                f"({self.patch_size})"
            )
        if self.n_label < 1 or self.num_classes < 1:
            raise ValueError(
                f"n_label and num_classes must be >= 1, got {self.n_label}, {self.num_classes}"
            )

    @property
    def grid(self) -> int:
        """Patch-grid side."""
        return self.image_size // self.patch_size

    @property
    def n_image(self) -> int:
        """Image tokens ``N = grid²``."""
        return self.grid**2

    @property
    def num_tokens(self) -> int:
        """Joint sequence length ``L + N``."""
        return self.n_label + self.n_image

    @property
    def null_label(self) -> int:
        """The label index of the unconditional (null) class."""
        return self.num_classes


def timestep_features(t: Float[Array, " b"], dim: int, *, max_period: float = 1e4):
    """DiT's sinusoidal timestep features: ``[cos(t·f), sin(t·f)]``, ``f_k = P^{-k/(dim/2)}``."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def sincos_pos_embed(width: int, grid: int) -> np.ndarray:
    """DiT's fixed 2-D sin-cos position embedding ``(grid², width)``, row-major patches: the
    first half of the channels encodes the column, the second half the row."""

    def one_d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))
    emb = np.concatenate([one_d(width // 2, gw), one_d(width // 2, gh)], axis=1)
    return emb.astype(np.float32)


def _modulate(x, shift, scale):
    return x * (1.0 + scale[:, None, :]) + shift[:, None, :]


def _linear(cfg: DiTConfig, d_in: int, d_out: int, rngs, *, zero: bool = False) -> nnx.Linear:
    return nnx.Linear(
        d_in,
        d_out,
        kernel_init=_zeros if zero else _xavier,
        bias_init=_zeros,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        rngs=rngs,
    )


def _norm(cfg: DiTConfig, rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(
        cfg.width,
        epsilon=cfg.norm_eps,
        use_bias=False,
        use_scale=False,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        rngs=rngs,
    )


def _mlp(cfg: DiTConfig, rngs) -> Mlp:
    return Mlp(cfg.width, int(cfg.width * cfg.mlp_ratio), act="tanh", dtype=cfg.dtype,
               param_dtype=cfg.param_dtype, rngs=rngs)  # fmt: skip


class JointAttention(nnx.Module):
    """One softmax over ``[label | image]`` tokens, each stream with its own projections.

    ``qkv``/``proj`` act on the image tokens, ``qkv_ctx``/``proj_ctx`` on the label tokens
    (diffusers' ``to_q/k/v``/``to_out`` and ``add_q/k/v_proj``/``to_add_out``); with
    ``single_stream`` the label tokens use the image weights. Non-fused: the probabilities
    ``(b, heads, L+N, L+N)`` (rows = queries) are returned and, under
    ``nnx.capture(model, nnx.Intermediate)``, sown as ``"attn"``.
    """

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        self.num_heads = cfg.num_heads
        self.qkv = _linear(cfg, cfg.width, 3 * cfg.width, rngs)
        self.proj = _linear(cfg, cfg.width, cfg.width, rngs)
        if cfg.single_stream:
            self.qkv_ctx = self.proj_ctx = None
        else:
            self.qkv_ctx = _linear(cfg, cfg.width, 3 * cfg.width, rngs)
            self.proj_ctx = _linear(cfg, cfg.width, cfg.width, rngs)

    def __call__(self, ctx: Float[Array, "b l d"], img: Float[Array, "b n d"]):
        """Returns ``(ctx_out, img_out, probs)``."""
        n_ctx = ctx.shape[1]
        qkv_ctx = self.qkv if self.qkv_ctx is None else self.qkv_ctx
        proj_ctx = self.proj if self.proj_ctx is None else self.proj_ctx
        qkv = jnp.concatenate([qkv_ctx(ctx), self.qkv(img)], axis=1)
        out, probs, _ = attend(self, qkv, self.num_heads)
        return proj_ctx(out[:, :n_ctx]), self.proj(out[:, n_ctx:]), probs


class JointBlock(nnx.Module):
    """MM-DiT block: per stream ``x += g₁·Attn(LN(x)(1+s₁)+b₁)``, ``x += g₂·MLP(LN(x)(1+s₂)+b₂)``,
    the six modulation vectors from ``Linear(SiLU(c))`` (zero-initialised: adaLN-zero), the
    attention shared over both streams."""

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        self.norm = _norm(cfg, rngs)  # no parameters: shared by both streams
        self.ada = _linear(cfg, cfg.width, 6 * cfg.width, rngs, zero=True)
        self.attn = JointAttention(cfg, rngs=rngs)
        self.mlp = _mlp(cfg, rngs)
        if cfg.single_stream:
            self.ada_ctx = self.mlp_ctx = None
        else:
            self.ada_ctx = _linear(cfg, cfg.width, 6 * cfg.width, rngs, zero=True)
            self.mlp_ctx = _mlp(cfg, rngs)

    def __call__(self, ctx, img, c):
        silu_c = jax.nn.silu(c)
        m_img = jnp.split(self.ada(silu_c), 6, axis=-1)
        ada_ctx = self.ada if self.ada_ctx is None else self.ada_ctx
        mlp_ctx = self.mlp if self.mlp_ctx is None else self.mlp_ctx
        m_ctx = jnp.split(ada_ctx(silu_c), 6, axis=-1)
        a_ctx, a_img, probs = self.attn(
            _modulate(self.norm(ctx), m_ctx[0], m_ctx[1]),
            _modulate(self.norm(img), m_img[0], m_img[1]),
        )
        ctx = ctx + m_ctx[2][:, None] * a_ctx
        img = img + m_img[2][:, None] * a_img
        ctx = ctx + m_ctx[5][:, None] * mlp_ctx(_modulate(self.norm(ctx), m_ctx[3], m_ctx[4]))
        img = img + m_img[5][:, None] * self.mlp(_modulate(self.norm(img), m_img[3], m_img[4]))
        return ctx, img, probs


def check_labels(y, num_classes: int) -> None:
    """Eager check that concrete labels lie in ``0 .. num_classes`` (the null label)."""
    if not is_concrete(y):
        return
    v = np.asarray(y)
    if not np.issubdtype(v.dtype, np.integer):
        raise ValueError(f"labels must be integers in 0 .. {num_classes}, got dtype {v.dtype}")
    if v.size and (v.min() < 0 or v.max() > num_classes):
        raise ValueError(
            f"labels must lie in 0 .. {num_classes} (0 .. {num_classes - 1} are the classes, "
            f"{num_classes} the null label for unconditional samples), got values in "
            f"[{v.min()}, {v.max()}]"
        )


def _rows(table, y):
    """``table[y]`` with NaN rows for labels outside the table (indexing would clamp or wrap)."""
    ok = (y >= 0) & (y < table.shape[0])
    return jnp.take(
        table, jnp.where(ok, y, table.shape[0]), axis=0, mode="fill", fill_value=jnp.nan
    )


class DiT(nnx.Module):
    """Class-conditional diffusion transformer with joint attention over label and image tokens.

    The joint sequence is ``[L label tokens | N image tokens]`` (``L = cfg.n_label``, image
    tokens row-major over the ``grid × grid`` patches, with fixed 2-D sin-cos position
    embeddings). The label tokens come from a ``(K+1, L, D)`` table and the conditioning vector
    is ``c = t_emb + y_emb`` with ``y_emb`` from a ``(K+1, D)`` table (``c = t_emb`` with
    ``cfg.label_adaln=False``); row ``K`` (the null label,
    ``cfg.null_label``) serves unconditional sampling and label dropout. adaLN-zero
    initialisation makes every block an identity and the output exactly 0 at initialisation.
    The network predicts the noise ``ε``.

    Attention is non-fused: every block's probabilities are returned in ``aux["attn"]``
    ``(B, depth, heads, L+N, L+N)`` (rows = queries, as the :class:`ViT`'s), so markov_attn's
    functions apply unchanged (slice ``[..., L:, L:]`` for the image tokens), and sown as
    ``nnx.Intermediate`` ``"attn"`` in ``blocks[i].attn`` under ``nnx.capture``.

    Args:
      cfg: the configuration.
      rngs: random streams for the initialisation.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from markov_attn.nn import DiT, DiTConfig
      >>> cfg = DiTConfig(image_size=8, patch_size=4, width=16, depth=2, num_heads=2,
      ...                 num_classes=3, n_label=2)
      >>> model = DiT(cfg, rngs=nnx.Rngs(0))
      >>> eps, aux = model(jnp.ones((2, 8, 8, 3)), jnp.array([10, 500]), jnp.array([0, 3]))
      >>> eps.shape, aux["attn"].shape, float(jnp.abs(eps).max())
      ((2, 8, 8, 3), (2, 2, 2, 6, 6), 0.0)
    """

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, p, k = cfg.width, cfg.patch_size, cfg.num_classes
        self.patch_embed = _linear(cfg, p * p * cfg.in_channels, d, rngs)
        self.t_fc1 = _linear(cfg, cfg.freq_dim, d, rngs)
        self.t_fc2 = _linear(cfg, d, d, rngs)
        std = nnx.initializers.normal(0.02)
        key = rngs.params()  # drawn either way: the other weights start as with label_adaln
        if cfg.label_adaln:
            self.y_embed = nnx.Param(std(key, (k + 1, d), cfg.param_dtype))
        self.label_tokens = nnx.Param(std(rngs.params(), (k + 1, cfg.n_label, d), cfg.param_dtype))
        self.blocks = nnx.List([JointBlock(cfg, rngs=rngs) for _ in range(cfg.depth)])
        self.final_norm = _norm(cfg, rngs)
        self.final_ada = _linear(cfg, d, 2 * d, rngs, zero=True)
        self.final_proj = _linear(cfg, d, p * p * cfg.in_channels, rngs, zero=True)

    def patchify(self, x: Float[Array, "b h w c"]) -> Float[Array, "b n pc"]:
        """``(B, H, W, C)`` → ``(B, N, p·p·C)``, patches row-major, pixels ``(py, px, c)``."""
        b, h, w, c = x.shape
        p = self.cfg.patch_size
        x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, (h // p) * (w // p), p * p * c)

    def unpatchify(self, x: Float[Array, "b n pc"]) -> Float[Array, "b h w c"]:
        """Inverse of :meth:`patchify` for a square grid."""
        cfg = self.cfg
        b, g, p, c = x.shape[0], cfg.grid, cfg.patch_size, cfg.in_channels
        x = x.reshape(b, g, g, p, p, c).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, g * p, g * p, c)

    def __call__(
        self,
        x: Float[Array, "b h w c"],
        t: Float[Array, " b"] | Int[Array, " b"],
        y: Int[Array, " b"],
    ):
        """Predicts the noise of ``x`` at timesteps ``t`` under labels ``y``.

        Args:
          x: noisy images ``(B, H, W, C)``, ``H = W = cfg.image_size``.
          t: timesteps ``(B,)`` (integers or floats, as the schedule counts them).
          y: labels ``(B,)`` in ``0 .. num_classes``; ``num_classes`` is the null label. Others
            raise eagerly; under ``jit`` they give NaN.

        Returns:
          ``(eps, aux)``: ``eps`` ``(B, H, W, C)`` float32; ``aux["attn"]``
          ``(B, depth, heads, L+N, L+N)`` float32 probabilities (rows = queries, the first
          ``L = aux["n_label"]`` tokens are the label tokens).
        """
        cfg = self.cfg
        b, h, w, _ = x.shape
        if (h, w) != (cfg.image_size, cfg.image_size):
            raise ValueError(
                f"images must be {cfg.image_size}x{cfg.image_size} (DiTConfig.image_size), "
                f"got {h}x{w}"
            )
        t = jnp.broadcast_to(jnp.asarray(t), (b,))
        y = jnp.broadcast_to(jnp.asarray(y), (b,))
        check_labels(y, cfg.num_classes)
        img = self.patch_embed(self.patchify(x))
        img = img + jnp.asarray(sincos_pos_embed(cfg.width, cfg.grid))[None].astype(img.dtype)
        t_emb = self.t_fc2(jax.nn.silu(self.t_fc1(timestep_features(t, cfg.freq_dim))))
        c = t_emb + _rows(self.y_embed[...], y) if cfg.label_adaln else t_emb
        ctx = _rows(self.label_tokens[...], y).astype(img.dtype)
        attn = []
        for block in self.blocks:
            ctx, img, probs = block(ctx, img, c)
            attn.append(probs)
        shift, scale = jnp.split(self.final_ada(jax.nn.silu(c)), 2, axis=-1)
        out = self.final_proj(_modulate(self.final_norm(img), shift, scale))
        eps = self.unpatchify(out).astype(jnp.float32)
        return eps, {"attn": jnp.stack(attn, axis=1), "n_label": cfg.n_label}
