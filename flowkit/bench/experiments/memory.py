"""memory: the peak memory of `flowkit generate -n N` does not grow with N.

`generate` makes its images in micro-batches of `--batch-size` and writes each at once, so
what it holds is one micro-batch, whatever N is. Before (one batch of all N images, written
at the end) the peak resident memory grew linearly: 1.0 GB at -n 50, 3.5 GB at -n 400 on
the 32 px model. Each N runs in its own process (`python -m flowkit generate "a red circle"
--model tiny -n N`, CPU, one thread), which reports its own peak resident set size
(VmHWM) as it exits.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from flowkit.bench.core import BenchRun, column, experiment
from flowkit.bench.verdict import Claim

PROMPT = "a red circle"
STEPS = 2
MAX_RATIO = 1.10  # peak at the largest N over peak at the smallest: flat within 10%
MAX_SLOPE = 20.0  # MiB per 100 images (the one-batch code grew by about 700)


# Runs `python -m MODULE ARGS` or `python -c CODE ARGS` (argv[2:]) and, at exit, writes the
# process's own peak resident memory (VmHWM, KiB) to the file argv[1]. Read from inside: the
# kernel's ru_maxrss of a child also counts its parent's memory at fork.
_WRAPPER = r"""
import atexit, runpy, sys
report, kind, target, *rest = sys.argv[1:]
def peak():
    try:
        with open("/proc/self/status") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except OSError:
        import resource
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with open(report, "w") as f:
        f.write(str(kib))
atexit.register(peak)
sys.argv = [target, *rest]
if kind == "-m":
    runpy.run_module(target, run_name="__main__", alter_sys=True)
else:
    exec(compile(target, "<string>", "exec"), {"__name__": "__main__"})
"""


def peak_rss_mib(python_args: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(peak resident memory in MiB, seconds) of `python -m MODULE ...` or `python -c CODE ...`
    (`python_args`) run in a child process; RuntimeError if it fails."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "peak"
        with open(Path(folder) / "stderr", "w+b") as err:  # a file, not a pipe: a chatty child cannot block
            code = subprocess.run([sys.executable, "-c", _WRAPPER, str(report), *python_args], env=env,
                                  stdout=subprocess.DEVNULL, stderr=err).returncode
            if code != 0:
                err.seek(0)
                tail = err.read().decode(errors="replace")[-2000:]
                raise RuntimeError(f"{' '.join(python_args[:4])} ... exited with status {code}: {tail}")
        kib = int(report.read_text())
    return kib / 1024.0, time.perf_counter() - t0


def _run(ns: list[int], indices: list[int]) -> list[dict[str, Any]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = []
    for i in indices:
        n = ns[i]
        with tempfile.TemporaryDirectory(prefix="flowkit-memory-") as folder:
            argv = ["-m", "flowkit", "generate", PROMPT, "--model", "tiny", "--steps", str(STEPS), "-n", str(n),
                    "--out", folder, "--no-progress"]
            peak, seconds = peak_rss_mib(argv, env)
            written = len(list(Path(folder).glob("*.png")))
        out.append({"index": i, "n": n, "peak_mib": peak, "seconds": seconds, "written": written})
    return out


@experiment("memory", "peak memory of `flowkit generate -n N` (tiny model, 32 px) stays flat as N grows")
def memory(bench: BenchRun) -> None:
    ns = [20, 100] if bench.quick else [50, 200, 400]
    results = bench.arm("generate", {"ns": ns, "steps": STEPS, "prompt": PROMPT, "version": 2},
                        lambda idx: _run(ns, idx), n=len(ns))
    peaks, counts = column(results, "peak_mib"), [int(r["n"]) for r in results]
    slopes = [100.0 * (peaks[k + 1] - peaks[k]) / (counts[k + 1] - counts[k]) for k in range(len(ns) - 1)]
    bench.measure("generate -n N", "peak memory ratio, largest N / smallest N", [peaks[-1] / peaks[0]],
                  Claim("at_most", target=MAX_RATIO),
                  notes=f"N = {', '.join(map(str, counts))}: {', '.join(f'{p:.0f}' for p in peaks)} MiB; "
                        "one batch of all N images (before): 1.0 GB at N = 50, 3.5 GB at N = 400")
    bench.measure("generate -n N", "peak memory growth per 100 images", slopes,
                  Claim("at_most", target=MAX_SLOPE), units="MiB",
                  notes="between consecutive N; the one-batch code grew by about 700 MiB per 100 images")
    bench.info["n"] = counts
    bench.info["peak_mib"] = [round(float(p), 1) for p in peaks]
    bench.info["seconds"] = [round(float(s), 2) for s in column(results, "seconds")]
    bench.info["images_written"] = [int(r["written"]) for r in results]
    bench.info["flat"] = bool(peaks[-1] / peaks[0] <= MAX_RATIO and float(np.mean(slopes)) <= MAX_SLOPE)
