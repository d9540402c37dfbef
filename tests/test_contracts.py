"""The input contract of the one-step functions and of bounce (README: "Input contract"), on
inputs a review of 2026-12-07 found outside it: rows that do not sum to 1, distributions that
sum to zero under jit, list arguments, bf16 tolerances, broadcasting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import markov_attn as ma


def _weights(seed=0, n=5):
    rng = np.random.default_rng(seed)
    w = rng.random((n, n)) * rng.uniform(0.2, 5.0, (n, 1))  # rows at different scales
    w[1] = 0.0  # an all-zero row: the uniform row
    return w.astype(np.float32)


def _chain(w):
    s = w.sum(-1, keepdims=True)
    return np.where(s == 0, 1.0 / w.shape[-1], w / np.where(s == 0, 1.0, s))


def test_one_step_functions_renormalise_rows():
    w = _weights()
    a = _chain(w.astype(np.float64))
    n = w.shape[-1]
    t = np.asarray(ma.teleport(w, alpha=0.9))
    np.testing.assert_allclose(t, 0.9 * a + 0.1 / n, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ma.column_sum(w)), a.mean(0), atol=1e-6)
    np.testing.assert_allclose(np.asarray(ma.row_select(w, 3)), a[3], atol=1e-6)
    col = a[:, 2] / a[:, 2].sum()
    np.testing.assert_allclose(np.asarray(ma.column_select(w, 2)), col, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ma.reverse(w)), np.asarray(ma.reverse(a)), atol=1e-6)
    # the same operations as one bounce step without teleportation
    fwd = np.asarray(ma.bounce(w, 3, steps=1, alpha=1.0))[1]
    rev = np.asarray(ma.bounce(w, 2, steps=1, alpha=1.0, direction="reverse"))[1]
    np.testing.assert_allclose(np.asarray(ma.row_select(w, 3)), fwd, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ma.column_select(w, 2)), rev, atol=1e-6)
    layers = np.stack([w, w.T + 0.1])[:, None]  # (L=2, H=1, n, n), rows not summing to 1
    normed = np.stack([_chain(x) for x in layers[:, 0]])[:, None].astype(np.float32)
    np.testing.assert_allclose(
        np.asarray(ma.rollout(layers)), np.asarray(ma.rollout(normed)), atol=1e-6
    )


def test_zero_sum_distributions_are_nan_under_jit():
    a = jnp.asarray(_chain(_weights().astype(np.float64)), jnp.float32)
    zero = jnp.zeros(a.shape[-1])
    assert np.isnan(np.asarray(jax.jit(lambda a, x: ma.bounce(a, x, steps=2))(a, zero))).all()
    out = jax.jit(lambda a, v: ma.bounce(a, 0, steps=2, v=v))(a, zero)
    assert np.isnan(np.asarray(out)).all()
    assert np.isnan(np.asarray(jax.jit(lambda a, v: ma.teleport(a, v=v))(a, zero))).all()
    assert np.isnan(np.asarray(jax.jit(lambda a, v: ma.tokenrank(a, v=v))(a, zero))).all()
    with pytest.raises(ValueError, match="sums to zero"):
        ma.bounce(a, zero, steps=2)


def test_list_arguments_are_checked_eagerly():
    a = np.full((2, 4, 4), 0.25, np.float32)
    with pytest.raises(ValueError, match="token index"):
        ma.row_select(a, [0, 5])
    with pytest.raises(ValueError, match="integer"):
        ma.row_select(a, [0.0, 1.5])
    with pytest.raises(ValueError, match="token index"):
        ma.column_select(a, [0, 5])
    with pytest.raises(ValueError, match="alpha"):
        ma.teleport(a, alpha=[0.9, 1.1])
    with pytest.raises(ValueError, match="alpha"):
        ma.bounce(a, 0, steps=1, alpha=[0.9, 1.1])
    with pytest.raises(ValueError, match="alpha"):
        ma.check_chain(a, alpha=[2.0])


def test_check_chain_bf16_tolerance_and_empty_batch():
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 197, 197)) * 3
    ma.check_chain(jax.nn.softmax(x.astype(jnp.bfloat16), axis=-1))  # real bf16 rounding
    ma.check_chain(jax.nn.softmax(x, axis=-1).astype(jnp.bfloat16))
    off = np.array(jax.nn.softmax(x[0], axis=-1), np.float32)
    off[3] *= 1.3
    with pytest.raises(ValueError, match="sum to 1"):
        ma.check_chain(jnp.asarray(off, jnp.bfloat16))
    ma.check_chain(np.zeros((0, 3, 3), np.float32))  # an empty batch is fine


def test_reverse_bounce_with_a_bad_traced_alpha_is_nan():
    a = jnp.asarray(_chain(_weights().astype(np.float64)), jnp.float32)
    for steps in (0, 2):
        f = jax.jit(lambda a, al, s=steps: ma.bounce(a, 1, steps=s, alpha=al, direction="reverse"))
        assert np.isnan(np.asarray(f(a, 1.5))).all()


def test_uniform_head_weights_of_invalid_lam2_are_nan_under_jit():
    f = jax.jit(lambda lam: ma.head_weights(lam, weighting="uniform"))
    assert np.isnan(np.asarray(f(jnp.array([np.nan, 0.5])))).all()
    assert np.isnan(np.asarray(f(jnp.array([3.0, 0.5])))).all()
    np.testing.assert_allclose(np.asarray(f(jnp.array([0.2, 0.5]))), [0.5, 0.5])


def test_bounce_broadcasts_v_and_indices_against_the_batch():
    a = jnp.asarray(_chain(_weights().astype(np.float64)), jnp.float32)
    rng = np.random.default_rng(1)
    v = rng.random((3, a.shape[-1])).astype(np.float32)
    out = np.asarray(ma.bounce(a, 0, steps=2, v=v))
    assert out.shape == (3, 3, a.shape[-1])
    for i in range(3):
        np.testing.assert_allclose(out[i], np.asarray(ma.bounce(a, 0, steps=2, v=v[i])), atol=1e-6)
    per = np.asarray(ma.bounce(np.stack([a] * 3)[None].repeat(2, 0), 0, steps=1,
                               alpha=np.array([0.9, 0.8, 0.7])))  # fmt: skip
    assert per.shape == (2, 3, 2, a.shape[-1])  # one alpha per head, broadcast over the batch
    np.testing.assert_allclose(per[1, 2], np.asarray(ma.bounce(a, 0, steps=1, alpha=0.7)))
    listed = np.asarray(ma.row_select(np.stack([a] * 3), [0, 1, 3]))  # a valid list index
    np.testing.assert_allclose(listed, np.asarray(a)[[0, 1, 3]], atol=1e-6)
    listed = np.asarray(ma.column_select(np.stack([a] * 3), [0, 1, 3]))
    np.testing.assert_allclose(listed[2], np.asarray(ma.column_select(a, 3)), atol=1e-6)
    rows = np.asarray(ma.row_select(a[None], np.array([0, 3])))
    np.testing.assert_allclose(rows, np.asarray(a)[[0, 3]], atol=1e-6)
    cols = np.asarray(ma.column_select(a[None], np.array([0, 3])))
    np.testing.assert_allclose(cols[1], np.asarray(ma.column_select(a, 3)), atol=1e-6)


def test_one_uniform_head_leaves_the_other_heads_lambda2_gradients_finite():
    """A uniform chain has a singular eigenvector matrix; the batched host solve used to give
    NaN for the whole batch, so one fully masked head made every head's gradient NaN."""
    n = 9
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((2, n, 4)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, n, 4)), jnp.float32)
    km = jnp.ones((2, n), bool).at[0].set(False)  # head 0 fully masked: the uniform chain
    g = jax.grad(lambda q: ma.second_eigenvalue_qk(q, k, key_mask=km).sum())(q)
    g1 = jax.grad(lambda q1: ma.second_eigenvalue_qk(q1, k[1]))(q[1])
    assert np.isfinite(np.asarray(g1)).all()
    np.testing.assert_allclose(np.asarray(g[1]), np.asarray(g1), rtol=1e-4, atol=1e-6)
    a = jax.nn.softmax(jnp.einsum("hid,hjd->hij", q, k), -1).at[0].set(1.0 / n)
    ga = jax.grad(lambda a: ma.second_eigenvalue(a).sum())(a)
    assert np.isfinite(np.asarray(ga[1])).all()


