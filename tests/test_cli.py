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


@pytest.mark.parametrize("spec", ["cfg:scale=4", "cfg:scale=4+frap", "cfg:scale=4+counting:scale=1"])
def test_generate_reports_backward_passes_and_reward_calls(spec, loads, tmp_path, capsys):
    """FRAP's and counting guidance's backward passes (and counter calls) show in --json and in
    the text line, summed over micro-batches like the NFE: two micro-batches of one image give
    twice one run's counts, > 0 for both modules and 0 for plain CFG (mutants: only the last
    micro-batch's counts kept; the counts left out of the JSON or the text line)."""
    prompt = "two red circles and a blue square"
    one = flowkit.sample(flowkit.load("tiny"), [prompt], steps=4, guidance=spec, output_type="latent").stats
    argv = ["generate", prompt, "--model", "tiny", "--steps", "4", "-n", "2", "--batch-size", "1", "--guidance", spec]
    code, out, _ = run([*argv, "--out", tmp_path / "j", "--json"], capsys)
    assert code == 0
    stats = json.loads(out)["stats"]
    assert stats["backward_calls"] == 2 * one.backward_calls and stats["reward_calls"] == 2 * one.reward_calls
    assert (stats["backward_calls"] > 0) == (spec != "cfg:scale=4")
    code, out, _ = run([*argv, "--out", tmp_path / "t"], capsys)
    assert code == 0
    assert f", {2 * one.backward_calls} backward passes, {2 * one.reward_calls} reward calls, " in out.splitlines()[-1]


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
        with Image.open(path) as im:
            assert im.tobytes() == out.images[0].tobytes()


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
    assert re.fullmatch(r"1 image in [\d.]+ s, 2 NFE per image, 0 backward passes, 0 reward calls, sampler euler, "
                        r"guidance none", lines[1])
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
    "zero steps": (["--steps", "0"], "--steps must be an integer from 1 to 10000, got 0"),
    "size not a multiple of 4": (["--height", "30", "--width", "30"], "multiples of 4"),
    "height without width": (["--height", "32"], "both --height and --width"),
    "unknown model": (["--model", "shapez"], "unknown model 'shapez' (did you mean 'shapes'?)"),
    "two combiners": (["--guidance", "cfg:scale=7+cfg:scale=3"], "2 combiners"),
    "bad grid": (["--grid", "shift:-1"], "--grid"),
    "negative seed": (["--seed", "-1"], "--seed must be"),
    "one file, two images": (["-n", "2", "--out", "two.png"], "names one file"),
    # positions= are nested lists, which no spec holds (mutant: given_positions without its flat-list check)
    "positions in a spec": (["--guidance", "cfg:scale=4+frap:positions=[3;2]"], "a spec cannot hold nested lists"),
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


# --------------------------------------------------------------------------- issue 22: no image lost


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_generate_twice_into_one_folder_keeps_every_image(loads, tmp_path, capsys):
    """Item 1: `generate "a cat" --seed 1` then `--seed 2` both wrote flowkit-out/00000-a-cat.png,
    the second over the first. Each image now takes the folder's next free number: after runs
    of 1, 1 and 3 images the folder holds 5 files, and the first run's file is unchanged."""
    out = tmp_path / "out"
    assert run(["generate", "a cat", *GEN, "--seed", "1", "--out", out], capsys)[0] == 0
    first = _files(out)
    assert list(first) == ["00000-a-cat.png"]
    assert run(["generate", "a cat", *GEN, "--seed", "2", "--out", out], capsys)[0] == 0
    code, stdout, _ = run(["generate", "a dog", *GEN, "--seed", "2", "-n", "3", "--out", out], capsys)
    assert code == 0
    files = _files(out)
    assert list(files) == ["00000-a-cat.png", "00001-a-cat.png", "00002-a-dog.png", "00003-a-dog.png",
                           "00004-a-dog.png"]
    assert files["00000-a-cat.png"] == first["00000-a-cat.png"]  # not overwritten
    assert len(set(files.values())) == 5
    assert [ln.split()[0] for ln in stdout.splitlines()[:3]] == [str(out / n) for n in list(files)[2:]]


