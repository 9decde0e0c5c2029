#!/usr/bin/env python
"""Full-size GPU bench of flowkit's overhead and attention kernels (issue 4), random weights.

For an SDXL UNet and SD3-medium- and FLUX.1-shaped transformers built on the GPU in bf16 at
1024x1024 (text encoders left out: the pipelines get random prompt embeddings), it runs
the same comparisons as `flowkit bench overhead` on CPU: FlowKitPipeline against the plain
diffusers pipeline with the same embeddings, generator, steps and guidance, latents out, in
paired runs of alternating order (wall-time ratio, per-step overhead, the share of wall
time inside the network's forward, latent parity), peak GPU memory of each variant in its
own process, and the attention kernels side by side (each kernel alone at the model's
joint-attention size, and the whole network's forward under each kernel). xformers is
measured when it imports with CUDA, else recorded as not measurable. With flux among the
models it also times bottleneck sampling (issue 7; preset `flux`, 1024 -> 512 -> 1024 px)
against full-resolution Euler with the same steps, in paired runs of alternating order:
the speed-up alone (random weights say nothing of quality). Under torch.compile (issue 19)
it times, per model and per compile mode (`max-autotune`; `reduce-overhead`, CUDA graphs),
compiled flowkit against the compiled diffusers pipeline and against eager flowkit on the
same compiled network (`flowkit.bench.experiments.compile.compiled_pairs`, rotating order),
with each variant's first-call compile time (the first call less a warm one) and the graphs
compiled after warm-up (0: no recompile). The dry run uses dynamo's eager backend.

    python scripts/bench_gpu.py                       # all three models, writes docs/results/gpu.json
    python scripts/bench_gpu.py --models sd3 --pairs 3 --docs docs/benchmarks.md
    python scripts/bench_gpu.py --dry-run --out /tmp/x   # tiny configs on CPU, float32: the code path only
    python scripts/bench_gpu.py --models sdxl --compile-pairs 5 --pairs 1 --memory-runs 0
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

import numpy as np
import torch

from flowkit.attention import KERNELS, unavailable, use_kernel
from flowkit.bench.cache import ResultCache, write_json_atomic
from flowkit.bench.core import BenchResult, BenchRun, column, result_path
from flowkit.bench.experiments.overhead import ForwardTimer, kernel_seconds, peak_memory, rel_err, timed_call
from flowkit.bench.report import format_result, update_benchmarks
from flowkit.bench.verdict import Claim

MODELS = ("sdxl", "sd3", "flux")
DESCRIPTION = "flowkit vs diffusers and attention kernels at full size on a GPU (scripts/bench_gpu.py)"
SCALE = {"sdxl": 5.0, "sd3": 7.0, "flux": 3.5}  # FLUX: the distilled-guidance embedding, one forward per step

# full-size configs (the released models' shapes) and tiny ones for --dry-run
FULL = {
    "sdxl": dict(sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280), layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816),
    "sd3": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192),
    "flux": dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                 num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                 axes_dims_rope=(16, 56, 56)),
}
TINY = {
    "sdxl": dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 1),
                 attention_head_dim=(2, 4), cross_attention_dim=64, use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
                 norm_num_groups=2),
    "sd3": dict(sample_size=16, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
                caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4),
    "flux": dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                 axes_dims_rope=(4, 4, 8)),
}
# text tokens (CLIP 77, + T5 256 for SD3, T5 512 for FLUX) and pooled width, per model
TEXT = {"sdxl": (77, 1280), "sd3": (333, 2048), "flux": (512, 768)}
TEXT_TINY = {"sdxl": (16, 32), "sd3": (16, 64), "flux": (16, 32)}


class Setup:
    """Where and how big: device, dtype, image size, the configs."""

    def __init__(self, dry_run: bool):
        self.dry = dry_run
        self.device = torch.device("cpu" if dry_run else "cuda")
        self.dtype = torch.float32 if dry_run else torch.bfloat16
        self.size = 32 if dry_run else 1024
        self.configs = TINY if dry_run else FULL
        self.text = TEXT_TINY if dry_run else TEXT


def build(name: str, s: Setup) -> Any:
    """The pipeline of `name` with random weights made on the device (no text encoders)."""
    import diffusers as D

    blocks = 2 if s.dry else 4  # the VAE is never run (latents out); 4 blocks give SD's factor 8
    vae_kw = dict(block_out_channels=(8,) * blocks, down_block_types=("DownEncoderBlock2D",) * blocks,
                  up_block_types=("UpDecoderBlock2D",) * blocks, norm_num_groups=2,
                  latent_channels=4 if name == "sdxl" else 16 if not s.dry else 4)
    torch.manual_seed(0)
    with s.device:
        vae = D.AutoencoderKL(**vae_kw)
        if name == "sdxl":
            net = D.UNet2DConditionModel(**s.configs[name])
        elif name == "sd3":
            net = D.SD3Transformer2DModel(**s.configs[name])
        else:
            net = D.FluxTransformer2DModel(**s.configs[name])
    vae, net = vae.to(s.dtype).eval(), net.to(s.dtype).eval()
    if name == "sdxl":
        sch = D.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
        pipe = D.StableDiffusionXLPipeline(vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                           tokenizer_2=None, unet=net, scheduler=sch, add_watermarker=False)
    elif name == "sd3":
        pipe = D.StableDiffusion3Pipeline(transformer=net, scheduler=D.FlowMatchEulerDiscreteScheduler(shift=3.0),
                                          vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                          tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    else:
        sch = D.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
        pipe = D.FluxPipeline(scheduler=sch, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                              tokenizer_2=None, transformer=net)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call_kwargs(name: str, s: Setup, seed: int = 0) -> dict[str, Any]:
    """Random prompt embeddings (and negatives for CFG) of the model's text shapes, batch 1."""
    g = torch.Generator().manual_seed(seed)
    tokens, pooled = s.text[name]
    width = {"sdxl": s.configs["sdxl"]["cross_attention_dim"], "sd3": s.configs["sd3"]["joint_attention_dim"],
             "flux": s.configs["flux"]["joint_attention_dim"]}[name]

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device=s.device, dtype=s.dtype)

    kw = dict(prompt_embeds=r(1, tokens, width), pooled_prompt_embeds=r(1, pooled), height=s.size, width=s.size,
              guidance_scale=SCALE[name], output_type="latent")
    if name != "flux":  # CFG on a negative branch
        kw.update(negative_prompt_embeds=r(1, tokens, width), negative_pooled_prompt_embeds=r(1, pooled))
    return kw


