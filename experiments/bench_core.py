"""Benchmark of the core chain functions against the reference code's algorithms.

Builds realistic attention stacks (batch 8, 12 heads: 4 metastable, 4 near-circulant and
4 diffuse heads) at n = 197 and n = 1025 and prints, in one run, time and accuracy against
float64 references for

- ours: ``ma.tokenrank`` (``method="solve"``, on CPU a float64 NumPy solve through a host
  callback, and ``method="gmres"``, the CPU default: GMRES with iterative refinement) and
  ``ma.second_eigenvalue`` (Arnoldi + Gelfand, no eigendecomposition);
- the reference code's algorithms (PyTorch when importable, else NumPy):
  ``matrix_power(A, 20).mean(-2)``, the 200-step teleported power method (stop when the L1
  change is below 1e-5), and ``eigvals(A).abs()`` top-2.

Speed-ups are ratios of times measured in this run on this machine. Float64 references:
``numpy.linalg.solve`` for TokenRank (all heads), ``numpy.linalg.eigvals`` for |λ2| on the
first batch element's 12 heads at n = 1025 (all heads at n = 197). ``eigvals`` on all 96
matrices at n = 1025 is timed on the first 12 and scaled by 8 (stated in the output). Every
time, ours and the reference's, is the median of ``--reps`` calls after one warm-up call
(``eigvals`` was timed by one cold call before 2026-12-07, which left its side of the |λ2|
ratio to the noise of a single run).

    python -m experiments.bench_core                # full run (~10 min on 2 cores)
    python -m experiments.bench_core --sizes 197     # quick
    python -m experiments.bench_core --update-readme # copy the table into README.md

On CPU the flag XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= matters (jaxlib 0.10.2
otherwise fuses matmul chains with reductions into a slow kernel); the ``experiments`` package
adds it when imported first, as ``python -m experiments.bench_core`` does.
"""

import argparse
import json
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import markov_attn as ma
from markov_attn import testing

from .readme import replace_block

ROOT = Path(__file__).resolve().parents[1]
ALPHA = 0.99
LAMBDA2 = "second_eigenvalue (staged Arnoldi, ≤ 256)"


def build_stack(n: int, batch: int = 8, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng([seed, n])
    parts = [
        testing.random_chains(rng, (batch, 4), n, kind="metastable", strength=6.0),
        testing.random_chains(rng, (batch, 4), n, kind="circulant", strength=6.0),
        testing.random_chains(rng, (batch, 4), n, kind="diffuse"),
    ]
    return np.concatenate(parts, axis=1)  # (batch, 12, n, n) float64


def timeit(fn, *, reps: int = 3, warmup: int = 1) -> tuple[float, object]:
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times)), out


def _block(x):
    return jax.block_until_ready(x)


# ---------------------------------------------------------------------------- reference code


def reference_algorithms():
    """The reference code's algorithms, in PyTorch when it is installed, else NumPy."""
    try:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)

        def power20(a):
            return torch.matrix_power(a, 20).mean(-2)

        def power200(a):
            n = a.shape[-1]
            t = ALPHA * a + (1 - ALPHA) / n
            x = torch.full((*a.shape[:-2], 1, n), 1.0 / n, dtype=a.dtype)
            steps = 0
            for _ in range(200):
                y = x @ t
                y = y / y.sum(-1, keepdim=True)
                steps += 1
                done = (y - x).abs().sum(-1).max().item() < 1e-5
                x = y
                if done:
                    break
            return x[..., 0, :], steps

        def eig_top2(a):
            return torch.linalg.eigvals(a).abs().topk(2, dim=-1).values[..., 1]

        convert = lambda x: torch.from_numpy(np.ascontiguousarray(x, np.float32))
        back = lambda x: x.numpy()
        return "torch " + torch.__version__, convert, back, power20, power200, eig_top2
    except ImportError:

        def power20(a):
            return np.linalg.matrix_power(a, 20).mean(-2)

        def power200(a):
            n = a.shape[-1]
            t = ALPHA * a + (1 - ALPHA) / n
            x = np.full((*a.shape[:-2], 1, n), 1.0 / n, a.dtype)
            steps = 0
            for _ in range(200):
                y = x @ t
                y = y / y.sum(-1, keepdims=True)
                steps += 1
                done = np.abs(y - x).sum(-1).max() < 1e-5
                x = y
                if done:
                    break
            return x[..., 0, :], steps

        def eig_top2(a):
            return np.sort(np.abs(np.linalg.eigvals(a)), -1)[..., -2]

        convert = lambda x: np.ascontiguousarray(x, np.float32)
        return "numpy " + np.__version__, convert, np.asarray, power20, power200, eig_top2


