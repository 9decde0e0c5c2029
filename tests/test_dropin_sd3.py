"""SD3 through flowkit reproduces diffusers' StableDiffusion3Pipeline (FlowMatchEulerDiscreteScheduler,
shift 3): joint CLIP + T5 tokens, pooled projections, three prompts."""

import torch

import flowkit
import tiny_pipes as tp
from flowkit.guidance import CFG
from flowkit.pipelines import FlowKitPipeline
from flowkit.samplers import Euler
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
    fk = FlowKitPipeline.from_pipe(pipe)

    def ours(wrapper=fk, **kw):
        return _call(wrapper, torch.Generator().manual_seed(3), **{**EXTRA, **kw})

    assert tp.rel_err(ours(), ref) < tp.TOL
    assert fk.stats.nfe == [2 * STEPS] * 2
    assert tp.rel_err(ours(guidance_scale=SCALE - 1), ref) > 10 * tp.TOL
    assert tp.rel_err(ours(num_inference_steps=STEPS - 1), ref) > 10 * tp.TOL
    assert tp.rel_err(ours(FlowKitPipeline.from_pipe(pipe, sampler=Euler(grid="shift:2"))), ref) > 10 * tp.TOL


def test_flowkit_sample_reproduces_the_pipeline_latents():
    pipe = tp.cached("sd3")
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


def test_user_sigmas_reach_the_scheduler():
    pipe = tp.cached("sd3")
    sigmas = [1.0, 0.8, 0.5, 0.2]
    ref = _call(pipe, torch.Generator().manual_seed(4), sigmas=sigmas)
    fk = FlowKitPipeline.from_pipe(pipe)
    assert tp.rel_err(_call(fk, torch.Generator().manual_seed(4), sigmas=sigmas), ref) < tp.TOL
    assert fk.stats.nfe == [2 * len(sigmas)] * 2
