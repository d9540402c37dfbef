"""Capturing attention probabilities from Flax NNX models without editing them."""

import functools

import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn.attention import dot_product_attention_weights
from jaxtyping import Array, Float

#: Names under which attention probabilities are sown: Flax's own ``attention_weights`` and
#: the ``attn`` of :class:`markov_attn.nn.Attention`.
SOWN_NAMES = ("attention_weights", "attn")


def _explicit_attention(module: nnx.MultiHeadAttention):
    """An ``attention_fn`` that computes the weights explicitly and sows them on ``module``."""

    def attention_fn(
        query,
        key,
        value,
        *,
        mask=None,
        bias=None,
        dropout_rng=None,
        dropout_rate=0.0,
        broadcast_dropout=True,
        deterministic=False,
        dtype=None,
        precision=None,
        module=None,
        is_causal=False,
        **unused,
    ):
        del module, unused  # always sow on the captured module
        weights = dot_product_attention_weights(
            query,
            key,
            bias,
            mask,
            broadcast_dropout,
            dropout_rng,
            dropout_rate,
            deterministic,
            dtype,
            precision,
            _Sower(owner),
            is_causal=is_causal,
        )
        return jnp.einsum("...hqk,...khd->...qhd", weights, value, precision=precision)

    owner = module
    return attention_fn


class _Sower:
    """Stands in for ``module`` in ``dot_product_attention_weights``: sows on the owner."""

    def __init__(self, owner):
        self.owner = owner

    def __bool__(self):
        return True

    def sow(self, kind, name, value):
        self.owner.sow(kind, name, value)


def _collect(intermediates, names) -> dict:
    out = {}
    for path, var in nnx.to_flat_state(intermediates):
        if not path or str(path[-1]) not in names:
            continue
        values = var.get_value() if hasattr(var, "get_value") else var
        if not isinstance(values, tuple):
            values = (values,)
        # (..., heads, n_q, n_k): cross-attention maps are rectangular and kept as they are
        values = [v for v in values if getattr(v, "ndim", 0) >= 3]
        key = "/".join(str(p) for p in path[:-1])
        if len(values) == 1:
            out[key] = values[0]
        else:
            for i, v in enumerate(values):
                out[f"{key}#{i}"] = v
    return out


def capture_attention(
    model: nnx.Module, /, *args, **kwargs
) -> dict[str, Float[Array, "*batch heads n_q n_k"]]:
    """Runs ``model(*args, **kwargs)`` and returns the attention probabilities of every layer.

    Works on any Flax NNX model built from :class:`flax.nnx.MultiHeadAttention` (and on
    :class:`markov_attn.nn.ViT`, which sows its attention) without editing it. For the duration
    of the call each ``MultiHeadAttention``'s ``attention_fn`` is replaced by the explicit
    (non-fused) computation, ``softmax(q kᵀ/√d)`` then the weighted sum of values, and the
    weights are sown as ``nnx.Intermediate`` and collected with :func:`flax.nnx.capture`.

    Capture therefore forces the non-fused attention path: a custom ``attention_fn`` (cuDNN or
    Pallas flash attention, or any other function) is bypassed while capturing, and the
    ``(n, n)`` matrices are materialised. The model's outputs are unchanged up to floating-point
    rounding for the standard ``dot_product_attention``. Probabilities are recorded before
    dropout.

    Args:
      model: an NNX module.
      *args: positional arguments of the model call.
      **kwargs: keyword arguments of the model call.

    Raises:
      ValueError: nothing was captured (the model has no attention this function can see).

    Returns:
      ``{module path: (batch..., heads, n_q, n_k)}``, the path joined with ``/`` (e.g.
      ``"blocks/0/attn"``), row ``q`` being the distribution of query ``q`` over the keys.
      Cross-attention (``n_q != n_k``, keys from another input) is returned like
      self-attention; only square maps are Markov chains over one token set, so check the
      shape before passing a map to the chain functions. A module called several times gets
      ``path#0``, ``path#1``, ...

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> mha = nnx.MultiHeadAttention(2, 8, decode=False, rngs=nnx.Rngs(0))
      >>> maps = capture_attention(mha, jnp.ones((1, 5, 8)))
      >>> {k: v.shape for k, v in maps.items()}
      {'': (1, 2, 5, 5)}
    """
    patched = []
    for _, m in nnx.iter_modules(model):
        if isinstance(m, nnx.MultiHeadAttention):
            patched.append((m, m.attention_fn))
    try:
        for m, _ in patched:
            m.attention_fn = _explicit_attention(m)
        call = functools.partial(type(model).__call__)
        _, intermediates = nnx.capture(call, nnx.Intermediate)(model, *args, **kwargs)
    finally:
        for m, fn in patched:
            m.attention_fn = fn
    maps = _collect(intermediates, SOWN_NAMES)
    if not maps:
        raise ValueError(
            f"no attention probabilities were captured from {type(model).__name__}: it calls no "
            "flax.nnx.MultiHeadAttention and sows none under "
            f"{' or '.join(repr(n) for n in SOWN_NAMES)}; sow them in its attention, e.g. "
            "self.sow(nnx.Intermediate, 'attn', probs)"
        )
    return maps
