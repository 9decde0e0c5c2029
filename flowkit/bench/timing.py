"""Paired wall-time measurement: two runs timed now, in alternating order, after a warm-up.

Per-sample seconds stored with cached arms were measured at different times, under whatever
else the machine was doing then, so their ratio is not a speed result. A speed row times
both arms in this run instead: one warm-up call of each, then `repeats` rounds in which the
order alternates (a, b then b, a), so a slow drift of the machine's load falls on both.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

__all__ = ["alternating_seconds"]


def alternating_seconds(run_a: Callable[[int], float], run_b: Callable[[int], float],
                        repeats: int) -> tuple[np.ndarray, np.ndarray]:
    """Seconds of `run_a(r)` and `run_b(r)` over rounds r = 0..repeats-1 (each call returns the
    seconds it measured), after one untimed warm-up call of each; round r runs a first when r
    is even, b first when it is odd. Returns ([repeats] seconds of a, [repeats] seconds of b)."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    run_a(0)
    run_b(0)
    a, b = [], []
    for r in range(repeats):
        order = ((run_a, a), (run_b, b)) if r % 2 == 0 else ((run_b, b), (run_a, a))
        for run, out in order:
            out.append(float(run(r)))
    return np.asarray(a), np.asarray(b)
