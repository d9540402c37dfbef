"""Named presets for :func:`experiments.train_dit.train_and_evaluate` (the diffusion transformer).

Every preset is a function returning a frozen :class:`DiTTrainConfig`; its docstring gives the
command, the runtime and the expected numbers. ``get_preset(name, **overrides)`` overrides
training fields and :class:`markov_attn.nn.DiTConfig` fields by name.
"""

import dataclasses

from markov_attn.nn import DiTConfig

from .configs import DATASETS, check_schedule_and_counts

LOSS_WEIGHTS = ("eps", "v")


@dataclasses.dataclass(frozen=True)
class DiTTrainConfig:
    """One diffusion training run: ε-prediction MSE at uniform integer ``t``, AdamW, EMA.

    Attributes:
      model: the DiT configuration.
      name: preset name.
      data: ``"bench"`` (the benchmark images, ``markov_attn.data.make_split``, with their
        Fashion-MNIST labels as classes) or ``"synthetic"`` (class colours plus noise; tests).
      train_size, test_size: images generated once and kept in memory as uint8.
      data_root: Fashion-MNIST directory for ``"bench"``.
      data_seed: seed of the data generator.
      batch_size, steps: images per step, optimiser steps.
      lr, warmup_steps, end_lr_ratio: AdamW peak rate, linear warm-up, cosine decay to
        ``lr * end_lr_ratio``.
      weight_decay: AdamW decoupled weight decay, on parameters of rank >= 2 (matrices,
        embeddings, per-head attention biases).
      grad_clip: global-norm clipping (``0`` = off).
      flip: random horizontal flips.
      label_dropout: probability of replacing a label by the null label (trains the
        unconditional path; DiT uses 0.1, unconditional SAG needs more of it).
      ema_decay: EMA decay of the weights, warmed up as ``min(decay, (1+k)/(10+k))``.
      loss_weight: ``"eps"`` (the plain ε-MSE, weight 1 at every t) or ``"v"``: each sample's
        ε-MSE weighted by ``min(1 + 1/SNR(t), loss_weight_cap)``, SNR = ᾱ/(1 − ᾱ). In terms of
        the error of the implied x̂0 the ε-MSE is ``SNR · ‖x̂0 − x0‖²``, nearly blind to x̂0 at
        high noise, where the class is what the model needs most; ``"v"`` makes it
        ``(1 + SNR) · ‖x̂0 − x0‖²``, the v-prediction loss (Salimans & Ho 2022), up to the cap
        (t ≥ 793 at 10 for the cosine schedule), which keeps t near T (weights up to 4e8)
        from dominating the batch. The held-out loss stays the plain ε-MSE.
      loss_weight_cap: the cap of the ``"v"`` weight (≥ 1).
      schedule, num_timesteps: the noise schedule (:func:`markov_attn.nn.alphas_cumprod`).
      seed: initialisation, data order, timesteps, noise, dropout, flips.
      ckpt_every, keep_checkpoints, log_every: checkpointing and logging.
      eval_batch_size: batch size of the held-out denoising loss.
    """

    model: DiTConfig
    name: str = "custom"
    data: str = "bench"
    train_size: int = 20_000
    test_size: int = 512
    data_root: str | None = None
    data_seed: int = 0
    batch_size: int = 64
    steps: int = 1_000
    lr: float = 5e-4
    warmup_steps: int = 100
    end_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    flip: bool = True
    label_dropout: float = 0.2
    ema_decay: float = 0.999
    loss_weight: str = "eps"
    loss_weight_cap: float = 10.0
    schedule: str = "cosine"
    num_timesteps: int = 1000
    seed: int = 0
    ckpt_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 20
    eval_batch_size: int = 128

    def __post_init__(self):
        if self.data not in DATASETS:
            raise ValueError(f"data must be one of {DATASETS}, got {self.data!r}")
        if self.batch_size > self.train_size:
            raise ValueError(
                f"batch_size ({self.batch_size}) exceeds train_size ({self.train_size})"
            )
        if min(self.steps, self.ckpt_every, self.log_every, self.batch_size) < 1:
            raise ValueError("steps, ckpt_every, log_every and batch_size must be >= 1")
        if self.ckpt_every % self.log_every:
            raise ValueError(
                f"ckpt_every ({self.ckpt_every}) must be a multiple of log_every "
                f"({self.log_every}) so that a resumed run logs the same windows"
            )
        check_schedule_and_counts(self)
        if not 0.0 <= self.label_dropout <= 1.0 or not 0.0 <= self.ema_decay < 1.0:
            raise ValueError("label_dropout must lie in [0, 1] and ema_decay in [0, 1)")
        if self.loss_weight not in LOSS_WEIGHTS:
            raise ValueError(f"loss_weight must be one of {LOSS_WEIGHTS}, got {self.loss_weight!r}")
        if not 1.0 <= self.loss_weight_cap < float("inf"):
            raise ValueError(
                f"loss_weight_cap must be a finite float >= 1, got {self.loss_weight_cap}"
            )


