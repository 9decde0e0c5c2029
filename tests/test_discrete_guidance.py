"""Guidance on discrete paths: CFG's probability combine (both forms), its refusals, and
classifier guidance on the Dirichlet path, on fixed tensors and through the sampling loop."""

import pytest
import torch

import flowkit
from flowkit.errors import UnsupportedError
from flowkit.guidance import CFG, DirichletClassifierGuidance
from flowkit.guidance.cfg import combine_probs
from flowkit.paths.categorical import project_simplex
from flowkit.seqmodels import tiny_pipeline


@pytest.fixture(scope="module")
def dna_tiny():
    return tiny_pipeline("dna", None, classifier=True)


def _probs(seed, shape=(3, 5, 4), temp=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(temp * torch.randn(*shape, generator=g, dtype=torch.float64), -1)


@pytest.mark.parametrize("space", ["model_output", "log_probs"])
def test_scale_zero_is_unconditional_and_one_is_conditional(space):
    u, c = _probs(0), _probs(1)
    torch.testing.assert_close(combine_probs(u, c, 0.0, space), u)
    torch.testing.assert_close(combine_probs(u, c, 1.0, space), c)


def test_scale_w_matches_the_formulas():
    u, c = _probs(0), _probs(1)
    near = 0.9 * u + 0.1 * c  # close to u: w = 2.5 stays on the simplex
    torch.testing.assert_close(combine_probs(u, near, 2.5), u + 2.5 * (near - u))
    far = combine_probs(u, c, 4.0)  # leaves the simplex: the projection of the affine rule
    torch.testing.assert_close(far, project_simplex(u + 4.0 * (c - u)))
    assert (far >= 0).all() and torch.allclose(far.sum(-1), torch.ones(3, 5, dtype=torch.float64))
    geo = combine_probs(u, c, 2.5, "log_probs")
    expect = u ** -1.5 * c ** 2.5
    torch.testing.assert_close(geo, expect / expect.sum(-1, keepdim=True))
    assert (combine_probs(u, c, 2.5) - geo).abs().max() > 1e-3  # the two forms differ


@pytest.mark.parametrize("space", ["model_output", "log_probs"])
def test_continuous_at_scale_one(space):
    u, c = _probs(0), _probs(1)
    for eps in (1e-3, 1e-6):
        below, above = combine_probs(u, c, 1 - eps, space), combine_probs(u, c, 1 + eps, space)
        assert (above - below).abs().max() < 10 * eps


def test_cfg_through_the_loop_scale_zero_equals_the_unconditional_model(dna_tiny):
    kw = dict(sampler="dirichlet", steps=4, seed=3, length=64, output_type="latent")
    uncond = flowkit.sample(dna_tiny, ["", ""], guidance="none", **kw)
    zero = flowkit.sample(dna_tiny, ["promoter", "silencer"], guidance=[CFG(scale=0.0)], **kw)
    one = flowkit.sample(dna_tiny, ["promoter", "silencer"], guidance=[CFG(scale=1.0)], **kw)
    plain = flowkit.sample(dna_tiny, ["promoter", "silencer"], guidance="none", **kw)
    assert torch.equal(zero.latents, uncond.latents) and zero.stats.nfe == [8, 8]
    assert torch.equal(one.latents, plain.latents) and one.stats.nfe == [4, 4]
    assert not torch.equal(plain.latents, uncond.latents)  # negative control: the class matters


def test_cfg_refuses_image_spaces_on_discrete_paths(dna_tiny):
    for module, msg in [(CFG(scale=2, space="x0"), "does not exist on discrete paths"),
                        (CFG(scale=2, guidance_rescale=0.5), "no meaning on discrete paths")]:
        with pytest.raises(UnsupportedError, match=msg):
            flowkit.sample(dna_tiny, ["promoter"], guidance=[module], steps=2, length=64)


def test_classifier_guidance_through_the_loop(dna_tiny):
    kw = dict(sampler="dirichlet", steps=4, seed=3, length=64, output_type="latent")
    plain = flowkit.sample(dna_tiny, ["promoter", "enhancer"], guidance="none", **kw)
    zero = flowkit.sample(dna_tiny, ["promoter", "enhancer"], guidance=[DirichletClassifierGuidance(scale=0.0)], **kw)
    probs = []
    guided = flowkit.sample(dna_tiny, ["promoter", "enhancer"], guidance=[DirichletClassifierGuidance(scale=50.0)],
                            callback=lambda ctx, i, x, p: probs.append(p.probs), **kw)
    assert torch.equal(zero.latents, plain.latents)
    assert guided.stats.nfe == [4, 4]  # classifier calls are not denoiser evaluations
    assert all(torch.isfinite(p).all() and (p >= 0).all() for p in probs)
    assert not torch.equal(guided.latents, plain.latents)
    with pytest.raises(UnsupportedError, match="noisy classifier"):
        flowkit.sample(tiny_pipeline("dna", None), ["promoter"], guidance=[DirichletClassifierGuidance()],
                       steps=2, length=64)
