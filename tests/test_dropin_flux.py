"""FLUX through flowkit reproduces diffusers' FluxPipeline (dynamically shifted flow-matching Euler):
packed latents, image/text ids, true CFG on a negative prompt, and the distilled-guidance
embedding of guidance_embeds=True models."""

import pytest
import torch

import flowkit
import tiny_pipes as tp
from flowkit.adapters.flux import FluxAdapter
from flowkit.errors import InputError
from flowkit.guidance import CFG
from flowkit.pipelines import FlowKitPipeline
from flowkit.samplers import Euler
from tiny_pipes import one_thread  # noqa: F401  (autouse fixture)

STEPS = 4
TRUE_CFG = dict(true_cfg_scale=4.0, negative_prompt="blurry", max_sequence_length=32)


def _call(caller, generator, **kw):
    args = dict(num_inference_steps=STEPS, generator=generator, output_type="latent", **tp.SIZE)
    args.update(kw)
    return caller(tp.PROMPTS, **args).images


def test_true_cfg_through_the_dropin():
    pipe = tp.cached("flux")
    ref = _call(pipe, torch.Generator().manual_seed(3), **TRUE_CFG)
    assert ref.shape == (2, 64, 16)  # packed: (32/4)^2 tokens of 4 x 4 channels
    fk = FlowKitPipeline.from_pipe(pipe)

    def ours(wrapper=fk, **kw):
        return _call(wrapper, torch.Generator().manual_seed(3), **{**TRUE_CFG, **kw})

    assert tp.rel_err(ours(), ref) < tp.TOL
    assert fk.stats.nfe == [2 * STEPS] * 2
    assert tp.rel_err(ours(true_cfg_scale=3.0), ref) > 10 * tp.TOL
    assert tp.rel_err(ours(num_inference_steps=STEPS - 1), ref) > 10 * tp.TOL
    assert tp.rel_err(ours(FlowKitPipeline.from_pipe(pipe, sampler=Euler(grid="shift:2"))), ref) > 10 * tp.TOL
    # without a negative prompt the pipeline (and so the wrapper) runs no CFG at all
    _call(fk, torch.Generator().manual_seed(3), true_cfg_scale=4.0, max_sequence_length=32)
    assert fk.stats.nfe == [STEPS] * 2


def test_true_cfg_through_flowkit_sample():
    pipe = tp.cached("flux")

    def ours(**kw):
        args = dict(steps=STEPS, guidance=[CFG(scale=4.0)], negative_prompt="blurry", generators=tp.gens(),
                    output_type="latent", **tp.SIZE)
        args.update(kw)
        return flowkit.sample(FluxAdapter(pipe), tp.PROMPTS, **args)

    # flowkit.sample uses the pipeline's default max_sequence_length (512): same prompts, longer padding
    ref512 = _call(pipe, tp.gens(), **{**TRUE_CFG, "max_sequence_length": 512})
    out = ours()
    assert out.latents.shape == (2, 4, 16, 16)  # flowkit's state is unpacked
    assert tp.rel_err(out.images, ref512) < tp.TOL
    assert out.stats.nfe == [2 * STEPS] * 2
    assert tp.rel_err(ours(guidance=[CFG(scale=3.0)]).images, ref512) > 10 * tp.TOL
    assert tp.rel_err(ours(steps=STEPS - 1).images, ref512) > 10 * tp.TOL
    assert tp.rel_err(ours(grid="shift:2").images, ref512) > 10 * tp.TOL


def test_guidance_embedding_without_cfg():
    pipe = tp.cached("flux-dev")
    ref = _call(pipe, torch.Generator().manual_seed(3), guidance_scale=3.5, max_sequence_length=32)
    fk = FlowKitPipeline.from_pipe(pipe)

    def ours(wrapper=fk, **kw):
        return _call(wrapper, torch.Generator().manual_seed(3), **{"guidance_scale": 3.5, "max_sequence_length": 32, **kw})

    assert tp.rel_err(ours(), ref) < tp.TOL
    assert fk.stats.nfe == [STEPS] * 2  # no CFG: one evaluation per step
    assert tp.rel_err(ours(guidance_scale=2.5), ref) > 10 * tp.TOL  # the embedding reaches the model
    assert tp.rel_err(ours(num_inference_steps=STEPS - 1), ref) > 10 * tp.TOL
    assert tp.rel_err(ours(FlowKitPipeline.from_pipe(pipe, sampler=Euler(grid="shift:2"))), ref) > 10 * tp.TOL
    # flowkit.sample: the adapter's embedded_guidance (3.5, the pipeline's default) and no CFG
    out = flowkit.sample(pipe, tp.PROMPTS, steps=STEPS, guidance="none", generators=tp.gens(), output_type="latent",
                         **tp.SIZE)
    ref512 = _call(pipe, tp.gens())
    assert tp.rel_err(out.images, ref512) < tp.TOL and out.stats.nfe == [STEPS] * 2
    other = flowkit.sample(FluxAdapter(pipe, embedded_guidance=2.5), tp.PROMPTS, steps=STEPS, guidance="none",
                           generators=tp.gens(), output_type="latent", **tp.SIZE)
    assert tp.rel_err(other.images, ref512) > 10 * tp.TOL


def test_size_not_a_multiple_of_the_packing_factor_is_an_error():
    fk = FlowKitPipeline.from_pipe(tp.cached("flux"))
    with pytest.raises(InputError, match="multiples of 4.*round down"):
        fk("a red cat", num_inference_steps=1, height=30, width=32, output_type="latent")
    with pytest.raises(InputError, match="multiples of 4"):
        flowkit.sample(tp.cached("flux"), "a red cat", steps=1, height=32, width=34, output_type="latent")


def test_packed_latents_in_and_out():
    pipe = tp.cached("flux")
    latents = torch.randn(1, 64, 16, generator=torch.Generator().manual_seed(0))
    ref = pipe("a red cat", num_inference_steps=2, latents=latents, output_type="latent", max_sequence_length=32,
               **tp.SIZE).images
    ours = FlowKitPipeline.from_pipe(pipe)("a red cat", num_inference_steps=2, latents=latents, output_type="latent",
                                           max_sequence_length=32, **tp.SIZE).images
    assert tp.rel_err(ours, ref) < tp.TOL
