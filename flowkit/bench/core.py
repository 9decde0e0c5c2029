"""The experiment registry and the run that collects rows of claims and verdicts.

An experiment is a function of a `BenchRun`, registered by name:

    @experiment("apg", "APG vs CFG on the shapes world: saturation and accuracy")
    def apg(bench: BenchRun) -> None:
        n = bench.n(full=256, quick=16)
        cfg = bench.arm("cfg", {"guidance": "cfg:scale=7", "version": 1}, run_shapes, n=n)
        apg = bench.arm("apg", {"guidance": "apg:scale=7", "version": 1}, run_shapes, n=n)
        bench.compare("APG", "saturation", claim=Claim("lower"),
                      treatment=column(apg, "saturation"), baseline=column(cfg, "saturation"),
                      baseline_name="CFG")

`bench.arm` caches each arm's per-sample results (chunk by chunk, so an interrupted run
resumes); `bench.compare` adds a paired row with its bootstrap interval and verdict;
`bench.measure` adds a single-arm row against a target. `run_experiment` runs one by name
and writes `NAME.json` (quick runs: `NAME.quick.json`) with rows, info and per-sample data.

Built-in experiments live in `flowkit/bench/experiments/`, one module each, registered in
`flowkit.registry.EXPERIMENTS` and imported on its first lookup; other packages add theirs
through the `flowkit.bench` entry-point group (each entry point names a module whose import
registers experiments).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from flowkit.bench.cache import ResultCache, check_name, to_jsonable, write_json_atomic
from flowkit.bench.stats import (
    Interval,
    bootstrap_mean,
    paired_bootstrap,
    paired_bootstrap_set,
)
from flowkit.bench.verdict import Claim, verdict
from flowkit.errors import InputError, closest
from flowkit.registry import EXPERIMENTS

__all__ = [
    "Row",
    "BenchRun",
    "BenchResult",
    "Experiment",
    "experiment",
    "available",
    "get_experiment",
    "run_experiment",
    "column",
    "result_path",
]

log = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "flowkit.bench"


@dataclass
class Row:
    """One claim checked in one experiment: the line of the table and of the JSON.

    `estimate`, `low`, `high` are the paired statistic (`stat`: "mean_diff" = treatment -
    baseline, "ratio_of_means" = treatment / baseline) or, for a single-arm row
    (`stat` = "mean"), the treatment mean itself; `baseline_mean` is None there.
    """

    experiment: str
    method: str
    metric: str
    claim: str
    baseline: str
    n: int
    treatment_mean: float
    baseline_mean: float | None
    estimate: float
    low: float
    high: float
    verdict: str
    units: str = ""
    stat: str = "mean_diff"
    ci: float = 0.95
    notes: str = ""
    claim_spec: dict[str, Any] = field(default_factory=dict)
    treatment_values: list[float] = field(default_factory=list)
    baseline_values: list[float] | None = None
    per_sample: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def interval(self) -> Interval:
        return Interval(self.estimate, self.low, self.high, self.n, self.stat, self.ci)

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(asdict(self), "row")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Row":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def column(results: Sequence[Mapping[str, Any]], key: str) -> np.ndarray:
    """The values of `key` across per-sample result dicts, as a float array [n]."""
    try:
        return np.asarray([r[key] for r in results], dtype=np.float64)
    except KeyError:
        have = sorted(results[0]) if results else []
        raise InputError(f"per-sample results have no {key!r}{closest(key, have)}; keys: {', '.join(have)}") from None


class BenchRun:
    """The state of one experiment run, handed to the experiment function.

    quick: a smoke-sized run (fewer samples); read it through `n(full=, quick=)`.
    max_samples: a cap on per-arm sample counts read through `sample_count(full=, quick=)`, for a
        run that must fit a compute budget; the cap is recorded in `info`, and the cache lets
        a later run without it add the missing samples.
    seed: the experiment's base seed; derive every sample's seed from it and the index.
    cache: where arms' per-sample results are kept between sessions.
    rows / info / samples: what the run has produced so far.
    """

    def __init__(
        self,
        name: str,
        *,
        quick: bool = False,
        seed: int = 0,
        cache: ResultCache | None = None,
        n_boot: int = 2000,
        max_samples: int | None = None,
    ):
        if max_samples is not None and (not isinstance(max_samples, (int, np.integer)) or max_samples < 1):
            raise InputError(f"max_samples must be a positive integer, got {max_samples!r}")
        self.name = name
        self.quick = quick
        self.max_samples = max_samples
        self.seed = seed
        self.cache = cache if cache is not None else ResultCache()
        self.n_boot = n_boot
        self.rows: list[Row] = []
        self.info: dict[str, Any] = {}
        self.samples: dict[str, list[dict[str, Any]]] = {}

    def n(self, *, full: int, quick: int) -> int:
        """`quick` in a quick run, `full` otherwise."""
        return quick if self.quick else full

    def sample_count(self, *, full: int, quick: int) -> int:
        """A per-arm sample count: `n(full=, quick=)`, capped at `max_samples` (the cap and
        the experiment's own size are recorded in `info["samples_capped"]`)."""
        n = self.n(full=full, quick=quick)
        if self.max_samples is None or n <= self.max_samples:
            return n
        capped = self.info.setdefault("samples_capped", {"max_samples": int(self.max_samples), "full": []})
        if n not in capped["full"]:
            capped["full"].append(int(n))
        return int(self.max_samples)

    def arm(
        self,
        name: str,
        config: Mapping[str, Any],
        fn: Callable[[list[int]], list[dict[str, Any]]],
        *,
        n: int,
        chunk: int = 16,
    ) -> list[dict[str, Any]]:
        """Per-sample results of one arm for samples 0..n-1, cached per chunk.

        config: everything the results depend on except the sample indices and the run's
            seed (both added to the key here); bump a "version" entry when the code changes.
        fn: fn(indices) -> one result dict per index (seed each sample from the index).
        The results are recorded under `samples[name]` in the written JSON.
        """
        if name in self.samples:
            raise InputError(f"arm {name!r} already ran in experiment {self.name!r}; give each arm its own name")
        key = {"arm": name, "seed": self.seed, "config": dict(config)}
        t0 = time.perf_counter()
        results = self.cache.run_cached_chunks(self.name, key, n, fn, chunk=chunk)
        log.info("bench %s: arm %s, %d samples in %.1fs", self.name, name, n, time.perf_counter() - t0)
        self.samples[name] = results
        return results

    def compare(
        self,
        method: str,
        metric: str,
        *,
        claim: Claim,
        treatment: Sequence[float] | np.ndarray,
        baseline: Sequence[float] | np.ndarray,
        baseline_name: str = "baseline",
        units: str = "",
        per_sample: Mapping[str, Sequence[Any]] | None = None,
        notes: str = "",
    ) -> Row:
        """Add a paired row: `claim.stat` of treatment vs baseline, its interval and verdict.

        treatment, baseline: [n] per-sample values, paired by index.
        per_sample: extra per-sample columns to keep in the JSON (seeds, prompts, ...).
        """
        interval = paired_bootstrap(treatment, baseline, stat=claim.stat, n_boot=self.n_boot, seed=self.seed)
        t = np.asarray(treatment, dtype=np.float64)
        b = np.asarray(baseline, dtype=np.float64)
        return self._add(method, metric, claim, interval, baseline_name=baseline_name, treatment_mean=float(t.mean()),
                         baseline_mean=float(b.mean()), units=units, notes=notes, treatment_values=t.tolist(),
                         baseline_values=b.tolist(), per_sample=self._per_sample(per_sample, interval.n))

    def compare_set(
        self,
        method: str,
        metric: str,
        *,
        claim: Claim,
        statistic: Callable[[np.ndarray], tuple[float, float]],
        n: int,
        baseline_name: str = "baseline",
        units: str = "",
        notes: str = "",
    ) -> Row:
        """Add a paired row for a set-level statistic (FSD, KID): `statistic(indices)` gives
        (treatment, baseline) on a resample of the n paired samples; see `paired_bootstrap_set`."""
        interval = paired_bootstrap_set(statistic, n, stat=claim.stat, n_boot=min(self.n_boot, 500),
                                        seed=self.seed)
        t, b = (float(v) for v in statistic(np.arange(n)))
        return self._add(method, metric, claim, interval, baseline_name=baseline_name, treatment_mean=t,
                         baseline_mean=b, units=units,
                         notes=(notes + "; " if notes else "") + "set statistic: per-sample values are not defined")

    def measure(
        self,
        method: str,
        metric: str,
        values: Sequence[float] | np.ndarray,
        claim: Claim,
        *,
        units: str = "",
        per_sample: Mapping[str, Sequence[Any]] | None = None,
        notes: str = "",
    ) -> Row:
        """Add a single-arm row: the mean of `values` [n] against an at_most / at_least target."""
        if claim.kind not in ("at_most", "at_least"):
            raise InputError(
                f"measure() takes an at_most / at_least claim; a {claim.kind} claim needs a baseline, use compare()"
            )
        interval = bootstrap_mean(values, n_boot=self.n_boot, seed=self.seed)
        return self._add(method, metric, claim, interval, baseline_name="", treatment_mean=interval.estimate,
                         baseline_mean=None, units=units, notes=notes,
                         treatment_values=np.asarray(values, dtype=np.float64).tolist(),
                         per_sample=self._per_sample(per_sample, interval.n))

    def _add(self, method: str, metric: str, claim: Claim, interval: Interval, *, baseline_name: str,
             treatment_mean: float, baseline_mean: float | None, units: str, notes: str, **values: Any) -> Row:
        """Record the row of `claim` judged on `interval` (values: the per-sample columns)."""
        row = Row(
            experiment=self.name,
            method=method,
            metric=metric,
            claim=claim.describe(method, metric, baseline_name),
            baseline=baseline_name,
            n=interval.n,
            treatment_mean=treatment_mean,
            baseline_mean=baseline_mean,
            estimate=interval.estimate,
            low=interval.low,
            high=interval.high,
            verdict=verdict(claim, interval, baseline_mean=baseline_mean),
            units=units,
            stat=interval.stat,
            ci=interval.ci,
            notes=notes,
            claim_spec=claim.to_dict(),
            **values,
        )
        self.rows.append(row)
        return row

    @staticmethod
    def _per_sample(per_sample: Mapping[str, Sequence[Any]] | None, n: int) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {}
        for key, vals in (per_sample or {}).items():
            vals = to_jsonable(list(vals), f"per_sample[{key!r}]")
            if len(vals) != n:
                raise InputError(f"per_sample[{key!r}] has {len(vals)} values for {n} samples")
            out[key] = vals
        return out


@dataclass
class BenchResult:
    """What one experiment run produced; `to_dict` is the JSON written to docs/results."""

    name: str
    description: str
    quick: bool
    seed: int
    rows: list[Row]
    info: dict[str, Any]
    samples: dict[str, list[dict[str, Any]]]
    versions: dict[str, str | None]
    date: str
    seconds: float
    path: Path | None = None

    @property
    def verdicts(self) -> dict[str, str]:
        """"method / metric" -> verdict."""
        return {f"{r.method} / {r.metric}": r.verdict for r in self.rows}

    def row(self, method: str, metric: str) -> Row:
        """The row of `method` on `metric`."""
        for r in self.rows:
            if r.method == method and r.metric == metric:
                return r
        raise KeyError(f"no row {method!r} / {metric!r} in {self.name!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "experiment": self.name,
            "description": self.description,
            "quick": self.quick,
            "seed": self.seed,
            "date": self.date,
            "seconds": self.seconds,
            "versions": self.versions,
            "rows": [r.to_dict() for r in self.rows],
            "info": to_jsonable(self.info, "info"),
            "samples": to_jsonable(self.samples, "samples"),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], path: Path | None = None) -> "BenchResult":
        return cls(
            name=d["experiment"],
            description=d.get("description", ""),
            quick=bool(d.get("quick", False)),
            seed=int(d.get("seed", 0)),
            rows=[Row.from_dict(r) for r in d.get("rows", [])],
            info=dict(d.get("info", {})),
            samples=dict(d.get("samples", {})),
            versions=dict(d.get("versions", {})),
            date=d.get("date", ""),
            seconds=float(d.get("seconds", 0.0)),
            path=path,
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "BenchResult":
        path = Path(path)
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f), path)


