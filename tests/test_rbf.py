"""Inference-time scaling: rollover budget forcing (samplers/rbf.py), best-of-N (bon.py), SMC
(smc.py) and the SDE's VP frame (flowkit.sampler_base.sde_step, flowkit.paths.VPSDEPath).

Analytic worlds (tests/analytic.py's Gaussian, a 1-D two-mode mixture) for the budget
arithmetic, the marginals and the official step; the tiny shapes model and the tiny diffusers
pipelines for the surfaces. Each test names the mutant it catches.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import tiny_pipes
import torch
from analytic import MU, S, context, gaussian_velocity
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flowkit
from flowkit.conditioning import Conditioning
from flowkit.context import Context
from flowkit.denoiser import FunctionDenoiser
from flowkit.errors import InputError, SpecError, UnsupportedError
from flowkit.guidance import CFG, Guidance
from flowkit.kit import ModelKit
from flowkit.paths import LinearPath, VPSDEPath
from flowkit.prediction import Prediction
from flowkit.rewards import Reward
from flowkit.sampler_base import Sampler, euler_step, sde_step
from flowkit.samplers import RBF, SMC, BestOfN, FlowSDE
from flowkit.sampling_loop import integrate
from flowkit.seeding import generators_for, randn_per_sample
from flowkit.timegrid import TimeGrid

one_thread = tiny_pipes.one_thread
PATH = LinearPath()
PROMPTS = ["a red circle", "two blue squares"]


def toy_reward(fn) -> Reward:
    return Reward.from_fn(fn, differentiable=False, name="toy")


CONST = toy_reward(lambda x: torch.zeros(x.shape[0], dtype=torch.float64))
WIGGLE = toy_reward(lambda x: torch.sin(37.0 * x.flatten(1).double().sum(dim=1)))


def rising() -> Reward:
    """A reward higher on every call than on any call before (every proposal beats the best)."""
    calls = [0]

    def fn(x):
        calls[0] += 1
        return torch.full((x.shape[0],), float(calls[0]), dtype=torch.float64)

    return toy_reward(fn)


def scheduled(values) -> Reward:
    """A reward giving values[k] on its k-th call (one image)."""
    calls = [0]

    def fn(x):
        calls[0] += 1
        return torch.full((x.shape[0],), float(values[calls[0] - 1]), dtype=torch.float64)

    return toy_reward(fn)


class RefBranch(Guidance):
    """Evaluates one more branch at every evaluation (a proposal under CFG + it costs 3, as GFCG's)."""

    name = "ref-branch"
    description = "one more branch"

    @property
    def extra_branches(self) -> int:
        return 1

    def branches(self, ctx, requests) -> None:
        requests.need("ref")


STACKS = {1: lambda: [], 2: lambda: [CFG(scale=3.0)], 3: lambda: [CFG(scale=3.0), RefBranch()]}


def toy_context(batch: int, steps: int, modules=(), seed: int = 0, den=None) -> Context:
    ctx = context(batch, steps, modules, seed=seed, den=den)
    ctx.kit = ModelKit(family="toy", to_pixels=lambda x: x)
    ctx.conds["ref"] = ctx.conds["cond"]
    return ctx


def run(sampler, *, batch=2, steps=4, modules=(), seed=0, dim=3, den=None, grid=None, callback=None):
    ctx = toy_context(batch, steps, modules, seed=seed, den=den)
    # the start noise from the run's own generators, as flowkit.sample draws it (fresh generators
    # of the same seeds would draw it again as the first step's noise)
    noise = randn_per_sample((dim,), ctx.generators).double()
    ts = (grid or TimeGrid.uniform()).build(steps, PATH)
    x, stats = integrate(sampler, ctx, noise, ts, callback=callback)
    return x, stats, ctx


def expected(budget: int, particles: int, cost: int, steps: int) -> tuple[int, list[int]]:
    """(NFE per image, per-step NFE per image with a reward that never improves): the initial
    particles, then P = floor((budget - n c) / c) proposals over the steps - 1 stochastic steps,
    k = floor(P / (steps - 1)) in each, the rest in the last; the final step costs nothing."""
    n_s = steps - 1
    if n_s == 0:
        return particles * cost, [particles * cost]
    P = (budget - particles * cost) // cost
    k = P // n_s
    return (particles + P) * cost, [particles * cost] + [k * cost] * (n_s - 1) + [(P - k * (n_s - 1)) * cost]


# --------------------------------------------------------------------------- the VP frame


def test_vp_sde_path_coefficients_warp_and_derivatives():
    """alpha^2 + sigma^2 = 1, t(r(t)) = t, the derivatives match float64 central differences,
    and SNR matching holds (mutant: d sigma/dr without exp(-T) misses the differences)."""
    vp = VPSDEPath()
    r = torch.linspace(0.05, 1.0, 20, dtype=torch.float64)
    a, s, da, ds = vp.coefficients(r)
    assert torch.allclose(a * a + s * s, torch.ones_like(a), atol=1e-14)
    h = 1e-6
    ap, sp, _, _ = vp.coefficients(r + h)
    am, sm, _, _ = vp.coefficients(r - h)
    assert torch.allclose(da, (ap - am) / (2 * h), rtol=1e-7) and torch.allclose(ds, (sp - sm) / (2 * h), rtol=1e-7)
    t = vp.time_from_native(r)
    assert torch.allclose(vp.native_time(t), r, atol=1e-12)
    assert torch.allclose((1 - t) / t, a / s, rtol=1e-12)
    assert abs(float(vp.time_from_native(torch.tensor(1.0, dtype=torch.float64))) - 0.99347) < 1e-5


def official_vp_step(x_bar: torch.Tensor, r: float, r_next: float, w: torch.Tensor, velocity) -> torch.Tensor:
    """A float64 transcription of one step of the official code (KAIST-Visual-AI-Group/
    Flow-Inference-Time-Scaling: rbf/prior/flux.py `compute_velocity_transform_scheduler`,
    FlowMatchEulerDiscreteScheduler.`get_sde_drift` / `convert_velocity_to_score`, FluxPrior.`step`;
    rbf/prior/denoise_schedulers/scheduler.py `VPScheduler`, `CondOTScheduler`), with
    diffusion_coefficient=square, diffusion_norm=3, convert_scheduler=vp."""
    b, B = 0.1, 20.0

    def vp(r):
        T = 0.5 * r**2 * (B - b) + r * b
        dT = r * (B - b) + b
        return (math.exp(-0.5 * T), math.sqrt(1 - math.exp(-T)), -0.5 * dT * math.exp(-0.5 * T),
                0.5 * dT * math.exp(-T) / math.sqrt(1 - math.exp(-T)))

    alpha_r, sigma_r, d_alpha_r, d_sigma_r = vp(r)
    t = 1 / (alpha_r / sigma_r + 1.0)  # CondOT snr_inverse: kappa = 1 / (snr + 1)
    alpha_t, sigma_t, d_alpha_t, d_sigma_t = 1 - t, t, -1.0, 1.0
    s_r = sigma_r / sigma_t
    dt_r = sigma_t * sigma_t * (sigma_r * d_alpha_r - alpha_r * d_sigma_r) / (
        sigma_r * sigma_r * (sigma_t * d_alpha_t - alpha_t * d_sigma_t))
    ds_r = (sigma_t * d_sigma_r - sigma_r * d_sigma_t * dt_r) / (sigma_t * sigma_t)
    u_t = velocity(x_bar / s_r, t)
    u_r = ds_r * x_bar / s_r + dt_r * s_r * u_t
    diffuse = 3.0 * r**2.0
    ratio = alpha_r / d_alpha_r
    score = (ratio * u_r - x_bar) / (sigma_r**2 - ratio * d_sigma_r * sigma_r)
    drift = -u_r + (0.5 * diffuse**2) * score
    d_t = r - r_next
    return x_bar + drift * d_t + diffuse * (w * math.sqrt(abs(d_t)))


@pytest.mark.parametrize("frame", ["vp", "linear"])
def test_vp_step_matches_the_official_step(frame):
    """On the official grid (r = sqrt(1 - (1 - u)^2), 10 steps) flowkit's frame=vp step equals a
    float64 transcription of the official step to 1e-10 (control: frame=linear, the same noise,
    differs)."""
    vp = VPSDEPath()
    cond = Conditioning({"shift": torch.zeros(6, dtype=torch.float64)})
    gen = torch.Generator().manual_seed(0)
    x_bar = torch.randn(6, 4, generator=gen, dtype=torch.float64)

    def velocity(x, t):
        return gaussian_velocity(x, torch.full((x.shape[0],), t * 1000.0, dtype=torch.float64), cond)

    rs = [math.sqrt(1 - (1 - u) ** 2) for u in np.linspace(1.0, 0.0, 11)]
    worst = 0.0
    for r, r_next in zip(rs[:-2], rs[1:-1]):  # the stochastic steps
        w = torch.randn(6, 4, generator=gen, dtype=torch.float64)
        ref = official_vp_step(x_bar, r, r_next, w, velocity)
        t, t_next = (float(vp.time_from_native(torch.tensor(v, dtype=torch.float64))) for v in (r, r_next))
        x = x_bar / (vp.coefficients(torch.tensor(r, dtype=torch.float64))[1].item() / t)
        pred = Prediction(velocity(x, t), "velocity", x, PATH.at(torch.full((6,), t, dtype=torch.float64)), PATH)
        new = sde_step(x, t, t_next, pred, w, c=3.0, power=2.0, frame=frame)
        ours = new * (vp.coefficients(torch.tensor(r_next, dtype=torch.float64))[1].item() / t_next)
        worst = max(worst, float((ours - ref).abs().max()))
        x_bar = ref
    if frame == "vp":
        assert worst < 1e-10, worst
    else:
        assert worst > 1e-2, worst


def test_vp_frame_keeps_the_gaussian_marginals():
    """sde:frame=vp (g = 3 r^2) on the Gaussian world: the marginal at every checked time is the
    path's, N((1 - t) MU, (1 - t)^2 S^2 + t^2), and the final one the data law (mutants: the
    score term without its 1/2, the state not scaled into the VP frame, or noise scaled by dr
    for sqrt(dr), fail; sigma^2 for sigma in the score term is too small to see here, as sigma
    is near 1 where g is large: the official-step test catches that one).

    The grid is dense near r = 1 (r = 1 - (1 - u)^2, u uniform), as the official one is: there
    g^2 = 9, and a step of Euler-Maruyama multiplies the noise's variance by
    (1 - g^2 dr / 2)^2 + g^2 dr, which is 1 only to first order (a uniform grid in t of 10 steps
    takes dr = 0.34 in its first step and ends at 1.6 times the data's std). The start noise
    comes from generators of their own: the run's generators would draw it again as the
    first step's noise."""
    n, steps = 6000, 80
    u = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    ts = VPSDEPath().time_from_native(1 - (1 - u) ** 2)
    ts[-1] = 0.0
    seen = {}

    def look(ctx, step, x, pred):
        if step % 20 == 19 and step < steps - 1:
            seen[float(ts[step + 1])] = (float(x.mean()), float(x.std()))

    t0 = float(ts[0])
    noise = (1 - t0) * MU + t0 * randn_per_sample((1,), generators_for(99, range(n))).double()
    ctx = toy_context(n, steps)
    x, _ = integrate(FlowSDE(frame="vp"), ctx, noise, ts, callback=look)
    assert len(seen) == 3
    for t, (mean, std) in seen.items():
        want = math.sqrt((1 - t) ** 2 * S * S + t * t)
        assert abs(mean - (1 - t) * MU) < 4 * want / math.sqrt(n), (t, mean)
        assert abs(std / want - 1) < 0.04, (t, std, want)
    assert abs(float(x.mean()) - MU) < 0.03 and abs(float(x.std()) / S - 1) < 0.04


# --------------------------------------------------------------------------- budget arithmetic


def check_budget(steps: int, particles: int, cost: int, extra: int) -> None:
    budget = (particles + steps - 1) * cost + extra
    total, records = expected(budget, particles, cost, steps)
    # a reward that never improves spends exactly the base quota, the rest in the last step
    _, stats, _ = run(RBF(budget=budget, particles=particles, reward=CONST, frame="linear"),
                      modules=STACKS[cost](), steps=steps)
    assert stats.nfe == [total] * 2 and total <= budget, (stats.nfe, total, budget)
    assert [r.nfe // 2 for r in stats.steps] == records, ([r.nfe // 2 for r in stats.steps], records)
    # whatever it accepts and rolls over, the whole budget is spent and never exceeded
    _, stats, _ = run(RBF(budget=budget, particles=particles, reward=WIGGLE), modules=STACKS[cost](), steps=steps)
    assert stats.nfe == [total] * 2, (stats.nfe, total)
    assert all(n <= budget for n in stats.nfe)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.integers(1, 6), particles=st.integers(1, 4), cost=st.sampled_from([1, 2, 3]),
       extra=st.integers(0, 40))
def test_budget_is_never_exceeded_and_spent_as_the_formula_says(steps, particles, cost, extra):
    """Any budget, steps, initial particles and proposal cost (1: unguided, 2: CFG, 3: CFG and
    one more branch): NFE per image = n c + floor((budget - n c) / c) c <= budget, and the
    per-step records give the base quota (control below: an off-by-one quota fails it)."""
    check_budget(steps, particles, cost, extra)


def test_an_off_by_one_quota_fails_the_budget_check(monkeypatch):
    real = RBF._quota
    monkeypatch.setattr(RBF, "_quota", staticmethod(lambda left, c, n: real(left, c, n) + c))
    with pytest.raises(AssertionError):
        check_budget(5, 1, 2, 7)
    monkeypatch.setattr(RBF, "_quota", staticmethod(lambda left, c, n: real(left, c, n) - c))
    with pytest.raises(AssertionError):
        check_budget(5, 2, 3, 20)


def test_a_budget_below_the_minimum_is_refused_with_the_minimum():
    """(particles + stochastic steps) x the measured cost: 2 particles, 4 steps, CFG: 10."""
    with pytest.raises(InputError, match="minimum of 10 "):
        run(RBF(budget=9, particles=2, reward=CONST), modules=STACKS[2](), steps=4)
    run(RBF(budget=10, particles=2, reward=CONST), modules=STACKS[2](), steps=4)
    with pytest.raises(InputError, match="budget"):
        RBF(budget=0)


def test_rollover_read_from_the_step_records():
    """5 steps, CFG (c = 2), budget 26: P = 12 proposals, base quota k = 3 (6 NFE) per step.
    An always-improving reward uses one proposal per step and the last step spends the rest;
    a reward that never improves uses exactly the quota; per-step best-of-N spends the quota
    whatever the reward (mutant: no early acceptance gives the quota for the rising reward)."""
    per_image = lambda stats: [r.nfe for r in stats.steps]  # noqa: E731 - one image
    _, up, _ = run(RBF(budget=26, reward=rising()), modules=STACKS[2](), steps=5, batch=1)
    assert per_image(up) == [2, 2, 2, 2, 18]
    _, flat, _ = run(RBF(budget=26, reward=CONST), modules=STACKS[2](), steps=5, batch=1)
    assert per_image(flat) == [2, 6, 6, 6, 6]
    _, nobon, _ = run(RBF(budget=26, reward=rising(), rollover=False), modules=STACKS[2](), steps=5, batch=1)
    assert per_image(nobon) == [2, 6, 6, 6, 6]
    assert up.nfe == flat.nfe == nobon.nfe == [26]


def test_unused_quota_rolls_over_to_the_next_step():
    """Step 0 accepts its first proposal (2 NFE of 6 used, 4 carried); step 1 needs five
    proposals to beat the best, which only the carried quota pays for (mutant: a carry of 0
    stops step 1 after three proposals, [2, 2, 6, ...])."""
    values = [0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 2.0, 3.0] + [0.0] * 10
    _, stats, _ = run(RBF(budget=26, reward=scheduled(values)), modules=STACKS[2](), steps=5, batch=1)
    assert [r.nfe for r in stats.steps] == [2, 2, 10, 2, 10]


def test_rbf_takes_the_steps_best_when_nothing_beats_the_best():
    """Nothing beats the initial reward: each step keeps its own best proposal (the second of
    three here), not the first or the last (mutant: keeping the last proposal differs)."""
    values = [10.0] + [1.0, 5.0, 2.0] * 3 + [0.0] * 10
    picks = []

    class Spy(RBF):
        def _step(self, model, x, pred, *args, **kw):
            out = super()._step(model, x, pred, *args, **kw)
            picks.append(out[0].clone())
            return out

    class Noises(Sampler):  # the three proposals of each step, drawn as RBF draws them
        name, description = "noises", "the second of three SDE proposals per step"

        def sample(self, model, x, ts):
            for i in range(len(ts) - 1):
                t, tn = float(ts[i]), float(ts[i + 1])
                pred = model(x, t)
                if tn == 0:
                    x = model.end_step(euler_step(x, t, tn, pred), pred)
                    continue
                draws = [model.ctx.randn_like(x) for _ in range(3)]
                x = model.end_step(sde_step(x, t, tn, pred, draws[1], c=3.0, power=2.0, frame="vp"), pred)
                picks.append(x.clone())
            return x

    x, stats, _ = run(Spy(budget=(1 + 3 * 3) * 2, reward=scheduled(values)), modules=STACKS[2](), steps=4, batch=1)
    ours, picks[:] = list(picks), []
    ref, _, _ = run(Noises(), modules=STACKS[2](), steps=4, batch=1)
    assert stats.nfe == [20] and len(ours) == 3
    assert all(torch.equal(a, b) for a, b in zip(ours, picks)) and torch.equal(x, ref)


# --------------------------------------------------------------------------- equalities on the shapes model


def _tiny():
    return flowkit.load("tiny")


@pytest.mark.parametrize("frame", ["linear", "vp"])
@pytest.mark.parametrize("guidance", ["cfg:scale=4", "apg:scale=4,momentum=-0.5,norm_threshold=2"])
def test_rbf_at_the_minimal_budget_is_the_sde_sampler(frame, guidance):
    """One initial particle and budget = steps x cost: bit for bit the `sde` sampler, NFE
    included, under CFG and under APG with momentum (control: two initial particles differ)."""
    pipe, steps = _tiny(), 4
    kw = dict(steps=steps, seed=5, guidance=guidance, output_type="latent")
    ref = flowkit.sample(pipe, PROMPTS, sampler=FlowSDE(frame=frame), **kw)
    out = flowkit.sample(pipe, PROMPTS, sampler=RBF(budget=2 * steps, frame=frame), **kw)
    assert torch.equal(out.latents, ref.latents)
    assert out.stats.nfe == ref.stats.nfe == [2 * steps] * 2
    assert [r.nfe for r in out.stats.steps] == [r.nfe for r in ref.stats.steps]
    two = flowkit.sample(pipe, PROMPTS, sampler=RBF(budget=2 * steps + 2, particles=2, frame=frame), **kw)
    assert not torch.allclose(two.latents, ref.latents, atol=1e-3)


class SecondDraw(Sampler):
    """`sde` (frame vp) stepping with the second of two noise draws per stochastic step: what RBF
    keeps when its reward prefers the second of two proposals."""

    name = "second-draw"
    description = "sde with the second of two draws"

    def sample(self, model, x, ts):
        for i in range(len(ts) - 1):
            t, t_next = float(ts[i]), float(ts[i + 1])
            pred = model(x, t)
            if t_next == 0.0:
                x_new = euler_step(x, t, t_next, pred)
            else:
                model.ctx.randn_like(x)
                x_new = sde_step(x, t, t_next, pred, model.ctx.randn_like(x), c=3.0, power=2.0, frame="vp")
            x = model.end_step(x_new, pred)
        return x


def test_module_state_follows_the_kept_proposal(monkeypatch):
    """APG's momentum under per-step best-of-2 with a reward that prefers the second proposal:
    equal to `sde` stepping with the second draw, so the first proposal's evaluation left no
    trace in the state (mutant: no rewind between proposals, the momentum takes both)."""
    pipe, steps = _tiny(), 4
    kw = dict(steps=steps, seed=7, guidance="apg:scale=4,momentum=-0.5", output_type="latent")
    rbf = lambda: RBF(budget=2 * (1 + 2 * (steps - 1)), rollover=False, reward=rising())  # noqa: E731
    ref = flowkit.sample(pipe, PROMPTS, sampler=SecondDraw(), **kw)
    out = flowkit.sample(pipe, PROMPTS, sampler=rbf(), **kw)
    assert torch.equal(out.latents, ref.latents) and out.stats.nfe == [2 * (1 + 2 * (steps - 1))] * 2
    monkeypatch.setattr(Context, "rewind", lambda self, saved: None)
    stale = flowkit.sample(pipe, PROMPTS, sampler=rbf(), **kw)
    assert not torch.allclose(stale.latents, ref.latents, atol=1e-4)


class AfterOneDraw(Sampler):
    """`sde` (frame vp) after one draw from each image's generator: what RBF with two initial
    particles and a constant reward keeps (the first particle; the second's noise drawn)."""

    name = "after-one-draw"
    description = "sde after one draw"

    def sample(self, model, x, ts):
        model.ctx.randn_like(x)
        for i in range(len(ts) - 1):
            t, t_next = float(ts[i]), float(ts[i + 1])
            pred = model(x, t)
            if t_next == 0.0:
                x_new = euler_step(x, t, t_next, pred)
            else:
                x_new = sde_step(x, t, t_next, pred, model.ctx.randn_like(x), c=3.0, power=2.0, frame="vp")
            x = model.end_step(x_new, pred)
        return x


def test_a_losing_initial_particle_leaves_no_module_state():
    """Two initial particles, a constant reward: the first is kept, and APG's momentum is the
    first particle's, as if the second had never been evaluated (mutant: restoring the kept
    particles' state only when a later one won leaves the loser's momentum)."""
    pipe, steps = _tiny(), 4
    kw = dict(steps=steps, seed=11, guidance="apg:scale=4,momentum=-0.5", output_type="latent")
    ref = flowkit.sample(pipe, PROMPTS, sampler=AfterOneDraw(), **kw)
    out = flowkit.sample(pipe, PROMPTS, sampler=RBF(budget=2 * (steps + 1), particles=2, reward=CONST), **kw)
    assert torch.equal(out.latents, ref.latents) and out.stats.nfe == [2 * (steps + 1)] * 2


def test_smc_with_infinite_lambda_is_best_of_n_of_sde():
    """lam = infinity: uniform weights, no resampling: best-of-N on the same particles, NFE
    included (control: a small lam resamples and differs)."""
    pipe = _tiny()
    kw = dict(steps=4, seed=3, guidance="cfg:scale=4", output_type="latent")
    bon = flowkit.sample(pipe, PROMPTS, sampler="bon:n=3", **kw)
    smc = flowkit.sample(pipe, PROMPTS, sampler=SMC(n=3, lam=math.inf), **kw)
    assert torch.equal(smc.latents, bon.latents) and smc.stats.nfe == bon.stats.nfe == [3 * 4 * 2] * 2
    sharp = flowkit.sample(pipe, PROMPTS, sampler="smc:n=3,lam=0.01,ess=1.0", **kw)
    assert not torch.allclose(sharp.latents, bon.latents, atol=1e-4)
    assert SMC(lam=None).describe() == "smc:lam=none"


@pytest.mark.parametrize("spec", ["rbf:budget=28,particles=2", "bon:n=3", "smc:n=3,ess=1.0"])
def test_an_image_is_the_same_alone_or_in_a_batch(spec):
    """Each image's particles draw from its own generator, and rows not evaluated draw nothing
    (mutant, rbf: later proposals drawing noise for every row makes an image depend on how
    long its partners search; checked below)."""
    pipe = _tiny()
    prompts = ["a red circle", "two blue squares", "three green triangles"]
    kw = dict(sampler=spec, steps=4, seed=2, guidance="cfg:scale=4", output_type="latent")
    both = flowkit.sample(pipe, prompts, **kw)
    for i in (1, 2):
        alone = flowkit.sample(pipe, prompts[i:i + 1], start_index=i, **kw)
        assert torch.allclose(both.latents[i], alone.latents[0], atol=1e-5), spec
        assert both.stats.nfe[i] == alone.stats.nfe[0]


def test_noise_for_every_row_makes_images_depend_on_their_partners(monkeypatch):
    import flowkit.samplers.rbf as rbf_module

    monkeypatch.setattr(rbf_module, "noise_for", lambda ctx, x, rows: ctx.randn_like(x))
    pipe = _tiny()
    prompts = ["a red circle", "two blue squares", "three green triangles"]
    kw = dict(sampler="rbf:budget=28,particles=2", steps=4, seed=2, guidance="cfg:scale=4", output_type="latent")
    both = flowkit.sample(pipe, prompts, **kw)
    alone = [flowkit.sample(pipe, prompts[i:i + 1], start_index=i, **kw).latents[0] for i in range(3)]
    assert any(not torch.allclose(both.latents[i], alone[i], atol=1e-4) for i in range(3))


@pytest.mark.parametrize("cost", [1, 2])
def test_memory_is_one_proposal_row_per_image_for_rbf_and_n_for_bon_and_smc(cost):
    """The widest network call: RBF evaluates one row per image (its initial particles and its
    proposals one at a time) times the stack's branches; BoN and SMC n rows per image (control,
    and the mutant it stands for: RBF's three initial particles evaluated side by side, as
    `spawn` does for BoN, is 3 rows per image)."""
    widest = [0]

    def velocity(x, timestep, cond):
        widest[0] = max(widest[0], x.shape[0])
        return gaussian_velocity(x, timestep, cond)

    def width(sampler):
        widest[0] = 0
        run(sampler, batch=2, steps=4, modules=STACKS[cost](), den=FunctionDenoiser(velocity, PATH, "velocity"))
        return widest[0]

    assert width(RBF(budget=(3 + 3 + 4) * cost, particles=3, reward=WIGGLE, frame="linear")) == 2 * cost
    assert width(RBF(budget=(3 + 3 + 4) * cost, particles=3, reward=WIGGLE, rollover=False)) == 2 * cost
    assert width(BestOfN(n=3, reward=WIGGLE)) == 2 * 3 * cost
    assert width(SMC(n=3, reward=WIGGLE, lam=0.1)) == 2 * 3 * cost


def test_particle_nfe_sums_every_particle_and_rewards_are_counted_apart():
    pipe = _tiny()
    kw = dict(steps=3, seed=0, guidance="cfg:scale=4", output_type="latent")
    bon = flowkit.sample(pipe, PROMPTS, sampler="bon:n=4,base=euler", **kw)
    assert bon.stats.nfe == [4 * 3 * 2] * 2 and bon.stats.reward_calls == 1
    smc = flowkit.sample(pipe, PROMPTS, sampler="smc:n=2", **kw)
    assert smc.stats.nfe == [2 * 3 * 2] * 2 and smc.stats.reward_calls == 3  # 2 stochastic steps + the end
    rbf = flowkit.sample(pipe, PROMPTS, sampler="rbf:budget=20", **kw)
    assert rbf.stats.nfe == [20, 20] and rbf.stats.reward_calls >= 3


# --------------------------------------------------------------------------- a 1-D two-mode model

MODE, SPREAD = 1.5, 0.3


def mixture_velocity(x, timestep, cond):
    """The exact velocity of x0 ~ (N(+MODE, SPREAD^2) + N(-MODE, SPREAD^2)) / 2 on the linear path."""
    t = (timestep / 1000).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
    var = (1 - t) ** 2 * SPREAD**2 + t * t
    means = [MODE, -MODE]
    logits = torch.stack([-(x - (1 - t) * m) ** 2 / (2 * var) for m in means])
    w = torch.softmax(logits, dim=0)
    x0 = sum(w[k] * (m + (1 - t) * SPREAD**2 / var * (x - (1 - t) * m)) for k, m in enumerate(means))
    return (x - (1 - t) * x0) / t - x0


def _mixture(sampler, n=2000, steps=8, seed=0):
    x, stats, _ = run(sampler, batch=n, steps=steps, dim=1, seed=seed,
                      den=FunctionDenoiser(mixture_velocity, PATH, "velocity"))
    return x.flatten().numpy(), stats


def test_a_reward_for_one_mode_raises_its_probability_at_equal_nfe():
    """RBF with a reward for mode A (x0 > 0) at budget 24 (8 steps): P(A) well above RBF with a
    constant reward at the same NFE; the constant reward leaves the distribution the `sde`
    sampler's (two-sample KS test; control: the mode-A samples fail the same test)."""
    from scipy.stats import ks_2samp

    mode_a = toy_reward(lambda x: x.flatten(1)[:, 0].double())
    sde, _ = _mixture(FlowSDE(frame="vp"), seed=1)
    flat, fs = _mixture(RBF(budget=24, reward=CONST), seed=2)
    up, us = _mixture(RBF(budget=24, reward=mode_a), seed=2)
    assert fs.nfe == us.nfe == [24] * 2000
    assert abs(float((sde > 0).mean()) - 0.5) < 0.05
    assert float((up > 0).mean()) > float((flat > 0).mean()) + 0.3, ((up > 0).mean(), (flat > 0).mean())
    assert ks_2samp(flat, sde).pvalue > 0.01
    assert ks_2samp(up, sde).pvalue < 1e-6


# --------------------------------------------------------------------------- surfaces


def test_reward_reaches_samplers_from_sample_the_dropin_and_the_cli(tmp_path):
    """flowkit.sample(reward=...), FlowKitPipeline.from_pipe(..., reward=...) (tiny SD: a
    scheduler grid; a reward of one's own) and `flowkit generate --sampler rbf:...`; a sampler
    that takes no reward refuses one."""
    import contextlib
    import io
    import json

    from flowkit.cli import main
    from flowkit.pipelines import FlowKitPipeline

    calls = []

    def mean_image(images):
        calls.append(images.shape[0])
        return images.mean(dim=(1, 2, 3))

    sd = tiny_pipes.cached("sd")
    fk = FlowKitPipeline.from_pipe(sd, sampler="rbf:budget=14", reward=toy_reward(mean_image))
    fk("a cat", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="latent")
    assert fk.stats.nfe == [14] and calls and fk.stats.reward_calls == len(calls)
    with pytest.raises(UnsupportedError, match="count"):
        FlowKitPipeline.from_pipe(sd, sampler="rbf:budget=14")("a cat", num_inference_steps=3)
    out = flowkit.sample(_tiny(), PROMPTS, sampler="bon:n=2", reward=toy_reward(mean_image), steps=2,
                         output_type="latent")
    assert out.stats.nfe == [8, 8] and out.stats.sampler == "bon:n=2,reward=custom"
    with pytest.raises(InputError, match="takes no reward"):
        flowkit.sample(_tiny(), PROMPTS, sampler="euler", reward="count", steps=2)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["generate", "two blue squares", "--model", "tiny", "--steps", "3", "--sampler",
                     "rbf:budget=12,reward=count", "--out", str(tmp_path), "--json"])
    assert code == 0 and json.loads(stdout.getvalue())["stats"]["nfe"] == [12]


