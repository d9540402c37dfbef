"""Sharded == unsharded on 8 simulated CPU devices, with no gathering of attention matrices.

``--xla_force_host_platform_device_count`` must be set before JAX initialises, and the test
session has already initialised it, so the checks run in a subprocess that prints its
measurements as JSON; the assertions are made here.

The subprocess is compile-bound (about 18 distinct programs, each run once on 2 x 2 x 4 tiny
heads), so it compiles with LLVM's optimisations off (``--xla_backend_optimization_level=0``):
the HLO passes that decide sharding and collectives are the same, only the machine code is
less optimised; this halves its time.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = r"""
import functools, json, re
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import markov_attn as ma
from markov_attn._shard import shard_stack
from markov_attn._stream import bounce_qk, second_eigenvalue_qk, tokenrank_qk

assert jax.device_count() == 8, jax.devices()
AXES = ("batch", "layer", "head")
rng = np.random.default_rng(0)
B, L, H, n, d = 2, 2, 4, 32, 8
q = rng.normal(size=(B, L, H, n, d)).astype(np.float32)
k = rng.normal(size=(B, L, H, n, d)).astype(np.float32)
mask = rng.random((B, L, H, n)) > 0.2
attn = np.asarray(ma.transition(np.einsum("...id,...jd->...ij", q, k) / np.sqrt(d), mask=mask))
w = rng.normal(size=(B, L, H, n)).astype(np.float32)
out = {}

def collectives(compiled):
    txt = compiled.as_text()
    ops = sorted(set(re.findall(
        r"\b(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)", txt)))
    # shapes of any all-gather results (an n x n gather would show as [..., n, n])
    gathers = re.findall(r"(\S+\[[0-9,]*\]) all-gather", txt)
    return ops, gathers

def record(name, f, args, replicated=(), axis_type="Explicit"):
    mesh = jax.make_mesh((2, 2, 2), AXES, axis_types=(getattr(AxisType, axis_type),) * 3)
    sh = NamedSharding(mesh, P(*AXES))
    dev = [a if i in replicated else jax.device_put(a, sh) for i, a in enumerate(args)]
    g = shard_stack(f, mesh=mesh, axes=AXES, replicated=replicated)
    compiled = g.lower(*dev).compile()
    res = compiled(*dev)
    ref = f(*args)
    ops, gathers = collectives(compiled)
    out[name] = dict(
        err=float(np.max(np.abs(np.asarray(res) - np.asarray(ref)))),
        spec=[str(s) for s in res.sharding.spec], shape=list(res.shape),
        n_shards=len(res.addressable_shards),
        shard_shape=list(res.addressable_shards[0].data.shape),
        collectives=ops, gathers=gathers,
    )

tr = functools.partial(tokenrank_qk, block=16)
tr_masked = lambda q, k, m: tr(q, k, key_mask=m)
record("tokenrank_qk", tr_masked, (q, k, mask))
record("second_eigenvalue_qk", functools.partial(second_eigenvalue_qk, block=16, krylov=24),
       (q, k))
record("bounce_qk", lambda q, k, x0: bounce_qk(q, k, x0, steps=2, block=16), (q, k, 3),
       replicated=(2,))
record("tokenrank", ma.tokenrank, (attn,), axis_type="Auto")
record("second_eigenvalue", functools.partial(ma.second_eigenvalue, krylov=24), (attn,))
record("bounce", lambda a: ma.bounce(a, 3, steps=2), (attn,))
grad = jax.jit(jax.grad(lambda q, k, w: jnp.sum(w * tr(q, k)), argnums=(0, 1)))
record("grad_q_tokenrank_qk", lambda q, k, w: grad(q, k, w)[0], (q, k, w))

