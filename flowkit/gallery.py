"""`flowkit gallery`: each bench method's pictures beside its baseline's, with an index page.

An experiment records what to draw, not the pictures (results JSON stays small, and the
pictures can be redrawn at any size of the gallery):

    from flowkit.gallery import show
    show(bench, "APG", {"guidance": "apg:scale=7"}, baseline="CFG",
         baseline_settings={"guidance": "cfg:scale=7"}, prompts=["three red circles"], model="shapes")

appends an entry to ``bench.info["gallery"]``, written with the experiment's results to
docs/results/NAME.json. `build_gallery` reads every results file, loads each entry's model
and samples a grid per arm: for prompt p and column j, image ``p * columns + j`` of one
`flowkit.sample` call with the entry's seed, so the method and its baseline start from the
same noise and differ only by the method. It writes one strip per prompt and arm under
``gallery/EXPERIMENT/METHOD/`` and the index pages ``gallery/index.md`` and
``gallery/index.html`` (static, relative links: open it from disk).

`curve(bench, title, x_label=..., series={label: (x, y)})` records a line chart (a metric
against training steps, say) in ``bench.info["curves"]``; the gallery draws it as an SVG
under ``gallery/EXPERIMENT/`` and docs/benchmarks.md shows it as a table.
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from flowkit.errors import FlowkitError, InputError, WeightsError, clip
from flowkit.limits import MAX_COLUMNS, MAX_IMAGES, MAX_SEED, MAX_SIZE, MAX_STEPS, check_int, check_text, kind, \
    read_bounded
from flowkit.storage import slug

__all__ = ["show", "curve", "SETTINGS", "GalleryEntry", "read_entries", "read_curves", "build_gallery", "svg_chart"]

SETTINGS = ("sampler", "guidance", "steps", "height", "width", "grid", "negative_prompt")
DISPLAY_PX = 96  # strips are upscaled (nearest) so that small images are at least this wide


def _check_settings(settings: Mapping[str, Any], what: str) -> dict[str, Any]:
    if not isinstance(settings, Mapping):
        raise InputError(f"{what} must be a dict of flowkit.sample options, got {type(settings).__name__}")
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise InputError(f"{what}: unknown option(s) {', '.join(unknown)}; use {', '.join(SETTINGS)}")
    return dict(settings)


def show(bench: Any, method: str, settings: Mapping[str, Any], *, baseline: str,
         baseline_settings: Mapping[str, Any], prompts: Sequence[str], model: str = "shapes", columns: int = 4,
         seed: int | None = None) -> dict[str, Any]:
    """Record a gallery entry in `bench.info["gallery"]`: `method` beside `baseline`.

    settings / baseline_settings: `flowkit.sample` options (spec strings, steps, size, ...).
    prompts: one strip of `columns` images per prompt and arm; seed: default the bench's.
    """
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise InputError("show() needs a list of prompt strings")
    entry = {
        "method": str(method), "baseline": str(baseline), "model": str(model), "prompts": list(prompts),
        "columns": columns, "seed": bench.seed if seed is None else seed,
        "settings": _check_settings(settings, "settings"),
        "baseline_settings": _check_settings(baseline_settings, "baseline_settings"),
    }
    _check_entry(entry)  # the checks `flowkit gallery` makes when it reads the entry back
    bench.info.setdefault("gallery", []).append(entry)
    return entry


def curve(bench: Any, title: str, *, x_label: str, series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
          y_label: str = "") -> dict[str, Any]:
    """Record a line chart in `bench.info["curves"]`: each series is (x values, y values) of the
    same length; the gallery draws it, docs/benchmarks.md tabulates it."""
    if not isinstance(title, str) or not title:
        raise InputError("curve() needs a title")
    if not series:
        raise InputError("curve() needs at least one series")
    out: dict[str, dict[str, list[float]]] = {}
    for label, xy in series.items():
        xs, ys = (list(map(float, v)) for v in xy)
        if len(xs) != len(ys) or not xs:
            raise InputError(f"curve {title!r}: series {label!r} needs as many x as y values, at least one")
        out[str(label)] = {"x": xs, "y": ys}
    entry = {"title": title, "x_label": str(x_label), "y_label": str(y_label), "series": out}
    bench.info.setdefault("curves", []).append(entry)
    return entry


@dataclass(frozen=True)
class GalleryEntry:
    experiment: str
    description: str
    source: str  # the results file name
    entry: dict[str, Any]
    verdicts: tuple[str, ...]  # "metric: verdict (estimate [low, high])" of the method's rows

    @property
    def folder(self) -> str:
        return f"{slug(self.experiment, 1000, 'x')}/{slug(self.entry['method'], 1000, 'x')}"


def _verdicts(rows: Sequence[Mapping[str, Any]], method: str) -> tuple[str, ...]:
    out = []
    for r in rows:
        if r.get("method") == method:  # a ratio reads xR, as in the bench tables (its units are the arms')
            est = r.get("estimate", 0)
            value = f"x{est:.4g}" if r.get("stat") == "ratio_of_means" else f"{est:.4g}{r.get('units') or ''}"
            out.append(f"{r.get('metric')}: {r.get('verdict')} ({value} "
                       f"[{r.get('low', 0):.4g}, {r.get('high', 0):.4g}] vs {r.get('baseline') or 'target'})")
    return tuple(out)


def _results(results: Path, quick: bool) -> list[tuple[str, Path, dict[str, Any]]]:
    """(name, path, data) of every NAME.json in `results` (and NAME.quick.json where no
    NAME.json exists, if `quick`), in experiment order."""
    if not results.is_dir():
        raise InputError(f"--results: no folder {str(results)!r}; run `flowkit bench NAME` first")
    chosen: dict[str, Path] = {}
    for path in sorted(results.glob("*.json")):
        is_quick = path.name.endswith(".quick.json")
        name = path.name[: -len(".quick.json")] if is_quick else path.stem
        if is_quick and (not quick or (results / f"{name}.json").exists()):
            continue
        chosen[name] = path
    out = []
    for name, path in sorted(chosen.items()):
        try:
            data = json.loads(read_bounded(path, "bench results").decode("utf-8"))
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read bench results {clip(str(path))!r}: {clip(str(e), 200)}") from None
        if not isinstance(data, dict):
            raise InputError(f"{path}: expected a JSON object (written by flowkit bench), got {kind(data)}")
        out.append((name, path, data))
    return out


def _info_list(path: Path, data: dict[str, Any], key: str) -> list[Any]:
    info = data.get("info")
    value = info.get(key) if isinstance(info, dict) else None
    if value is not None and not isinstance(value, list):
        raise InputError(f"{path}: info.{key} must be a list, got {kind(value)}")
    return value or []


def read_curves(results: Path, *, quick: bool = False) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(experiment, description, results file name, curve) of every recorded curve."""
    out = []
    for name, path, data in _results(results, quick):
        for c in _info_list(path, data, "curves"):
            if not isinstance(c, dict) or not isinstance(c.get("series"), dict) or not c.get("title"):
                raise InputError(f"{path}: a curve needs a title and series (written by flowkit.gallery.curve)")
            out.append((str(data.get("experiment", name)), str(data.get("description", "")), path.name, c))
    return out


