"""Rewards (flowkit.rewards and the shapes world's) and reward guidance (guidance/reward.py)."""

from __future__ import annotations

import numpy as np
import pytest
import tiny_pipes
import torch
from analytic import context
from flowkit.guidance import CFG
from flowkit.guidance.reward import RewardGuidance
from flowkit.samplers import Euler

import flowkit
from flowkit.errors import InputError, SpecError
from flowkit.kit import ModelKit
from flowkit.paths import LinearPath
from flowkit.registry import REWARDS
from flowkit.rewards import Reward, build_reward
from flowkit.sampling_loop import integrate
from flowkit.seeding import generators_for, randn_per_sample
from flowkit.timegrid import TimeGrid

one_thread = tiny_pipes.one_thread
CAPTIONS = ["two red circles and a blue square", "three green triangles", "a yellow square and two blue circles",
            "four red squares"]


def _renders(captions, seed=0):
    from flowkit.worlds import shapes as world

    rng = np.random.default_rng(seed)
    imgs = [world.render_caption(world.parse_caption(c), 32, rng)[1] for c in captions]
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() * 2 - 1


@pytest.mark.parametrize("name", ["count", "presence", "class", "oracle"])
def test_renders_of_the_caption_score_higher_than_renders_of_other_captions(name):
    """Every shapes reward prefers an image to its own caption over the others' (mutant: a
    reward that ignores the prompt scores both alike; one with a flipped sign prefers the
    wrong caption)."""
    reward = build_reward(name)
    x = _renders(CAPTIONS)
    own = reward(x, CAPTIONS)
    for shift in (1, 2, 3):
        other = reward(x, CAPTIONS[shift:] + CAPTIONS[:shift])
        assert bool((own > other).all()), (name, own, other)


@pytest.mark.parametrize("name", ["count", "presence", "class"])
def test_differentiable_shapes_rewards_pass_gradcheck(name):
    """The differentiable rewards' gradients in the images match finite differences (float64
    nets on a 2-image batch; the networks are cast back afterwards)."""
    from flowkit.worlds import shapes_rewards as R

    reward = build_reward(name)
    assert reward.differentiable
    x = _renders(CAPTIONS[:2]).double().requires_grad_(True)
    nets = [R._classifier("cpu"), R._counter("cpu")]
    for net in nets:
        net.double()
    try:
        assert torch.autograd.gradcheck(lambda im: reward(im, CAPTIONS[:2]), (x,), eps=1e-6, atol=1e-5,
                                        nondet_tol=1e-9, fast_mode=True)
    finally:
        for net in nets:
            net.float()


def test_registry_from_fn_and_bad_input():
    """Registered names build; a function becomes a reward; the oracle is labelled not
    differentiable; wrong shapes and unknown names are clear errors."""
    assert {"count", "presence", "class", "oracle"} <= set(REWARDS.names())
    assert not build_reward("oracle").differentiable
    r = Reward.from_fn(lambda im: im.mean(dim=(1, 2, 3)), differentiable=True)
    assert r(torch.ones(2, 3, 4, 4)).tolist() == [1.0, 1.0]
    with_prompts = Reward.from_fn(lambda im, p: torch.tensor([float(len(t)) for t in p]), differentiable=False)
    assert with_prompts(torch.zeros(2, 3, 4, 4), ["ab", "c"]).tolist() == [2.0, 1.0]
    with pytest.raises(InputError, match="one score per image"):
        Reward.from_fn(lambda im: im.mean(), differentiable=True)(torch.ones(2, 3, 4, 4))
    with pytest.raises(InputError, match="2 prompts for 3 images"):
        build_reward("count")(torch.zeros(3, 3, 32, 32), ["a", "b"])
    with pytest.raises(SpecError):
        build_reward("nosuch")


# --------------------------------------------------------------------------- reward guidance


def _quadratic_run(scale, target=2.0, grad="x0", steps=8):
    """The analytic Gaussian world (tests/analytic.py) with reward -||x0 - target||^2."""
    reward = Reward.from_fn(lambda im: -((im - target) ** 2).flatten(1).sum(dim=1), differentiable=True)
    mods = [CFG(scale=1.0)]
    if scale is not None:
        mods.append(RewardGuidance(reward=reward, scale=scale, grad=grad, start=0.25))
    ctx = context(64, steps, mods)
    ctx.kit = ModelKit(to_pixels=lambda x: x)
    noise = randn_per_sample((4,), generators_for(0, range(64))).double()
    x, stats = integrate(Euler(), ctx, noise, TimeGrid.uniform().build(steps, LinearPath()))
    return x, stats


def test_reward_guidance_scale_zero_is_bit_identical():
    """scale 0 changes nothing, bit for bit (mutant: a conversion round trip of the prediction
    changes its last bits)."""
    base, _ = _quadratic_run(None)
    zero, stats = _quadratic_run(0.0)
    assert torch.equal(base, zero) and stats.backward_calls == 0


@pytest.mark.parametrize("grad", ["x0", "xt"])
def test_a_quadratic_reward_moves_the_sample_mean_towards_its_target(grad):
    """On the analytic Gaussian (data mean 0.7), a reward peaked at 2 moves the samples' mean
    towards 2, more with a larger scale (mutant: a flipped sign moves it away)."""
    base, _ = _quadratic_run(None)
    weak, _ = _quadratic_run(0.05 if grad == "x0" else 0.05, grad=grad)
    strong, stats = _quadratic_run(0.2 if grad == "x0" else 0.2, grad=grad)
    m0, m1, m2 = base.mean().item(), weak.mean().item(), strong.mean().item()
    assert m0 < m1 < m2 < 2.0 + 1e-6, (m0, m1, m2)
    if grad == "xt":  # one extra evaluation a guided step (6 of 8 steps), and its backward
        assert stats.nfe == [8 + 6] * 64 and stats.backward_calls == 6


def test_reward_guidance_refuses_what_it_cannot_follow():
    """A non-differentiable reward is refused; a shapes reward on another family is refused
    with its reason (the sweep relies on this refusal)."""
    with pytest.raises(ValueError, match="not differentiable"):
        RewardGuidance(reward="oracle")
    from flowkit.errors import UnsupportedError

    with pytest.raises(UnsupportedError, match="scores shapes images"):
        flowkit.sample(tiny_pipes.cached("sd"), ["a red circle"], steps=2, guidance=[CFG(scale=2.0), RewardGuidance()],
                       output_type="latent")


def test_reward_guidance_raises_the_count_reward_on_the_tiny_shapes_model():
    """On the tiny model, guidance by the count reward raises that reward (it is what it
    follows); control: scale 0 leaves the latents as CFG's."""
    pipe = flowkit.load("tiny")
    kw = dict(steps=6, seed=3, output_type="latent")
    base = flowkit.sample(pipe, CAPTIONS, guidance=[CFG(scale=4.0)], **kw)
    guided = flowkit.sample(pipe, CAPTIONS, guidance=[CFG(scale=4.0), RewardGuidance(scale=0.5, start=0.3)], **kw)
    r = build_reward("count")
    assert r(guided.latents, CAPTIONS).mean() > r(base.latents, CAPTIONS).mean()
    assert guided.stats.reward_calls == 5 and guided.stats.nfe == base.stats.nfe  # steps 1..5 of 6