def test_rbf_runs_on_flux_with_a_reward_of_ones_own():
    flux = tiny_pipes.cached("flux")
    reward = toy_reward(lambda images: -images.std(dim=(1, 2, 3)))
    out = flowkit.sample(flux, ["a cat"], sampler="rbf:budget=7,particles=2", reward=reward, steps=3,
                         output_type="latent")
    assert out.stats.nfe == [7]


# --------------------------------------------------------------------------- the official grid


def test_the_official_grid_kind():
    """grid="rbf:exp": uniform u, r = sqrt(1 - (1 - u)^2) through the VP time warp; 9 of 10
    steps end above t = 0.7 and the last jumps from t = 0.709 to 0 (mutant: r = u, rbf:linear,
    puts 5 there)."""
    ts = TimeGrid.parse("rbf:exp").build(10, PATH)
    r = VPSDEPath().native_time(ts[:-1])
    u = torch.linspace(1.0, 0.1, 10, dtype=torch.float64)
    assert torch.allclose(r, torch.sqrt(1 - (1 - u) ** 2), atol=1e-12) and ts[-1] == 0
    assert int((ts[1:] > 0.7).sum()) == 9
    assert int((TimeGrid.parse("rbf:linear").build(10, PATH)[1:] > 0.7).sum()) == 5
    with pytest.raises(SpecError, match="rbf:exp"):
        TimeGrid.parse("rbf")
    assert RBF().grid is None and RBF(grid="rbf:exp").time_grid(TimeGrid.uniform()).describe() == "rbf:exp"