def read_entries(results: Path, *, quick: bool = False) -> list[GalleryEntry]:
    """Gallery entries of every NAME.json in `results` (and NAME.quick.json where no NAME.json
    exists, if `quick`), in experiment order."""
    entries = []
    for name, path, data in _results(results, quick):
        for k, entry in enumerate(_info_list(path, data, "gallery")):
            try:
                _check_entry(entry)
            except FlowkitError as e:
                raise type(e)(f"{path}: gallery entry {k}: {e}") from None
            rows = data.get("rows") if isinstance(data.get("rows"), list) else []
            entries.append(GalleryEntry(str(data.get("experiment", name)), str(data.get("description", "")),
                                        path.name, entry, _verdicts([r for r in rows if isinstance(r, dict)],
                                                                    entry["method"])))
    return entries


def _check_entry(entry: Any) -> None:
    """Every field of a gallery entry, against the limits of every surface (flowkit.limits):
    all entries are checked before the first image is drawn."""
    need = ("method", "baseline", "model", "prompts", "columns", "seed", "settings", "baseline_settings")
    if not isinstance(entry, dict) or any(k not in entry for k in need):
        raise InputError(f"expected an object with {', '.join(need)} (written by flowkit.gallery.show)")
    for key in ("method", "baseline", "model"):
        if not isinstance(entry[key], str) or not entry[key]:
            raise InputError(f"{key} must be a non-empty string, got {kind(entry[key])}")
    prompts = entry["prompts"]
    if not isinstance(prompts, list) or not prompts:
        raise InputError(f"prompts must be a non-empty list of strings, got {kind(prompts)}")
    for k, p in enumerate(prompts):
        check_text(f"prompts[{k}]", p)
    check_int("columns", entry["columns"], 1, MAX_COLUMNS)
    check_int("seed", entry["seed"], 0, MAX_SEED)
    if len(prompts) * entry["columns"] > MAX_IMAGES:
        raise InputError(f"{len(prompts)} prompts x {entry['columns']} columns is more than {MAX_IMAGES} images")
    for what in ("settings", "baseline_settings"):
        _check_values(_check_settings(entry[what], what), what)