def network(pipe: Any) -> torch.nn.Module:
    return getattr(pipe, "unet", None) or pipe.transformer


def run_variant(variant: str, pipe: Any, kw: dict, steps: int, seed: int, s: Setup) -> tuple[torch.Tensor, float | None]:
    """Latents of one call through `variant`, and flowkit's sampling-loop seconds (None for diffusers)."""
    from flowkit.pipelines import FlowKitPipeline

    gen = torch.Generator(s.device).manual_seed(seed)
    if variant == "diffusers":
        return pipe(**kw, num_inference_steps=steps, generator=gen).images, None
    fk = FlowKitPipeline.from_pipe(pipe)
    return fk(**kw, num_inference_steps=steps, generator=gen).images, fk.stats.seconds


def pairs(name: str, pipe: Any, s: Setup, steps: int, indices: list[int]) -> list[dict[str, Any]]:
    kw = call_kwargs(name, s)
    timer = ForwardTimer(network(pipe), sync=s.device.type == "cuda")
    out = []
    for i in indices:
        order = ("diffusers", "flowkit") if i % 2 == 0 else ("flowkit", "diffusers")
        rec: dict[str, Any] = {"index": i, "seed": i}
        lat = {}
        for v in order:
            (lat[v], loop), wall, fwd = timed_call(lambda: run_variant(v, pipe, kw, steps, i, s), timer)
            rec.update({f"{v}_seconds": wall, f"{v}_forward_seconds": fwd, f"{v}_forwards": timer.calls})
            if loop is not None:
                rec[f"{v}_loop_seconds"] = loop
        rec["rel_err"] = rel_err(lat["flowkit"], lat["diffusers"])
        out.append(rec)
    timer.remove()
    return out


def forward_per_kernel(name: str, pipe: Any, s: Setup, repeats: int) -> dict[str, float]:
    """Seconds of one whole network forward (through the diffusers call, 1 step) under each kernel."""
    from flowkit.pipelines import FlowKitPipeline

    kw = call_kwargs(name, s)
    timer = ForwardTimer(network(pipe), sync=s.device.type == "cuda")
    fk = FlowKitPipeline.from_pipe(pipe)
    out = {}
    for k in KERNELS:
        if unavailable(k, s.device):
            continue
        times = []
        try:
            with use_kernel(k):
                for _ in range(repeats + 1):  # the first is a warm-up
                    timed_call(lambda: fk(**kw, num_inference_steps=1, generator=torch.Generator(s.device)), timer)
                    times.append(timer.seconds / max(timer.calls, 1))
        except ValueError as e:  # a backend that cannot run these shapes
            out[f"{k}_error"] = str(e)[:200]
            continue
        out[k] = float(min(times[1:]))
    timer.remove()
    return out


