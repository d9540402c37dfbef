"""Dense vs streaming TokenRank and |λ2| on an accelerator, against its measured copy bandwidth.

Prepared to run in one short call on a GPU machine (about 3-5 minutes on one H100, most of it
compilation); it also runs on CPU::

    python -m experiments.bench_gpu            # GPU/TPU: the two workloads below
    python -m experiments.bench_gpu --small    # CPU check, tiny shapes, ~1 minute

Workloads (q, k ~ N(0, 1), d = 64, logits scaled by 1/8):

- ``vit_b``: a ViT-B-size stack, batch 64 x 12 layers x 12 heads, n = 197 (9,216 matrices,
  1.43 GB of float32 attention);
- ``flux``: n = 4,608 with 24 heads (one FLUX layer of one image, 2.04 GB of attention).

For each: the dense path on the stored attention ``A = ma.transition(q kᵀ/8)`` (building ``A``
timed separately) with ``ma.tokenrank`` (``"solve"`` and ``"gmres"``) and
``ma.second_eigenvalue`` (Arnoldi, 128 passes), and the streaming path from ``q, k``
(``ma.tokenrank_qk``, ``ma.second_eigenvalue_qk``). Bandwidth:

- ``copy``: device-to-device copies (10 passes of ``x + 1`` over a 1 GiB array in one loop,
  read + write bytes / time):
  the practical memory bandwidth of the device, measured in the same run;
- ``pass`` rows time one product ``Aᵀx`` over the whole stack (the slope between 8 and 16
  bounces, so that a call's set-up is not counted; before 2026-12-07: t / 8): for the dense
  path, ``stack bytes / time`` is the achieved read bandwidth, reported as a fraction of the
  copy bandwidth; the streaming pass reads only Q and K, so its "virtual" bandwidth (the bytes
  of the attention it never stores, per second) can exceed the device's;
- every other row reports ``equivalent passes`` = time / dense pass time (how many reads of
  the attention stack the same time buys), and for the dense Arnoldi (exactly 128 passes) its
  achieved bandwidth.

Matmuls run at ``precision=HIGHEST`` (float32 products; TF32 would spoil iterative methods).
Writes ``runs/bench_gpu/results.json`` and ``results.md`` (``runs/bench_gpu_small`` with
``--small``).
"""

import argparse
import functools
import json
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

import markov_attn as ma
from markov_attn import bounce_qk, second_eigenvalue_qk, tokenrank_qk

ROOT = pathlib.Path(__file__).resolve().parents[1]

HIGHEST = jax.lax.Precision.HIGHEST
PASS_STEPS = 8

WORKLOADS = {
    "full": {
        "vit_b": dict(shape=(64, 12, 12), n=197, d=64, block=197),
        "flux": dict(shape=(24,), n=4608, d=64, block=512),
    },
    "small": {
        "vit_b": dict(shape=(2, 2, 3), n=197, d=64, block=197),
        "flux": dict(shape=(2,), n=512, d=64, block=256),
    },
}


def timed(f, *args, repeats=3):
    """Median wall time of ``f(*args)`` after one compile/warm-up call; returns (s, output)."""
    out = jax.block_until_ready(f(*args))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)), out


