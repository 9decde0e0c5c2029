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

from flowkit.bench.cache import (
    ResultCache,
    check_name,
    config_hash,
    to_jsonable,
    write_json_atomic,
)
from flowkit.bench.stats import (
    Interval,
    bootstrap_mean,
    paired_bootstrap,
    paired_bootstrap_set,
)
from flowkit.bench.verdict import Claim, rate_bound, verdict
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
        previous: Mapping[str, Any] | None = None,
        adopt: Sequence[str] = (),
        progress_path: str | os.PathLike[str] | None = None,
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
        self.arm_keys: dict[str, str] = {}  # arm -> hash of its cache key, written to the JSON
        self.previous = previous  # the committed results of this experiment, whose samples seed the cache
        self.adopt = set(adopt)  # arms of a legacy results file (no arm keys) to take over by name
        # NAME.progress.json: every finished chunk of every arm (with its key), written as the run
        # goes, so a run cut short by the end of a session resumes in the next from a commit
        self.progress_path = None if progress_path is None else Path(progress_path)
        self._progress: dict[str, Any] = {}
        self._progress_written = 0.0

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
        self.arm_keys[name] = config_hash(key)
        self._seed_from_previous(name, key, chunk)
        self._seed_from_progress(name, key)
        t0 = time.perf_counter()
        try:
            results = self.cache.run_cached_chunks(self.name, key, n, fn, chunk=chunk,
                                                   on_chunk=lambda a, b, part: self._note_progress(name, a, b, part))
        finally:  # also when the run is cut short: what is done is kept
            self._write_progress(force=True)
        log.info("bench %s: arm %s, %d samples in %.1fs", self.name, name, n, time.perf_counter() - t0)
        self.samples[name] = results
        return results

    def carry_over(self, method: str, metric: str, baseline_name: str, why: str) -> Row | None:
        """The committed run's row (method, metric, baseline), added again where this run cannot
        compute it (`why`), marked with the date it was measured; None if there is none."""
        prev = self.previous or {}
        for d in prev.get("rows") or []:
            if isinstance(d, dict) and (d.get("method"), d.get("metric"), d.get("baseline")) == \
                    (method, metric, baseline_name):
                row = Row.from_dict(d)
                if "as measured on" not in row.notes:  # a row carried over before keeps its first date
                    row.notes = "; ".join(n for n in (row.notes, f"as measured on {prev.get('date')} ({why})") if n)
                self.rows.append(row)
                return row
        self.info.setdefault("rows_not_computed", []).append(f"{method} / {metric} vs {baseline_name}: {why}")
        return None

    # -- progress files -----------------------------------------------------------------------
    def _note_progress(self, arm: str, start: int, stop: int, part: list[dict[str, Any]]) -> None:
        if self.progress_path is None:
            return
        entry = self._progress.setdefault(arm, {"key": self.arm_keys[arm], "chunks": {}})
        entry["chunks"][f"{start}-{stop}"] = part
        self._write_progress()

    def _write_progress(self, force: bool = False) -> None:
        """Merge this process's finished chunks into the progress file (at most every 30 s)."""
        if self.progress_path is None or not self._progress or (
                not force and time.monotonic() - self._progress_written < 30.0):
            return
        on_disk = _read_progress(self.progress_path, self.seed, self.quick)
        for arm, entry in self._progress.items():
            old = on_disk.get(arm)
            if old is not None and old.get("key") == entry["key"]:
                entry["chunks"] = {**old["chunks"], **entry["chunks"]}
            on_disk[arm] = entry
        write_json_atomic(self.progress_path, to_jsonable({"experiment": self.name, "seed": self.seed,
                                                           "quick": self.quick, "arms": on_disk}, "progress"))
        self._progress_written = time.monotonic()

    def _seed_from_progress(self, name: str, key: Mapping[str, Any]) -> None:
        """Put the chunks a progress file holds for this arm's key into the cache."""
        if self.progress_path is None:
            return
        entry = _read_progress(self.progress_path, self.seed, self.quick).get(name)
        if not entry or entry.get("key") != self.arm_keys[name]:
            return
        seeded = 0
        for bounds, part in entry.get("chunks", {}).items():
            start, _, stop = str(bounds).partition("-")
            if start.isdigit() and stop.isdigit() and isinstance(part, list):
                seeded += self.cache.seed_chunk(self.name, key, int(start), int(stop), part) * len(part)
        if seeded:
            log.info("bench %s: arm %s, %d samples taken from the progress file", self.name, name, seeded)

    def _seed_from_previous(self, name: str, key: Mapping[str, Any], chunk: int) -> None:
        """Put the committed per-sample results of arm `name` into the cache, where they are
        the results of the same key (the JSON records each arm's key hash), so a run in a new
        session computes only what is missing. A legacy file without keys is trusted only for
        the arms named in `adopt` (recorded in `info["adopted"]`)."""
        prev = self.previous
        if not prev or prev.get("quick") != self.quick or prev.get("seed") != self.seed:
            return
        results = (prev.get("samples") or {}).get(name)
        if not isinstance(results, list) or not results:
            return
        keys = prev.get("arm_keys")
        if isinstance(keys, dict):
            if keys.get(name) != self.arm_keys[name]:
                return
        elif name not in self.adopt:
            return
        else:
            self.info.setdefault("adopted", {})[name] = prev.get("date")
        ordered = [r for i, r in enumerate(results) if isinstance(r, dict) and r.get("index", i) == i]
        written = self.cache.seed_chunks(self.name, key, ordered[:len(ordered)], chunk=chunk)
        if written:
            log.info("bench %s: arm %s, %d samples taken from the committed results", self.name, name, written)

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
        bound = rate_bound(t, b, top=100.0 if units == "%" else 1.0)
        if bound is not None:
            stuck = (f"both arms at {bound:g}{units} on every sample: nothing can move, the row says nothing "
                     "about the claim (it needs prompts or sets with room to move)")
            notes = f"{notes}; {stuck}" if notes else stuck
        return self._add(method, metric, claim, interval, baseline_name=baseline_name, treatment_mean=float(t.mean()),
                         baseline_mean=float(b.mean()), units=units, notes=notes, treatment_values=t.tolist(),
                         baseline_values=b.tolist(), per_sample=self._per_sample(per_sample, interval.n), bound=bound)

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
             treatment_mean: float, baseline_mean: float | None, units: str, notes: str,
             bound: float | None = None, **values: Any) -> Row:
        """Record the row of `claim` judged on `interval` (values: the per-sample columns;
        bound: the floor or ceiling both arms sit at, which makes the row uninformative)."""
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
            verdict=verdict(claim, interval, baseline_mean=baseline_mean, bound=bound),
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
    arm_keys: dict[str, str] = field(default_factory=dict)

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
            "arm_keys": dict(self.arm_keys),  # each arm's cache key: a later session seeds its cache from here
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


