"""Packaging: the wheel carries the whole package under `flowkit`, pyproject lists every
subpackage, third-party plugins register through entry points, CI runs a CPU torch.

The wheel and the plugin are built from copies of their sources in a temporary folder
(an in-tree build would reuse a stale `build/` and race with other test runs), installed
with `pip --target` into a temporary folder, and imported in a subprocess whose working
directory is another temporary folder, so the repository is not on its `sys.path`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
PLUGIN_SRC = TESTS / "plugin_pkg"

# DESIGN.md: the top level is fixed; samplers/, guidance/ and pipelines/ are installed as
# subpackages of flowkit, never as top-level packages.
PACKAGE_DIRS = {
    "flowkit": "flowkit",
    "flowkit.samplers": "samplers",
    "flowkit.guidance": "guidance",
    "flowkit.pipelines": "pipelines",
}
# Data folders of the flowkit package that ship in full (the trained weights).
DATA_DIRS = ("weights",)
# Files the build reads besides the package folders.
BUILD_FILES = ("pyproject.toml", "README.md", "LICENSE", "LICENSE.txt", "MANIFEST.in", "setup.py", "setup.cfg")
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _source_files(root: Path):
    """Files under `root`, without bytecode caches."""
    for p in sorted(root.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc":
            yield p


def _run(cmd: list[str], *, cwd: Path, env: dict | None = None, timeout: float = 300) -> str:
    """Run `cmd`; on failure, fail the test with its output."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
                    f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    return proc.stdout


def _backend_here() -> bool:
    """Whether this environment's setuptools can build wheels without fetching anything:
    setuptools >= 70.1 has bdist_wheel built in; older ones (>= 68, pyproject's floor) need
    the `wheel` package. Otherwise the builds below run isolated, and pip fetches the
    backend from the package index."""
    try:
        from importlib.metadata import version

        major, minor = (int(p) for p in version("setuptools").split(".")[:2])
    except Exception:
        return False
    if (major, minor) >= (70, 1):
        return True
    return (major, minor) >= (68, 0) and importlib.util.find_spec("wheel") is not None


def _subprocess_env(pythonpath: list[Path]) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in pythonpath)
    env["PYTHONNOUSERSITE"] = "1"
    env.pop("PYTHONSTARTUP", None)
    return env


def _run_python(code: str, pythonpath: list[Path], cwd: Path) -> dict:
    """Run `code` in a fresh interpreter (cwd `cwd`, PYTHONPATH `pythonpath`); it prints one JSON line last."""
    out = _run([sys.executable, "-c", code], cwd=cwd, env=_subprocess_env(pythonpath))
    return json.loads(out.strip().splitlines()[-1])


# --------------------------------------------------------------------------- (b) pyproject


def test_pyproject_lists_every_package_with_its_folder():
    tool = _pyproject()["tool"]["setuptools"]
    assert tool["package-dir"] == PACKAGE_DIRS, "package-dir must map flowkit.samplers/guidance/pipelines to the top-level folders"
    listed = set(tool["packages"])
    found = set()
    for package, folder in PACKAGE_DIRS.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder)
            found.add(".".join((package, *rel.parts)))
    missing = sorted(found - listed)
    assert not missing, f"add these packages to [tool.setuptools] packages in pyproject.toml: {missing}"
    stale = sorted(listed - found)
    assert not stale, f"pyproject.toml lists packages with no folder or no __init__.py: {stale}"
    assert not any(p.split(".")[0] != "flowkit" for p in listed), "every package must live under flowkit"


# --------------------------------------------------------------------------- (a) the wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the repository's package sources."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in BUILD_FILES:
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, src / name)
    for folder in PACKAGE_DIRS.values():
        shutil.copytree(REPO / folder, src / folder, ignore=_IGNORE)
    flags = ["--no-isolation", "--skip-dependency-check"] if _backend_here() else []
    dist = tmp / "dist"
    _run([sys.executable, "-m", "build", "--wheel", *flags, "--outdir", str(dist), str(src)], cwd=tmp)
    wheels = list(dist.glob("flowkit-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def wheel_site(wheel, tmp_path_factory) -> Path:
    """A folder holding only the installed wheel (no dependencies)."""
    site = tmp_path_factory.mktemp("wheel_site") / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--no-compile",
          "--target", str(site), str(wheel)], cwd=wheel.parent)
    return site


def _expected_wheel_files() -> set[str]:
    expected = set()
    for package, folder in PACKAGE_DIRS.items():
        prefix = package.replace(".", "/")
        for p in _source_files(REPO / folder):
            if p.suffix == ".py":
                expected.add(f"{prefix}/{p.relative_to(REPO / folder).as_posix()}")
    for data in DATA_DIRS:
        if (REPO / "flowkit" / data).is_dir():
            expected.update(f"flowkit/{p.relative_to(REPO / 'flowkit').as_posix()}"
                            for p in _source_files(REPO / "flowkit" / data))
    return expected


