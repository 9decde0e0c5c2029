"""Attention-map capture: maps equal the reference computed from the layer's own inputs, rows
are assigned to the right branch and sample of a CFG-batched forward, every other call stays
fused, maps can be differentiated through, and the store refuses bad requests."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flowkit
import flowkit.attention as A
from flowkit.attention.store import AttentionStore, resolve_layers
from flowkit.errors import InputError
from flowkit.guidance import CFG
from flowkit.guidance_base import Guidance

from test_attention import forward, net_of
from tiny_pipes import PROMPTS, SIZE, build, cached, gens, one_thread  # noqa: F401

LAYERS = ["down_blocks.1.attentions.0.transformer_blocks.0.attn2", "mid_block.attentions.0.transformer_blocks.0.attn2"]


class Capture(Guidance):
    """Asks for `layers` at `steps` in its branches hook (before the step's forward) and keeps the store."""

    name = "capture-test"

    def __init__(self, layers, steps, heads="mean"):
        super().__init__()
        self.layers, self.steps, self.heads = layers, steps, heads
        self.store = None

    def branches(self, ctx, requests):
        self.store = ctx.attention
        if ctx.step in self.steps:
            ctx.attention.request(self.layers, ctx.step, heads=self.heads)


class InputSpy:
    """Records each call's (hidden_states, encoder_hidden_states) of the named Attention modules."""

    def __init__(self, net, names):
        self.calls = {n: [] for n in names}
        modules = dict(net.named_modules())
        for n in names:
            modules[n].register_forward_pre_hook(
                lambda mod, args, kw, n=n: self.calls[n].append((args[0], kw["encoder_hidden_states"])),
                with_kwargs=True)


def unet_maps(attn, hidden, text, scale=None):
    """softmax(q k^T / sqrt(d)) averaged over heads, [B, Lq, Lk], straight from the module's weights."""
    q, k = attn.to_q(hidden), attn.to_k(text)
    b, h = q.shape[0], attn.heads
    q = q.view(b, q.shape[1], h, -1).transpose(1, 2)
    k = k.view(b, k.shape[1], h, -1).transpose(1, 2)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1).mean(1)


def count_attention_calls(net):
    n = [0]
    for m in net.modules():
        if hasattr(m, "processor"):
            m.register_forward_hook(lambda *a: n.__setitem__(0, n[0] + 1))
    return n


@torch.no_grad()
def test_captured_maps_equal_reference_per_branch_and_sample_and_others_stay_fused():
    pipe = build("sd")
    unet = pipe.unet
    spy = InputSpy(unet, LAYERS)
    all_calls = count_attention_calls(unet)
    grab = Capture(LAYERS, steps=[1])
    out = flowkit.sample(pipe, PROMPTS, steps=3, guidance=[CFG(scale=5.0), grab], generators=gens(),
                         output_type="latent", **SIZE)
    store = grab.store
    modules = dict(unet.named_modules())
    for layer in LAYERS:
        hidden, text = spy.calls[layer][1]  # the forward of global step 1 (euler: one forward per step)
        assert hidden.shape[0] == 4  # cond and uncond of both samples in one forward
        ref = unet_maps(modules[layer], hidden, text)  # [4, Lq, Lk], rows: cond 0, cond 1, uncond 0, uncond 1
        cond, uncond = store.get(layer, 1, "cond"), store.get(layer, 1, "uncond")
        assert cond.samples.tolist() == [0, 1] and uncond.samples.tolist() == [0, 1]
        assert torch.allclose(cond.probs, ref[:2], atol=1e-6) and torch.allclose(uncond.probs, ref[2:], atol=1e-6)
        assert not torch.allclose(cond.probs, ref[2:], atol=1e-3)  # negative control: the other branch's rows
        wrong_scale = unet_maps(modules[layer], hidden, text, scale=1.0)
        assert not torch.allclose(cond.probs, wrong_scale[:2], atol=1e-3)  # negative control: another scale
        assert torch.allclose(cond.probs.sum(-1), torch.ones(()), atol=1e-5)  # a distribution over text tokens
        with pytest.raises(InputError, match="no captured map"):
            store.get(layer, 0, "cond")  # not requested at step 0
    counts = out.stats.attention
    assert all_calls[0] == out.stats.forward_calls * len(unet.attn_processors)  # an independent count
    assert counts["captured"] == len(LAYERS)  # two layers, one step
    assert counts["sdpa"] == all_calls[0] - counts["captured"] > 0  # every other call stayed fused
    assert set(counts) == {"sdpa", "captured"}


