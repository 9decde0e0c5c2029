"""selftest: the bench framework checked on synthetic paired data with a known effect.

Each sample i draws, from its own generator seeded by (seed, i), a baseline value
b_i ~ N(2, 1) and two treatments sharing it: t_i = b_i - 0.5 + N(0, 0.2^2) (a known
improvement of 0.5 on a lower-is-better metric) and e_i = b_i + N(0, 0.05^2) (no effect).
The `lower` and `equivalent` claims must both come out met; a miss means the statistics,
the verdict logic or the cache are broken.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flowkit.bench.core import BenchRun, column, experiment
from flowkit.bench.stats import as_percent
from flowkit.bench.verdict import Claim

SHIFT = 0.5  # the planted improvement
NOISE = 0.2  # per-sample noise of the improved treatment
EQUIV_NOISE = 0.05  # per-sample noise of the no-effect treatment


def _samples(seed: int, indices: list[int]) -> list[dict[str, Any]]:
    """One synthetic record per index, independent of how the indices are chunked."""
    out = []
    for i in indices:
        rng = np.random.default_rng([seed, i])
        base, noise, equiv_noise = rng.normal(2.0, 1.0), rng.normal(0.0, NOISE), rng.normal(0.0, EQUIV_NOISE)
        out.append(
            {
                "index": i,
                "baseline": base,
                "improved": base - SHIFT + noise,
                "equivalent": base + equiv_noise,
            }
        )
    return out


@experiment("selftest", "bench framework self-check on synthetic paired data with a known effect")
def selftest(bench: BenchRun) -> None:
    n = bench.n(full=400, quick=48)
    results = bench.arm(
        "synthetic",
        {"shift": SHIFT, "noise": NOISE, "equiv_noise": EQUIV_NOISE, "version": 1},
        lambda idx: _samples(bench.seed, idx),
        n=n,
    )
    baseline = column(results, "baseline")
    improved = column(results, "improved")
    bench.compare(
        "improved",
        "loss",
        claim=Claim("lower"),
        treatment=improved,
        baseline=baseline,
        baseline_name="baseline",
        notes=f"planted effect -{SHIFT}",
    )
    bench.compare(
        "no-effect",
        "loss",
        claim=Claim("equivalent", margin=0.05, relative=True),
        treatment=column(results, "equivalent"),
        baseline=baseline,
        baseline_name="baseline",
        notes="planted effect 0; margin 5% of the baseline mean",
    )
    bench.measure(
        "improved",
        "samples improved",
        as_percent(improved < baseline),
        Claim("at_least", target=90.0),
        units="%",
        notes=f"P(N(0, {NOISE}^2) < {SHIFT}) is about 99.4%",
    )
    bench.info["n"] = n
    bench.info["planted_shift"] = -SHIFT
