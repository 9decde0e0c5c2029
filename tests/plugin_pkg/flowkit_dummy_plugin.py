"""A dummy flowkit plugin: one sampler, one guidance module and one reward, found by entry
point only.

Nothing here registers itself: flowkit's registry loads the classes named by the
`flowkit.samplers`, `flowkit.guidance` and `flowkit.rewards` entry points of this distribution.
"""

from __future__ import annotations

from flowkit.guidance_base import Guidance
from flowkit.rewards import Reward
from flowkit.sampler_base import Sampler

__all__ = ["DummySampler", "DummyGuidance", "DummyReward", "low_energy"]


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


def low_energy(images):
    """Minus the mean squared pixel of each image [B, ...] -> [B]."""
    return -images.flatten(1).float().pow(2).mean(dim=1)


class DummyReward(Reward):
    name = "dummy-reward"
    description = "a plugin's reward: minus the mean squared pixel (test of the flowkit.rewards entry point)"
    differentiable = True
    calls = 0  # how often flowkit called it

    def score(self, images, prompts):
        DummyReward.calls += 1
        return low_energy(images)
