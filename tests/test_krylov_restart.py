"""The restarted Krylov–Schur prototype of experiments/krylov_restart.py against eigvals."""

import numpy as np

from experiments.krylov_restart import krylov_schur
from markov_attn import testing


def test_krylov_schur_finds_lambda2_with_restarts():
    rng = np.random.default_rng(3)
    for kind in ("diffuse", "metastable"):
        a = testing.random_chains(rng, (), 60, kind=kind)
        truth = np.sort(np.abs(np.linalg.eigvals(a)))[-2]
        rho, products, converged = krylov_schur(a, m=12, p=5, tol=1e-9, cap=600)
        assert converged and products > 12  # it needed restarts
        assert abs(rho - truth) < 1e-7, (kind, rho, truth)


def test_krylov_schur_reports_a_spent_budget():
    rng = np.random.default_rng(4)
    a = testing.random_chains(rng, (), 80, kind="circulant", strength=6.0)
    _, products, converged = krylov_schur(a, m=8, p=3, tol=1e-12, cap=40)
    assert not converged and 40 <= products < 40 + 8  # the cycle that reached the cap ends
