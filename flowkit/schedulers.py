"""diffusers schedulers seen from flowkit time: their frames, times and set_timesteps calls.

A diffusers scheduler keeps its state in one of three frames; each is the flow frame
(`x_flow`, see flowkit.paths.base) times a scale that depends only on flowkit time t:

    "flow"  flow-matching schedulers (FlowMatchEulerDiscrete): x = x_flow          (scale 1)
    "ve"    Euler, Heun, LMS, KDPM2 (`scale_model_input` divides by sqrt(1 + s^2)):
            x_VE = x_flow * (1 + s) = x_flow / (1 - t),   s = t / (1 - t)
    "vp"    DDIM, DDPM, PNDM, DPM-Solver, UniPC, DEIS (the model's native frame):
            x_native = x_flow * (alpha + sigma) = x_flow / hypot(1 - t, t)

The frame is found by behaviour, not by class name: a scheduler without `alphas_cumprod`
is a flow-matching one; one whose `scale_model_input` changes its input is "ve".
"""

from __future__ import annotations

import copy
import inspect
import math
from typing import Any, Sequence

import torch
from torch import Tensor

from flowkit.paths.shift import flux_mu

__all__ = [
    "scheduler_frame",
    "frame_scale",
    "set_timesteps_as_pipeline",
    "scheduler_times",
    "initial_noise_scale",
]


def scheduler_frame(scheduler: Any) -> str:
    """"flow", "ve" or "vp" (see the module docstring); `scheduler` must have its timesteps set."""
    if not hasattr(scheduler, "alphas_cumprod"):
        return "flow"
    probe = copy.deepcopy(scheduler)
    timesteps = getattr(probe, "timesteps", None)
    if timesteps is None or len(timesteps) == 0 or not hasattr(probe, "scale_model_input"):
        return "vp"
    one = torch.ones(1, dtype=torch.float32)
    scaled = probe.scale_model_input(one, timesteps[0])
    return "vp" if abs(float(scaled.reshape(-1)[0]) - 1.0) < 1e-7 else "ve"


def frame_scale(frame: str, t: float) -> float:
    """x_scheduler = frame_scale * x_flow at flowkit time t."""
    if frame == "flow":
        return 1.0
    if frame == "ve":
        return 1.0 / (1.0 - t)
    if frame == "vp":
        return 1.0 / math.hypot(1.0 - t, t)
    raise ValueError(f"unknown scheduler frame {frame!r}; use flow, ve or vp")


def set_timesteps_as_pipeline(scheduler: Any, steps: int, *, image_seq_len: int | None = None,
                              pass_sigmas: bool = False, sigmas: Sequence[float] | None = None,
                              mu: float | None = None) -> None:
    """Call `scheduler.set_timesteps` as diffusers' text-to-image pipelines do.

    `sigmas` (a user's, as the pipeline's `sigmas=` argument) replace the count; without them
    `pass_sigmas` passes linspace(1, 1/steps, steps) (FLUX's pipeline). Dynamically shifting
    flow schedulers get `mu` (given, or FLUX's linear rule from the image sequence length).
    """
    from flowkit.errors import InputError

    kwargs: dict[str, Any] = {}
    cfg = getattr(scheduler, "config", {})
    params = inspect.signature(scheduler.set_timesteps).parameters
    if mu is None and cfg.get("use_dynamic_shifting", False):
        if image_seq_len is None:
            raise InputError("this scheduler shifts dynamically: the image sequence length is needed")
        mu = flux_mu(image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                     cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
    if mu is not None:
        if "mu" not in params:
            raise InputError(f"{type(scheduler).__name__} takes no mu (it does not shift its times)")
        kwargs["mu"] = float(mu)
    if sigmas is None and pass_sigmas and "sigmas" in params:
        sigmas = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64).tolist()
    if sigmas is not None:
        if "sigmas" not in params:
            raise InputError(f"{type(scheduler).__name__} takes no custom sigmas; give num_inference_steps instead")
        scheduler.set_timesteps(sigmas=[float(s) for s in sigmas], **kwargs)
    else:
        scheduler.set_timesteps(steps, **kwargs)


def scheduler_times(scheduler: Any) -> tuple[Tensor, float]:
    """(flowkit time of each entry of `scheduler.timesteps` [N], the final time) as float64.

    A scheduler whose `sigmas` hold one level per timestep plus the final one (Euler, Heun,
    DPM-Solver, UniPC, flow matching) gives its times from them; the others (DDIM, PNDM)
    from `alphas_cumprod` at the (integer) timesteps, ending at 0.
    """
    frame = "flow" if not hasattr(scheduler, "alphas_cumprod") else "ddpm"
    timesteps = torch.as_tensor(scheduler.timesteps, dtype=torch.float64).flatten().cpu()
    n = len(timesteps)
    sig = getattr(scheduler, "sigmas", None)
    if sig is not None:
        sig = torch.as_tensor(sig, dtype=torch.float64).flatten().cpu()
    if sig is not None and len(sig) == n + 1:
        if frame == "flow":
            return sig[:n].clone(), float(sig[n])
        t = torch.where(torch.isinf(sig), torch.ones_like(sig), sig / (1.0 + sig))
        return t[:n].clone(), float(t[n])
    if frame == "flow":
        return timesteps / float(scheduler.config.num_train_timesteps), 0.0
    ac = torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64).cpu()
    k = timesteps.round().long().clamp(0, len(ac) - 1)
    s = ((1.0 - ac[k]) / ac[k]).sqrt()
    return s / (1.0 + s), 0.0


def initial_noise_scale(scheduler: Any, t0: float, frame: str | None = None) -> float:
    """x_flow = scale * unit noise where the pipeline starts from `init_noise_sigma * noise`
    in the scheduler's frame at flowkit time t0 (Euler's "leading" spacing starts at
    sqrt(s^2 + 1), DDIM and DPM-Solver at 1 in the native frame, flow matching at 1)."""
    frame = frame or scheduler_frame(scheduler)
    init = float(torch.as_tensor(getattr(scheduler, "init_noise_sigma", 1.0), dtype=torch.float64))
    return init / frame_scale(frame, t0)
