"""Attention kernels: each kernel against the reference, flowkit's processors against diffusers'
on the SD, SDXL, SD3 and FLUX networks, which kernel actually ran (a spy on torch's SDPA and
the controller's counts), and the kernel options of every surface."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import flowkit
import flowkit.attention as A
from flowkit.attention.kernels import Kernel, reference
from flowkit.errors import UnknownNameError

from tiny_pipes import PROMPTS, SIZE, build, gens, one_thread, rel_err  # noqa: F401

TOL = 1e-5  # kernels vs the reference, relative to the output's scale
CPU_KERNELS = ["sdpa", "sdpa-math", "sdpa-flash", "reference"]


def qkv(seed: int = 0, b: int = 2, h: int = 3, lq: int = 11, lk: int = 7, d: int = 8):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, lq, d, generator=g), torch.randn(b, h, lk, d, generator=g),
            torch.randn(b, h, lk, d, generator=g))


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# -- kernels -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(A.KERNELS))
def test_kernel_matches_reference(name):
    reason = A.unavailable(name, "cpu")
    if reason:
        pytest.skip(reason)
    q, k, v = qkv()
    fn = A.KERNELS[name].fn
    assert err(fn(q, k, v), reference(q, k, v)) < TOL
    keep = torch.rand(2, 1, 11, 7, generator=torch.Generator().manual_seed(1)) > 0.3
    keep[..., 0] = True  # every query attends to something
    assert err(fn(q, k, v, keep), reference(q, k, v, keep)) < TOL  # boolean mask
    bias = torch.randn(2, 3, 11, 7)
    assert err(fn(q, k, v, bias), reference(q, k, v, bias)) < TOL  # additive mask
    assert err(fn(q, k, v, None, 0.3), reference(q, k, v, None, 0.3)) < TOL  # explicit scale
    assert err(fn(q, k, v), reference(q, k, v, None, 0.3)) > 100 * TOL  # negative control: another scale


def test_reference_is_the_textbook_formula():
    q, k, v = (t.double() for t in qkv(3))
    out, p = reference(q, k, v, probs=True)
    scores = torch.einsum("bhid,bhjd->bhij", q, k) / q.shape[-1] ** 0.5
    want = torch.exp(scores) / torch.exp(scores).sum(-1, keepdim=True)
    assert torch.allclose(p, want, atol=1e-12) and torch.allclose(out, want @ v, atol=1e-12)
    assert out.dtype == torch.float64  # float64 stays float64 (gradient checks)


def test_gpu_kernels_skip_with_a_reason_on_cpu():
    for name in ("sdpa-efficient", "sdpa-cudnn"):
        assert "CUDA" in A.unavailable(name, "cpu")
    assert A.unavailable("xformers", "cpu")  # not installed here, or no CUDA
    for name in CPU_KERNELS:
        assert A.unavailable(name, "cpu") is None


def test_unknown_kernel_names_the_closest():
    with pytest.raises(UnknownNameError, match="did you mean 'sdpa-math'"):
        A.check_kernel("sdpa-maths")
    with pytest.raises(UnknownNameError, match="use one of sdpa"):
        A.use_kernel(3).__enter__()


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(max_size=20), st.integers(), st.none()))
def test_check_kernel_fuzz(name):
    if name in A.KERNELS:
        assert A.check_kernel(name) == name
    else:
        with pytest.raises(UnknownNameError):
            A.check_kernel(name)


# -- processors on the four model families ------------------------------------------------
def net_of(pipe):
    return getattr(pipe, "unet", None) or pipe.transformer


def forward(name: str, net) -> torch.Tensor:
    """One network forward on seeded inputs of the family's shapes."""
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([500.0, 300.0])
    if name in ("sd", "sdxl"):
        x = torch.randn(2, 4, 16, 16, generator=g)
        e = torch.randn(2, 7, net.config.cross_attention_dim, generator=g)
        added = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.randn(2, 6, generator=g)} \
            if name == "sdxl" else None
        return net(x, t, encoder_hidden_states=e, added_cond_kwargs=added, return_dict=False)[0]
    if name == "sd3":
        return net(hidden_states=torch.randn(2, 4, 16, 16, generator=g), timestep=t,
                   encoder_hidden_states=torch.randn(2, 7, 32, generator=g),
                   pooled_projections=torch.randn(2, 64, generator=g), return_dict=False)[0]
    from flowkit.adapters.flux import image_ids, pack

    return net(hidden_states=pack(torch.randn(2, 4, 8, 8, generator=g)), timestep=t / 1000,
               pooled_projections=torch.randn(2, 32, generator=g), encoder_hidden_states=torch.randn(2, 7, 32, generator=g),
               txt_ids=torch.zeros(7, 3), img_ids=image_ids(8, 8, "cpu", torch.float32), return_dict=False)[0]


class SdpaSpy:
    """Counts torch SDPA calls made inside `net`'s forward, with the backend flags at each call."""

    def __init__(self, monkeypatch, net):
        self.calls: list[tuple[bool, bool]] = []
        self.inside = False
        real = F.scaled_dot_product_attention

        def spy(*args, **kwargs):
            if self.inside:
                self.calls.append((torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()))
            return real(*args, **kwargs)

        monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
        net.register_forward_pre_hook(lambda *a: setattr(self, "inside", True))
        net.register_forward_hook(lambda *a: setattr(self, "inside", False))


