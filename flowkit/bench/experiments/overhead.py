"""overhead: what flowkit costs over the plain diffusers pipeline, and the attention kernels.

Claims (issue 4): on the same model, steps and CFG scale, `flowkit.sample` takes at most 3%
more wall time than diffusers' `StableDiffusionPipeline.__call__` (ratio of means, paired
runs in alternating order), its per-step overhead is small, at least 97% of its wall time
is spent inside the network's forward, its peak memory is within 5% of the pipeline's (each
variant in its own subprocess), and both give the same latents (checked in the same run).
Attention kernels side by side: at a size where attention is the whole cost, PyTorch's
fused SDPA is at least twice as fast as the matmul-softmax reference on CPU.

The model is an SD-shaped pipeline with random weights built offline: a UNet2DConditionModel
sized so that one CFG forward takes well over 50 ms on one CPU thread, a 2-layer CLIP text
encoder with an in-memory character tokenizer and a 2-block VAE (never run: latents out).
The bench runs on one intra-op thread so that timings are stable on a shared machine.
Peak memory is the rise of the process's resident high-water mark (VmHWM, reset through
/proc/self/clear_refs) during one call above the resident size just before it; on CUDA,
torch's peak allocation.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import numpy as np
import torch

from flowkit.bench.core import BenchRun, column, experiment
from flowkit.bench.verdict import Claim

__all__ = ["ForwardTimer", "build_sd", "timed_call", "peak_memory", "kernel_seconds", "rel_err", "UNET"]

PROMPT = "three red circles and a blue square"
SCALE = 5.0
# SD's layout, narrower: attention at 16x16 and 8x8 (2 heads; diffusers' UNet reads attention_head_dim as
# the head count); one CFG forward (2 rows of 32x32 latents) takes ~0.13 s on one CPU thread
UNET = dict(block_out_channels=(32, 64, 128), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32, attention_head_dim=2, norm_num_groups=32)
SIZE = 96  # px; the 2-block VAE's factor 2 gives 48x48 latents (a CFG forward ~100 ms on one thread)


# -- the model ------------------------------------------------------------------------------
def _clip(max_length: int = 77):
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in sorted(ByteLevel.alphabet()):
            vocab[c + suffix] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)
    cfg = CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
                         num_attention_heads=4, num_hidden_layers=2, vocab_size=len(vocab) + 1,
                         max_position_embeddings=max_length, projection_dim=32)
    return tokenizer, CLIPTextModel(cfg).eval()


def build_sd(unet: dict | None = None, seed: int = 0):
    """An SD-shaped StableDiffusionPipeline with seeded random weights (no downloads)."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        tokenizer, text_encoder = _clip()
        vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=2).eval()
        net = UNet2DConditionModel(**(unet or UNET)).eval()
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=net,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- measuring ------------------------------------------------------------------------------
class ForwardTimer:
    """Seconds spent inside `module`'s forward (hooks; CUDA-synchronised when `sync`)."""

    def __init__(self, module: torch.nn.Module, sync: bool = False):
        self.seconds, self.calls, self._t0, self.sync = 0.0, 0, 0.0, sync
        self._hooks = [module.register_forward_pre_hook(self._start), module.register_forward_hook(self._stop)]

    def _now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _start(self, *args: Any) -> None:
        self._t0 = self._now()

    def _stop(self, *args: Any) -> None:
        self.seconds += self._now() - self._t0
        self.calls += 1

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


def timed_call(fn: Callable[[], Any], timer: ForwardTimer) -> tuple[Any, float, float]:
    """(fn(), wall seconds, seconds inside the timed forward)."""
    timer.reset()
    sync = timer.sync
    if sync:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if sync:
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0, timer.seconds


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def peak_memory(fn: Callable[[], Any], device: torch.device) -> float:
    """The rise of peak memory (MiB) during fn() above the memory in use just before it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current resident size
        f.write("5")
    before = _status_kb("VmRSS")
    fn()
    return (_status_kb("VmHWM") - before) / 1024


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| in units of the reference's standard deviation."""
    return float((ours.float() - ref.float()).abs().max() / ref.float().std())


