"""The sampling loop: guided evaluation of the denoiser, step bookkeeping, and `run`.

`GuidedModel` is what a sampler calls: `model(x, t) -> Prediction`, the guided prediction
at flow-frame state x and flowkit time t (`active=`: only some rows, the others neither
evaluated nor charged). Per evaluation it asks the guidance stack which branches each
sample needs, builds their conditionings, evaluates every needed row in one forward pass
(or one per branch when the combiner asks for it), lets modules supply predicted branches,
and applies combine and correct. A module may evaluate the network once more through
`ctx.evaluate`, counted like the loop's own calls. Every evaluation is charged to its rows
and their images in `ctx.ledger`. At the end of each step a sampler calls
`model.end_step(x, pred)`, which runs `after_step` hooks, records the step, calls the
user's callback and checks for non-finite values every few steps without synchronising
every step.

Precision: the state is kept in float32 (at least) whatever the network's dtype; times
are float64; prediction conversions run in float64 (see flowkit.paths.convert).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import Tensor

from flowkit.conditioning import Conditioning
from flowkit.errors import InputError, NonFiniteError, UnsupportedError
from flowkit.guidance_base import BranchPredictions
from flowkit.paths.base import as_time
from flowkit.prediction import Prediction

if TYPE_CHECKING:
    from flowkit.context import Context
    from flowkit.perturbation import Perturbation
    from flowkit.sampler_base import Sampler

__all__ = ["GuidedModel", "Stats", "StepRecord", "integrate"]

StepCallback = Callable[["Context", int, Tensor, Prediction], "Tensor | None"]


@dataclass
class StepRecord:
    step: int
    stage: int
    t: float
    nfe: int  # rows evaluated during this step (all samples, all branches)
    seconds: float
    branches: dict[str, int]  # rows per branch evaluated this step
    shape: tuple[int, ...] = ()  # the per-sample state shape this step ran at (bottleneck stages differ)


@dataclass
class Stats:
    """What a run cost: NFE per sample (per branch row), forward calls, seconds; for a compiled
    network, the graphs compiled during the run and the seconds of the calls that compiled."""

    nfe: list[int] = field(default_factory=list)
    forward_calls: int = 0
    backward_calls: int = 0  # backward passes run by guidance modules (not NFE)
    reward_calls: int = 0  # reward / classifier / counter calls by guidance modules (not NFE)
    seconds: float = 0.0
    forward_seconds: float = 0.0
    steps: list[StepRecord] = field(default_factory=list)
    sampler: str = ""
    guidance: str = ""
    grid: list[float] = field(default_factory=list)  # the times walked (stage after stage)
    attention: dict[str, int] = field(default_factory=dict)  # attention calls by kernel ("captured": maps taken)
    compiled: bool = False  # the network ran compiled (torch.compile)
    compiles: int = 0  # graphs torch compiled during the run (0 on a warm run: no recompile)
    compile_seconds: float = 0.0  # seconds of the forwards that compiled (the first call's compile time)

    @property
    def total_nfe(self) -> int:
        return int(sum(self.nfe))

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


class GuidedModel:
    """The guided denoiser a sampler integrates; also the step bookkeeper.

    grad_steps: None follows the ambient autograd mode at every step; K evaluates the last
    K steps of the run with gradients and every earlier step without (DRaFT-K), so a loss
    on the result differentiates through those K steps only.
    """

    def __init__(self, ctx: "Context", *, callback: StepCallback | None = None, check_every: int = 4,
                 progress: Any = None, grad_steps: int | None = None):
        self.ctx = ctx
        self.callback = callback
        self.check_every = max(int(check_every), 1)
        self.progress = progress
        self.grad_steps = grad_steps
        self.records: list[StepRecord] = []
        self._bad: list[Tensor] = []
        self._step_rows: dict[str, int] = {}
        self._step_start = time.perf_counter()
        self._nfe_at_step = 0
        self._evaluations: list[tuple[Prediction, BranchPredictions]] = []  # this step's, in order
        self.walked: list[Tensor] = []  # grids a sampler declared with `walk` (its own times)
        ctx._evaluator = self._extra

    def _grad_mode(self) -> Any:
        if self.grad_steps is None:
            return contextlib.nullcontext()
        return torch.enable_grad() if self.ctx.step >= self.ctx.num_steps - self.grad_steps else torch.no_grad()

    # -- evaluation ---------------------------------------------------------------
    def __call__(self, x: Tensor, t: Tensor | float, *, active: Tensor | None = None) -> Prediction:
        """The guided prediction at state x [B, ...] and time t. `active` [B] (bool): only these
        rows are evaluated and charged; the prediction of the other rows is meaningless."""
        with self._grad_mode():
            return self._guided(x, t, active)

    def _guided(self, x: Tensor, t: Tensor | float, active: Tensor | None) -> Prediction:
        ctx = self.ctx
        B = x.shape[0]
        t = as_time(t, B).to(torch.float64)
        ctx.t, ctx.x = t, x
        ctx.active = None if active is None else active.to(device=ctx.device, dtype=torch.bool)
        req = ctx.stack.requests(ctx)
        if ctx.active is not None:
            req.restrict(ctx.active)
        jobs: list[tuple[str, Tensor, Conditioning]] = []
        for name in req.names():
            rows = req.wanted(name).nonzero().flatten()
            if len(rows) == 0:
                continue
            cond = ctx.stack.conditioning(ctx, name, ctx.conds.get(name))
            if cond is None:
                raise InputError(f"branch {name!r} has no conditioning: a module must provide it")
            jobs.append((name, rows, cond.select(rows.to(_cond_device(cond)))))
        evaluated = self._evaluate(x, t, jobs, req.perturbations)
        preds: dict[str, Prediction] = {}
        present: dict[str, Tensor] = {}
        for name in req.names():
            full, mask = None, torch.zeros(B, dtype=torch.bool, device=x.device)
            if name in evaluated:
                rows, pred = evaluated[name]
                full = _scatter(pred, rows, B, x)
                mask[rows] = True
            if name in req.supplied:
                m, sup = req.supplied[name]
                full = sup if full is None else full.replace(torch.where(_rows(m, sup.value), sup.value, full.value))
                mask = mask | m
            if full is not None:
                preds[name], present[name] = full, mask
        for name, (m, fn) in req.deferred.items():  # supplied from this pass's predictions
            if not bool(m.any()):
                continue
            sup = fn(dict(preds))
            old = preds.get(name)
            preds[name] = sup if old is None else old.replace(torch.where(_rows(m, sup.value), sup.value, old.value))
            present[name] = present[name] | m if name in present else m
        needed = torch.ones(B, dtype=torch.bool, device=x.device) if ctx.active is None else ctx.active
        if "cond" not in preds or not bool((present["cond"] | ~needed).all()):
            raise InputError("every sample needs its conditional branch; a module dropped 'cond'")
        branch_preds = BranchPredictions(preds, present)
        pred = ctx.stack.combine(ctx, branch_preds)
        pred = ctx.stack.correct(ctx, x, pred, branch_preds)
        self._evaluations.append((pred, branch_preds))
        return pred

    def _forward(self, xs: Tensor, ts: Tensor, cond: Conditioning, layout: list[tuple[str, Tensor]],
                 latent_hw: tuple[int, ...], perturbation: "Perturbation | None" = None) -> Prediction:
        """One network call on rows `layout` (branch, batch rows), inside the attention scope;
        with `perturbation`, on the perturbed network (flowkit.perturbation)."""
        ctx = self.ctx
        if ctx.attention is None:
            if perturbation is not None:
                raise UnsupportedError(f"branch {layout[0][0]!r} needs a perturbed network ({perturbation.describe()}), "
                                       "and this model has no attention network flowkit can perturb")
            pred = ctx.denoiser(xs, ts, cond)
        else:  # tag attention-map captures with the step and each row's branch and sample
            with ctx.attention.forward(ctx.step, layout, latent_hw, perturbation=perturbation):
                pred = ctx.denoiser(xs, ts, cond)
        ctx.forward_calls += 1
        for name, rows in layout:
            ctx.ledger.charge(rows)
            self._step_rows[name] = self._step_rows.get(name, 0) + len(rows)
        return pred

    def _evaluate(self, x: Tensor, t: Tensor, jobs: list[tuple[str, Tensor, Conditioning]],
                  perturbations: dict[str, "Perturbation"] | None = None):
        out: dict[str, tuple[Tensor, Prediction]] = {}
        if not jobs:
            return out
        perturbations = perturbations or {}
        plain = [j for j in jobs if j[0] not in perturbations]
        groups = ([plain] if plain else []) if self.ctx.stack.batch_branches else [[j] for j in plain]
        groups += [[j] for j in jobs if j[0] in perturbations]  # a perturbed branch: a forward of its own
        for group in groups:
            xs = torch.cat([x[rows] for _, rows, _ in group])
            ts = torch.cat([t[rows.cpu()] for _, rows, _ in group])
            cond = Conditioning.cat([c for _, _, c in group]) if len(group) > 1 else group[0][2]
            pred = self._forward(xs, ts, cond, [(name, rows) for name, rows, _ in group], tuple(x.shape[2:]),
                                 perturbations.get(group[0][0]))
            offset = 0
            for name, rows, _ in group:
                n = len(rows)
                out[name] = (rows, pred.select(slice(offset, offset + n)))  # views: no copy, no index op
                offset += n
        return out

    def _extra(self, x: Tensor, t: Tensor | float, cond: Conditioning, branch: str, grad: bool,
               rows: Tensor | None = None) -> Prediction:
        """`ctx.evaluate`: one more network call by a module, counted like the loop's own."""
        index = torch.arange(x.shape[0]) if rows is None else torch.as_tensor(rows, dtype=torch.long).cpu()
        if len(cond) != x.shape[0] or len(index) != x.shape[0]:
            raise InputError(f"ctx.evaluate: {x.shape[0]} states, {len(cond)} conditioning rows and {len(index)} "
                             "batch rows must agree")
        mode = torch.enable_grad() if grad else contextlib.nullcontext()
        with mode:
            return self._forward(x, as_time(t, x.shape[0]).to(torch.float64), cond, [(branch, index)],
                                 tuple(x.shape[2:]))

    # -- particles ----------------------------------------------------------------
    def merge(self, pred: Prediction, other: Prediction, rows: Tensor) -> Prediction:
        """`other` on the rows in `rows` [B] (bool), `pred` elsewhere: both evaluations of this
        step (or merges of them), at the same times; their branch predictions are merged alike,
        so `end_step` hands the merged ones to `after_step` (a particle sampler keeping each
        image's best proposal)."""
        keep = rows.to(device=pred.value.device, dtype=torch.bool)
        merged = _where(keep, other, pred)
        a, b = self._branches_of(pred), self._branches_of(other)
        preds, present = {}, {}
        for name in sorted(set(a) | set(b)):
            if name in a and name in b:
                preds[name] = _where(keep, b[name], a[name])
                present[name] = torch.where(keep, b.present(name), a.present(name))
            else:
                src, mask = (b, keep) if name in b else (a, ~keep)
                preds[name], present[name] = src[name], src.present(name) & mask
        self._evaluations.append((merged, BranchPredictions(preds, present)))
        return merged

    def select(self, pred: Prediction, index: Tensor) -> Prediction:
        """Rows `index` of an evaluation of this step, with its branch predictions (particle
        resampling between an evaluation and its `end_step`)."""
        index = index.to(device=pred.value.device, dtype=torch.long)
        branches = self._branches_of(pred)
        picked = BranchPredictions({k: branches[k].select(index) for k in branches},
                                   {k: branches.present(k)[index] for k in branches})
        out = pred.select(index)
        self._evaluations.append((out, picked))
        return out

    def _branches_of(self, pred: Prediction) -> BranchPredictions:
        found = next((bp for p, bp in self._evaluations if p is pred), None)
        if found is None:
            raise InputError("a prediction to merge or select must come from this step's evaluations")
        return found

    # -- step bookkeeping ---------------------------------------------------------
    def end_step(self, x: Tensor, pred: Prediction) -> Tensor:
        """Close the current step: hooks, record, callback, periodic non-finite check.

        `pred` is the step's evaluation the sampler names (Heun: its first); `after_step`
        hooks get it with the branch predictions of that same evaluation."""
        ctx = self.ctx
        branches = next((bp for p, bp in self._evaluations if p is pred), None)
        if branches is None:  # a sampler passed a prediction of its own making: the step's first
            branches = self._evaluations[0][1] if self._evaluations else BranchPredictions({}, {})
        ctx.stack.after_step(ctx, x, pred, branches)
        self._evaluations = []
        if self.callback is not None:
            new = self.callback(ctx, ctx.step, x, pred)
            if new is not None:
                x = new
        self._bad.append(~torch.isfinite(x.detach()).all())
        now = time.perf_counter()
        nfe_now = ctx.ledger.total
        t0 = float(ctx.t[0]) if ctx.t is not None else float("nan")
        self.records.append(StepRecord(ctx.step, ctx.stage, t0, nfe_now - self._nfe_at_step,
                                       now - self._step_start, dict(self._step_rows), tuple(x.shape[1:])))
        self._nfe_at_step, self._step_start, self._step_rows = nfe_now, now, {}
        if len(self._bad) % self.check_every == 0:
            self.check_finite()
        ctx.step += 1
        if self.progress is not None:
            self.progress.update(1)
        return x
    def check_finite(self) -> None:
        if not self._bad:
            return
        bad = torch.stack(self._bad).cpu()
        if bool(bad.any()):
            first = int(bad.nonzero()[0, 0])
            rec = self.records[first] if first < len(self.records) else None
            where = f" (t={rec.t:.4f})" if rec else ""
            raise NonFiniteError(
                f"non-finite values (NaN or inf) appeared at step {first}{where}: "
                "lower the guidance scale, use more steps, or check the model and its inputs"
            )

    def walk(self, ts: Tensor) -> None:
        """A sampler walks its own times `ts` (BOSS's grid, a bottleneck stage's) instead of, or
        after, the grid it was given: they become `ctx.grid` and are recorded in `stats.grid`."""
        self.ctx.grid = ts
        self.walked.append(ts.detach().to(torch.float64).cpu())

    def change_stage(self, old_shape: tuple[int, ...], new_shape: tuple[int, ...]) -> None:
        """A sampler changed resolution: notify guidance modules."""
        self.ctx.stage += 1
        self.ctx.stack.on_stage_change(self.ctx, old_shape, new_shape)