DIFFUSERS_PROCESSOR = {"sd": "AttnProcessor2_0", "sdxl": "AttnProcessor2_0", "sd3": "JointAttnProcessor2_0",
                       "flux": "FluxAttnProcessor"}


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
@torch.no_grad()
def test_processors_match_diffusers_and_the_kernel_that_ran(family, monkeypatch):
    net = net_of(build(family))
    n_attn = len(net.attn_processors)
    assert {type(p).__name__ for p in net.attn_processors.values()} == {DIFFUSERS_PROCESSOR[family]}
    theirs = forward(family, net)  # diffusers' own processors
    spy = SdpaSpy(monkeypatch, net)
    ctl = A.install(net)
    assert not ctl.kept and len(ctl.processors) == n_attn and ctl.capturable
    ours = {}
    for name in CPU_KERNELS:
        spy.calls.clear()
        with A.use_kernel(name):
            ours[name] = forward(family, net)
        assert ctl.counts[name] == n_attn  # the controller's count ...
        sdpa_calls = [] if name == "reference" else [(name != "sdpa-math", name != "sdpa-flash")] * n_attn
        assert spy.calls == sdpa_calls  # ... and torch's: SDPA ran with the kernel's backend flags
    assert err(ours["sdpa"], theirs) < 1e-6  # the same computation as diffusers' processor
    for name in ("sdpa-math", "sdpa-flash", "reference"):
        assert err(ours[name], theirs) < TOL
    # negative control: a kernel with a wrong scale is caught by the same comparison
    monkeypatch.setitem(A.KERNELS, "broken", Kernel("broken", "wrong scale", lambda q, k, v, m=None, s=None:
                                                       reference(q, k, v, m, 1.5 * q.shape[-1] ** -0.5)))
    with A.use_kernel("broken"):
        assert err(forward(family, net), theirs) > 100 * TOL
    A.uninstall(net)
    assert {type(p).__name__ for p in net.attn_processors.values()} == {DIFFUSERS_PROCESSOR[family]}


def test_processors_left_in_place_for_other_classes():
    from diffusers.models.attention_processor import AttnProcessor

    net = net_of(build("sd"))
    first = next(iter(net.attn_processors))
    net.set_attn_processor({k: (AttnProcessor() if k == first else v) for k, v in net.attn_processors.items()})
    ctl = A.install(net)
    assert ctl.kept == {first[: -len(".processor")]: "AttnProcessor"}
    assert len(ctl.processors) == len(net.attn_processors) - 1
    A.uninstall(net)


# -- the surfaces: flowkit.sample(attention=), set_kernel, use_kernel, FlowKitPipeline ------
def sample(pipe, **kw):
    from flowkit.guidance import CFG

    return flowkit.sample(pipe, PROMPTS, steps=2, guidance=[CFG(scale=5.0)], generators=gens(),
                          output_type="latent", **SIZE, **kw)


def test_sample_attention_option_runs_that_kernel_and_restores_processors():
    pipe = build("sd")
    default = sample(pipe)
    n = default.stats.forward_calls * len(pipe.unet.attn_processors)
    assert default.stats.attention == {"sdpa": n}
    math = sample(pipe, attention="sdpa-math")
    assert math.stats.attention == {"sdpa-math": n}
    assert rel_err(math.images, default.images) < 1e-4
    assert {type(p).__name__ for p in pipe.unet.attn_processors.values()} == {"AttnProcessor2_0"}
    with pytest.raises(UnknownNameError):
        sample(pipe, attention="flash")


def test_pipeline_level_setter_and_context_manager():
    from flowkit.pipelines import FlowKitPipeline

    pipe = build("sd")
    A.set_kernel(pipe, "reference")  # the diffusers pipeline's own calls run on it too
    pipe(PROMPTS, num_inference_steps=1, output_type="latent", **SIZE)
    ctl = A.controller(pipe)
    assert ctl.counts == {"reference": len(pipe.unet.attn_processors)}  # one step: one CFG-batched forward
    assert sample(pipe).stats.attention.keys() == {"reference"}
    with A.use_kernel("sdpa-math"):  # the innermost choice wins
        assert sample(pipe).stats.attention.keys() == {"sdpa-math"}
        assert sample(pipe, attention="sdpa").stats.attention.keys() == {"sdpa"}
    fk = FlowKitPipeline.from_pipe(pipe, attention="sdpa-math")
    fk(PROMPTS, num_inference_steps=2, output_type="latent", **SIZE)
    assert fk.stats.attention.keys() == {"sdpa-math"}
    fk.set_attention_kernel(None)
    fk(PROMPTS, num_inference_steps=2, output_type="latent", **SIZE)
    assert fk.stats.attention.keys() == {"reference"}  # the pipeline's own kernel
    with pytest.raises(UnknownNameError):
        FlowKitPipeline.from_pipe(pipe, attention="xformer")
    A.set_kernel(pipe, None)
    assert A.controller(pipe) is None
    assert {type(p).__name__ for p in pipe.unet.attn_processors.values()} == {"AttnProcessor2_0"}