def test_one_token_streamed_lambda2_of_nan_input_is_nan():
    qn = jnp.full((1, 4), jnp.nan)
    assert np.isnan(float(jax.jit(ma.second_eigenvalue_qk)(qn, qn)))
    assert float(ma.second_eigenvalue_qk(jnp.ones((1, 4)), jnp.ones((1, 4)))) == 0.0


@pytest.mark.parametrize("fn", ["tokenrank_qk", "second_eigenvalue_qk", "bounce_qk"])
def test_qk_logits_that_overflow_are_refused_or_nan(fn):
    """Finite q and k whose logits overflow float32 gave TokenRank exactly uniform (GMRES
    rejected the non-finite correction and the zero start was normalised)."""
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(2, 16, 4)).astype(np.float32)
    f = {
        "tokenrank_qk": ma.tokenrank_qk,
        "second_eigenvalue_qk": ma.second_eigenvalue_qk,
        "bounce_qk": lambda q, k: ma.bounce_qk(q, k, 0, steps=2),
    }[fn]
    with pytest.raises(ValueError, match="overflow"):
        f(q * 1e20, k * 1e20)
    out = np.asarray(jax.jit(f)(np.stack([q, q * 1e20]), np.stack([k, k * 1e20])))
    assert np.isfinite(out[0]).all() and np.isnan(out[1]).all()
    start = (0,) if fn == "bounce_qk" else ()
    with pytest.raises(ValueError, match="scale must be finite"):
        getattr(ma, fn)(q, k, *start, scale=float("nan"), **({"steps": 2} if start else {}))


