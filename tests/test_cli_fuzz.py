"""Fuzz every subcommand's parser through `flowkit.cli.main`: >= 10,000 command lines in all.

Each example is a command line near each subcommand's grammar (known and unknown options,
numbers from 0 to 10^30 and their junk neighbours, specs, grids, paths, non-UTF-8 text).
The outcome must be one of: exit 0 (help, list), exit 2 with a message on stderr and no
traceback, or reaching the work, which is stubbed to raise `Reached` (so an example costs a
parse, not a run): `flowkit.sample` for generate (model loading returns a stand-in), the
model load for batch, the tuning, the training loop, the experiment or the gallery drawing.
What reaches `flowkit.sample` must be runnable: numbers within flowkit.limits, UTF-8 text,
a finite grid (the stub checks; before issue 22, --steps 99999999999999999999, a non-UTF-8
prompt or --grid dynamic:1e300 got there and crashed the run). Anything else escaping
`main` is a traceback a user would see.

The parser is built once for the module (`flowkit.cli.build_parser` memoised; building it
is most of a call's cost, and parsing leaves it unchanged), so 10,000 examples take well
under a minute on one core.

Paths are single relative names (no '/', '~' or '..'): the checks create output folders,
and they are created inside this module's temporary folder.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import io
import math
import os
from unittest import mock

import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from flowkit.cli import main


OUTCOMES: collections.Counter = collections.Counter()  # (command, outcome) -> examples


class Reached(BaseException):
    """The command got past its checks to the work (a stub raised this)."""


@pytest.fixture(scope="module")
def stubs(tmp_path_factory):
    """Work stubbed out, and the current folder a temporary one, for the whole module."""
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "p.txt").write_text("a red circle\n")
    (folder / "p.jsonl").write_text('{"prompt": "a", "seed": 1}\n')
    (folder / "p.csv").write_text("prompt,seed\na,1\n")
    (folder / "results").mkdir()

    def reached(*args, **kwargs):
        raise Reached()

    import flowkit.cli
    import flowkit.cli.bench

    old = os.getcwd()
    os.chdir(folder)
    patches = [mock.patch("flowkit.cli.build_parser", functools.lru_cache(maxsize=None)(flowkit.cli.build_parser)),
               mock.patch("flowkit.cli.bench.build_parser",
                          functools.lru_cache(maxsize=None)(flowkit.cli.bench.build_parser)),
               mock.patch("flowkit.loading.load", return_value=PIPE),
               mock.patch("flowkit.sample", side_effect=runnable),
               mock.patch("flowkit.batch.runner._load", side_effect=reached),
               mock.patch("flowkit.tune.tune_boss", side_effect=reached),
               mock.patch("flowkit.train.train", side_effect=reached),
               mock.patch("flowkit.train.loop.export_checkpoint", side_effect=reached),
               mock.patch("flowkit.cli.bench.run_experiment", side_effect=reached),
               mock.patch("flowkit.gallery.build_gallery", side_effect=reached)]
    try:
        with contextlib.ExitStack() as stack:
            for p in patches:
                stack.enter_context(p)
            yield folder
    finally:
        os.chdir(old)


PIPE = object()  # what model loading returns here: only the stubs below ever see it


def runnable(pipe, prompts, *, steps, seed, start_index=0, height=None, width=None, negative_prompt=None, grid=None,
             length=None, **kwargs) -> None:
    """`flowkit.sample` as `generate` calls it: the arguments must be runnable, then Reached."""
    MAX_SEED, MAX_SIZE, MAX_STEPS = 2**63 - 1, 8192, 10_000  # flowkit.limits, written out

    assert pipe is PIPE
    assert isinstance(steps, int) and 1 <= steps <= MAX_STEPS, steps
    assert isinstance(seed, int) and 0 <= seed <= MAX_SEED and start_index >= 0, (seed, start_index)
    for side in (height, width):
        assert side is None or 1 <= side <= MAX_SIZE, (height, width)
    for text in [*prompts, *([negative_prompt] if negative_prompt is not None else [])]:
        text.encode("utf-8")  # a lone surrogate (a non-UTF-8 argument) raises here
    if grid is not None:
        assert all(math.isfinite(v) for v in (grid.shift, grid.mu or 0.0)) and abs(grid.mu or 0.0) <= 50, grid
    raise Reached()


def check(argv: list[str]) -> None:
    """`main(argv)` exits 0, or 2 with one message and no traceback, or reaches the work."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except Reached:
            OUTCOMES[argv[0], "reached"] += 1
            return
    text = err.getvalue()
    OUTCOMES[argv[0], code] += 1
    assert code in (0, 2), (argv, code, text)
    assert "Traceback" not in text, (argv, text)
    if code == 2:
        assert text.strip(), ("an exit must say why", argv)
        # our errors are one line; argparse's usage errors echo the user's text, newlines included
        assert text.startswith("flowkit: error: ") and text.count("\n") == 1 or "usage:" in text, (argv, text)
        assert "error:" in text, (argv, text)


