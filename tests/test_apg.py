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
                                            (dict(momentum=0.5), "momentum"), (dict(norm_threshold=-2), "norm"),
                                            (dict(norm="linf"), "norm must be l2")])
def test_bad_parameters(kwargs, words):
    with pytest.raises(ValueError, match=words):
        APG(**kwargs)


# -- scale 1: off, as in diffusers ----------------------------------------------------------

@pytest.mark.parametrize("formulation", ["paper", "uncond"])
def test_scale_one_returns_the_conditional_prediction_like_diffusers(formulation):
    """At w = 1 diffusers' guider is off (`_is_apg_enabled`): it returns pred_cond and needs
    one condition. Mutant caught: formulation="uncond" returning uncond + 1 * update."""
    from diffusers.guiders import AdaptiveProjectedGuidance
    from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer

    ours = APG(scale=1.0, eta=0.3, momentum=-0.5, norm_threshold=0.5, space="model_output",
               formulation=formulation)
    ref = AdaptiveProjectedGuidance(guidance_scale=0.0 if formulation == "paper" else 1.0,
                                    adaptive_projected_guidance_momentum=-0.5,
                                    adaptive_projected_guidance_rescale=0.5, eta=0.3,
                                    use_original_formulation=formulation == "paper")
    ref.momentum_buffer = MomentumBuffer(-0.5)
    ctx = context(3, 4, [ours])
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        ctx.step = step
        ref.set_state(step=step, num_inference_steps=4, timestep=torch.tensor(0))
        cond = torch.randn(3, 4, 8, 8, generator=g)
        uncond = cond + 0.3 * torch.randn(3, 4, 8, 8, generator=g)
        want = ref.forward(cond, uncond).pred
        assert torch.equal(want, cond)
        assert torch.equal(ours.combine(ctx, _preds(cond, uncond)).value, want)
    assert ref.num_conditions == 1 and ours.extra_branches == 0
    assert "avg" not in ctx.state_for(ours)  # momentum untouched while off, as diffusers' buffer


def test_scale_one_evaluates_no_unconditional_branch():
    steps = 4
    ctx = context(2, steps, [APG(scale=1.0, formulation="uncond")])
    x, stats = integrate(Euler(), ctx, ctx.randn((5,)).double(), TimeGrid.uniform().build(steps, PATH))
    assert stats.nfe == [steps, steps]
    ctx_cond = context(2, steps, [])
    plain, _ = integrate(Euler(), ctx_cond, ctx_cond.randn((5,)).double(), TimeGrid.uniform().build(steps, PATH))
    assert torch.equal(x, plain)


# -- the norm threshold ----------------------------------------------------------------------

def rescale_errors(norm="l2"):
    """Max errors [small, large] of APG's combine (eta 1, no momentum, paper form) against
    eq. 9 by hand, D_cond + (w - 1) dD min(1, r / size(dD)), on a batch whose first sample's
    difference is under the threshold and whose second is over it (size: the L2 norm, or the
    per-element RMS for norm="rms"); with the `rescaled` flags seen."""
    w, n = 6.0, 4 * 8 * 8
    r = 2.0 if norm == "l2" else 2.0 / n ** 0.5
    g = torch.Generator().manual_seed(3)
    cond = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    d = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    d = d / d.flatten(1).norm(dim=1).view(2, 1, 1, 1) * torch.tensor([0.5, 8.0]).view(2, 1, 1, 1)  # L2 norms 0.5, 8
    apg = APG(scale=w, eta=1.0, momentum=0.0, norm_threshold=r, norm=norm, space="model_output")
    ctx = context(2, 4, [apg])
    got = apg.combine(ctx, _preds(cond, cond - d)).value
    size = d.flatten(1).norm(dim=1) / (n ** 0.5 if norm == "rms" else 1.0)
    want = cond + (w - 1) * d * torch.clamp(r / size, max=1.0).view(2, 1, 1, 1)
    err = (got - want).flatten(1).abs().max(dim=1).values
    return err.tolist(), ctx.state_for(apg)["rescaled"].tolist()


