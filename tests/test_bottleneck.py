"""Bottleneck sampling: stage arithmetic (steps, times, sizes, FLUX token counts), the
transition (resampled clean image re-noised with each sample's own fresh noise), guidance
notified of stage changes, runs on each family's tiny pipeline, and clear errors for
impossible configurations."""

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import analytic
import flowkit
from flowkit.api import build_sampler
import tiny_pipes
from flowkit.denoiser import FunctionDenoiser
from flowkit.errors import InputError, SpecError
from flowkit.guidance_base import Guidance, GuidanceStack
from flowkit.paths import LinearPath
from flowkit.paths.shift import static_shift
from flowkit.samplers import Bottleneck
from flowkit.samplers.bottleneck import PRESETS, Stage, resize, split_steps, stage_shapes, stage_times
from flowkit.sampling_loop import integrate
from flowkit.seeding import generators_for, randn_per_sample

one_thread = tiny_pipes.one_thread
PROMPTS = ["a red circle", "two blue squares"]


# -- arithmetic ------------------------------------------------------------------------------

def test_split_steps_by_fractions_and_explicit_counts():
    stages = PRESETS["default"]  # fractions 0.25, 0.5, 0.25
    assert split_steps(8, stages) == [2, 4, 2]
    assert split_steps(3, stages) == [1, 1, 1]
    assert split_steps(10, stages) == [3, 5, 2]  # 2.5, 5, 2.5: the tie goes to the earlier stage
    assert split_steps(28, PRESETS["flux"]) == [6, 14, 8]  # 5.6, 14, 8.4
    assert split_steps(9, stages, [2, 5, 2]) == [2, 5, 2]
    with pytest.raises(InputError, match="add up to 8, but the run asks for 9"):
        split_steps(9, stages, [2, 4, 2])
    with pytest.raises(InputError, match="at least 3 steps"):
        split_steps(2, stages)
    lopsided = (Stage(1, 0.05, 1, 0.5), Stage(1, 0.95, 0.5, 0))
    with pytest.raises(InputError, match="stage 1 with no step"):
        split_steps(4, lopsided)


@settings(max_examples=200, deadline=None)
@given(total=st.integers(3, 200), weights=st.lists(st.integers(1, 20), min_size=1, max_size=3))
def test_split_steps_property(total, weights):
    stages = [Stage(1.0, w / sum(weights), 1.0, 0.0) for w in weights]
    try:
        counts = split_steps(total, stages)
    except InputError as e:
        assert "no step" in str(e) and min(total * s.fraction for s in stages) < 1
        return
    assert sum(counts) == total and min(counts) >= 1
    assert all(abs(k - total * s.fraction) < 1 for k, s in zip(counts, stages))


def test_stage_times():
    s = Stage(0.5, 0.5, 0.8, 0.35)
    ts = stage_times(s, 3)
    assert torch.allclose(ts, torch.tensor([0.8, 0.65, 0.5, 0.35], dtype=torch.float64))
    shifted = Stage(1.0, 1.0, 1.0, 0.0, shift=3.0)
    assert torch.allclose(stage_times(shifted, 4), static_shift(torch.linspace(1, 0, 5, dtype=torch.float64), 3.0))
    t = stage_times(Stage(1.0, 1.0, 0.7, 0.2, shift=2.0), 5)
    assert t[0] == 0.7 and t[-1] == 0.2 and bool((t[1:] < t[:-1]).all())


