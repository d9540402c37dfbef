"""Would a restarted Krylov method (Krylov–Schur) serve |λ2| better than staged Arnoldi?

Issue #13 asks for one restarted Krylov machinery for the invariant subspace and for |λ2|.
This measures what restarting does to |λ2| on the heads of the core benchmark
(:func:`experiments.bench_core.build_stack`, first batch element: 4 metastable, 4
near-circulant and 4 diffuse heads) before anything is rebuilt on it.

The restarted method is a float64 NumPy Krylov–Schur (Stewart 2001) on zero-sum vectors, the
operator ``x -> P A x`` that ``second_eigenvalue`` uses: Arnoldi (CGS2) to dimension ``m``, an
exact real Schur form of the ``m x m`` compression by SciPy with the ``p`` Ritz values of
largest modulus moved to the front (``scipy.linalg.schur(..., sort=...)``), restart on those
``p`` Schur vectors, repeat until the residual of the dominant Ritz pair ``(θ, V y)``,
``|h_{m+1,m} y_m|``, is at most ``tol`` (1e-5, the library's default) or the cycle that
reached ``--cap`` products ended. Float64 and an exact small Schur form make it an optimistic
stand-in for a float32 JAX implementation, whose small Schur form would have to come from
matmuls (the unshifted QR iteration of ``markov_attn._metastable``). It is set against
``markov_attn.second_eigenvalue`` as it is (float32, staged unrestarted Arnoldi, the same
tolerance) on the same heads; errors are against float64 ``numpy.linalg.eigvals``.

    python -m experiments.krylov_restart                   # n = 197 and 1025, ~40 s
    python -m experiments.krylov_restart --update-readme
"""

import argparse
import sys
import time
from pathlib import Path

import jax
import numpy as np
import scipy.linalg as sl

import markov_attn as ma
from markov_attn._spectral import _zero_sum_start

from .bench_core import build_stack
from .readme import command_line, publish

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("metastable", "near-circulant", "diffuse")
CONFIGS = ((32, 12), (64, 24), (128, 48))
WRONG = 1e-4  # an estimate farther than this from |λ2| counts as wrong (the target)


def krylov_schur(a, m: int, p: int, tol: float, cap: int):
    """|λ2| of ``a`` by Krylov–Schur on zero-sum vectors: ``(estimate, products, converged)``."""
    n = a.shape[-1]
    project = lambda w: w - w.mean()
    basis = np.zeros((m + 1, n))
    h = np.zeros((m + 1, m))
    v0 = np.asarray(_zero_sum_start(n, np.float32), np.float64)
    basis[0] = v0 / np.linalg.norm(v0)
    k, products = 0, 0
    while True:
        for j in range(k, m):
            w = project(a @ basis[j])
            products += 1
            for _ in range(2):  # CGS2
                c = basis[: j + 1] @ w
                w -= basis[: j + 1].T @ c
                h[: j + 1, j] += c
            h[j + 1, j] = np.linalg.norm(w)
            basis[j + 1] = w / h[j + 1, j] if h[j + 1, j] > 0 else 0.0
        theta, y = np.linalg.eig(h[:m, :m])
        top = np.argmax(np.abs(theta))
        rho = float(np.abs(theta[top]))
        # the Ritz pair's residual ||A V y - theta V y|| = |h[m, m-1] y[m-1]| (unit y)
        res = abs(h[m, m - 1] * y[m - 1, top]) / np.linalg.norm(y[:, top])
        if res <= tol or products >= cap:
            return rho, products, bool(res <= tol)
        cut = np.sort(np.abs(theta))[::-1][p - 1] * (1 - 1e-12)
        lead = lambda x, y, cut=cut: np.hypot(x, y) >= cut  # the p largest moduli first
        t, u, kept = sl.schur(h[:m, :m], output="real", sort=lead)
        b = h[m, m - 1] * u[m - 1]
        basis[:kept] = u[:, :kept].T @ basis[:m]
        basis[kept] = basis[m]
        h[:] = 0.0
        h[:kept, :kept] = t[:kept, :kept]
        h[kept, :kept] = b[:kept]
        k = kept


def run_size(n: int, tol: float, cap: int) -> list[dict]:
    heads = build_stack(n)[0]  # (12, n, n) float64: 4 metastable, 4 near-circulant, 4 diffuse
    truth = np.sort(np.abs(np.linalg.eigvals(heads)), -1)[:, -2]
    kind = np.repeat(np.arange(3), 4)
    rows = []

    def add(method, est, products, conv, seconds):
        err = np.abs(np.asarray(est, np.float64) - truth)
        for i, name in enumerate(KINDS):
            sel = kind == i
            rows.append(
                dict(
                    n=n,
                    method=method,
                    kind=name,
                    products=[int(x) for x in np.asarray(products)[sel]],
                    max_error=float(err[sel].max()),
                    wrong=int((err[sel] > WRONG).sum()),
                    converged=int(np.asarray(conv)[sel].sum()),
                    heads=int(sel.sum()),
                    seconds=seconds,
                )
            )

    f = jax.jit(lambda x: ma.second_eigenvalue(x, tol=tol, return_info=True))
    t0 = time.perf_counter()
    lam, info = jax.block_until_ready(f(np.asarray(heads, np.float32)))
    add("staged Arnoldi (markov_attn, float32)", lam, info.steps, info.converged,
        time.perf_counter() - t0)  # fmt: skip
    for m, p in CONFIGS:
        t0 = time.perf_counter()
        out = [krylov_schur(x, m, p, tol, cap) for x in heads]
        est, products, conv = map(np.asarray, zip(*out, strict=True))
        add(f"Krylov–Schur m = {m}, keep {p} (float64)", est, products, conv,
            time.perf_counter() - t0)  # fmt: skip
        print(f"n = {n}: m = {m}, p = {p} done", flush=True)
    return rows


def table(rows: list[dict], tol: float, cap: int, command: str) -> str:
    lines = [
        "| n | method | heads | products (median, max) | max error | wrong (> 1e-4) "
        "| residual ≤ tol |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        pr = np.asarray(r["products"])
        lines.append(
            f"| {r['n']} | {r['method']} | {r['kind']} | {np.median(pr):.0f}, {pr.max()} "
            f"| {r['max_error']:.1e} | {r['wrong']} of {r['heads']} "
            f"| {r['converged']} of {r['heads']} |"
        )
    lines += [
        "",
        f"The first batch element's 12 heads of `bench_core`'s stack at each n; `tol` = {tol:g} "
        f"on the residual of the dominant Ritz value(s) for every method; a restarted run stops "
        f"after the cycle that reaches {cap} products. Errors against float64 "
        f"`numpy.linalg.eigvals`. "
        f"Command: `{command}`.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[197, 1025])
    p.add_argument("--tol", type=float, default=1e-5)
    p.add_argument(
        "--cap", type=int, default=2048, help="a head stops after the cycle that reaches it"
    )
    p.add_argument("--update-readme", nargs="?", const=ROOT / "README.md", default=None)
    args = p.parse_args(argv)
    rows = [r for n in args.sizes for r in run_size(n, args.tol, args.cap)]
    md = table(rows, args.tol, args.cap, command_line("experiments.krylov_restart", argv))
    publish(md, args.update_readme, "krylov-restart")
    return rows


if __name__ == "__main__":
    main()
