"""flowkit bench: papers' claims measured in miniature, with paired bootstrap verdicts.

An experiment (`@experiment(name, description)`) receives a `BenchRun`, computes each arm's
per-sample results through the cache (`bench.arm`), and adds rows with `bench.compare`
(treatment vs baseline, paired) or `bench.measure` (one arm vs a target). `run_experiment`
runs one by name and writes its JSON; `report` turns results into markdown.
"""

from flowkit.bench.cache import ResultCache, config_hash, default_cache_root
from flowkit.bench.core import (
    BenchResult,
    BenchRun,
    Experiment,
    Row,
    available,
    column,
    experiment,
    get_experiment,
    result_path,
    run_experiment,
)
from flowkit.bench.report import format_result, markdown_table, update_benchmarks
from flowkit.bench.stats import (
    Interval,
    as_percent,
    bootstrap_mean,
    paired_bootstrap,
    proportion,
)
from flowkit.bench.verdict import Claim, verdict

__all__ = [
    "BenchResult",
    "BenchRun",
    "Claim",
    "Experiment",
    "Interval",
    "ResultCache",
    "Row",
    "as_percent",
    "available",
    "bootstrap_mean",
    "column",
    "config_hash",
    "default_cache_root",
    "experiment",
    "format_result",
    "get_experiment",
    "markdown_table",
    "paired_bootstrap",
    "proportion",
    "result_path",
    "run_experiment",
    "update_benchmarks",
    "verdict",
]
