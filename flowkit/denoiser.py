"""The denoiser protocol: `denoiser(x, t, cond) -> Prediction`, hiding the model family.

`x` is the flow-frame state [N, ...] (see flowkit.paths.base), `t` flowkit time [N] and
`cond` a `Conditioning` with N rows. A denoiser converts to the model's native frame and
timestep, runs the network, and wraps the raw output with its prediction type. It counts
rows evaluated (`nfe`), forward calls and seconds spent in the network.

A run on a diffusers scheduler's grid *pins* the scheduler's own timesteps to its grid
times (`pin_timesteps`), so the network is fed exactly what the pipeline would feed it
(e.g. Euler's fractional "linspace" indices, which the path's log-sigma interpolation only
approximates); every other time uses the path's `timestep`.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import Any, Callable

import torch
import torch.utils.checkpoint
from torch import Tensor

from flowkit.conditioning import Conditioning
from flowkit.paths.base import Path, PathPoint, as_time
from flowkit.prediction import Prediction

__all__ = ["Denoiser", "NetworkDenoiser", "TransformerDenoiser", "UNetDenoiser", "FunctionDenoiser",
           "latent_multiple"]


class Denoiser(ABC):
    """Base of model adapters."""

    def __init__(self, path: Path, prediction_type: str):
        self.path = path
        self.prediction_type = prediction_type
        self.nfe = 0
        self.calls = 0
        self.seconds = 0.0
        self.sync_timing = False  # synchronise CUDA around forwards when timing is wanted
        # activation checkpointing: None (off), or a function giving the (forward, recompute)
        # context managers of each call (the attention store's, so a recomputation replays the
        # call's kernel choice and records nothing twice)
        self.checkpoint: Callable[[], tuple[Any, Any]] | None = None
        self._pinned: tuple[Tensor, Tensor] | None = None

    def reset_counters(self) -> None:
        self.nfe, self.calls, self.seconds = 0, 0, 0.0

    def pin_timesteps(self, times: Tensor | None, timesteps: Tensor | None) -> None:
        """Feed `timesteps[i]` at flowkit time `times[i]` exactly (both [N], float64); None unpins."""
        if times is None or timesteps is None:
            self._pinned = None
            return
        times, timesteps = as_time(times).flatten().cpu(), as_time(timesteps).flatten().cpu()
        if times.shape != timesteps.shape:
            raise ValueError(f"{len(times)} pinned times for {len(timesteps)} timesteps")
        self._pinned = (times, timesteps)

    def point(self, t: Tensor) -> PathPoint:
        """The path at flowkit times t [N] (CPU float64), with pinned timesteps where t is pinned."""
        point = self.path.at(t)
        if self._pinned is None:
            return point
        times, timesteps = self._pinned
        hit = t[:, None] == times[None, :]  # [N, K]
        found = hit.any(dim=1)
        if not bool(found.any()):
            return point
        fed = torch.where(found, timesteps[hit.to(torch.long).argmax(dim=1)], point.timestep)
        return PathPoint(point.t, point.alpha, point.sigma, fed)

    def __call__(self, x: Tensor, t: Tensor | float, cond: Conditioning) -> Prediction:
        t = as_time(t, x.shape[0])
        point = self.point(t.cpu())
        x_native = self.path.to_native(x, point)
        if self.sync_timing and x.is_cuda:
            torch.cuda.synchronize(x.device)
        start = time.perf_counter()
        if self.checkpoint is not None and torch.is_grad_enabled():
            raw = torch.utils.checkpoint.checkpoint(self.forward, x_native, point.timestep, cond, use_reentrant=False,
                                                    context_fn=self.checkpoint)
        else:
            raw = self.forward(x_native, point.timestep, cond)
        if self.sync_timing and x.is_cuda:
            torch.cuda.synchronize(x.device)
        self.seconds += time.perf_counter() - start
        self.nfe += x.shape[0]
        self.calls += 1
        return Prediction(raw.to(x.dtype), self.prediction_type, x_native, point, self.path)

    @abstractmethod
    def forward(self, x_native: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
        """The network's raw output for native input x and native timesteps [N] (float64)."""

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32


class NetworkDenoiser(Denoiser):
    """A denoiser around one diffusers model, whose device and dtype it reports."""

    def __init__(self, network: Any, path: Path, prediction_type: str):
        super().__init__(path, prediction_type)
        self.network = network
        self._dtype: tuple[Any, torch.dtype] | None = None

    @property
    def device(self) -> torch.device:
        return self.network.device

    @property
    def dtype(self) -> torch.dtype:
        # diffusers' `network.dtype` walks every module (layerwise-casting hooks): milliseconds per
        # call on a large UNet, asked for several times per forward. Cached until the first
        # parameter's dtype or device changes (`.to()`, `enable_layerwise_casting` both change it).
        first = next(self.network.parameters(), None)
        key = None if first is None else (first.dtype, first.device)
        if key is None or self._dtype is None or self._dtype[0] != key:
            self._dtype = (key, self.network.dtype)
        return self._dtype[1]


class TransformerDenoiser(NetworkDenoiser):
    """Base of the SD3 and FLUX transformer denoisers (joint attention extras: the LoRA scale)."""

    def __init__(self, transformer: Any, path: Path, prediction_type: str = "velocity"):
        super().__init__(transformer, path, prediction_type)
        self.transformer = transformer
        self.joint_attention_kwargs: dict | None = None


class UNetDenoiser(NetworkDenoiser):
    """A diffusers UNet2DConditionModel (shapes model; SD/SDXL build on it)."""

    def __init__(self, unet: Any, path: Path, prediction_type: str,
                 cross_attention_kwargs: dict | None = None):
        super().__init__(unet, path, prediction_type)
        self.unet = unet
        self.cross_attention_kwargs = cross_attention_kwargs

    def forward(self, x_native: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
        added = {k: cond[k] for k in ("text_embeds", "time_ids") if cond.get(k) is not None}
        out = self.unet(
            x_native.to(self.dtype),
            timestep.to(device=x_native.device, dtype=torch.float32),
            encoder_hidden_states=cond["encoder_hidden_states"].to(self.dtype),
            added_cond_kwargs=added or None,
            cross_attention_kwargs=self.cross_attention_kwargs,
            return_dict=False,
        )[0]
        return out


class FunctionDenoiser(Denoiser):
    """Wrap `fn(x_native, timestep, cond) -> Tensor` (analytic models, tests)."""

    def __init__(self, fn, path: Path, prediction_type: str):
        super().__init__(path, prediction_type)
        self.fn = fn

    def forward(self, x_native: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
        return self.fn(x_native, timestep, cond)


def latent_multiple(denoiser: Any) -> int:
    """Latent heights and widths this denoiser's network takes must be multiples of this (a
    sampler that changes resolution, such as bottleneck, checks its stages with it): the
    denoiser's own `latent_multiple` (FLUX's 2x2 packing, SD3's patch size), else 2^(levels-1)
    for a UNet's downsampling, else 1."""
    own = getattr(denoiser, "latent_multiple", None)
    if own is not None:
        return int(own)
    config = getattr(getattr(denoiser, "network", None), "config", None)
    levels = getattr(config, "block_out_channels", None)
    return 2 ** (len(levels) - 1) if levels else 1
