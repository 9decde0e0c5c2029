"""The house has layers (docs/architecture.md): imports run one way.

Every module of the installed package (flowkit/, samplers/, guidance/, pipelines/) is read
as text; every import it makes, at the top or inside a function, is checked against the
layer table below. A module imports only from its own layer or lower ones (a folder sits in
one layer); the methods (L4a) and the model families (L4b) never import each other; nothing imports the
CLI but the CLI itself and `__main__` entry points; and the import graph has no cycle.
The allowlist is empty: `if TYPE_CHECKING:` imports are the only exception (annotations).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"flowkit": "flowkit", "samplers": "flowkit.samplers", "guidance": "flowkit.guidance",
           "pipelines": "flowkit.pipelines"}

# (layer, module prefixes), most specific prefix wins. L4a: methods, L4b: model families.
LAYERS: dict[str, tuple[str, ...]] = {
    "L0": ("flowkit.errors", "flowkit.seeding", "flowkit.storage", "flowkit.text", "flowkit.checksums"),
    "L1": ("flowkit.paths", "flowkit.prediction", "flowkit.spec", "flowkit.conditioning", "flowkit.schedulers",
           "flowkit.tokens", "flowkit.steps"),
    "L2": ("flowkit.registry", "flowkit.denoiser", "flowkit.context", "flowkit.guidance_base",
           "flowkit.sampler_base", "flowkit.timegrid", "flowkit.kit", "flowkit.rewards", "flowkit.perturbation"),
    "L3": ("flowkit.sampling_loop",),
    "L4a": ("flowkit.samplers", "flowkit.guidance", "flowkit.boss"),
    "L4b": ("flowkit.adapters", "flowkit.attention", "flowkit.worlds", "flowkit.loading", "flowkit.seqmodels",
            "flowkit.metrics"),
    "L5": ("flowkit.api", "flowkit.pipelines", "flowkit.calibration", "flowkit.finetune"),
    "L6": ("flowkit.cli", "flowkit.batch", "flowkit.tune", "flowkit.train", "flowkit.bench", "flowkit.gallery",
           "flowkit.__main__"),
}
RANK = {"L0": 0, "L1": 1, "L2": 2, "L3": 3, "L4a": 4, "L4b": 4, "L5": 5, "L6": 6}
# the top-level package re-exports the public API (flowkit.sample, flowkit.load): it sits with the API
PACKAGE_LAYER = {"flowkit": "L5"}


def layer_of(module: str) -> str:
    if module in PACKAGE_LAYER:
        return PACKAGE_LAYER[module]
    best, found = -1, None
    for layer, prefixes in LAYERS.items():
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, found = len(p), layer
    if found is None:
        raise AssertionError(f"{module} has no layer: add it to the table in tests/test_layers.py and "
                             "docs/architecture.md")
    return found


def modules() -> dict[str, Path]:
    out = {}
    for folder, package in SOURCES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imports_of(module: str, path: Path, known: set[str]) -> list[tuple[int, str]]:
    """(line, imported flowkit module) for every import outside `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _type_checking(node):
            for inner in node.body:
                for sub in ast.walk(inner):
                    skip.add(id(sub))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "flowkit"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "flowkit":
                continue
            for a in node.names:  # `from flowkit.x import y`: y may be a module itself
                sub = f"{base}.{a.name}"
                out.append((node.lineno, sub if sub in known else base))
    return out


def _folder(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def violations() -> list[str]:
    mods = modules()
    known = set(mods)
    bad = []
    for module, path in mods.items():
        mine = layer_of(module)
        for line, target in imports_of(module, path, known):
            if target == module or target not in known:
                continue
            theirs = layer_of(target)
            where = f"{path.relative_to(ROOT)}:{line}: {module} ({mine}) imports {target} ({theirs})"
            if target == "flowkit.cli" or target.startswith("flowkit.cli."):
                if not (module.startswith("flowkit.cli") or module.endswith("__main__")):
                    bad.append(where + ": only the CLI and __main__ entry points import the CLI")
                continue
            if RANK[theirs] > RANK[mine]:
                bad.append(where + ": upward")
            elif {mine, theirs} == {"L4a", "L4b"}:
                bad.append(where + ": methods and model families never import each other")
    return bad


def cycles() -> list[list[str]]:
    """Import cycles among modules (imports inside functions included, TYPE_CHECKING excepted)."""
    mods = modules()
    known = set(mods)
    graph = {m: sorted({t for _, t in imports_of(m, p, known) if t in known and t != m}) for m, p in mods.items()}
    # a package's __init__ that re-exports its own submodules is not a cycle with them
    index, low, stack, on, found = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    import sys

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_layer():
    for module in modules():
        layer_of(module)


def test_no_import_runs_upward_or_across_methods_and_families():
    bad = violations()
    assert not bad, f"{len(bad)} imports break the layers:\n" + "\n".join(bad)


def test_the_import_graph_has_no_cycle():
    found = cycles()
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


@pytest.mark.parametrize("source, expected", [
    ("from flowkit.api import sample\n", "upward"),  # a core module importing the API
    ("def f():\n    from flowkit.cli import main\n", "only the CLI"),  # inside a function too
    ("from flowkit.worlds import shapes\n", "never import each other"),  # a method importing a world
])
def test_the_checker_catches_a_planted_import(tmp_path, monkeypatch, source, expected):
    """Negative control: plant a bad import in a copy of a method module and see it reported."""
    planted = ROOT / "guidance" / "_planted_for_test.py"
    if "api" in source:
        planted = ROOT / "flowkit" / "_planted_core_for_test.py"
        monkeypatch.setitem(LAYERS, "L1", LAYERS["L1"] + ("flowkit._planted_core_for_test",))
    planted.write_text(source)
    try:
        assert any(expected in v and "_planted" in v for v in violations())
    finally:
        planted.unlink()


def test_type_checking_imports_are_exempt():
    tree_src = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from flowkit.api import sample\n"
    path = ROOT / "flowkit" / "_planted_tc_for_test.py"
    path.write_text(tree_src)
    try:
        assert imports_of("flowkit._planted_tc_for_test", path, set(modules())) == []
    finally:
        path.unlink()
