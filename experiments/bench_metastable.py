"""Timing of ``ma.metastable_states`` against ``ma.second_eigenvalue`` on one ViT-sized stack.

One ``(1, 12, 197, 197)`` float32 stack (4 metastable, 4 near-circulant and 4 diffuse heads,
``experiments.bench_core.build_stack``). Prints the median wall time of nine eager calls
(each with its input check, as a user calls them; after a warm-up that compiles) of

- ``second_eigenvalue`` (Arnoldi + Gelfand), the reference cost;
- ``schur_subspace(k=4)`` and ``metastable_states(k=4, split="nan")`` (a fixed k);
- ``metastable_states()`` (``k=None``, whose default is ``split="nan"``; eager: one k = 10
  subspace iteration picks k and G-PCCA uses its leading k columns; a k that cuts a complex
  pair of a head counts as no gap there) and the same with ``split="raise"`` (only a k that
  cuts no pair),

with how many heads converged, and the same on a stack of 12 metastable heads (4 clusters), where
the iteration stops early. No assertion: timings depend on the machine.

    python -m experiments.bench_metastable
"""

import jax
import jax.numpy as jnp
import numpy as np

import markov_attn as ma
from experiments.bench_core import build_stack, timeit
from markov_attn import testing


def run(a) -> None:
    block = jax.block_until_ready
    cases = {
        "second_eigenvalue": lambda: block(ma.second_eigenvalue(a)),
        "schur_subspace k=4": lambda: block(ma.schur_subspace(a, k=4, split="nan")),
        "metastable_states k=4": lambda: block(ma.metastable_states(a, k=4, split="nan")),
        "metastable_states k=None": lambda: block(ma.metastable_states(a)),
        "  (split='raise')": lambda: block(ma.metastable_states(a, split="raise")),
    }
    base = None
    for name, fn in cases.items():
        try:
            t, out = timeit(fn, reps=9)
        except ValueError as e:  # split="raise": the chosen k cuts a pair of some matrix
            print(f"{name:26s} raises: {str(e)[:110]}...")
            continue
        base = base or t
        extra = ""
        if hasattr(out, "converged"):
            conv = np.asarray(out.converged)
            extra = f"  converged {int(conv.sum())}/{conv.size}"
            extra += f"  products {int(np.max(np.asarray(out.products)))}"
            if hasattr(out, "k"):
                extra += f"  k={out.k}"
        print(f"{name:26s} {t * 1e3:8.1f} ms  {t / base:5.2f}x{extra}")


def main() -> None:
    print(f"{jax.devices()[0].platform}, float32, median of 9 calls after a warm-up")
    print("mixed stack (1, 12, 197, 197): 4 metastable, 4 near-circulant, 4 diffuse heads")
    run(jnp.asarray(build_stack(197, batch=1), jnp.float32))
    print("metastable stack (1, 12, 197, 197): 4 clusters per head")
    rng = np.random.default_rng(0)
    run(jnp.asarray(testing.random_chains(rng, (1, 12), 197, kind="metastable"), jnp.float32))


if __name__ == "__main__":
    main()