def test_integer_attention_with_negative_entries_is_refused():
    with pytest.raises(ValueError, match="negative"):
        ma.tokenrank(np.array([[2, -1], [1, 1]]))
    ok = ma.tokenrank(np.array([[2, 1], [1, 1]]))  # integer weights are renormalised rows
    np.testing.assert_allclose(ok, ma.tokenrank(np.array([[2.0, 1.0], [1.0, 1.0]])))
    np.testing.assert_allclose(ma.tokenrank(np.eye(3, dtype=bool)), ma.tokenrank(np.eye(3)))


def test_refined_gmres_on_a_broken_operator_is_nan():
    from markov_attn._krylov import refined_gmres

    b = jnp.ones((2, 4)) / 4
    fast = lambda x: x * jnp.asarray([[1.0], [jnp.nan]])  # the second member is broken
    res = lambda x: b - fast(x)
    out = refined_gmres(fast, res, b, threshold=jnp.full(2, 1e-6))
    np.testing.assert_allclose(out.x[0], b[0], rtol=1e-6)
    assert np.isnan(np.asarray(out.x[1])).all()


def test_float64_rows_that_float32_cannot_hold_are_refused():
    """A float64 row of 1e-50 entries became a zero row in float32 (read as uniform: L1
    7.6e-3 off), and 1e50 was reported as 'NaN or inf'; both now name the fix."""
    tiny = np.array([[1e-50, 3e-50, 0.0], [0.0, 1.0, 0.0], [0.0, 0.5, 0.5]])
    with pytest.raises(ValueError, match="smallest normal"):
        ma.tokenrank(tiny)
    with pytest.raises(ValueError, match="above float32's range"):
        ma.second_eigenvalue(np.array([[1e50, 1.0], [1.0, 1.0]]))
    scaled = tiny / tiny.max(-1, keepdims=True)  # the fix the message names
    assert np.isfinite(np.asarray(ma.tokenrank(scaled))).all()


