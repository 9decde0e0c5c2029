"""compile: flowkit under torch.compile against the compiled diffusers pipeline (issue 19).

Claims: with the denoiser compiled (`torch.compile(net, fullgraph=True)`, inductor) and
both variants warmed up, `flowkit.sample` on the compiled network takes at most 3% more
wall time than the diffusers pipeline's own `__call__` on the same compiled network (ratio
of means, paired runs in rotating order, same prompt, seed, steps and CFG scale); compiled
flowkit is faster than eager flowkit (the speed-up, eager / compiled wall time); and each
variant's first call, in a fresh process with torch's compile caches off, is timed: its
compile time is the first call's wall time less a warm call's (flowkit also reports its
own `stats.compile_seconds`). Latents: compiled flowkit vs eager flowkit within 1e-4 of
their std (float32).

The model is the overhead bench's SD-shaped pipeline with random weights (one CFG forward
~0.1 s on one CPU thread); one intra-op thread, as there. scripts/bench_gpu.py has the
same rows at 1024 px in bf16 on a GPU (`mode="max-autotune"` and CUDA graphs,
`mode="reduce-overhead"`); they share `compiled_pairs` and `compile_child`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any, Callable

import numpy as np
import torch

from flowkit.bench.core import BenchRun, column, experiment
from flowkit.bench.experiments.overhead import PROMPT, SCALE, SIZE, UNET, build_sd, rel_err, threads
from flowkit.bench.verdict import Claim

__all__ = ["VARIANTS", "compiled_pairs", "compile_child", "cold_compile"]

VARIANTS = ("diffusers-compiled", "flowkit-compiled", "flowkit-eager")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def compiled_pairs(pipe: Any, attr: str, compiled: torch.nn.Module, calls: dict[str, Callable[[int], torch.Tensor]],
                   indices: list[int], device: torch.device) -> list[dict[str, Any]]:
    """One record per index: the wall time of each variant in VARIANTS (`calls[v](seed)` gives its
    latents), in an order that rotates with the index against drift; `pipe.<attr>` holds the
    compiled network for the compiled variants and the eager one for "flowkit-eager". Also each
    compiled variant's latents vs the eager flowkit ones (rel_err) and the graphs compiled during
    the record (0 once warm: no recompile)."""
    from torch._dynamo.utils import counters

    eager = getattr(pipe, attr)
    if hasattr(eager, "_orig_mod"):  # an OptimizedModule: the "eager" arm would run compiled
        raise ValueError(f"pipe.{attr} must hold the eager network; the compiled one is passed as `compiled`")
    out = []
    try:
        for i in indices:
            order = VARIANTS[i % 3:] + VARIANTS[:i % 3]
            rec: dict[str, Any] = {"index": i, "seed": i, "first": order[0]}
            graphs = int(counters["stats"]["unique_graphs"])
            lat = {}
            for v in order:
                setattr(pipe, attr, eager if v == "flowkit-eager" else compiled)
                _sync(device)
                t0 = time.perf_counter()
                lat[v] = calls[v](i)
                _sync(device)
                rec[f"{v}_seconds"] = time.perf_counter() - t0
            rec["recompiles"] = int(counters["stats"]["unique_graphs"]) - graphs
            for v in ("diffusers-compiled", "flowkit-compiled"):
                rec[f"{v}_rel_err"] = rel_err(lat[v], lat["flowkit-eager"])
            out.append(rec)
    finally:
        setattr(pipe, attr, eager)
    return out


def cold_compile(cmd: list[str]) -> dict[str, Any]:
    """Run a compile child (`cmd`) in a fresh process with torch's on-disk compile caches off;
    its last stdout line, as JSON."""
    env = {**os.environ, "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"compile child failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def compile_child(variant: str, call: Callable[[], Any], device: torch.device) -> dict[str, Any]:
    """In a fresh process: the first call's and a warm call's wall time of `call` (which runs
    `variant` on a compiled network), and their difference, the compile time."""
    times = []
    stats = None
    for _ in range(2):
        _sync(device)
        t0 = time.perf_counter()
        out = call()
        _sync(device)
        times.append(time.perf_counter() - t0)
        stats = stats or getattr(out, "stats", None)
    rec = {"variant": variant, "first_seconds": times[0], "warm_seconds": times[1],
           "compile_seconds": times[0] - times[1]}
    if stats is not None:
        rec["flowkit_compile_seconds"] = stats.compile_seconds
    return rec


# -- the CPU experiment --------------------------------------------------------------------------
def _calls(pipe: Any, steps: int) -> dict[str, Callable[[int], torch.Tensor]]:
    import flowkit
    from flowkit.guidance import CFG

    def diffusers(seed: int) -> torch.Tensor:
        return pipe([PROMPT], num_inference_steps=steps, guidance_scale=SCALE, output_type="latent",
                    generator=[torch.Generator().manual_seed(seed)], height=SIZE, width=SIZE).images

    def fk(seed: int) -> torch.Tensor:
        return flowkit.sample(pipe, [PROMPT], steps=steps, guidance=[CFG(scale=SCALE)], output_type="latent",
                              generators=[torch.Generator().manual_seed(seed)], height=SIZE, width=SIZE).latents

    return {"diffusers-compiled": diffusers, "flowkit-compiled": fk, "flowkit-eager": fk}


def child(variant: str, steps: int, backend: str) -> None:
    """`python -c` entry of the compile-time arm: one variant, cold, on one thread."""
    torch.set_num_threads(1)
    pipe = build_sd()
    pipe.unet = torch.compile(pipe.unet, fullgraph=True, backend=backend)
    if variant == "flowkit-compiled":  # the whole output, so the child reads flowkit's own stats.compile_seconds
        import flowkit
        from flowkit.guidance import CFG

        def call() -> Any:
            return flowkit.sample(pipe, [PROMPT], steps=steps, guidance=[CFG(scale=SCALE)], output_type="latent",
                                  generators=[torch.Generator().manual_seed(0)], height=SIZE, width=SIZE)
    else:
        fn = _calls(pipe, steps)[variant]

        def call() -> Any:
            return fn(0)
    print(json.dumps(compile_child(variant, call, torch.device("cpu"))))


def _compile_times(steps: int, backend: str, indices: list[int]) -> list[dict[str, Any]]:
    out = []
    for i in indices:
        rec: dict[str, Any] = {"index": i}
        for v in ("diffusers-compiled", "flowkit-compiled") if i % 2 == 0 else ("flowkit-compiled", "diffusers-compiled"):
            code = f"from flowkit.bench.experiments.compile import child; child({v!r}, {steps}, {backend!r})"
            got = cold_compile([sys.executable, "-c", code])
            rec.update({f"{v}_{k}": val for k, val in got.items() if k != "variant"})
        out.append(rec)
    return out


@experiment("compile", "flowkit on a torch.compile'd network vs the compiled diffusers pipeline (wall time, "
                       "speed-up over eager, compile time, parity)")
def compile_bench(bench: BenchRun) -> None:
    steps = bench.n(full=20, quick=3)
    backend = os.environ.get("FLOWKIT_BENCH_COMPILE_BACKEND", "inductor")  # tests: "eager"
    holder: list[Any] = []

    def pairs(indices: list[int]) -> list[dict[str, Any]]:
        with threads(1):
            if not holder:
                pipe = build_sd()
                compiled = torch.compile(pipe.unet, fullgraph=True, backend=backend)
                calls = _calls(pipe, steps)
                compiled_pairs(pipe, "unet", compiled, calls, [0, 1, 2], torch.device("cpu"))  # warm-up, every variant
                holder.extend([pipe, compiled, calls])
            pipe, compiled, calls = holder
            return compiled_pairs(pipe, "unet", compiled, calls, indices, torch.device("cpu"))

    config = {"unet": UNET, "size": SIZE, "steps": steps, "scale": SCALE, "threads": 1, "backend": backend,
              "torch": torch.__version__, "version": 1}
    res = bench.arm("pairs", config, pairs, n=bench.n(full=12, quick=3), chunk=3)
    fk, df, eager = (column(res, f"{v}_seconds") for v in ("flowkit-compiled", "diffusers-compiled", "flowkit-eager"))
    what = f"{steps} steps, CFG {SCALE}, {SIZE} px, one CPU thread, torch.compile(fullgraph=True, backend={backend!r})"
    bench.compare("flowkit compiled", "wall time", claim=Claim("at_most", target=1.03, stat="ratio_of_means"),
                  treatment=fk, baseline=df, baseline_name="diffusers compiled", units="s",
                  per_sample={"seed": [r["seed"] for r in res]}, notes=what)
    bench.compare("flowkit eager", "wall time (speed-up of compiling)",
                  claim=Claim("at_least", target=1.0, stat="ratio_of_means",
                              text="eager / compiled wall time >= 1"),
                  treatment=eager, baseline=fk, baseline_name="flowkit compiled", units="s", notes=what)
    bench.measure("flowkit compiled", "recompiles after warm-up", column(res, "recompiles"),
                  Claim("at_most", target=0.0), units="graphs", notes="graphs compiled during the paired runs")
    bench.measure("flowkit compiled", "latent parity", column(res, "flowkit-compiled_rel_err"),
                  Claim("at_most", target=1e-4), units="max abs diff / std", notes="vs eager flowkit, same seed")

    cold = bench.arm("compile-time", {**config, "steps": 2, "version": 2},
                     lambda idx: _compile_times(2, backend, idx), n=bench.n(full=2, quick=1), chunk=1)
    for v in ("flowkit-compiled", "diffusers-compiled"):
        bench.measure(v.replace("-", " "), "first-call compile time", column(cold, f"{v}_compile_seconds"),
                      Claim("at_most", target=600.0), units="s",
                      notes="fresh process, compile caches off: first call less a warm call (2 steps)")
    bench.info.update({
        "steps": steps, "threads": 1, "backend": backend, "size_px": SIZE,
        "speedup_eager_over_compiled": float(np.mean(eager) / np.mean(fk)),
        "flowkit_over_diffusers_compiled": float(np.mean(fk) / np.mean(df)),
        "flowkit_stats_compile_seconds": float(np.mean(column(cold, "flowkit-compiled_flowkit_compile_seconds"))),
    })