def test_stage_shapes_and_flux_token_counts():
    assert stage_shapes((3, 32, 32), PRESETS["default"], 4) == [(3, 32, 32), (3, 16, 16), (3, 32, 32)]
    # FLUX at 1024 px: latents 16 x 128 x 128 packed in 2x2 patches
    shapes = stage_shapes((16, 128, 128), PRESETS["flux"], 2)
    assert [h * w // 4 for _, h, w in shapes] == [4096, 1024, 4096]
    with pytest.raises(InputError, match="multiples of 2"):
        stage_shapes((16, 6, 6), PRESETS["flux"], 2)  # 3 x 3 latents cannot be packed
    with pytest.raises(InputError, match="whole sizes"):
        stage_shapes((3, 32, 32), (Stage(0.3, 1, 1, 0),), 1)


@pytest.mark.parametrize("kw, match", [
    (dict(fractions=[0.5, 0.2, 0.2]), "add up to 0.9"),
    (dict(scales=[1, 0.5, 0.5]), "scale 1"),
    (dict(starts=[1, 0.8, 0.3]), "can only add noise"),
    (dict(starts=[0.9, 0.8, 0.5]), "from noise"),
    (dict(ends=[0.8, 0.0, 0.0]), "only the last"),
    (dict(shifts=[1, -1, 1]), "shift must be > 0"),
    (dict(scales=[1, 1]), "give fractions, starts, ends for every stage"),
    (dict(scales=[1, 0.5, 1], fractions=[0.5, 0.5]), "different lengths"),
    (dict(steps=[1, 2]), "whole number of steps"),
    (dict(preset="sdxl"), "preset"),
])
def test_impossible_stage_configs_are_refused(kw, match):
    with pytest.raises(InputError, match=match):
        Bottleneck(**kw)


def test_spec_errors_name_the_sampler():
    with pytest.raises(SpecError, match="bottleneck: .*add up to"):
        build_sampler("bottleneck:fractions=[0.5;0.6;0.1]")
    smp = build_sampler("bottleneck:scales=[1;0.25;1],steps=[1;2;1]")
    assert smp.stages[1].scale == 0.25 and smp.steps == [1, 2, 1]
    assert build_sampler(smp.describe()).stages == smp.stages  # the spec round trip


# -- the transition, exactly -------------------------------------------------------------------

def _pattern(h: int, w: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    return torch.stack([torch.sin(3 * xx), torch.cos(2 * yy), xx * yy])  # [3, h, w]


def test_transition_resamples_the_clean_image_and_renoises_with_per_sample_noise():
    """A model whose clean-image prediction is a fixed pattern: the first input of stage 2 is
    exactly (1 - t) resize(pattern) + t eps, with eps the next draw of each sample's generator."""
    inputs = []

    def x0_model(x, timestep, cond):
        inputs.append(x.clone())
        return _pattern(*x.shape[-2:]).expand_as(x).to(x.dtype)

    den = FunctionDenoiser(x0_model, LinearPath(), "x0")
    smp = Bottleneck(steps=[1, 2, 1])
    ctx = analytic.context(2, 4, den=den)
    noise = randn_per_sample((3, 32, 32), generators_for(0, range(2)))
    ts = LinearPath().uniform_grid(4)
    integrate(smp, ctx, noise, ts)
    assert [tuple(x.shape[1:]) for x in inputs] == [(3, 32, 32), (3, 16, 16), (3, 16, 16), (3, 32, 32)]
    replay = generators_for(0, range(2))  # the context's generators (the initial noise came from elsewhere)
    eps = randn_per_sample((3, 16, 16), replay)  # the transition's fresh noise
    t = PRESETS["default"][1].start
    down = resize(_pattern(32, 32)[None].expand(2, -1, -1, -1), (16, 16), "bilinear")
    assert torch.allclose(inputs[1], (1 - t) * down + t * eps, atol=1e-6)
    implied = (inputs[1] - (1 - t) * down) / t
    assert abs(float(implied.std()) - 1.0) < 0.05  # white noise, not resampled noise (std ~ 0.5)
    eps3 = randn_per_sample((3, 32, 32), replay)
    t3 = PRESETS["default"][2].start
    up = resize(_pattern(16, 16)[None].expand(2, -1, -1, -1), (32, 32), "bilinear")
    assert torch.allclose(inputs[3], (1 - t3) * up + t3 * eps3, atol=1e-6)


class _StageSpy(Guidance):
    name = "stage-spy"
    description = "records stage changes (tests)"

    def __init__(self):
        super().__init__()
        self.changes = []

    def on_stage_change(self, ctx, old_shape, new_shape):
        self.changes.append((ctx.stage, tuple(old_shape), tuple(new_shape)))
        super().on_stage_change(ctx, old_shape, new_shape)


def test_guidance_hears_every_stage_change():
    spy = _StageSpy()
    out = flowkit.sample(flowkit.load("tiny"), PROMPTS, sampler="bottleneck", steps=4, guidance=GuidanceStack([spy]),
                         seed=0, output_type="latent")
    assert spy.changes == [(1, (3, 32, 32), (3, 16, 16)), (2, (3, 16, 16), (3, 32, 32))]
    assert [r.stage for r in out.stats.steps] == [0, 1, 1, 2]


# -- each family's tiny pipeline ------------------------------------------------------------------

def _record_inputs(network):
    seen = []

    def hook(module, args, kwargs):
        x = kwargs.get("hidden_states", kwargs.get("sample", args[0] if args else None))
        seen.append(tuple(x.shape[1:]))

    return seen, network.register_forward_pre_hook(hook, with_kwargs=True)


def flux_rule(tokens):
    """e^mu of FLUX's linear mu rule (0.5 at 256 tokens, 1.15 at 4096), written out."""
    return math.exp(0.5 + (1.15 - 0.5) / (4096 - 256) * (tokens - 256))


@pytest.mark.parametrize("family, expected, shifts", [
    ("shapes", [(3, 32, 32)] * 2 + [(3, 16, 16)] * 4 + [(3, 32, 32)] * 2, [1.0] * 3),
    ("sd", [(4, 16, 16)] * 2 + [(4, 8, 8)] * 4 + [(4, 16, 16)] * 2, [1.0] * 3),
    ("sd3", [(4, 16, 16)] * 2 + [(4, 8, 8)] * 4 + [(4, 16, 16)] * 2, [3.0] * 3),  # the scheduler's shift=3
    ("flux", [(64, 16)] * 2 + [(16, 16)] * 4 + [(64, 16)] * 2,  # packed tokens: 8x8, then 4x4 patches of 4 ch
     [flux_rule(64), flux_rule(16), flux_rule(64)]),
])
def test_bottleneck_on_each_family(family, expected, shifts):
    """Each stage is shifted by the model's own rule at its size (SD3's static shift, FLUX's
    dynamic one from the stage's token count, 1 for the UNets: the negative control).
    Mutant caught: the default preset's shift 1 in every stage whatever the model (sd3, flux)."""
    pipe = flowkit.load("tiny") if family == "shapes" else tiny_pipes.cached(family)
    net = pipe.unet if family in ("shapes", "sd") else pipe.transformer
    seen, handle = _record_inputs(net)
    try:
        out = flowkit.sample(pipe, PROMPTS, sampler="bottleneck", steps=8, guidance="none", seed=0,
                             output_type="latent")
    finally:
        handle.remove()
    assert out.stats.nfe == [8, 8]
    assert seen == expected
    if family != "flux":
        assert [r.shape for r in out.stats.steps] == expected
    stages = [dataclasses.replace(s, shift=v) for s, v in zip(PRESETS["default"], shifts)]
    walked = [stage_times(s, k, start=out.stats.grid[0] if i == 0 else None)
              for i, (s, k) in enumerate(zip(stages, [2, 4, 2]))]
    assert out.stats.grid == torch.cat(walked).tolist()  # the three stages' times, each with its end
    assert [r.t for r in out.stats.steps] == [float(v) for w in walked for v in w[:-1]]
    assert torch.isfinite(out.latents).all() and out.latents.shape[0] == 2


def test_an_image_does_not_depend_on_its_batch_partner():
    pipe = flowkit.load("tiny")
    both = flowkit.sample(pipe, PROMPTS, sampler="bottleneck", steps=4, guidance="none", seed=3, output_type="latent")
    alone = flowkit.sample(pipe, PROMPTS[1:], sampler="bottleneck", steps=4, guidance="none", seed=3, start_index=1,
                           output_type="latent")
    assert torch.allclose(both.latents[1], alone.latents[0], atol=1e-5)
    other = flowkit.sample(pipe, PROMPTS[1:], sampler="bottleneck", steps=4, guidance="none", seed=4, start_index=1,
                           output_type="latent")
    assert not torch.allclose(other.latents[0], alone.latents[0], atol=1e-2)  # control: another seed differs


def test_a_resolution_the_model_cannot_take_is_refused():
    with pytest.raises(InputError, match="multiples of 2"):  # FLUX: 16 x 16 latents at scale 3/16 are 3 x 3
        flowkit.sample(tiny_pipes.cached("flux"), PROMPTS, sampler="bottleneck:scales=[1;0.1875;1]", steps=3,
                       guidance="none", output_type="latent")
    with pytest.raises(InputError, match="multiples of 4"):  # the shapes UNet downsamples twice
        flowkit.sample(flowkit.load("tiny"), PROMPTS, sampler="bottleneck:scales=[1;0.1875;1]", steps=3,
                       guidance="none", output_type="latent")


# -- each stage's shift: the model's own rule ----------------------------------------------------

def _flux_grid():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from flowkit.timegrid import TimeGrid

    return TimeGrid.from_scheduler(FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096), pass_sigmas=True)


@pytest.mark.parametrize("px, full, half", [(1024, 3.16, 1.88), (768, 2.33, 1.74), (512, 1.88, 1.65)])
def test_flux_preset_follows_fluxs_rule_at_every_size(px, full, half):
    """The flux preset at 1024 / 768 / 512 px on a FLUX scheduler: each stage's shift is
    e^mu from its own token count ((px/16)^2 at full size, a quarter of it at half size).
    Mutant caught: the shifts fixed at FLUX's 1024 px values (3.16 / 1.88) at every size."""
    smp = Bottleneck(preset="flux")
    shape = (16, px // 8, px // 8)  # FLUX latents: 8x VAE, then 2x2 packing
    grid = _flux_grid()
    shapes = stage_shapes(shape, smp.stages, 2)
    shifts = [s.shift for s in smp.resolved(shapes, 2, grid)]
    tokens = [(h // 2) * (w // 2) for _, h, w in shapes]
    assert tokens == [(px // 16) ** 2, (px // 32) ** 2, (px // 16) ** 2]
    assert shifts == pytest.approx([flux_rule(n) for n in tokens], rel=1e-12)
    assert [round(v, 2) for v in shifts] == [full, half, full]  # the numbers
    plan = smp.plan(28, shape, 2, model_grid=grid)  # the walked times use them
    counts = split_steps(28, smp.stages)
    for (shp, ts), s, k, v in zip(plan, smp.stages, counts, shifts):
        assert torch.equal(ts, stage_times(dataclasses.replace(s, shift=v), k))


def test_model_shift_rules():
    """SD3's static shift, FLUX's dynamic one, 1 for a DDPM scheduler and a plain grid, an
    explicit stage shift over the model's."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    from flowkit.samplers.bottleneck import model_shift
    from flowkit.timegrid import TimeGrid

    assert model_shift(TimeGrid.from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0)), 4096) == 3.0
    assert model_shift(_flux_grid(), 4096) == pytest.approx(math.exp(1.15))
    linear = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="linear")
    assert model_shift(TimeGrid.from_scheduler(linear), 4096) == pytest.approx(1.15)
    assert model_shift(TimeGrid.from_scheduler(DDIMScheduler()), 4096) == 1.0
    assert model_shift(TimeGrid.uniform()) == 1.0 and model_shift(None) == 1.0
    assert model_shift(TimeGrid.shifted(2.5)) == 2.5
    with pytest.raises(InputError, match="token count"):
        model_shift(_flux_grid(), None)
    own = Bottleneck(shifts=[2.0, 2.0, 2.0])
    assert [s.shift for s in own.resolved([(16, 8, 8)] * 3, 2, _flux_grid())] == [2.0] * 3
