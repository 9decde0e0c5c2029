"""Rollover budget forcing (Kim et al., "Inference-Time Scaling for Flow Models via Stochastic
Generation and Rollover Budget Forcing", 2025, sec. 4.3 and Alg. 1; the official code's
rbf/rbf.py `train_single_step`).

Per image, with a budget of NFE (flowkit's count: a proposal under CFG costs 2, measured from
the run's ledger):
1. initial particles at the first time, one row per image at a time (particle 0 from the
   image's own noise, the others from its generator); the best by the reward on its
   clean-image prediction becomes the current particle;
2. at each later (stochastic) step, proposals x' ~ SDE(x) from the current particle, each
   scored on the clean-image prediction of one evaluation at the next time, until one beats
   the best reward so far: it is accepted and the step's unused quota rolls over to the next
   step (`rollover=False`: the whole quota is spent and the step's best taken, per-step
   best-of-N); if none beats it once the quota is spent, the step's best is taken;
3. the last stochastic step spends what is left; the final step into t = 0 is deterministic
   and costs nothing extra.
The minimum budget is (particles + stochastic steps) x the cost of one proposal; a smaller
one is refused with that minimum. With one particle and the minimum budget this is the `sde`
sampler exactly. Memory: one proposal row per image.

Also the grid kind `rbf:exp` / `rbf:linear` (the official `time_schedule`): uniform steps of
u in VP-SDE time r = sqrt(1 - (1 - u)^2) (exp) or r = u (linear), mapped to flowkit time
through the time warp of `flowkit.paths.VPSDEPath`. `rbf:exp` puts 9 of 10 steps above
t = 0.7 and leaves the clean-image prediction to the last step: the official setting for
FLUX-schnell, not a default.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from flowkit.errors import InputError
from flowkit.paths.vp import VPSDEPath
from flowkit.registry import GRID_KINDS, SAMPLERS
from flowkit.samplers._particles import ParticleSampler, check_count, noise_for

__all__ = ["RBF", "RBFGrid"]

DEFAULT_PER_STEP = 4  # proposals per stochastic step when no budget is given


@SAMPLERS.register
class RBF(ParticleSampler):
    name = "rbf"
    description = ("rollover budget forcing: SDE proposals per step kept when they beat the best reward so far, "
                   "unused NFE rolled over (budget per image)")

    def __init__(self, *, budget: int | None = None, reward: Any = "count", particles: int = 1,
                 rollover: bool = True, frame: Literal["linear", "vp"] = "vp", c: float | None = None,
                 power: float = 2.0, grid: str | None = None):
        """budget: NFE per image (None: `particles` + 4 proposals per stochastic step); reward:
        a registered reward (name or spec), a Reward or a function of images; particles: the
        initial particles; rollover: False for per-step best-of-N; frame, c, power: the SDE."""
        super().__init__(reward=reward, frame=frame, c=c, power=power, grid=grid)
        self.budget = None if budget is None else check_count("budget", budget)
        self.particles = check_count("particles", particles)
        self.rollover = bool(rollover)

    def evaluations(self, steps: int) -> int:
        """Evaluations per image at a cost of 1 each (with a budget: the budget itself)."""
        return self.budget if self.budget is not None else self.particles + DEFAULT_PER_STEP * max(steps - 1, 0)

    # -- the run ----------------------------------------------------------------------------
    def sample(self, model, x, ts):
        ctx = model.ctx
        steps = len(ts) - 1
        stochastic = [i for i in range(steps - 1) if float(ts[i + 1]) > 0]
        x, pred, best, c_hat, budget = self._initial(model, x, ts, len(stochastic))
        quota = self._quota(budget - ctx.ledger.per_image, c_hat, len(stochastic))
        carry = torch.zeros_like(quota)
        for i in range(steps):
            t, t_next = float(ts[i]), float(ts[i + 1])
            if i not in stochastic:  # the final step: from the current particle, no search
                noise = ctx.randn_like(x) if t_next > 0 else None
                x = model.end_step(self.move(x, t, t_next, pred, noise), pred)
                continue
            m = stochastic.index(i)
            last = m == len(stochastic) - 1
            allowance = budget - ctx.ledger.per_image if last else quota + carry
            reserve = (len(stochastic) - 1 - m) * c_hat  # one proposal in each later step
            x, pred, best, c_hat, spent = self._step(model, x, pred, t, t_next, best, c_hat, allowance, reserve,
                                                     budget, stop_early=self.rollover and not last)
            carry = allowance - spent if self.rollover and not last else torch.zeros_like(carry)
        return x

    @staticmethod
    def _quota(left: Tensor, c_hat: Tensor, n_stochastic: int) -> Tensor:
        """A stochastic step's base quota in NFE per image: k proposals of cost c_hat, where the
        P = floor(left / c_hat) proposals left after the initial particles make k = floor(P / steps)."""
        return left // c_hat // max(n_stochastic, 1) * c_hat

    def _budget(self, ctx, cost: Tensor, declared: int, n_stochastic: int) -> tuple[Tensor, Tensor]:
        """(budget, c_hat) per image [B] (long): the planning cost of a proposal is the larger of
        the measured one and the stack's declared (1 + its modules' extra branches)."""
        c_hat = torch.clamp(cost, min=declared)
        need = (self.particles + n_stochastic) * c_hat
        if self.budget is None:
            return (self.particles + DEFAULT_PER_STEP * n_stochastic) * c_hat, c_hat
        budget = torch.full_like(cost, self.budget)
        if bool((budget < need).any()):
            low = int(need.max())
            raise InputError(f"rbf: a budget of {self.budget} NFE per image is below the minimum of {low} for "
                             f"{n_stochastic + 1} steps ({self.particles} initial particle(s) and one proposal in each "
                             f"of {n_stochastic} stochastic steps, {int(c_hat.max())} NFE each as measured): "
                             f"give budget >= {low}")
        return budget, c_hat

    def _initial(self, model, x, ts, n_stochastic: int):
        """The initial particles at ts[0], one row per image at a time; the best by reward kept,
        with its prediction and module state. Returns (x, pred, best reward, c_hat, budget)."""
        ctx = model.ctx
        t0 = float(ts[0])
        everyone = torch.arange(x.shape[0])
        start = ctx.snapshot(everyone)
        before = ctx.ledger.per_image.clone()
        pred = model(x, t0)
        cost = ctx.ledger.per_image - before
        declared = 1 + sum(m.extra_branches for m in ctx.stack)
        budget, c_hat = self._budget(ctx, cost, declared, n_stochastic)
        best = self.score(ctx, pred.x0)
        saved = [ctx.snapshot(everyone)]
        for _ in range(self.particles - 1):
            ctx.rewind(start)
            xj = self.initial_state(ctx.randn_like(x), ts, ctx)
            before = ctx.ledger.per_image.clone()
            pj = model(xj, t0)
            c_hat = torch.maximum(c_hat, ctx.ledger.per_image - before)
            r = self.score(ctx, pj.x0)
            better = r > best
            x = torch.where(_rows(better, x), xj, x)
            pred, best = model.merge(pred, pj, better), torch.where(better, r, best)
            if bool(better.any()):
                saved.append(ctx.snapshot(better.nonzero().flatten()))
        if self.particles > 1:  # the state of each image's kept particle (saved[0]: every row's first)
            ctx.rewind(saved[0])
            for s in saved[1:]:
                ctx.restore(s)
        return x, pred, best, c_hat, budget

    def _step(self, model, x, pred, t, t_next, best, c_hat, allowance, reserve, budget, *, stop_early: bool):
        """One stochastic step: proposals from (x, pred) while an image's allowance lasts, each
        scored at t_next. Returns (x, pred, best, c_hat, NFE spent per image) at t_next."""
        ctx = model.ctx
        B = x.shape[0]
        # The first proposal closes the step (after_step hooks see it); the others are drawn after.
        x_prop = model.end_step(self.move(x, t, t_next, pred, ctx.randn_like(x)), pred)
        start = ctx.snapshot(torch.arange(B))
        at_start = ctx.ledger.per_image.clone()
        step_best = torch.full((B,), float("-inf"), dtype=torch.float64)
        step_x, step_pred, saved = x_prop, None, []
        active = torch.ones(B, dtype=torch.bool)
        while bool(active.any()):
            if step_pred is not None:
                ctx.rewind(start)
                x_prop = self.move(x, t, t_next, pred, noise_for(ctx, x, active))
            before = ctx.ledger.per_image.clone()
            p = model(x_prop, t_next, active=None if bool(active.all()) else active.to(x.device))
            c_hat = torch.where(active, torch.maximum(c_hat, ctx.ledger.per_image - before), c_hat)
            r = self.score(ctx, p.x0, active)
            # every row's first proposal is its step's best so far (so saved[0] covers the batch)
            better = active & ((r > step_best) | (step_pred is None))
            step_best = torch.where(better, r, step_best)
            step_x = torch.where(_rows(better, x), x_prop, step_x)
            step_pred = p if step_pred is None else model.merge(step_pred, p, better)
            if bool(better.any()):
                saved.append(ctx.snapshot(better.nonzero().flatten()))
            beats = active & (r > best)
            best = torch.where(beats, r, best)
            spent = ctx.ledger.per_image - at_start
            room = (spent + c_hat <= allowance) & (ctx.ledger.per_image + c_hat + reserve <= budget)
            active = active & room & ~(beats if stop_early else torch.zeros_like(beats))
        ctx.rewind(saved[0])  # the state of each image's kept proposal
        for s in saved[1:]:
            ctx.restore(s)
        return step_x, step_pred, best, c_hat, ctx.ledger.per_image - at_start


def _rows(mask: Tensor, like: Tensor) -> Tensor:
    return mask.to(like.device).view((-1,) + (1,) * (like.ndim - 1))


@GRID_KINDS.register
class RBFGrid:
    """The official RBF time grid as a grid kind: `grid="rbf:exp"` (or `rbf:linear`)."""

    name = "rbf"
    description = "the official RBF grid: uniform in u, VP-SDE time r = sqrt(1 - (1 - u)^2) (rbf:exp) or r = u"
    argument = "exp|linear"
    missing = "an rbf grid needs its schedule: rbf:exp (the official one) or rbf:linear"

    @staticmethod
    def times(schedule: str, steps: int) -> Tensor:
        """`steps + 1` flowkit times (float64, descending, ending in 0)."""
        u = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
        if schedule == "exp":
            r = torch.sqrt(1.0 - (1.0 - u) ** 2)  # the official FluxTimeSampler's "exp"
        elif schedule == "linear":
            r = u
        else:
            raise InputError(f"unknown rbf grid schedule {schedule!r}; use rbf:exp or rbf:linear")
        ts = VPSDEPath().time_from_native(r)
        ts[-1] = 0.0
        return ts
