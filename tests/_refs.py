"""Float64 NumPy references for the core functions."""

import numpy as np

PAPER_A = np.array(
    [
        [0.01, 0.04, 0.02, 0.85, 0.08],
        [0.82, 0.04, 0.07, 0.01, 0.06],
        [0.80, 0.07, 0.03, 0.05, 0.05],
        [0.06, 0.06, 0.03, 0.04, 0.81],
        [0.53, 0.03, 0.03, 0.06, 0.35],
    ]
)


def stationary(a: np.ndarray, alpha: float = 0.99, v: np.ndarray | None = None) -> np.ndarray:
    """pi with (alpha A + (1 - alpha) 1 v^T)^T pi = pi, by a float64 dense solve."""
    a = np.asarray(a, np.float64)
    n = a.shape[-1]
    v = np.full(a.shape[:-1], 1.0 / n) if v is None else np.broadcast_to(v, a.shape[:-1])
    m = np.eye(n) - alpha * (np.swapaxes(a, -1, -2) - v[..., :, None])
    return np.linalg.solve(m, v[..., None])[..., 0]


def reverse(a: np.ndarray) -> np.ndarray:
    c = a / a.sum(-2, keepdims=True)
    return np.swapaxes(c, -1, -2)


def bounces(a: np.ndarray, x0: np.ndarray, steps: int, alpha: float) -> np.ndarray:
    n = a.shape[-1]
    t = alpha * a + (1 - alpha) / n
    xs = [x0]
    x = x0
    for _ in range(steps):
        x = np.einsum("...ij,...i->...j", t, x)
        x = x / x.sum(-1, keepdims=True)
        xs.append(x)
    return np.stack(xs, axis=-2)


def lambda2(a: np.ndarray) -> np.ndarray:
    return np.sort(np.abs(np.linalg.eigvals(np.asarray(a, np.float64))), axis=-1)[..., -2]