def _cond_device(cond: Conditioning) -> torch.device:
    for v in cond.tensors.values():
        return v.device
    return torch.device("cpu")


def _where(mask: Tensor, a: Prediction, b: Prediction) -> Prediction:
    """Rows of `a` where `mask` [B], of `b` elsewhere (value, state and path point)."""
    from flowkit.paths.base import PathPoint

    if a.kind != b.kind:
        b = b.converted(a.kind)
    m = mask.cpu()
    point = PathPoint(*(torch.where(m, getattr(a.point, f), getattr(b.point, f))
                        for f in ("t", "alpha", "sigma", "timestep")))
    return Prediction(torch.where(_rows(mask, a.value), a.value, b.value), a.kind,
                      torch.where(_rows(mask, a.x), a.x, b.x), point, a.path)


def _rows(mask: Tensor, like: Tensor) -> Tensor:
    return mask.reshape((-1,) + (1,) * (like.ndim - 1))


def _scatter(pred: Prediction, rows: Tensor, batch: int, x: Tensor) -> Prediction:
    """Expand a prediction on `rows` to the full batch (absent rows: zero values)."""
    if len(rows) == batch and bool((rows == torch.arange(batch, device=rows.device)).all()):
        return pred

    value = pred.value.new_zeros((batch,) + tuple(pred.value.shape[1:]))
    value[rows] = pred.value
    xn = pred.x.new_zeros((batch,) + tuple(pred.x.shape[1:]))
    xn[rows] = pred.x
    full_t = pred.point.t.new_full((batch,), 0.5)  # absent rows: a harmless mid-path time
    full_t[rows.cpu()] = pred.point.t
    point = pred.path.at(full_t)
    return Prediction(value, pred.kind, xn, point, pred.path)