@torch.no_grad()
def test_spatial_layout_heads_and_store_requests():
    pipe = cached("sd")
    layers = A.layers(pipe)
    assert layers and all(name.endswith("attn2") for name in layers)  # the cross-attention layers
    grab = Capture("down_blocks.*attn2", steps=[0, 2], heads="all")
    flowkit.sample(pipe, PROMPTS, steps=3, guidance=[CFG(scale=5.0), grab], generators=gens(),
                   output_type="latent", **SIZE)
    m = grab.store.get(LAYERS[0], 2, "cond")
    heads = dict(pipe.unet.named_modules())[LAYERS[0]].heads
    assert m.probs.shape == (2, heads, 64, 16)  # 8x8 tokens of a 16x16 latent, 16 CLIP tokens
    assert m.spatial().shape == (2, heads, 16, 8, 8)
    assert {x.layer for x in grab.store.maps} == {LAYERS[0]} and {x.step for x in grab.store.maps} == {0, 2}
    store = AttentionStore(layers)
    with pytest.raises(InputError, match="did you mean"):
        store.request(layers[0][:-1] + "3", 0)
    for bad in ([-1], [1.5], True):
        with pytest.raises(InputError, match="global step"):
            store.request(layers[0], bad)
    with pytest.raises(InputError, match="heads"):
        store.request(layers[0], 0, heads="sum")
    assert store.request("*", None) == layers  # every step
    assert not store.wants(layers[0])  # outside a forward scope nothing is captured


@pytest.mark.parametrize("family", ["sd3", "flux"])
@torch.no_grad()
def test_joint_attention_capture(family):
    """SD3 / FLUX: the captured forward equals the fused one, and the map is the image->text block."""
    pipe = build(family)
    net = net_of(pipe)
    fused = forward(family, net)
    layer = A.layers(pipe)[0]
    with A.session(net) as store:
        store.request(layer, 0, heads="all")
        with store.forward(0, [("cond", torch.tensor([0, 1]))]):
            captured = forward(family, net)
        assert store.counts["captured"] == 1 and sum(store.counts.values()) == len(net.attn_processors)
    assert (captured - fused).abs().max() / fused.abs().max() < 1e-5
    m = store.get(layer, 0, "cond")
    n_img = 64 if family == "sd3" else 16  # SD3: 16x16 latent in 2x2 patches; FLUX: 8x8 latent packed 2x2
    assert m.probs.shape[:3] == (2, net.config.num_attention_heads, n_img) and m.probs.shape[3] == 7
    total = m.probs.sum(-1)
    assert bool((total > 0).all() and (total < 1).all())  # part of a softmax over image and text keys


def test_maps_are_differentiable():
    """d loss(maps) / d latents and / d text embeddings by autograd equal finite differences (float64)."""
    unet = net_of(build("sd")).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g, dtype=torch.float64)
    text = torch.randn(2, 7, 32, generator=g, dtype=torch.float64)
    t = torch.tensor([500.0, 300.0])
    w = torch.randn(2, 64, generator=g, dtype=torch.float64)  # weights on the 8x8 map of one token

    def loss(x, text, token=3):
        with A.session(unet) as store:
            store.request(LAYERS[0], 0)
            with store.forward(0, [("cond", torch.arange(2))]):
                unet(x, t, encoder_hidden_states=text, return_dict=False)
        return (store.get(LAYERS[0], 0).probs[..., token] * w).sum()

    xg, tg = x.clone().requires_grad_(), text.clone().requires_grad_()
    gx, gt = torch.autograd.grad(loss(xg, tg), (xg, tg))
    assert gx.abs().sum() > 0 and gt.abs().sum() > 0
    eps = 1e-6
    with torch.no_grad():
        for grad, (dx, dt) in ((gx, (torch.randn_like(x), 0 * text)), (gt, (0 * x, torch.randn_like(text)))):
            fd = (loss(x + eps * dx, text + eps * dt) - loss(x - eps * dx, text - eps * dt)) / (2 * eps)
            auto = (grad * (dx if dx.abs().sum() else dt)).sum()
            assert abs(float(fd - auto)) < 1e-6 * max(abs(float(auto)), 1e-3)
            other = (loss(x + eps * dx, text + eps * dt, 5) - loss(x - eps * dx, text - eps * dt, 5)) / (2 * eps)
            assert abs(float(other - auto)) > 1e-3 * abs(float(auto))  # negative control: another token's loss


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(max_size=30), st.lists(st.text(max_size=12), max_size=3), st.integers()))
def test_resolve_layers_fuzz(patterns):
    known = ["down_blocks.1.attn2", "mid_block.attn2", "up_blocks.0.attn2"]
    try:
        got = resolve_layers(patterns, known)
    except InputError:
        return
    assert got and set(got) <= set(known) and got == [k for k in known if k in got]
