"""SD 1.x/2.x through flowkit reproduce diffusers' StableDiffusionPipeline (EulerDiscreteScheduler).

Three scheduler settings: "leading" spacing (SD 1.x's config: the run starts at
init_noise_sigma = sqrt(s_max^2 + 1)), "linspace" (fractional timesteps, fed exactly as the
scheduler feeds them) and "trailing" with v-prediction (SD 2.x). Each parity check has
negative controls that must miss the same tolerance by far.
"""

import pytest
import torch

import tiny_pipes as tp
from tiny_pipes import one_thread  # noqa: F401  (autouse fixture)
from flowkit.pipelines import FlowKitPipeline

STEPS, SCALE = 4, 5.0
CASES = ["sd", "sd-linspace", "sd-v"]


def _ref(pipe, generator):
    return pipe(tp.PROMPTS, num_inference_steps=STEPS, guidance_scale=SCALE, generator=generator,
                output_type="latent", **tp.SIZE).images


@pytest.mark.parametrize("name", CASES)
def test_dropin_reproduces_the_pipeline_latents(name):
    pipe = tp.cached(name)
    ref = _ref(pipe, torch.Generator().manual_seed(3))

    def ours(wrapper, **kw):
        args = dict(num_inference_steps=STEPS, guidance_scale=SCALE, generator=torch.Generator().manual_seed(3),
                    output_type="latent", **tp.SIZE)
        args.update(kw)
        return wrapper(tp.PROMPTS, **args).images

    tp.check_dropin_parity(pipe, ref, ours, STEPS, SCALE)


@pytest.mark.parametrize("name", CASES)
def test_flowkit_sample_reproduces_the_pipeline_latents(name):
    pipe = tp.cached(name)
    tp.check_sample_parity(pipe, _ref(pipe, tp.gens()), STEPS, SCALE)


def test_callbacks_see_the_pipelines_timesteps_and_latents_and_may_change_them():
    """linspace spacing feeds fractional timesteps: the callback sees exactly the scheduler's;
    its latents are in the scheduler's (VE) frame, and a change it makes is taken up."""
    pipe = tp.cached("sd-linspace")

    def run(caller):
        seen = []

        def cb(p, i, t, tensors):
            seen.append((float(t), tensors["latents"].clone(), tensors["prompt_embeds"].shape))
            return {"latents": tensors["latents"] * 0.9} if i == 1 else {}

        out = caller(tp.PROMPTS, num_inference_steps=5, guidance_scale=SCALE, output_type="latent",
                     generator=torch.Generator().manual_seed(5), callback_on_step_end=cb,
                     callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"], **tp.SIZE).images
        return out, seen

    ref, ref_seen = run(pipe)
    out, seen = run(FlowKitPipeline.from_pipe(pipe))
    assert any(s[0] != int(s[0]) for s in ref_seen)  # 5 linspace steps: fractional indices (249.75, ...)
    assert [s[0] for s in seen] == [s[0] for s in ref_seen]  # exactly the scheduler's timesteps
    for (_, ours, _), (_, theirs, _) in zip(seen, ref_seen):
        assert tp.rel_err(ours, theirs) < tp.TOL
    assert tp.rel_err(out, ref) < tp.TOL
    assert seen[0][2][0] == 2  # per-branch embeddings (diffusers passes the CFG-concatenated batch)


def test_user_sigmas_and_guidance_rescale_follow_the_pipeline():
    pipe = tp.cached("sd")
    fk = FlowKitPipeline.from_pipe(pipe)
    kw = dict(guidance_scale=SCALE, output_type="latent", **tp.SIZE)
    sigmas = [14.0, 4.0, 1.0, 0.3, 0.0]  # VE sigmas, as EulerDiscreteScheduler.set_timesteps(sigmas=...) takes them
    ref = pipe(tp.PROMPTS, sigmas=sigmas, generator=torch.Generator().manual_seed(6), **kw).images
    ours = fk(tp.PROMPTS, sigmas=sigmas, generator=torch.Generator().manual_seed(6), **kw).images
    assert tp.rel_err(ours, ref) < tp.TOL and fk.stats.nfe == [2 * (len(sigmas) - 1)] * 2
    ref = pipe(tp.PROMPTS, num_inference_steps=STEPS, guidance_rescale=0.7, generator=torch.Generator().manual_seed(6),
               **kw).images
    ours = fk(tp.PROMPTS, num_inference_steps=STEPS, guidance_rescale=0.7, generator=torch.Generator().manual_seed(6),
              **kw).images
    assert tp.rel_err(ours, ref) < tp.TOL
    plain = fk(tp.PROMPTS, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(6), **kw).images
    assert tp.rel_err(plain, ref) > 10 * tp.TOL
