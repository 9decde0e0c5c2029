"""Claims a paper makes about a treatment vs its baseline, and their verdict on an interval.

A `Claim` says what should hold for the paired statistic (treatment minus baseline, or
their ratio) or for a single arm's mean. `verdict` reads it against a bootstrap
`Interval`: "met" when the whole interval agrees with the claim, "missed" when the whole
interval contradicts it, "inconclusive" when the interval straddles the boundary, and
"uninformative" when both arms of a paired comparison sit at the same floor or ceiling on
every sample (a rate at 0% or 100% in both arms, `rate_bound`): nothing could move, so the
interval [0, 0] would "meet" a no-worse claim and "miss" a higher one while saying nothing.

Kinds (for a difference the reference is 0, for a ratio of means it is 1):

- `lower` / `higher`: an improvement of at least `margin` (>= 0). `lower` is met if
  high < ref - margin and missed if low >= ref - margin; `higher` mirrors it.
- `no_worse`: non-inferiority with margin delta; `better` says which direction is good.
  For better="higher": met if low > ref - delta, missed if high < ref - delta; for
  better="lower": met if high < ref + delta, missed if low > ref + delta.
- `equivalent`: met if [low, high] lies inside [ref - delta, ref + delta], missed if it lies
  entirely outside, inconclusive otherwise.
- `at_most` / `at_least`: an absolute `target` for the estimate itself (a wall-time ratio
  <= 1.03, a single arm's accuracy >= 90): `at_most` is met if high <= target and missed
  if low > target; `at_least` mirrors it.

With `relative=True` a difference margin is a fraction of the baseline mean (margin=0.05:
"within 5% of the baseline"). A ratio is already relative, so its margins are fractions as
they stand and `relative` is refused there.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from flowkit.bench.stats import STATS, Interval
from flowkit.errors import InputError

__all__ = ["Claim", "ClaimKind", "Verdict", "KINDS", "VERDICTS", "verdict", "rate_bound"]

ClaimKind = Literal["lower", "higher", "no_worse", "equivalent", "at_most", "at_least"]
Verdict = Literal["met", "missed", "inconclusive", "uninformative"]
KINDS: tuple[str, ...] = ("lower", "higher", "no_worse", "equivalent", "at_most", "at_least")
VERDICTS: tuple[str, ...] = ("met", "missed", "inconclusive", "uninformative")
_TARGET_KINDS = ("at_most", "at_least")


@dataclass(frozen=True)
class Claim:
    """What the paper claims about a metric. See the module docstring for each kind.

    kind: one of KINDS.
    margin: improvement size (lower/higher) or tolerance delta (no_worse/equivalent), >= 0.
    relative: margin is a fraction of the baseline mean (difference statistics only).
    better: "higher" or "lower", which direction of the metric is good (needed by no_worse).
    target: the bound for at_most / at_least.
    stat: the paired statistic `BenchRun.compare` estimates, "mean_diff" or "ratio_of_means".
    text: the claim in words for the table; generated from the rest when empty.
    """

    kind: ClaimKind
    margin: float = 0.0
    relative: bool = False
    better: Literal["higher", "lower"] | None = None
    target: float | None = None
    stat: str = "mean_diff"
    text: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InputError(f"unknown claim kind {self.kind!r}; use one of {', '.join(KINDS)}")
        if self.stat not in STATS:
            raise InputError(f"unknown claim stat {self.stat!r}; use one of {', '.join(STATS)}")
        if not (math.isfinite(self.margin) and self.margin >= 0):
            raise InputError(f"claim margin must be a finite number >= 0, got {self.margin!r}")
        if self.better not in (None, "higher", "lower"):
            raise InputError(f"claim better must be 'higher' or 'lower', got {self.better!r}")
        if self.kind == "no_worse" and self.better is None:
            raise InputError("a no_worse claim needs better='higher' or better='lower' (which way is good)")
        if self.kind in _TARGET_KINDS:
            if self.target is None or not math.isfinite(self.target):
                raise InputError(f"an {self.kind} claim needs a finite target, e.g. Claim({self.kind!r}, target=1.03)")
            if self.margin or self.relative:
                raise InputError(f"an {self.kind} claim takes a target, not a margin or relative=True")
        elif self.target is not None:
            raise InputError(f"target is only for at_most / at_least claims; a {self.kind} claim takes margin")
        if self.relative and self.stat == "ratio_of_means":
            raise InputError("a ratio_of_means margin is already relative to the baseline; drop relative=True")

    def tolerance(self, baseline_mean: float | None = None) -> float:
        """The margin in the statistic's units (scaled by |baseline mean| when relative)."""
        if not self.relative:
            return self.margin
        if baseline_mean is None or not math.isfinite(baseline_mean):
            raise InputError("a relative margin needs the baseline mean; pass baseline_mean=")
        return self.margin * abs(baseline_mean)

    def describe(self, method: str, metric: str, baseline: str = "") -> str:
        """The claim in words, e.g. "APG saturation lower than CFG"."""
        if self.text:
            return self.text
        what = f"{method} {metric}"
        if self.stat == "ratio_of_means":
            what = f"{method} {metric} ratio to {baseline or 'baseline'}"
        margin = f"{100 * self.margin:g}%" if self.relative else f"{self.margin:g}"
        by = f" by >= {margin}" if self.margin else ""
        if self.kind == "lower":
            return f"{what} lower than {baseline or 'baseline'}{by}" if self.stat == "mean_diff" else f"{what} below 1{by}"
        if self.kind == "higher":
            return f"{what} higher than {baseline or 'baseline'}{by}" if self.stat == "mean_diff" else f"{what} above 1{by}"
        if self.kind == "no_worse":
            within = f" (margin {margin}, {self.better} is better)"
            return f"{method} {metric} no worse than {baseline or 'baseline'}{within}"
        if self.kind == "equivalent":
            return f"{method} {metric} equivalent to {baseline or 'baseline'} (within {margin})"
        op = "<=" if self.kind == "at_most" else ">="
        return f"{what} {op} {self.target:g}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def rate_bound(treatment: Any, baseline: Any, *, top: float = 1.0) -> float | None:
    """The bound both arms sit at, 0 or `top` (100 for percentages), when every value of both
    paired arms equals it (nothing can move: a floor or a ceiling); else None."""
    import numpy as np

    t, b = np.asarray(treatment, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if t.size == 0 or b.size == 0:
        return None
    for bound in (0.0, float(top)):
        if bool((t == bound).all() and (b == bound).all()):
            return bound
    return None


def verdict(claim: Claim, interval: Interval, *, baseline_mean: float | None = None,
            bound: float | None = None) -> Verdict:
    """"met", "missed", "inconclusive" or "uninformative" for `claim` given `interval`.

    baseline_mean: needed when the claim's margin is relative.
    bound: the floor or ceiling both arms sit at (`rate_bound`), if they do: a comparison
    there is "uninformative" whatever the interval (single-arm targets are still judged).
    """
    if bound is not None and claim.kind not in _TARGET_KINDS:
        return "uninformative"
    low, high = interval.low, interval.high
    if not (math.isfinite(low) and math.isfinite(high)) or low > high:
        raise InputError(f"cannot judge a claim on interval [{low}, {high}]")
    if claim.kind == "at_most":
        return _decide(met=high <= claim.target, missed=low > claim.target)
    if claim.kind == "at_least":
        return _decide(met=low >= claim.target, missed=high < claim.target)

    ref = 1.0 if interval.stat == "ratio_of_means" else 0.0
    delta = claim.tolerance(baseline_mean)
    if claim.kind == "lower":
        bound = ref - delta
        return _decide(met=high < bound, missed=low >= bound)
    if claim.kind == "higher":
        bound = ref + delta
        return _decide(met=low > bound, missed=high <= bound)
    if claim.kind == "no_worse":
        if claim.better == "higher":
            bound = ref - delta
            return _decide(met=low > bound, missed=high < bound)
        bound = ref + delta
        return _decide(met=high < bound, missed=low > bound)
    # equivalent
    lo_bound, hi_bound = ref - delta, ref + delta
    return _decide(met=lo_bound <= low and high <= hi_bound, missed=high < lo_bound or low > hi_bound)


def _decide(*, met: bool, missed: bool) -> Verdict:
    assert not (met and missed), "a claim cannot be both met and missed"
    return "met" if met else "missed" if missed else "inconclusive"