@pytest.mark.parametrize("norm", ["l2", "rms"])
def test_rescaling_binds_above_the_threshold_and_only_there(norm):
    """Mutants caught (tests/test_mutants.py): the factor forced to 1 (the large sample is not
    rescaled) and the clamp at 1 removed (the small sample is scaled up)."""
    check_rescale(norm)


def check_rescale(norm):
    err, rescaled = rescale_errors(norm)
    assert max(err) < 1e-9, err
    assert rescaled == [False, True]


def test_rms_threshold_carries_across_sizes():
    """The same dD at twice the resolution (nearest upsampling: same per-element RMS, twice
    the L2 norm) gets the same factor under norm="rms" and half of it under norm="l2"."""
    from flowkit.guidance.apg import rescale_factor

    d = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    big = torch.nn.functional.interpolate(d, scale_factor=2, mode="nearest")
    small_rms, big_rms = rescale_factor(d, 0.1, "rms"), rescale_factor(big, 0.1, "rms")
    torch.testing.assert_close(small_rms, big_rms)
    assert (small_rms < 1).all()
    torch.testing.assert_close(rescale_factor(big, 1.0, "l2"), rescale_factor(d, 1.0, "l2") / 2)
    # rms with r equals l2 with r * sqrt(n)
    torch.testing.assert_close(rescale_factor(d, 0.1, "rms"), rescale_factor(d, 0.1 * 256 ** 0.5, "l2"))


# -- the paper's Algorithm 1 in x0 space, written out -----------------------------------------

def apg_algorithm1_run(steps=6, w=5.0, eta=0.0, beta=-0.5, r=1.0, batch=3):
    """(flowkit's final state, the hand transcription's, per-step rescale flags [steps][B]) of
    APG in x0 space on the analytic world, with projection (eta = 0), reverse momentum and a
    threshold that binds on the early steps only. By hand, per step (Algorithm 1):
    D_c, D_u = x - t v_c, x - t v_u; dD = D_c - D_u; avg = dD + beta avg; dD = avg;
    dD *= min(1, r / ||dD||); dD_par = <dD, D_c> D_c / ||D_c||^2; dD_orth = dD - dD_par;
    D = D_c + (w - 1)(dD_orth + eta dD_par); Euler with v = (x - D) / t."""
    from analytic import conds, gaussian_velocity

    apg = APG(scale=w, eta=eta, momentum=beta, norm_threshold=r)  # x0 space, paper form
    ctx = context(batch, steps, [apg])
    noise = ctx.randn((5,)).double()
    ts = TimeGrid.uniform().build(steps, PATH)
    flags = []
    x_run, _ = integrate(Euler(), ctx, noise, ts,
                   callback=lambda c, i, x, p: flags.append(c.state_for(apg)["rescaled"].tolist()))
    x = noise * ts[0]
    c, u = conds(batch)["cond"], conds(batch)["uncond"]
    avg = torch.zeros_like(x)
    for i in range(steps):
        t = ts[i]
        vc, vu = (gaussian_velocity(x, t.expand(batch) * 1000, k) for k in (c, u))
        D_c, D_u = x - t * vc, x - t * vu
        avg = (D_c - D_u) + beta * avg
        dD = avg * torch.clamp(r / avg.norm(dim=1, keepdim=True), max=1.0)
        par = (dD * D_c).sum(dim=1, keepdim=True) / (D_c * D_c).sum(dim=1, keepdim=True) * D_c
        D = D_c + (w - 1) * ((dD - par) + eta * par)
        x = x + (ts[i + 1] - t) * (x - D) / t
    return x_run, x, flags


def test_apg_x0_follows_algorithm_1_with_projection_momentum_and_rescaling():
    """Mutants caught (tests/test_mutants.py): the momentum's sign flipped, the projection
    dropped, the rescale factor forced to 1 or its clamp at 1 removed."""
    check_algorithm1()


def check_algorithm1():
    x_run, x_hand, flags = apg_algorithm1_run()
    assert torch.allclose(x_run, x_hand, atol=1e-9), (x_run - x_hand).abs().max()
    bound = [all(f) for f in flags]
    assert any(bound) and not all(any(f) for f in flags)  # rescaling binds on some steps, not on all
