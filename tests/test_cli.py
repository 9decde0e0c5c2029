"""The `flowkit` command line, called in-process through `flowkit.cli.main`.

The tiny model is loaded once for the module (through the CLI's own `flowkit.load` call,
memoised), and the generate calls share it.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st
from PIL import Image

import flowkit
import flowkit.loading
from flowkit.cli import GenerateOptions, main, parse_generate_args
from flowkit.errors import WeightsError

GEN = ["--model", "tiny", "--steps", "2"]
_real_load = flowkit.loading.load


@pytest.fixture(scope="module")
def loads():
    """Patch flowkit.load for the module: memoised; `shapes` reports weights not installed."""
    cache: dict[str, object] = {}

    def load(name, **kwargs):
        if name == "shapes":
            raise WeightsError("missing weights manifest (test): the shipped shapes model is not installed")
        if name not in cache:
            cache[name] = _real_load(name, **kwargs)
        return cache[name]

    with mock.patch("flowkit.loading.load", side_effect=load) as patched:
        yield patched


def run(argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def generated(loads, tmp_path_factory):
    """One `generate --json` call: two images of one prompt, seed 3, CFG at the default scale."""
    out_dir = tmp_path_factory.mktemp("gen")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["generate", "two blue squares", *GEN, "--seed", "3", "-n", "2", "--out", str(out_dir), "--json"])
    assert code == 0
    return json.loads(stdout.getvalue())


# --------------------------------------------------------------------------- version, list


def test_version(capsys):
    code, out, _ = run(["--version"], capsys)
    assert code == 0
    assert out == f"flowkit {flowkit.__version__}\n"
    assert re.fullmatch(r"flowkit \d+\.\d+\.\d+\n", out)


def test_python_dash_m_runs_the_cli():
    res = subprocess.run([sys.executable, "-m", "flowkit", "--version"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.startswith("flowkit ")


def test_list_json_names_everything(capsys):
    code, out, _ = run(["list", "--json"], capsys)
    assert code == 0
    tables = json.loads(out)
    assert set(tables) == {"samplers", "guidance", "rewards", "models", "experiments"}
    assert {"count", "presence", "class", "oracle"} <= set(tables["rewards"])
    assert {"euler", "heun", "sde", "ddim", "midpoint"} <= set(tables["samplers"])
    assert "cfg" in tables["guidance"]
    assert {"tiny", "shapes"} <= set(tables["models"])
    assert "selftest" in tables["experiments"]
    assert all(isinstance(d, str) and d and "\n" not in d for t in tables.values() for d in t.values())


def test_list_one_kind_as_text(capsys):
    code, out, _ = run(["list", "samplers"], capsys)
    assert code == 0
    assert out.splitlines()[0] == "samplers:"
    assert re.search(r"^  euler +Euler", out, re.M)
    assert "cfg" not in out


# --------------------------------------------------------------------------- generate


def test_generate_writes_pngs_and_json(generated):
    files = [Path(f) for f in generated["files"]]
    assert [f.name for f in files] == ["00000-two-blue-squares.png", "00001-two-blue-squares.png"]
    for f in files:
        with Image.open(f) as im:
            assert im.format == "PNG" and im.size == (32, 32)
    assert generated["stats"]["nfe"] == [4, 4]  # CFG: cond + uncond, 2 steps
    assert generated["seeds"] == [flowkit.seed_for(3, 0), flowkit.seed_for(3, 1)]
    assert generated["sampler"] == "euler" and generated["guidance"].startswith("cfg")
    assert generated["model"] == "tiny" and generated["seconds"] > 0
    assert not list(files[0].parent.glob("*.tmp"))


def test_generate_matches_flowkit_sample(generated, loads):
    pipe = flowkit.loading.load("tiny")
    for i, path in enumerate(generated["files"]):
        out = flowkit.sample(pipe, "two blue squares", seed=3, steps=2, start_index=i)
        buf = io.BytesIO()
        out.images[0].save(buf, format="PNG")
        assert Path(path).read_bytes() == buf.getvalue()


def test_same_seed_same_bytes_other_seed_differs(generated, tmp_path, capsys):
    argv = ["generate", "two blue squares", *GEN, "-n", "2"]
    assert run([*argv, "--seed", "3", "--out", tmp_path / "again"], capsys)[0] == 0
    for first, again in zip(generated["files"], sorted((tmp_path / "again").iterdir())):
        assert Path(first).read_bytes() == again.read_bytes()
    assert run([*argv, "--seed", "4", "--out", tmp_path / "other"], capsys)[0] == 0
    for first, other in zip(generated["files"], sorted((tmp_path / "other").iterdir())):
        assert Path(first).read_bytes() != other.read_bytes()


def test_generate_without_guidance_one_file_text_output(loads, tmp_path, capsys):
    target = tmp_path / "one.png"
    code, out, err = run(["generate", "a red circle", *GEN, "--guidance", "none", "--seed", "5", "--out", target],
                         capsys)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == f"{target}  seed={flowkit.seed_for(5, 0)}"
    assert re.fullmatch(r"1 image in [\d.]+ s, 2 NFE per image, sampler euler, guidance none", lines[1])
    with Image.open(target) as im:
        assert im.size == (32, 32)
    code, out, _ = run(["generate", "a red circle", *GEN, "--guidance", "none", "--out", tmp_path / "d", "--json"],
                       capsys)
    assert code == 0 and json.loads(out)["stats"]["nfe"] == [2]


def test_default_model_falls_back_to_tiny_with_a_note(loads, tmp_path, capsys):
    code, out, err = run(["generate", "x", "--steps", "1", "--out", tmp_path / "x.png", "--json"], capsys)
    assert code == 0 and json.loads(out)["model"] == "tiny"
    assert len(err.splitlines()) == 1 and err.startswith("flowkit: note:") and "'tiny'" in err


def test_explicit_model_does_not_fall_back(loads, tmp_path, capsys):
    code, out, err = run(["generate", "x", "--model", "shapes", "--out", tmp_path], capsys)
    assert code == 2 and out == ""
    assert err.startswith("flowkit: error: missing weights") and len(err.splitlines()) == 1


BAD = {
    "unknown sampler": (["--sampler", "eulr"], "unknown sampler 'eulr'"),
    "unknown guidance key": (["--guidance", "cfg:scael=3"], "unknown option 'scael'"),
    "zero steps": (["--steps", "0"], "--steps must be an integer >= 1"),
    "size not a multiple of 4": (["--height", "30", "--width", "30"], "multiples of 4"),
    "height without width": (["--height", "32"], "both --height and --width"),
    "unknown model": (["--model", "shapez"], "unknown model 'shapez' (did you mean 'shapes'?)"),
    "two combiners": (["--guidance", "cfg:scale=7+cfg:scale=3"], "2 combiners"),
    "bad grid": (["--grid", "shift:-1"], "--grid"),
    "negative seed": (["--seed", "-1"], "--seed must be"),
    "one file, two images": (["-n", "2", "--out", "two.png"], "names one file"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_one_line_exit_2(name, loads, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    extra, expected = BAD[name]
    code, out, err = run(["generate", "x", "--model", "tiny", "--steps", "2", *extra], capsys)
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("flowkit: error: ") and "Traceback" not in err
    assert expected in err
    if name == "unknown sampler":
        assert all(s in err for s in ("euler", "heun", "sde", "ddim", "midpoint"))


def test_usage_errors_exit_2(capsys):
    for argv in (["generate", "x", "--steps", "two"], ["nosuch"], ["list", "nothing"], []):
        code, _, err = run(argv, capsys)
        assert code == 2 and "usage:" in err and "Traceback" not in err
    # prompts are optional for sequence models (--class), so an image model without one is our error
    code, _, err = run(["generate"], capsys)
    assert (code, err) == (2, "flowkit: error: give at least one prompt\n")


def test_keyboard_interrupt_exits_130(tmp_path, capsys):
    with mock.patch("flowkit.loading.load", side_effect=KeyboardInterrupt):
        code, _, err = run(["generate", "x", "--model", "tiny", "--out", tmp_path], capsys)
    assert code == 130 and err == "flowkit: interrupted\n"


# --------------------------------------------------------------------------- bench, train


def test_bench_delegates(capsys):
    code, out, _ = run(["bench", "--list"], capsys)
    assert code == 0 and "selftest" in out
    code, _, err = run(["bench", "nosuch"], capsys)
    assert code == 2 and err.startswith("flowkit: error: unknown experiment 'nosuch'")


class _LineTask:
    """A one-parameter regression task for the train command."""

    name = "line"
    total_steps = 100

    def build(self):
        import torch

        torch.manual_seed(0)
        return torch.nn.Linear(1, 1)

    def loss(self, model, step, batch_size, rng, gen):
        import torch

        x = torch.randn(batch_size, 1, generator=gen)
        return ((model(x) - 2 * x) ** 2).mean()

    def export(self, model, out_dir):
        path = Path(out_dir) / "export" / "line.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(str(float(model.weight)))
        return [path]


def test_train_overrides_resumes_and_exports(tmp_path, capsys, monkeypatch):
    from flowkit.registry import TRAIN_TARGETS
    from flowkit.train import TrainConfig, TrainTarget

    task = _LineTask()
    TRAIN_TARGETS.register(TrainTarget("line", "a line fit",
                                       lambda: (task, TrainConfig(steps=1000, batch_size=8, lr=0.1, warmup=1))))
    try:
        _train_line(tmp_path, capsys, task)
    finally:
        TRAIN_TARGETS.unregister("line")


def _train_line(tmp_path, capsys, task):
    out = tmp_path / "ckpt"
    code, stdout, _ = run(["train", "line", "--out", out, "--steps", "3", "--batch-size", "4", "--lr", "0.05"], capsys)
    assert code == 0
    assert f"exported weights: {out / 'export'}" in stdout and (out / "export" / "line.txt").is_file()
    config = json.loads((out / "config.json").read_text())
    assert (config["steps"], config["batch_size"], config["lr"]) == (3, 4, 0.05)
    assert task.total_steps == 3
    code, stdout, _ = run(["train", "line", "--out", out, "--steps", "5"], capsys)
    assert code == 0 and "(2 steps in this run" in stdout  # resumed from step 3
    code, stdout, _ = run(["train", "line", "--out", out, "--steps", "2", "--no-resume"], capsys)
    assert code == 0 and "(2 steps in this run" in stdout


def test_train_bad_input(capsys):
    code, _, err = run(["train", "nosuch"], capsys)
    from flowkit.train import targets

    assert code == 2 and err == f"flowkit: error: unknown training target 'nosuch'; known: {', '.join(sorted(targets()))}\n"
    assert {"classifier", "counter", "shapes"} <= set(targets())
    code, _, err = run(["train", "shapes", "--lr", "nan"], capsys)
    assert code == 2 and err.startswith("flowkit: error: --lr must be")


# --------------------------------------------------------------------------- fuzz: parsing never crashes


def _spec_text(names: list[str]) -> st.SearchStrategy[str]:
    """Strings near the spec grammar: known and unknown names, options, stacks, junk tokens."""
    word = st.sampled_from([*names, "none", "x", "", "1", "-", "=", ":", ",", "+", "[", "]", ";", '"', "'"])
    value = st.one_of(st.integers(-10**30, 10**30).map(str), st.floats().map(repr), word,
                      st.lists(st.integers(-3, 3).map(str), max_size=3).map(lambda v: "[" + ";".join(v) + "]"))
    option = st.tuples(st.sampled_from(["scale", "eta", "c", "start", "stop", "space", "foo", ""]), value).map("=".join)
    item = st.tuples(word, st.lists(option, max_size=3)).map(lambda t: t[0] + (":" + ",".join(t[1]) if t[1] else ""))
    return st.lists(item, min_size=1, max_size=3).map("+".join)


_VALID_NUMBER = st.integers(1, 64).map(str)
_NUMBER_TEXT = st.one_of(st.integers(-(10**6), 10**6).map(str),
                         st.sampled_from(["", "0", "-1", "1e3", "4.0", " 8", "9" * 5000, "0x10", "٣"]))
_GRID_TEXT = st.tuples(st.sampled_from(["uniform", "shift", "dynamic", "sigmas", "boss", ""]),
                       st.sampled_from(["", ":"]),
                       st.lists(st.one_of(st.floats().map(repr), st.sampled_from(["1", "0", "x", ""])), max_size=4)
                       .map(";".join)).map("".join)
_MODEL_TEXT = st.sampled_from(["tiny", "shapes", "dna", "", ".", "~", "~nobody\x00", "~\x00", "~nosuchuser", "a\x00b"])
_OPTIONS = {
    "--sampler": _spec_text(["euler", "heun", "sde", "ddim", "midpoint"]),
    "--guidance": _spec_text(["cfg"]),
    "--grid": _GRID_TEXT,
    "--steps": _NUMBER_TEXT,
    "--height": _NUMBER_TEXT,
    "--seed": _NUMBER_TEXT,
    "--num-images": _NUMBER_TEXT,
    "--model": _MODEL_TEXT,
}


def _mostly(likely: st.SearchStrategy[str], rest: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """`likely` 3 times in 4, else `rest` or any text: each example gets far enough to test
    the later checks too."""
    return st.integers(0, 7).flatmap(lambda k: likely if k < 6 else rest if k < 7 else st.text(max_size=30))


@st.composite
def generate_argv(draw) -> list[str]:
    argv = ["a prompt", *draw(st.lists(st.text(max_size=20), max_size=1))]
    for flag in draw(st.lists(st.sampled_from(sorted(_OPTIONS)), unique=True, max_size=4)):
        grammar = _OPTIONS[flag]
        values = _mostly(_VALID_NUMBER, grammar) if grammar is _NUMBER_TEXT else _mostly(grammar, st.text(max_size=30))
        pair = [flag, "--width"] if flag == "--height" and draw(st.integers(0, 4)) else [flag]
        for f in pair:
            value = draw(values)
            argv += [f"{f}={value}"] if draw(st.booleans()) else [f, value]
    return argv


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(argv=generate_argv())
@example(argv=["a prompt", "--model", "~nobody\x00"])  # expanduser raised ValueError
def test_fuzz_generate_options_parse_or_exit_2(argv):
    err = io.StringIO()
    with mock.patch("flowkit.loading.load", side_effect=AssertionError("parsing must not load a model")), \
            contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            opts = parse_generate_args(argv)
        except SystemExit as e:
            assert e.code == 2, (argv, e.code, err.getvalue())
            assert "Traceback" not in err.getvalue()
            assert err.getvalue().strip(), "an exit must say why"
            return
    assert isinstance(opts, GenerateOptions)
    assert opts.steps >= 1 and opts.seed >= 0 and opts.num_images >= 1 and opts.prompts
