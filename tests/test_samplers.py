"""Samplers against the analytic Gaussian world: convergence orders, DDIM = Euler, SDE marginals."""

import math

import pytest
import torch

from analytic import MU, S, context
from flowkit.paths import LinearPath
from flowkit.samplers import DDIM, Euler, FlowSDE, Heun, Midpoint, available
from flowkit.sampling_loop import integrate
from flowkit.seeding import generators_for, randn_per_sample
from flowkit.timegrid import TimeGrid


def _error(sampler, steps, batch=8, dim=16, grid=TimeGrid.uniform()):
    noise = randn_per_sample((dim,), generators_for(0, range(batch))).double()
    ts = grid.build(steps, LinearPath())
    x, stats = integrate(sampler, context(batch, steps), noise, ts)
    return (x - (MU + S * noise)).abs().max().item(), stats


@pytest.mark.parametrize("grid", [TimeGrid.uniform(), TimeGrid.shifted(3.0)])
def test_euler_error_halves_when_steps_double(grid):
    e = [_error(Euler(), n, grid=grid)[0] for n in (16, 32, 64)]
    for a, b in zip(e, e[1:]):
        assert 1.8 < a / b < 2.2, e


def test_heun_error_falls_about_fourfold():
    e = [_error(Heun(), n)[0] for n in (16, 32, 64)]
    for a, b in zip(e, e[1:]):
        assert 3.5 < a / b < 4.6, e


def test_midpoint_is_at_least_second_order():
    e = [_error(Midpoint(), n)[0] for n in (8, 16, 32)]
    for a, b in zip(e, e[1:]):
        assert a / b > 3.5, e


def test_ddim_eta0_equals_euler():
    noise = randn_per_sample((16,), generators_for(1, range(4))).double()
    ts = TimeGrid.shifted(2.0).build(10, LinearPath())
    xe, _ = integrate(Euler(), context(4, 10), noise, ts)
    xd, _ = integrate(DDIM(eta=0.0), context(4, 10), noise, ts)
    assert torch.allclose(xe, xd, atol=1e-10)


def test_nfe_matches_each_samplers_evaluation_count():
    for smp in (Euler(), Heun(), Midpoint(), FlowSDE(), DDIM()):
        _, stats = _error(smp, 7, batch=3)
        assert stats.nfe == [smp.evaluations(7)] * 3, smp.name
        assert len(stats.steps) == 7


@pytest.mark.parametrize("sampler", [FlowSDE(c=1.0), FlowSDE(c=2.0, power=1.0), DDIM(eta=1.0)])
def test_stochastic_samplers_keep_the_marginal(sampler):
    """Final samples have the data law N(MU, S^2): mean and std within sampling error."""
    n, steps = 8000, 250
    ctx = context(n, steps, seed=3)
    noise = ctx.randn((1,)).double()  # drawn from the run's own generators, as flowkit.sample does
    ts = TimeGrid.uniform().build(steps, LinearPath())
    x, _ = integrate(sampler, ctx, noise, ts)
    mean, std = x.mean().item(), x.std().item()
    assert abs(mean - MU) < 4 * S / math.sqrt(n) + 0.005
    assert abs(std - S) < 0.015, std
    # and the stochastic sampler really is stochastic: it does not reproduce the ODE map
    xo, _ = integrate(Euler(), context(n, steps, seed=3), noise, ts)
    assert abs(xo.std().item() - S) < 0.015
    assert (x - xo).abs().mean() > 0.01


def test_sde_intermediate_marginal_variance():
    """Stopping the SDE at t = 0.5 gives Var = (1 - t)^2 S^2 + t^2 (the path's marginal)."""
    n, steps = 8000, 100
    ctx = context(n, steps // 2, seed=5)
    noise = ctx.randn((1,)).double()
    ts = TimeGrid.uniform().build(steps, LinearPath())[: steps // 2 + 1]  # 1.0 .. 0.5
    x, _ = integrate(FlowSDE(c=1.5, power=1.0), ctx, noise, ts)
    t = float(ts[-1])
    assert abs(x.var().item() - ((1 - t) ** 2 * S**2 + t**2)) < 0.02
    assert abs(x.mean().item() - (1 - t) * MU) < 0.02


def test_sampler_noise_is_per_sample():
    """A sample's stochastic path depends only on its own generator, not its batch partners."""
    steps = 10
    ts = TimeGrid.uniform().build(steps, LinearPath())
    c4, c1 = context(4, steps, seed=7), context(1, steps, seed=7)
    noise = c4.randn((6,)).double()
    c1.randn((6,))
    x4, _ = integrate(FlowSDE(c=1.0), c4, noise, ts)
    x1, _ = integrate(FlowSDE(c=1.0), c1, noise[:1], ts)
    assert torch.allclose(x4[:1], x1, atol=1e-12)


def test_registry_lists_builtin_samplers():
    names = set(available())
    assert {"euler", "heun", "midpoint", "sde", "ddim"} <= names


def test_bad_sampler_options():
    with pytest.raises(ValueError, match="eta"):
        DDIM(eta=1.5)
    with pytest.raises(ValueError, match="c must"):
        FlowSDE(c=-1)
