"""Map methods: from a ViT's attention stack to a map over the patch grid, via the core API.

Every method reads attention ``attn`` of shape ``(B, L, H, n, n)`` (batch, layer, head, query,
key; row-stochastic) with the token layout ``[prefix tokens (CLS first, then registers)]
[patches row-major]`` and returns ``(B, gh, gw)`` maps over the patch grid. Only the order of
the values within a map matters to the segmentation protocol (min–max follows).

Choices made explicit (all are fields of :class:`MapMethod`):

- **Which layers** (``layers``): one index (default ``-1``, the last layer) or a tuple of
  indices whose chains are averaged (e.g. ``(-3, -2, -1)``); ``None`` = all layers.
- **Head weighting** (``weighting``, one of ``ma.HEAD_WEIGHTINGS``): ``"uniform"`` (plain
  mean) or ``"lambda2"`` / ``"gap"`` (``ma.head_weights`` of each matrix's
  ``ma.second_eigenvalue``). The weights are applied **to the matrices before the chain
  operation** (``ma.average`` over the heads, jointly over the heads of all selected layers):
  a weighted mean of chains is again a chain, so bounces and TokenRank run on one averaged
  chain per image. |λ2| is computed on the matrices of the chain actually used (``chain``
  below). For rollout, heads are averaged per layer (weights normalised within each layer)
  before the layer product.
- **Prefix tokens** (``chain``): ``"full"`` keeps CLS and registers in the chain and drops
  them only from the displayed map; bounces then start at one-hot(CLS). ``"patches"``
  removes them before the softmax (``ma.transition(logits, keep=...)`` when logits are
  given; otherwise the equivalent: drop their rows and columns and renormalise the rows). The
  reference code removes CLS only and keeps DINOv2 registers in the TokenRank chain
  (``docs/chains.md`` §4): for models with registers ``"patches"`` differs from it (the
  project's own models have none, so its tables are unaffected). In a patch chain a bounce
  "from CLS" starts from CLS's own attention row over the patches (renormalised) — the first
  hop — and then bounces ``steps - 1`` times among the patches, so ``steps`` counts hops from
  CLS in both modes (``steps=1`` is the CLS attention map either way). Reverse bounces start
  from CLS's column (who attends to CLS) the same way.
- **Teleportation**: ``alpha=0.99`` in bounces and TokenRank, as the reference code.

Defaults in :data:`METHODS`: bounces use the full chain (they need CLS); TokenRank uses the
patch chain (the reference).

This is the one attention → map implementation of the project: the ``markov-attn`` CLI, the
demo and the segmentation experiments all build :class:`MapMethod` s and call
:func:`compute_maps`. Each method carries its human-readable :attr:`MapMethod.label` (and the
shorter :attr:`MapMethod.title`), derived from its fields, so reports never parse names.
"""

import dataclasses
import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

import markov_attn as ma
from markov_attn._util import check_values
from markov_attn._weights import HEAD_WEIGHTINGS

__all__ = ["METHODS", "MapMethod", "compute_maps", "extended_methods", "per_layer"]

_KINDS = ("cls", "column_sum", "rollout", "bounce", "tokenrank")
_CHAINS = ("full", "patches")