def copy_bandwidth(nbytes: int, repeats: int = 5, inner: int = 10) -> float:
    """Device memory bandwidth (bytes/s): ``inner`` in-place passes of ``x + 1`` in one loop,
    each reading and writing ``nbytes`` (a loop, so no pass pays for allocating its output)."""
    x = jnp.zeros((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda x: jax.lax.fori_loop(0, inner, lambda i, y: y + 1.0, x))
    t, _ = timed(f, x, repeats=repeats)
    del x
    return 2 * nbytes * inner / t


def bench_workload(name, cfg, copy_bw, repeats):
    shape, n, d, block = cfg["shape"], cfg["n"], cfg["d"], cfg["block"]
    q, k = jax.random.normal(jax.random.key(0), (2, *shape, n, d), jnp.float32)
    mats = int(np.prod(shape))
    stack_bytes = mats * n * n * 4
    scale = 1.0 / d**0.5
    rows = {}

    def row(key, t, **extra):
        rows[key] = dict(seconds=t, **extra)
        msg = ", ".join(f"{k2} {v:.3g}" for k2, v in extra.items() if isinstance(v, float))
        print(f"  {name:6s} {key:28s} {t * 1e3:10.2f} ms  {msg}", flush=True)

    build = jax.jit(
        lambda q, k: ma.transition(
            jnp.einsum("...id,...jd->...ij", q, k, precision=HIGHEST) * scale
        )
    )
    t, attn = timed(build, q, k, repeats=repeats)
    row("dense: build A (transition)", t)

    x0 = jnp.full((*shape, n), 1.0 / n, jnp.float32)

    def per_pass(bounce, *args):
        """Seconds per product: the slope between 2 * PASS_STEPS and PASS_STEPS bounces. A
        bounce call also checks the stack and writes a row-normalised copy (the streaming one
        its log-sum-exp pass) before its loop, which t / steps would count as products (the one
        GPU run, 2026-11, did: its per-pass times are overstated)."""
        t = [
            timed(jax.jit(functools.partial(bounce, steps=s)), *args, repeats=repeats)[0]
            for s in (2 * PASS_STEPS, PASS_STEPS)
        ]
        return max(t[0] - t[1], 1e-9) / PASS_STEPS

    t_pass = per_pass(lambda a, x, steps: ma.bounce(a, x, steps=steps, alpha=1.0), attn, x0)
    bw = stack_bytes / t_pass
    row("dense: one pass A^T x", t_pass, read_GBps=bw / 1e9, frac_of_copy=bw / copy_bw)

    t_spass = per_pass(
        lambda q, k, x, steps: bounce_qk(q, k, x, steps=steps, alpha=1.0, block=block), q, k, x0
    )
    row(
        "stream: one pass A^T x",
        t_spass,
        virtual_GBps=stack_bytes / t_spass / 1e9,
        vs_dense_pass=t_spass / t_pass,
    )

    for method in ("solve", "gmres"):
        t, pi = timed(jax.jit(lambda a, m=method: ma.tokenrank(a, method=m)), attn, repeats=repeats)
        row(f"dense: tokenrank {method}", t, equiv_passes=t / t_pass)
        if method == "solve":
            pi_ref = pi
    t, (lam_ref, info) = timed(
        jax.jit(lambda a: ma.second_eigenvalue(a, return_info=True)), attn, repeats=repeats
    )
    # off the CPU the whole batch grows one Krylov space, to its slowest member's dimension
    products = int(jnp.max(info.steps))
    bw = products * stack_bytes / t
    row(
        "dense: |lambda2| arnoldi",
        t,
        products=products,
        converged=float(jnp.mean(info.converged)),
        read_GBps=bw / 1e9,
        frac_of_copy=bw / copy_bw,
        equiv_passes=t / t_pass,
    )
    del attn

    t, pi = timed(jax.jit(lambda q, k: tokenrank_qk(q, k, block=block)), q, k, repeats=repeats)
    row(
        "stream: tokenrank_qk",
        t,
        equiv_passes=t / t_pass,
        l1_vs_dense=float(jnp.abs(pi - pi_ref).sum(-1).max()),
    )
    t, lam = timed(
        jax.jit(lambda q, k: second_eigenvalue_qk(q, k, block=block)),
        q,
        k,
        repeats=repeats,
    )
    row(
        "stream: |lambda2| arnoldi",
        t,
        equiv_passes=t / t_pass,
        max_diff_vs_dense=float(jnp.abs(lam - lam_ref).max()),
    )
    return dict(
        config=dict(
            shape=list(shape), n=n, d=d, block=block, matrices=mats, stack_bytes=stack_bytes
        ),
        rows=rows,
    )


def _markdown(res):
    out = [
        f"Device: {res['device']} ({res['backend']}), jax {res['jax']}; copy bandwidth "
        f"{res['copy_GBps']:.0f} GB/s (x + 1 on {res['copy_bytes'] / 2**30:.2f} GiB, "
        "read + write).",
        "",
        "| workload | operation | time (ms) | bandwidth / notes |",
        "|---|---|---|---|",
    ]
    for name, w in res["workloads"].items():
        c = w["config"]
        dims = "x".join(map(str, c["shape"]))
        label = f"{name}: {dims} x {c['n']}² ({c['stack_bytes'] / 1e9:.2f} GB)"
        for key, r in w["rows"].items():
            notes = []
            if "products" in r:
                notes.append(f"{r['products']} products, {100 * r['converged']:.0f} % converged")
            if "read_GBps" in r:
                notes.append(f"{r['read_GBps']:.0f} GB/s = {100 * r['frac_of_copy']:.0f}% of copy")
            if "virtual_GBps" in r:
                notes.append(
                    f"virtual {r['virtual_GBps']:.0f} GB/s, {r['vs_dense_pass']:.2f}x dense pass"
                )
            if "equiv_passes" in r:
                notes.append(f"{r['equiv_passes']:.1f} dense passes")
            if "l1_vs_dense" in r:
                notes.append(f"L1 vs dense {r['l1_vs_dense']:.1e}")
            if "max_diff_vs_dense" in r:
                notes.append(f"max diff vs dense {r['max_diff_vs_dense']:.1e}")
            out.append(f"| {label} | {key} | {r['seconds'] * 1e3:.2f} | {'; '.join(notes)} |")
            label = ""
    return "\n".join(out) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="tiny shapes (CPU check)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", choices=("vit_b", "flux"), help="run one workload")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    preset = "small" if a.small else "full"
    dev = jax.devices()[0]
    backend = jax.default_backend()
    print(
        f"device {dev.device_kind} ({backend}), jax {jax.__version__}, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}",
        flush=True,
    )
    copy_bytes = 2**26 if a.small or backend == "cpu" else 2**30
    copy_bw = copy_bandwidth(copy_bytes)
    print(
        f"copy bandwidth {copy_bw / 1e9:.1f} GB/s ({copy_bytes / 2**20:.0f} MiB x + 1)", flush=True
    )
    res = dict(
        preset=preset,
        device=dev.device_kind,
        backend=backend,
        jax=jax.__version__,
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        copy_bytes=copy_bytes,
        copy_GBps=copy_bw / 1e9,
        workloads={},
    )
    out = pathlib.Path(a.out or ROOT / "runs" / ("bench_gpu_small" if a.small else "bench_gpu"))
    out.mkdir(parents=True, exist_ok=True)
    for name, cfg in WORKLOADS[preset].items():
        if a.only and name != a.only:
            continue
        res["workloads"][name] = bench_workload(name, cfg, copy_bw, a.repeats)
        stats = getattr(dev, "memory_stats", lambda: None)()
        if stats and "peak_bytes_in_use" in stats:
            res["workloads"][name]["peak_device_bytes"] = int(stats["peak_bytes_in_use"])
        # written after each workload, so that a run cut short keeps what it measured
        (out / "results.json").write_text(json.dumps(res, indent=2))
        (out / "results.md").write_text(_markdown(res))
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return res


if __name__ == "__main__":
    main()
