"""SD3 through flowkit reproduces diffusers' StableDiffusion3Pipeline (FlowMatchEulerDiscreteScheduler,
shift 3): joint CLIP + T5 tokens, pooled projections, three prompts."""

import torch

import tiny_pipes as tp
from flowkit.pipelines import FlowKitPipeline
from tiny_pipes import one_thread  # noqa: F401  (autouse fixture)

STEPS, SCALE = 4, 5.0
EXTRA = dict(prompt_3=["a photo", "a drawing"], max_sequence_length=32)


def _call(caller, generator, **kw):
    args = dict(num_inference_steps=STEPS, guidance_scale=SCALE, generator=generator, output_type="latent", **tp.SIZE)
    args.update(kw)
    return caller(tp.PROMPTS, **args).images


def test_dropin_reproduces_the_pipeline_latents():
    pipe = tp.cached("sd3")
    ref = _call(pipe, torch.Generator().manual_seed(3), **EXTRA)

    def ours(wrapper, **kw):
        return _call(wrapper, torch.Generator().manual_seed(3), **{**EXTRA, **kw})

    tp.check_dropin_parity(pipe, ref, ours, STEPS, SCALE)


def test_flowkit_sample_reproduces_the_pipeline_latents():
    pipe = tp.cached("sd3")
    tp.check_sample_parity(pipe, _call(pipe, tp.gens()), STEPS, SCALE)


def test_user_sigmas_reach_the_scheduler():
    pipe = tp.cached("sd3")
    sigmas = [1.0, 0.8, 0.5, 0.2]
    ref = _call(pipe, torch.Generator().manual_seed(4), sigmas=sigmas)
    fk = FlowKitPipeline.from_pipe(pipe)
    assert tp.rel_err(_call(fk, torch.Generator().manual_seed(4), sigmas=sigmas), ref) < tp.TOL
    assert fk.stats.nfe == [2 * len(sigmas)] * 2