@dataclasses.dataclass(frozen=True)
class MapMethod:
    """One way to turn an attention stack into a map over the patch grid.

    Attributes:
        kind: ``"cls"`` (the CLS token's attention row, DINO-style), ``"column_sum"`` (mean
            incoming attention), ``"rollout"`` (Abnar & Zuidema, the CLS row of the rolled
            out matrix), ``"bounce"`` (``steps``-th bounce from or to CLS), ``"tokenrank"``
            (stationary distribution).
        steps: bounce count ``n`` (``kind="bounce"``).
        direction: the chain itself or its reverse (``ma.reverse``), named as the core
            functions name it: ``"forward"`` / ``"reverse"`` for bounces (``ma.bounce``),
            ``"in"`` / ``"out"`` for TokenRank (``ma.tokenrank``: incoming / outgoing
            importance). ``None`` (default) = ``"in"`` for TokenRank, ``"forward"`` otherwise.
        weighting: head weighting, ``"uniform"``, ``"lambda2"`` or ``"gap"``
            (``ma.HEAD_WEIGHTINGS``, as ``ma.head_weights``).
        layers: a layer index, a tuple of indices (chains averaged), or ``None`` = all.
        chain: ``"full"`` or ``"patches"`` (see the module docstring).
        start: ``"cls"`` or ``"uniform"`` start of bounces (``"uniform"`` for models with
            no CLS token: one forward bounce from uniform is the column mean).
        alpha: teleportation weight of bounces and TokenRank.
        residual: rollout's identity weight.
        krylov: Krylov dimension of the ``|λ2|`` estimate behind the ``"lambda2"`` / ``"gap"``
            head weights (``ma.second_eigenvalue``; ``None`` = its default).
    """

    kind: str
    steps: int = 1
    direction: str | None = None
    weighting: str = "uniform"
    layers: int | tuple[int, ...] | None = -1
    chain: str = "full"
    start: str = "cls"
    alpha: float = 0.99
    residual: float = 0.5
    krylov: int | None = None

    def __post_init__(self):
        if self.kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {self.kind!r}")
        if self.direction is None:
            object.__setattr__(self, "direction", "in" if self.kind == "tokenrank" else "forward")
        if self.weighting not in HEAD_WEIGHTINGS:
            raise ValueError(f"weighting must be one of {HEAD_WEIGHTINGS}, got {self.weighting!r}")
        if self.chain not in _CHAINS:
            raise ValueError(f"chain must be one of {_CHAINS}, got {self.chain!r}")
        if self.start not in ("cls", "uniform"):
            raise ValueError(f"start must be 'cls' or 'uniform', got {self.start!r}")
        if self.kind == "bounce":
            if self.direction not in ("forward", "reverse"):
                raise ValueError(
                    f"bounce direction must be 'forward' or 'reverse', got {self.direction!r}"
                )
            if isinstance(self.steps, bool) or not isinstance(self.steps, int | np.integer):
                raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
            if int(self.steps) < 1:
                raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.kind == "tokenrank" and self.direction not in ("in", "out"):
            raise ValueError(f"TokenRank direction must be 'in' or 'out', got {self.direction!r}")
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))
        if isinstance(self.layers, tuple) and (
            not self.layers
            or any(isinstance(i, bool) or not isinstance(i, int | np.integer) for i in self.layers)
        ):
            raise ValueError(
                f"layers must be a layer index, a non-empty tuple of indices or None (all), "
                f"got {self.layers!r}"
            )

    @property
    def title(self) -> str:
        """What the map is, without its head weighting and layers: ``"CLS attention (head
        mean)"``, ``"column sum"``, ``"attention rollout"``, ``"bounce n=2 forward from
        CLS"``, ``"TokenRank in"``."""
        if self.kind == "bounce":
            if self.start == "cls":
                way = "forward from CLS" if self.direction == "forward" else "reverse to CLS"
            else:
                way = f"{self.direction} from uniform"
            return f"bounce n={self.steps} {way}"
        if self.kind == "tokenrank":
            return f"TokenRank {self.direction}"
        return _TITLES[self.kind]

    @property
    def label(self) -> str:
        """The full human-readable label: :attr:`title`, the head weighting when not uniform,
        and in brackets whatever differs from the registry's defaults (layers, prefix
        handling, ``alpha``, rollout residual, Krylov dimension).

        Examples:
            >>> MapMethod("bounce", steps=2, weighting="lambda2", layers=(-3, -2, -1)).label
            'bounce n=2 forward from CLS, λ2-weighted (last 3 layers)'
            >>> MapMethod("tokenrank", direction="in", chain="full").label
            'TokenRank in (full chain)'
        """
        text = self.title
        if self.weighting != "uniform":
            w = "λ2" if self.weighting == "lambda2" else self.weighting
            text += f", {w}-weighted"
        notes = []
        default_layers = None if self.kind == "rollout" else -1
        if self.layers != default_layers:
            notes.append(_layers_text(self.layers))
        if self.chain != ("patches" if self.kind == "tokenrank" else "full"):
            notes.append(f"{self.chain} chain")
        if self.kind in ("bounce", "tokenrank") and self.alpha != 0.99:
            notes.append(f"α={self.alpha:g}")
        if self.kind == "rollout" and self.residual != 0.5:
            notes.append(f"residual {self.residual:g}")
        if self.krylov is not None and self.weighting != "uniform":
            notes.append(f"Krylov {self.krylov}")
        return text + (f" ({', '.join(notes)})" if notes else "")

    @property
    def needs_cls(self) -> bool:
        """Whether the method reads the CLS token (so needs ``num_prefix >= 1``)."""
        return self.kind in ("cls", "rollout") or (self.kind == "bounce" and self.start == "cls")

    def __call__(
        self,
        attn: Float[ArrayLike, "b l h n n"],
        /,
        *,
        num_prefix: int,
        grid: tuple[int, int],
        logits: Float[ArrayLike, "b l h n n"] | None = None,
    ) -> Float[Array, "b gh gw"]:
        """This method's maps ``(B, gh, gw)``; see :func:`compute_maps`."""
        return compute_maps(attn, {"m": self}, num_prefix=num_prefix, grid=grid, logits=logits)["m"]