def _check_values(settings: Mapping[str, Any], what: str) -> None:
    """The values of an arm's settings, as flowkit.sample will take them (specs are built)."""
    from flowkit.api import build_guidance, build_sampler
    from flowkit.timegrid import TimeGrid

    for key, value in settings.items():
        where = f"{what}.{key}"
        if key == "steps":
            check_int(where, value, 1, MAX_STEPS)
        elif key in ("height", "width"):
            check_int(where, value, 1, MAX_SIZE)
        elif key == "negative_prompt":
            check_text(where, value)
        elif value is not None and not isinstance(value, str):
            raise InputError(f"{where} must be a spec string, got {kind(value)}")
        try:
            if key == "sampler" and value is not None:
                build_sampler(value)
            elif key == "guidance":
                build_guidance(value, 1.0)
            elif key == "grid" and value is not None:
                TimeGrid.parse(value)
        except FlowkitError as e:
            raise type(e)(f"{where}: {e}") from None


# --------------------------------------------------------------------------- drawing


def _strip(images: Sequence[Any]) -> Any:
    """Images side by side, upscaled (nearest) to at least DISPLAY_PX wide, 2 px apart."""
    from PIL import Image

    w, h = images[0].size
    scale = max(1, -(-DISPLAY_PX // w))
    pad = 2
    strip = Image.new("RGB", (len(images) * (w * scale + pad) - pad, h * scale), (255, 255, 255))
    for k, im in enumerate(images):
        strip.paste(im.convert("RGB").resize((w * scale, h * scale), Image.NEAREST), (k * (w * scale + pad), 0))
    return strip


_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def _tick(v: float) -> str:
    return f"{v:.4g}"


def svg_chart(c: Mapping[str, Any], width: int = 560, height: int = 300) -> str:
    """A curve (see `curve`) as a standalone SVG line chart: one polyline with point marks per
    series, min and max ticks on both axes, a legend below the plot."""
    series = c["series"]
    xs = [x for v in series.values() for x in v["x"]]
    ys = [y for v in series.values() for y in v["y"] if y == y]
    x0, x1 = min(xs), max(xs)
    y0, y1 = (min(ys), max(ys)) if ys else (0.0, 1.0)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        y0, y1 = y0 - 1, y1 + 1
    pad = 0.05 * (y1 - y0)
    y0, y1 = y0 - pad, y1 + pad
    left, right, top = 70, 20, 30
    bottom = 50 + 18 * len(series)
    w, h = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * w

    def py(y: float) -> float:
        return top + (y1 - y) / (y1 - y0) * h

    esc = html.escape
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<text x="{width / 2:.1f}" y="18" text-anchor="middle" font-size="14">{esc(c["title"])}</text>',
             f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#888"/>']
    for v, anchor in ((y0, py(y0)), (y1, py(y1))):
        parts.append(f'<text x="{left - 6}" y="{anchor + 4:.1f}" text-anchor="end">{_tick(v)}</text>')
    for v in (x0, x1):
        parts.append(f'<text x="{px(v):.1f}" y="{top + h + 16}" text-anchor="middle">{_tick(v)}</text>')
    parts.append(f'<text x="{left + w / 2:.1f}" y="{top + h + 32}" text-anchor="middle">{esc(c["x_label"])}</text>')
    if c.get("y_label"):
        parts.append(f'<text x="14" y="{top + h / 2:.1f}" text-anchor="middle" '
                     f'transform="rotate(-90 14 {top + h / 2:.1f})">{esc(c["y_label"])}</text>')
    for i, (label, v) in enumerate(series.items()):
        colour = _COLOURS[i % len(_COLOURS)]
        points = [(px(x), py(y)) for x, y in zip(v["x"], v["y"]) if y == y]
        if points:
            parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="'
                         + " ".join(f"{a:.1f},{b:.1f}" for a, b in points) + '"/>')
            parts += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{colour}"/>' for a, b in points]
        ly = top + h + 48 + 18 * i
        parts.append(f'<line x1="{left}" y1="{ly - 4}" x2="{left + 24}" y2="{ly - 4}" stroke="{colour}" '
                     'stroke-width="2"/>')
        parts.append(f'<text x="{left + 30}" y="{ly}">{esc(label)}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _draw_curves(curves: list[tuple[str, str, str, dict[str, Any]]], out: Path) -> list[str]:
    """Write each curve's SVG; returns their paths relative to `out`, in order."""
    from flowkit.storage import write_atomic

    paths = []
    for experiment, _, _, c in curves:
        rel = f"{slug(experiment, 1000, 'x')}/curve-{slug(c['title'], 80, 'curve')}.svg"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out / rel, svg_chart(c).encode("utf-8"))
        paths.append(rel)
    return paths


def _arm_images(pipe: Any, entry: Mapping[str, Any], settings: Mapping[str, Any]) -> list[list[Any]]:
    """[prompt][column] images of one arm; image p * columns + j is seeded seed_for(seed, p * columns + j)."""
    from flowkit.api import sample

    cols = entry["columns"]
    out = sample(pipe, entry["prompts"], seed=entry["seed"], num_images_per_prompt=cols, **settings)
    return [out.images[p * cols:(p + 1) * cols] for p in range(len(entry["prompts"]))]


def _draw(entry: GalleryEntry, pipe: Any, out: Path) -> list[dict[str, Any]]:
    """Write the entry's strips; one row per prompt: {prompt, baseline, method} (relative paths)."""
    from flowkit.batch.files import write_png

    folder = out / entry.folder
    folder.mkdir(parents=True, exist_ok=True)
    e = entry.entry
    try:
        arms = {"baseline": _arm_images(pipe, e, e["baseline_settings"]), "method": _arm_images(pipe, e, e["settings"])}
    except FlowkitError as err:
        raise type(err)(f"{entry.source}: {e['method']}: {err}") from None
    rows = []
    for p, prompt in enumerate(e["prompts"]):
        row = {"prompt": prompt}
        for arm, grid in arms.items():
            name = f"{arm}-{p:02d}.png"
            write_png(_strip(grid[p]), folder / name)
            row[arm] = f"{entry.folder}/{name}"
        rows.append(row)
    return rows


def _settings_text(settings: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items()) or "defaults"


Curves = Sequence[tuple[tuple[str, str, str, dict[str, Any]], str]]  # ((experiment, description, file, curve), svg)


def _blocks(sections: list[tuple[GalleryEntry, str, list[dict[str, Any]]]], curves: Curves) -> list[tuple]:
    """(experiment, description, results file, kind, payload) in experiment order; within an
    experiment its pictures, then its curves."""
    blocks = [(entry.experiment, entry.description, entry.source, "entry", (entry, model, rows))
              for entry, model, rows in sections]
    blocks += [(name, description, source, "curve", (c, path)) for (name, description, source, c), path in curves]
    return sorted(blocks, key=lambda b: b[0])  # stable: the order within an experiment is kept


def _markdown(sections: list[tuple[GalleryEntry, str, list[dict[str, Any]]]], source: str,
              curves: Curves = ()) -> str:
    """index.md; every text from the results files is escaped as index.html escapes it (no raw
    HTML, no markdown of its own): see `_md`."""
    lines = ["# flowkit gallery", "",
             f"Built by `flowkit gallery` from the bench results in {_md(source)}. Each row is one prompt; "
             "the baseline's images and the method's start from the same noise (same seeds), so they "
             "differ only by the method.", ""]
    experiment = None
    for name, description, results_file, kind, payload in _blocks(sections, curves):
        if name != experiment:
            experiment = name
            lines += [f"## {_md(experiment)}", "", _md(description), "", f"Results: {_md(results_file)}.", ""]
        if kind == "curve":
            c, path = payload
            lines += [f"### {_md(c['title'])}", "", f"![{_md(c['title'])}]({path})", ""]
            continue
        entry, model, rows = payload
        e = entry.entry
        lines += [f"### {_md(e['method'])} vs {_md(e['baseline'])}", "",
                  f"Model {_md(model)}, seed {int(e['seed'])}, {int(e['columns'])} seeds per prompt. "
                  f"{_md(e['method'])}: {_md(_settings_text(e['settings']))}; "
                  f"{_md(e['baseline'])}: {_md(_settings_text(e['baseline_settings']))}.", ""]
        lines += [f"- {_md(v)}" for v in entry.verdicts] + ([""] if entry.verdicts else [])
        lines += [f"| prompt | {_md(e['baseline'])} | {_md(e['method'])} |", "|---|---|---|"]
        for r in rows:
            lines.append(f"| {_md(r['prompt'])} | ![{_md(e['baseline'])}]({r['baseline']}) | "
                         f"![{_md(e['method'])}]({r['method']}) |")
        lines.append("")
    return "\n".join(lines)


_MD_SPECIAL = re.compile(r"([\\`*_\[\]|])")


def _md(text: Any) -> str:
    """Text for index.md: HTML escaped (as index.html does), markdown's own characters
    backslash-escaped, on one line."""
    escaped = html.escape(" ".join(str(text).split("\n")), quote=False)
    return _MD_SPECIAL.sub(r"\\\1", escaped)


def _html(sections: list[tuple[GalleryEntry, str, list[dict[str, Any]]]], source: str, curves: Curves = ()) -> str:
    esc = html.escape
    parts = ["<!doctype html>", "<html lang=\"en\"><head><meta charset=\"utf-8\"><title>flowkit gallery</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px;vertical-align:middle}img{image-rendering:pixelated}"
             "</style></head><body>", "<h1>flowkit gallery</h1>",
             f"<p>Built by <code>flowkit gallery</code> from the bench results in <code>{esc(source)}</code>. "
             "Each row is one prompt; the baseline's images and the method's start from the same noise.</p>"]
    experiment = None
    for name, description, _, kind, payload in _blocks(sections, curves):
        if name != experiment:
            experiment = name
            parts.append(f"<h2>{esc(experiment)}</h2><p>{esc(description)}</p>")
        if kind == "curve":
            c, path = payload
            parts.append(f"<h3>{esc(c['title'])}</h3><img src=\"{esc(path)}\" alt=\"{esc(c['title'])}\">")
            continue
        entry, model, rows = payload
        e = entry.entry
        parts.append(f"<h3>{esc(e['method'])} vs {esc(e['baseline'])}</h3>")
        parts.append(f"<p>Model <code>{esc(model)}</code>, seed {int(e['seed'])}, {int(e['columns'])} seeds per "
                     f"prompt. {esc(e['method'])}: <code>{esc(_settings_text(e['settings']))}</code>; "
                     f"{esc(e['baseline'])}: <code>{esc(_settings_text(e['baseline_settings']))}</code>.</p>")
        if entry.verdicts:
            parts.append("<ul>" + "".join(f"<li>{esc(v)}</li>" for v in entry.verdicts) + "</ul>")
        parts.append(f"<table><tr><th>prompt</th><th>{esc(e['baseline'])}</th><th>{esc(e['method'])}</th></tr>")
        for r in rows:
            parts.append(f"<tr><td>{esc(r['prompt'])}</td>"
                         f"<td><img src=\"{esc(r['baseline'])}\" alt=\"{esc(e['baseline'])}\"></td>"
                         f"<td><img src=\"{esc(r['method'])}\" alt=\"{esc(e['method'])}\"></td></tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def build_gallery(results: str | Path = "docs/results", out: str | Path = "gallery", *, model: str | None = None,
                  quick: bool = False, load: Callable[[str], Any] | None = None) -> Path:
    """Draw every gallery entry of the results in `results` into `out`; returns index.md's path.

    model: use this model for every entry instead of the one it names (e.g. "tiny").
    """
    from flowkit.batch.files import check_writable
    from flowkit.storage import write_atomic

    results, out = Path(results), Path(out)
    entries = read_entries(results, quick=quick)
    curves = read_curves(results, quick=quick)
    if not entries and not curves:
        raise InputError(f"no gallery entries in {results}/*.json: an experiment records them with "
                         "flowkit.gallery.show(bench, ...)" + ("" if quick else "; --quick reads quick results too"))
    check_writable(out)
    if load is None:
        from flowkit.loading import load
    pipes: dict[str, Any] = {}
    for entry in entries:  # every model loads before the first image is drawn
        name = model or entry.entry["model"]
        if name not in pipes:
            try:
                pipes[name] = load(name)
            except WeightsError as e:
                raise WeightsError(f"{e} (to try the gallery with the untrained model, pass --model tiny)") from None
            except FlowkitError as e:
                raise type(e)(f"{entry.source}: {entry.entry['method']}: {e}") from None
    sections = []
    for entry in entries:
        name = model or entry.entry["model"]
        sections.append((entry, name, _draw(entry, pipes[name], out)))
    drawn = list(zip(curves, _draw_curves(curves, out)))
    write_atomic(out / "index.md", _markdown(sections, str(results), drawn).encode("utf-8"))
    write_atomic(out / "index.html", _html(sections, str(results), drawn).encode("utf-8"))
    return out / "index.md"
