"""The Bellman dynamic program of BOSS (Nguyen et al., "Bellman Optimal Step-size
Straightening of Flow-Matching Models", Sec. 3.2, Algorithm 1).

Given a cost matrix c [M+1, M+1] over the points 0..M of a fine grid (c[i, j]: the cost of
one step from point i to point j > i), the best K-step path 0 = i_0 < i_1 < ... < i_K = M
minimises sum_k c[i_{k-1}, i_k]. With D[k, j] the cheapest k-step path from 0 to j,

    D[0, 0] = 0,   D[k, j] = min_{i < j} D[k-1, i] + c[i, j]      (the Bellman recursion)

which is exact for any real costs (the paths form a DAG), in O(K M^2). An entry of +inf
above the diagonal (a step that cannot be taken; a table stores it as JSON null) is allowed;
when no K-step path avoids them, K steps are infeasible and `best_path` says so instead of
returning an infinite cost.
"""

from __future__ import annotations

import numpy as np

from flowkit.errors import InputError

__all__ = ["best_path", "path_cost"]


def _check(cost: np.ndarray) -> np.ndarray:
    c = np.asarray(cost, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1] or c.shape[0] < 2:
        raise InputError(f"a BOSS cost matrix is square [M+1, M+1] with M >= 1, got shape {c.shape}")
    upper = np.triu(np.ones_like(c, dtype=bool), k=1)
    if np.isnan(c[upper]).any():
        raise InputError("the BOSS cost matrix has NaN entries above its diagonal: recompute it")
    if np.isneginf(c[upper]).any():
        raise InputError("the BOSS cost matrix has -inf entries above its diagonal: recompute it")
    return c


def _feasible_counts(best: np.ndarray) -> str:
    """The step counts k with a finite k-step path to the last point, as ranges ("1-3, 6")."""
    ks = [k for k in range(1, best.shape[0]) if np.isfinite(best[k, -1])]
    runs: list[list[int]] = []
    for k in ks:
        if runs and k == runs[-1][-1] + 1:
            runs[-1].append(k)
        else:
            runs.append([k])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in runs) or "none"


def _bellman(edge: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """D[k, j] [steps+1, n] and the argmin back-pointers of the Bellman recursion."""
    n = edge.shape[0]
    best = np.full((steps + 1, n), np.inf)  # D[k, j]
    best[0, 0] = 0.0
    back = np.zeros((steps + 1, n), dtype=np.int64)
    for k in range(1, steps + 1):
        total = best[k - 1][:, None] + edge  # [i, j]: k-1 steps to i, then one to j
        back[k] = np.argmin(total, axis=0)
        best[k] = total[back[k], np.arange(n)]
    return best, back


def best_path(cost: np.ndarray, steps: int) -> tuple[list[int], float]:
    """The exact cheapest `steps`-step path from point 0 to point M, and its total cost.

    cost: [M+1, M+1]; only entries above the diagonal (j > i) are used. Ties go to the
    smallest previous point, so the answer is deterministic.
    """
    c = _check(cost)
    m = c.shape[0] - 1
    if not isinstance(steps, (int, np.integer)) or not 1 <= steps <= m:
        raise InputError(f"BOSS can choose 1 to {m} steps from a fine grid of {m} steps, got {steps!r}: "
                         f"ask for fewer steps or tune with a larger k_max")
    n = m + 1
    edge = np.where(np.triu(np.ones((n, n), dtype=bool), k=1), c, np.inf)  # [i, j], inf where j <= i
    best, back = _bellman(edge, steps)
    if not np.isfinite(best[steps, m]):
        every, _ = _bellman(edge, m)
        raise InputError(f"BOSS cannot choose {steps} steps: every {steps}-step path through the fine grid of {m} "
                         f"steps takes a step of infinite (or missing: null in a table) cost; step counts with a "
                         f"finite path: {_feasible_counts(every)}. Ask for a feasible count, or re-tune the costs")
    path = [m]
    for k in range(steps, 0, -1):
        path.append(int(back[k, path[-1]]))
    path.reverse()
    return path, float(best[steps, m])


def path_cost(cost: np.ndarray, path: list[int]) -> float:
    """sum_k c[path[k-1], path[k]] of a path through the fine grid."""
    c = np.asarray(cost, dtype=np.float64)
    return float(sum(c[a, b] for a, b in zip(path, path[1:])))
