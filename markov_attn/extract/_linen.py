"""Capturing attention probabilities from Flax Linen models without editing them."""

import flax.linen as nn
from flax import traverse_util
from jaxtyping import Array, Float


def _interceptor(next_fun, args, kwargs, context):
    module = context.module
    if not (
        isinstance(module, nn.MultiHeadDotProductAttention) and context.method_name == "__call__"
    ):
        return next_fun(*args, **kwargs)
    kwargs = dict(kwargs, sow_weights=True)
    original = module.attention_fn
    # Force the explicit path: Flax's dot_product_attention sows the weights it computes.
    object.__setattr__(module, "attention_fn", nn.dot_product_attention)
    try:
        return next_fun(*args, **kwargs)
    finally:
        object.__setattr__(module, "attention_fn", original)


def capture_attention_linen(
    module: nn.Module, variables, /, *args, method=None, rngs=None, **kwargs
) -> dict[str, Float[Array, "*batch heads n_q n_k"]]:
    """Applies a Linen ``module`` and returns the attention probabilities of every layer.

    The Linen twin of :func:`capture_attention`, for models built from
    :class:`flax.linen.MultiHeadDotProductAttention` (and its subclasses such as
    ``SelfAttention``). A method interceptor (:func:`flax.linen.intercept_methods`) calls each
    attention module with ``sow_weights=True`` and, for the duration of the call, with
    ``attention_fn=flax.linen.dot_product_attention``; the weights land in the
    ``"intermediates"`` collection and are returned. Capture therefore forces the non-fused
    attention path (a custom or fused ``attention_fn`` is bypassed while capturing).
    Probabilities are recorded before dropout.

    Args:
      module: the Linen module.
      variables: its variables (``{"params": ...}``).
      *args: positional arguments of the call.
      method: the method to apply (default ``__call__``).
      rngs: PRNG keys for ``apply`` (e.g. dropout).
      **kwargs: keyword arguments of the call.

    Raises:
      ValueError: nothing was captured (the module has no attention this function can see).

    Returns:
      ``{module path: (batch..., heads, n_q, n_k)}`` with paths like
      ``"Block_0/MultiHeadDotProductAttention_0"``. A module called several times gets
      ``path#0``, ``path#1``, ...

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import flax.linen as nn
      >>> mha = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)
      >>> x = jnp.ones((1, 5, 8))
      >>> params = mha.init(jax.random.key(0), x)
      >>> {k: v.shape for k, v in capture_attention_linen(mha, params, x).items()}
      {'': (1, 2, 5, 5)}
    """
    with nn.intercept_methods(_interceptor):
        _, state = module.apply(
            variables, *args, method=method, rngs=rngs, mutable=["intermediates"], **kwargs
        )
    flat = traverse_util.flatten_dict(dict(state.get("intermediates", {})))
    out = {}
    for path, values in flat.items():
        if path[-1] != "attention_weights":
            continue
        key = "/".join(path[:-1])
        values = values if isinstance(values, tuple) else (values,)
        if len(values) == 1:
            out[key] = values[0]
        else:
            for i, v in enumerate(values):
                out[f"{key}#{i}"] = v
    if not out:
        raise ValueError(
            f"no attention probabilities were captured from {type(module).__name__}: it calls "
            "no flax.linen.MultiHeadDotProductAttention and sows none as 'attention_weights'; "
            "sow them in its attention, e.g. self.sow('intermediates', 'attention_weights', p)"
        )
    return out
