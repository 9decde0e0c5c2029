"""Bootstrap confidence intervals for paired per-sample results.

The bench compares a treatment arm `a` with a baseline arm `b` evaluated on the same
samples (same seeds, same prompts), so sample i of `a` and sample i of `b` form a pair.
The percentile bootstrap resamples pairs jointly (one index draw per resample, applied to
both arms), which keeps the correlation between arms that makes paired designs sharp.

All functions are deterministic given `seed` and use numpy only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Literal, Sequence

import numpy as np

from flowkit.errors import InputError

__all__ = ["Interval", "Stat", "STATS", "paired_bootstrap", "paired_bootstrap_set", "bootstrap_mean", "as_percent",
           "proportion"]

Stat = Literal["mean_diff", "ratio_of_means"]
STATS: tuple[str, ...] = ("mean_diff", "ratio_of_means")

# resamples drawn per block, so memory stays at about _BLOCK * n indices
_BLOCK = 512


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap interval.

    `stat` is what was estimated: "mean_diff" (mean(a) - mean(b)), "ratio_of_means"
    (mean(a) / mean(b)) or "mean" (one arm). `ci` is the nominal coverage.
    """

    estimate: float
    low: float
    high: float
    n: int
    stat: str = "mean_diff"
    ci: float = 0.95

    def contains(self, value: float) -> bool:
        """True when `low <= value <= high`."""
        return self.low <= value <= self.high

    @property
    def width(self) -> float:
        return self.high - self.low

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _as_array(x: Sequence[float] | np.ndarray, what: str) -> np.ndarray:
    """`x` as a 1-D float64 array; refuses empty, multi-dimensional and non-finite input."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise InputError(f"{what} must be one value per sample (1-D), got shape {arr.shape}")
    if arr.size == 0:
        raise InputError(f"{what} is empty; the bench needs at least one sample")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise InputError(
            f"{what} has {bad.size} non-finite value(s), the first at sample {int(bad[0])} "
            f"({arr[bad[0]]!r}); fix or drop those samples in both arms before comparing"
        )
    return arr


def _check_options(n_boot: int, ci: float) -> None:
    if not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise InputError(f"n_boot must be a positive integer, got {n_boot!r}")
    if not 0.0 < ci < 1.0:
        raise InputError(f"ci must lie strictly between 0 and 1 (e.g. 0.95), got {ci!r}")


def _resampled_means(arrays: Sequence[np.ndarray], n_boot: int, seed: int) -> list[np.ndarray]:
    """Means of each array over `n_boot` joint resamples of the sample indices: [n_boot] each."""
    n = arrays[0].size
    rng = np.random.default_rng(seed)
    out = [np.empty(n_boot) for _ in arrays]
    for start in range(0, n_boot, _BLOCK):
        stop = min(start + _BLOCK, n_boot)
        idx = rng.integers(0, n, size=(stop - start, n))  # [block, n], shared by all arrays
        for arr, means in zip(arrays, out):
            means[start:stop] = arr[idx].mean(axis=1)
    return out


def _percentiles(boot: np.ndarray, ci: float) -> tuple[float, float]:
    alpha = 1.0 - ci
    low, high = np.quantile(boot, [alpha / 2, 1.0 - alpha / 2])
    return float(low), float(high)


def paired_bootstrap(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    stat: Stat = "mean_diff",
    n_boot: int = 2000,
    seed: int = 0,
    ci: float = 0.95,
) -> Interval:
    """Percentile-bootstrap interval of a paired statistic of treatment `a` vs baseline `b`.

    a, b: [n] per-sample values, sample i of `a` paired with sample i of `b`.
    stat: "mean_diff" estimates mean(a) - mean(b); "ratio_of_means" estimates
        mean(a) / mean(b) (e.g. a wall-time ratio), which needs a baseline mean away from 0.
    With n = 1 the interval is degenerate (low = high = estimate). Non-finite values raise
    `InputError` naming the first bad sample.
    """
    if stat not in STATS:
        raise InputError(f"unknown stat {stat!r}; use one of {', '.join(STATS)}")
    _check_options(n_boot, ci)
    a_ = _as_array(a, "treatment")
    b_ = _as_array(b, "baseline")
    if a_.size != b_.size:
        raise InputError(
            f"paired arms differ in length (treatment {a_.size}, baseline {b_.size}); "
            "evaluate both arms on the same samples"
        )
    n = a_.size
    if stat == "mean_diff":
        estimate = float(a_.mean() - b_.mean())
        if n == 1:
            return Interval(estimate, estimate, estimate, n, stat, ci)
        (diff_means,) = _resampled_means([a_ - b_], n_boot, seed)
        low, high = _percentiles(diff_means, ci)
        return Interval(estimate, low, high, n, stat, ci)

    if b_.mean() == 0.0:
        raise InputError("ratio_of_means needs a baseline with a nonzero mean; use stat='mean_diff'")
    estimate = float(a_.mean() / b_.mean())
    if n == 1:
        return Interval(estimate, estimate, estimate, n, stat, ci)
    a_means, b_means = _resampled_means([a_, b_], n_boot, seed)
    if np.any(b_means == 0.0):
        raise InputError(
            "ratio_of_means: some bootstrap resamples of the baseline have mean 0; "
            "the ratio is undefined there, use stat='mean_diff'"
        )
    low, high = _percentiles(a_means / b_means, ci)
    return Interval(estimate, low, high, n, stat, ci)


def paired_bootstrap_set(
    statistic: Callable[[np.ndarray], tuple[float, float]],
    n: int,
    *,
    stat: Stat = "mean_diff",
    n_boot: int = 500,
    seed: int = 0,
    ci: float = 0.95,
) -> Interval:
    """Percentile-bootstrap interval of a paired set-level statistic (a Frechet distance,
    a KID: anything that is not a mean of per-sample values).

    statistic: maps an index array [m] into the n paired samples to (treatment value,
        baseline value) computed on those samples (with repeats); it is called once on
        all samples for the estimate and once per resample, with the same indices for
        both arms, so the pairing is kept.
    stat: "mean_diff" estimates t - b, "ratio_of_means" estimates t / b.
    """
    if stat not in STATS:
        raise InputError(f"unknown stat {stat!r}; use one of {', '.join(STATS)}")
    _check_options(n_boot, ci)
    if not isinstance(n, (int, np.integer)) or n < 2:
        raise InputError(f"a set statistic needs n >= 2 paired samples, got {n!r}")

    def combine(pair: tuple[float, float]) -> float:
        t, b = (float(v) for v in pair)
        if not (np.isfinite(t) and np.isfinite(b)):
            raise InputError(f"the set statistic returned a non-finite value ({t}, {b})")
        if stat == "mean_diff":
            return t - b
        if b == 0.0:
            raise InputError("ratio_of_means needs a baseline statistic away from 0; use stat='mean_diff'")
        return t / b

    estimate = combine(statistic(np.arange(n)))
    rng = np.random.default_rng(seed)
    boot = np.array([combine(statistic(rng.integers(0, n, size=n))) for _ in range(n_boot)])
    low, high = _percentiles(boot, ci)
    return Interval(estimate, low, high, int(n), stat, ci)


def bootstrap_mean(
    a: Sequence[float] | np.ndarray, *, n_boot: int = 2000, seed: int = 0, ci: float = 0.95
) -> Interval:
    """Percentile-bootstrap interval of the mean of one arm. a: [n] per-sample values."""
    _check_options(n_boot, ci)
    a_ = _as_array(a, "values")
    estimate = float(a_.mean())
    if a_.size == 1:
        return Interval(estimate, estimate, estimate, 1, "mean", ci)
    (means,) = _resampled_means([a_], n_boot, seed)
    low, high = _percentiles(means, ci)
    return Interval(estimate, low, high, a_.size, "mean", ci)


def as_percent(flags: Sequence[bool] | np.ndarray) -> np.ndarray:
    """Per-sample booleans as 0.0 / 100.0, so their mean is a percentage. flags: [n]."""
    arr = np.asarray(flags)
    if arr.dtype != np.bool_:
        if arr.size and not np.all(np.isin(arr, (0, 1))):
            raise InputError("as_percent expects booleans (or 0/1) per sample")
        arr = arr.astype(bool)
    return arr.astype(np.float64) * 100.0


def proportion(
    flags: Sequence[bool] | np.ndarray, *, n_boot: int = 2000, seed: int = 0, ci: float = 0.95
) -> Interval:
    """Percentage of True flags with its bootstrap interval, in percent (0-100). flags: [n].

    For a paired comparison of two rates, pass `as_percent(a)` and `as_percent(b)` to
    `paired_bootstrap`: the difference is then in percentage points.
    """
    return bootstrap_mean(as_percent(flags), n_boot=n_boot, seed=seed, ci=ci)