def test_particle_samplers_refuse_what_they_cannot_score():
    """A shapes reward on another family, and a model with no decoder to pixels."""
    ctx = toy_context(1, 2)
    assert "scores shapes images" in RBF().refuse(ctx)
    ctx.kit = None
    assert "decoder to pixels" in BestOfN(reward=CONST).refuse(ctx)
    assert RBF(reward=CONST).refuse(toy_context(1, 2)) is None
    with pytest.raises(InputError):
        SMC(lam=0.0)


def test_the_bench_arms_spend_their_declared_nfe():
    """`flowkit bench rbf` compares arms at equal NFE: each arm's sampler, on the bench's 10
    steps under CFG (2 NFE an evaluation), spends the NFE per image its rows are labelled with:
    N runs for BoN and SMC, the budget for RBF (which spends it exactly: the budget tests above),
    one run for Euler and sde (mutant: BoN and SMC with N = budget / steps, twice the NFE of
    the RBF arm they face)."""
    from flowkit.api import build_sampler
    from flowkit.bench.experiments.rbf import STEPS, arms

    for name, (spec, _, nfe) in arms().items():
        smp = build_sampler(spec)
        spent = smp.budget if isinstance(smp, RBF) else getattr(smp, "n", 1) * STEPS * 2
        assert spent == nfe, (name, spent, nfe)
        # the r-uniform-grid arms walk the official rbf:linear grid (mutant: the grid option dropped)
        assert (smp.grid == "rbf:linear") == name.endswith("-rgrid"), (name, smp.grid)
    out = flowkit.sample(_tiny(), ["two blue squares"], sampler=arms()["smc-2"][0], guidance="cfg:scale=4",
                         steps=STEPS, output_type="latent")
    assert out.stats.nfe == [arms()["smc-2"][2]]