@pytest.mark.slow
def test_wheel_carries_every_module_and_the_weights(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(_expected_wheel_files() - names)
    assert not missing, f"the wheel lacks {len(missing)} files (a package missing from pyproject?): {missing[:20]}"
    top = {n.split("/")[0] for n in names}
    extra = sorted(t for t in top if t != "flowkit" and not t.endswith((".dist-info", ".data")))
    assert not extra, f"the wheel installs top-level names besides flowkit: {extra}"


@pytest.mark.slow
def test_installed_wheel_imports_from_its_own_files(wheel_site, tmp_path):
    for name in ("samplers", "guidance", "pipelines"):
        assert not (wheel_site / name).exists(), f"the wheel installed a top-level {name!r}"
        assert not (wheel_site / f"{name}.py").exists(), f"the wheel installed a top-level {name}.py"
    modules = sorted(
        "flowkit." + str(p.relative_to(wheel_site / "flowkit").with_suffix("")).replace(os.sep, ".")
        for p in (wheel_site / "flowkit").rglob("*.py")
        if p.name != "__main__.py"
    )
    modules = [m[: -len(".__init__")] if m.endswith(".__init__") else m for m in modules]
    code = f"""
import importlib, json, sys
import flowkit, flowkit.samplers, flowkit.guidance, flowkit.pipelines
for name in {modules!r}:
    importlib.import_module(name)
print(json.dumps({{
    "files": {{n: getattr(m, "__file__", None) for n, m in sys.modules.items()
               if n == "flowkit" or n.startswith("flowkit.")}},
    "top": [n for n in ("samplers", "guidance", "pipelines") if n in sys.modules],
    "samplers": sorted(flowkit.samplers.available()),
    "guidance": sorted(flowkit.guidance.available()),
    "path": sys.path,
}}))
"""
    info = _run_python(code, [wheel_site], cwd=tmp_path)
    assert str(REPO) not in info["path"], "the repository is on the subprocess's sys.path"
    site = str(wheel_site.resolve())
    outside = {n: f for n, f in info["files"].items() if f is not None and not str(Path(f).resolve()).startswith(site)}
    assert not outside, f"modules imported from outside the installed wheel: {outside}"
    assert set(modules) <= set(info["files"])
    assert not info["top"], f"top-level packages were imported: {info['top']}"
    assert "euler" in info["samplers"]
    assert "cfg" in info["guidance"]


@pytest.mark.slow
def test_console_script_target_is_in_the_wheel(wheel):
    with zipfile.ZipFile(wheel) as z:
        ep_file = next(n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt"))
        text = z.read(ep_file).decode()
        names = set(z.namelist())
    scripts = {}
    section = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line.strip("[]")
        elif "=" in line and section == "console_scripts":
            key, value = (s.strip() for s in line.split("=", 1))
            scripts[key] = value
    assert "flowkit" in scripts, f"no `flowkit` console script in {ep_file}: {text}"
    module = scripts["flowkit"].split(":")[0]
    path = module.replace(".", "/")
    assert f"{path}.py" in names or f"{path}/__init__.py" in names, \
        f"the `flowkit` command points at {scripts['flowkit']}, which the wheel does not carry"


# --------------------------------------------------------------------------- (c) plugins


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    """tests/plugin_pkg installed (no dependencies) into a folder of its own."""
    tmp = tmp_path_factory.mktemp("plugin")
    src = tmp / "src"
    shutil.copytree(PLUGIN_SRC, src, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build"))
    flags = ["--no-build-isolation"] if _backend_here() else []
    site = tmp / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", *flags,
          "--target", str(site), str(src)], cwd=tmp)
    return site


def test_plugin_registers_through_entry_points(plugin_site, tmp_path):
    """tests/plugin_pkg's sampler, guidance module and reward, declared by entry points only, are
    registered, listed, swept and run. The reward part (`flowkit.rewards` group): `dummy-reward`
    is in `flowkit.rewards.available()` and `flowkit list`, and `bon:reward=dummy-reward` keeps
    what the same function wrapped by `Reward.from_fn` keeps (control: `count` keeps others).
    Mutant caught: REWARDS scanning another entry-point group than `flowkit.rewards` (the run
    fails with "unknown reward 'dummy-reward'")."""
    code = f"""
import json, sys
sys.path.append({str(TESTS)!r})  # the analytic world, after the plugin and flowkit
import torch
import flowkit.guidance, flowkit.samplers
from flowkit.api import build_guidance, build_sampler
from flowkit.guidance import CFG
from flowkit.paths import LinearPath
from flowkit.registry import GUIDANCE, SAMPLERS
from flowkit.samplers import Euler
from flowkit.sampling_loop import integrate
from flowkit.seeding import generators_for, randn_per_sample
from flowkit.timegrid import TimeGrid
from analytic import context

import flowkit_dummy_plugin as plugin

# `flowkit list` and the sweep test see the plugin's classes
import contextlib, io
from flowkit.cli import main
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    main(["list", "--json"])
listed = json.loads(buf.getvalue())
import test_sweep
in_sweep = [c for c in test_sweep.cases() if "dummy" in c[0] or "dummy" in c[1]]
swept = [test_sweep.check_combination(s, g, "shapes-tiny") for s, g in
         [("dummy-euler", "dummy-guidance"), ("dummy-euler", "cfg"), ("heun", "dummy-guidance")]]

noise = randn_per_sample((8,), generators_for(0, range(3))).double()
ts = TimeGrid.uniform().build(6, LinearPath())
x_ref, _ = integrate(Euler(), context(3, 6, [CFG(scale=2.0)]), noise, ts)
stack = build_guidance("cfg:scale=2+dummy-guidance", 1.0)
x_dummy, stats = integrate(build_sampler("dummy-euler"), context(3, 6, list(stack)), noise, ts)

# the plugin's reward, by name, scores best-of-N particles on the shapes model
import flowkit, flowkit.rewards
from flowkit.registry import REWARDS
from flowkit.rewards import Reward
pipe = flowkit.load("tiny")
bon = dict(steps=2, seed=0, guidance="cfg:scale=4", output_type="latent")
prompts = ["a red circle", "two blue squares"]
by_name = flowkit.sample(pipe, prompts, sampler="bon:n=3,base=euler,reward=dummy-reward", **bon)
reward_called = plugin.DummyReward.calls
by_fn = flowkit.sample(pipe, prompts, sampler="bon:n=3,base=euler", reward=Reward.from_fn(plugin.low_energy,
                       differentiable=True), **bon)
by_count = flowkit.sample(pipe, prompts, sampler="bon:n=3,base=euler,reward=count", **bon)
print(json.dumps({{
    "samplers": sorted(flowkit.samplers.available()),
    "guidance": sorted(flowkit.guidance.available()),
    "sampler_is_plugin": SAMPLERS.get("dummy-euler") is plugin.DummySampler,
    "guidance_is_plugin": GUIDANCE.get("dummy-guidance") is plugin.DummyGuidance,
    "rewards": sorted(flowkit.rewards.available()),
    "reward_is_plugin": REWARDS.get("dummy-reward") is plugin.DummyReward,
    "reward_called": reward_called,
    "reward_calls": by_name.stats.reward_calls,
    "bon_nfe": by_name.stats.nfe,
    "bon_same_as_fn": bool(torch.equal(by_name.images, by_fn.images)),
    "bon_differs_from_count": not bool(torch.equal(by_name.images, by_count.images)),
    "stack": [type(m).__name__ for m in stack],
    "same_as_euler": bool(torch.equal(x_ref, x_dummy)),
    "nfe": stats.nfe,
    "plugin_file": plugin.__file__,
    "listed": listed,
    "swept": swept,
    "in_sweep": in_sweep,
}}))
"""
    info = _run_python(code, [plugin_site], cwd=tmp_path)
    assert info["plugin_file"].startswith(str(plugin_site))
    assert "dummy-euler" in info["samplers"] and "euler" in info["samplers"]
    assert "dummy-guidance" in info["guidance"] and "cfg" in info["guidance"]
    assert info["sampler_is_plugin"]
    assert info["guidance_is_plugin"]
    assert info["stack"] == ["CFG", "DummyGuidance"]
    assert info["same_as_euler"], "the plugin's Euler loop should match flowkit's Euler exactly"
    assert info["nfe"] == [12, 12, 12]
    # a new module in a plugin package shows up in `flowkit list` and in the sweep, and runs there
    assert "dummy-euler" in info["listed"]["samplers"] and "dummy-guidance" in info["listed"]["guidance"]
    # a reward registered only by a `flowkit.rewards` entry point is listed and scores particles by its name
    assert "dummy-reward" in info["rewards"] and "count" in info["rewards"]
    assert "dummy-reward" in info["listed"]["rewards"]
    assert info["reward_is_plugin"]
    assert info["reward_called"] == 1 and info["reward_calls"] == 1 and info["bon_nfe"] == [3 * 2 * 2] * 2
    assert info["bon_same_as_fn"], "bon:reward=dummy-reward should keep what the same function as a reward keeps"
    assert info["bon_differs_from_count"], "control: the default count reward keeps other particles"
    assert len(info["in_sweep"]) > 0 and info["swept"] == ["ran", "ran", "ran"]


# --------------------------------------------------------------------------- (d) CI torch


@pytest.mark.skipif(not os.environ.get("CI"), reason="CI only: it must run on the CPU build of torch")
def test_ci_torch_is_the_cpu_build():
    import torch

    assert torch.version.cuda is None, f"CI installed a CUDA build of torch ({torch.__version__})"
