"""Gaussian diffusion for ε-prediction models: noise schedules, ``q_sample``, and DDIM / DDPM
samplers with optional Self-Attention Guidance (SAG), jitted and deterministic per seed.

Images live in ``[-1, 1]`` inside the diffusion; the samplers return them in ``[0, 1]``.
"""

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, ArrayLike, Float, Int

from .._util import check_alpha, is_concrete
from ._dit import check_labels
from ._sag import CHAINS, _mask_and_ok, mask_kind, sag_degrade

SCHEDULES = ("cosine", "linear")
SAMPLERS = ("ddim", "ddpm")


def alphas_cumprod(num_timesteps: int = 1000, /, *, schedule: str = "cosine") -> np.ndarray:
    r"""The cumulative products :math:`\bar\alpha_t`, ``t = 0 … T-1``, float64.

    ``"cosine"`` (Nichol & Dhariwal 2021, ADM's ``betas_for_alpha_bar``):
    :math:`\beta_t = \min(1 - f(t+1)/f(t),\ 0.999)`, :math:`f(t) = \cos^2\!\big(\tfrac{t/T +
    0.008}{1.008}\tfrac{\pi}{2}\big)`; ``"linear"`` (DDPM): :math:`\beta_t` from 1e-4 to 0.02
    (scaled by ``1000/T``). Then :math:`\bar\alpha_t = \prod_{s \le t}(1-\beta_s)`.

    Examples:
      >>> a = alphas_cumprod(1000)
      >>> round(float(a[500]), 2), round(float(alphas_cumprod(1000, schedule="linear")[500]), 3)
      (0.49, 0.078)
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    t = np.arange(num_timesteps, dtype=np.float64)
    if schedule == "cosine":
        f = lambda s: np.cos((s / num_timesteps + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = np.minimum(1.0 - f(t + 1) / f(t), 0.999)
    else:
        if num_timesteps <= 20:  # beta_end = 0.02 * 1000 / T reaches 1: alpha_bar <= 0, NaN
            raise ValueError(
                f"the linear schedule needs num_timesteps > 20 (its betas scale as 1000 / T and "
                f"reach 1 at T = 20), got {num_timesteps}; use schedule='cosine'"
            )
        scale = 1000.0 / num_timesteps
        betas = np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    return np.cumprod(1.0 - betas)


def q_sample(
    x0: Float[ArrayLike, " b *dims"],
    t: Int[ArrayLike, " b"],
    noise: Float[ArrayLike, " b *dims"],
    /,
    *,
    schedule: str = "cosine",
    num_timesteps: int = 1000,
) -> Float[Array, " b *dims"]:
    r"""The forward process :math:`x_t = \sqrt{\bar\alpha_t}x_0 + \sqrt{1-\bar\alpha_t}\varepsilon`.

    Args:
      x0: clean data, leading axis = batch.
      t: integer timesteps ``(B,)`` in ``[0, T)``.
      noise: :math:`\varepsilon`, the shape of ``x0``.

    Examples:
      >>> x = q_sample(jnp.ones((2, 3)), jnp.array([0, 999]), jnp.zeros((2, 3)))
      >>> x[:, 0].round(3).tolist()
      [1.0, 0.0]
    """
    x0 = jnp.asarray(x0, jnp.float32)
    abar = jnp.asarray(alphas_cumprod(num_timesteps, schedule=schedule), jnp.float32)
    a = abar[jnp.asarray(t)].reshape(-1, *([1] * (x0.ndim - 1)))
    return jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * jnp.asarray(noise, jnp.float32)


def timesteps(steps: int, num_timesteps: int = 1000, /) -> np.ndarray:
    """The sampling timesteps, descending: ``round(linspace(0, T-1, steps))`` reversed
    (improved-diffusion's ``space_timesteps``), so ``T-1`` and ``0`` are both visited.

    Examples:
      >>> timesteps(5, 1000).tolist()
      [999, 749, 500, 250, 0]
    """
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must lie in [1, num_timesteps={num_timesteps}], got {steps}")
    ts = np.round(np.linspace(0, num_timesteps - 1, steps)).astype(np.int32)
    return ts[::-1].copy()


# ----------------------------------------------------------------------------------------------
# model adapters: static (hashable) callables (params, x, t, y) -> (eps, aux)


@dataclasses.dataclass(frozen=True)
class _NNXApply:
    graphdef: object

    def __call__(self, params, x, t, y):
        return nnx.merge(self.graphdef, params)(x, t, y)


@dataclasses.dataclass(frozen=True)
class _FnApply:
    fn: Callable

    def __call__(self, params, x, t, y):
        del params
        return self.fn(x, t, y)


def _adapter(model):
    if isinstance(model, nnx.Module):
        graphdef, params = nnx.split(model)
        return _NNXApply(graphdef), params
    if callable(model):
        return _FnApply(model), None
    raise TypeError(
        f"model must be an nnx.Module or a callable (x, t, y) -> (eps, aux), got {type(model)}"
    )


# ----------------------------------------------------------------------------------------------
# the sampler


def _update(sampler, x, x0, eps, z, at, an, eta):
    """One sampler step from ``t`` (``ᾱ = at``) to the next step (``ᾱ = an``)."""
    if sampler == "ddim":  # Song et al. 2021, Eq. 12
        sigma = eta * jnp.sqrt((1.0 - an) / (1.0 - at) * (1.0 - at / an))
        noise_dir = jnp.sqrt(jnp.maximum(1.0 - an - sigma**2, 0.0))
        return jnp.sqrt(an) * x0 + noise_dir * eps + sigma * z
    # the posterior q(x_{t'} | x_t, x̂0) of the respaced chain, β' = 1 − ᾱ_t/ᾱ_{t'}
    beta = 1.0 - at / an
    c1 = beta * jnp.sqrt(an) / (1.0 - at)
    c2 = (1.0 - an) * jnp.sqrt(1.0 - beta) / (1.0 - at)
    var = beta * (1.0 - an) / (1.0 - at)
    return c1 * x0 + c2 * x + jnp.sqrt(var) * z


@functools.partial(
    jax.jit,
    static_argnames=(
        "apply", "sampler", "steps", "schedule", "num_timesteps", "shape", "clip",
        "sag", "sag_layer", "sag_chain", "n_label", "blur_size", "use_cfg", "null_label",
    ),
)  # fmt: skip
def _sample(
    params, labels, key, eta, sag_scale, sag_alpha, blur_sigma, cfg_scale, *,
    apply, sampler, steps, schedule, num_timesteps, shape, clip,
    sag, sag_layer, sag_chain, n_label, blur_size, use_cfg, null_label,
):  # fmt: skip
    b = labels.shape[0]
    abar_all = jnp.asarray(alphas_cumprod(num_timesteps, schedule=schedule), jnp.float32)
    ts = timesteps(steps, num_timesteps)
    nxt = np.concatenate([ts[1:], [-1]]).astype(np.int32)
    abar = abar_all[ts]
    abar_next = jnp.where(jnp.asarray(nxt) >= 0, abar_all[np.maximum(nxt, 0)], 1.0)
    key_init, key_steps = jax.random.split(key)
    x = jax.random.normal(key_init, (b, *shape), jnp.float32)

    def step(x, inp):
        i, t, at, an = inp
        tb = jnp.full((b,), t, jnp.int32)
        sa, s1a = jnp.sqrt(at), jnp.sqrt(1.0 - at)
        if use_cfg:  # one batch [uncond; cond]; SAG reads the uncond half (diffusers, Eq. 25)
            y2 = jnp.concatenate([jnp.full((b,), null_label, labels.dtype), labels])
            eps2, aux2 = apply(params, jnp.concatenate([x, x]), jnp.concatenate([tb, tb]), y2)
            eps2 = eps2.astype(jnp.float32)
            eps_u, eps_c = eps2[:b], eps2[b:]
            eps = eps_u + cfg_scale * (eps_c - eps_u)
            eps_sag, attn_sag, y_sag = eps_u, aux2["attn"][:b], y2[:b]
        else:
            eps, aux = apply(params, x, tb, labels)
            eps = eps.astype(jnp.float32)
            eps_sag, attn_sag, y_sag = eps, aux["attn"] if sag is not None else None, labels
        if sag is not None:
            # SAG (diffusers' StableDiffusionSAGPipeline): the mask from the same forward, the
            # unclipped x̂0, the degraded input re-noised with the same ε̂, same conditioning.
            x0 = (x - s1a * eps_sag) / sa
            depth = attn_sag.shape[1]
            if not -depth <= sag_layer < depth:  # static: an index past the end is clamped
                raise ValueError(
                    f"sag_layer must index one of the model's {depth} attention layers, got "
                    f"{sag_layer}"
                )
            mask, ok = _mask_and_ok(attn_sag[:, sag_layer], sag, n_label, sag_chain, sag_alpha)
            x_deg = sag_degrade(x0, eps_sag, mask, at, sigma=blur_sigma, size=blur_size)
            eps_deg, _ = apply(params, x_deg, tb, y_sag)
            eps = eps + sag_scale * (eps_sag - eps_deg.astype(jnp.float32))
            # a NaN distribution (NaN attention, alpha outside [0, 1]) gives an empty mask,
            # which would silently mean no guidance: NaN samples instead
            eps = jnp.where(ok[:, None, None, None], eps, jnp.nan)
        x0 = (x - s1a * eps) / sa
        if clip:  # clip x̂0 and re-derive ε̂ from it (ADM's ddim_sample)
            x0 = jnp.clip(x0, -1.0, 1.0)
            eps = (x - sa * x0) / s1a
        z = jax.random.normal(jax.random.fold_in(key_steps, i), x.shape, jnp.float32)
        return _update(sampler, x, x0, eps, z, at, an, eta), None

    inputs = (jnp.arange(steps), jnp.asarray(ts), abar, abar_next)
    x, _ = jax.lax.scan(step, x, inputs)
    return jnp.clip((x + 1.0) * 0.5, 0.0, 1.0)


def sample(
    model: nnx.Module | Callable,
    labels: Int[ArrayLike, " b"],
    /,
    *,
    seed: int | Array = 0,
    sampler: str = "ddim",
    steps: int = 50,
    eta: float = 0.0,
    schedule: str = "cosine",
    num_timesteps: int = 1000,
    clip: bool = True,
    cfg_scale: float | None = None,
    null_label: int | None = None,
    sag: str | None = None,
    sag_scale: float = 0.75,
    sag_layer: int | None = None,
    sag_chain: str = "image",
    sag_alpha: float = 0.99,
    blur_sigma: float = 1.0,
    blur_size: int = 9,
    n_label: int | None = None,
    shape: tuple[int, int, int] | None = None,
) -> Float[Array, "b h w c"]:
    r"""Samples images from an ε-prediction model with DDIM or ancestral DDPM, optionally with SAG.

    At each timestep ``t`` (``steps`` of them, :func:`timesteps`), with :math:`t'` the next one
    (:math:`\bar\alpha_{t'} = 1` after the last), the model gives :math:`\hat\varepsilon` and
    :math:`\hat x_0 = (x_t - \sqrt{1-\bar\alpha_t}\hat\varepsilon)/\sqrt{\bar\alpha_t}`, clipped to
    ``[-1, 1]`` with :math:`\hat\varepsilon` re-derived from it (``clip=True``). Then

    - ``"ddim"`` (Song et al. 2021, Eq. 12): :math:`x_{t'} = \sqrt{\bar\alpha_{t'}}\hat x_0 +
      \sqrt{1-\bar\alpha_{t'}-\sigma^2}\hat\varepsilon + \sigma z`, :math:`\sigma = \eta
      \sqrt{(1-\bar\alpha_{t'})/(1-\bar\alpha_t)}\sqrt{1-\bar\alpha_t/\bar\alpha_{t'}}`;
      ``eta=0`` is deterministic;
    - ``"ddpm"``: the posterior :math:`q(x_{t'}|x_t, \hat x_0)` of the respaced chain,
      :math:`\beta' = 1 - \bar\alpha_t/\bar\alpha_{t'}` (ADM), the model fed the original ``t``.

    With ``sag`` (``"column_sum"`` or ``"tokenrank"``), before the update: the mask
    :func:`sag_mask` of layer ``sag_layer``'s attention *from the same forward*, the
    unclipped :math:`\hat x_0` blurred inside it and re-noised with :math:`\hat\varepsilon`
    (:func:`sag_degrade`), a second forward gives :math:`\hat\varepsilon_{deg}`, and
    :math:`\tilde\varepsilon = \hat\varepsilon + s(\hat\varepsilon - \hat\varepsilon_{deg})`.
    ``sag_scale=0`` reproduces unguided sampling (at twice the cost).

    The initial noise and the step noise derive from ``seed`` only (one key per step via
    ``fold_in``), so a seed repeats its samples; float knobs (``eta``, ``sag_scale``,
    ``sag_alpha``, ``blur_sigma``) are traced and do not recompile.

    Args:
      model: a :class:`markov_attn.nn.DiT` (or any ``nnx.Module`` with its call contract), or
        a function ``(x, t, y) -> (eps, aux)``; ``aux["attn"]`` ``(B, depth, heads, n, n)``
        is read only with SAG. A module's parameters are traced (new weights do not
        recompile); a function is a static argument, so pass the same function object to
        reuse the compiled sampler.
      labels: ``(B,)`` class labels (the model's null label for unconditional samples).
      seed: integer seed (or a JAX key).
      sampler: ``"ddim"`` or ``"ddpm"``.
      steps: sampling steps.
      eta: DDIM noise scale (``"ddim"`` only).
      schedule, num_timesteps: the training schedule (:func:`alphas_cumprod`).
      clip: clip :math:`\hat x_0` to ``[-1, 1]`` in the update.
      cfg_scale: classifier-free guidance weight ``w``, :math:`\hat\varepsilon =
        \hat\varepsilon_u + w(\hat\varepsilon_c - \hat\varepsilon_u)` from one batch
        ``[null labels; labels]``; ``None`` = no CFG (one conditional forward). With SAG the
        mask, :math:`\hat x_0` and the degraded forward use the unconditional half and
        :math:`\tilde\varepsilon = \hat\varepsilon + s(\hat\varepsilon_u -
        \hat\varepsilon_{deg})` (diffusers' SAG pipeline).
      null_label: the unconditional label for CFG (default ``model.cfg.null_label``).
      sag: ``None`` (unguided), ``"column_sum"`` or ``"tokenrank"`` (``"colsum"`` is accepted).
      sag_scale: guidance scale ``s``.
      sag_layer: the block whose attention gives the mask (default ``depth // 2``).
      sag_chain: ``"image"`` (the renormalised image block) or ``"joint"`` (see
        :func:`sag_mask`).
      sag_alpha: TokenRank teleportation.
      blur_sigma, blur_size: the Gaussian blur (pixels).
      n_label: tokens before the image tokens (default ``model.cfg.n_label``).
      shape: ``(H, W, C)`` (default from ``model.cfg``).

    Returns:
      ``(B, H, W, C)`` float32 images in ``[0, 1]``.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if sag is not None:
        sag = mask_kind(sag, what="sag (or None)")
    if sag_chain not in CHAINS:
        raise ValueError(f"sag_chain must be one of {CHAINS}, got {sag_chain!r}")
    cfg = getattr(model, "cfg", None)
    if shape is None:
        if cfg is None:
            raise ValueError("pass shape=(H, W, C) for a model without a .cfg")
        shape = (cfg.image_size, cfg.image_size, cfg.in_channels)
    if n_label is None:
        n_label = getattr(cfg, "n_label", 0)
    if sag_layer is None:
        if sag is not None and cfg is None:
            raise ValueError("pass sag_layer= for a model without a .cfg")
        sag_layer = cfg.depth // 2 if cfg is not None else 0
    if sag is not None and is_concrete(blur_sigma) and not blur_sigma > 0:
        raise ValueError(f"blur_sigma must be > 0 (pixels), got {blur_sigma}")
    if sag == "tokenrank":
        check_alpha(sag_alpha)  # under jit a bad value gives NaN TokenRank: NaN samples
    depth = getattr(cfg, "depth", None)
    if depth is not None and -depth <= int(sag_layer) < 0:
        sag_layer = int(sag_layer) % depth  # -1 and depth - 1: one compiled sampler
    # (an index past the attention's depth is refused where it is used, in _sample)
    if cfg_scale is not None and null_label is None:
        if cfg is None:
            raise ValueError("pass null_label= for classifier-free guidance with this model")
        null_label = cfg.null_label
    timesteps(steps, num_timesteps)  # validates steps
    labels = jnp.asarray(labels, jnp.int32)
    if labels.ndim != 1:
        raise ValueError(f"labels must be (B,), got shape {labels.shape}")
    if cfg is not None and hasattr(cfg, "num_classes"):
        check_labels(labels, cfg.num_classes)
    if isinstance(seed, jax.Array) and jnp.issubdtype(seed.dtype, jax.dtypes.prng_key):
        key = seed
    elif np.shape(seed) == (2,) and np.asarray(seed).dtype == np.uint32:  # jax.random.PRNGKey
        key = jax.random.wrap_key_data(jnp.asarray(seed))
    else:
        key = jax.random.key(seed)
    apply, params = _adapter(model)
    return _sample(
        params, labels, key, jnp.float32(eta), jnp.float32(sag_scale), jnp.float32(sag_alpha),
        jnp.float32(blur_sigma), jnp.float32(0.0 if cfg_scale is None else cfg_scale),
        apply=apply, sampler=sampler, steps=int(steps),
        schedule=schedule, num_timesteps=int(num_timesteps), shape=tuple(int(s) for s in shape),
        clip=bool(clip), sag=sag, sag_layer=int(sag_layer), sag_chain=sag_chain,
        n_label=int(n_label), blur_size=int(blur_size), use_cfg=cfg_scale is not None,
        null_label=None if null_label is None else int(null_label),
    )  # fmt: skip


def ddim_sample(model, labels, /, **kwargs) -> Float[Array, "b h w c"]:
    """:func:`sample` with ``sampler="ddim"`` (deterministic with the default ``eta=0``)."""
    return sample(model, labels, sampler="ddim", **kwargs)


def ddpm_sample(model, labels, /, **kwargs) -> Float[Array, "b h w c"]:
    """:func:`sample` with ``sampler="ddpm"`` (ancestral; use many ``steps``, e.g. 250)."""
    return sample(model, labels, sampler="ddpm", **kwargs)


__all__ = [
    "SAMPLERS",
    "SCHEDULES",
    "alphas_cumprod",
    "ddim_sample",
    "ddpm_sample",
    "q_sample",
    "sample",
    "timesteps",
]
