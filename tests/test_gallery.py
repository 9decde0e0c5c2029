"""`flowkit gallery` from bench results, drawn with the tiny model."""

from __future__ import annotations

import html.parser
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import flowkit
import flowkit.loading
from flowkit.bench import BenchResult, BenchRun, Claim, ResultCache
from flowkit.bench.cache import write_json_atomic
from flowkit.cli import main
from flowkit.errors import FlowkitError, InputError
from flowkit.gallery import build_gallery, show
import tiny_pipes

PROMPTS = ["two blue squares", "a <b>red</b> circle | left"]
BASE = {"guidance": "none", "steps": 2, "height": 16, "width": 16}
METHOD = {"guidance": "cfg:scale=6", "steps": 2, "height": 16, "width": 16}


@pytest.fixture(scope="module")
def loads():
    with tiny_pipes.memoised_load() as patched:
        yield patched


def write_results(folder: Path, name: str = "demo", quick: bool = False) -> None:
    """A bench result as an experiment writes it: one compared row and one gallery entry."""
    bench = BenchRun(name, quick=quick, seed=11, cache=ResultCache(folder / "cache"), n_boot=200)
    show(bench, "CFG x6", METHOD, baseline="no guidance", baseline_settings=BASE, prompts=PROMPTS, columns=2)
    bench.compare("CFG x6", "accuracy", claim=Claim("higher"), treatment=[1.0, 0.9, 1.0, 0.8],
                  baseline=[0.5, 0.6, 0.4, 0.5], baseline_name="no guidance")
    result = BenchResult(name, "a demo experiment", quick, bench.seed, bench.rows, bench.info, bench.samples, {},
                         "2026-01-01", 1.0)
    write_json_atomic(folder / (f"{name}.quick.json" if quick else f"{name}.json"), result.to_dict(), indent=1)


def tile(strip: Path, k: int, size: int = 16) -> np.ndarray:
    """Image k of a strip, scaled back down (the strip upscales by nearest neighbour)."""
    arr = np.asarray(Image.open(strip).convert("RGB"))
    scale = arr.shape[0] // size
    x0 = k * (size * scale + 2)
    return arr[::scale, x0:x0 + size * scale:scale]


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.images: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])


def test_gallery_draws_each_method_beside_its_baseline_with_shared_seeds(loads, tmp_path):
    results, out = tmp_path / "results", tmp_path / "gallery"
    results.mkdir()
    write_results(results)
    index = build_gallery(results, out, model="tiny")
    md = index.read_text()
    links = re.findall(r"\]\(([^)]+\.png)\)", md)
    assert len(links) == 4 and all((out / link).is_file() for link in links)
    assert "## demo" in md and "### CFG x6 vs no guidance" in md and "accuracy: met" in md
    assert "a &lt;b&gt;red&lt;/b&gt; circle \\| left" in md  # escaped: no HTML, no broken table
    page = _Links()
    page.feed((out / "index.html").read_text())
    assert sorted(page.images) == sorted(links)

    pipe = loads("tiny")
    for arm, settings in (("baseline", BASE), ("method", METHOD)):
        ref = flowkit.sample(pipe, PROMPTS, seed=11, num_images_per_prompt=2, **settings).images
        for p in range(2):
            strip = out / "demo" / "cfg-x6" / f"{arm}-{p:02d}.png"
            for k in range(2):
                assert np.array_equal(tile(strip, k), np.asarray(ref[p * 2 + k])), (arm, p, k)
    base, method = (tile(out / "demo" / "cfg-x6" / f"{a}-00.png", 0).astype(int) for a in ("baseline", "method"))
    assert np.abs(base - method).max() > 0  # the method changes the picture

    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    build_gallery(results, out, model="tiny")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # deterministic


def test_gallery_command_reads_quick_results_only_when_asked(loads, tmp_path, capsys):
    results, out = tmp_path / "results", tmp_path / "gallery"
    results.mkdir()
    write_results(results, "quickdemo", quick=True)
    assert main(["gallery", "--results", str(results), "--out", str(out), "--model", "tiny"]) == 2
    assert "no gallery entries" in capsys.readouterr().err
    assert main(["gallery", "--results", str(results), "--out", str(out), "--model", "tiny", "--quick"]) == 0
    assert "wrote" in capsys.readouterr().out and (out / "quickdemo" / "cfg-x6" / "method-01.png").is_file()
    assert main(["gallery", "--results", str(tmp_path / "nothing"), "--model", "tiny"]) == 2
    assert "run `flowkit bench NAME` first" in capsys.readouterr().err


def test_show_checks_its_settings():
    bench = BenchRun("x", cache=ResultCache("/nonexistent"))
    with pytest.raises(InputError, match="unknown option.*guidence"):
        show(bench, "m", {"guidence": "cfg"}, baseline="b", baseline_settings={}, prompts=["a"])
    with pytest.raises(InputError, match="prompt strings"):
        show(bench, "m", {}, baseline="b", baseline_settings={}, prompts=[])
    assert "gallery" not in bench.info


