"""Per-run state handed to every guidance hook and sampler."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import Tensor

from flowkit.seeding import randn_per_sample

if TYPE_CHECKING:
    from flowkit.conditioning import Conditioning
    from flowkit.denoiser import Denoiser
    from flowkit.guidance.base import GuidanceStack
    from flowkit.timegrid import TimeGrid

__all__ = ["Context"]


@dataclass
class Context:
    """What a run knows: the model, the guidance stack, branch conditionings, time, counters.

    step: global step index (across bottleneck stages); num_steps: total steps;
    t: the current flowkit time per sample [B] (1 = noise); grid: the current stage's
    times; nfe: network evaluations per sample (per branch row) so far; scheduler: the
    pipeline's scheduler with its timesteps set (runs on a scheduler grid; what
    sampler='pipeline' steps with); noise_scale: the initial state's scale (diffusers'
    `init_noise_sigma` seen in the flow frame); model_grid: the model's own default grid
    (its scheduler's, or its static shift), for samplers that walk their own times but keep
    the model's time shift (bottleneck), None where unknown.
    """

    denoiser: "Denoiser"
    stack: "GuidanceStack"
    conds: dict[str, "Conditioning"]
    generators: list[torch.Generator]
    num_steps: int
    device: torch.device = torch.device("cpu")
    encode: Callable[[Sequence[str]], "Conditioning"] | None = None
    step: int = 0
    stage: int = 0
    t: Tensor | None = None
    grid: Tensor | None = None
    nfe: Tensor = field(default=None)  # type: ignore[assignment]
    forward_calls: int = 0
    attention: Any = None  # the run's AttentionStore: request and read attention maps (flowkit.attention.store)
    scheduler: Any = None  # the wrapped pipeline's scheduler (a private copy, timesteps set), if any
    noise_scale: float | None = None  # x_flow at the start = noise_scale * unit noise (None: grid[0])
    model_grid: "TimeGrid | None" = None  # the adapter's default grid (the model's own shift rule)
    log: list[str] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)
    _state: dict[int, dict] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.nfe is None:
            self.nfe = torch.zeros(len(self.generators), dtype=torch.long)

    @property
    def batch_size(self) -> int:
        return len(self.generators)

    @property
    def sigma(self) -> Tensor | None:
        """The flow-frame noise level (equal to t)."""
        return self.t

    @property
    def timestep(self) -> Tensor | None:
        """The model's native timestep at the current time."""
        return None if self.t is None else self.denoiser.point(self.t.cpu()).timestep

    def state_for(self, module: object) -> dict:
        """This run's private state dict of `module`."""
        return self._state.setdefault(id(module), {})

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
        """Fresh noise [B, *shape], each row from its own sample's generator."""
        return randn_per_sample(shape, self.generators, self.device, dtype)

    def randn_like(self, x: Tensor) -> Tensor:
        return self.randn(x.shape[1:], x.dtype)

    def reindex(self, index: Tensor) -> None:
        """Reorder/resample the batch (particle samplers): state, counters, conditionings.

        Generators are re-seeded from the originals' next draws, so two copies of a
        particle continue with different noise.
        """
        index = index.to(torch.long).cpu()
        self.nfe = self.nfe[index]
        self.conds = {k: v.select(index.to(v.tensors[next(iter(v.tensors))].device) if len(v) else index)
                      for k, v in self.conds.items()}
        gens = []
        for i in index.tolist():
            seed = int(torch.randint(0, 2**62, (1,), generator=self.generators[i]))
            gens.append(torch.Generator("cpu").manual_seed(seed))
        self.generators = gens
        for state in self._state.values():
            for k, v in list(state.items()):
                if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == len(index):
                    state[k] = v[index.to(v.device)]