def test_a_number_taken_meanwhile_is_skipped_not_overwritten(loads, tmp_path, capsys, monkeypatch):
    """Item 1: the folder's next free number is read once, at the start; another writer (a second
    `generate` into the same folder) may take a number meanwhile. Writing never replaces a file:
    the image takes the next number instead (planted here by a stale count of 0)."""
    import flowkit.cli.generate as generate

    out = tmp_path / "out"
    out.mkdir()
    (out / "00000-a-cat.png").write_bytes(b"written by another generate meanwhile")
    monkeypatch.setattr(generate, "_next_number", lambda folder: 0)
    assert run(["generate", "a cat", *GEN, "--out", out], capsys)[0] == 0
    files = _files(out)
    assert list(files) == ["00000-a-cat.png", "00001-a-cat.png"]
    assert files["00000-a-cat.png"] == b"written by another generate meanwhile"


def test_png_text_chunks_say_how_to_make_the_image_again(loads, tmp_path, capsys):
    """Item 1: the PNG held no metadata, so an image could not be regenerated from itself. Its
    text chunks now hold prompt, negative prompt, seed (and the image's index and noise seed),
    sampler, guidance, steps, size, model and flowkit version; feeding them back to
    flowkit.sample gives the same pixels."""
    out = tmp_path / "out"
    code, stdout, _ = run(["generate", "two red circles", "--model", "tiny", "--steps", "2", "--seed", "9", "-n", "2",
                           "--sampler", "heun", "--guidance", "cfg:scale=3", "--negative-prompt", "blue",
                           "--height", "16", "--width", "24", "--grid", "shift:2", "--out", out, "--json"], capsys)
    assert code == 0
    path = Path(json.loads(stdout)["files"][1])
    with Image.open(path) as im:
        text, pixels = dict(im.text), im.tobytes()
    assert text == {"prompt": "two red circles", "negative_prompt": "blue", "seed": "9", "seed_index": "1",
                    "noise_seed": str(flowkit.seed_for(9, 1)), "sampler": "heun", "guidance": "cfg:scale=3.0",
                    "steps": "2", "size": "16x24", "grid": "shift:2", "model": "tiny", "flowkit": flowkit.__version__}
    h, w = map(int, text["size"].split("x"))
    again = flowkit.sample(flowkit.loading.load(text["model"]), text["prompt"], seed=int(text["seed"]),
                           start_index=int(text["seed_index"]), sampler=text["sampler"], guidance=text["guidance"],
                           steps=int(text["steps"]), negative_prompt=text["negative_prompt"], height=h, width=w,
                           grid=text["grid"])
    assert again.images[0].tobytes() == pixels


def test_out_file_is_not_overwritten_without_force(loads, tmp_path, capsys):
    """Item 1: `--out one.png` silently replaced an existing file. Now it exits 2 before the
    model loads, the file untouched; --force overwrites."""
    target = tmp_path / "one.png"
    target.write_bytes(b"my own picture")
    loads.reset_mock()
    code, out, err = run(["generate", "x", *GEN, "--out", target], capsys)
    assert code == 2 and out == "" and not loads.called
    assert err == f"flowkit: error: --out {str(target)!r} exists: pass --force to overwrite it, or give another name\n"
    assert target.read_bytes() == b"my own picture"
    assert run(["generate", "x", *GEN, "--out", target, "--force"], capsys)[0] == 0
    with Image.open(target) as im:
        assert im.format == "PNG"


def test_out_names_the_image_format_or_is_refused(loads, tmp_path, capsys, monkeypatch):
    """Item 8: `--out x.jpg` made a folder named x.jpg/ with a PNG inside; `--out ''` wrote into
    the current folder. Now x.jpg is a JPEG (its settings in the JPEG comment), x.webp a WebP,
    a file extension PIL cannot write (x.txt) and an empty --out are refused before loading."""
    monkeypatch.chdir(tmp_path)
    for name, fmt in (("x.jpg", "JPEG"), ("y.WEBP", "WEBP"), ("sub/z.png", "PNG")):
        assert run(["generate", "a cat", *GEN, "-o", name], capsys)[0] == 0
        assert (tmp_path / name).is_file()
        with Image.open(tmp_path / name) as im:
            assert im.format == fmt and im.size == (32, 32)
    with Image.open(tmp_path / "x.jpg") as im:
        assert json.loads(im.info["comment"])["prompt"] == "a cat"
    loads.reset_mock()
    for out, words in (("x.txt", "cannot write .txt files"), ("", "--out is empty"), ("  ", "--out is empty")):
        code, stdout, err = run(["generate", "a cat", *GEN, "--out", out], capsys)
        assert code == 2 and stdout == "" and words in err and err.count("\n") == 1
    assert not loads.called and sorted(p.name for p in tmp_path.iterdir()) == ["sub", "x.jpg", "y.WEBP"]


