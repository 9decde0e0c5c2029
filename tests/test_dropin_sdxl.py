"""SDXL through flowkit reproduces diffusers' StableDiffusionXLPipeline (EulerDiscreteScheduler,
"leading" spacing): two text encoders, pooled text embeds and size/crop time ids."""

import torch

import tiny_pipes as tp
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

    def ours(wrapper, **kw):
        return _call(wrapper, torch.Generator().manual_seed(3), **{**MICRO, **kw})

    fk = tp.check_dropin_parity(pipe, ref, ours, STEPS, SCALE)
    assert tp.rel_err(ours(fk, original_size=(32, 32)), ref) > 10 * tp.TOL  # the time ids reach the UNet


def test_flowkit_sample_reproduces_the_pipeline_latents():
    pipe = tp.cached("sdxl")
    tp.check_sample_parity(pipe, _call(pipe, tp.gens()), STEPS, SCALE)