def memory_child(name: str, variant: str, steps: int, dry_run: bool) -> None:
    """In a fresh process: build, run `variant` once, print the peak memory rise (MiB) as JSON."""
    s = Setup(dry_run)
    pipe = build(name, s)
    kw = call_kwargs(name, s)
    if variant == "flowkit":  # import what a flowkit call imports, so module memory is not counted
        from flowkit.pipelines import FlowKitPipeline

        FlowKitPipeline.from_pipe(pipe)
    mib = peak_memory(lambda: run_variant(variant, pipe, kw, steps, 0, s), s.device)
    print(json.dumps({"model": name, "variant": variant, "peak_mib": mib}))


def memory(name: str, steps: int, dry_run: bool, indices: list[int]) -> list[dict[str, Any]]:
    out = []
    for i in indices:
        rec: dict[str, Any] = {"index": i}
        for v in ("diffusers", "flowkit") if i % 2 == 0 else ("flowkit", "diffusers"):
            cmd = [sys.executable, __file__, "--child", name, v, "--steps", str(steps)] + (["--dry-run"] if dry_run else [])
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"memory child {name}/{v} failed:\n{res.stderr[-2000:]}")
            rec[f"{v}_peak_mib"] = json.loads(res.stdout.strip().splitlines()[-1])["peak_mib"]
        out.append(rec)
    return out


def bench_model(bench: BenchRun, name: str, s: Setup, steps: int, n_pairs: int, n_mem: int) -> None:
    holder: list[Any] = []

    def pipe() -> Any:
        if not holder:
            holder.append(build(name, s))
            kw = call_kwargs(name, s)
            for v in ("diffusers", "flowkit"):  # warm-up
                run_variant(v, holder[0], kw, 1, 0, s)
        return holder[0]

    base = {"model": name, "config": s.configs[name], "size": s.size, "dtype": str(s.dtype), "steps": steps,
            "device": torch.cuda.get_device_name() if s.device.type == "cuda" else "cpu", "version": 1}
    res = bench.arm(f"{name}-pairs", base, lambda idx: pairs(name, pipe(), s, steps, idx), n=n_pairs, chunk=n_pairs)
    fk, df = column(res, "flowkit_seconds"), column(res, "diffusers_seconds")
    fk_fwd, df_fwd = column(res, "flowkit_forward_seconds"), column(res, "diffusers_forward_seconds")
    what = f"{name} {s.size}px {str(s.dtype).replace('torch.', '')}, {steps} steps"
    bench.compare(name, "wall time", claim=Claim("at_most", target=1.03, stat="ratio_of_means"), treatment=fk,
                  baseline=df, baseline_name="diffusers", units="s", notes=what)
    bench.measure(name, "per-step overhead", ((fk - fk_fwd) - (df - df_fwd)) / steps * 1000,
                  Claim("at_most", target=3.0), units="ms", notes="outside the network's forward, flowkit - diffusers")
    bench.measure(name, "forward share of wall time", 100 * fk_fwd / fk, Claim("at_least", target=97.0), units="%")
    bench.measure(name, "latent parity", column(res, "rel_err"), Claim("at_most", target=1e-4 if s.dry else 2e-2),
                  units="max abs diff / std", notes="bf16 network, float32 flowkit state" if not s.dry else "")
    kernels = bench.arm(f"{name}-forward-kernels", {**base, "repeats": 2},
                        lambda idx: [{"index": i, **forward_per_kernel(name, pipe(), s, 2)} for i in idx], n=1)
    bench.info[f"{name}_forward_seconds_by_kernel"] = {k: v for k, v in kernels[0].items() if k != "index"}
    holder.clear()
    gc.collect()
    if s.device.type == "cuda":
        torch.cuda.empty_cache()
    if n_mem < 1:
        return
    mem = bench.arm(f"{name}-memory", {**base, "steps": 2}, lambda idx: memory(name, 2, s.dry, idx), n=n_mem)
    bench.compare(name, "peak memory", claim=Claim("at_most", target=1.05, stat="ratio_of_means"),
                  treatment=column(mem, "flowkit_peak_mib"), baseline=column(mem, "diffusers_peak_mib"),
                  baseline_name="diffusers", units="MiB", notes="peak rise during one call, each variant in its own process")


