"""A direct search for the K-step grid of least final error (flowkit's variant, not the paper's).

The BOSS paper's cost (flowkit.boss.cost, `local`) sums one-step errors; the grid it picks
need not give the least error at the end of sampling (an early error grows or shrinks later).
This search measures each candidate grid by what it is meant to do:

    final(p) = mean_n || Euler along t_{p_0} > ... > t_{p_K} from x^n_0  -  x^n_M ||^2,

K Euler steps (through flowkit's loop, so the problem's guidance applies) against the fine
trajectory's end point. It is a coordinate descent over the fine grid's points: from the
better of the local-cost grid and the uniform one, move one inner point at a time to the
fine point between its neighbours that lowers final(p), and sweep until no move helps (at
most `max_sweeps` sweeps): the result is then a local optimum (no single move improves it).
A sweep costs at most K * (M + 1) * N evaluations (times the branches of the guidance).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from flowkit.boss.cost import Problem, Trajectories
from flowkit.errors import InputError

__all__ = ["final_error", "search_final", "uniform_path"]


def final_error(problem: Problem, tr: Trajectories, path: Sequence[int]) -> float:
    """final(path): mean over rows of the squared distance between K Euler steps along
    tr.ts[path] from the trajectories' start and their fine end point x_M."""
    ts = tr.ts[list(path)]
    end = problem.euler(tr.xs[0], ts).xs[-1]
    return float((end.double() - tr.xs[-1].double()).flatten(1).pow(2).sum(-1).mean())


def uniform_path(m: int, steps: int) -> list[int]:
    """The fine-grid indices nearest to `steps` uniform steps over M fine steps."""
    return [int(v) for v in np.round(np.linspace(0, m, steps + 1))]


def search_final(problem: Problem, tr: Trajectories, steps: int, start: Sequence[int],
                 max_sweeps: int = 8) -> tuple[list[int], float, int]:
    """(path, final error, grids evaluated): coordinate descent on final(p) over K-step paths
    of the fine grid, from the better of `start` and the uniform path."""
    m = len(tr.ts) - 1
    if not 1 <= steps <= m:
        raise InputError(f"a final-error search over {m} fine steps takes 1 to {m} steps, got {steps}")
    seen: dict[tuple[int, ...], float] = {}

    def err(p: Sequence[int]) -> float:
        key = tuple(p)
        if key not in seen:
            seen[key] = final_error(problem, tr, key)
        return seen[key]

    uniform = uniform_path(m, steps)
    starts = [list(start)] if len(set(uniform)) < len(uniform) else [list(start), uniform]
    path = min(starts, key=err)
    best = err(path)
    for _ in range(max_sweeps):
        moved = False
        for k in range(1, steps):
            for i in range(path[k - 1] + 1, path[k + 1]):
                cand = path[:k] + [i] + path[k + 1:]
                if err(cand) < best:
                    path, best, moved = cand, err(cand), True
        if not moved:
            break
    return path, best, len(seen)