# ---------------------------------------------------------------------------- one size


def run_size(n: int, reps: int) -> dict:
    a64 = build_stack(n)
    a32 = jnp.asarray(a64, jnp.float32)
    heads = a64.shape[0] * a64.shape[1]
    print(
        f"\n== n = {n}: stack {a64.shape} ({heads} matrices, float32 {a32.nbytes / 2**20:.0f} MiB)"
    )

    t = time.perf_counter()
    m = np.eye(n) - ALPHA * np.swapaxes(a64, -1, -2)
    pi_ref = np.linalg.solve(m, np.full((*a64.shape[:-1], 1), (1 - ALPHA) / n))[..., 0]
    del m
    eig_sub = a64[0] if n > 256 else a64.reshape(-1, n, n)
    lam_ref = np.sort(np.abs(np.linalg.eigvals(eig_sub)), -1)[..., -2]
    print(f"float64 references in {time.perf_counter() - t:.1f} s")
    lam_ref_full_shape = eig_sub.shape[:-2]

    def l1(p):
        return float(np.abs(np.asarray(p, np.float64) - pi_ref).sum(-1).max())

    def lam_err(lam):
        lam = np.asarray(lam, np.float64).reshape(-1)[: int(np.prod(lam_ref_full_shape))]
        return float(np.abs(lam - lam_ref.reshape(-1)).max())

    rows = []

    def add(name, impl, seconds, err_kind, err, note=""):
        rows.append(
            dict(name=name, impl=impl, seconds=seconds, error_kind=err_kind, error=err, note=note)
        )
        print(f"{name:<38} {impl:<8} {seconds * 1e3:10.1f} ms   {err_kind} {err:.2e} {note}")

    for method in ("solve", "gmres"):
        f = jax.jit(lambda x, method=method: ma.tokenrank(x, alpha=ALPHA, method=method))
        sec, p = timeit(lambda f=f: _block(f(a32)), reps=reps)
        add(f"tokenrank(method={method!r})", "ours", sec, "L1", l1(p))
    f = jax.jit(lambda x: ma.second_eigenvalue(x, return_info=True))
    sec, (lam, info) = timeit(lambda: _block(f(a32)), reps=reps)
    steps, conv = np.asarray(info.steps), np.asarray(info.converged)
    add(
        LAMBDA2,
        "ours",
        sec,
        "max abs",
        lam_err(lam),
        f"(Krylov dimension {steps.min()}–{steps.max()}, mean {steps.mean():.0f}; "
        f"residual ≤ tol on {conv.sum()} of {conv.size}, largest "
        f"{float(np.asarray(info.residual).max()):.1e})",
    )

    impl, convert, back, power20, power200, eig_top2 = reference_algorithms()
    at = convert(a64)
    sec, p = timeit(lambda: power20(at), reps=reps)
    add("matrix_power(A, 20).mean(-2)", impl.split()[0], sec, "L1", l1(back(p)))
    sec, (p, steps) = timeit(lambda: power200(at), reps=reps)
    add(
        "power method, 200 steps, alpha 0.99",
        impl.split()[0],
        sec,
        "L1",
        l1(back(p)),
        f"({steps} steps)",
    )
    if n > 256:
        sub = at[0]
        sec, lam = timeit(lambda: eig_top2(sub), reps=reps)
        scale = heads / sub.shape[0]
        add(
            "eigvals(A).abs() top-2",
            impl.split()[0],
            sec * scale,
            "max|err|",
            lam_err(back(lam)),
            f"(timed on {sub.shape[0]} matrices, x{scale:.0f})",
        )
    else:
        sec, lam = timeit(lambda: eig_top2(at), reps=reps)
        add("eigvals(A).abs() top-2", impl.split()[0], sec, "max abs", lam_err(back(lam)))

    by = {r["name"]: r for r in rows}
    power = by["power method, 200 steps, alpha 0.99"]["seconds"]
    eig = by["eigvals(A).abs() top-2"]["seconds"]
    speed = {
        "tokenrank_solve_vs_power200": power / by["tokenrank(method='solve')"]["seconds"],
        "tokenrank_gmres_vs_power200": power / by["tokenrank(method='gmres')"]["seconds"],
        "lambda2_vs_eigvals": eig / by[LAMBDA2]["seconds"],
    }
    for k, v in speed.items():
        print(f"speed-up {k}: {v:.1f}x")
    return dict(n=n, shape=list(a64.shape), reference_impl=impl, rows=rows, speedups=speed)