def bottleneck_pairs(pipe: Any, s: Setup, steps: int, indices: list[int]) -> list[dict[str, Any]]:
    """Seconds of one FLUX call with full-resolution Euler and with bottleneck sampling, and
    the forwards' token counts of the bottleneck call, per pair (alternating order)."""
    from flowkit.pipelines import FlowKitPipeline

    kw = call_kwargs("flux", s)
    timer = ForwardTimer(network(pipe), sync=s.device.type == "cuda")
    variants = {"full": FlowKitPipeline.from_pipe(pipe, sampler="euler"),
                "bottleneck": FlowKitPipeline.from_pipe(pipe, sampler="bottleneck:preset=flux")}
    out = []
    for i in indices:
        rec: dict[str, Any] = {"index": i, "seed": i}
        for v in (("full", "bottleneck") if i % 2 == 0 else ("bottleneck", "full")):
            gen = torch.Generator(s.device).manual_seed(i)
            _, wall, fwd = timed_call(lambda: variants[v](**kw, num_inference_steps=steps, generator=gen), timer)
            rec.update({f"{v}_seconds": wall, f"{v}_forward_seconds": fwd, f"{v}_nfe": variants[v].stats.nfe[0]})
        out.append(rec)
    timer.remove()
    return out


def bench_bottleneck(bench: BenchRun, s: Setup, steps: int, n: int) -> None:
    steps = max(steps, 3)  # the flux preset's three stages need a step each
    pipe = build("flux", s)
    kw = call_kwargs("flux", s)
    from flowkit.pipelines import FlowKitPipeline

    for sampler in ("euler", "bottleneck:preset=flux"):  # warm-up of both resolutions
        FlowKitPipeline.from_pipe(pipe, sampler=sampler)(**kw, num_inference_steps=steps, generator=None)
    base = {"model": "flux", "config": s.configs["flux"], "size": s.size, "dtype": str(s.dtype), "steps": steps,
            "device": torch.cuda.get_device_name() if s.device.type == "cuda" else "cpu", "version": 1}
    res = bench.arm("flux-bottleneck", base, lambda idx: bottleneck_pairs(pipe, s, steps, idx), n=n, chunk=n)
    full, low = column(res, "full_seconds"), column(res, "bottleneck_seconds")
    bench.measure("bottleneck (flux preset)", "speed-up over full resolution", full / low,
                  Claim("at_least", target=1.5), units="x",
                  notes=f"FLUX-shaped random transformer, {s.size}px, {steps} steps; the paper reports up to 3x")
    bench.info["bottleneck_nfe"] = {"full": int(res[0]["full_nfe"]), "bottleneck": int(res[0]["bottleneck_nfe"])}
    del pipe
    gc.collect()
    if s.device.type == "cuda":
        torch.cuda.empty_cache()


COMPILE_MODES = ("max-autotune", "reduce-overhead")


def compile_calls(name: str, pipe: Any, s: Setup, steps: int) -> dict[str, Any]:
    """The three variants of `compiled_pairs`, each giving latents for a seed."""
    from flowkit.pipelines import FlowKitPipeline

    kw = call_kwargs(name, s)

    def diffusers(seed: int) -> torch.Tensor:
        return pipe(**kw, num_inference_steps=steps, generator=torch.Generator(s.device).manual_seed(seed)).images

    def fk(seed: int) -> torch.Tensor:
        return FlowKitPipeline.from_pipe(pipe)(**kw, num_inference_steps=steps,
                                               generator=torch.Generator(s.device).manual_seed(seed)).images

    return {"diffusers-compiled": diffusers, "flowkit-compiled": fk, "flowkit-eager": fk}


