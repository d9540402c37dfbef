"""Streaming vs dense TokenRank on CPU: time at n = 4,096 and peak memory at n = 16,384.

Command (about 4 minutes on 2 CPU cores)::

    python -m experiments.bench_stream            # full preset
    python -m experiments.bench_stream --smoke    # tiny sizes, ~30 s (CI)

What it measures, in one run:

1. ``n = 4096, d = 64, 8 heads``: the dense path ``ma.tokenrank(ma.transition(q kᵀ/√d))``
   (the default ``method="auto"``, which at this ``n`` is matrix-free GMRES on the stored
   matrix on every backend; until 2026-12-07 the table also had a "dense LU solve" row that
   was this same program, timed twice) against
   ``ma.tokenrank_qk(q, k)`` (blockwise, never storing ``A``); wall time (best of ``--repeats``
   after a compile run) and the streaming/dense ratio (target: within 4x), and their L1
   disagreement.
2. ``n = 16384, d = 64, 2 heads`` (``--large-heads``): each path runs in a fresh subprocess
   whose address space is capped at the budget (``resource.setrlimit(RLIMIT_AS, 2 GiB)``).
   Reported: success or the allocation error, the peak resident memory of the whole process
   (``VmHWM``, JAX runtime and compiler included) and XLA's compiled temp-buffer size
   (``jit(f).lower(...).compile().memory_analysis()``). Target: streaming completes under
   2 GB; dense cannot allocate (its ``n × n`` matrices alone are 2 GiB).

Synthetic data: q, k ~ N(0, 1) per entry (logit standard deviation 1 at the default scale);
the streaming cost does not depend on the data, GMRES's iteration count does a little.

CPU timings use ``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=`` (set here, printed): the
jaxlib 0.10.2 matmul+reduction fusion is otherwise 25-40x slower (docs/chains.md §8).

Writes ``runs/bench_stream/results.json`` and ``results.md`` (``--out`` to change).
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

PRESETS = {
    "full": dict(
        n=4096,
        d=64,
        heads=8,
        large_n=16384,
        large_heads=2,
        budget_gib=2.0,
        block=512,
        large_block=256,
        repeats=2,
    ),
    "smoke": dict(
        n=512,
        d=64,
        heads=2,
        large_n=2048,
        large_heads=1,
        budget_gib=2.0,
        block=128,
        large_block=128,
        repeats=1,
    ),
}


def _data(n, d, heads, seed=0):
    import jax

    q, k = jax.random.normal(jax.random.key(seed), (2, heads, n, d), dtype="float32")
    return q, k


def _functions(d, block):
    import jax
    import jax.numpy as jnp

    import markov_attn as ma
    from markov_attn import tokenrank_qk

    scale = 1.0 / d**0.5

    def logits(q, k):
        return jnp.einsum("...id,...jd->...ij", q, k, precision=jax.lax.Precision.HIGHEST) * scale

    return {
        "dense": jax.jit(lambda q, k: ma.tokenrank(ma.transition(logits(q, k)))),
        "stream": jax.jit(lambda q, k: tokenrank_qk(q, k, block=block)),
    }


def _time(f, *args, repeats):
    t0 = time.perf_counter()
    out = f(*args).block_until_ready()
    first = time.perf_counter() - t0
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(*args).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return best, first, out


def speed(cfg):
    """Part 1: dense vs streaming wall time."""
    import numpy as np

    n, d, heads = cfg["n"], cfg["d"], cfg["heads"]
    q, k = _data(n, d, heads)
    fns = _functions(d, cfg["block"])
    res = {"n": n, "d": d, "heads": heads, "block": cfg["block"]}
    outs = {}
    for name, f in fns.items():
        best, first, out = _time(f, q, k, repeats=cfg["repeats"])
        res[f"{name}_s"] = best
        res[f"{name}_first_call_s"] = first
        outs[name] = np.asarray(out)
        print(
            f"  n={n} {name:12s} {best:8.3f} s  (first call incl. compile {first:.2f} s)",
            flush=True,
        )
    res["ratio_stream_over_dense"] = res["stream_s"] / res["dense_s"]
    res["l1_stream_vs_dense"] = float(np.abs(outs["stream"] - outs["dense"]).sum(-1).max())
    return res


def _peak_rss() -> int:
    """Peak resident memory of this process: VmHWM (Linux), else ru_maxrss.

    ``ru_maxrss`` is not used on Linux because it survives ``execve``: a child started by a
    big parent would report the parent's peak.
    """
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child(kind, n, d, heads, block, budget_gib):
    """Runs one path under an address-space cap; prints a JSON line."""
    import resource

    lim = int(budget_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    out = {"kind": kind, "n": n, "heads": heads, "budget_gib": budget_gib}
    try:
        import jax

        fns = _functions(d, block)
        f = fns["stream" if kind == "stream" else "dense"]
        spec = jax.ShapeDtypeStruct((heads, n, d), "float32")
        compiled = f.lower(spec, spec).compile()
        mem = compiled.memory_analysis()
        out["compiled_temp_bytes"] = int(mem.temp_size_in_bytes)
        q, k = _data(n, d, heads)
        t0 = time.perf_counter()
        pi = compiled(q, k).block_until_ready()
        out["seconds"] = time.perf_counter() - t0
        out["ok"] = True
        out["sum_check"] = float(abs(pi.sum(-1) - 1).max())
    except Exception as e:  # the dense path is expected to fail to allocate
        out["ok"] = False
        out["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    out["peak_rss_bytes"] = _peak_rss()
    print("CHILD " + json.dumps(out), flush=True)


def _dense_compiled_temp(n, d, heads):
    """Compile-only memory analysis of the dense paths (no allocation)."""
    import jax

    spec = jax.ShapeDtypeStruct((heads, n, d), "float32")
    out = {}
    for name in ("dense",):
        f = _functions(d, 512)[name]
        out[name] = int(f.lower(spec, spec).compile().memory_analysis().temp_size_in_bytes)
    return out


def memory(cfg):
    """Part 2: the large n under a memory budget, each path in its own capped process."""
    n, d, heads = cfg["large_n"], cfg["d"], cfg["large_heads"]
    res = {
        "n": n,
        "d": d,
        "heads": heads,
        "budget_gib": cfg["budget_gib"],
        "block": cfg["large_block"],
        "nn_bytes_per_matrix": n * n * 4,
    }
    for kind in ("stream", "dense"):
        cmd = [
            sys.executable,
            __file__,
            "--child",
            kind,
            "--child-args",
            json.dumps([n, d, heads, cfg["large_block"], cfg["budget_gib"]]),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1800)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("CHILD ")]
        if lines:
            r = json.loads(lines[-1][len("CHILD ") :])
        else:  # killed outright (e.g. abort on allocation failure)
            tail = (proc.stderr or "").strip().splitlines()[-1:] or [""]
            msg = tail[0].split("what():", 1)[-1].strip()  # a C++ abort's prefix says nothing
            r = {"kind": kind, "ok": False, "error": f"exit {proc.returncode}: {msg[:300]}"}
        res[kind] = r
        status = "completed" if r.get("ok") else f"FAILED ({r.get('error', '')[:120]})"
        rss = r.get("peak_rss_bytes")
        rss_s = f", peak RSS {rss / 2**30:.2f} GiB" if rss else ""
        temp = r.get("compiled_temp_bytes")
        temp_s = f", XLA temp {temp / 2**30:.3f} GiB" if temp is not None else ""
        t_s = f" in {r['seconds']:.1f} s" if "seconds" in r else ""
        print(
            f"  n={n} {kind:6s} under {cfg['budget_gib']} GiB: {status}{t_s}{rss_s}{temp_s}",
            flush=True,
        )
    res["dense_compiled_temp_bytes"] = _dense_compiled_temp(n, d, heads)
    for name, b in res["dense_compiled_temp_bytes"].items():
        print(f"  n={n} {name} compiled temp (no allocation): {b / 2**30:.2f} GiB", flush=True)
    return res


def _markdown(r):
    s, m = r["speed"], r["memory"]
    gib = 2**30
    rows = [
        "| quantity | value |",
        "|---|---|",
        f"| XLA_FLAGS | `{r['xla_flags']}` |",
        f"| n = {s['n']}, d = {s['d']}, {s['heads']} heads: dense `tokenrank` (default "
        f'`method="auto"`: GMRES on the stored A) | {s["dense_s"]:.2f} s |',
        f"| streaming `tokenrank_qk` (block {s['block']}) | {s['stream_s']:.2f} s |",
        f"| streaming / dense | **{s['ratio_stream_over_dense']:.2f}x** (target < 4x) |",
        f"| max L1(streaming − dense) | {s['l1_stream_vs_dense']:.1e} |",
    ]
    st, de = m["stream"], m["dense"]
    head = f"n = {m['n']}, {m['heads']} heads, budget {m['budget_gib']} GiB (RLIMIT_AS)"
    rows.append(
        f"| {head}: streaming | {'completed' if st.get('ok') else 'failed'}"
        + (f" in {st['seconds']:.1f} s" if "seconds" in st else "")
        + (f", peak RSS {st['peak_rss_bytes'] / gib:.2f} GiB" if "peak_rss_bytes" in st else "")
        + (
            f", XLA temp {st['compiled_temp_bytes'] / gib:.3f} GiB"
            if "compiled_temp_bytes" in st
            else ""
        )
        + " |"
    )
    dense_status = "completed" if de.get("ok") else "cannot allocate: " + de.get("error", "")[:80]
    rows.append(f"| {head}: dense | {dense_status} |")
    for b in m["dense_compiled_temp_bytes"].values():
        rows.append(f"| dense compiled temp at n = {m['n']} | {b / gib:.2f} GiB |")
    return "\n".join(rows) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes for CI")
    p.add_argument("--n", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--large-n", type=int)
    p.add_argument("--large-heads", type=int)
    p.add_argument("--budget-gib", type=float)
    p.add_argument("--repeats", type=int)
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_stream"))
    p.add_argument("--child", choices=("stream", "dense"), help=argparse.SUPPRESS)
    p.add_argument("--child-args", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        _child(a.child, *json.loads(a.child_args))
        return None
    cfg = dict(PRESETS["smoke" if a.smoke else "full"])
    for key in ("n", "heads", "large_n", "large_heads", "budget_gib", "repeats"):
        if getattr(a, key) is not None:
            cfg[key] = getattr(a, key)

    import jax

    print(f"XLA_FLAGS={os.environ['XLA_FLAGS']}  (CPU matmul+reduce fusion off; docs/chains.md §8)")
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {os.cpu_count()} CPUs")
    print(f"1) time at n={cfg['n']}, d={cfg['d']}, {cfg['heads']} heads", flush=True)
    sp = speed(cfg)
    print(
        f"  streaming / dense = {sp['ratio_stream_over_dense']:.2f}x, "
        f"L1 diff {sp['l1_stream_vs_dense']:.1e}",
        flush=True,
    )
    print(
        f"2) memory at n={cfg['large_n']}, {cfg['large_heads']} heads, "
        f"budget {cfg['budget_gib']} GiB",
        flush=True,
    )
    mem = memory(cfg)
    result = {
        "preset": "smoke" if a.smoke else "full",
        "config": cfg,
        "xla_flags": os.environ["XLA_FLAGS"],
        "jax": jax.__version__,
        "cpus": os.cpu_count(),
        "speed": sp,
        "memory": mem,
    }
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "results.md").write_text(_markdown(result))
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return result


if __name__ == "__main__":
    main()