def table(results: dict) -> str:
    lines = [
        f"Measured by `python -m experiments.bench_core` on {results['machine']} "
        f"({results['cpus']} CPUs, jax {results['jax']}, reference algorithms in "
        f"{results['sizes'][0]['reference_impl']}); batch 8 × 12 heads (4 metastable, "
        "4 near-circulant, 4 diffuse), float32, α = 0.99. TokenRank error: max L1 against a "
        "float64 solve; |λ2| error: max abs against float64 `numpy.linalg.eigvals`"
        " (at n = 1025 on the first 12 heads; the eigvals time there is 12 matrices × 8). "
        f"Times: median of {results.get('reps', 3)} calls after a warm-up"
        + (" (eigvals: one cold call)." if "reps" not in results else ", both sides."),
        "",
        "| n | algorithm | impl | time (ms) | error |",
        "|---|---|---|---|---|",
    ]
    for s in results["sizes"]:
        for r in s["rows"]:
            kind = r["error_kind"].replace("max|err|", "max abs")  # runs before the rename
            lines.append(
                f"| {s['n']} | {r['name']} {r['note']} | {r['impl']} | {r['seconds'] * 1e3:.0f} |"
                f" {kind} {r['error']:.1e} |"
            )
    lines += [
        "",
        "| n | TokenRank (solve) vs 200-step power | TokenRank (gmres) vs 200-step power"
        " | \\|λ2\\| (Arnoldi) vs eigvals |",
        "|---|---|---|---|",
    ]
    for s in results["sizes"]:
        sp = s["speedups"]
        lines.append(
            f"| {s['n']} | {sp['tokenrank_solve_vs_power200']:.1f}× |"
            f" {sp['tokenrank_gmres_vs_power200']:.1f}× | {sp['lambda2_vs_eigvals']:.1f}× |"
        )
    return "\n".join(lines) + "\n"


def update_readme(md: str) -> None:
    replace_block(ROOT / "README.md", "bench", md)
    print(f"updated {ROOT / 'README.md'}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[197, 1025])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_core")
    p.add_argument(
        "--update-readme",
        action="store_true",
        help="only rebuild the table of the last run (out/results.json) into README.md",
    )
    args = p.parse_args(argv)
    if args.update_readme:
        md = table(json.loads((args.out / "results.json").read_text()))
        (args.out / "results.md").write_text(md)
        update_readme(md)
        return {}
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}  devices={jax.devices()}")
    results = dict(
        machine=platform.processor() or platform.machine(),
        cpus=os.cpu_count(),
        jax=jax.__version__,
        backend=jax.default_backend(),
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        reps=args.reps,
        sizes=[run_size(n, args.reps) for n in args.sizes],
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "results.md").write_text(table(results))
    print(f"\nwrote {args.out / 'results.json'} and results.md")
    return results


if __name__ == "__main__":
    main()
