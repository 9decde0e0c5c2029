"""Fuzz real runs: `flowkit generate` on the tiny model with a random sampler, guidance
stack, time grid, size and 1-3 steps, >= 150 runs, and not one traceback.

Every run either writes its images (one PNG per image, each with its settings in its text
chunks) and exits 0, or refuses the combination before sampling, in one line, exit 2
(a sequence sampler on an image model, a grid a sampler does not take, ...). The tiny
model is loaded once; runs are 8 to 16 px, so the whole fuzz takes a few seconds.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from flowkit.cli import main
import tiny_pipes

RUNS = 160
SEEN: dict[str, int] = {"runs": 0, "ok": 0, "refused": 0}

SAMPLERS = ["euler", "heun", "midpoint", "ddim", "ddim:eta=1", "sde", "sde:c=0.5", "bottleneck", "boss",
            "boss:auto=false", "pipeline", "dirichlet", "discrete", "simplex-linear"]
GUIDANCE = [None, "none", "cfg:scale=3", "cfg:scale=7,stop=0.5", "apg:scale=7", "apg:scale=5,eta=0,momentum=-0.5",
            "cfg:scale=4+adaptive:gamma=0.9", "cfg:scale=4+adaptive:gamma=-1", "cfg:scale=4+linear-ag",
            "cfg:scale=4+adaptive:gamma=0.99+linear-ag", "gfcg", "cfg:scale=3+gfcg", "dirichlet-classifier"]
GRIDS = [None, "uniform", "shift:3", "shift:0.5", "dynamic:0.8", "dynamic:-2", "sigmas:1;0.5", "sigmas:1;0.6;0.2",
         "sigmas:0.9;0.5;0.3;0.1", "boss:shapes"]


@pytest.fixture(scope="module")
def loads():
    with tiny_pipes.memoised_load() as patched:
        yield patched


@st.composite
def runs(draw) -> list[str]:
    size = draw(st.sampled_from([8, 12, 16]))
    argv = ["generate", *draw(st.lists(st.sampled_from(["a red circle", "two blue squares", ""]), min_size=1,
                                       max_size=2)),
            "--model", "tiny", "--steps", str(draw(st.integers(1, 3))), "--seed", str(draw(st.integers(0, 2**63 - 1))),
            "-n", str(draw(st.integers(1, 2))), "--batch-size", str(draw(st.integers(1, 3))),
            "--height", str(size), "--width", str(draw(st.sampled_from([size, 8, 16])))]
    for flag, choices in (("--sampler", SAMPLERS), ("--guidance", GUIDANCE), ("--grid", GRIDS)):
        value = draw(st.sampled_from(choices))
        if value is not None:
            argv += [flag, value]
    if draw(st.booleans()):
        argv += ["--negative-prompt", draw(st.sampled_from(["green", "", "three yellow triangles"]))]
    return argv


@settings(max_examples=RUNS, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(argv=runs())
def test_fuzz_real_runs_write_images_or_refuse_in_one_line(loads, argv):
    with tempfile.TemporaryDirectory() as folder:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([*argv, "--out", folder, "--json", "--no-progress"])
        SEEN["runs"] += 1
        assert "Traceback" not in err.getvalue()
        if code == 2:
            SEEN["refused"] += 1
            assert err.getvalue().startswith("flowkit: error: ") and err.getvalue().count("\n") == 1, err.getvalue()
            assert not list(Path(folder).iterdir()), "a refused run wrote nothing"
            return
        assert code == 0, (argv, err.getvalue())
        SEEN["ok"] += 1
        result = json.loads(out.getvalue())
        n = int(argv[argv.index("-n") + 1])
        prompts = argv[1:argv.index("--model")]
        assert len(result["files"]) == len(prompts) * n == len(list(Path(folder).iterdir()))
        for path, prompt in zip(result["files"], [p for p in prompts for _ in range(n)]):
            with Image.open(path) as im:
                assert im.text["prompt"] == prompt and im.text["steps"] == argv[argv.index("--steps") + 1]
                assert im.size == (int(argv[argv.index("--width") + 1]), int(argv[argv.index("--height") + 1]))


def test_fuzz_real_runs_count():
    """The fuzz above ran >= 150 real runs, most of them to the end (run after it, in file order).
    The fuzz is derandomized: with a fresh seed per run the finished share ranged 69-105 of 160,
    so a threshold on it was flaky; a fixed draw keeps CI repeatable (104 of 160 finish)."""
    if not SEEN["runs"]:
        pytest.skip("the run fuzz did not run in this session")
    assert SEEN["runs"] >= 150 and SEEN["ok"] >= 75, SEEN
