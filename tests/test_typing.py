"""The jaxtyping annotations of the public functions hold at run time (checked with beartype)."""

import beartype
import numpy as np
import pytest
from jaxtyping import jaxtyped

import markov_attn as ma
from markov_attn import testing


def checked(fn):
    return jaxtyped(typechecker=beartype.beartype)(fn)


def test_annotations_hold(rng):
    a = testing.random_chains(rng, (2, 3), 7).astype(np.float32)
    lam = checked(ma.second_eigenvalue)(a)
    checked(ma.spectral_gap)(a)
    w = checked(ma.head_weights)(lam)
    checked(ma.average)(a, weights=w)
    checked(ma.tokenrank)(a, alpha=0.9, direction="out")
    checked(ma.bounce)(a, 0, steps=2)
    checked(ma.bounce)(a, np.full(7, 1 / 7, np.float32), steps=2)
    checked(ma.transition)(a, keep=slice(1, None))
    checked(ma.teleport)(a, alpha=0.5)
    checked(ma.reverse)(a)
    checked(ma.normalize)(a)
    checked(ma.column_sum)(a)
    checked(ma.row_select)(a, 1)
    checked(ma.column_select)(a, 1)
    checked(ma.rollout)(a[None])
    checked(ma.check_chain)(a)


def test_annotations_reject_wrong_rank():
    with pytest.raises(Exception, match="(?i)type"):
        checked(ma.tokenrank)(np.ones(5, np.float32))