def integrate(sampler: "Sampler", ctx: "Context", noise: Tensor, ts: Tensor, *,
              callback: StepCallback | None = None, check_every: int = 4, progress: bool = False,
              grad_steps: int | None = None) -> tuple[Tensor, Stats]:
    """Sample from `noise` (unit Gaussian, flow frame shape) along grid `ts`; returns (x, stats).
    grad_steps: see `GuidedModel`."""
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=ctx.num_steps, desc=f"flowkit {sampler.name}", dynamic_ncols=True, leave=False)
    ctx.stack.check(ctx)
    ctx.denoiser.reset_counters()
    model = GuidedModel(ctx, callback=callback, check_every=check_every, progress=bar, grad_steps=grad_steps)
    start = time.perf_counter()
    try:
        x = sampler.sample(model, sampler.initial_state(noise, ts, ctx), ts)
        model.check_finite()
    finally:
        ctx._evaluator = None
        if bar is not None:
            bar.close()
    stats = Stats(
        nfe=[int(v) for v in ctx.ledger.per_image.tolist()],
        forward_calls=ctx.forward_calls,
        backward_calls=ctx.backward_calls,
        reward_calls=ctx.reward_calls,
        seconds=time.perf_counter() - start,
        forward_seconds=ctx.denoiser.seconds,
        compiled=bool(getattr(ctx.denoiser, "is_compiled", False)),
        compiles=ctx.denoiser.compiles,
        compile_seconds=ctx.denoiser.compile_seconds,
        steps=model.records,
        sampler=sampler.describe(),
        guidance=ctx.stack.describe(),
        grid=[float(v) for v in (torch.cat(model.walked) if model.walked else ts).tolist()],
    )
    return x, stats
