"""Array type aliases used across markov_attn (jaxtyping)."""

from jaxtyping import Array, ArrayLike, Float, Integer, Shaped

#: A batch of transition matrices, row-stochastic over the last axis: ``attn[..., i, j]`` is the
#: probability of moving from token ``i`` (the query) to token ``j`` (the key).
Chain = Float[Array, "*batch n n"]
#: Anything convertible to a chain (NumPy arrays, bf16/f16 arrays, nested lists).
ChainLike = Float[ArrayLike, "*batch n n"]
#: A batch of distributions over tokens.
Dist = Float[Array, "*batch n"]
DistLike = Float[ArrayLike, "*#batch n"]
#: One scalar per matrix of a batch.
PerMatrix = Float[Array, "*batch"]
Index = Integer[ArrayLike, "*#batch"]

__all__ = [
    "Array",
    "ArrayLike",
    "Chain",
    "ChainLike",
    "Dist",
    "DistLike",
    "Float",
    "Index",
    "PerMatrix",
    "Shaped",
]
