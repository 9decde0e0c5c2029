"""batch: `flowkit batch` throughput at batch sizes 1, 4 and 16, and its scaling from 1 to 2 processes.

Sample i of an arm is one whole `flowkit batch` job over the same prompt file (images
written, hashed and recorded in the manifest), timed by the job itself from the moment
every rank is ready to the moment the last image is recorded (model loading excluded),
with base seed bench.seed + i. Batch-size arms run in this process on one loaded model
after a warm-up, on one thread (what accelerate gives each CPU process). The process arms
start new processes at batch size 4, one thread each: `python -m flowkit batch` and
`accelerate launch --multi_gpu --num_processes 2 -m flowkit batch`, so their ratio is the
scaling of the sharding itself (both pay the first batch's warm-up; loading is excluded). Claims: micro-batching raises images/s over batch size 1, and two
processes give at least 1.5x one (ideal 2x; a loaded machine shows less).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from flowkit.bench.core import BenchRun, column, experiment
from flowkit.bench.shapes_world import model_spec
from flowkit.bench.verdict import Claim

BATCH_SIZES = (1, 4, 16)
COLOURS = ("red", "green", "blue")
SHAPES = ("circle", "square", "triangle")


def _prompts(n: int) -> str:
    lines = []
    for k in range(n):
        count = 1 + k % 3
        shape = SHAPES[(k // 3) % 3] + ("s" if count > 1 else "")
        lines.append(f"{['one', 'two', 'three'][count - 1]} {COLOURS[(k // 9) % 3]} {shape}")
    return "\n".join(lines) + "\n"


def _workload(bench: BenchRun) -> dict[str, Any]:
    if bench.quick:
        return {"model": "tiny", "images": 16, "size": 16, "steps": 4}
    # speed depends on the architecture, not the weights: FLOWKIT_SHAPES_MODEL (a shapes model
    # folder, e.g. a training checkpoint's export) stands in for the shipped model
    return {"model": model_spec(), "images": 32, "size": 32, "steps": 10}


def _argv(prompts: Path, out: Path, w: dict[str, Any], seed: int, batch_size: int) -> list[str]:
    """The command line of a run in its own processes (under accelerate launch)."""
    return ["batch", str(prompts), "--out", str(out), "--model", w["model"], "--steps", str(w["steps"]),
            "--height", str(w["size"]), "--width", str(w["size"]), "--seed", str(seed),
            "--batch-size", str(batch_size), "--json", "--no-progress"]


def _config(prompts: Path, out: Path, w: dict[str, Any], seed: int, batch_size: int) -> Any:
    """The same run as `_argv`'s, as the library's BatchConfig (an in-process run)."""
    from flowkit.batch.runner import BatchConfig

    return BatchConfig(prompts=prompts, out=out, model=w["model"], steps=w["steps"], height=w["size"],
                       width=w["size"], seed=seed, batch_size=batch_size)


def _in_process(bench: BenchRun, w: dict[str, Any], batch_size: int, pipe: Any, indices: list[int]) -> list[dict]:
    from flowkit.batch.runner import run_batch

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.txt"
        prompts.write_text(_prompts(w["images"]))
        for i in indices:
            cfg = _config(prompts, Path(tmp) / f"run{i}", w, bench.seed + i, batch_size)
            summary = run_batch(cfg, pipe=pipe, say=lambda _: None)
            out.append({"index": i, "images_per_second": summary.images_per_second, "seconds": summary.seconds,
                        "images": len(summary.generated), "nfe": summary.nfe})
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(processes: int, port: int) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "flowkit"]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(port), "-m", "flowkit"]


def _processes(bench: BenchRun, w: dict[str, Any], processes: int, indices: list[int]) -> list[dict]:
    """`flowkit batch` jobs in new processes (`processes` > 1: under accelerate launch)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.txt"
        prompts.write_text(_prompts(w["images"]))
        for i in indices:
            cmd = _launch(processes, _free_port()) + \
                _argv(prompts, Path(tmp) / f"run{i}", w, bench.seed + i, 4)
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
            if res.returncode != 0:
                raise RuntimeError(f"`{' '.join(cmd)}` failed ({res.returncode}): {res.stderr[-2000:]}")
            summary = json.loads(res.stdout)
            out.append({"index": i, "images_per_second": summary["images_per_second"], "seconds": summary["seconds"],
                        "images": summary["images"], "world_size": summary["world_size"]})
    return out


@experiment("batch", "flowkit batch: images/s at batch sizes 1, 4, 16 and the 1 -> 2 process scaling")
def batch(bench: BenchRun) -> None:
    import flowkit

    w = _workload(bench)
    config = {**w, "version": 1}
    pipe = None

    def loaded() -> Any:
        nonlocal pipe
        if pipe is None:
            pipe = flowkit.load(w["model"])
            flowkit.sample(pipe, ["warm up"], steps=2, height=w["size"], width=w["size"])
        return pipe

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as accelerate sets each CPU process; tiny tensors gain nothing from more
    try:
        _measure(bench, w, config, loaded)
    finally:
        torch.set_num_threads(threads)


def _measure(bench: BenchRun, w: dict[str, Any], config: dict[str, Any], loaded: Any) -> None:
    threads = torch.get_num_threads()
    n = bench.n(full=3, quick=2)
    arms = {}
    for b in BATCH_SIZES:
        arms[b] = bench.arm(f"batch size {b}", {**config, "batch_size": b, "threads": threads},
                            lambda idx, b=b: _in_process(bench, w, b, loaded(), idx), n=n)
    ips = {b: column(arms[b], "images_per_second") for b in BATCH_SIZES}
    for b in BATCH_SIZES[1:]:
        bench.compare(f"batch size {b}", "images/s", claim=Claim("higher", stat="ratio_of_means"),
                      treatment=ips[b], baseline=ips[1], baseline_name="batch size 1", units="img/s",
                      notes=f"{w['images']} images, {w['model']} {w['size']} px, {w['steps']} steps, {threads} threads")
    # both process arms start new processes, so both pay the same first-batch warm-up
    one = bench.arm("1 process", {**config, "processes": 1, "batch_size": 4},
                    lambda idx: _processes(bench, w, 1, idx), n=n)
    two = bench.arm("2 processes", {**config, "processes": 2, "batch_size": 4},
                    lambda idx: _processes(bench, w, 2, idx), n=n)
    row = bench.compare("2 processes", "images/s", claim=Claim("higher", margin=0.5, stat="ratio_of_means"),
                        treatment=column(two, "images_per_second"), baseline=column(one, "images_per_second"),
                        baseline_name="1 process", units="img/s",
                        notes="accelerate launch --multi_gpu --num_processes 2 vs python -m flowkit, on CPU, one "
                              f"thread per process, batch size 4; {os.cpu_count()} cores")
    bench.info.update({"workload": w, "threads": threads, "cpu_count": os.cpu_count(),
                       "images_per_second": {str(b): float(ips[b].mean()) for b in BATCH_SIZES},
                       "scaling_1_to_2_processes": row.estimate})
