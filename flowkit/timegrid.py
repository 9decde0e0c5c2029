"""Time grids: the flowkit times a sampler visits, separate from its update rule.

A grid is `steps + 1` descending flowkit times ending in an explicit terminal 0, as
float64. Kinds:
- `uniform`: uniform in the model path's native time (k-diffusion / diffusers linspace);
- `shift`: the static timestep shift of SD3, t' = s t / (1 + (s - 1) t);
- `dynamic`: FLUX's resolution-dependent exponential shift with mu from the image
  sequence length (or a given mu);
- `sigmas`: user times (flowkit time, descending; a terminal 0 is appended if missing);
- `scheduler`: copied from a diffusers scheduler's `set_timesteps`, called as the
  pipeline calls it (optionally with a user's `sigmas` or `mu`), so a user's scheduler
  settings are kept; `schedule()` also gives the timesteps the scheduler feeds the
  network and the scale of its initial noise;
- registered kinds (`flowkit.registry.GRID_KINDS`, e.g. `boss` from flowkit.boss): `KIND:ARG`
  asks the kind's provider for the times of a run (`boss:TABLE`, a table written by
  `flowkit tune boss` or a shipped name such as `shapes`); a registered kind may also carry
  given times (as `sigmas`), recorded under its name.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

from flowkit.errors import InputError, SpecError, clip
from flowkit.paths.base import Path
from flowkit.paths.shift import dynamic_shift, flux_mu, static_shift
from flowkit.registry import GRID_KINDS

__all__ = ["TimeGrid", "Schedule", "CORE_KINDS", "grid_kinds"]

CORE_KINDS = ("uniform", "shift", "dynamic", "sigmas", "scheduler")
MAX_MU = 20.0  # |mu| of a dynamic grid: e^mu scales the odds of t; beyond this every step but one is at t ~ 0 or 1


def grid_kinds() -> tuple[str, ...]:
    """Every grid kind: the core ones, then the registered ones (boss, plugins)."""
    return CORE_KINDS + tuple(k for k in GRID_KINDS.names() if k not in CORE_KINDS)


@dataclass(frozen=True)
class Schedule:
    """A grid ready to run: `ts` (flowkit times, one per evaluation step, then the final
    time); for scheduler grids also the scheduler's own `timesteps` at ts[:-1] (what the
    network is fed there), the private `scheduler` copy with its timesteps set, and
    `noise_scale`: the initial flow-frame state is `noise_scale * unit noise`."""

    ts: Tensor
    noise_scale: float
    timesteps: Tensor | None = None
    scheduler: Any = None

    @property
    def steps(self) -> int:
        return len(self.ts) - 1


@dataclass(frozen=True)
class TimeGrid:
    kind: str = "uniform"
    shift: float = 1.0
    mu: float | None = None
    sigmas: tuple[float, ...] | None = None
    scheduler: Any = field(default=None, compare=False, repr=False)
    name: str | None = None  # a label (e.g. the BOSS table it came from)
    pass_sigmas: bool = False  # scheduler grids: pass sigmas = linspace(1, 1/N, N) as FLUX does
    # scheduler grids: `sigmas` (if given) and `mu` are passed to set_timesteps, as a pipeline's
    # `sigmas=` / `mu=` arguments (in the scheduler's own convention)

    def __post_init__(self) -> None:
        if self.kind not in CORE_KINDS and self.kind not in GRID_KINDS:
            raise SpecError(f"unknown time grid {self.kind!r}; use one of {', '.join(grid_kinds())}")
        if self.kind == "shift" and not (math.isfinite(self.shift) and self.shift > 0):
            raise SpecError(f"grid shift must be a finite number > 0, got {self.shift}")
        if self.kind == "dynamic" and self.mu is not None and not (math.isfinite(self.mu) and abs(self.mu) <= MAX_MU):
            raise SpecError(f"grid mu must be a finite number from -{MAX_MU:g} to {MAX_MU:g} (FLUX's runs from 0.5 "
                            f"to 1.15), got {self.mu:g}")
        if self.registered and not self.sigmas and not self.name:
            raise SpecError(GRID_KINDS.get(self.kind).missing)
        if self.kind == "sigmas" or (self.registered and self.sigmas):
            if not self.sigmas:
                raise SpecError(f"a {self.kind} grid needs its times")
            s = list(self.sigmas)
            if any(not (0.0 <= v <= 1.0) for v in s) or any(b >= a for a, b in zip(s, s[1:])):
                raise SpecError("grid times must lie in [0, 1] and strictly decrease")
        if self.kind == "scheduler" and self.scheduler is None:
            raise SpecError("a scheduler grid needs a scheduler; use TimeGrid.from_scheduler")

    @property
    def registered(self) -> bool:
        """A kind from the grid-kind registry (not a core kind)."""
        return self.kind not in CORE_KINDS

    # -- constructors -------------------------------------------------------------
    @classmethod
    def uniform(cls) -> "TimeGrid":
        return cls("uniform")

    @classmethod
    def shifted(cls, shift: float) -> "TimeGrid":
        return cls("shift", shift=float(shift))

    @classmethod
    def dynamic(cls, mu: float | None = None) -> "TimeGrid":
        return cls("dynamic", mu=mu)

    @classmethod
    def from_times(cls, times: Sequence[float], kind: str = "sigmas", name: str | None = None) -> "TimeGrid":
        return cls(kind, sigmas=tuple(float(v) for v in times), name=name)

    @classmethod
    def from_scheduler(cls, scheduler: Any, *, pass_sigmas: bool = False, sigmas: Sequence[float] | None = None,
                       mu: float | None = None) -> "TimeGrid":
        """Copy the grid from a diffusers scheduler (a private copy is stepped).

        `pass_sigmas`: call `set_timesteps(sigmas=linspace(1, 1/N, N))` as diffusers' FLUX
        pipeline does; without it the scheduler's own spacing is used (SD3's pipeline).
        `sigmas`, `mu`: a pipeline call's own `sigmas=` / `mu=`, passed on to set_timesteps
        (user sigmas fix the number of steps, as in diffusers).
        """
        return cls("scheduler", scheduler=copy.deepcopy(scheduler), name=type(scheduler).__name__,
                   pass_sigmas=pass_sigmas, sigmas=None if sigmas is None else tuple(float(v) for v in sigmas),
                   mu=None if mu is None else float(mu))

    @classmethod
    def parse(cls, text: str | "TimeGrid" | None) -> "TimeGrid":
        """'uniform', 'shift:3', 'dynamic', 'dynamic:0.8', 'sigmas:1;0.5;0.2' -> TimeGrid."""
        if text is None:
            return cls.uniform()
        if isinstance(text, TimeGrid):
            return text
        kind, _, arg = str(text).strip().partition(":")
        try:
            if kind == "uniform" and not arg:
                return cls.uniform()
            if kind == "shift":
                return cls.shifted(float(arg))
            if kind == "dynamic":
                return cls.dynamic(float(arg) if arg else None)
            if kind == "sigmas":
                return cls.from_times([float(v) for v in arg.replace(",", ";").split(";") if v.strip()])
            if kind not in CORE_KINDS and kind in GRID_KINDS:
                return cls(kind, name=arg.strip() or None)
        except SpecError as e:
            raise SpecError(f"bad time grid {clip(str(text))!r}: {e}") from None
        except ValueError as e:
            raise SpecError(f"bad time grid {clip(str(text))!r}: {clip(str(e), 200)}") from None
        extra = "".join(f", {k}:{GRID_KINDS.get(k).argument}" for k in grid_kinds() if k not in CORE_KINDS)
        raise SpecError(f"bad time grid {clip(str(text))!r}; use uniform, shift:S, dynamic[:MU], sigmas:T1;T2;...{extra}")

    # -- the grid -----------------------------------------------------------------
    def build(self, steps: int, path: Path, *, image_seq_len: int | None = None) -> Tensor:
        """`steps + 1` flowkit times (float64, descending, last = 0)."""
        if not isinstance(steps, int) or steps < 1:
            raise InputError(f"steps must be an integer >= 1, got {steps!r}")
        if self.registered and not self.sigmas:
            return GRID_KINDS.get(self.kind).times(self.name, steps)
        if self.kind == "sigmas" or self.registered:
            ts = torch.tensor(self.sigmas, dtype=torch.float64)
            if ts[-1] != 0:
                ts = torch.cat([ts, ts.new_zeros(1)])
            if len(ts) != steps + 1:
                raise InputError(f"this {self.kind} grid has {len(ts) - 1} steps, not {steps}: "
                                 f"ask for {len(ts) - 1} steps or choose another grid")
            return ts
        if self.kind == "scheduler":
            return self.schedule(steps, path, image_seq_len=image_seq_len).ts
        ts = path.uniform_grid(steps)
        if self.kind == "shift":
            ts = static_shift(ts, self.shift)
        elif self.kind == "dynamic":
            mu = self.mu
            if mu is None:
                if image_seq_len is None:
                    raise InputError("a dynamic grid needs the image sequence length or an explicit mu")
                mu = flux_mu(image_seq_len)
            ts = dynamic_shift(ts, mu)
        return ts

    def schedule(self, steps: int, path: Path, *, image_seq_len: int | None = None,
                 strict: bool = True) -> Schedule:
        """The grid with what running it needs (see `Schedule`).

        Scheduler grids: a fresh copy of the scheduler gets `set_timesteps` as its pipeline
        calls it; with `strict` (samplers that walk the times themselves) a scheduler that
        evaluates more often than `steps` (PNDM's warm-up, Heun's second evaluations) is
        refused, while sampler='pipeline' (strict=False) takes all of its timesteps.
        """
        if self.kind != "scheduler":
            ts = self.build(steps, path, image_seq_len=image_seq_len)
            return Schedule(ts=ts, noise_scale=float(ts[0]))
        from flowkit.schedulers import (
            initial_noise_scale,
            scheduler_times,
            set_timesteps_as_pipeline,
        )

        if not isinstance(steps, int) or steps < 1:
            raise InputError(f"steps must be an integer >= 1, got {steps!r}")
        sch = copy.deepcopy(self.scheduler)
        set_timesteps_as_pipeline(sch, steps, image_seq_len=image_seq_len, pass_sigmas=self.pass_sigmas,
                                  sigmas=self.sigmas, mu=self.mu)
        times, final = scheduler_times(sch)
        timesteps = torch.as_tensor(sch.timesteps, dtype=torch.float64).flatten().cpu()
        if strict and self.sigmas is None and len(times) != steps:
            raise InputError(f"{type(sch).__name__} gives {len(times)} evaluations for {steps} steps; "
                             "use sampler='pipeline' to run this scheduler itself")
        if strict and bool((times[1:] >= times[:-1]).any()):
            raise InputError(f"{type(sch).__name__}'s times do not strictly decrease; "
                             "use sampler='pipeline' to run this scheduler itself")
        ts = torch.cat([times, torch.tensor([final], dtype=torch.float64)])
        return Schedule(ts=ts, noise_scale=initial_noise_scale(sch, float(ts[0])), timesteps=timesteps, scheduler=sch)

    def describe(self) -> str:
        if self.kind == "shift":
            return f"shift:{self.shift:g}"
        if self.kind == "dynamic":
            return "dynamic" if self.mu is None else f"dynamic:{self.mu:g}"
        if (self.kind == "scheduler" or self.registered) and self.name:
            return f"{self.kind}:{self.name}"
        return self.kind