def bench_compile(bench: BenchRun, name: str, s: Setup, steps: int, n: int) -> None:
    """Compiled flowkit vs the compiled diffusers pipeline, and vs eager flowkit, per compile mode."""
    from flowkit.bench.experiments.compile import compiled_pairs

    attr = "unet" if name == "sdxl" else "transformer"
    for mode in COMPILE_MODES:
        holder: list[Any] = []

        def rows(idx: list[int], mode: str = mode) -> list[dict[str, Any]]:
            if not holder:
                pipe = build(name, s)
                opts = {"backend": "eager"} if s.dry else {"mode": mode}
                compiled = torch.compile(getattr(pipe, attr), fullgraph=True, **opts)
                calls = compile_calls(name, pipe, s, steps)
                first: dict[str, float] = {}
                for v in ("diffusers-compiled", "flowkit-compiled"):  # first call compiles, the second is warm
                    setattr(pipe, attr, compiled)
                    times = []
                    for _ in range(2):
                        if s.device.type == "cuda":
                            torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        calls[v](0)
                        if s.device.type == "cuda":
                            torch.cuda.synchronize()
                        times.append(time.perf_counter() - t0)
                    first[f"{v}_compile_seconds"] = times[0] - times[1]
                setattr(pipe, attr, compiled._orig_mod)  # compiled_pairs refuses a compiled "eager" network
                holder.extend([pipe, compiled, calls, first])
            pipe, compiled, calls, first = holder
            out = compiled_pairs(pipe, attr, compiled, calls, idx, s.device)
            return [{**r, **first} for r in out]

        base = {"model": name, "config": s.configs[name], "size": s.size, "dtype": str(s.dtype), "steps": steps,
                "mode": mode, "dry": s.dry, "device": torch.cuda.get_device_name() if s.device.type == "cuda" else "cpu",
                "version": 1}
        res = bench.arm(f"{name}-compile-{mode}", base, rows, n=n, chunk=n)
        what = f"{name} {s.size}px {str(s.dtype).replace('torch.', '')}, {steps} steps, torch.compile mode={mode}"
        fk, df, eager = (column(res, f"{v}_seconds") for v in ("flowkit-compiled", "diffusers-compiled", "flowkit-eager"))
        label = f"{name} compiled ({mode})"
        bench.compare(label, "wall time", claim=Claim("at_most", target=1.03, stat="ratio_of_means"), treatment=fk,
                      baseline=df, baseline_name="diffusers compiled", units="s", notes=what)
        bench.compare(f"{name} eager", f"wall time (speed-up of {mode})",
                      claim=Claim("at_least", target=1.0, stat="ratio_of_means", text="eager / compiled wall time >= 1"),
                      treatment=eager, baseline=fk, baseline_name=label, units="s", notes=what)
        bench.measure(label, "recompiles after warm-up", column(res, "recompiles"), Claim("at_most", target=0.0),
                      units="graphs")
        bench.measure(label, "latent parity", column(res, "flowkit-compiled_rel_err"),
                      Claim("at_most", target=1e-4 if s.dry else 2e-2), units="max abs diff / std",
                      notes="vs eager flowkit, same seed")
        bench.info[f"{name}_compile_seconds_{mode}"] = {
            v: float(res[0][f"{v}_compile_seconds"]) for v in ("diffusers-compiled", "flowkit-compiled")}
        holder.clear()
        gc.collect()
        if s.device.type == "cuda":
            torch.cuda.empty_cache()


def bench_kernels(bench: BenchRun, s: Setup, n: int) -> None:
    names = [k for k in KERNELS if not unavailable(k, s.device)]
    bench.info["kernels_not_measurable"] = {k: unavailable(k, s.device) for k in KERNELS if unavailable(k, s.device)}
    for model, shape in (("sd3", (1, 24, 4429, 64)), ("flux", (1, 24, 4608, 128))):
        if s.dry:
            shape = (1, 2, 80, 16)

        def rows(idx: list[int], shape=shape) -> list[dict[str, Any]]:
            out = []
            for i in idx:
                rec: dict[str, Any] = {"index": i}
                for k in names:
                    try:
                        rec.update(kernel_seconds(shape, i, [k], s.device.type, s.dtype, repeats=3))
                    except ValueError as e:  # a backend that cannot run this shape/dtype
                        rec[f"{k}_error"] = str(e)[:200]
                out.append(rec)
            return out

        kt = bench.arm(f"kernels-{model}", {"shape": shape, "dtype": str(s.dtype), "kernels": names, "version": 1},
                       rows, n=n)
        bench.compare("reference kernel", f"time at {model}'s attention size", treatment=column(kt, "reference"),
                      baseline=column(kt, "sdpa"), baseline_name="fused SDPA",
                      claim=Claim("at_least", target=2.0, stat="ratio_of_means",
                                  text="reference time >= 2x fused SDPA time"),
                      units="s", notes=f"q, k, v {list(shape)} {str(s.dtype).replace('torch.', '')}")
        bench.info[f"kernel_seconds_{model}"] = {k: float(np.mean([r[k] for r in kt if k in r])) for k in names
                                                 if any(k in r for r in kt)}
        bench.info[f"kernel_errors_{model}"] = {k: kt[0][f"{k}_error"] for k in names if f"{k}_error" in kt[0]}