def _read_progress(path: Path, seed: int, quick: bool) -> dict[str, Any]:
    """The arms of a progress file written by a run of the same seed and size ({} if none)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("seed") != seed or data.get("quick") != quick:
        return {}
    arms = data.get("arms")
    return dict(arms) if isinstance(arms, dict) else {}


def progress_path(out_dir: str | os.PathLike[str], name: str, quick: bool = False) -> Path:
    """Where a run keeps its finished chunks while it runs: `out_dir/NAME.progress.json` (removed
    once the run writes its results)."""
    return Path(out_dir) / (f"{name}.quick.progress.json" if quick else f"{name}.progress.json")


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
    adopt: Sequence[str] = (),
) -> BenchResult:
    """Run the experiment `name` and write its JSON (unless out_dir is None).

    quick: fewer samples, for smoke tests; written to NAME.quick.json.
    cache_root: the result cache's root (default `$FLOWKIT_CACHE/bench`).
    seed: overrides the experiment's registered base seed.
    max_samples: caps every arm's sample count (see `BenchRun.sample_count`).
    The committed results in out_dir (NAME.json) seed the cache: arms whose recorded key is
    the run's own are not computed again (a long run spans sessions through the committed
    file); `adopt` names arms to take over from a file written before keys were recorded.
    While it runs, out_dir/NAME.progress.json keeps every finished chunk (commit it when a
    session ends mid-run: the next run takes them back).
    """
    exp = get_experiment(name)
    previous = None
    if out_dir is not None:
        try:
            previous = json.loads(result_path(out_dir, name, quick).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            previous = None
    bench = BenchRun(
        name,
        quick=quick,
        seed=exp.seed if seed is None else seed,
        cache=ResultCache(cache_root),
        n_boot=n_boot,
        max_samples=max_samples,
        previous=previous if isinstance(previous, dict) else None,
        adopt=adopt,
        progress_path=None if out_dir is None else progress_path(out_dir, name, quick),
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
        arm_keys=bench.arm_keys,
    )
    if out_dir is not None:
        result.path = result_path(out_dir, name, quick)
        write_json_atomic(result.path, result.to_dict(), indent=1)
        progress_path(out_dir, name, quick).unlink(missing_ok=True)  # the results hold it all now
    return result
