"""The denoiser protocol: `denoiser(x, t, cond) -> Prediction`, hiding the model family.

`x` is the flow-frame state [N, ...] (see flowkit.paths.base), `t` flowkit time [N] and
`cond` a `Conditioning` with N rows. A denoiser converts to the model's native frame and
timestep, runs the network, and wraps the raw output with its prediction type. It counts
rows evaluated (`nfe`), forward calls and seconds spent in the network.

A run on a diffusers scheduler's grid *pins* the scheduler's own timesteps to its grid
times (`pin_timesteps`), so the network is fed exactly what the pipeline would feed it
(e.g. Euler's fractional "linspace" indices, which the path's log-sigma interpolation only
approximates); every other time uses the path's `timestep`.

Compilation: a network a user compiled (`pipe.unet = torch.compile(pipe.unet)`) is run as it
is; `NetworkDenoiser.compiled(options)` runs a block on a `torch.compile`d copy of the
network (`compile_network`: one per network and options, kept for later runs, so a second
run does not compile again). Timesteps always reach the network as tensors, so a new step
is not a new guard. A denoiser counts the graphs torch compiled during its calls and the
seconds those calls took (`compiles`, `compile_seconds`: the first call's compile time).
"""

from __future__ import annotations

import sys
import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.utils.checkpoint
from torch import Tensor

from flowkit.conditioning import Conditioning
from flowkit.errors import InputError
from flowkit.paths.base import Path, PathPoint, as_time
from flowkit.prediction import Prediction

__all__ = ["Denoiser", "NetworkDenoiser", "TransformerDenoiser", "UNetDenoiser", "FunctionDenoiser",
           "latent_multiple", "compile_options", "compile_network", "is_compiled", "COMPILE_KEYWORDS"]

# torch.compile's keywords that `compile=` takes; fullgraph is on unless given
COMPILE_KEYWORDS = ("backend", "mode", "fullgraph", "dynamic", "options")
_CACHE_ATTRIBUTE = "_flowkit_compiled"


class _CompiledCache(dict):
    """The compiled wrappers of one network, kept on the network itself: a wrapper holds its
    network (`_orig_mod`), so a cache outside the network would keep it alive for ever; on the
    network the two form a cycle the garbage collector frees. Copies and pickles start empty."""

    def __deepcopy__(self, memo: dict) -> "_CompiledCache":
        return _CompiledCache()

    def __reduce__(self):
        return (_CompiledCache, ())


def compile_options(compile: Any) -> dict[str, Any] | None:
    """The torch.compile keywords of a `compile=` option: False/None -> None (eager), True ->
    {"fullgraph": True}, a mode name ("max-autotune", "reduce-overhead", ...) -> that mode, a
    dict of torch.compile keywords -> those (fullgraph True unless given)."""
    if compile is None or compile is False:
        return None
    if compile is True:
        return {"fullgraph": True}
    if isinstance(compile, str):
        return {"fullgraph": True, "mode": compile}
    if isinstance(compile, Mapping):
        unknown = [k for k in compile if k not in COMPILE_KEYWORDS]
        if unknown:
            raise InputError(f"compile: unknown torch.compile keyword {unknown[0]!r}; use "
                             f"{', '.join(COMPILE_KEYWORDS)}")
        return {"fullgraph": True, **compile}
    raise InputError(f"compile must be True, False, a torch.compile mode or a dict of torch.compile keywords, "
                     f"got {type(compile).__name__}")


def is_compiled(module: Any) -> bool:
    """Whether `module` is a torch.compile wrapper (OptimizedModule)."""
    return isinstance(getattr(module, "_orig_mod", None), torch.nn.Module)


def compile_network(network: Any, options: Mapping[str, Any]) -> Any:
    """`torch.compile(network, **options)`, one wrapper per network and options (kept while the
    network lives, so later runs reuse its compiled code); a compiled network is returned as is."""
    if is_compiled(network):
        return network
    key = repr(sorted(options.items()))
    cache = network.__dict__.get(_CACHE_ATTRIBUTE)
    if not isinstance(cache, _CompiledCache):
        cache = _CompiledCache()
        object.__setattr__(network, _CACHE_ATTRIBUTE, cache)
    if key not in cache:
        cache[key] = torch.compile(network, **options)
    return cache[key]


