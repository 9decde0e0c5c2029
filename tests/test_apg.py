"""APG: parity with diffusers' guider in its space, reduction to CFG, state, saturation."""

import pytest
import torch

from analytic import context
from flowkit.guidance import APG, CFG
from flowkit.guidance_base import BranchPredictions
from flowkit.paths import LinearPath
from flowkit.prediction import Prediction
from flowkit.samplers import Euler
from flowkit.sampling_loop import integrate
from flowkit.timegrid import TimeGrid

PATH = LinearPath()


def _preds(cond, uncond, t=0.6, present=None):
    B = cond.shape[0]
    point = PATH.at(torch.full((B,), t, dtype=torch.float64))
    x = torch.zeros_like(cond)
    mk = lambda v: Prediction(v, "velocity", x, point, PATH)  # noqa: E731
    pres = torch.ones(B, dtype=torch.bool) if present is None else present
    return BranchPredictions({"cond": mk(cond), "uncond": mk(uncond)},
                             {"cond": torch.ones(B, dtype=torch.bool), "uncond": pres})


@pytest.mark.parametrize("formulation", ["paper", "uncond"])
@pytest.mark.parametrize("threshold", [0.5, 1e6])
@pytest.mark.parametrize("eta", [0.0, 0.4, 1.0])
def test_parity_with_diffusers_guider_over_steps(formulation, threshold, eta):
    from diffusers.guiders import AdaptiveProjectedGuidance

    w = 5.0
    ours = APG(scale=w, eta=eta, momentum=-0.5, norm_threshold=threshold, space="model_output",
               formulation=formulation)
    ref = AdaptiveProjectedGuidance(guidance_scale=w - 1 if formulation == "paper" else w,
                                    adaptive_projected_guidance_momentum=-0.5,
                                    adaptive_projected_guidance_rescale=threshold, eta=eta,
                                    use_original_formulation=formulation == "paper")
    from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer

    ref.momentum_buffer = MomentumBuffer(-0.5)  # what the guider builds at its step 0
    ctx = context(3, 6, [ours])
    g = torch.Generator().manual_seed(0)
    rescaled_any = False
    for step in range(5):
        ctx.step = step
        ref.set_state(step=step, num_inference_steps=6, timestep=torch.tensor(0))
        cond = torch.randn(3, 4, 8, 8, generator=g)
        uncond = cond + 0.3 * torch.randn(3, 4, 8, 8, generator=g)
        got = ours.combine(ctx, _preds(cond, uncond)).value
        want = ref.forward(cond, uncond).pred
        assert torch.allclose(got, want, atol=1e-6), (step, (got - want).abs().max())
        rescaled_any |= bool(ctx.state_for(ours)["rescaled"].any())
    assert rescaled_any == (threshold < 1e3)  # the low threshold really rescaled samples


def test_eta_one_without_rescale_or_momentum_is_cfg():
    steps = 6
    from analytic import MU  # noqa: F401

    def sample(modules):
        ctx = context(3, steps, modules)
        noise = ctx.randn((5,)).double()
        return integrate(Euler(), ctx, noise, TimeGrid.uniform().build(steps, PATH))[0]

    for space in ("x0", "model_output"):
        apg = APG(scale=4.0, eta=1.0, momentum=0.0, norm_threshold=None, space=space)
        assert torch.allclose(sample([apg]), sample([CFG(scale=4.0)]), atol=1e-9)
    # negative control: the default APG (eta=0, momentum, rescaling) differs from CFG
    assert not torch.allclose(sample([APG(scale=4.0)]), sample([CFG(scale=4.0)]), atol=1e-4)


def test_absent_uncond_rows_take_cond_and_keep_momentum():
    apg = APG(scale=5.0, space="model_output")
    ctx = context(2, 4, [apg])
    cond, uncond = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    present = torch.tensor([True, False])
    out = apg.combine(ctx, _preds(cond, uncond, present=present)).value
    assert torch.equal(out[1], cond[1]) and not torch.equal(out[0], cond[0])
    assert torch.equal(ctx.state_for(apg)["avg"][1], torch.zeros_like(cond[1]))


def test_momentum_resets_on_stage_change():
    apg = APG(scale=5.0)
    ctx = context(2, 4, [apg])
    apg.combine(ctx, _preds(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)))
    assert "avg" in ctx.state_for(apg)
    ctx.stack.on_stage_change(ctx, (3, 32, 32), (3, 16, 16))
    assert "avg" not in ctx.state_for(apg)


@pytest.mark.parametrize("kwargs, words", [(dict(scale=-1), "scale"), (dict(eta=1.5), "eta"),
                                            (dict(momentum=0.5), "momentum"), (dict(norm_threshold=-2), "norm")])
def test_bad_parameters(kwargs, words):
    with pytest.raises(ValueError, match=words):
        APG(**kwargs)
