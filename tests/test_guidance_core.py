"""The guidance stack and sampling loop on the analytic Gaussian world."""

import pytest
import torch

from analytic import conds, context, denoiser, gaussian_velocity
from flowkit.conditioning import Conditioning
from flowkit.context import Context
from flowkit.denoiser import FunctionDenoiser
from flowkit.errors import GuidanceStackError, NonFiniteError
from flowkit.guidance import CFG, Guidance, GuidanceStack
from flowkit.guidance.cfg import rescale_noise_cfg
from flowkit.paths import LinearPath
from flowkit.samplers import Euler, Heun
from flowkit.sampling_loop import integrate
from flowkit.seeding import generators_for, randn_per_sample
from flowkit.timegrid import TimeGrid

PATH = LinearPath()


def _run(modules, steps=6, batch=3, sampler=None, den=None, seed=0):
    noise = randn_per_sample((5,), generators_for(seed, range(batch))).double()
    ctx = context(batch, steps, modules, seed=seed, den=den)
    return integrate(sampler or Euler(), ctx, noise, TimeGrid.uniform().build(steps, PATH)) + (noise, ctx)


def _manual_cfg_euler(noise, steps, w):
    """Euler with v = v_u + w (v_c - v_u), written out by hand."""
    x = noise.clone()
    ts = TimeGrid.uniform().build(steps, PATH)
    c, u = conds(x.shape[0])["cond"], conds(x.shape[0])["uncond"]
    for i in range(steps):
        t = ts[i].expand(x.shape[0])
        vc, vu = gaussian_velocity(x, t * 1000, c), gaussian_velocity(x, t * 1000, u)
        x = x + (ts[i + 1] - ts[i]) * (vu + w * (vc - vu))
    return x


@pytest.mark.parametrize("space", ["model_output", "x0", "epsilon", "velocity"])
def test_cfg_matches_the_formula_in_every_space(space):
    x, stats, noise, _ = _run([CFG(scale=3.0, space=space)])
    ref = _manual_cfg_euler(noise, 6, 3.0)
    assert torch.allclose(x, ref, atol=1e-9)
    # negative control: a different scale does not match
    assert not torch.allclose(_manual_cfg_euler(noise, 6, 2.5), x, atol=1e-3)
    assert stats.nfe == [12, 12, 12]
    assert stats.forward_calls == 6  # both branches in one forward pass per step


def test_unbatched_branches_give_the_same_result_with_more_calls():
    xa, sa, _, _ = _run([CFG(scale=3.0)])
    xb, sb, _, _ = _run([CFG(scale=3.0, batched=False)])
    assert torch.allclose(xa, xb, atol=1e-12)
    assert sa.nfe == sb.nfe and sb.forward_calls == 2 * sa.forward_calls


def test_scale_one_and_no_guidance_are_conditional_sampling():
    x1, s1, _, _ = _run([CFG(scale=1.0)])
    x0, s0, _, _ = _run([])
    assert torch.allclose(x1, x0, atol=1e-12)
    assert s1.nfe == s0.nfe == [6, 6, 6]


def test_window_limits_guidance_to_its_steps():
    x, stats, noise, _ = _run([CFG(scale=3.0, start=0.5)], steps=6)
    assert stats.nfe == [9, 9, 9]
    assert [r.branches.get("uncond", 0) for r in stats.steps] == [0, 0, 0, 3, 3, 3]


class DropUncondFor(Guidance):
    """A test policy: drop the unconditional branch for the samples in `rows`."""

    name = "drop-test"
    description = "test policy"
    role = "policy"

    def __init__(self, *, rows=(0,)):
        super().__init__()
        self.rows = rows

    def branches(self, ctx, requests):
        mask = torch.zeros(ctx.batch_size, dtype=torch.bool)
        mask[list(self.rows)] = True
        requests.drop("uncond", mask)


def test_per_sample_branch_decisions():
    x, stats, noise, _ = _run([CFG(scale=3.0), DropUncondFor(rows=(0,))])
    x_cfg, _, _, _ = _run([CFG(scale=3.0)])
    x_cond, _, _, _ = _run([])
    assert torch.allclose(x[0], x_cond[0], atol=1e-12)  # sample 0: conditional only
    assert torch.allclose(x[1:], x_cfg[1:], atol=1e-12)  # the others: untouched CFG
    assert stats.nfe == [6, 12, 12]


