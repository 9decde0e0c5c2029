"""A dummy flowkit plugin: one sampler and one guidance module, found by entry point only.

Nothing here registers itself: flowkit's registry loads the classes named by the
`flowkit.samplers` and `flowkit.guidance` entry points of this distribution.
"""

from __future__ import annotations

from flowkit.guidance_base import Guidance
from flowkit.sampler_base import Sampler

__all__ = ["DummySampler", "DummyGuidance"]


class DummySampler(Sampler):
    name = "dummy-euler"
    description = "a plugin's Euler ODE steps (test of the flowkit.samplers entry point)"

    def sample(self, model, x, ts):
        for i in range(len(ts) - 1):
            t, t_next = float(ts[i]), float(ts[i + 1])
            pred = model(x, t)
            x = x + (t_next - t) * pred.velocity.to(x.dtype)
            x = model.end_step(x, pred)
        return x


class DummyGuidance(Guidance):
    name = "dummy-guidance"
    description = "a plugin's corrector that changes nothing (test of the flowkit.guidance entry point)"
    role = "corrector"

    def correct(self, ctx, x, pred, preds):
        return pred
