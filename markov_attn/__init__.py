"""markov_attn: transformer attention read as a discrete-time Markov chain.

An attention matrix is row-stochastic, so it is the transition matrix of a Markov chain over
tokens (Erel et al., "Attention (as Discrete-Time Markov) Chains", arXiv 2507.17657). This package
gives pure, jitted, batched and differentiable JAX functions over attention arrays of shape
``(..., n, n)``: multi-bounce maps, TokenRank (the stationary distribution), |λ2| and the
spectral gap, λ2 head weighting, attention rollout, and metastable states (G-PCCA on a
real Schur basis computed without eigendecomposition).

``import markov_attn`` needs only jax, numpy and jaxtyping; the Flax model lives in
``markov_attn.nn``.
"""

from ._bounce import bounce as bounce
from ._chain import check_chain as check_chain
from ._chain import column_select as column_select
from ._chain import column_sum as column_sum
from ._chain import normalize as normalize
from ._chain import reverse as reverse
from ._chain import row_select as row_select
from ._chain import teleport as teleport
from ._chain import transition as transition
from ._metastable import MetastableStates as MetastableStates  # result types (not in __all__)
from ._metastable import SchurSubspace as SchurSubspace
from ._metastable import UnresolvedGapWarning as UnresolvedGapWarning
from ._metastable import metastable_states as metastable_states
from ._metastable import schur_subspace as schur_subspace
from ._rollout import rollout as rollout
from ._shard import shard_stack as shard_stack
from ._shard import stack_spec as stack_spec
from ._spectral import Lambda2Info as Lambda2Info  # result type (not in __all__)
from ._spectral import second_eigenvalue as second_eigenvalue
from ._spectral import spectral_gap as spectral_gap
from ._stream import bounce_qk as bounce_qk
from ._stream import second_eigenvalue_qk as second_eigenvalue_qk
from ._stream import tokenrank_qk as tokenrank_qk
from ._tokenrank import tokenrank as tokenrank
from ._weights import HEAD_WEIGHTINGS as HEAD_WEIGHTINGS  # the choices (not in __all__)
from ._weights import average as average
from ._weights import head_weights as head_weights

__version__ = "0.1.0"

__all__ = [
    "average",
    "bounce",
    "bounce_qk",
    "check_chain",
    "column_select",
    "column_sum",
    "head_weights",
    "metastable_states",
    "normalize",
    "reverse",
    "rollout",
    "row_select",
    "schur_subspace",
    "second_eigenvalue",
    "second_eigenvalue_qk",
    "shard_stack",
    "spectral_gap",
    "stack_spec",
    "teleport",
    "tokenrank",
    "tokenrank_qk",
    "transition",
]