def test_generate_writes_each_micro_batch_and_keeps_them_on_ctrl_c(loads, tmp_path, capsys, monkeypatch):
    """Item 3: `generate -n N` ran one batch of N and wrote nothing until the end, so Ctrl-C lost
    everything (and memory grew with N). Now flowkit.sample is called per micro-batch of
    --batch-size, each image is written at once, and an interrupt in the third micro-batch
    leaves the four finished images and says so (exit 130)."""
    import flowkit.api

    real, sizes = flowkit.api.sample, []

    def sample(pipe, prompts, **kwargs):
        sizes.append(len(prompts))
        if len(sizes) == 3:
            raise KeyboardInterrupt
        return real(pipe, prompts, **kwargs)

    monkeypatch.setattr(flowkit, "sample", sample)
    out = tmp_path / "out"
    code, stdout, err = run(["generate", "a cat", "a dog", *GEN, "-n", "3", "--batch-size", "2", "--out", out],
                            capsys)
    assert code == 130 and sizes == [2, 2, 2]
    assert sorted(p.name for p in out.iterdir()) == ["00000-a-cat.png", "00001-a-cat.png", "00002-a-cat.png",
                                                     "00003-a-dog.png"]
    assert len(stdout.splitlines()) == 4  # each path printed as it was written
    assert err == f"flowkit: interrupted: 4 of 6 images written in {out}\n"


CPU_OOM = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
           "allocate 35184372088832 bytes. Error code 12 (Cannot allocate memory)")  # torch's own words


def test_generate_out_of_memory_halves_the_micro_batch_with_the_names_and_seeds_of_a_smaller_one(
        loads, tmp_path, capsys, monkeypatch):
    """Audit of #22: `generate -n 4096 --batch-size 4096` at 256 px ended in the CPU allocator's
    RuntimeError traceback. Now out of memory halves the micro-batch and retries (as `batch`
    does): the run writes the same files, names, seeds and bytes as a run at the batch size
    that fits; with one image it is one line, and the images written stay. Mutant caught: no
    retry in `_ImageRun.sample_all` (the RuntimeError escapes)."""
    import flowkit.api

    argv = ["generate", "a cat", "a dog", *GEN, "--height", "16", "--width", "16", "-n", "3", "--json"]
    code, stdout, err = run([*argv, "--batch-size", "2", "--out", tmp_path / "ref"], capsys)
    assert code == 0, err
    ref = json.loads(stdout)
    real, sizes = flowkit.api.sample, []

    def fits(limit, calls=None):  # a device that fits `limit` images per call (for `calls` calls)
        def sample(pipe, prompts, **kwargs):
            sizes.append(len(prompts))
            if len(prompts) > limit or (calls is not None and len(sizes) > calls):
                raise RuntimeError(CPU_OOM)
            return real(pipe, prompts, **kwargs)
        return sample

    monkeypatch.setattr(flowkit, "sample", fits(2))
    code, stdout, err = run([*argv, "--batch-size", "6", "--out", tmp_path / "oom"], capsys)
    assert code == 0, err
    assert sizes == [6, 3, 2, 2, 2]
    assert err == ("flowkit: out of memory at batch size 6; going on at 3\n"
                   "flowkit: out of memory at batch size 3; going on at 2\n")
    got = json.loads(stdout)
    assert got["seeds"] == ref["seeds"] and got["prompts"] == ref["prompts"]
    assert [Path(f).name for f in got["files"]] == [Path(f).name for f in ref["files"]]
    assert [Path(f).read_bytes() for f in got["files"]] == [Path(f).read_bytes() for f in ref["files"]]

    sizes.clear()
    monkeypatch.setattr(flowkit, "sample", fits(2, calls=1))  # then even one image is too many
    code, stdout, err = run([*argv, "--batch-size", "2", "--out", tmp_path / "full"], capsys)
    assert (code, stdout) == (2, "") and "Traceback" not in err, err
    note, error = err.splitlines()  # the halving's note, then the error in one line
    assert note == "flowkit: out of memory at batch size 2; going on at 1" and error.startswith("flowkit: error: ")
    assert "out of memory sampling one 16x16 image, even at batch size 1 (--batch-size 2 halved down to 1): " \
           "lower --height/--width" in error and "the 2 images written are kept" in error
    assert sizes == [2, 2, 1] and len(list((tmp_path / "full").iterdir())) == 2