# --------------------------------------------------------------------------- value grammars


def _spec(names: list[str]) -> st.SearchStrategy[str]:
    word = st.sampled_from([*names, "none", "x", "", "1", "-", "=", ":", ",", "+", "[", "]", ";", '"', "'", "CFG"])
    value = st.one_of(st.integers(-10**30, 10**30).map(str), st.floats().map(repr), word,
                      st.lists(st.integers(-3, 3).map(str), max_size=3).map(lambda v: "[" + ";".join(v) + "]"))
    option = st.tuples(st.sampled_from(["scale", "eta", "c", "gamma", "start", "stop", "grid", "foo", ""]),
                       value).map("=".join)
    item = st.tuples(word, st.lists(option, max_size=3)).map(lambda t: t[0] + (":" + ",".join(t[1]) if t[1] else ""))
    return st.lists(item, min_size=1, max_size=3).map("+".join)


NUMBER = st.one_of(st.integers(1, 64).map(str), st.integers(-(10**30), 10**30).map(str),
                   st.sampled_from(["", "0", "-1", "1e3", "4.0", " 8", "9" * 5000, "0x10", "٣", "4294967297",
                                    "99999999999999999999", str(2**63), str(2**63 - 1), "nan", "inf"]))
GRID = st.tuples(st.sampled_from(["uniform", "shift", "dynamic", "sigmas", "boss", "", "scheduler"]),
                 st.sampled_from(["", ":"]),
                 st.lists(st.one_of(st.floats().map(repr), st.sampled_from(["1", "0", "x", "", "p.txt", "1e300"])),
                          max_size=4).map(";".join)).map("".join)
MODEL = st.sampled_from(["tiny", "shapes", "dna", "simplex", "", ".", "~", "~nobody\x00", "a\x00b", "results",
                         "SHAPES", "m" * 300])
NAME = st.one_of(st.sampled_from(["out", "x.png", "x.jpg", "x.txt", "x.fa", "", " ", "p.txt", "results", "o.json",
                                  "d.WEBP", ".", "x.psd"]),
                 st.text(st.characters(blacklist_characters="/~\x00", blacklist_categories=("Cs",)), max_size=12)
                 .filter(lambda s: ".." not in s))
TEXT = st.one_of(st.text(max_size=30), st.sampled_from(["a \udcff cat", "\udcfe", "", "x" * 10_000, "promoter"]))
SAMPLER = _spec(["euler", "heun", "sde", "ddim", "midpoint", "boss", "bottleneck", "dirichlet"])
GUIDANCE = _spec(["cfg", "apg", "adaptive", "linear-ag", "gfcg"])


def _mostly(good: st.SearchStrategy[str], rest: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """`good` most of the time, so examples reach the later checks too."""
    return st.integers(0, 7).flatmap(lambda k: good if k < 6 else rest if k < 7 else TEXT)


@st.composite
def command(draw, name: str, positionals: list[st.SearchStrategy[str]], options: dict[str, st.SearchStrategy[str]],
            flags: tuple[str, ...] = ()) -> list[str]:
    argv = [name] + [draw(p) for p in positionals]
    for flag in draw(st.lists(st.sampled_from(sorted(options)), unique=True, max_size=5)) if options else ():
        value = draw(options[flag])
        argv += [f"{flag}={value}"] if flag.startswith("--") and draw(st.booleans()) else [flag, value]
    argv += draw(st.lists(st.sampled_from(flags + ("--json", "--help", "--nosuch", "-x")), unique=True,
                          max_size=2)) if draw(st.integers(0, 5)) == 0 else []
    return argv


SMALL = _mostly(st.integers(1, 16).map(str), NUMBER)
SIZE = _mostly(st.sampled_from(["16", "32", "8", "24"]), NUMBER)
def fuzz(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))

GENERATE = command("generate", [_mostly(st.just("a red circle"), TEXT)], {
    "--model": _mostly(st.just("tiny"), MODEL), "--sampler": SAMPLER, "--guidance": GUIDANCE, "--grid": GRID,
    "--steps": SMALL, "--seed": SMALL, "-n": SMALL, "--batch-size": SMALL, "--height": SIZE, "--width": SIZE,
    "--negative-prompt": TEXT, "-o": NAME, "--class": TEXT, "--length": NUMBER}, ("--force", "--no-progress"))
