"""The wrapped pipeline's own scheduler, stepped with flowkit's guided model.

`scheduler.step` of any diffusers scheduler (DPM-Solver++, UniPC, DDIM, PNDM, Euler, ...)
advances the state in the scheduler's own frame (see flowkit.schedulers); flowkit
supplies the guided model output at each of the scheduler's timesteps. The state is
converted to the flow frame only to call the guided model and the step hooks: a
callback that leaves it unchanged changes nothing, so the scheduler's own arithmetic
runs undisturbed. The run's context must carry the scheduler (`ctx.scheduler`, set by
`flowkit.sample` and `FlowKitPipeline` on the pipeline's scheduler grid); stochastic
schedulers draw their noise from the call's generator (FlowKitPipeline, as the pipeline
would), else from the first sample's generator.
"""

from __future__ import annotations

import inspect

from flowkit.registry import SAMPLERS
from flowkit.sampler_base import Sampler
from flowkit.schedulers import frame_scale, scheduler_frame

__all__ = ["PipelineSampler"]


@SAMPLERS.register
class PipelineSampler(Sampler):
    name = "pipeline"
    description = "the wrapped pipeline's own scheduler.step (DPM-Solver++, UniPC, ...) with flowkit guidance"
    uses_scheduler = True

    def __init__(self):
        super().__init__(grid=None)

    def refuse(self, ctx) -> str | None:
        reason = super().refuse(ctx)
        if reason:
            return reason
        if ctx.scheduler is None:
            return ("sampler 'pipeline' steps with the pipeline's own scheduler, and this run has none: "
                    "use it on a diffusers pipeline with a scheduler and without a grid of flowkit's own, "
                    "or choose another sampler (flowkit.samplers.available())")
        return None

    def evaluations(self, steps: int) -> int:
        """One per scheduler timestep: `steps` for most schedulers (PNDM and Heun evaluate more)."""
        return steps

    def sample(self, model, x, ts):
        ctx = model.ctx
        sch = ctx.scheduler
        path = ctx.denoiser.path
        kind = ctx.denoiser.prediction_type
        frame = scheduler_frame(sch)
        extra = {}
        if "generator" in inspect.signature(sch.step).parameters and ctx.generators:
            extra["generator"] = ctx.step_generator if ctx.step_generator is not None else ctx.generators[0]
        x_s = x * frame_scale(frame, float(ts[0]))  # state in the scheduler's frame
        for i, tau in enumerate(sch.timesteps):
            t, t_next = float(ts[i]), float(ts[i + 1])
            x_in = sch.scale_model_input(x_s, tau) if hasattr(sch, "scale_model_input") else x_s  # native frame
            point = path.at(ts[i : i + 1].expand(x.shape[0]))
            pred = model(path.from_native(x_in, point), t)
            out = pred.as_kind(kind).to(x_s.dtype)
            x_s = sch.step(out, tau, x_s, return_dict=False, **extra)[0]
            x_flow = x_s / frame_scale(frame, t_next)
            x_back = model.end_step(x_flow, pred)
            if x_back is not x_flow:  # a callback replaced the state
                x_s = x_back * frame_scale(frame, t_next)
        return x_s / frame_scale(frame, float(ts[-1]))