def test_generate_shows_a_progress_bar_over_images(loads, tmp_path, capsys):
    """Item 3: -n N showed no progress at all; --progress draws a bar over images."""
    code, _, err = run(["generate", "a cat", *GEN, "-n", "5", "--batch-size", "2", "--progress", "--out", tmp_path],
                       capsys)
    assert code == 0 and "generate" in err and "5/5" in err and "img" in err


# --------------------------------------------------------------------------- issue 22: limits, one line, no traceback


def _dir_with_index(tmp_path: Path, name: str, text: str) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "model_index.json").write_text(text)
    return folder


PRE_LOAD = {  # checked before any model loads: (argv after the command, words of the one-line error)
    "steps past the limit": (["generate", "x", "--steps", "4294967297"], "--steps must be an integer from 1 to 10000"),
    "steps overflowing C": (["generate", "x", "--steps", "99999999999999999999"], "from 1 to 10000"),
    "seed past 2^63": (["generate", "x", "--seed", str(2**63)], "--seed must be an integer from 0 to"),
    "too many images": (["generate", "x", "-n", "100001"], "-n/--num-images must be an integer from 1 to 100000"),
    "too many images in all": (["generate", "x", "y", "-n", "60000"], "120000 images"),
    "batch size zero": (["generate", "x", "--batch-size", "0"], "--batch-size must be"),
    "height past the limit": (["generate", "x", "--height", "99999", "--width", "32"], "--height must be an integer from 1 to 8192"),
    "size not a multiple of 4": (["generate", "x", "--height", "30", "--width", "30"], "multiples of 4"),
    "dynamic without mu": (["generate", "x", "--grid", "dynamic"], "--grid dynamic:0.5"),
    "dynamic mu overflowing exp": (["generate", "x", "--grid", "dynamic:1e300"], "mu must be a finite number"),
    "dynamic mu infinite": (["generate", "x", "--grid", "dynamic:inf"], "mu must be a finite number"),
    "shift infinite": (["generate", "x", "--grid", "shift:inf"], "shift must be a finite number"),
    "boss grid on a non-table file": (["generate", "x", "--grid", "boss:{notes}"], "cannot read BOSS table"),
    "non-UTF-8 prompt": (["generate", "a \udcff cat"], "is not valid UTF-8 text"),
    "non-UTF-8 negative prompt": (["generate", "x", "--negative-prompt", "\udcfe"], "not valid UTF-8"),
    "guidance in capitals": (["generate", "x", "--guidance", "CFG"], "(did you mean 'cfg'?)"),
    "gamma beyond a cosine": (["generate", "x", "--guidance", "cfg+adaptive:gamma=5"], "from -1 to 1"),
    "batch steps past the limit": (["batch", "{prompts}", "--out", "b", "--steps", "10001"], "--steps must be"),
    "batch empty out": (["batch", "{prompts}", "--out", ""], "--out is empty"),
    "batch grid dynamic": (["batch", "{prompts}", "--out", "b", "--grid", "dynamic"], "--grid dynamic:0.5"),
    "tune k-max past the limit": (["tune", "boss", "--k-max", "99999999999"], "--k-max must be an integer from 2 to 1000"),
    "tune samples past the limit": (["tune", "boss", "--samples", "100001"], "--samples must be"),
    "tune out is a folder": (["tune", "boss", "--out", "{folder}"], "is a folder: give a file name"),
    "tune a sequence model": (["tune", "boss", "--model", "dna"], "BOSS step sizes are tuned for an image model"),
    # audit of #22: each number within its limit, 2.2 TB of trajectories in all (mutant caught: no
    # check_tune_memory in tune_options -- the model loads first)
    "tune trajectories past the memory limit": (["tune", "boss", "--samples", "100000", "--k-max", "1000",
                                                 "--steps", "4"], "more than the 8 GiB limit: lower --samples"),
    "bench negative seed": (["bench", "selftest", "--quick", "--seed", "-1", "--out", "{folder}"], "--seed must be"),
    "bench empty out": (["bench", "selftest", "--quick", "--out", ""], "--out is empty"),
    "gallery empty out": (["gallery", "--out", "", "--model", "tiny"], "--out is empty"),
    # audit of #22: train had lower bounds only (mutant caught: check_int without the upper bound)
    "train steps past the limit": (["train", "shapes", "--steps", "99999999999999999999"],
                                   "--steps must be an integer from 1 to 10000000"),
    "train batch size past the limit": (["train", "shapes", "--batch-size", "99999999999"],
                                        "--batch-size must be an integer from 1 to 4096"),
    "train threads past the limit": (["train", "shapes", "--threads", "1025"], "--threads must be an integer from 0 to 1024"),
}


