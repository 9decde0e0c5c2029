"""Markdown for bench results: the table printed by `flowkit bench`, and docs/benchmarks.md.

`update_benchmarks` rebuilds one section per experiment from the JSON files in
docs/results, each between the markers

    <!-- bench:NAME:start -->
    ...
    <!-- bench:NAME:end -->

and leaves everything outside the markers (hand-written text) as it is. An experiment with
no section yet is appended at the end.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

from flowkit.bench.core import BenchResult, Row

__all__ = ["markdown_table", "format_result", "section", "update_benchmarks", "load_results", "curve_table"]

_HEADER = "| method | metric | claim | n | treatment | baseline | diff [95% CI] | verdict |"
_RULE = "|---|---|---|---:|---:|---:|---|---|"


def _num(x: float | None, units: str = "") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    text = f"{x:.4g}"
    return f"{text} {units}".rstrip() if units and units != "%" else text + units


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _interval_cell(row: Row) -> str:
    if row.stat == "ratio_of_means":
        return f"x{row.estimate:.4g} [{row.low:.4g}, {row.high:.4g}]"
    if row.stat == "mean":
        return f"{_num(row.estimate, row.units)} [{row.low:.4g}, {row.high:.4g}]"
    return f"{row.estimate:+.4g} [{row.low:+.4g}, {row.high:+.4g}]"


def markdown_table(rows: Sequence[Row]) -> str:
    """The rows as a markdown table: method | metric | claim | n | treatment | baseline |
    diff [95% CI] | verdict. A ratio shows as xR, a single-arm row as its mean."""
    lines = [_HEADER, _RULE]
    for r in rows:
        baseline = f"{_num(r.baseline_mean, r.units)} ({_cell(r.baseline)})" if r.baseline_mean is not None else "-"
        verdict = f"**{r.verdict}**" if r.verdict == "missed" else r.verdict
        lines.append(
            "| "
            + " | ".join(
                [
                    _cell(r.method),
                    _cell(r.metric),
                    _cell(r.claim),
                    str(r.n),
                    _num(r.treatment_mean, r.units),
                    baseline,
                    _interval_cell(r),
                    verdict,
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def format_result(result: BenchResult, *, heading: str = "###") -> str:
    """A markdown section for one run: heading, description, table, notes and info."""
    quick = " (quick run)" if result.quick else ""
    capped = (result.info or {}).get("samples_capped")
    if capped:
        quick += f" (samples capped at {capped['max_samples']} per arm)"
    parts = [f"{heading} {result.name}{quick}", "", result.description, "", markdown_table(result.rows)]
    notes = [f"- {r.method} / {r.metric}: {r.notes}" for r in result.rows if r.notes]
    if notes:
        parts += ["", "Notes:", *notes]
    if result.info:
        parts += ["", *(f"- {k}: {_cell(v)}" for k, v in result.info.items() if k != "curves")]
    for c in (result.info or {}).get("curves") or []:
        parts += ["", curve_table(c)]
    versions = ", ".join(f"{k} {v}" for k, v in result.versions.items() if v)
    parts += ["", f"_Run {result.date}, seed {result.seed}, {result.seconds:.1f} s; {versions}._"]
    return "\n".join(parts)


def curve_table(c: dict[str, Any]) -> str:
    """A recorded curve (`flowkit.gallery.curve`) as a markdown table: one row per x value,
    one column per series ('-' where a series has no point there)."""
    series = c.get("series") or {}
    xs = sorted({x for v in series.values() for x in v.get("x", [])})
    lines = [f"Curve: {_cell(c.get('title', ''))} (drawn in the gallery)", "",
             "| " + " | ".join([_cell(c.get("x_label", "x")), *map(_cell, series)]) + " |",
             "|" + "---:|" * (len(series) + 1)]
    for x in xs:
        cells = []
        for v in series.values():
            points = dict(zip(v.get("x", []), v.get("y", [])))
            cells.append(_num(points[x]) if x in points else "-")
        lines.append(f"| {x:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"


def section(result: BenchResult) -> str:
    """`format_result` wrapped in the experiment's markers."""
    start, end = _markers(result.name)
    return f"{start}\n{format_result(result)}\n{end}"


def load_results(results_dir: str | os.PathLike[str], names: Iterable[str] | None = None) -> list[BenchResult]:
    """The results in `results_dir`, one per experiment, sorted by name.

    NAME.json (a full run) is preferred; NAME.quick.json is used only when there is no full run;
    NAME.progress.json (the chunks of a bench still running or cut short) is not a result.
    """
    folder = Path(results_dir)
    chosen: dict[str, Path] = {}
    for path in sorted(folder.glob("*.json")):
        if path.name.endswith(".progress.json"):  # a running (or cut short) bench's chunks, not results
            continue
        quick = path.name.endswith(".quick.json")
        name = path.name[: -len(".quick.json")] if quick else path.stem
        if name not in chosen or not quick:
            chosen[name] = path
    wanted = set(names) if names is not None else None
    return [BenchResult.load(chosen[n]) for n in sorted(chosen) if wanted is None or n in wanted]


def update_benchmarks(
    results_dir: str | os.PathLike[str] = "docs/results",
    doc: str | os.PathLike[str] = "docs/benchmarks.md",
    names: Iterable[str] | None = None,
) -> str:
    """Regenerate the experiments' sections of `doc` from `results_dir`; returns the new text.

    Text outside the marker comments is kept; a missing doc is created with a title.
    """
    doc = Path(doc)
    text = doc.read_text(encoding="utf-8") if doc.exists() else "# Benchmarks\n"
    for result in load_results(results_dir, names):
        start, end = _markers(result.name)
        pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
        new = section(result)
        if pattern.search(text):
            text = pattern.sub(lambda _: new, text, count=1)
        else:
            text = text.rstrip("\n") + "\n\n" + new + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    tmp = doc.with_name(f".{doc.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, doc)
    return text