OPTIONS: dict[str, Any] = {}  # main's choices, read by the experiment


def gpu(bench: BenchRun) -> None:
    """The experiment: every chosen model, then the kernels alone (bench.quick = the dry run)."""
    o = OPTIONS
    s = Setup(bench.quick)
    for name in o["models"]:
        bench_model(bench, name, s, o["steps"], o["pairs"], o["memory_runs"])
    for name in o["models"] if o["compile_pairs"] > 0 else ():
        bench_compile(bench, name, s, o["steps"], o["compile_pairs"])
    if "flux" in o["models"] and o["bottleneck_pairs"] > 0:
        bench_bottleneck(bench, s, o["steps"], o["bottleneck_pairs"])
    bench_kernels(bench, s, o["kernel_samples"])
    bench.info.update({"device": torch.cuda.get_device_name() if s.device.type == "cuda" else "cpu (dry run)",
                       "size_px": s.size, "dtype": str(s.dtype), "steps": o["steps"], "models": o["models"]})


def run(quick: bool, out_dir: str, cache_root: str | None) -> BenchResult:
    """Run `gpu` as the bench framework runs an experiment (not through the registry, so that no
    other experiment module is imported) and write its JSON."""
    bench = BenchRun("gpu", quick=quick, cache=ResultCache(cache_root))
    t0 = time.perf_counter()
    gpu(bench)
    versions = {"python": platform.python_version()}
    for dist in ("flowkit", "torch", "diffusers", "numpy", "xformers"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    result = BenchResult(name="gpu", description=DESCRIPTION, quick=quick, seed=bench.seed, rows=bench.rows,
                         info=bench.info, samples=bench.samples, versions=versions,
                         date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                         seconds=round(time.perf_counter() - t0, 3))
    result.path = result_path(out_dir, "gpu", quick)
    write_json_atomic(result.path, result.to_dict(), indent=1)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated: sdxl, sd3, flux")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 20; dry run 2)")
    p.add_argument("--pairs", type=int, default=None, help="paired runs per model (default 5; dry run 1)")
    p.add_argument("--memory-runs", type=int, default=1, help="subprocess pairs for peak memory per model (0: skip)")
    p.add_argument("--bottleneck-pairs", type=int, default=None,
                   help="paired FLUX runs, Euler vs bottleneck sampling (default 3; dry run 1; 0: skip)")
    p.add_argument("--compile-pairs", type=int, default=None,
                   help="paired runs per model and torch.compile mode (default 3; dry run 1; 0: skip)")
    p.add_argument("--kernel-samples", type=int, default=None, help="kernel timing samples (default 5; dry run 1)")
    p.add_argument("--out", default="docs/results", help="folder for gpu.json (dry run: gpu.quick.json)")
    p.add_argument("--cache", default=None, help="bench cache root (default $FLOWKIT_CACHE/bench)")
    p.add_argument("--docs", default=None, help="also regenerate this file's gpu section (docs/benchmarks.md)")
    p.add_argument("--dry-run", action="store_true", help="tiny configs on CPU in float32, to check the script")
    p.add_argument("--child", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    bad = [m for m in models if m not in MODELS]
    if bad or not models:
        p.error(f"unknown model(s) {', '.join(bad)}; choose from {', '.join(MODELS)}")
    steps = a.steps or (2 if a.dry_run else 20)
    if a.child:
        memory_child(a.child[0], a.child[1], steps, a.dry_run)
        return 0
    if not a.dry_run and not torch.cuda.is_available():
        p.error("no CUDA device: run with --dry-run to check the script on CPU")
    OPTIONS.update(models=models, steps=steps, pairs=a.pairs or (1 if a.dry_run else 5), memory_runs=a.memory_runs,
                   bottleneck_pairs=(1 if a.dry_run else 3) if a.bottleneck_pairs is None else a.bottleneck_pairs,
                   kernel_samples=a.kernel_samples or (1 if a.dry_run else 5),
                   compile_pairs=(1 if a.dry_run else 3) if a.compile_pairs is None else a.compile_pairs)
    result = run(quick=a.dry_run, out_dir=a.out, cache_root=a.cache)
    print(format_result(result))
    print(f"\nwrote {result.path}")
    if a.docs:
        update_benchmarks(a.out, a.docs, names=["gpu"])
        print(f"updated {a.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
