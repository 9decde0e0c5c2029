"""flowkit's loop reproduces the shapes pipeline's own diffusers loop (tiny random model)."""

import pytest
import torch

import flowkit
from flowkit.guidance import CFG


@pytest.fixture(scope="module")
def pipe():
    return flowkit.load("tiny")


def _gens(seed, n):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def _ref(pipe, prompts, steps, scale):
    return pipe(prompts, num_inference_steps=steps, guidance_scale=scale, generator=_gens(11, len(prompts)),
                output_type="latent").images


def _ours(pipe, prompts, steps, scale, grid=None):
    return flowkit.sample(pipe, prompts, steps=steps, guidance=[CFG(scale=scale)], generators=_gens(11, len(prompts)),
                          output_type="latent", grid=grid)


def test_flowkit_reproduces_the_pipeline_latents_with_negative_controls(pipe):
    prompts = ["two blue squares", "a red circle and a green triangle"]
    ref = _ref(pipe, prompts, 8, 4.0)
    out = _ours(pipe, prompts, 8, 4.0)
    tol = 1e-4 * ref.std().item()
    err = (out.latents - ref).abs().max().item()
    assert err < tol, (err, tol)
    assert out.stats.nfe == [16, 16]  # flowkit's loop ran: 8 steps x 2 branches per image
    # negative controls: each must miss the same tolerance
    assert (_ours(pipe, prompts, 8, 3.0).latents - ref).abs().max() > 10 * tol  # wrong scale
    assert (_ours(pipe, prompts, 8, 4.0, grid="shift:2").latents - ref).abs().max() > 10 * tol  # wrong shift
    assert (_ours(pipe, prompts, 7, 4.0).latents - ref).abs().max() > 10 * tol  # one step fewer


def test_seeds_are_per_image(pipe):
    a = flowkit.sample(pipe, ["a red circle", "two blue squares"], steps=2, seed=5, output_type="latent")
    b = flowkit.sample(pipe, ["two blue squares"], steps=2, seed=5, start_index=1, output_type="latent")
    assert a.seeds[1] == b.seeds[0] == flowkit.seed_for(5, 1)
    assert torch.allclose(a.latents[1], b.latents[0], atol=1e-4)


def test_images_are_pil_by_default(pipe):
    out = flowkit.sample(pipe, "a red circle", steps=2, guidance="none")
    assert out.images[0].size == (32, 32) and out.stats.nfe == [2]


def test_flowkit_pipeline_wraps_the_shapes_pipeline(pipe):
    from flowkit.pipelines import FlowKitPipeline

    prompts = ["a red circle", "two blue squares"]
    ref = _ref(pipe, prompts, 5, 3.0)
    fk = FlowKitPipeline.from_pipe(pipe)
    out = fk(prompts, num_inference_steps=5, guidance_scale=3.0, generator=_gens(11, 2), output_type="latent")
    tol = 1e-4 * ref.std().item()
    assert (out.images - ref).abs().max().item() < tol
    assert fk.stats.nfe == [10, 10]
    wrong = fk(prompts, num_inference_steps=5, guidance_scale=2.0, generator=_gens(11, 2), output_type="latent")
    assert (wrong.images - ref).abs().max().item() > 10 * tol  # negative control: wrong scale
