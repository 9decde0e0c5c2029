"""The guidance stack and sampling loop on the analytic Gaussian world."""

import pytest
import torch

from analytic import MU, S, conds, context, denoiser, gaussian_velocity
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
    """Without a rescale CFG is affine, combined on the raw output whatever the space (so this
    runs one code path; the spaces' own code is tested with the rescale below)."""
    x, stats, noise, _ = _run([CFG(scale=3.0, space=space)])
    ref = _manual_cfg_euler(noise, 6, 3.0)
    assert torch.allclose(x, ref, atol=1e-9)
    # negative control: a different scale does not match
    assert not torch.allclose(_manual_cfg_euler(noise, 6, 2.5), x, atol=1e-3)
    assert stats.nfe == [12, 12, 12]
    assert stats.forward_calls == 6  # both branches in one forward pass per step


PATTERN = torch.tensor([1.0, -0.5, 2.0, 0.3, -1.2], dtype=torch.float64)


def patterned_velocity(x, timestep, cond, s=S):
    """The analytic world's exact velocity with the branch's shift spread over the dimensions
    (data mean MU + shift * PATTERN): cond and uncond then differ per dimension, so CFG's
    rescale is not the identity (on the plain world every branch's velocity is A x plus a
    scalar, and the per-sample std matching does nothing in any space)."""
    t = (timestep / 1000).view(-1, 1).to(x.dtype)
    m = MU + cond["shift"].view(-1, 1).to(x.dtype) * PATTERN
    x0 = m + (1 - t) * s * s / ((1 - t) ** 2 * s * s + t * t) * (x - (1 - t) * m)
    return (x - (1 - t) * x0) / t - x0


def _served_as(kind):
    """The patterned world's model serving `kind` predictions (the velocity converted by hand)."""
    def fn(x, timestep, cond):
        v = patterned_velocity(x, timestep, cond)
        t = (timestep / 1000).view(-1, 1).to(x.dtype)
        return {"velocity": v, "x0": x - t * v, "epsilon": x + (1 - t) * v}[kind]

    return FunctionDenoiser(fn, PATH, kind)


def cfg_rescale_run(space, kind, steps=6, w=3.0, phi=0.7, batch=3):
    """(flowkit's final state, the hand-written one) for CFG with guidance_rescale=phi measured
    in `space`, on the patterned world served as `kind` predictions, from t = 0.9 (the noise
    space is singular at t = 1 on the linear path). By hand: v_g = v_u + w (v_c - v_u); the
    guided and conditional predictions written in the space (x0 = x - t v, eps = x + (1 - t) v),
    the guided one's per-sample std matched to the conditional one's, mixed by phi, and
    brought back to a velocity for the Euler step."""
    noise = randn_per_sample((5,), generators_for(0, range(batch))).double()
    ts = torch.linspace(0.9, 0.0, steps + 1, dtype=torch.float64)
    ctx = context(batch, steps, [CFG(scale=w, guidance_rescale=phi, space=space)], den=_served_as(kind))
    x_run, _ = integrate(Euler(), ctx, noise, ts)
    where = kind if space == "model_output" else space
    to_space = {"velocity": lambda x, t, v: v, "x0": lambda x, t, v: x - t * v,
                "epsilon": lambda x, t, v: x + (1 - t) * v}[where]
    to_velocity = {"velocity": lambda x, t, p: p, "x0": lambda x, t, p: (x - p) / t,
                   "epsilon": lambda x, t, p: (p - x) / (1 - t)}[where]
    x = ts[0] * noise  # the run starts at noise * ts[0]
    c, u = conds(batch)["cond"], conds(batch)["uncond"]
    for i in range(steps):
        t = ts[i]
        vc, vu = (patterned_velocity(x, t.expand(batch) * 1000, k) for k in (c, u))
        g, cc = to_space(x, t, vu + w * (vc - vu)), to_space(x, t, vc)
        g = phi * g * (cc.std(dim=1, keepdim=True) / g.std(dim=1, keepdim=True)) + (1 - phi) * g
        x = x + (ts[i + 1] - t) * to_velocity(x, t, g)
    return x_run, x


CFG_SPACE_CASES = [(space, kind) for kind in ("velocity", "x0", "epsilon")
                   for space in ("model_output", "x0", "epsilon", "velocity")]


@pytest.mark.parametrize("space, kind", CFG_SPACE_CASES)
def test_cfg_rescale_is_measured_in_its_space(space, kind):
    """With guidance_rescale > 0 the space matters (the rescale is not affine), so every space
    runs its own conversions, for models serving velocity, x0 and noise. Mutants caught
    (tests/test_mutants.py): a wrong conversion to one space, the space ignored."""
    check_cfg_rescale(space, kind)


def check_cfg_rescale(space, kind):
    x_run, x_hand = cfg_rescale_run(space, kind)
    assert torch.allclose(x_run, x_hand, atol=1e-9), (x_run - x_hand).abs().max()


def test_cfg_rescale_spaces_differ():
    """Negative control: the spaces give different results, so the test above can tell them apart."""
    finals = {space: cfg_rescale_run(space, "velocity")[0] for space in ("x0", "epsilon", "velocity")}
    assert not torch.allclose(finals["x0"], finals["epsilon"], atol=1e-3)
    assert not torch.allclose(finals["x0"], finals["velocity"], atol=1e-3)
    assert not torch.allclose(finals["epsilon"], finals["velocity"], atol=1e-3)


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
