"""`flowkit batch` across processes: kill -9 and resume, and two ranks under `accelerate launch`.

Both start real subprocesses (a few seconds each for loading the tiny model), so each is
one test with a tiny workload: 16 px, two steps.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest

import flowkit.api
import flowkit.loading
from flowkit.batch.files import TEMP_PATTERN
from flowkit.batch.records import merged_records, verify
from flowkit.cli import main

SMALL = ["--model", "tiny", "--steps", "2", "--height", "16", "--width", "16"]
_real_load = flowkit.loading.load

# `flowkit batch` with every forward pass slowed down, so that a kill lands mid-run
_SLOW_BATCH = """
import sys, time
import flowkit.loading as L
real = L.load
def load(name, **kw):
    pipe = real(name, **kw)
    forward = pipe.unet.forward
    def slow(*a, **k):
        time.sleep(0.15)
        return forward(*a, **k)
    pipe.unet.forward = slow
    return pipe
L.load = load
from flowkit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}


def _lines(path: Path) -> list[dict]:
    out = []
    if path.exists():
        for line in path.read_text().splitlines(keepends=True):
            if line.endswith("\n"):
                out.append(json.loads(line))
    return out


@pytest.fixture(scope="module")
def tiny():
    cache: dict[str, object] = {}

    def load(name, **kwargs):
        if name not in cache:
            cache[name] = _real_load(name, **kwargs)
        return cache[name]

    with mock.patch("flowkit.loading.load", side_effect=load):
        yield


@pytest.mark.slow
def test_kill_9_then_resume_redoes_exactly_missing_and_corrupt(tiny, tmp_path, capsys, monkeypatch):
    n = 12
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"{k} green triangles\n" for k in range(n)))
    out = tmp_path / "out"
    part = out / "manifest.part-0.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_BATCH, "batch", str(prompts), "--out", str(out), *SMALL,
                             "--batch-size", "1"], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while len(_lines(part)) < 3:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    done = _lines(part)
    assert 3 <= len(done) < n, "the run finished before the kill: slow it down"
    truncated, corrupted = done[0], done[1]
    image = out / truncated["file"]
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    text = part.read_text()
    part.write_text(text.replace(corrupted["sha256"], "0" * 64, 1))
    # a record is appended before its image is linked in place, so the kill can land between
    # the two: such an item (record, no file) is made again too; only finished ones are kept
    expected = {r["index"] for r in done[2:] if verify(out, r)}
    expected = sorted(set(range(n)) - expected)

    sampled: list[int] = []  # noise seeds drawn in the resumed run, one per generated image
    real = flowkit.api.randn_per_sample

    def count(shape, generators, *a, **k):
        sampled.extend(g.initial_seed() for g in generators)
        return real(shape, generators, *a, **k)

    monkeypatch.setattr(flowkit.api, "randn_per_sample", count)
    code = main(["batch", str(prompts), "--out", str(out), *SMALL, "--batch-size", "4", "--json"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["generated"] == expected and truncated["index"] in expected and corrupted["index"] in expected
    assert len(sampled) == len(expected) == len(set(sampled))
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(n))  # each index once, in order
    assert all(verify(out, r) for r in records)
    assert sorted(r["noise_seed"] for r in records if r["index"] in expected) == sorted(sampled)
    assert not [p for p in out.iterdir() if TEMP_PATTERN.match(p.name) or p.name.startswith("manifest.part")]
    # the two images whose bytes no longer match their records are kept (a user may have edited
    # them), listed in orphans.jsonl as changed since written, and their items made again
    orphans = [json.loads(line) for line in (out / "orphans.jsonl").read_text().splitlines()]
    assert sorted(o["file"] for o in orphans) == sorted([truncated["file"], corrupted["file"]])
    assert all(o["reason"] == "changed since written" for o in orphans)
    assert (out / truncated["file"]).stat().st_size > 0 and (out / corrupted["file"]).exists()
    assert len(list(out.glob("*.png"))) == n + 2
    assert merged_records(out) == {r["index"]: r for r in records}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_under_accelerate_match_one_process(tiny, tmp_path, capsys):
    pytest.importorskip("accelerate", reason="sharding over processes needs accelerate")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{k} red squares", **({"seed": k} if k % 2 else {})}) + "\n"
                               for k in range(6)))
    two, one = tmp_path / "two", tmp_path / "one"
    args = ["batch", str(prompts), *SMALL, "--batch-size", "2"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(_free_port()), "-m", "flowkit"]
    res = subprocess.run([*launch, *args, "--out", str(two), "--json"], env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank} of world size 2 on cpu" in res.stderr
    summary = json.loads(res.stdout)
    assert summary["world_size"] == 2 and summary["generated"] == list(range(6))
    records = [json.loads(line) for line in (two / "manifest.jsonl").read_text().splitlines()]
    by_rank = {r: {rec["index"] for rec in records if rec["rank"] == r} for r in (0, 1)}
    assert by_rank[0] and by_rank[1] and not by_rank[0] & by_rank[1]  # two non-empty, disjoint parts
    assert by_rank[0] | by_rank[1] == set(range(6)) and {rec["world_size"] for rec in records} == {2}

    assert main([*args, "--out", str(one)]) == 0  # one process, one thread (conftest), the same plan
    capsys.readouterr()
    single = [json.loads(line) for line in (one / "manifest.jsonl").read_text().splitlines()]
    assert {(r["index"], r["sha256"]) for r in records} == {(r["index"], r["sha256"]) for r in single}
