"""Bottleneck sampling (Tian et al., "Training-free Diffusion Acceleration with Bottleneck
Sampling", 2025): a high-low-high workflow of resolution stages.

Each stage has a resolution (`scale`, relative to the requested size), a share of the
steps (`fraction`), the flowkit times it starts and ends at, and its own timestep shift:
given, or (the presets) the model's own rule at the stage's size (`model_shift`): FLUX's
dynamic shift from the stage's image token count, SD3's static `shift`, 1 for unshifted
models.
Stage i walks Euler steps from `start_i` to `end_i`, spaced uniformly in the unshifted time
and mapped by the static shift t' = s t / (1 + (s - 1) t). At a transition the predicted
clean image x0 of the stage's last step is resampled to the next resolution (the clean
image, not the noisy state: resampled noise would no longer be white) and re-noised to the
next stage's start with fresh noise from each sample's own generator,

    x = (1 - t_start) * resize(x0_hat) + t_start * eps,     eps ~ N(0, I) per sample,

which is the flow-frame state of every Gaussian path, so flow models and the DDPM models
of SD/SDXL (seen in the flow frame) are handled alike. Guidance modules hear of every
change through `on_stage_change`. `num_inference_steps` is the total, split over the
stages by their fractions (largest remainders), or given per stage as `steps`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from flowkit.errors import InputError, UnsupportedError
from flowkit.paths.shift import flux_mu, static_shift
from flowkit.registry import SAMPLERS
from flowkit.sampler_base import Sampler, euler_walk
from flowkit.timegrid import TimeGrid

__all__ = ["Bottleneck", "Stage", "PRESETS", "split_steps", "stage_times", "stage_shapes", "model_shift"]


@dataclass(frozen=True)
class Stage:
    """One resolution stage: scale of the requested size, share of the steps, the flowkit
    times it starts and ends at, and the static shift of its grid (None: the model's own
    rule at the stage's size, resolved when the run starts)."""

    scale: float
    fraction: float
    start: float
    end: float
    shift: float | None = 1.0


# Stage configurations as data, each stage shifted by the model's own rule at its size
# (`model_shift`). `default`: the shapes model's 32 -> 16 -> 32 px (it was trained at 16 and
# 32 px). `flux`: flowkit's reading of the paper's FLUX.1-dev setting, full -> half -> full
# size in three stages, with noise re-introduced at the upsampling transition; on FLUX each
# stage gets FLUX's rule for its token count (shift = e^mu, mu = flux_mu(tokens)): 3.16 / 1.88
# at 1024 px, 2.33 / 1.74 at 768 px, 1.88 / 1.65 at 512 px.
PRESETS: dict[str, tuple[Stage, ...]] = {
    "default": (Stage(1.0, 0.25, 1.0, 0.8, None), Stage(0.5, 0.5, 0.8, 0.35, None),
                Stage(1.0, 0.25, 0.5, 0.0, None)),
    "flux": (Stage(1.0, 0.2, 1.0, 0.85, None), Stage(0.5, 0.5, 0.85, 0.45, None), Stage(1.0, 0.3, 0.7, 0.0, None)),
}


def model_shift(grid: TimeGrid | None, tokens: int | None = None) -> float:
    """The static shift that a model's own grid `grid` (its adapter's default) applies to an
    image of `tokens` image tokens: a dynamic rule (FLUX: `use_dynamic_shifting`) gives
    e^mu with mu = flux_mu(tokens) from the scheduler's config ("linear" time_shift_type: mu
    itself); a static one its `shift` (SD3; `flow_shift` for flow-sigma schedulers); otherwise
    1 (SD/SDXL schedulers, the shapes model, an unknown model)."""
    if grid is None or grid.kind in ("uniform", "sigmas", "boss"):
        return 1.0
    if grid.kind == "shift":
        return float(grid.shift)
    if grid.kind == "dynamic":
        return math.exp(grid.mu if grid.mu is not None else flux_mu(_need(tokens)))
    cfg = grid.scheduler.config  # a scheduler grid
    if cfg.get("use_dynamic_shifting", False):
        mu = grid.mu if grid.mu is not None else flux_mu(
            _need(tokens), cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        return float(mu) if cfg.get("time_shift_type", "exponential") == "linear" else math.exp(mu)
    if cfg.get("use_flow_sigmas", False):
        return float(cfg.get("flow_shift", 1.0))
    return float(cfg.get("shift", 1.0))


def _need(tokens: int | None) -> int:
    if tokens is None:
        raise InputError("this model shifts its times by its image token count; the stage's count is unknown")
    return int(tokens)


def check_stages(stages: Sequence[Stage]) -> None:
    """Raise InputError naming the stage and what to change if the configuration is impossible."""
    if not stages:
        raise InputError("bottleneck needs at least one stage")
    total = sum(s.fraction for s in stages)
    if not math.isclose(total, 1.0, abs_tol=1e-6):
        raise InputError(f"bottleneck stage fractions add up to {total:g}; make them add up to 1")
    for i, s in enumerate(stages, 1):
        if not (s.scale > 0 and math.isfinite(s.scale)):
            raise InputError(f"bottleneck stage {i}: scale must be > 0, got {s.scale}")
        if not s.fraction > 0:
            raise InputError(f"bottleneck stage {i}: fraction must be > 0, got {s.fraction}")
        if s.shift is not None and not s.shift > 0:
            raise InputError(f"bottleneck stage {i}: shift must be > 0, got {s.shift}")
        if not (0.0 <= s.end < s.start <= 1.0):
            raise InputError(f"bottleneck stage {i} runs from t={s.start:g} to t={s.end:g}: it must start above "
                             "where it ends, within [0, 1]")
    if stages[0].start != 1.0:
        raise InputError(f"the first bottleneck stage starts from noise, at t=1, not t={stages[0].start:g}")
    if stages[-1].end != 0.0 or stages[-1].scale != 1.0:
        raise InputError("the last bottleneck stage must end at t=0 at scale 1 (the requested size)")
    for i, (a, b) in enumerate(zip(stages, stages[1:]), 2):
        if a.end == 0.0:
            raise InputError(f"bottleneck stage {i - 1} ends at t=0, but stage {i} follows it: only the last "
                             "stage ends at 0")
        if b.start < a.end:
            raise InputError(f"bottleneck stage {i} starts at t={b.start:g}, below where stage {i - 1} ended "
                             f"(t={a.end:g}): a transition can only add noise")


def split_steps(total: int, stages: Sequence[Stage], steps: Sequence[int] | None = None) -> list[int]:
    """Steps per stage: `steps` as given (they must add up to `total`), else `total` split
    by the stages' fractions with largest remainders (ties to the earlier stage)."""
    if steps is not None:
        if len(steps) != len(stages):
            raise InputError(f"bottleneck has {len(stages)} stages but {len(steps)} stage step counts")
        if any(n < 1 for n in steps):
            raise InputError(f"every bottleneck stage needs at least one step, got {list(steps)}")
        if sum(steps) != total:
            raise InputError(f"bottleneck stage steps {list(steps)} add up to {sum(steps)}, but the run asks for "
                             f"{total}: ask for {sum(steps)} steps or change the stage steps")
        return list(steps)
    if total < len(stages):
        raise InputError(f"{total} steps cannot be split over {len(stages)} bottleneck stages: ask for at least "
                         f"{len(stages)} steps")
    exact = [total * s.fraction for s in stages]
    counts = [math.floor(e + 1e-9) for e in exact]
    order = sorted(range(len(stages)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    if min(counts) < 1:
        empty = counts.index(0) + 1
        raise InputError(f"{total} steps split by fractions {[s.fraction for s in stages]} leave stage {empty} "
                         "with no step: ask for more steps or give that stage a larger fraction")
    return counts


def stage_times(stage: Stage, steps: int, start: float | None = None) -> Tensor:
    """steps + 1 flowkit times from the stage's start to its end (float64), uniform in the
    unshifted time u = shift^-1(t) and mapped by the stage's static shift (a stage whose
    shift is the model's rule must be resolved first: `Bottleneck.plan`)."""
    if stage.shift is None:
        raise InputError("this bottleneck stage's shift is the model's rule: resolve it (Bottleneck.plan)")
    t_a = stage.start if start is None else start
    u_a, u_b = (float(static_shift(t, 1.0 / stage.shift)) for t in (t_a, stage.end))
    ts = static_shift(torch.linspace(u_a, u_b, steps + 1, dtype=torch.float64), stage.shift)
    ts[0], ts[-1] = t_a, stage.end
    return ts


def stage_shapes(shape: Sequence[int], stages: Sequence[Stage], multiple: int) -> list[tuple[int, ...]]:
    """The per-sample state shape [C, H', W'] of each stage for a full shape [C, H, W]; an
    InputError names a stage whose size is not whole or not a multiple of `multiple`."""
    c, h, w = shape
    out = []
    for i, s in enumerate(stages, 1):
        hh, ww = h * s.scale, w * s.scale
        if not (math.isclose(hh, round(hh)) and math.isclose(ww, round(ww))) or round(hh) < 1 or round(ww) < 1:
            raise InputError(f"bottleneck stage {i} (scale {s.scale:g}) of a {h}x{w} latent would be {hh:g}x{ww:g}: "
                             "choose a scale that gives whole sizes")
        hh, ww = round(hh), round(ww)
        if hh % multiple or ww % multiple:
            raise InputError(f"bottleneck stage {i} (scale {s.scale:g}) runs at {hh}x{ww} latents, but this model "
                             f"takes multiples of {multiple}: choose another scale or image size")
        out.append((c, hh, ww))
    return out


def resize(x: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    """[B, C, H, W] -> [B, C, *size] (antialiased when shrinking with bilinear/bicubic)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    smaller = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    kw = {"align_corners": False, "antialias": smaller} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(x.float(), size=size, mode=mode, **kw).to(x.dtype)


@SAMPLERS.register
class Bottleneck(Sampler):
    name = "bottleneck"
    description = "bottleneck sampling: high-low-high resolution stages of Euler steps (training-free speed-up)"

    def __init__(self, *, preset: Literal["default", "flux"] = "default", scales: list[float] | None = None,
                 fractions: list[float] | None = None, starts: list[float] | None = None,
                 ends: list[float] | None = None, shifts: list[float] | None = None, steps: list[int] | None = None,
                 resample: Literal["bilinear", "bicubic", "nearest", "area"] = "bilinear"):
        super().__init__(grid="uniform")  # the nominal grid; the walked ones are the stages' (model.walk)
        if preset not in PRESETS:
            raise InputError(f"unknown bottleneck preset {preset!r}; use one of {', '.join(PRESETS)}")
        base = PRESETS[preset]
        given = {"scales": scales, "fractions": fractions, "starts": starts, "ends": ends, "shifts": shifts}
        n = {len(v) for v in given.values() if v is not None}
        if len(n) > 1:
            raise InputError(f"bottleneck stage lists have different lengths: "
                             f"{ {k: len(v) for k, v in given.items() if v is not None} }")
        count = n.pop() if n else len(base)
        if count != len(base) and any(v is None for k, v in given.items() if k != "shifts"):
            missing = [k for k, v in given.items() if v is None and k != "shifts"]
            raise InputError(f"{count} stages differ from the {preset} preset's {len(base)}: give {', '.join(missing)} "
                             "for every stage too (shifts, if left out, follow the model's rule)")
        fields = ("scale", "fraction", "start", "end", "shift")
        def value(f: str, i: int):
            if given[f + "s"] is not None:
                return float(given[f + "s"][i])
            return getattr(base[i], f) if count == len(base) else None  # other counts: the model's shifts

        self.stages = tuple(Stage(**{f: value(f, i) for f in fields}) for i in range(count))
        check_stages(self.stages)
        if steps is not None and (len(steps) != count or any(not isinstance(k, int) or k < 1 for k in steps)):
            raise InputError(f"steps gives each of the {count} bottleneck stages its whole number of steps (>= 1), "
                             f"got {steps}")
        self.preset, self.scales, self.fractions = preset, scales, fractions
        self.starts, self.ends, self.shifts, self.steps, self.resample = starts, ends, shifts, steps, resample

    def plan(self, total: int, shape: Sequence[int], multiple: int = 1, t0: float = 1.0,
             model_grid: TimeGrid | None = None):
        """[(shape, times)] per stage for `total` steps at full per-sample shape [C, H, W]; a
        stage without its own shift takes `model_shift(model_grid, tokens)`, with tokens its
        latent size in `multiple`-sized patches."""
        counts = split_steps(total, self.stages, self.steps)
        shapes = stage_shapes(shape, self.stages, multiple)
        stages = self.resolved(shapes, multiple, model_grid)
        times = [stage_times(s, k, start=t0 if i == 0 else None) for i, (s, k) in enumerate(zip(stages, counts))]
        return list(zip(shapes, times))

    def resolved(self, shapes: Sequence[Sequence[int]], multiple: int, model_grid: TimeGrid | None) -> list[Stage]:
        """The stages with every shift a number: the model's rule at each stage's shape where unset."""
        return [s if s.shift is not None else
                replace(s, shift=model_shift(model_grid, (shp[1] // multiple) * (shp[2] // multiple)))
                for s, shp in zip(self.stages, shapes)]

    def sample(self, model, x, ts):
        from flowkit.denoiser import latent_multiple

        ctx = model.ctx
        if x.ndim != 4:
            raise UnsupportedError(f"bottleneck resamples images [B, C, H, W]; this model's state is {list(x.shape)}")
        plan = self.plan(len(ts) - 1, tuple(x.shape[1:]), latent_multiple(ctx.denoiser), float(ts[0]),
                         model_grid=ctx.model_grid)
        if tuple(x.shape[1:]) != plan[0][0]:  # a first stage below full size starts from its own noise
            x = ctx.randn(plan[0][0], x.dtype) * float(plan[0][1][0])
        x0_hat = None
        for k, (shape, times) in enumerate(plan):
            if k > 0:  # transition: resample the predicted clean image, re-noise with fresh noise
                model.change_stage(tuple(x.shape[1:]), shape)
                t_start = float(times[0])
                x = (1.0 - t_start) * resize(x0_hat, shape[1:], self.resample) + t_start * ctx.randn(shape, x.dtype)
            model.walk(times)
            x, pred = euler_walk(model, x, times)
            x0_hat = pred.x0.to(x.dtype)
        return x