def _entry(**changes):
    entry = {"method": "m", "baseline": "b", "model": "tiny", "prompts": ["a red circle"], "columns": 1, "seed": 0,
             "settings": dict(METHOD), "baseline_settings": dict(BASE)}
    entry.update(changes)
    return entry


def _write_entries(folder: Path, entries: list) -> None:
    folder.mkdir()
    write_json_atomic(folder / "a-good.json", {"experiment": "a-good", "info": {"gallery": [_entry()]}})
    write_json_atomic(folder / "b-bad.json", {"experiment": "b-bad", "info": {"gallery": entries}})


@pytest.mark.parametrize("changes, words", [
    (dict(columns=1_000_000), "columns must be an integer from 1 to 16, got 1000000"),
    (dict(columns="4"), "columns must be an integer from 1 to 16, got '4'"),
    (dict(seed=-1), "seed must be an integer from 0 to"),
    (dict(prompts="a red circle"), "prompts must be a non-empty list of strings, got a str"),
    (dict(prompts=["a", 3]), "prompts[1] must be a string, got an int"),
    (dict(settings={**METHOD, "steps": 1_000_000_000}), "settings.steps must be an integer from 1 to 10000"),
    (dict(settings={**METHOD, "height": 99_999}), "settings.height must be an integer from 1 to 8192"),
    (dict(baseline_settings={**BASE, "guidance": "cgf"}), "baseline_settings.guidance: unknown guidance"),
    (dict(settings={**METHOD, "grid": "dynamic:1e300"}), "settings.grid: bad time grid"),
    (dict(method=["x"]), "method must be a non-empty string"),
])
def test_gallery_entries_are_checked_before_any_image_is_drawn(loads, tmp_path, changes, words):
    """Items 4 and 5: gallery entries were barely checked: `"columns": 1000000` exhausted 24 GB
    of memory, `"steps": 1000000000` ran without end, and `"seed": -1` or `"prompts": "str"`
    crashed with a traceback after the earlier entries' images were written. Every entry is
    now checked against the limits of every surface before the first image; the error names
    the file, the entry and the field."""
    results, out = tmp_path / "results", tmp_path / "gallery"
    _write_entries(results, [_entry(), _entry(**changes)])
    loads.reset_mock()
    with pytest.raises(FlowkitError) as info:
        build_gallery(results, out, model="tiny")
    assert words in str(info.value) and "b-bad.json: gallery entry 1" in str(info.value), str(info.value)
    assert not out.exists() and not loads.called


def test_index_md_escapes_html_as_index_html_does(loads, tmp_path):
    """Item 9: index.md wrote experiment, method, baseline, model, description and settings
    text from the results files raw (only prompts were escaped), so a name like
    `<img src=x onerror=alert(1)>` became live HTML in a rendered index.md; index.html escaped
    it. Both now escape every such text."""
    results, out = tmp_path / "results", tmp_path / "gallery"
    evil = "<img src=x onerror=alert(1)>"
    results.mkdir()
    write_json_atomic(results / "x.json", {"experiment": f"exp {evil}", "description": f"d {evil}", "info": {
        "gallery": [_entry(method=f"m {evil}", baseline=f"b `{evil}`",
                           settings={**METHOD, "negative_prompt": evil})]}})
    build_gallery(results, out, model="tiny")
    md, page = (out / "index.md").read_text(), (out / "index.html").read_text()
    assert "<img src=x" not in md and "<img src=x" not in page
    assert md.count("&lt;img src=x onerror=alert(1)&gt;") >= 5


def test_verdict_lines_show_a_ratio_as_a_ratio():
    """The index's verdict lines: a ratio row reads xR (not R followed by the arms' units), a
    difference keeps its units, other methods' rows are left out. Mutant: the old format gave
    "1.024s" for a wall-time ratio."""
    from flowkit.gallery import _verdicts

    rows = [{"method": "PAG", "metric": "wall-time ratio", "verdict": "met", "estimate": 1.0243, "low": 0.946,
             "high": 1.095, "baseline": "CFG", "units": "s", "stat": "ratio_of_means"},
            {"method": "PAG", "metric": "caption accuracy", "verdict": "met", "estimate": 1.17, "low": -1.56,
             "high": 3.52, "baseline": "CFG", "units": "%", "stat": "mean_diff"},
            {"method": "SEG", "metric": "FSD", "verdict": "missed", "estimate": 0.1, "low": 0.0, "high": 0.2}]
    assert _verdicts(rows, "PAG") == ("wall-time ratio: met (x1.024 [0.946, 1.095] vs CFG)",
                                      "caption accuracy: met (1.17% [-1.56, 3.52] vs CFG)")