def test_qk_checks_leave_vmap_over_key_masks_and_traced_blur_alone():
    """The eager overflow refusal must not run on traced outputs (vmap over a key_mask raised
    TracerBoolConversionError); a float64 list is checked like an array."""
    rng = np.random.default_rng(1)
    q, k = rng.normal(size=(2, 8, 4)).astype(np.float32)
    km = np.ones((3, 8), bool)
    km[1, :2] = False
    pi = jax.vmap(lambda m: ma.tokenrank_qk(q, k, key_mask=m))(km)
    assert pi.shape == (3, 8) and np.isfinite(np.asarray(pi)).all()
    lam = jax.vmap(lambda m: ma.second_eigenvalue_qk(q, k, key_mask=m))(km)
    assert np.isfinite(np.asarray(lam)).all()
    with pytest.raises(ValueError, match="smallest normal"):
        ma.tokenrank([[1e-50, 3e-50], [0.0, 1.0]])


def test_qk_batched_key_mask_with_unbatched_queries():
    """A (3, n) key_mask with (n, d) queries was refused as a 'full (n, n) mask'; it is a batch
    of three masks, broadcast like the other batch axes."""
    rng = np.random.default_rng(2)
    q, k = rng.normal(size=(2, 8, 4)).astype(np.float32)
    km = np.ones((3, 8), bool)
    km[1, :3] = False
    got = ma.tokenrank_qk(q, k, key_mask=km)
    want = np.stack([ma.tokenrank_qk(q, k, key_mask=m) for m in km])
    np.testing.assert_allclose(got, want, atol=1e-6)
    with pytest.raises(ValueError, match="full"):  # (n, n) with unbatched q: still refused
        ma.tokenrank_qk(q, k, key_mask=np.ones((8, 8), bool))
    with pytest.raises(ValueError, match="full"):  # and with a length-1 batch axis (was taken
        ma.tokenrank_qk(q[None], k[None], key_mask=np.ones((8, 8), bool))  # as 8 masks)
    heads = np.stack([q] * 8), np.stack([k] * 8)  # 8 heads, one mask per head: a batch
    ma.tokenrank_qk(*heads, key_mask=km[:1].repeat(8, 0))


def test_small_and_unsigned_token_indices():
    """uint8 / int8 indices made every output NaN (-n wrapped or overflowed in their dtype)."""
    a = np.array([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [1.0, 0.0, 0.0]], np.float32)
    for index in (np.uint8(2), np.int8(2), np.uint32(2), np.int8(-1), np.int16(2)):
        np.testing.assert_allclose(ma.row_select(a, index), a[2], err_msg=str(index.dtype))
    out = jax.jit(lambda i: ma.row_select(a, i))(np.uint32(2**32 - 1))  # not a valid -1
    assert np.isnan(np.asarray(out)).all()
    np.testing.assert_allclose(ma.bounce(a, np.uint8(1), steps=1, alpha=1.0)[1], a[1], atol=1e-7)


def test_transition_full_mask_of_lower_rank_and_minus_inf_rows():
    """An (n, n) mask with (h, n, n) logits was read as n key masks (an extra axis, or each
    head given one mask row); a row whose visible scores are all -inf came out uniform over the
    masked keys too, where the unmasked softmax gives NaN."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 4, 4)).astype(np.float32)
    full = np.tril(np.ones((4, 4), bool))
    got = ma.transition(logits, mask=full)
    assert got.shape == (2, 4, 4)
    np.testing.assert_allclose(got, ma.transition(logits, mask=np.broadcast_to(full, (2, 4, 4))))
    x = np.zeros((3, 3), np.float32)
    x[0] = -np.inf
    out = np.asarray(ma.transition(x, mask=np.array([True, True, False])))
    assert np.isnan(out[0]).all() and np.isfinite(out[1:]).all()
    none = np.asarray(ma.transition(np.zeros((3, 3), np.float32), mask=np.zeros(3, bool)))
    np.testing.assert_allclose(none, 1 / 3)  # every key masked: uniform, as documented


def test_rollout_refuses_a_traced_vector_residual():
    a = np.random.default_rng(1).random((3, 2, 1, 3, 3)).astype(np.float32)
    with pytest.raises(ValueError, match="scalar"):
        jax.jit(lambda a, r: ma.rollout(a, residual=r))(a, np.array([0.0, 0.5, 1.0], np.float32))
