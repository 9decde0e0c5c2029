"""SDXL through flowkit reproduces diffusers' StableDiffusionXLPipeline (EulerDiscreteScheduler,
"leading" spacing): two text encoders, pooled text embeds and size/crop time ids."""

import torch

import flowkit
import tiny_pipes as tp
from flowkit.guidance import CFG
from flowkit.pipelines import FlowKitPipeline
from flowkit.samplers import Euler
from tiny_pipes import one_thread  # noqa: F401  (autouse fixture)

STEPS, SCALE = 4, 5.0
MICRO = dict(original_size=(64, 48), crops_coords_top_left=(4, 0), prompt_2=["oil painting", "sketch"])


def _call(caller, generator, **kw):
    args = dict(num_inference_steps=STEPS, guidance_scale=SCALE, generator=generator, output_type="latent", **tp.SIZE)
    args.update(kw)
    return caller(tp.PROMPTS, **args).images


def test_dropin_reproduces_the_pipeline_latents():
    pipe = tp.cached("sdxl")
    ref = _call(pipe, torch.Generator().manual_seed(3), **MICRO)
    fk = FlowKitPipeline.from_pipe(pipe)

    def ours(wrapper=fk, **kw):
        return _call(wrapper, torch.Generator().manual_seed(3), **{**MICRO, **kw})

    assert tp.rel_err(ours(), ref) < tp.TOL
    assert fk.stats.nfe == [2 * STEPS] * 2
    assert tp.rel_err(ours(guidance_scale=SCALE - 1), ref) > 10 * tp.TOL
    assert tp.rel_err(ours(num_inference_steps=STEPS - 1), ref) > 10 * tp.TOL
    assert tp.rel_err(ours(FlowKitPipeline.from_pipe(pipe, sampler=Euler(grid="shift:2"))), ref) > 10 * tp.TOL
    assert tp.rel_err(ours(original_size=(32, 32)), ref) > 10 * tp.TOL  # the time ids reach the UNet


def test_flowkit_sample_reproduces_the_pipeline_latents():
    pipe = tp.cached("sdxl")
    ref = _call(pipe, tp.gens())

    def ours(**kw):
        args = dict(steps=STEPS, guidance=[CFG(scale=SCALE)], generators=tp.gens(), output_type="latent", **tp.SIZE)
        args.update(kw)
        return flowkit.sample(pipe, tp.PROMPTS, **args)

    out = ours()
    assert tp.rel_err(out.images, ref) < tp.TOL
    assert out.stats.nfe == [2 * STEPS] * 2
    assert tp.rel_err(ours(guidance=[CFG(scale=SCALE - 1)]).images, ref) > 10 * tp.TOL
    assert tp.rel_err(ours(steps=STEPS - 1).images, ref) > 10 * tp.TOL
    assert tp.rel_err(ours(grid="shift:2").images, ref) > 10 * tp.TOL