_TITLES = {
    "cls": "CLS attention (head mean)",
    "column_sum": "column sum",
    "rollout": "attention rollout",
}


def _layers_text(layers) -> str:
    if layers is None:
        return "all layers"
    if isinstance(layers, int):
        return f"layer {layers}"
    k = len(layers)
    if tuple(layers) == tuple(range(-k, 0)):
        return f"last {k} layers"
    if tuple(layers) == tuple(range(layers[0], layers[0] + k)) and k > 1:
        return f"layers {layers[0]}–{layers[-1]}"
    return "layers " + "+".join(str(i) for i in layers)


def _layer_index(layers, depth: int) -> tuple[int, ...]:
    if layers is None:
        return tuple(range(depth))
    idx = (layers,) if isinstance(layers, int) else tuple(layers)
    out = []
    for i in idx:
        if not -depth <= int(i) < depth:
            raise ValueError(f"layer {i} out of range for a model with {depth} layers")
        out.append(int(i) % depth)
    return tuple(out)


def _weights(mats: jax.Array, weighting: str, krylov: int | None) -> jax.Array | None:
    """Head weights over the trailing (layer*head) axis of ``mats`` (B, K, m, m), or None."""
    if weighting == "uniform":
        return None
    lam2 = (
        ma.second_eigenvalue(mats) if krylov is None else ma.second_eigenvalue(mats, krylov=krylov)
    )
    return ma.head_weights(lam2, weighting=weighting, axis=-1)


class _Context:
    """Per-call cache: chains, weights and bounce trajectories shared between methods."""

    def __init__(self, attn, logits, num_prefix, cls_index):
        self.attn = attn
        self.logits = logits
        self.p = num_prefix
        self.cls = cls_index
        self.depth = attn.shape[1]
        self._cache: dict = {}

    def cached(self, key, fn):
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    def selected(self, layers, chain):
        """(B, K, m, m): the matrices of the chosen layers, heads flattened, in ``chain`` form."""

        def make():
            idx = jnp.asarray(_layer_index(layers, self.depth))
            sel = self.attn[:, idx]
            if chain == "patches":
                if self.logits is not None:
                    sel = ma.transition(self.logits[:, idx], keep=slice(self.p, None))
                else:
                    sel = ma.normalize(sel[..., self.p :, self.p :])
            b, k, h, m, _ = sel.shape
            return sel.reshape(b, k * h, m, m)

        return self.cached(("sel", layers, chain), make)

    def weights(self, layers, chain, weighting, krylov):
        return self.cached(
            ("w", layers, chain, weighting, krylov),
            lambda: _weights(self.selected(layers, chain), weighting, krylov),
        )

    def averaged(self, m: MapMethod):
        """(B, m, m): the (weighted) mean chain over the selected layers and heads."""
        layers, chain = m.layers, m.chain

        def make():
            sel = self.selected(layers, chain)
            w = self.weights(layers, chain, m.weighting, m.krylov)
            if w is None:
                return jnp.mean(sel, axis=-3)
            return ma.average(sel, weights=w, axis=-3)

        return self.cached(("avg", layers, chain, m.weighting, m.krylov), make)

    def full_average_with(self, m: MapMethod):
        """The full-token mean matrix averaged with the weights of ``m.chain`` (for CLS rows)."""
        layers, chain = m.layers, m.chain

        def make():
            w = self.weights(layers, chain, m.weighting, m.krylov)
            full = self.selected(layers, "full")
            if w is None:
                return jnp.mean(full, axis=-3)
            return ma.average(full, weights=w, axis=-3)

        return self.cached(("favg", layers, chain, m.weighting, m.krylov), make)

    def patches(self, dist, chain):
        """Slices a distribution over the chain's tokens to the patches."""
        return dist[..., self.p :] if chain == "full" else dist

    def need_cls(self, name):
        if self.p < 1:
            raise ValueError(
                f"method {name!r} needs a CLS token but num_prefix=0; use start='uniform' "
                "(bounces) or kind='column_sum'/'tokenrank' for models without CLS"
            )