def _graphs_compiled() -> int:
    """Graphs torch's compiler has compiled in this process (0 if it was never loaded)."""
    if "torch._dynamo" not in sys.modules:
        return 0
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class Denoiser(ABC):
    """Base of model adapters."""

    def __init__(self, path: Path, prediction_type: str):
        self.path = path
        self.prediction_type = prediction_type
        self.nfe = 0
        self.calls = 0
        self.seconds = 0.0
        self.compiles = 0  # graphs torch compiled during this denoiser's calls
        self.compile_seconds = 0.0  # seconds of the calls that compiled (the first call's compile time)
        self.sync_timing = False  # synchronise CUDA around forwards when timing is wanted
        # activation checkpointing: None (off), or a function giving the (forward, recompute)
        # context managers of each call (the attention store's, so a recomputation replays the
        # call's kernel choice and records nothing twice)
        self.checkpoint: Callable[[], tuple[Any, Any]] | None = None
        self._pinned: dict[float, float] | None = None  # flowkit time -> the timestep fed there

    def reset_counters(self) -> None:
        self.nfe, self.calls, self.seconds = 0, 0, 0.0
        self.compiles, self.compile_seconds = 0, 0.0

    @property
    def is_compiled(self) -> bool:
        """Whether the network runs compiled (torch.compile)."""
        return False

    def pin_timesteps(self, times: Tensor | None, timesteps: Tensor | None) -> None:
        """Feed `timesteps[i]` at flowkit time `times[i]` exactly (both [N], float64); None unpins."""
        if times is None or timesteps is None:
            self._pinned = None
            return
        times, timesteps = as_time(times).flatten().cpu(), as_time(timesteps).flatten().cpu()
        if times.shape != timesteps.shape:
            raise ValueError(f"{len(times)} pinned times for {len(timesteps)} timesteps")
        table: dict[float, float] = {}
        for time_, step in zip(times.tolist(), timesteps.tolist()):
            table.setdefault(time_, step)  # a time pinned twice: its first timestep
        self._pinned = table

    def point(self, t: Tensor) -> PathPoint:
        """The path at flowkit times t [N] (CPU float64), with pinned timesteps where t is pinned
        (exact float64 equality; a per-step lookup in Python: no tensor ops on the hot path)."""
        point = self.path.at(t)
        if self._pinned is None:
            return point
        fed = [self._pinned.get(v) for v in t.tolist()]
        if all(f is None for f in fed):
            return point
        own = point.timestep.tolist()
        timestep = torch.tensor([o if f is None else f for f, o in zip(fed, own)], dtype=point.timestep.dtype)
        return PathPoint(point.t, point.alpha, point.sigma, timestep)

    def __call__(self, x: Tensor, t: Tensor | float, cond: Conditioning) -> Prediction:
        t = as_time(t, x.shape[0])
        point = self.point(t.cpu())
        x_native = self.path.to_native(x, point)
        if self.sync_timing and x.is_cuda:
            torch.cuda.synchronize(x.device)
        graphs = _graphs_compiled() if self.is_compiled else 0
        start = time.perf_counter()
        if self.checkpoint is not None and torch.is_grad_enabled():
            raw = torch.utils.checkpoint.checkpoint(self.forward, x_native, point.timestep, cond, use_reentrant=False,
                                                    context_fn=self.checkpoint)
        else:
            raw = self.forward(x_native, point.timestep, cond)
        if self.sync_timing and x.is_cuda:
            torch.cuda.synchronize(x.device)
        seconds = time.perf_counter() - start
        self.seconds += seconds
        if self.is_compiled:
            new = _graphs_compiled() - graphs
            if new > 0:
                self.compiles += new
                self.compile_seconds += seconds
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
    def is_compiled(self) -> bool:
        return is_compiled(self.network)

    @contextmanager
    def compiled(self, options: Mapping[str, Any] | None) -> Iterator[Any]:
        """Run the block on the network compiled with torch.compile `options` (None: as it is);
        yields the network the block runs."""
        if options is None or self.is_compiled:
            yield self.network
            return
        original = self.network
        net = compile_network(original, options)
        names = [name for name, value in vars(self).items() if value is original]  # network, unet / transformer
        for name in names:
            setattr(self, name, net)
        try:
            yield net
        finally:
            for name in names:
                setattr(self, name, original)

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