def kernel_seconds(shape: tuple[int, int, int, int], seed: int, kernels: list[str], device: str = "cpu",
                   dtype: torch.dtype = torch.float32, repeats: int = 1) -> dict[str, float]:
    """Seconds per call of each kernel on self-attention q, k, v of `shape` [B, H, L, D]
    (best of `repeats`, after one warm-up call), and each one's max deviation from the reference."""
    from flowkit.attention import KERNELS, reference

    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(shape, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    out: dict[str, float] = {}
    ref = reference(q, k, v).float()
    for name in kernels:
        fn = KERNELS[name].fn
        got = fn(q, k, v)
        best = float("inf")
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn(q, k, v)
            if device == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        out[name] = best
        out[f"{name}_err"] = float((got.float() - ref).abs().max() / ref.abs().max())
    return out


@contextmanager
def threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# -- the two variants -------------------------------------------------------------------------
def run_variant(variant: str, pipe: Any, steps: int, seed: int) -> tuple[torch.Tensor, float | None]:
    """One image's latents through `variant` ("diffusers" or "flowkit"), seeded by `seed`, and
    flowkit's sampling-loop seconds (None for diffusers)."""
    gen = [torch.Generator().manual_seed(seed)]
    if variant == "diffusers":
        return pipe([PROMPT], num_inference_steps=steps, guidance_scale=SCALE, generator=gen, output_type="latent",
                    height=SIZE, width=SIZE).images, None
    import flowkit
    from flowkit.guidance import CFG

    out = flowkit.sample(pipe, [PROMPT], steps=steps, guidance=[CFG(scale=SCALE)], generators=gen,
                         output_type="latent", height=SIZE, width=SIZE)
    return out.images, out.stats.seconds


def _pairs(pipe: Any, timer: ForwardTimer, indices: list[int], steps: int, seed: int) -> list[dict[str, Any]]:
    out = []
    for i in indices:
        order = ("diffusers", "flowkit") if i % 2 == 0 else ("flowkit", "diffusers")  # alternate against drift
        rec: dict[str, Any] = {"index": i, "seed": seed + i, "first": order[0]}
        lat = {}
        for variant in order:
            (lat[variant], loop), wall, fwd = timed_call(lambda: run_variant(variant, pipe, steps, seed + i), timer)
            rec[f"{variant}_seconds"], rec[f"{variant}_forward_seconds"] = wall, fwd
            rec[f"{variant}_forwards"] = timer.calls
            if loop is not None:
                rec[f"{variant}_loop_seconds"] = loop
        rec["rel_err"] = rel_err(lat["flowkit"], lat["diffusers"])
        out.append(rec)
    return out


def memory_child(variant: str, steps: int, seed: int) -> None:
    """In a fresh process: build the model, run `variant` once, print its peak memory as JSON."""
    torch.set_num_threads(1)
    pipe = build_sd()
    if variant == "flowkit":  # import what a flowkit call imports, so module memory is not counted
        import flowkit.api
        from flowkit.adapters.base import adapt

        adapt(pipe)
        flowkit.api.build_sampler("euler")
        flowkit.api.build_guidance("cfg:scale=5", 5.0)
    mib = peak_memory(lambda: run_variant(variant, pipe, steps, seed), torch.device("cpu"))
    print(json.dumps({"variant": variant, "peak_mib": mib, "hwm_mib": _status_kb("VmHWM") / 1024}))


def _memory(indices: list[int], steps: int, seed: int) -> list[dict[str, Any]]:
    out = []
    for i in indices:
        rec: dict[str, Any] = {"index": i}
        for variant in ("diffusers", "flowkit") if i % 2 == 0 else ("flowkit", "diffusers"):
            code = ("from flowkit.bench.experiments.overhead import memory_child; "
                    f"memory_child({variant!r}, {steps}, {seed + i})")
            res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            line = json.loads(res.stdout.strip().splitlines()[-1])
            rec[f"{variant}_peak_mib"], rec[f"{variant}_hwm_mib"] = line["peak_mib"], line["hwm_mib"]
        out.append(rec)
    return out


def _model() -> tuple[Any, ForwardTimer]:
    pipe = build_sd()
    timer = ForwardTimer(pipe.unet)
    for variant in ("diffusers", "flowkit"):  # warm-up: first-call costs stay out of the pairs
        run_variant(variant, pipe, 1, 0)
    return pipe, timer


@experiment("overhead", "flowkit vs the plain diffusers pipeline (wall time, forward share, memory, parity); "
                        "attention kernels side by side")
def overhead(bench: BenchRun) -> None:
    steps = bench.n(full=20, quick=4)
    model: list[Any] = []

    def pairs(indices: list[int]) -> list[dict[str, Any]]:
        if not model:
            model.extend(_model())
        with threads(1):
            return _pairs(model[0], model[1], indices, steps, bench.seed)

    config = {"unet": UNET, "size": SIZE, "steps": steps, "scale": SCALE, "threads": 1, "version": 3}
    with threads(1):
        res = bench.arm("pairs", config, pairs, n=bench.n(full=48, quick=4), chunk=4)  # 16 left [1.000, 1.041]
    fk, df = column(res, "flowkit_seconds"), column(res, "diffusers_seconds")
    bench.compare("flowkit", "wall time", claim=Claim("at_most", target=1.03, stat="ratio_of_means"),
                  treatment=fk, baseline=df, baseline_name="diffusers", units="s",
                  per_sample={"seed": [r["seed"] for r in res]}, notes=f"{steps} steps, CFG {SCALE}, one CPU thread")
    fk_fwd, df_fwd = column(res, "flowkit_forward_seconds"), column(res, "diffusers_forward_seconds")
    bench.measure("flowkit", "per-step overhead", ((fk - fk_fwd) - (df - df_fwd)) / steps * 1000,
                  Claim("at_most", target=3.0), units="ms",
                  notes="time outside the UNet's forward per step, flowkit minus diffusers; 3 ms = 3% of a 100 ms step")
    bench.measure("flowkit", "forward share of wall time", 100 * fk_fwd / fk, Claim("at_least", target=97.0),
                  units="%", notes="time inside the UNet's forward / wall time of the whole flowkit.sample call")
    bench.measure("flowkit", "forward share of loop time", 100 * fk_fwd / column(res, "flowkit_loop_seconds"),
                  Claim("at_least", target=97.0), units="%",
                  notes="the same over the sampling loop only (prompt encoding and setup left out)")
    bench.measure("flowkit", "latent parity", column(res, "rel_err"), Claim("at_most", target=1e-4),
                  units="max abs diff / std", notes="flowkit.sample vs the pipeline, same seeds, same run")

    mem = bench.arm("memory", {**config, "steps": 2, "version": 2},
                    lambda idx: _memory(idx, 2, bench.seed), n=bench.n(full=6, quick=1), chunk=2)
    bench.compare("flowkit", "peak memory", claim=Claim("at_most", target=1.05, stat="ratio_of_means"),
                  treatment=column(mem, "flowkit_peak_mib"), baseline=column(mem, "diffusers_peak_mib"),
                  baseline_name="diffusers", units="MiB",
                  notes="rise of the peak resident size during one call, each variant in its own process")

    shape = (1, 8, bench.n(full=4096, quick=1024), 40)  # SD 1.x's first self-attention at 512 px (full)
    kernels = ["sdpa", "sdpa-math", "reference"]

    def kernel_rows(indices: list[int]) -> list[dict[str, Any]]:
        with threads(1):
            return [{"index": i, **kernel_seconds(shape, bench.seed + i, kernels)} for i in indices]

    kt = bench.arm("kernels", {"shape": shape, "kernels": kernels, "threads": 1, "version": 1}, kernel_rows,
                   n=bench.n(full=8, quick=3), chunk=4)
    bench.compare("reference kernel", "time", claim=Claim("at_least", target=2.0, stat="ratio_of_means",
                                                         text="reference time >= 2x fused SDPA time"),
                  treatment=column(kt, "reference"), baseline=column(kt, "sdpa"), baseline_name="fused SDPA",
                  units="s", notes=f"self-attention {list(shape)} float32, one CPU thread")
    forward_ms = 1000 * column(res, "diffusers_forward_seconds") / column(res, "diffusers_forwards")
    bench.measure("diffusers", "forward time", forward_ms, Claim("at_least", target=50.0), units="ms",
                  notes="the premise: one CFG forward of the network takes >= 50 ms")
    bench.info.update({
        "steps": steps, "threads": 1, "unet": UNET, "size_px": SIZE,
        "forward_ms": float(np.mean(forward_ms)),
        "kernel_shape": list(shape),
        "kernel_seconds": {k: float(np.mean(column(kt, k))) for k in kernels},
        "kernel_max_rel_err": {k: float(np.max(column(kt, f"{k}_err"))) for k in kernels},
        "memory_hwm_mib": {v: float(np.mean(column(mem, f"{v}_hwm_mib"))) for v in ("diffusers", "flowkit")},
    })
