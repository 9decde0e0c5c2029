"""`ModelAdapter.to_pixels`: the differentiable decode of each family, checked against the
family's own diffusers pipeline decoding the same latents, and by finite differences."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import tiny_pipes as tp
from tiny_pipes import one_thread  # noqa: F401  (fixture)

import flowkit
from flowkit.adapters.base import adapt
from flowkit.adapters.flux import FluxAdapter, pack
from flowkit.adapters.latent import vae_decode
from flowkit.adapters.sd import SDAdapter
from flowkit.adapters.sd3 import SD3Adapter
from flowkit.adapters.sdxl import SDXLAdapter
from flowkit.adapters.shapes import ShapesAdapter
from flowkit.errors import InputError, UnsupportedError

FAMILIES = ["shapes", "sd", "sdxl", "sd3", "flux"]
SIZE = 32


def pipeline(family: str, fresh: bool = False):
    if family == "shapes":
        return flowkit.load("tiny")
    return tp.build(family) if fresh else tp.cached(family)


def final_latents(adapter, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Two samples of unit-normal 'final latents' for a 32 px image."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((2,) + adapter.latent_shape(SIZE, SIZE), generator=g).to(dtype)


def pipeline_decode(pipe, family: str, x: torch.Tensor) -> torch.Tensor:
    """The pipeline's own decoding of `x`: a one-step call whose callback swaps its final latents
    for `x` (in the pipeline's layout), output_type 'np' -> [B, 3, H, W] in [0, 1]."""
    swap = pack(x) if family == "flux" else x

    def callback(p, i, t, kw):
        return {"latents": swap}

    out = pipe(prompt=["a"] * len(x), num_inference_steps=1, guidance_scale=1.0, height=SIZE, width=SIZE,
               output_type="np", callback_on_step_end=callback).images
    return torch.from_numpy(np.asarray(out)).permute(0, 3, 1, 2).float()


def assert_same_decode(pixels: torch.Tensor, ref01: torch.Tensor, atol: float = 1e-5) -> None:
    """`pixels` ([-1, 1], unclamped) is the decode whose clamped [0, 1] postprocess is `ref01`."""
    ours01 = (pixels.detach().float() + 1) / 2
    assert ours01.shape == ref01.shape, (ours01.shape, ref01.shape)
    err = (ours01.clamp(0, 1) - ref01).abs().max().item()
    assert err < atol, f"to_pixels differs from the pipeline's decode by {err:.3g}"
    inside = (ref01 > 1e-3) & (ref01 < 1 - 1e-3)
    assert inside.float().mean() > 0.5  # the comparison covers most pixels unclamped
    assert (pixels.detach().abs() > 1).any(), "to_pixels must not clamp"  # the random decoder overshoots


@pytest.mark.parametrize("family", FAMILIES)
def test_to_pixels_is_the_pipelines_decode(family):
    pipe = pipeline(family)
    adapter = adapt(pipe)
    x = final_latents(adapter)
    xg = x.clone().requires_grad_()
    pixels = adapter.to_pixels(xg)
    assert pixels.shape == (2, 3, SIZE, SIZE) and pixels.requires_grad  # the graph is kept
    with torch.no_grad():
        ref = pipeline_decode(pipe, family, x)
        ours_pt = adapter.decode(x, "pt")
    assert_same_decode(pixels, ref)
    assert_same_decode(pixels, ours_pt.cpu().float())  # the adapter's decode is the same decode


# each mutant is a plausible mistake in the family's scaling; the pipeline's decode must catch it
MUTANTS = {
    "shapes": (ShapesAdapter, "to_pixels", lambda self, x, generator=None: x.clamp(-1, 1)),  # clamped
    "shapes-01": (ShapesAdapter, "to_pixels", lambda self, x, generator=None: (x + 1) / 2),  # [0, 1] range
    "sd": (SDAdapter, "vae_input", lambda self, x: x),  # forgot / scaling_factor
    "sdxl": (SDXLAdapter, "vae_input", lambda self, x: x * self.pipe.vae.config.scaling_factor),  # * for /
    "sd3": (SD3Adapter, "vae_input", lambda self, x: x / self.pipe.vae.config.scaling_factor),  # forgot the shift
    "sd3-order": (SD3Adapter, "vae_input",  # shift before scaling
                  lambda self, x: (x + self.pipe.vae.config.shift_factor) / self.pipe.vae.config.scaling_factor),
    "flux": (FluxAdapter, "vae_input", lambda self, x: x / self.pipe.vae.config.scaling_factor),  # forgot the shift
}


@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_the_decode_check_catches_wrong_scalings(mutant, monkeypatch):
    family = mutant.split("-")[0]
    pipe = pipeline(family)
    x = final_latents(adapt(pipe))
    with torch.no_grad():
        ref = pipeline_decode(pipe, family, x)
        cls, name, wrong = MUTANTS[mutant]
        monkeypatch.setattr(cls, name, wrong)
        with pytest.raises(AssertionError):
            assert_same_decode(adapt(pipe).to_pixels(x), ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_to_pixels_gradient_matches_finite_differences(family):
    pipe = pipeline(family, fresh=True)  # its VAE goes to float64
    if family != "shapes":
        pipe.vae.double()
    adapter = adapt(pipe)
    g = torch.Generator().manual_seed(1)
    x = final_latents(adapter, dtype=torch.float64)[:1].clone().requires_grad_()
    w1, w2 = (torch.randn((1, 3, SIZE, SIZE), generator=g, dtype=torch.float64) for _ in range(2))

    def functional(z, w):
        return (adapter.to_pixels(z) * w).sum()

    grad1, = torch.autograd.grad(functional(x, w1), x)
    grad2, = torch.autograd.grad(functional(x, w2), x)
    flat = torch.randperm(x.numel(), generator=g)[:4]
    eps = 1e-6
    fd = []
    with torch.no_grad():
        for k in flat:
            e = torch.zeros(x.numel(), dtype=torch.float64)
            e[k] = eps
            e = e.view_as(x)
            fd.append((functional(x + e, w1) - functional(x - e, w1)) / (2 * eps))
    fd = torch.stack(fd)
    auto = grad1.flatten()[flat]
    assert torch.allclose(auto, fd, rtol=1e-5, atol=1e-9 * fd.abs().max()), (auto, fd)
    # negative controls: another functional's gradient, or the gradient at other coordinates, differ
    assert not torch.allclose(grad2.flatten()[flat], fd, rtol=1e-3)
    assert not torch.allclose(auto.roll(1), fd, rtol=1e-3)


def test_sdxl_fp16_vae_upcast_keeps_the_graph():
    """An fp16 VAE with force_upcast decodes in float32 (as the pipeline); with a graph, on float32
    copies of the weights: the in-place upcast-and-back of `decode` would break backward."""
    pipe = tp.build("sdxl")
    reference = copy.deepcopy(pipe.vae).half().float()  # the same weights, rounded to fp16, in float32
    pipe.vae.half()
    assert pipe.vae.config.force_upcast
    adapter = adapt(pipe)
    x = final_latents(adapter)
    w = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    xg = x.clone().requires_grad_()
    pixels = adapter.to_pixels(xg)
    (pixels * w).sum().backward()
    assert pixels.dtype == torch.float32 and pipe.vae.dtype == torch.float16  # the VAE is left as it was
    xr = x.clone().requires_grad_()
    ref = reference.decode(xr / reference.config.scaling_factor).sample
    (ref * w).sum().backward()
    assert torch.allclose(pixels, ref, atol=1e-6) and torch.allclose(xg.grad, xr.grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # without a graph: the in-place upcast, as diffusers
        assert torch.allclose(adapter.to_pixels(x), ref, atol=1e-6) and pipe.vae.dtype == torch.float16
    # negative control: upcasting in place and casting back, with a graph, fails in backward
    xn = x.clone().requires_grad_()
    pipe.vae.to(torch.float32)
    naive = vae_decode(pipe, xn / pipe.vae.config.scaling_factor)
    pipe.vae.to(torch.float16)
    with pytest.raises(RuntimeError):
        (naive * w).sum().backward()


def test_to_pixels_input_errors():
    flux = adapt(tp.cached("flux"))
    x = final_latents(flux)
    with pytest.raises(InputError, match="unpack"):
        flux.to_pixels(pack(x))

    class NoPixels(ShapesAdapter):
        to_pixels = flowkit.adapters.base.ModelAdapter.to_pixels

    with pytest.raises(UnsupportedError, match="differentiable decode"):
        NoPixels(flowkit.load("tiny")).to_pixels(x)