def _trajectory_key(m: MapMethod) -> tuple:
    """Bounces that differ only in ``steps`` share one trajectory."""
    return (m.layers, m.chain, m.weighting, m.krylov, m.direction, m.start, m.alpha)


def _method_map(ctx: _Context, name: str, m: MapMethod, max_steps: dict) -> jax.Array:
    p, cls = ctx.p, ctx.cls
    if m.kind == "cls":
        ctx.need_cls(name)
        full = ctx.full_average_with(m)
        return full[:, cls, p:]
    if m.kind == "column_sum":
        return ctx.patches(ma.column_sum(ctx.averaged(m)), m.chain)
    if m.kind == "rollout":
        ctx.need_cls(name)
        idx = jnp.asarray(_layer_index(m.layers, ctx.depth))
        layers = ctx.attn[:, idx]  # (B, k, H, n, n)
        if m.weighting != "uniform":
            w = _weights(layers, m.weighting, m.krylov)
            layers = ma.average(layers, weights=w, axis=-3)[:, :, None]
        rolled = ma.rollout(layers, residual=m.residual, head_fusion="mean")
        return rolled[:, cls, p:]
    if m.kind == "tokenrank":
        chain = ctx.averaged(m)
        return ctx.patches(ma.tokenrank(chain, alpha=m.alpha, direction=m.direction), m.chain)
    # bounce
    key = _trajectory_key(m)
    steps = max_steps[key]

    def trajectory():
        chain = ctx.averaged(m)
        b, n = chain.shape[0], chain.shape[-1]
        if m.start == "uniform":
            x0 = jnp.full((b, n), 1.0 / n, jnp.float32)
            return ma.bounce(chain, x0, steps=steps, alpha=m.alpha, direction=m.direction)
        ctx.need_cls(name)
        if m.chain == "full":
            return ma.bounce(chain, cls, steps=steps, alpha=m.alpha, direction=m.direction)
        full = ctx.full_average_with(m)
        first = full[:, cls, p:] if m.direction == "forward" else full[:, p:, cls]
        first = first / jnp.maximum(jnp.sum(first, axis=-1, keepdims=True), 1e-30)
        if steps == 1:
            return first[:, None]
        return ma.bounce(chain, first, steps=steps - 1, alpha=m.alpha, direction=m.direction)

    xs = ctx.cached(("bounce", *key), trajectory)
    if m.chain == "full" or m.start == "uniform":
        return ctx.patches(xs[:, m.steps], m.chain)
    return xs[:, m.steps - 1]


@functools.partial(jax.jit, static_argnames=("methods", "num_prefix", "grid", "cls_index"))
def _compute(attn, logits, *, methods, num_prefix, grid, cls_index):
    attn = attn.astype(jnp.float32)
    ctx = _Context(attn, logits, num_prefix, cls_index)
    max_steps: dict = {}
    for _, m in methods:
        if m.kind == "bounce":
            key = _trajectory_key(m)
            max_steps[key] = max(max_steps.get(key, 0), int(m.steps))
    gh, gw = grid
    out = {}
    for name, m in methods:
        out[name] = _method_map(ctx, name, m, max_steps).reshape(-1, gh, gw)
    return out