def smoke() -> DiTTrainConfig:
    """CI smoke run: a tiny DiT on 32 px images, a few steps.

    Command: ``python -m experiments.train_dit --preset smoke --data synthetic --workdir runs/s``.
    Runtime: about 15-30 s on 2 cores (compilation). Expected: finishes, loss finite (near 1).
    """
    return DiTTrainConfig(
        model=DiTConfig(width=32, depth=2, num_heads=2, n_label=2),
        name="smoke",
        train_size=64,
        test_size=32,
        batch_size=16,
        steps=6,
        warmup_steps=1,
        ckpt_every=2,
        log_every=2,
        ema_decay=0.9,
        eval_batch_size=32,
    )


def quick() -> DiTTrainConfig:
    """A short demonstration run (≤ 5 min on 2 cores): a width-96, depth-4 DiT.

    Command: ``python -m experiments.train_dit --preset quick --workdir runs/dit_quick``.
    Runtime: 4.4 min measured with the cores shared (400 steps of 32 images at 0.58 s, 55
    img/s, plus ~40 s of data and compilation).
    Expected (measured, seed 0): training loss 0.976 (first 20 steps) → 0.103 (last 20), EMA
    held-out denoising loss 0.099; DDIM samples are patchy colour fields, not objects.
    """
    return DiTTrainConfig(
        model=DiTConfig(width=96, depth=4, num_heads=4, n_label=4),
        name="quick",
        train_size=8_000,
        test_size=256,
        batch_size=32,
        steps=400,
        lr=1e-3,
        warmup_steps=40,
        ckpt_every=100,
        log_every=20,
        ema_decay=0.995,
    )


def cpu() -> DiTTrainConfig:
    """The CPU run: the recommended small MM-DiT (D=128, depth 6, 4 heads, patch 4, 4 label
    tokens; 64 image tokens), 32 px benchmark images.

    Command: ``python -m experiments.train_dit --preset cpu --workdir runs/dit_cpu``.
    Runtime: ≤ 45 min on 2 cores: 32.5 min measured on 2026-12-07 (1.57 s a step at
    ``nice 19`` behind a ViT training run on the same cores); 2.19 s a step in an earlier
    ``--steps 40`` measurement with the cores shared (1-minute load about 6).
    Expected: soft samples with the right layout (object on a background), far from
    convergence. Measured: EMA held-out denoising loss 0.0916; a wrong label costs +0.010 %
    [+0.001, +0.018] of the loss (+0.025 % on the objects' pixels; README).
    """
    return DiTTrainConfig(
        model=DiTConfig(width=128, depth=6, num_heads=4, n_label=4),
        name="cpu",
        train_size=20_000,
        test_size=512,
        batch_size=64,
        steps=1_200,
        lr=5e-4,
        warmup_steps=100,
        ckpt_every=100,
        log_every=20,
        ema_decay=0.999,
    )


def cpu_long() -> DiTTrainConfig:
    """The ``cpu`` model and recipe trained 4× as long, on 3× the images: 4,800 steps of 64
    over 60,000 training images (about 5 passes), with a checkpoint kept every 400 steps so
    that the label-use curve (``python -m experiments.label_use``) can be read afterwards.

    Command: ``python -m experiments.train_dit --preset cpu_long --workdir runs/dit_cpu_long``.
    Runtime: 111 min measured (2026-12-07, 1.37 s a step with the cores shared by tests and
    benchmarks for about half of it; 1.05 s a step on idle cores, 0.97 s for ``--steps 40`` of
    ``cpu``). Why: the ``cpu`` model (1,200 steps) ignores its label (issue #15); this run asks
    whether a longer run on the CPU starts to use it. Measured: training loss 0.994 → 0.063,
    EMA held-out denoising loss 0.0723 (``cpu``: 0.092).
    """
    return dataclasses.replace(
        cpu(),
        name="cpu_long",
        train_size=60_000,
        steps=4_800,
        ckpt_every=400,
        keep_checkpoints=12,
    )


