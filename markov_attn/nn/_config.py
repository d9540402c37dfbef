"""The ViT configuration (a frozen dataclass shared by training and the checkpoint loaders)."""

import dataclasses

import jax.numpy as jnp

from markov_attn._weights import HEAD_WEIGHTINGS

from ._posembed import POS_INTERPS

POOLS = ("cls", "mean", "map", "tokenrank")
GELUS = ("exact", "tanh", "quick")
FINAL_NORMS = ("all", "pooled", "none")
STEM_DOWNSAMPLES = ("maxpool", "stride")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Hyper-parameters of :class:`markov_attn.nn.ViT`.

    Attributes:
      image_size: square input side in pixels that the position-embedding grid was made for.
      patch_size: side of the square patches (the patch-embedding convolution's kernel and stride).
      in_channels: input channels (NHWC input).
      width: token width ``D``.
      depth: number of transformer blocks.
      num_heads: attention heads per block (``width`` must be divisible by it).
      mlp_dim: hidden width of the MLP in each block.
      num_classes: classifier outputs; ``0`` = backbone only (the logits are the pooled features).
      cls_token: prepend a learned CLS token.
      num_registers: DINOv2-style register tokens, placed after CLS, without position embedding.
      pos_embed_cls: the position embedding has a slot for CLS (HF ViT, DINOv2, CLIP);
        ``False`` = patches only (timm ``no_embed_class``).
      pos_interp: how the patch grid of the position embedding is resized for another input
        size: ``"bicubic"`` (PyTorch bicubic, ``align_corners=False``, no antialias) or
        ``"bicubic_antialias"`` (``jax.image.resize`` cubic with antialias).
      pos_size: the input side in pixels that the stored position-embedding grid was made for,
        when it differs from ``image_size`` (a checkpoint loaded for another size keeps its own
        grid, so that every input size is resized from it, as in PyTorch, never from an
        already resized grid); ``None`` = ``image_size``.
      pool: ``"cls"`` | ``"mean"`` | ``"map"`` | ``"tokenrank"`` (see :class:`ViT`).
      gelu: ``"exact"`` (erf, PyTorch default) | ``"tanh"`` | ``"quick"`` (``x·σ(1.702x)``, CLIP).
      layer_scale: LayerScale initial value; ``None`` = no layer scale.
      norm_eps: LayerNorm epsilon.
      pre_norm: apply a LayerNorm to the embeddings before the first block (CLIP).
      final_norm: ``"all"`` = final norm on every token (HF ViT, DINOv2, timm);
        ``"pooled"`` = on the pooled vector only (CLIP); ``"none"``.
      qkv_bias: bias in the fused ``qkv`` projection.
      patch_bias: bias in the patch-embedding convolution.
      conv_stem: output channels of a convolutional stem run before the patch embedding
        (a hybrid ViT, Dosovitskiy et al. 2021; Xiao et al. 2021): one stage per entry, a 3×3
        convolution, a batch normalisation, a ReLU and a 2×2 max-pool. The patch embedding then
        has kernel and stride ``patch_size // 2**len(conv_stem)``, so the token grid
        (``grid``) and everything built on it (attention maps, TokenRank pooling,
        segmentation) are unchanged. The batch norms use their running statistics unless
        switched to batch statistics for training (``use_running_average=False``, as
        ``experiments/train.py`` does). ``()`` = the plain linear patch embedding (every
        pretrained family).
      patch_norm: standardise each channel of the patch embeddings over the patch grid of each
        image (instance normalisation, no parameters) before the position embedding is added.
        It removes an image's global colour and brightness from the tokens, which lets a small
        ViT trained from scratch on the segmentation benchmark (random object colours, natural
        photo backgrounds) leave the chance plateau; off in every pretrained family.
      tokenrank_alpha: teleportation ``α`` of the TokenRank head.
      tokenrank_weighting: head weighting of the TokenRank head, from each head's ``|λ2|``:
        ``"lambda2"`` | ``"gap"`` | ``"uniform"`` (:func:`markov_attn.head_weights`).
      tokenrank_krylov: Krylov dimension of the Arnoldi ``|λ2|`` estimate behind the head
        weights (:func:`markov_attn.second_eigenvalue`). The weights only steer the average;
        16 keeps the head's overhead small (measured on random 64-token chains, |λ2| within
        0.07 and the weights within 0.035 at 16, within 3e-3 at 32 for 5x the cost).
      dtype: computation dtype of the layers (``None`` = from the inputs and parameters).
        Attention softmax and TokenRank always run in float32.
      param_dtype: parameter dtype.
    """

    image_size: int = 64
    patch_size: int = 8
    in_channels: int = 3
    width: int = 128
    depth: int = 6
    num_heads: int = 4
    mlp_dim: int = 512
    num_classes: int = 10
    cls_token: bool = True
    num_registers: int = 0
    pos_embed_cls: bool = True
    pos_interp: str = "bicubic"
    pos_size: int | None = None
    pool: str = "cls"
    gelu: str = "exact"
    layer_scale: float | None = None
    norm_eps: float = 1e-6
    pre_norm: bool = False
    final_norm: str = "all"
    qkv_bias: bool = True
    patch_bias: bool = True
    conv_stem: tuple[int, ...] = ()
    conv_stem_downsample: str = "maxpool"
    patch_norm: bool = False
    tokenrank_alpha: float = 0.99
    tokenrank_weighting: str = "lambda2"
    tokenrank_krylov: int = 16
    dtype: object = None
    param_dtype: object = jnp.float32

    def __post_init__(self):
        checks = (
            ("pool", self.pool, POOLS),
            ("gelu", self.gelu, GELUS),
            ("final_norm", self.final_norm, FINAL_NORMS),
            ("pos_interp", self.pos_interp, POS_INTERPS),
            ("tokenrank_weighting", self.tokenrank_weighting, HEAD_WEIGHTINGS),
        )
        for name, value, allowed in checks:
            if value not in allowed:
                raise ValueError(f"ViTConfig.{name} must be one of {allowed}, got {value!r}")
        if self.width % self.num_heads:
            raise ValueError(
                f"ViTConfig.width ({self.width}) must be divisible by num_heads "
                f"({self.num_heads}); change one of them"
            )
        for name in ("image_size", "pos_size"):
            size = getattr(self, name)
            if size is not None and (size < self.patch_size or size % self.patch_size):
                raise ValueError(
                    f"ViTConfig.{name} ({size}) must be a positive multiple of patch_size "
                    f"({self.patch_size})"
                )
        if self.conv_stem_downsample not in STEM_DOWNSAMPLES:
            raise ValueError(
                f"conv_stem_downsample must be one of {STEM_DOWNSAMPLES}, "
                f"got {self.conv_stem_downsample!r}"
            )
        stride = 2 ** len(self.conv_stem)
        if self.patch_size % stride or any(int(c) < 1 for c in self.conv_stem):
            raise ValueError(
                f"ViTConfig.conv_stem {self.conv_stem} halves the resolution "
                f"{len(self.conv_stem)} times, so patch_size ({self.patch_size}) must be a "
                f"multiple of {stride} (and every channel count >= 1); drop stem layers or "
                "enlarge the patches"
            )
        object.__setattr__(self, "conv_stem", tuple(int(c) for c in self.conv_stem))
        if self.pool == "cls" and not self.cls_token:
            raise ValueError("pool='cls' needs cls_token=True; or pick pool='mean'/'map'")
        if self.num_registers < 0:
            raise ValueError(f"num_registers must be >= 0, got {self.num_registers}")

    @property
    def num_prefix(self) -> int:
        """Tokens before the patches: CLS (if any) plus the registers."""
        return int(self.cls_token) + self.num_registers

    @property
    def grid(self) -> int:
        """Patch-grid side at ``image_size``."""
        return self.image_size // self.patch_size

    @property
    def pos_grid(self) -> int:
        """Side of the stored position-embedding grid (``pos_size``, else ``image_size``)."""
        return (self.pos_size or self.image_size) // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Sequence length ``n`` at ``image_size`` (prefix tokens plus patches)."""
        return self.num_prefix + self.grid**2