# ---------------------------------------------------------------- registry


@dataclass(frozen=True)
class Experiment:
    """A registered experiment: its name, one-line description, function and base seed."""

    name: str
    description: str
    fn: Callable[[BenchRun], None]
    seed: int = 0


def experiment(name: str, description: str, *, seed: int = 0) -> Callable[[Callable[[BenchRun], None]], Callable[[BenchRun], None]]:
    """Decorator registering `fn(bench: BenchRun) -> None` as the experiment `name`
    (in `flowkit.registry.EXPERIMENTS`)."""
    check_name(name)
    if not description:
        raise ValueError(f"experiment {name!r} needs a one-line description")

    def register(fn: Callable[[BenchRun], None]) -> Callable[[BenchRun], None]:
        EXPERIMENTS.register(Experiment(name, description, fn, seed))
        return fn

    return register


def available() -> dict[str, str]:
    """Registered experiment names -> descriptions, sorted by name."""
    return EXPERIMENTS.describe()


def get_experiment(name: str) -> Experiment:
    """The experiment registered as `name`; `UnknownNameError` lists the known ones."""
    return EXPERIMENTS.get(name)


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version(), "numpy": np.__version__}
    for dist in ("flowkit", "torch", "diffusers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def result_path(out_dir: str | os.PathLike[str], name: str, quick: bool = False) -> Path:
    """Where `run_experiment` writes: `out_dir/NAME.json`, or `NAME.quick.json` for a quick run
    (so a smoke run never overwrites the full results the docs are built from)."""
    return Path(out_dir) / (f"{name}.quick.json" if quick else f"{name}.json")


def run_experiment(
    name: str,
    quick: bool = False,
    out_dir: str | os.PathLike[str] | None = "docs/results",
    cache_root: str | os.PathLike[str] | None = None,
    *,
    seed: int | None = None,
    n_boot: int = 2000,
    max_samples: int | None = None,
) -> BenchResult:
    """Run the experiment `name` and write its JSON (unless out_dir is None).

    quick: fewer samples, for smoke tests; written to NAME.quick.json.
    cache_root: the result cache's root (default `$FLOWKIT_CACHE/bench`).
    seed: overrides the experiment's registered base seed.
    max_samples: caps every arm's sample count (see `BenchRun.sample_count`).
    """
    from flowkit.limits import MAX_SEED, check_optional_int

    exp = get_experiment(name)
    check_optional_int("seed", seed, 0, MAX_SEED)
    check_optional_int("max_samples", max_samples, 1)
    bench = BenchRun(
        name,
        quick=quick,
        seed=exp.seed if seed is None else seed,
        cache=ResultCache(cache_root),
        n_boot=n_boot,
        max_samples=max_samples,
    )
    t0 = time.perf_counter()
    exp.fn(bench)
    result = BenchResult(
        name=name,
        description=exp.description,
        quick=quick,
        seed=bench.seed,
        rows=bench.rows,
        info=bench.info,
        samples=bench.samples,
        versions=_versions(),
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        seconds=round(time.perf_counter() - t0, 3),
    )
    if out_dir is not None:
        result.path = result_path(out_dir, name, quick)
        write_json_atomic(result.path, result.to_dict(), indent=1)
    return result
