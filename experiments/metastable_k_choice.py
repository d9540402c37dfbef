"""How often ``metastable_states(k=None)`` picks another ``k`` than float64 eigenvalues would,
and whether :class:`markov_attn.UnresolvedGapWarning` flags it.

Random chains of several kinds (``markov_attn.testing.random_chains``, seed 0): the float64
choice applies the same rule (:func:`markov_attn._metastable.choose_k`, ``split="nan"``'s
cut handling) to ``numpy.linalg.eigvals``. Prints a count per (match, warned) and one line per
silent mismatch. Command: ``python -m experiments.metastable_k_choice`` (about 20 s on the
2-core CPU).
"""

import argparse
import warnings

import numpy as np

import markov_attn as ma
from markov_attn import testing
from markov_attn._metastable import choose_k

KINDS = ("attention", "diffuse", "metastable", "circulant", "dirichlet", "causal")


def float64_choice(a: np.ndarray, k_range: tuple[int, int]) -> int:
    m = k_range[1] + 3
    ev = np.linalg.eigvals(a.astype(np.float64))
    ev = ev[np.argsort(-np.abs(ev), kind="stable")][:m]
    pair = (np.abs(ev[:-1] - np.conj(ev[1:])) < 1e-6) & (np.abs(ev[:-1].imag) > 1e-9)
    starts = pair & ~np.concatenate([[False], pair[:-1]])
    cuts = np.concatenate([starts, [False]])
    return choose_k(ev[None], k_range, cuts=cuts[None], skip_cuts=False)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[24, 48])
    ap.add_argument("--reps", type=int, default=4)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    counts: dict[str, int] = {}
    warned_kinds: dict[str, int] = {}
    for kind in KINDS:
        for n in args.sizes:
            for rep in range(args.reps):
                a = testing.random_chains(rng, (), n, kind=kind).astype(np.float32)
                want = float64_choice(a, (2, 10))
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", ma.UnresolvedGapWarning)
                    ms = ma.metastable_states(a)
                warned = any(issubclass(w.category, ma.UnresolvedGapWarning) for w in caught)
                key = (
                    f"{'match' if ms.k == want else 'mismatch'}, {'warned' if warned else 'silent'}"
                )
                counts[key] = counts.get(key, 0) + 1
                warned_kinds[kind] = warned_kinds.get(kind, 0) + int(warned)
                if ms.k != want and not warned:
                    print(f"silent mismatch: {kind} n={n} rep={rep}: k={ms.k}, float64 {want}")
    for key in sorted(counts):
        print(f"{key}: {counts[key]}")
    reps = len(args.sizes) * args.reps
    print("warned, by kind:", ", ".join(f"{k} {warned_kinds[k]} of {reps}" for k in KINDS))
    return counts


if __name__ == "__main__":
    main()