# plain jit with sharded inputs (automatic partitioning, Auto mesh axes): no gathers either
mesh = jax.make_mesh((2, 2, 2), AXES, axis_types=(AxisType.Auto,) * 3)
sh = NamedSharding(mesh, P(*AXES))
# (the masked tokenrank_qk and ma.tokenrank on the same arrays as above: their unsharded
# references are already compiled)
for name, f, args in [
    ("jit_tokenrank_qk", tr_masked, (q, k, mask)),
    ("jit_tokenrank", ma.tokenrank, (attn,)),
]:
    j = jax.jit(f, out_shardings=sh)
    dev = [jax.device_put(a, sh) for a in args]
    compiled = j.lower(*dev).compile()
    res = compiled(*dev)
    ops, gathers = collectives(compiled)
    out[name] = dict(err=float(np.max(np.abs(np.asarray(res) - np.asarray(f(*args))))),
                     spec=[str(s) for s in res.sharding.spec], shape=list(res.shape),
                     n_shards=len(res.addressable_shards),
                     shard_shape=list(res.addressable_shards[0].data.shape),
                     collectives=ops, gathers=gathers)
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def sharded():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        "--xla_force_host_platform_device_count=8 --xla_cpu_experimental_ynn_fusion_type="
        " --xla_backend_optimization_level=0"
    )
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


SHARD_MAPPED = [
    "tokenrank_qk",
    "second_eigenvalue_qk",
    "bounce_qk",
    "tokenrank",
    "second_eigenvalue",
    "bounce",
    "grad_q_tokenrank_qk",
]


@pytest.mark.parametrize("name", [*SHARD_MAPPED, "jit_tokenrank_qk", "jit_tokenrank"])
def test_sharded_equals_unsharded(sharded, name):
    r = sharded[name]
    assert r["err"] <= 1e-6, r
    assert r["spec"][:3] == ["batch", "layer", "head"], r
    assert all(s == "None" for s in r["spec"][3:]), r
    # 8 shards, each holding 1 x 1 x 2 of the (2, 2, 4) stack
    assert r["n_shards"] == 8
    assert r["shard_shape"][:3] == [1, 1, 2] and r["shard_shape"][3:] == r["shape"][3:]


@pytest.mark.parametrize("name", SHARD_MAPPED)
def test_shard_stack_needs_no_communication(sharded, name):
    assert sharded[name]["collectives"] == [], sharded[name]


@pytest.mark.parametrize("name", ["jit_tokenrank_qk", "jit_tokenrank"])
def test_automatic_partitioning_gathers_nothing(sharded, name):
    # GMRES's global stopping test may all-reduce a scalar; nothing is ever gathered
    assert "all-gather" not in sharded[name]["collectives"], sharded[name]
    assert sharded[name]["gathers"] == []


def test_replicated_arguments_are_checked():
    """A replicated per-matrix index broadcast against each device's local heads (results
    stitched in the wrong shape); a bad replicated index or an unmarked scalar gave a bare
    AssertionError."""
    import functools

    import jax
    import numpy as np

    import markov_attn as ma

    mesh = jax.make_mesh((1,), ("head",))
    a = np.full((2, 3, 4, 4), 0.25, np.float32)
    f = ma.shard_stack(lambda a, i: ma.bounce(a, i, steps=1), mesh=mesh,
                       axes=(None, "head"), replicated=(1,))  # fmt: skip
    assert f(a, np.int32(0)).shape == (2, 3, 2, 4)  # a scalar start is fine
    g = ma.shard_stack(functools.partial(ma.teleport), mesh=mesh, axes=(None, "head"),
                       replicated=(5,))  # fmt: skip
    with pytest.raises(ValueError, match="replicated"):
        g(a)
    h = ma.shard_stack(lambda a, al: ma.teleport(a, alpha=al), mesh=mesh, axes=(None, "head"))
    with pytest.raises(ValueError, match="replicated="):
        h(a, np.float32(0.5))


BROADCAST = r"""
import jax, numpy as np, markov_attn as ma
mesh = jax.make_mesh((2,), ("head",))
a = np.full((2, 2, 6, 6), 1 / 6, np.float32)
f = ma.shard_stack(lambda a, i: ma.bounce(a, i, steps=2), mesh=mesh, axes=(None, "head"),
                   replicated=(1,))
try:
    print("shape", f(a, np.array([0, 3])).shape)
except ValueError as e:
    print("refused", e)
"""


def test_a_replicated_per_head_index_is_refused():
    """On two devices a replicated (2,) index broadcast against each device's single head:
    the result came back as (2, 4, 3, 6) instead of (2, 2, 3, 6), starts paired wrongly."""
    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "")
               + " --xla_force_host_platform_device_count=2")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", BROADCAST], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "refused" in r.stdout and "leading shape" in r.stdout, r.stdout