class SupplyUncond(Guidance):
    """A test module that supplies the unconditional branch from the conditional model."""

    name = "supply-test"
    description = "test supplier"
    role = "policy"

    def branches(self, ctx, requests):
        pass

    def correct(self, ctx, x, pred, preds):
        return pred


def test_supplied_branch_replaces_evaluation():
    class Supplier(Guidance):
        name = "supplier"
        description = "supplies uncond = a fixed shifted prediction"
        role = "policy"

        def branches(self, ctx, requests):
            B = ctx.batch_size
            c = Conditioning({"shift": torch.ones(B, dtype=torch.float64)})
            pred = ctx.denoiser(ctx.x, ctx.t, c)  # the same as the real uncond
            requests.supply("uncond", torch.ones(B, dtype=torch.bool), pred)

    x_cfg, s_cfg, noise, _ = _run([CFG(scale=3.0)])
    x, stats, _, _ = _run([CFG(scale=3.0), Supplier()])
    assert torch.allclose(x, x_cfg, atol=1e-12)
    # the supplier's own denoiser calls bypass the loop: the loop evaluated only 'cond'
    assert all(r.branches == {"cond": 3} for r in stats.steps)


def test_stack_validation():
    with pytest.raises(GuidanceStackError, match="combiners"):
        GuidanceStack([CFG(), CFG(scale=2.0)])
    with pytest.raises(GuidanceStackError, match="add a combiner"):
        GuidanceStack([DropUncondFor()])
    with pytest.raises(ValueError, match="start"):
        CFG(start=0.6, stop=0.2)
    with pytest.raises(ValueError, match="scale"):
        CFG(scale=-1)


def test_guidance_rescale_matches_diffusers():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg as ref

    g = torch.Generator().manual_seed(0)
    guided, cond = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    assert torch.allclose(rescale_noise_cfg(guided, cond, 0.7), ref(guided, cond, 0.7), atol=1e-6)


def test_nan_from_step_3_names_step_3():
    calls = {"n": 0}

    def bad(x, timestep, cond):
        calls["n"] += 1
        v = gaussian_velocity(x, timestep, cond)
        return v * float("nan") if calls["n"] > 3 else v

    den = FunctionDenoiser(bad, PATH, "velocity")
    with pytest.raises(NonFiniteError, match="step 3"):
        _run([], steps=10, den=den)


def test_stage_change_clears_module_state():
    m = CFG(scale=2.0)
    ctx = context(2, 4, [m])
    ctx.state_for(m)["momentum"] = torch.ones(2)
    ctx.stack.on_stage_change(ctx, (3, 32, 32), (3, 16, 16))
    assert ctx.state_for(m) == {}


def test_reindex_moves_per_sample_state():
    m = CFG(scale=2.0)
    ctx = context(3, 4, [m])
    ctx.state_for(m)["avg"] = torch.tensor([10.0, 20.0, 30.0])
    ctx.ledger.charge(torch.tensor([0, 1, 1, 2, 2, 2]))  # rows spent 1, 2, 3 evaluations
    ctx.reindex(torch.tensor([2, 2, 0]))
    assert ctx.state_for(m)["avg"].tolist() == [30.0, 30.0, 10.0]
    assert ctx.nfe.tolist() == [3, 3, 1]
    assert ctx.ledger.per_image.tolist() == [1, 2, 3]  # what each image spent is kept
    assert ctx.conds["cond"]["shift"].shape[0] == 3
    # two copies of a particle continue with different noise
    a, b = ctx.randn((4,))[:2]
    assert not torch.allclose(a, b)


def test_heun_calls_hooks_once_per_step():
    seen = []

    class Count(Guidance):
        name = "count"
        description = "records after_step calls"

        def after_step(self, ctx, x, pred, preds):
            seen.append(ctx.step)

    _run([Count()], steps=5, sampler=Heun())
    assert seen == [0, 1, 2, 3, 4]