BATCH = command("batch", [_mostly(st.sampled_from(["p.txt", "p.jsonl", "p.csv"]), NAME)], {
    "--out": NAME, "--model": _mostly(st.just("tiny"), MODEL), "--sampler": SAMPLER, "--guidance": GUIDANCE,
    "--grid": GRID, "--steps": SMALL, "--seed": SMALL, "--batch-size": SMALL, "--height": SIZE, "--width": SIZE,
    "--negative-prompt": TEXT, "--on-error": st.sampled_from(["stop", "skip", "x"])},
    ("--force", "--no-resume", "--progress"))
TUNE = command("tune", [_mostly(st.just("boss"), TEXT)], {
    "--model": _mostly(st.just("tiny"), MODEL), "--steps": _mostly(st.sampled_from(["2", "4,6,8", "2;3"]), TEXT),
    "--k-max": SMALL, "--samples": SMALL, "--cost": st.sampled_from(["local", "endpoint", "x"]),
    "--guidance": GUIDANCE, "--seed": SMALL, "--height": SIZE, "--width": SIZE, "-o": NAME,
    "--prompts": _mostly(st.sampled_from(["single", "two", "p.txt"]), NAME), "--ship": TEXT})
GALLERY = command("gallery", [], {"--results": _mostly(st.just("results"), NAME), "-o": NAME,
                                  "--model": _mostly(st.just("tiny"), MODEL)}, ("--quick",))
TRAIN = command("train", [_mostly(st.sampled_from(["shapes", "dna", "boss", "classifier"]), TEXT)], {
    "--out": NAME, "--steps": NUMBER, "--batch-size": NUMBER, "--lr": _mostly(st.sampled_from(["0.1", "1e-3"]),
                                                                                NUMBER),
    "--threads": NUMBER, "--device": st.sampled_from(["cpu", "cuda", "cuda:7", "tpu", "", "meta"])},
    ("--no-resume", "--export-only"))
BENCH = command("bench", [_mostly(st.sampled_from(["selftest", "memory", "apg"]), TEXT)], {
    "-o": NAME, "--seed": NUMBER, "--max-samples": NUMBER, "--cache": NAME, "--docs": NAME}, ("--quick", "--list"))
LIST = command("list", [_mostly(st.sampled_from(["samplers", "guidance", "models", "experiments", "all"]), TEXT)],
               {}, ("--json",))


@fuzz(3_500)
@given(argv=GENERATE)
@example(argv=["generate", "a", "--model", "tiny", "--steps", "99999999999999999999"])  # OverflowError
@example(argv=["generate", "a", "--model", "tiny", "--grid", "dynamic:1e300"])  # math range error
@example(argv=["generate", "a \udcff", "--model", "tiny"])  # tokenizer TypeError
def test_fuzz_generate(stubs, argv):
    check(argv)


@fuzz(2_000)
@given(argv=BATCH)
def test_fuzz_batch(stubs, argv):
    check(argv)


@fuzz(1_500)
@given(argv=TUNE)
@example(argv=["tune", "boss", "--model", "tiny", "--k-max", "99999999999"])
@example(argv=["tune", "boss", "--model", "tiny", "--out", "results"])  # an existing folder
def test_fuzz_tune(stubs, argv):
    check(argv)


@fuzz(1_000)
@given(argv=GALLERY)
def test_fuzz_gallery(stubs, argv):
    check(argv)


@fuzz(1_000)
@given(argv=TRAIN)
def test_fuzz_train(stubs, argv):
    check(argv)


@fuzz(1_000)
@given(argv=BENCH)
@example(argv=["bench", "selftest", "--quick", "--seed", "-1"])  # numpy ValueError
def test_fuzz_bench(stubs, argv):
    check(argv)


@fuzz(300)
@given(argv=LIST)
def test_fuzz_list(stubs, argv):
    check(argv)


def test_fuzz_reached_every_outcome():
    """The fuzz above is only worth its examples if each command's examples got past the
    checks (reached the work), failed them (exit 2) and asked for help (exit 0); and the
    examples add up to >= 10,000. (Run after the fuzz tests, in file order.)"""
    if not OUTCOMES:
        pytest.skip("the fuzz tests did not run in this session")
    print(dict(OUTCOMES))
    assert sum(OUTCOMES.values()) >= 10_000
    for name in ("generate", "batch", "tune", "train", "bench"):
        assert OUTCOMES[name, "reached"] >= 20 and OUTCOMES[name, 2] >= 20, (name, dict(OUTCOMES))