@pytest.mark.parametrize("name", list(PRE_LOAD))
def test_bad_numbers_and_names_fail_before_loading_in_one_line(name, loads, tmp_path, capsys, monkeypatch):
    """Items 4, 5, 8, 9: each of these crashed with a traceback (OverflowError, math range error,
    a tokenizer TypeError, IsADirectoryError, ValueError from numpy), ran into a 34 GB
    allocation, failed only after the model loaded, gave misleading advice (dynamic:inf:
    'lower the guidance scale'), or was silently accepted (gamma=5). Each now exits 2 with one
    line naming the option and its limit, before any model loads (train: before its target is built)."""
    monkeypatch.chdir(tmp_path)

    def no_target(*args, **kwargs):
        raise AssertionError("the training target was built")

    monkeypatch.setattr("flowkit.train.target", no_target)
    (tmp_path / "notes.txt").write_text("not a table\n")
    (tmp_path / "p.txt").write_text("a red circle\n")
    (tmp_path / "folder").mkdir()
    subs = {"{notes}": str(tmp_path / "notes.txt"), "{prompts}": str(tmp_path / "p.txt"),
            "{folder}": str(tmp_path / "folder")}
    argv, words = PRE_LOAD[name]
    argv = [subs.get(a, a.replace("{notes}", subs["{notes}"])) for a in argv]
    if argv[0] in ("generate", "batch", "tune") and "--model" not in argv:
        argv += ["--model", "tiny"]
    loads.reset_mock()
    code, out, err = run(argv, capsys)
    assert (code, out) == (2, ""), err
    assert err.startswith("flowkit: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert words in err, err
    assert not loads.called
    assert "lower the guidance scale" not in err


def test_long_input_is_cut_in_the_error_message(loads, capsys):
    """Item 9: a 10,000-character input was echoed whole in the error line."""
    for argv in (["generate", "x", "--model", "m" * 10_000], ["generate", "x", "--model", "tiny", "--grid", "g" * 10_000],
                 ["generate", "x", "--model", "tiny", "--sampler", "s" * 10_000],
                 ["batch", "p" * 10_000 + ".txt", "--out", "o", "--model", "tiny"]):
        code, _, err = run(argv, capsys)
        assert code == 2 and err.count("\n") == 1 and len(err) < 400, (argv[:3], len(err))
        assert "10000 characters" in err or "10004 characters" in err


def test_read_only_output_location_is_one_line_before_work(loads, tmp_path, capsys):
    """Item 5: with --out on a read-only file system, generate/batch/tune/bench crashed with a
    traceback: the clean-up in the error handler unlinked a file that was never written, and
    on a read-only mount even that raises (EROFS). Each now exits 2 with one line, before the
    model loads (generate, batch, tune) or the experiment runs (bench)."""
    from readonly import read_only

    ro = tmp_path / "ro"
    (ro / "sub").mkdir(parents=True)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\n")
    cases = {
        "generate": ["generate", "x", *GEN, "--out", ro / "sub"],
        "generate one file": ["generate", "x", *GEN, "--out", ro / "one.png"],
        "generate new folder": ["generate", "x", *GEN, "--out", ro / "new"],
        "batch": ["batch", prompts, "--out", ro / "sub", "--model", "tiny"],
        "tune": ["tune", "boss", "--model", "tiny", "--steps", "2", "--k-max", "2", "--samples", "1",
                 "--out", ro / "t.json"],
        "bench": ["bench", "selftest", "--quick", "--out", ro / "sub", "--cache", tmp_path / "cache"],
    }
    with pytest.MonkeyPatch.context() as m:
        read_only(m, ro)
        for what, argv in cases.items():
            loads.reset_mock()
            code, out, err = run(argv, capsys)
            assert (code, out) == (2, ""), (what, err)
            assert err.count("\n") == 1 and "Read-only file system" in err, (what, err)
            assert not loads.called, what
    assert sorted(p.name for p in ro.rglob("*")) == ["sub"]


@pytest.mark.parametrize("index, words", [
    ("", "is not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
    ('{"_class_name": "NoSuchPipeline"}', "unknown pipeline class 'NoSuchPipeline'"),
    ('{"_class_name": ["pipeline", "EvilPipeline"]}', "custom pipeline"),
    ('{"_class_name": "StableDiffusionPipeline", "unet": ["evil_module", "EvilUNet"]}', "custom code"),
    ('{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}',
     "cannot load the diffusers folder"),
])
def test_a_broken_diffusers_folder_is_a_weights_error(index, words, tmp_path, capsys):
    """Item 5: `--model DIR` with an empty model_index.json, an unknown `_class_name` or custom
    code crashed inside diffusers (OSError, AttributeError, TypeError) or would import code from
    the folder; each is now a WeightsError naming the problem, one line on the command line.
    No stub here: the real loader runs."""
    folder = _dir_with_index(tmp_path, "model", index)
    (folder / "evil_module.py").write_text("raise SystemExit('custom code ran')\n")
    with pytest.raises(WeightsError, match=re.escape(words)):
        flowkit.load(folder)
    code, _, err = run(["generate", "x", "--model", folder, "--out", tmp_path / "o"], capsys)
    assert code == 2 and err.count("\n") == 1 and words in err


# --------------------------------------------------------------------------- issue 22: friction


def test_help_shows_defaults_short_out_and_train_targets(capsys):
    """Item 9: --steps showed no default in --help, -o was not the short form of --out, and
    `flowkit train --help` did not list the targets."""
    from flowkit.train import targets

    code, out, _ = run(["generate", "--help"], capsys)
    assert code == 0 and "(default: 30)" in " ".join(out.split()) and "-o FILE_OR_DIR, --out FILE_OR_DIR" in out
    code, out, _ = run(["batch", "--help"], capsys)
    assert code == 0 and "(default: 30)" in " ".join(out.split()) and "-o DIR, --out DIR" in out
    for command in (["tune", "--help"], ["gallery", "--help"], ["train", "--help"]):
        code, out, _ = run(command, capsys)
        assert code == 0 and "-o " in out, command
    code, out, _ = run(["train", "--help"], capsys)
    assert code == 0 and "targets:" in out
    for name, description in targets().items():
        assert re.search(rf"^  {re.escape(name)} +{re.escape(description)}$", out, re.M), name
    code, out, _ = run(["bench", "--help"], capsys)
    assert code == 0 and "-o OUT, --out OUT" in out


def test_python_dash_m_flowkit_bench_reports_bad_input_in_one_line(tmp_path):
    """Item 5: `python -m flowkit.bench selftest --quick --seed -1` ended in a numpy traceback."""
    res = subprocess.run([sys.executable, "-m", "flowkit.bench", "selftest", "--quick", "--seed", "-1", "--out",
                          str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("flowkit: error: --seed must be")
