"""Timing several jitted computations against each other on a machine whose load changes: the
calls are interleaved round by round, so that a change in load hits all of them alike, and each
ratio is taken within a round (``sample_dit.time_sampling``, ``compare_heads``'s overhead)."""

import time
from collections.abc import Callable, Mapping

import jax
import numpy as np


def interleaved(
    calls: Mapping[str, Callable[[], object]], /, *, rounds: int, baseline: str | None = None
) -> dict:
    """Times each zero-argument call once per round for ``rounds`` rounds, in the mapping's
    order, after one untimed (compiling) call each; every call's result is blocked on.

    Returns:
      ``{"ms": {name: median ms per call over rounds}}``, and with ``baseline`` (a name in
      ``calls``) also ``"ratio"`` and ``"ratio_range"``: per other name the median over rounds
      of its time divided by the baseline's in the same round, and the ``[min, max]`` of those
      per-round ratios.
    """
    for call in calls.values():
        jax.block_until_ready(call())
    per_round = []
    for _ in range(rounds):
        ms = {}
        for name, call in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(call())
            ms[name] = 1e3 * (time.perf_counter() - t0)
        per_round.append(ms)
    out = {"ms": {k: float(np.median([r[k] for r in per_round])) for k in calls}}
    if baseline is not None:
        ratios = {k: [r[k] / r[baseline] for r in per_round] for k in calls if k != baseline}
        out["ratio"] = {k: float(np.median(v)) for k, v in ratios.items()}
        out["ratio_range"] = {k: [float(min(v)), float(max(v))] for k, v in ratios.items()}
    return out
