"""Adaptive Guidance: exact reductions, NFE savings per sample, and the x0-space choice."""

import pytest
import torch

from analytic import context
from flowkit.guidance import CFG, AdaptiveGuidance, GuidanceStack
from flowkit.errors import GuidanceStackError
from flowkit.paths import LinearPath
from flowkit.samplers import Euler
from flowkit.sampling_loop import integrate
from flowkit.timegrid import TimeGrid

PATH = LinearPath()
STEPS = 8


def _sample(modules, steps=STEPS, **kw):
    ctx = context(3, steps, modules, **kw)
    noise = ctx.randn((5,)).double()
    x, stats = integrate(Euler(), ctx, noise, TimeGrid.uniform().build(steps, PATH))
    return x, stats, ctx


def test_gamma_one_is_exactly_cfg():
    x, stats, _ = _sample([CFG(scale=3.0), AdaptiveGuidance(gamma=1.0)])
    x_cfg, s_cfg, _ = _sample([CFG(scale=3.0)])
    assert torch.equal(x, x_cfg) and stats.nfe == s_cfg.nfe == [2 * STEPS] * 3


@pytest.mark.parametrize("gamma", [1.5, -1.01, float("nan"), float("inf"), 2])
def test_gamma_outside_the_cosine_range_is_refused(gamma):
    """Issue 22 item 8: `adaptive:gamma=5` (a threshold no cosine reaches) was accepted and
    silently meant plain CFG; now a SpecError names the range, on the spec surface too."""
    from flowkit.api import build_guidance
    from flowkit.errors import SpecError

    with pytest.raises(ValueError, match="from -1 to 1"):
        AdaptiveGuidance(gamma=gamma)
    with pytest.raises(SpecError, match="from -1 to 1" if abs(gamma) < 10 else "non-finite|finite"):
        build_guidance(f"cfg+adaptive:gamma={gamma}", 1.0)


@pytest.mark.parametrize("k", [0, 1, 3])
def test_gamma_minus_one_fires_after_k_guided_steps(k):
    x, stats, _ = _sample([CFG(scale=3.0), AdaptiveGuidance(gamma=-1.0, min_guided_steps=k)])
    assert stats.nfe == [STEPS + max(k, 1)] * 3  # the first step is always guided
    # the first k steps equal CFG's, the rest are conditional-only
    rows = [r.branches.get("uncond", 0) for r in stats.steps]
    assert rows == [3] * max(k, 1) + [0] * (STEPS - max(k, 1))


def test_first_k_steps_equal_cfg_then_conditional():
    k = 3
    seen = {}

    from flowkit.sampling_loop import integrate as run_

    def go(modules, tag):
        def spy(ctx, step, x, pred):
            seen.setdefault(tag, []).append(x.clone())

        ctx = context(3, STEPS, modules)
        noise = ctx.randn((5,)).double()
        return run_(Euler(), ctx, noise, TimeGrid.uniform().build(STEPS, PATH), callback=spy)

    go([CFG(scale=3.0), AdaptiveGuidance(gamma=-1.0, min_guided_steps=k)], "ag")
    go([CFG(scale=3.0)], "cfg")
    for i in range(k):
        assert torch.equal(seen["ag"][i], seen["cfg"][i])
    assert not torch.allclose(seen["ag"][-1], seen["cfg"][-1], atol=1e-6)


def test_does_not_fire_when_only_noise_space_agrees():
    """Near t = 1 noise predictions of cond and uncond agree (cosine ~ 1) while x0 differs."""
    opposite = dict(cond_shift=0.3, uncond_shift=-1.7)  # x0 means +1 and -1, noise ~ x near t = 1
    ag_x0 = AdaptiveGuidance(gamma=0.99)
    _, stats, ctx = _sample([CFG(scale=3.0), ag_x0], steps=4, **opposite)
    assert stats.nfe == [8] * 3  # never fired
    ag_eps = AdaptiveGuidance(gamma=0.99, space="epsilon")
    _, stats_eps, ctx_eps = _sample([CFG(scale=3.0), ag_eps], steps=4, **opposite)
    assert stats_eps.nfe == [5] * 3  # fired after the first step: the degenerate policy
    assert float(ctx_eps.state_for(ag_eps)["cosine"].nan_to_num(1.0).min()) >= -1


def test_decisions_are_per_sample():
    """Samples whose cond and uncond agree stop guidance; the others keep it."""
    ag = AdaptiveGuidance(gamma=0.9999)
    ctx = context(3, STEPS, [CFG(scale=3.0), ag], cond_shift=0.3, uncond_shift=-1.7)
    ctx.conds["uncond"].tensors["shift"][0] = 0.3  # sample 0: uncond == cond
    noise = ctx.randn((5,)).double()
    _, stats = integrate(Euler(), ctx, noise, TimeGrid.uniform().build(STEPS, PATH))
    assert stats.nfe[0] == STEPS + 1 and stats.nfe[1] == stats.nfe[2] == 2 * STEPS


def test_policy_needs_a_combiner_and_checks_parameters():
    with pytest.raises(GuidanceStackError, match="cfg"):
        GuidanceStack([AdaptiveGuidance()])
    with pytest.raises(ValueError, match="gamma"):
        AdaptiveGuidance(gamma=-2)
    with pytest.raises(ValueError, match="min_guided_steps"):
        AdaptiveGuidance(min_guided_steps=-1)
