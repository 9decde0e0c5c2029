"""sampler='pipeline': the wrapped pipeline's own scheduler.step with flowkit guidance reproduces
the pipeline with that scheduler (DPM-Solver++, PNDM's warm-up, flow-matching Euler)."""

import pytest
import torch

import flowkit
import tiny_pipes as tp
from analytic import context
from flowkit.errors import InputError, UnsupportedError
from flowkit.pipelines import FlowKitPipeline
from flowkit.samplers import PipelineSampler
from tiny_pipes import one_thread  # noqa: F401  (autouse fixture)

STEPS, SCALE = 4, 5.0


def _with_scheduler(name, cls_name, **config):
    import diffusers

    pipe = tp.build(name)
    cls = getattr(diffusers, cls_name)
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **config)
    return pipe


def _call(caller, **kw):
    args = dict(num_inference_steps=STEPS, guidance_scale=SCALE, generator=torch.Generator().manual_seed(3),
                output_type="latent", **tp.SIZE)
    args.update(kw)
    return caller(tp.PROMPTS, **args).images


@pytest.mark.parametrize("cls_name, config, evaluations", [
    ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}, STEPS),
    ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, STEPS),
    ("PNDMScheduler", {"skip_prk_steps": True}, STEPS + 1),  # PNDM repeats one timestep
])
def test_pipeline_sampler_reproduces_the_pipeline_with_its_scheduler(cls_name, config, evaluations):
    pipe = _with_scheduler("sd", cls_name, **config)
    ref = _call(pipe)
    fk = FlowKitPipeline.from_pipe(pipe, sampler="pipeline")
    assert tp.rel_err(_call(fk), ref) < tp.TOL
    assert fk.stats.nfe == [2 * evaluations] * 2
    assert tp.rel_err(_call(fk, guidance_scale=SCALE - 1), ref) > 10 * tp.TOL
    assert tp.rel_err(_call(fk, num_inference_steps=STEPS - 1), ref) > 10 * tp.TOL


def test_euler_on_a_dpm_grid_runs_and_a_pndm_grid_is_refused():
    fk = FlowKitPipeline.from_pipe(_with_scheduler("sd", "DPMSolverMultistepScheduler"))
    out = _call(fk)
    assert torch.isfinite(out).all() and fk.stats.nfe == [2 * STEPS] * 2
    fk = FlowKitPipeline.from_pipe(_with_scheduler("sd", "PNDMScheduler", skip_prk_steps=True))
    with pytest.raises(InputError, match="sampler='pipeline'"):
        _call(fk)


def test_pipeline_sampler_on_flow_matching_pipelines():
    pipe = tp.cached("flux")
    kw = dict(true_cfg_scale=4.0, negative_prompt="blurry", max_sequence_length=32, guidance_scale=3.5)
    ref = _call(pipe, **kw)
    fk = FlowKitPipeline.from_pipe(pipe, sampler="pipeline")
    assert tp.rel_err(_call(fk, **kw), ref) < tp.TOL
    out = flowkit.sample(tp.cached("sd3"), tp.PROMPTS, sampler="pipeline", steps=STEPS, guidance=f"cfg:scale={SCALE}",
                         generators=tp.gens(), output_type="latent", **tp.SIZE)
    ref = tp.cached("sd3")(tp.PROMPTS, num_inference_steps=STEPS, guidance_scale=SCALE, generator=tp.gens(),
                           output_type="latent", **tp.SIZE).images
    assert tp.rel_err(out.images, ref) < tp.TOL


def test_pipeline_sampler_is_refused_without_a_scheduler():
    ctx = context(2, 3)
    assert "has none" in PipelineSampler().refuse(ctx)
    with pytest.raises(UnsupportedError, match="drop the flowkit grid"):
        flowkit.sample(tp.cached("sd"), "a red cat", sampler="pipeline", grid="shift:2", steps=2,
                       output_type="latent")
