"""Paths, prediction conversions, time shifts: analytic identities and parity with diffusers.

Every parity test carries a negative control: a deliberately wrong setting that must fail
the same tolerance, so a tolerance too loose to tell right from wrong is caught.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flowkit.paths import (
    PREDICTION_TYPES,
    DDPMPath,
    LinearPath,
    VPCosinePath,
    convert_prediction,
    convert_state,
    dynamic_shift,
    flux_mu,
    from_x0_eps,
    sigmas_to_t,
    static_shift,
    t_to_sigma,
    to_x0_eps,
)

F64 = torch.float64
SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

PATHS = {"linear": LinearPath(), "vp_cosine": VPCosinePath(), "ddpm_sd": DDPMPath(**SD)}
PATH_IDS = list(PATHS)
HYP = settings(max_examples=40, deadline=None)


def _interior(path, n: int = 257) -> torch.Tensor:
    """flowkit times spanning (0, t_max], dense near both ends."""
    u = torch.linspace(0.0, 1.0, n, dtype=F64)[1:]
    ends = torch.tensor([1e-12, 1e-9, 1e-6, 1e-3], dtype=F64)
    t = torch.cat([ends, u * path.t_max, path.t_max - ends])
    return t[(t > 0) & (t <= path.t_max)]


def _maxerr(a, b) -> float:
    return (torch.as_tensor(a, dtype=F64) - torch.as_tensor(b, dtype=F64)).abs().max().item()


# -- every path ------------------------------------------------------------------------


@pytest.mark.parametrize("name", PATH_IDS)
def test_snr_matching(name):
    path = PATHS[name]
    t = _interior(path)
    p = path.at(t)
    # alpha / sigma == (1 - t) / t, cross-multiplied so it holds at the ends too
    assert _maxerr(p.alpha * t, p.sigma * (1 - t)) <= 1e-15
    ratio = p.alpha / p.sigma
    assert torch.allclose(ratio, (1 - t) / t, rtol=1e-13, atol=0)
    assert torch.allclose(path.flow_time(p.alpha, p.sigma), t, rtol=1e-14, atol=0)
    # negative control: a 1e-9 shift of time is visible at this tolerance
    assert not torch.allclose(path.at(t + 1e-9).alpha / path.at(t + 1e-9).sigma, (1 - t) / t, rtol=1e-13, atol=0)


@pytest.mark.parametrize("name", PATH_IDS)
def test_ends_are_finite_and_exact(name):
    path = PATHS[name]
    t = torch.tensor([0.0, path.t_max, 1.0], dtype=F64)
    p = path.at(t)
    for field in (p.alpha, p.sigma, p.timestep, p.scale):
        assert torch.isfinite(field).all(), (name, field)
    assert p.alpha[0] == 1.0 and p.sigma[0] == 0.0 and p.timestep[0] == 0.0
    assert p.alpha[2] == 0.0 and p.sigma[2] == 1.0
    x = torch.randn(3, 4, 5, dtype=F64, generator=torch.Generator().manual_seed(0))
    for y in (path.to_native(x, p), path.from_native(x, p)):
        assert torch.isfinite(y).all()
    grid = path.uniform_grid(10)
    assert grid.dtype == F64 and grid.shape == (11,)
    assert grid[0].item() == pytest.approx(path.t_max, abs=1e-12) and grid[-1].item() == 0.0
    assert bool((grid[1:] < grid[:-1]).all())


@pytest.mark.parametrize("name", PATH_IDS)
def test_frames_round_trip_and_meaning(name):
    """x_flow = (1-t) x0 + t eps goes to x_native = alpha x0 + sigma eps, and back."""
    path = PATHS[name]
    g = torch.Generator().manual_seed(1)
    t = torch.cat([torch.tensor([0.0, path.t_max], dtype=F64), _interior(path, 33)])
    x0 = torch.randn(t.numel(), 3, 8, 8, dtype=F64, generator=g)
    eps = torch.randn(x0.shape, dtype=F64, generator=g)
    p = path.at(t)
    b = (-1, 1, 1, 1)
    x_flow = (1 - t).view(b) * x0 + t.view(b) * eps
    x_native = path.to_native(x_flow, p)
    assert _maxerr(x_native, p.alpha.view(b) * x0 + p.sigma.view(b) * eps) <= 1e-12
    assert _maxerr(path.from_native(x_native, p), x_flow) <= 1e-12
    # negative control: the frames differ for VP paths (scale = alpha + sigma != 1 inside)
    if name != "linear":
        assert _maxerr(x_flow, x_native) > 1e-3


def test_vp_cosine_native_time():
    path = VPCosinePath()
    s = torch.linspace(0.0, 1.0, 101, dtype=F64)
    t = path.time_from_native(s)
    assert t[0] == 0.0 and t[-1] == 1.0
    assert _maxerr(path.native_time(t), s) <= 1e-14
    p = path.at(t)
    # the native definition: alpha = cos(pi/2 s), sigma = sin(pi/2 s), timestep = 1000 s
    assert _maxerr(p.alpha, torch.cos(math.pi / 2 * s)) <= 1e-15
    assert _maxerr(p.sigma, torch.sin(math.pi / 2 * s)) <= 1e-15
    assert _maxerr(p.timestep, 1000 * s) <= 1e-11
    assert _maxerr(path.uniform_grid(100), t.flip(0)) <= 1e-15
    assert _maxerr(p.alpha**2 + p.sigma**2, torch.ones_like(s)) <= 1e-15
    # negative control: the linear path's grid is not uniform in s
    assert _maxerr(path.native_time(LinearPath().uniform_grid(100)), s.flip(0)) > 1e-2


def test_ve_sigma_helpers():
    s = torch.tensor([0.0, 0.0292, 1.0, 14.6, 4096.0, math.inf], dtype=F64)
    t = sigmas_to_t(s)
    assert t[0] == 0.0 and t[2] == 0.5 and t[-1] == 1.0
    assert _maxerr(t_to_sigma(t[:-1]), s[:-1]) <= 1e-9 * 4096
    assert torch.isinf(t_to_sigma(torch.tensor(1.0)))
    with pytest.raises(ValueError):
        sigmas_to_t([-1.0])


# -- prediction types ------------------------------------------------------------------

shapes = st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple)


def _sample(path, u: float, shape: tuple, seed: int):
    t = torch.tensor([0.02 + 0.96 * u * path.t_max, 0.5 * path.t_max], dtype=F64)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn((2,) + shape, dtype=F64, generator=g)
    eps = torch.randn((2,) + shape, dtype=F64, generator=g)
    p = path.at(t)
    b = (-1,) + (1,) * len(shape)
    x = p.alpha.view(b) * x0 + p.sigma.view(b) * eps
    return t, p, x0, eps, x, b


@pytest.mark.parametrize("name", PATH_IDS)
@HYP
@given(u=st.floats(0.0, 1.0), shape=shapes, seed=st.integers(0, 2**16))
def test_prediction_round_trips(name, u, shape, seed):
    path = PATHS[name]
    _, p, x0, eps, x, _ = _sample(path, u, shape, seed)
    preds = {k: from_x0_eps(k, x0, eps, p.alpha, p.sigma) for k in PREDICTION_TYPES}
    for kind, value in preds.items():
        rx0, reps = to_x0_eps(kind, value, x, p.alpha, p.sigma)
        assert _maxerr(rx0, x0) <= 1e-10 and _maxerr(reps, eps) <= 1e-10, kind
    for src, dst in itertools.product(PREDICTION_TYPES, repeat=2):
        out = convert_prediction(preds[src], src, dst, x, p.alpha, p.sigma)
        assert out.dtype == F64
        assert _maxerr(out, preds[dst]) <= 1e-10, (src, dst)
    # diffusers' names are aliases
    out = convert_prediction(preds["v"], "v_prediction", "sample", x, p.alpha, p.sigma)
    assert _maxerr(out, x0) <= 1e-10
    # negative control: treating a v prediction as epsilon gives a different x0
    wrong, _ = to_x0_eps("epsilon", preds["v"], x, p.alpha, p.sigma)
    assert _maxerr(wrong, x0) > 1e-3


@HYP
@given(u=st.floats(0.0, 1.0), shape=shapes, seed=st.integers(0, 2**16))
def test_closed_forms_linear(u, shape, seed):
    """x = (1-t) x0 + t eps: velocity = eps - x0, x0 = x - t v, eps = x + (1-t) v."""
    _, p, x0, eps, x, b = _sample(PATHS["linear"], u, shape, seed)
    t = p.t.view(b)
    vel = convert_prediction(eps, "epsilon", "velocity", x, p.alpha, p.sigma)
    assert _maxerr(vel, eps - x0) <= 1e-10
    assert _maxerr(convert_prediction(vel, "velocity", "x0", x, p.alpha, p.sigma), x - t * vel) <= 1e-12
    assert _maxerr(convert_prediction(vel, "velocity", "epsilon", x, p.alpha, p.sigma), x + (1 - t) * vel) <= 1e-12
    assert _maxerr(vel, x0 - eps) > 1e-3  # negative control: the sign matters


@pytest.mark.parametrize("name", ["vp_cosine", "ddpm_sd"])
@HYP
@given(u=st.floats(0.0, 1.0), shape=shapes, seed=st.integers(0, 2**16))
def test_closed_forms_vp(name, u, shape, seed):
    """alpha^2 + sigma^2 = 1: v = alpha eps - sigma x0, x0 = alpha x - sigma v, eps = sigma x + alpha v."""
    _, p, x0, eps, x, b = _sample(PATHS[name], u, shape, seed)
    a, s = p.alpha.view(b), p.sigma.view(b)
    v = convert_prediction(eps, "epsilon", "v", x, p.alpha, p.sigma)
    assert _maxerr(v, a * eps - s * x0) <= 1e-10
    assert _maxerr(convert_prediction(v, "v", "x0", x, p.alpha, p.sigma), a * x - s * v) <= 1e-12
    assert _maxerr(convert_prediction(v, "v", "epsilon", x, p.alpha, p.sigma), s * x + a * v) <= 1e-12
    assert _maxerr(v, a * x0 - s * eps) > 1e-3  # negative control


@pytest.mark.parametrize("name", PATH_IDS)
def test_velocity_is_flow_frame_derivative(name):
    """For every path, d/dt of the flow-frame state equals the "velocity" prediction, and for
    the VP paths d x_native / d(pi/2 s) equals the "v" prediction (finite differences)."""
    path = PATHS[name]
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(2, 6, dtype=F64, generator=g).unbind(0)

    def state(t: float) -> torch.Tensor:
        p = path.at(torch.tensor([t], dtype=F64))
        return path.from_native(p.alpha[:, None] * x0 + p.sigma[:, None] * eps, p)

    h = 1e-5
    for t in (0.1, 0.4, 0.8 * path.t_max):
        p = path.at(torch.tensor([t], dtype=F64))
        fd = (state(t + h) - state(t - h)) / (2 * h)
        vel = from_x0_eps("velocity", x0[None], eps[None], p.alpha, p.sigma)[0]
        assert _maxerr(fd, vel) <= 1e-8
        assert _maxerr(fd, from_x0_eps("epsilon", x0[None], eps[None], p.alpha, p.sigma)[0]) > 1e-3

    if name == "vp_cosine":
        def native(s: float) -> torch.Tensor:
            p = path.at(path.time_from_native(torch.tensor([s], dtype=F64)))
            return p.alpha[:, None] * x0 + p.sigma[:, None] * eps

        for s in (0.2, 0.5, 0.9):
            fd = (native(s + h) - native(s - h)) / (2 * h) * (2 / math.pi)
            p = path.at(path.time_from_native(torch.tensor([s], dtype=F64)))
            v = from_x0_eps("v", x0[None], eps[None], p.alpha, p.sigma)[0]
            assert _maxerr(fd, v) <= 1e-8


@pytest.mark.parametrize(("src", "dst"), list(itertools.permutations(PATH_IDS, 2)))
@HYP
@given(u=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_convert_state(src, dst, u, seed):
    a, b_ = PATHS[src], PATHS[dst]
    t_hi = min(a.t_max, b_.t_max)
    t = torch.tensor([u * t_hi, t_hi, 0.3], dtype=F64)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(3, 2, 5, dtype=F64, generator=g)
    eps = torch.randn(3, 2, 5, dtype=F64, generator=g)
    pa, pb = a.at(t), b_.at(t)
    bc = (-1, 1, 1)
    x_a = pa.alpha.view(bc) * x0 + pa.sigma.view(bc) * eps
    x_b, timestep = convert_state(x_a, t, a, b_)
    assert _maxerr(x_b, pb.alpha.view(bc) * x0 + pb.sigma.view(bc) * eps) <= 1e-12
    assert _maxerr(timestep, pb.timestep) == 0.0
    # negative control: converting at the wrong time misses when the frames differ
    if {src, dst} != {"vp_cosine", "ddpm_sd"}:
        x_wrong, _ = convert_state(x_a, t * 0.9 + 0.05, a, b_)
        assert _maxerr(x_wrong, x_b) > 1e-4


# -- time shifts (FlowMatchEulerDiscreteScheduler, FLUX) --------------------------------


def test_shift_formulas():
    t = torch.linspace(0.0, 1.0, 101, dtype=F64)
    assert static_shift(t, 3.0)[0] == 0.0 and static_shift(t, 3.0)[-1] == 1.0
    assert dynamic_shift(t, 1.15)[0] == 0.0 and dynamic_shift(t, 1.15)[-1] == 1.0
    assert _maxerr(static_shift(t, 1.0), t) == 0.0
    assert _maxerr(static_shift(t, 3.0), dynamic_shift(t, math.log(3.0))) <= 1e-15
    tt = t[1:-1]
    assert _maxerr(dynamic_shift(tt, 0.7, 1.3), math.exp(0.7) / (math.exp(0.7) + (1 / tt - 1) ** 1.3)) <= 1e-15
    assert bool((static_shift(t, 3.0)[1:] > static_shift(t, 3.0)[:-1]).all())
    with pytest.raises(ValueError):
        static_shift(t, 0.0)
    with pytest.raises(ValueError):
        static_shift(torch.tensor([1.5]), 3.0)


@pytest.mark.parametrize("n", [1, 4, 10, 28, 50])
def test_static_shift_matches_flow_match_euler(n):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sched.set_timesteps(n)
    # its unshifted grid: linspace over its (already shifted) training sigma range, shifted again
    base = torch.linspace(sched.sigma_max * 1000, sched.sigma_min * 1000, n, dtype=F64) / 1000
    ours = static_shift(base, 3.0)
    tol = 1e-6
    assert _maxerr(sched.sigmas[:-1], ours) <= tol
    assert sched.sigmas[-1] == 0.0
    assert _maxerr(sched.timesteps, ours * 1000) <= 1e3 * tol
    if n > 1:  # negative control (t = 1 is a fixed point of every shift)
        assert _maxerr(sched.sigmas[:-1], static_shift(base, 3.1)) > tol


@pytest.mark.parametrize(("n", "seq_len"), [(4, 1024), (28, 4096), (50, 256), (20, 6400)])
@pytest.mark.parametrize("flux_sigmas", [False, True])
def test_dynamic_shift_matches_flow_match_euler(n, seq_len, flux_sigmas):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )  # fmt: skip
    mu = flux_mu(seq_len)
    if flux_sigmas:  # what FluxPipeline passes
        base = torch.linspace(1.0, 1.0 / n, n, dtype=F64)
        sched.set_timesteps(sigmas=base.numpy(), mu=mu)
    else:
        base = torch.linspace(1.0, 1.0 / 1000, n, dtype=F64)
        sched.set_timesteps(n, mu=mu)
    tol = 1e-6
    assert _maxerr(sched.sigmas[:-1], dynamic_shift(base, mu)) <= tol
    assert _maxerr(sched.sigmas[:-1], dynamic_shift(base, mu + 0.05)) > tol  # negative control


@pytest.mark.parametrize("seq_len", [16, 256, 1024, 4096, 8192])
def test_flux_mu_matches_diffusers(seq_len):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    assert flux_mu(seq_len) == pytest.approx(calculate_shift(seq_len), abs=1e-12)
    kw = dict(base_seq_len=128, max_seq_len=2048, base_shift=0.3, max_shift=1.4)
    assert flux_mu(seq_len, **kw) == pytest.approx(calculate_shift(seq_len, 128, 2048, 0.3, 1.4), abs=1e-12)
    assert flux_mu(seq_len + 64) != pytest.approx(calculate_shift(seq_len), abs=1e-6)  # negative control


# -- DDPM schedules (DDPMScheduler, EulerDiscreteScheduler, DDIMScheduler) ----------------


@pytest.mark.parametrize("schedule", ["scaled_linear", "linear", "squaredcos_cap_v2"])
def test_alphas_cumprod_matches_ddpm_scheduler(schedule):
    from diffusers import DDPMScheduler

    cfg = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule=schedule)
    ref = DDPMScheduler(**cfg).alphas_cumprod.double()
    path = DDPMPath(**cfg)
    assert path.alphas_cumprod.dtype == F64
    assert _maxerr(path.alphas_cumprod, ref) == 0.0  # diffusers' float32 table, bit for bit
    tol = 1e-7
    if schedule == "squaredcos_cap_v2":  # beta_start/end unused: shift the table by one index
        assert _maxerr(path.alphas_cumprod[1:], ref[:-1]) > tol
    else:
        wrong = DDPMPath(**{**cfg, "beta_end": 0.0121})
        assert _maxerr(wrong.alphas_cumprod, ref) > tol


def test_zero_snr_and_trained_betas_match_diffusers():
    from diffusers import DDPMScheduler, EulerDiscreteScheduler

    euler = EulerDiscreteScheduler(**SD, rescale_betas_zero_snr=True, timestep_spacing="trailing")
    path = DDPMPath(**SD, rescale_betas_zero_snr=True)
    assert _maxerr(path.alphas_cumprod, euler.alphas_cumprod) == 0.0
    assert path.alphas_cumprod[-1] == 2.0**-24 and path.t_max == pytest.approx(4096 / 4097, rel=1e-6)
    euler.set_timesteps(25)
    assert _maxerr(sigmas_to_t(euler.sigmas.double()), path.grid(25, "trailing")) <= 1e-6
    assert _maxerr(sigmas_to_t(euler.sigmas.double()), DDPMPath(**SD).grid(25, "trailing")) > 1e-6

    betas = DDPMScheduler(**SD).betas.tolist()
    trained = DDPMPath(num_train_timesteps=1000, trained_betas=betas)
    assert _maxerr(trained.alphas_cumprod, DDPMPath(**SD).alphas_cumprod) == 0.0
    with pytest.raises(ValueError, match="trained_betas"):
        DDPMPath(num_train_timesteps=999, trained_betas=betas)


def test_from_scheduler_config():
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

    sdxl = EulerDiscreteScheduler(**SD, timestep_spacing="leading", steps_offset=1)
    for source in (sdxl.config, dict(sdxl.config), sdxl):
        path = DDPMPath.from_scheduler_config(source)
        assert _maxerr(path.alphas_cumprod, sdxl.alphas_cumprod) == 0.0
    ddim = DDIMScheduler(beta_schedule="linear")  # diffusers' defaults: 1e-4 .. 0.02
    assert _maxerr(DDPMPath.from_scheduler_config(ddim.config).alphas_cumprod, ddim.alphas_cumprod) == 0.0
    with pytest.raises(ValueError, match="LinearPath"):
        DDPMPath.from_scheduler_config(FlowMatchEulerDiscreteScheduler().config)
    with pytest.raises(ValueError, match="beta_schedule"):
        DDPMPath(beta_schedule="cosine")


SPACINGS = [("linspace", 0), ("leading", 1), ("leading", 0), ("trailing", 0)]
STEPS = list(range(2, 60)) + [100, 250, 500, 999]


@pytest.mark.parametrize(("spacing", "offset"), SPACINGS)
def test_grid_matches_euler_discrete(spacing, offset):
    from diffusers import EulerDiscreteScheduler

    sched = EulerDiscreteScheduler(**SD, timestep_spacing=spacing, steps_offset=offset)
    path = DDPMPath.from_scheduler_config(sched.config)
    wrong = DDPMPath(**{**SD, "beta_end": 0.0121})
    checked = 0
    for n in STEPS:
        sched.set_timesteps(n)
        if len(sched.timesteps) != n:  # diffusers' trailing arange sometimes yields n+1 (61, 103, ...)
            continue
        checked += 1
        grid = path.grid(n, spacing, offset)
        ref_t = sigmas_to_t(sched.sigmas.double())
        assert grid.shape == (n + 1,) and grid[-1] == 0.0
        assert _maxerr(ref_t, grid) <= 1e-6, n
        assert _maxerr(sched.timesteps, path.train_timesteps(n, spacing, offset)) <= 1e-4, n
        if spacing != "linspace" or (999 % (n - 1) == 0):  # integer indices: both interpolations agree
            assert _maxerr(sched.timesteps, path.at(grid[:-1]).timestep) <= 1e-4, n
        else:  # fractional indices: log-sigma (_sigma_to_t) vs linear-sigma interpolation
            assert _maxerr(sched.timesteps, path.at(grid[:-1]).timestep) <= 1e-2, n
        assert _maxerr(ref_t, wrong.grid(n, spacing, offset)) > 1e-6, n  # negative control
    assert checked >= len(STEPS) - 2
    if spacing == "linspace":
        assert torch.equal(path.uniform_grid(28), path.grid(28))
        assert path.grid(28)[0].item() == pytest.approx(path.t_max, abs=1e-12)


@pytest.mark.parametrize("n", [10, 20, 28, 50])
def test_timestep_matches_euler_sigma_to_t(n):
    """Given our sigmas, EulerDiscreteScheduler computes the timesteps with `_sigma_to_t`."""
    from diffusers import EulerDiscreteScheduler

    sched = EulerDiscreteScheduler(**SD)
    path = DDPMPath(**SD)
    grid = path.grid(n)
    sched.set_timesteps(sigmas=t_to_sigma(grid).tolist())
    assert _maxerr(sched.timesteps, path.at(grid[:-1]).timestep) <= 1e-4
    wrong = DDPMPath(**{**SD, "beta_end": 0.0121})
    assert _maxerr(sched.timesteps, wrong.at(grid[:-1]).timestep) > 1e-4  # negative control
    # and directly, off any grid, both ends clamped
    ls = np.log(np.array(((1 - sched.alphas_cumprod.numpy()) / sched.alphas_cumprod.numpy()) ** 0.5))
    s = np.exp(np.linspace(-6.0, 5.0, 301))
    ref = np.array([sched._sigma_to_t(np.array(x), ls) for x in s]).ravel()
    assert _maxerr(ref, path.timestep_of(sigmas_to_t(torch.from_numpy(s)))) <= 1e-4
    assert ref[0] == 0.0 and ref[-1] == 999.0


def test_ddim_alphas_at_integer_timesteps():
    """For integer k, the path at t(sigma_k) has alpha^2 == abar_k and timestep == k."""
    from diffusers import DDIMScheduler

    abar = DDIMScheduler(**SD).alphas_cumprod.double()
    t = sigmas_to_t(((1 - abar) / abar).sqrt())
    path = DDPMPath(**SD)
    p = path.at(t)
    assert torch.allclose(p.alpha**2, abar, rtol=1e-12, atol=0)
    assert torch.allclose(p.sigma**2, 1 - abar, rtol=1e-12, atol=0)
    assert _maxerr(p.timestep, torch.arange(1000, dtype=F64)) <= 1e-6
    assert path.t_max == pytest.approx(t[-1].item(), abs=1e-15)
    wrong = DDPMPath(**{**SD, "beta_end": 0.0121}).at(t)  # negative control
    assert not torch.allclose(wrong.timestep, torch.arange(1000, dtype=F64), rtol=0, atol=1e-6)
    wrong_abar = DDPMPath(**{**SD, "beta_end": 0.0121}).alphas_cumprod
    assert not torch.allclose(p.alpha**2, wrong_abar, rtol=1e-12, atol=0)


def test_ddpm_grid_validation():
    path = DDPMPath(**SD)
    with pytest.raises(ValueError, match="spacing"):
        path.grid(10, "uniform")
    with pytest.raises(ValueError, match="steps"):
        path.grid(0)
    with pytest.raises(ValueError, match="steps"):
        path.grid(1001, "trailing")
    g = path.grid(1)  # one step starts at t_max (diffusers' linspace would start at index 0)
    assert g[0].item() == pytest.approx(path.t_max) and g[1] == 0.0


def test_pinned_timesteps_are_fed_exactly_where_pinned_and_the_first_pin_wins():
    """`Denoiser.pin_timesteps`: at a pinned time the network gets the pinned timestep (a time
    pinned twice: its first one), elsewhere the path's own; unpinning restores the path's.
    Mutants: last pin wins (123 at 0.5), pinned value ignored (the path's 500.x), unpinned rows
    given a pinned value, pin kept after unpinning."""
    from flowkit.denoiser import FunctionDenoiser

    path = DDPMPath(**SD)
    den = FunctionDenoiser(lambda x, ts, c: x, path, "epsilon")
    t = torch.tensor([0.5, 0.7, 0.9, 0.5], dtype=F64)
    own = path.at(t).timestep
    den.pin_timesteps(torch.tensor([0.9, 0.5, 0.5], dtype=F64), torch.tensor([999.0, 500.0, 123.0], dtype=F64))
    fed = den.point(t)
    assert fed.timestep.dtype == own.dtype and fed.timestep.tolist() == [500.0, own[1].item(), 999.0, 500.0]
    assert own[0].item() != 500.0 and torch.equal(fed.alpha, path.at(t).alpha)
    assert torch.equal(den.point(torch.tensor([0.6], dtype=F64)).timestep, path.at(torch.tensor([0.6], dtype=F64)).timestep)
    den.pin_timesteps(None, None)
    assert torch.equal(den.point(t).timestep, own)