def compute_maps(
    attn: Float[ArrayLike, "b l h n n"],
    methods: Mapping[str, MapMethod],
    /,
    *,
    num_prefix: int,
    grid: tuple[int, int],
    logits: Float[ArrayLike, "b l h n n"] | None = None,
    cls_index: int = 0,
) -> dict[str, Float[Array, "b gh gw"]]:
    """Maps of several methods from one attention stack, sharing work between them.

    All methods run in one jitted function: chains, λ2 head weights and bounce trajectories
    are computed once per (layers, chain, weighting) and shared (bounces ``n = 1..5`` come from
    one ``ma.bounce`` call). Batched over images; no per-image Python loop.

    Args:
        attn: ``(B, L, H, n, n)`` attention probabilities of a ViT (``aux["attn"]``).
        methods: name → :class:`MapMethod` (e.g. :data:`METHODS`).
        num_prefix: number of tokens before the patches (CLS + registers).
        grid: ``(gh, gw)`` patch grid, ``gh * gw = n - num_prefix``.
        logits: optional pre-softmax scores of the same shape (``aux["attn_logits"]``), used
            by ``chain="patches"`` to drop prefix tokens before the softmax.
        cls_index: position of the CLS token among the prefix tokens.

    Returns:
        name → ``(B, gh, gw)`` float32 map.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> attn = jax.nn.softmax(jax.random.normal(jax.random.key(0), (2, 3, 2, 5, 5)))
        >>> maps = compute_maps(attn, {"b2": MapMethod("bounce", steps=2)},
        ...                     num_prefix=1, grid=(2, 2))
        >>> maps["b2"].shape
        (2, 2, 2)
    """
    attn = jnp.asarray(attn)
    if attn.ndim != 5 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(
            f"attn must have shape (B, L, H, n, n), got {attn.shape}; add a batch or layer axis "
            "(attn[None]) for a single image or layer"
        )
    gh, gw = int(grid[0]), int(grid[1])
    n = attn.shape[-1]
    if num_prefix < 0 or num_prefix + gh * gw != n:
        raise ValueError(
            f"token layout mismatch: num_prefix={num_prefix} + grid {gh}x{gw} = "
            f"{num_prefix + gh * gw} tokens, but attention has n={n}; pass the model's "
            "aux['num_prefix'] and the patch grid (image size // patch size)"
        )
    if not 0 <= cls_index < max(num_prefix, 1):
        raise ValueError(f"cls_index={cls_index} must be < num_prefix={num_prefix}")
    check_values(attn)  # NaN/inf or negative attention: an error, not all-NaN maps
    if logits is not None:
        logits = jnp.asarray(logits)
        if logits.shape != attn.shape:
            raise ValueError(f"logits {logits.shape} must have the shape of attn {attn.shape}")
    items = tuple(methods.items())
    for name, m in items:
        if not isinstance(m, MapMethod):
            raise TypeError(f"methods[{name!r}] must be a MapMethod, got {type(m).__name__}")
        _layer_index(m.layers, attn.shape[1])
    return _compute(
        attn,
        logits,
        methods=items,
        num_prefix=int(num_prefix),
        grid=(gh, gw),
        cls_index=int(cls_index),
    )


def _registry() -> dict[str, MapMethod]:
    reg: dict[str, MapMethod] = {}
    for weighting, suffix in (("uniform", ""), ("lambda2", "_l2")):
        reg[f"cls_attn{suffix}"] = MapMethod("cls", weighting=weighting)
        reg[f"column_sum{suffix}"] = MapMethod("column_sum", weighting=weighting)
        reg[f"rollout{suffix}"] = MapMethod("rollout", weighting=weighting, layers=None)
        for direction, tag in (("forward", "fwd"), ("reverse", "rev")):
            for n in range(1, 6):
                reg[f"bounce_{tag}_{n}{suffix}"] = MapMethod(
                    "bounce", steps=n, direction=direction, weighting=weighting
                )
        for direction in ("in", "out"):
            reg[f"tokenrank_{direction}{suffix}"] = MapMethod(
                "tokenrank", direction=direction, weighting=weighting, chain="patches"
            )
    return reg


#: The main methods, last layer: CLS attention, column sum, rollout (all layers), bounces
#: n = 1..5 forward from / reverse to CLS (full chain), TokenRank in/out (patch chain); each
#: uniform and λ2-weighted (suffix ``_l2``).
METHODS: dict[str, MapMethod] = _registry()


def per_layer(method: MapMethod, depth: int, /) -> dict[str, MapMethod]:
    """The method at each single layer ``0..depth-1`` (keys ``"L0"``, ``"L1"``, ...)."""
    return {f"L{i}": dataclasses.replace(method, layers=i) for i in range(depth)}


def extended_methods(depth: int, /, *, last_k: int = 3) -> dict[str, MapMethod]:
    """Variants for ablations: the last ``last_k`` layers averaged (suffix ``_last{k}``),
    the other prefix handling (``_patches`` for bounces, ``_full`` for TokenRank), and every
    single layer of CLS attention, bounce n=2 forward and TokenRank in (``@L{i}``)."""
    k = min(last_k, depth)
    last = tuple(range(-k, 0))
    out: dict[str, MapMethod] = {}
    for name, m in METHODS.items():
        if m.kind != "rollout":
            out[f"{name}_last{k}"] = dataclasses.replace(m, layers=last)
        if m.kind == "bounce":
            out[f"{name}_patches"] = dataclasses.replace(m, chain="patches")
        if m.kind == "tokenrank":
            out[f"{name}_full"] = dataclasses.replace(m, chain="full")
    for base in ("cls_attn", "bounce_fwd_2", "tokenrank_in", "cls_attn_l2", "bounce_fwd_2_l2"):
        for tag, m in per_layer(METHODS[base], depth).items():
            out[f"{base}@{tag}"] = m
    return out
