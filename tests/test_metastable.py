"""Dominant Schur subspaces and G-PCCA metastable states against SciPy and deeptime."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg as sl

import markov_attn as ma
from markov_attn import testing
from tests._refs import PAPER_A, stationary

N = 48  # one shape (3, N, N) and k = 3 for most tests: each program compiles once (~5 s)
K = 3


_states = jax.jit(lambda x: ma.metastable_states(x, k=K))
_subspace = jax.jit(lambda x: ma.schur_subspace(x, k=K))


def _blocky(rng, batch, n, clusters, *, strength=6.0, reversible=False):
    """Softmax attention with planted clusters; symmetric logits give a reversible chain."""
    labels = np.sort(rng.integers(0, clusters, size=(*batch, n)), axis=-1)
    labels[..., :clusters] = np.arange(clusters)  # every cluster is present
    same = labels[..., :, None] == labels[..., None, :]
    s = rng.standard_normal((*batch, n, n))
    if reversible:
        w = np.exp(0.5 * (s + np.swapaxes(s, -1, -2)) + strength * same)
    else:
        w = np.exp(s + strength * same)
    return w / w.sum(-1, keepdims=True), labels


def _schur_ref(a, k):
    """Float64 sorted real Schur basis of the k eigenvalues of largest modulus."""
    mod = np.sort(np.abs(np.linalg.eigvals(a)))[::-1]
    r = 0.5 * (mod[k - 1] + mod[k])
    _, z, sdim = sl.schur(a, output="real", sort=lambda re, im: np.hypot(re, im) > r)
    assert sdim == k, "the reference cuts a complex pair: pick another k"
    return z[:, :k], mod


def _agreement(x, y, k):
    """Fraction of tokens with the same label, best over label permutations (Hungarian)."""
    from scipy.optimize import linear_sum_assignment

    c = np.zeros((k, k))
    np.add.at(c, (x, y), 1)
    r, s = linear_sum_assignment(c, maximize=True)
    return c[r, s].sum() / len(x)


def test_paper_vector_pair_is_kept_whole():
    s = ma.schur_subspace(PAPER_A, k=3)
    assert bool(s.converged)
    lam = np.asarray(s.eigenvalues)
    np.testing.assert_allclose(lam[0], 1.0, atol=1e-6)
    pair = np.linalg.eigvals(PAPER_A)
    pair = pair[np.argsort(-np.abs(pair))][1:3]  # -0.2775 ± 0.5613i
    np.testing.assert_allclose(np.sort_complex(lam[1:]), np.sort_complex(pair), atol=1e-5)
    ref, _ = _schur_ref(PAPER_A, 3)
    assert np.max(sl.subspace_angles(ref, np.asarray(s.basis, np.float64))) <= 1e-4
    with pytest.raises(ValueError, match="complex-conjugate eigenvalue pair"):
        ma.schur_subspace(PAPER_A, k=2)
    cut = ma.schur_subspace(PAPER_A, k=2, split="nan")  # what jit gives
    assert np.all(np.isnan(np.asarray(cut.basis))) and not bool(cut.converged)


def _stack(rng, **kw):
    a, labels = _blocky(rng, (3,), N, K, **kw)
    return a.astype(np.float32), labels


def test_subspace_matches_sorted_schur_on_nonreversible_chains(rng):
    a, _ = _stack(rng)
    s = ma.schur_subspace(a, k=K)
    assert s.basis.shape == (3, N, K) and s.schur.shape == (3, K, K)
    assert s.basis.dtype == np.float32 and s.eigenvalues.dtype == np.complex64
    assert np.all(np.asarray(s.converged))
    assert np.all(np.asarray(s.residual) <= 1e-5)
    for i in range(3):
        ref, mod = _schur_ref(a[i].astype(np.float64), K)
        basis = np.asarray(s.basis[i], np.float64)
        assert np.max(sl.subspace_angles(ref, basis)) <= 1e-4
        np.testing.assert_allclose(basis.T @ basis, np.eye(K), atol=1e-5)
        np.testing.assert_allclose(np.abs(basis[:, 0]), 1 / np.sqrt(N), atol=1e-5)
        # the eigenvalues are R's, by shifted QR (they were read off R's diagonal blocks, 3.5e-3
        # off and out of order on nearly tied moduli); the gap's |λ_{k+1}| is a Ritz value of
        # the unconverged oversampled columns, rough
        lam = np.asarray(s.eigenvalues[i])
        np.testing.assert_allclose(np.trace(s.schur[i]), lam.sum().real, atol=1e-5)
        np.testing.assert_allclose(np.abs(lam), mod[:K], atol=1e-5)
        assert np.all(np.diff(np.abs(lam)) <= 0)
        np.testing.assert_allclose(s.gap[i], mod[K - 1] - mod[K], atol=2e-3)
    np.testing.assert_allclose(_subspace(a).basis, s.basis, atol=1e-6)


@pytest.mark.parametrize("strength", [4.0, 14.0])
def test_converged_means_the_subspace_is_right(rng, strength):
    """``converged`` must not report a basis whose subspace is wrong. At strength 14 three
    planted clusters leak ~1e-6, so k = 2 leaves a modulus gap of ~1e-6, the size of a float32
    residual: the subspace is not determined by float32 arithmetic, and such bases were 0.3-1.6
    rad from the float64 Schur subspace while the old flag (residual <= tol and gap > 0) said
    converged. Every basis reported converged must be within 1e-2 rad of it (1.4e-3 at most on
    these and attention, causal, reducible and Dirichlet chains when measured)."""
    a = _blocky(rng, (8,), 32, 3, strength=strength)[0]
    s = ma.schur_subspace(a.astype(np.float32), k=2)
    conv = np.asarray(s.converged)
    for i in range(len(a)):
        mod = np.sort(np.abs(np.linalg.eigvals(a[i])))[::-1]
        r = 0.5 * (mod[1] + mod[2])
        try:
            _, z, sdim = sl.schur(a[i], output="real", sort=lambda re, im: np.hypot(re, im) > r)
        except np.linalg.LinAlgError:  # LAPACK's reordering fails on too close eigenvalues
            continue
        if sdim != 2 or not conv[i]:
            continue
        sv = np.linalg.svd(z[:, :2].T @ np.asarray(s.basis[i], np.float64), compute_uv=False)
        assert np.arccos(min(sv.min(), 1.0)) <= 1e-2, (i, float(s.gap[i]), float(s.residual[i]))
    if strength == 4.0:  # well separated: the flag must not be withheld either
        assert conv.all()
    else:  # gap ~ residual: not converged, whatever the residual
        assert not conv.any() and np.all(np.asarray(s.gap) < 100 * np.asarray(s.residual))


def test_heads_that_cannot_converge_stop_holding_the_batch(rng):
    """Diffuse heads have no modulus gap at k: their residual stays ~1e-2. Once its trend says
    it cannot reach tol within iters (checked every 36 products from 72), such a head no
    longer keeps the batch iterating to iters = 300 (it did before). A head that converges
    steadily but is still far from tol at that check is not cut (its forecast, not its
    residual, decides), and tol = 0 runs every product."""
    slow = testing.random_chains(
        np.random.default_rng(0), (1,), N, kind="metastable", strength=4.5, clusters=8
    )  # 8 clusters: at k = 3 it converges in ~170 products
    diffuse = testing.random_chains(rng, (2,), N, kind="diffuse")
    a = np.concatenate([slow, diffuse]).astype(np.float32)
    alone = ma.schur_subspace(np.concatenate([slow] * 3).astype(np.float32), k=K)
    need = int(alone.products[0])
    assert 108 <= need < 300 and bool(alone.converged[0])
    early = ma.schur_subspace(a, k=K, split="nan", iters=72, tol=0.0)
    assert float(early.residual[0]) > 5 * ma._metastable.STALL_FLOOR  # far off at the check
    s = ma.schur_subspace(a, k=K, split="nan")
    assert np.asarray(s.converged).tolist() == [True, False, False]
    assert np.all(np.asarray(s.residual)[1:] > 1e-4)
    assert need <= int(s.products[0]) <= need + 72 < 300
    basis = np.asarray(s.basis[0], np.float64)
    assert np.max(sl.subspace_angles(np.asarray(alone.basis[0], np.float64), basis)) <= 1e-4
    full = ma.schur_subspace(a, k=K, split="nan", tol=0.0)
    np.testing.assert_array_equal(full.products, 300)


@pytest.mark.parametrize("tol", [1e-9, 5e-7])
def test_a_member_stuck_at_rounding_stops_holding_the_batch(tol):
    """A tol at or below float32's floor (~1e-6 here) cannot be met for good: the residuals stop
    improving and swing around it (at 5e-7 a member's best dipped below tol once). Such
    members used to hold the batch to iters = 300 (their forecast stayed under the 1e-4 stall
    limit); with no progress over a check period they now stop."""
    a, _ = _stack(np.random.default_rng(1))
    s = ma.schur_subspace(a, k=K, tol=tol)
    assert np.all(np.asarray(s.products) < 150)
    assert np.all(np.asarray(s.residual) < 5e-6)  # at the floor (its level depends on codegen)
    if tol < 1e-7:
        assert not np.any(np.asarray(s.converged))


def test_k_none_iterates_until_the_k_it_returns_has_converged(rng):
    """With k=None the iteration used to stop when each member had converged at its own
    best-gap k: here the 8-cluster head converged at its own k after 18 products and came back
    unconverged at the k = 3 chosen for the stack. It now iterates for the stack's k."""
    a, _ = _stack(rng)
    slow = testing.random_chains(
        np.random.default_rng(0), (1,), N, kind="metastable", strength=4.5, clusters=8
    )  # at k = 3 it converges in ~170 products
    ms = ma.metastable_states(np.concatenate([a, slow.astype(np.float32)]), split="nan")
    assert ms.k == K
    assert np.all(np.asarray(ms.converged)) and np.all(np.asarray(ms.residual) <= 1e-5)
    assert 108 <= int(ms.products[0]) < 300


def test_batches_larger_than_a_cache_chunk(rng, monkeypatch):
    """On CPU a batch runs in cache-sized chunks (lax.map): the per-chunk product counts must
    stack like the other outputs (a batch of more than one chunk raised a TypeError), and each
    chunk's subspaces agree with the whole batch's."""
    from markov_attn import _util

    a, _ = _stack(rng)
    whole = ma.schur_subspace(a, k=K)
    whole_states = ma.metastable_states(a, k=K)
    monkeypatch.setattr(_util, "CPU_CHUNK_BYTES", N * N * 4)  # 3 chunks of 1 matrix
    jax.clear_caches()
    chunked = ma.schur_subspace(a, k=K)
    states = ma.metastable_states(a, k=K)
    assert chunked.products.shape == (3,) and states.products.shape == (3,)
    np.testing.assert_array_equal(chunked.converged, whole.converged)
    for i in range(3):
        x, y = (np.asarray(s.basis[i], np.float64) for s in (whole, chunked))
        assert np.max(sl.subspace_angles(x, y)) <= 1e-4
    np.testing.assert_array_equal(states.assignment, whole_states.assignment)
    # k=None chooses its k over each chunk while iterating, and over the batch at the end;
    # a chunk that iterated for another k (the 8-cluster heads alone want k = 8) is iterated
    # again for the batch's k (it came back unconverged, residual 1e-2)
    slow = testing.random_chains(
        np.random.default_rng(0), (1,), N, kind="metastable", strength=4.5, clusters=8
    ).astype(np.float32)
    monkeypatch.setattr(_util, "CPU_CHUNK_BYTES", 3 * N * N * 4)  # [a0 a1 a2] [slow slow]
    jax.clear_caches()
    chosen = ma.metastable_states(np.concatenate([a, slow, slow]), split="nan")
    assert chosen.k == K and chosen.products.shape == (5,)
    assert np.all(np.asarray(chosen.converged))
    np.testing.assert_array_equal(chosen.assignment[:3], whole_states.assignment)
    jax.clear_caches()


def test_pcca_matches_deeptime_on_reversible_chains(rng):
    deeptime = pytest.importorskip("deeptime")
    a64, _ = _blocky(rng, (3,), N, K, reversible=True)
    pi = stationary(a64, alpha=1.0)
    ms = ma.metastable_states(a64.astype(np.float32), k=K, eta=pi)
    assert np.all(np.asarray(ms.converged))
    for i in range(3):
        ref = deeptime.markov.pcca(a64[i], K)
        assert _agreement(np.asarray(ms.assignment[i]), np.asarray(ref.assignments), K) >= 0.99
        # memberships agree up to a permutation of the states (deeptime optimises the rotation)
        chi = np.asarray(ms.memberships[i], np.float64)
        perm = [np.argmax(np.sum(chi[:, [j]] * ref.memberships, axis=0)) for j in range(K)]
        assert np.abs(chi - ref.memberships[:, perm]).max() <= 0.1


def test_memberships_are_a_partition_of_unity(rng):
    a, labels = _stack(rng)
    ms = ma.metastable_states(a, k=K)
    chi = np.asarray(ms.memberships)
    assert chi.shape == (3, N, K) and ms.assignment.dtype == np.int32 and ms.k == K
    assert chi.min() >= 0
    np.testing.assert_allclose(chi.sum(-1), 1.0, atol=1e-5)
    coarse = np.asarray(ms.coarse)
    assert coarse.min() >= -1e-6
    np.testing.assert_allclose(coarse.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(ms.metastability, np.trace(coarse, axis1=-2, axis2=-1), atol=1e-6)
    assert np.all(np.asarray(ms.metastability) <= K) and np.all(np.asarray(ms.crispness) <= 1)
    assert np.all(np.asarray(ms.converged))
    for i in range(3):  # the planted clusters
        assert _agreement(np.asarray(ms.assignment[i]), labels[i], K) >= 0.99
    # invariants: relabelling tokens permutes the rows; teleportation changes no state
    perm = rng.permutation(N)
    shuffled = ma.metastable_states(a[:, perm][:, :, perm], k=K)
    np.testing.assert_allclose(shuffled.memberships, ms.memberships[:, perm], atol=1e-3)
    teleported = ma.metastable_states(np.asarray(ma.teleport(a, alpha=0.9)), k=K)
    np.testing.assert_allclose(teleported.memberships, ms.memberships, atol=1e-3)
    # batching: vmap = the batched call (jit = eager: see test_bad_inputs)
    vm = jax.vmap(lambda x: ma.metastable_states(x, k=K))(a)
    for name in ("memberships", "coarse", "metastability", "residual", "assignment"):
        np.testing.assert_allclose(getattr(vm, name), getattr(ms, name), atol=1e-5)


def test_block_diagonal_chains_give_crisp_states():
    blocks = np.kron(np.eye(K), np.full((N // K, N // K), K / N))
    a = np.stack([0.999 * blocks + 0.001 / N] * 3).astype(np.float32)
    ms = ma.metastable_states(a, k=K)
    np.testing.assert_allclose(ms.crispness, 1.0, atol=1e-3)
    np.testing.assert_allclose(ms.metastability, K, atol=1e-2)
    truth = np.repeat(np.arange(K), N // K)
    for i in range(3):
        assert _agreement(np.asarray(ms.assignment[i]), truth, K) == 1.0


def test_k_none_picks_the_planted_number(rng):
    a, _ = _stack(rng)
    ms = ma.metastable_states(a)
    assert ms.k == K and ms.memberships.shape == (3, N, K)


def test_k_none_with_split_nan_counts_a_cut_as_no_gap(rng):
    """Near-circulant heads have their eigenvalues in conjugate pairs, so every even k cuts one.
    With split="raise" k=None must not cut any pair and is left with the odd k, whose gaps are
    noise on such a stack (on the benchmark's mixed stack it took k = 7 and ran 252 products,
    2 of 12 heads converged). With split="nan" a cut counts as a zero gap of that head: the
    metastable heads' k = 4 wins, they converge, and the circulant heads get NaN."""
    meta, _ = _blocky(rng, (2,), N, 4)
    circ = testing.random_chains(rng, (2,), N, kind="circulant")
    a = np.concatenate([meta, circ]).astype(np.float32)
    mod = np.sort(np.abs(np.linalg.eigvals(circ)), axis=-1)[:, ::-1]
    assert np.all(mod[:, 3] - mod[:, 4] < 1e-6)  # k = 4 cuts a pair of each circulant head
    nan = ma.metastable_states(a, split="nan")
    assert nan.k == 4
    assert np.asarray(nan.converged).tolist() == [True, True, False, False]
    assert np.all(np.isnan(np.asarray(nan.memberships[2:])))
    assert np.asarray(nan.assignment[2:]).max() == -1
    default = ma.metastable_states(a)  # k=None: split="nan" by default
    assert default.k == 4
    np.testing.assert_array_equal(np.asarray(default.assignment), np.asarray(nan.assignment))
    with pytest.raises(ValueError, match="cuts a complex-conjugate"):
        ma.metastable_states(a, k=4)  # a k the caller passes: split="raise" by default
    raised = ma.metastable_states(a, split="raise")  # a k that cuts no pair
    assert raised.k % 2 == 1 and not np.any(np.isnan(np.asarray(raised.memberships)))
    # the iteration targeted the k it returned (a chunk or batch that iterated for another k
    # is iterated again, which would at least double the products)
    assert int(nan.products[0]) < 100
    # the host rule on float64 eigenvalues
    ev = np.sort_complex(np.linalg.eigvals(a.astype(np.float64)))
    order = np.argsort(-np.abs(ev), axis=-1, kind="stable")
    ev = np.take_along_axis(ev, order, axis=-1)[:, :12]
    pair = np.abs(ev[:, :-1] - np.conj(ev[:, 1:])) < 1e-6
    pair &= np.abs(ev[:, :-1].imag) > 1e-9
    starts = pair & ~np.concatenate([np.zeros((4, 1), bool), pair[:, :-1]], axis=1)
    cuts = np.concatenate([starts, np.zeros((4, 1), bool)], axis=1)
    assert ma._metastable.choose_k(ev, cuts=cuts, skip_cuts=False) == 4
    assert ma._metastable.choose_k(ev, cuts=cuts) % 2 == 1
    # the gaps are of sorted moduli, the cuts by position in the (partly converged) Schur
    # order: where they disagree the largest gap can fall on a cut. Under split="nan" a k that
    # cuts a pair of every matrix is skipped (here the only matrix); one that cuts some is not.
    ev1 = np.array([[1.0, 1e-4 + 1e-4j, 1e-4 - 1e-4j, 5e-3, 1e-6]])
    cut1 = np.array([[False, True, False, False, False]])
    assert ma._metastable.choose_k(ev1, (2, 3), cuts=cut1, skip_cuts=False) == 3
    ev2, cut2 = np.concatenate([ev1, ev1]), np.concatenate([cut1, np.zeros_like(cut1)])
    assert ma._metastable.choose_k(ev2, (2, 3), cuts=cut2, skip_cuts=False) == 2


def test_k_none_never_cuts_every_matrix_of_a_rank_one_chain():
    """A nearly rank-one chain (every row almost the same distribution) has no gap after its
    first eigenvalue: its Ritz values past the first are rounding noise, and their complex pairs
    fall anywhere. k=None with split="nan" must still return states for it (the CLI's
    ``--method metastable`` on an untrained model's attention)."""
    rng = np.random.default_rng(5)
    for seed in range(6):
        row = rng.dirichlet(np.ones(16))
        a = row + 1e-4 * np.random.default_rng(seed).random((16, 16))
        a = (a / a.sum(-1, keepdims=True)).astype(np.float32)
        with pytest.warns(ma.UnresolvedGapWarning, match="no clear gap"):  # no gap: said so
            ms = ma.metastable_states(a, k_range=(2, 10), split="nan")
        assert np.isfinite(float(ms.metastability)), seed
        assert np.asarray(ms.assignment).min() >= 0


def test_coarse_is_differentiable_at_fixed_memberships(rng):
    a, _ = _stack(rng)
    g = jax.grad(lambda x: ma.metastable_states(x, k=K).metastability.sum())(jnp.asarray(a))
    assert g.shape == a.shape and np.all(np.isfinite(np.asarray(g)))
    assert np.abs(np.asarray(g)).max() > 0


def test_bad_inputs(rng):
    a, _ = _stack(rng)
    for k, match in [(1, "int >= 2"), (N, "smaller than the number of tokens"), (2.5, "k must")]:
        with pytest.raises(ValueError, match=match):
            ma.metastable_states(a, k=k)
    with pytest.raises(ValueError, match="smaller than the number of tokens"):
        ma.schur_subspace(a, k=N)
    with pytest.raises(ValueError, match="square"):
        ma.metastable_states(a[..., :-1], k=2)
    bad = a.copy()
    bad[1, 3, 4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        ma.metastable_states(bad, k=K)
    with pytest.raises(ValueError, match="negative"):
        ma.schur_subspace(a - 0.1, k=K)
    with pytest.raises(ValueError, match="eta must be positive"):
        ma.metastable_states(a, k=K, eta=np.zeros(N))
    with pytest.raises(ValueError, match="split must be"):
        ma.metastable_states(a, k=K, split="ignore")
    with pytest.raises(ValueError, match="k=None"):
        jax.jit(lambda x: ma.metastable_states(x).memberships)(a)
    # jit = eager; under jit: NaN for the bad matrix only, never a plausible number
    eager, jitted, out = ma.metastable_states(a, k=K), _states(a), _states(bad)
    for name in ("memberships", "coarse", "metastability", "residual", "assignment"):
        np.testing.assert_allclose(getattr(jitted, name), getattr(eager, name), atol=1e-6)
    for i in (0, 2):
        np.testing.assert_allclose(out.memberships[i], jitted.memberships[i], atol=1e-6)
    assert np.all(np.isnan(np.asarray(out.memberships[1])))
    assert np.all(np.asarray(out.assignment[1]) == -1)
    assert np.isnan(float(out.metastability[1])) and not bool(out.converged[1])
    sub = _subspace(bad)
    assert np.all(np.isnan(np.asarray(sub.basis[1]))) and not bool(sub.converged[1])
    assert np.all(np.isfinite(np.asarray(sub.basis[0])))


def test_exports_for_tpu_without_host_kernels():
    spec = jax.ShapeDtypeStruct((2, 3, 12, 12), jnp.float32)
    for fn in (
        lambda x: ma.schur_subspace(x, k=3),
        lambda x: ma.metastable_states(x, k=3).memberships,
    ):
        exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(spec)
        text = exported.mlir_module().lower()
        assert "lapack" not in text and "callback" not in text


def test_nearly_tied_eigenvalues_are_accurate_and_in_order():
    """Five planted clusters whose leading moduli differ by ~1e-3: the eigenvalues read off R's
    diagonal blocks were 3.5e-3 off and out of order, with converged=True."""
    rng = np.random.default_rng(1)

    def clustered(n, k, leak):
        lab = rng.integers(0, k, n)
        lab[:k] = np.arange(k)
        w = (rng.random((n, n)) + 0.1) * np.where(lab[:, None] == lab[None], 1.0, leak)
        return w / w.sum(1, keepdims=True)

    clustered(30, 3, 0.02), clustered(60, 4, 0.01)  # the draws of the review's example
    p = clustered(100, 5, 0.005)
    s = ma.schur_subspace(jnp.asarray(p, jnp.float32), k=5)
    true = np.sort(np.abs(np.linalg.eigvals(p)))[::-1][:5]
    lam = np.abs(np.asarray(s.eigenvalues))
    assert bool(s.converged)
    np.testing.assert_allclose(lam, true, atol=1e-5)
    assert np.all(np.diff(lam) <= 0)


def test_small_eigvals_against_numpy(rng):
    from markov_attn._metastable import _small_eigvals

    for p in (2, 3, 7, 12):
        x = rng.standard_normal((40, p, p)).astype(np.float32)
        ev = np.asarray(_small_eigvals(jnp.asarray(x)))
        for i in range(len(x)):
            ref = np.linalg.eigvals(x[i].astype(np.float64))
            d = np.abs(ev[i][:, None] - ref[None, :])
            from scipy.optimize import linear_sum_assignment

            r, c = linear_sum_assignment(d)
            assert d[r, c].max() <= 1e-4 * np.abs(ref).max(), (p, i)
            assert np.all(np.diff(np.abs(ev[i])) <= 0)
            pos = ev[i].imag > 0  # a conjugate pair: exact conjugates, positive part first
            np.testing.assert_array_equal(ev[i][1:][pos[:-1]], np.conj(ev[i][:-1][pos[:-1]]))


def test_eigenvalues_are_differentiable():
    """Through the shifted QR iteration on R (a loop with a traced bound had no reverse-mode
    derivative)."""
    a, _ = _blocky(np.random.default_rng(0), (2,), 24, 3)
    a = a.astype(np.float32)
    g = jax.grad(lambda x: jnp.sum(jnp.abs(ma.schur_subspace(x, k=3).eigenvalues[..., 1:])))(a)
    assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() > 0


def test_k_none_warns_when_the_gaps_do_not_single_out_k():
    """The choice reads |λk+1| from columns past the converged subspace. On a chain with no
    clear gap that made k depend on the token order (a random 24-token chain: k = 10 in one
    order, 3 in others, the reported gap at 10 three times the float64 one): such a choice now
    comes with an UnresolvedGapWarning; a metastable stack's clear gap with none."""
    rng = np.random.default_rng(1)
    x = np.exp(3.0 * rng.normal(size=(24, 24)))
    a = (x / x.sum(-1, keepdims=True)).astype(np.float32)
    with pytest.warns(ma.UnresolvedGapWarning, match=r"k = \d+ has"):
        ms = ma.metastable_states(a)  # identity order: k = 10 (float64's gaps pick 3)
    assert ms.k == 10
    # a clear gap: no warning (warnings are errors in this suite)
    meta, _ = _blocky(np.random.default_rng(3), (3,), N, 4)
    assert ma.metastable_states(meta.astype(np.float32)).k == 4


def test_unresolved_choice_rule():
    from markov_attn._metastable import _unresolved_choice

    ev = np.array([[1.0, 0.9, 0.5, 0.45, 0.1]])
    lead = np.array([[0.0, 1e-6, 1e-6, 1e-6, 1e-6]])
    rough = np.array([[0.0, 0.0, 1.0, 0.0, 0.0]])  # the modulus read for the gap at k = 2
    # gaps at k = 2, 3: 0.4 and 0.05; small residuals: k = 2 stands out
    assert _unresolved_choice(ev, None, lead, 2, 3, True, 2) is None
    # 0.4 - 0.17 > 0.05: it still stands out; 0.4 - 0.36 < 0.05: it does not
    assert _unresolved_choice(ev, None, lead + 0.17 * rough, 2, 3, True, 2) is None
    tied = _unresolved_choice(ev, None, lead + 0.36 * rough, 2, 3, True, 2)
    assert tied[0] == 3 and np.isclose(tied[1], 0.05) and np.isclose(tied[3], 0.36)
    # a pair starting at position k + 1 = 3 (index 2): the k + 2 = 4 columns' residual counts
    cuts = np.array([[False, False, True, False, False]])
    assert _unresolved_choice(ev, cuts, lead + 0.36 * rough, 2, 3, False, 2) is None
    # a rival whose uncertainty is unknown (NaN in every member) is a tie, not ignored
    unknown = lead.copy()
    unknown[0, 3] = np.nan
    assert _unresolved_choice(ev, None, unknown, 2, 3, True, 2) is not None


def _angle(x, y):
    """Largest principal angle between the column spans of x and y."""
    qx, qy = np.linalg.qr(x)[0], np.linalg.qr(y)[0]
    s = np.linalg.svd(qx.T @ qy, compute_uv=False)
    return float(np.arccos(np.clip(s.min(), -1.0, 1.0)))


def test_fast_mixing_chains_converge_in_float32():
    """Each product added a large constant component to the non-constant columns (the chain
    is not doubly stochastic) while their own parts shrank like |λ|^5; the QR cancelled it in
    float32, leaving fast-mixing chains a subspace error of ~1e-2 that no number of products
    reduced: converged on 0 of 16 diffuse chains, median angle 1.8e-2 to float64 Schur
    (float64 input: 6 of 16, 3.8e-5). Found by review."""
    a = testing.random_chains(np.random.default_rng(0), (16,), 48, kind="diffuse")
    s = ma.schur_subspace(a.astype(np.float32), k=3, split="nan")
    angles = []
    for i in range(16):
        try:
            z, _ = _schur_ref(a[i] / a[i].sum(-1, keepdims=True), 3)
        except AssertionError:  # k = 3 cuts this chain's pair: no reference subspace
            continue
        angles.append(_angle(np.asarray(s.basis[i], np.float64), z))
    assert len(angles) >= 8 and np.median(angles) < 1e-4, (len(angles), np.median(angles))
    assert int(np.asarray(s.converged).sum()) >= 5


def test_an_unresolved_block_is_not_called_a_cut_pair():
    """Two close real eigenvalues of a causal chain (|λ| = 1, .2371, .2244) looked like a
    complex pair in an unconverged 2x2 block of the projection: k = 2 raised "cuts a
    complex-conjugate pair" (review). A true pair is still refused."""
    a = testing.random_chains(np.random.default_rng(1), (24,), 30, kind="causal")
    a = a.astype(np.float32)
    assert np.all(np.triu(a, 1) == 0)  # the premise: triangular, every eigenvalue is real
    for i in range(24):
        for k in (2, 3, 4, 5):
            ms = ma.metastable_states(a[i], k=k)  # raised for 5 of these 96 (k, chain)
            assert np.isfinite(np.asarray(ms.memberships)).all()
    c = testing.random_chains(np.random.default_rng(4), (), 16, kind="circulant")
    with pytest.raises(ValueError, match="complex-conjugate"):
        ma.metastable_states(c, k=2)


def test_cut_and_invalid_matrices_report_nan_not_plausible_numbers():
    """Under jit the invalid member's eigenvalues, residual and gap were the uniform chain's
    it had been replaced by ([1, ~0], 2e-7, 0), and a cut matrix (split="nan") reported the
    cut block's eigenvalue 0.7241, which is none of the chain's (|λ2| = 0.793): NaN now
    (review)."""
    rng = np.random.default_rng(0)
    a, _ = _stack(rng)
    bad = a[:2].copy()
    bad[1, 2, 3] = np.nan
    out = jax.jit(lambda x: ma.metastable_states(x, k=K))(bad)
    for name in ("eigenvalues", "residual", "gap"):
        assert np.isnan(np.asarray(getattr(out, name)[1])).all(), name
        assert np.isfinite(np.asarray(getattr(out, name)[0])).all(), name
    c = testing.random_chains(np.random.default_rng(4), (), 16, kind="circulant")
    for res in (ma.schur_subspace(c, k=2, split="nan"), ma.metastable_states(c, k=2, split="nan")):
        assert np.isnan(np.asarray(res.eigenvalues)).all() and not bool(res.converged)


def test_a_gap_that_does_not_stand_out_from_zero_warns():
    """On a 5-cycle every |λ| is 1: k=None is left with k = 3 (2 and 4 cut a pair), a gap of
    ~1e-6 with an uncertainty near 1, which passed without a warning (review)."""
    cycle = np.roll(np.eye(5), 1, axis=1)
    with pytest.warns(ma.UnresolvedGapWarning, match="does not stand out from 0"):
        ma.metastable_states(cycle)


def test_eta_of_the_wrong_batch_shape_is_named():
    """eta (2, n) with three matrices failed with JAX's bare broadcasting error (review)."""
    a = testing.random_chains(np.random.default_rng(0), (3,), 8, kind="metastable")
    with pytest.raises(ValueError, match="eta has batch shape"):
        ma.metastable_states(a, k=2, eta=np.ones((2, 8)))
    assert ma.metastable_states(a, k=2, eta=np.ones((3, 8))).k == 2


def test_diffseg_on_an_empty_batch():
    """diffseg(np.zeros((0, 16, 16))) failed to reshape (review)."""
    from markov_attn.segmentation import diffseg

    labels, k = diffseg(np.zeros((0, 16, 16)))
    assert labels.shape == (0, 16) and k.shape == (0,)


def test_an_unconverged_complex_block_is_still_a_cut():
    """The exemption for close real eigenvalues must not reach blocks far from converged: it
    let real pairs of the benchmark's near-circulant heads through (no error at k = 2 with
    split="raise", eigenvalues [1, 0.586] where float64 has -0.443 ± 0.750i; review)."""
    from experiments.bench_core import build_stack

    a = build_stack(197, batch=1)[0].astype(np.float32)
    for h in (4, 5, 7):  # near-circulant heads whose k = 2 cuts a pair
        with pytest.raises(ValueError, match="complex-conjugate"):
            ma.schur_subspace(a[h], k=2)
        s = ma.schur_subspace(a[h], k=2, split="nan")
        assert np.isnan(np.asarray(s.eigenvalues)).all() and not bool(s.converged)