def cpu_tokens() -> DiTTrainConfig:
    """The ``cpu`` run with the label only in its tokens (``DiTConfig(label_adaln=False)``).

    Command: ``python -m experiments.train_dit --preset cpu_tokens --workdir runs/dit_cpu_tokens``.
    Why: with ``c = t_emb + y_emb`` every block's modulation already carries the class, so the
    model need not read it through the label tokens' attention, and the label-token maps of
    issue #15 need not be about the class. Here the class can reach the image only through
    the joint attention. A checkpoint is kept every 200 steps for the label-use curve
    (``python -m experiments.label_use``).
    Runtime: 27.6 min measured (2026-12-07, 1.29 s a step at ``nice 19`` behind a ViT training
    run on the same 2 cores). Measured: training loss 0.994 → 0.079, EMA held-out denoising
    loss 0.0916 (``cpu``: 0.0916); a wrong label costs it hardly anything (+0.002 %
    [−0.000, +0.004]; +0.018 % at t = 800), though on the objects' pixels the true label beats
    the null label by +0.021 % [+0.017, +0.025] (README).
    """
    return dataclasses.replace(
        cpu(),
        model=dataclasses.replace(cpu().model, label_adaln=False),
        name="cpu_tokens",
        ckpt_every=200,
        keep_checkpoints=6,
    )


def cpu_tokens_v() -> DiTTrainConfig:
    """``cpu_tokens`` (the label only in its tokens) trained with the v-prediction loss weight
    (``loss_weight="v"``, capped at 10): the same model, data, seed and steps.

    Command: ``python -m experiments.train_dit --preset cpu_tokens_v --workdir
    runs/dit_cpu_tokens_v``.
    Why: the plain ε-MSE weights the error of the implied clean image by SNR(t), about 0.1 at
    t = 800, so the model gains almost nothing from its class at the noise levels where the
    class is most of what it could know about the object; the hypothesis (written before the
    run) is that weighting those levels up makes the 1,200-step model read its label (a wrong
    label costs measurably more than ``cpu_tokens``' +0.002 %) and its label-token maps
    change with the label.
    Runtime: 7.2 min measured (2026-12-07, 354 ms a step on idle cores). Measured: EMA held-out
    ε-MSE 0.0904 (``cpu_tokens``: 0.0916); a wrong label costs +0.002 % [−0.001, +0.005], no
    more than for ``cpu_tokens``: the hypothesis is refuted at this budget (README).
    """
    return dataclasses.replace(cpu_tokens(), name="cpu_tokens_v", loss_weight="v")


def gpu() -> DiTTrainConfig:
    """A longer run for an accelerator: D=256, depth 8, 8 heads, patch 4 (the same 8×8 grid
    that SAG reads), batch 256.

    Command: ``python -m experiments.train_dit --preset gpu --workdir runs/dit_gpu``.
    Runtime: not measured (not for CPUs). Expected: recognisable objects; the setting for an
    evaluation of SAG with FID / IS on 1,000+ samples.
    """
    return DiTTrainConfig(
        model=DiTConfig(width=256, depth=8, num_heads=8, n_label=4),
        name="gpu",
        train_size=60_000,
        test_size=2_000,
        batch_size=256,
        steps=40_000,
        lr=3e-4,
        warmup_steps=1_000,
        ckpt_every=1_000,
        log_every=100,
        ema_decay=0.9999,
        eval_batch_size=500,
    )


def gpu_tokens() -> DiTTrainConfig:
    """The ``gpu`` run with the label only in its tokens (``DiTConfig(label_adaln=False)``), to
    train next to ``gpu`` on a lent accelerator (``experiments/gpu_session3.sh``, phase C).

    Command: ``python -m experiments.train_dit --preset gpu_tokens --workdir runs/dit_gpu_tokens``.
    Runtime: not measured (not for CPUs). Why: see :func:`cpu_tokens`; on the CPU neither
    conditioning route made the 1,200-step model read its label measurably (README).
    """
    return dataclasses.replace(
        gpu(), model=dataclasses.replace(gpu().model, label_adaln=False), name="gpu_tokens"
    )


PRESETS = {
    "smoke": smoke,
    "quick": quick,
    "cpu": cpu,
    "cpu_long": cpu_long,
    "cpu_tokens": cpu_tokens,
    "cpu_tokens_v": cpu_tokens_v,
    "gpu": gpu,
    "gpu_tokens": gpu_tokens,
}


def get_preset(name: str, /, **overrides) -> DiTTrainConfig:
    """Preset ``name`` with training or :class:`DiTConfig` fields overridden (``None`` ignored).

    Examples:
      >>> get_preset("smoke", depth=3, steps=2).model.depth
      3
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[name]()
    train_fields = {f.name for f in dataclasses.fields(DiTTrainConfig)} - {"model"}
    model_fields = {f.name for f in dataclasses.fields(DiTConfig)}
    t, m = {}, {}
    for k, v in overrides.items():
        if v is None:
            continue
        if k in train_fields:
            t[k] = v
        elif k in model_fields:
            m[k] = v
        else:
            raise ValueError(f"unknown config field {k!r}")
    if m:
        t["model"] = dataclasses.replace(cfg.model, **m)
    return dataclasses.replace(cfg, **t)
