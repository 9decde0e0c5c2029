"""LinearAG (Castillo et al., "Adaptive Guidance: Training-free Acceleration of Conditional
Diffusion Models", arXiv 2312.12487, the LinearAG section): replace the unconditional
network evaluation of some steps by an affine combination of past score estimates, with
coefficients fitted by least squares on calibration trajectories of CFG.

A policy on top of a combiner (`cfg:scale=7+linear-ag:coefficients="fit.json"`). At a
predicted step t the `uncond` branch is not evaluated but supplied (after the forward pass
of `cond`, through `BranchRequests.supply_later`) as

    u_hat_t = a_t c_t + sum_{k=1..K} (b_{t,k} c_{t-k} + g_{t,k} u_{t-k})      (K = history)

where c_j and u_j are the raw model outputs (noise for SD, velocity for flows) of the
conditional and unconditional branches at step j (u_j itself predicted where step j was).
The paper states the estimate for the noise prediction of epsilon models; we use each
model's own output space, which is the same thing for them. Coefficients are per step and
shared by all samples and all pixels; `fit_coefficients` solves the per-step normal
equations in float64 over every sample and pixel of the calibration set (an optional ridge
term for rank-deficient designs), and `flowkit.fit_linear_ag` records the trajectories of a model
on a prompt set under CFG and caches the result as JSON (`LinearAGCoefficients.save`).

Choices (the paper's text was read only through its abstract here: "entire neural function
evaluations can be replaced by simple affine transformations of past score estimates",
found in the first half of the denoising process; each choice below is ours):
- which steps are predicted: inside the module's window (default the first half, start=0,
  stop=0.5), step i is predicted when i % every == every - 1 and the K previous steps are
  in the history (default every=2: every other unconditional evaluation is replaced);
- the current conditional output c_t is a regressor: it is computed at that step anyway,
  and it carries the state x_t, which the past estimates do not;
- without fitted coefficients the module uses the training-free `carry` rule
  u_hat_t = c_t + (u_{t-1} - c_{t-1}) (the last guidance direction carried over), K = 1;
- with a sampler that evaluates the model more than once per step (Heun), only the first
  evaluation of a step is predicted and recorded, so the recurrence runs over steps.
Predicted rows cost no NFE. Decisions are per sample: a sample whose `uncond` is not
wanted (Adaptive Guidance fired, or a combiner at scale 1) is never supplied one; place
`adaptive` before `linear-ag` in the stack so that it sees the evaluated branch first.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from flowkit.errors import InputError
from flowkit.guidance_base import BranchPredictions, BranchRequests, Guidance
from flowkit.prediction import Prediction
from flowkit.registry import GUIDANCE

__all__ = ["LinearAG", "LinearAGCoefficients", "NormalEquations", "TrajectoryRecorder", "fit_coefficients",
           "regressors"]

FORMAT = 1


def regressors(c_now: Tensor, history: Sequence[tuple[Tensor, Tensor]]) -> list[Tensor]:
    """[c_t, c_{t-1}, u_{t-1}, ..., c_{t-K}, u_{t-K}] from the current conditional output and
    the history, most recent step first: the order of a coefficient vector."""
    out = [c_now]
    for c, u in history:
        out += [c, u]
    return out


@dataclass
class LinearAGCoefficients:
    """Per-step coefficients of u_hat_t = w_t . regressors(c_t, history) (see the module doc).

    history: K; steps: the step count they were fitted for (None: any, a constant rule);
    weights: per step a list of 1 + 2K floats, or None where the step is not predictable
    (t < K); a constant rule holds one list used at every step t >= K. ts: the time grid of
    the calibration runs (checked against a run's grid when both are known); residual: per
    step the relative residual ||u - u_hat|| / ||u|| on the calibration set; meta: how
    they were made (model, prompts, scale, sampler, seed, ...).
    """

    history: int
    weights: list[list[float] | None]
    steps: int | None = None
    ts: list[float] | None = None
    residual: list[float | None] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.history, int) or isinstance(self.history, bool) or self.history < 1:
            raise InputError(f"LinearAG history must be an integer >= 1, got {self.history!r:.40}")
        if self.steps is not None and (not isinstance(self.steps, int) or isinstance(self.steps, bool)
                                       or self.steps < 1):
            raise InputError(f"LinearAG steps must be an integer >= 1 or None, got {self.steps!r:.40}")
        if not isinstance(self.weights, list):
            raise InputError(f"LinearAG weights must be a list (one entry per step), got {type(self.weights).__name__}")
        if self.ts is not None and not (isinstance(self.ts, list) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in self.ts)):
            raise InputError("LinearAG ts must be a list of times or None")
        if not isinstance(self.residual, list) or not isinstance(self.meta, dict):
            raise InputError("LinearAG residual must be a list and meta a dict")
        n = 1 + 2 * self.history
        if self.steps is not None and len(self.weights) != self.steps:
            raise InputError(f"LinearAG coefficients for {self.steps} steps hold {len(self.weights)} step entries")
        if self.steps is None and len(self.weights) != 1:
            raise InputError("constant LinearAG coefficients hold exactly one weight vector")
        for i, w in enumerate(self.weights):
            if w is None:
                continue
            if not isinstance(w, list) or len(w) != n or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in w):
                raise InputError(f"LinearAG coefficients of step {i}: expected {n} finite numbers "
                                 f"(history {self.history}), got {w!r:.80}")

    @classmethod
    def carry(cls) -> "LinearAGCoefficients":
        """The training-free rule u_hat_t = c_t - c_{t-1} + u_{t-1} (K = 1), at every step."""
        return cls(history=1, weights=[[1.0, -1.0, 1.0]], meta={"rule": "carry"})

    def at(self, step: int) -> list[float] | None:
        """The coefficient vector of `step`, or None where it cannot be predicted."""
        if step < self.history:
            return None
        if self.steps is None:
            return self.weights[0]
        return self.weights[step] if step < len(self.weights) else None

    # -- storage --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "kind": "linear-ag", "history": self.history, "steps": self.steps,
                "ts": self.ts, "weights": self.weights, "residual": self.residual, "meta": self.meta}

    def save(self, path: str | os.PathLike[str]) -> Path:
        from flowkit.storage import write_json_atomic

        path = Path(path)
        write_json_atomic(path, self.to_dict(), indent=1)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "LinearAGCoefficients":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise InputError(f"no LinearAG coefficients at {path}: fit them with flowkit.fit_linear_ag") \
                from None
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read LinearAG coefficients {path}: {e}") from None
        if not isinstance(d, dict) or d.get("kind") != "linear-ag" or d.get("format") != FORMAT:
            raise InputError(f"{path} is not a LinearAG coefficient file (format {FORMAT})")
        if "history" not in d or "weights" not in d:
            raise InputError(f"{path} lacks 'history' or 'weights': fit the coefficients again")
        try:
            return cls(history=d["history"], weights=d["weights"], steps=d.get("steps"), ts=d.get("ts"),
                       residual=d.get("residual") or [], meta=d.get("meta") or {})
        except InputError as e:
            raise InputError(f"{path}: {e}") from None


class NormalEquations:
    """Per-step least-squares accumulators: G_t = F^T F and r_t = F^T u over all samples and
    pixels (float64), so calibration batches stream through without being kept."""

    def __init__(self, history: int):
        if not isinstance(history, int) or history < 1:
            raise InputError(f"history must be an integer >= 1, got {history!r}")
        self.history = history
        self.gram: dict[int, Tensor] = {}
        self.rhs: dict[int, Tensor] = {}
        self.yy: dict[int, float] = {}
        self.steps = 0

    def add(self, cond: Tensor, uncond: Tensor) -> None:
        """Trajectories cond, uncond [N, S, ...] (raw outputs at each step) of N samples."""
        if cond.shape != uncond.shape or cond.ndim < 3:
            raise InputError(f"cond and uncond trajectories must both be [N, S, ...], got {tuple(cond.shape)} "
                             f"and {tuple(uncond.shape)}")
        K, S = self.history, cond.shape[1]
        if self.steps and S != self.steps:
            raise InputError(f"trajectories of {S} steps cannot join a fit of {self.steps} steps")
        self.steps = S
        c, u = cond.double().flatten(2), uncond.double().flatten(2)  # [N, S, D]
        for t in range(K, S):
            hist = [(c[:, t - k], u[:, t - k]) for k in range(1, K + 1)]
            F = torch.stack(regressors(c[:, t], hist), dim=-1).reshape(-1, 1 + 2 * K)  # [N*D, 1+2K]
            y = u[:, t].reshape(-1)
            self.gram[t] = self.gram.get(t, 0) + F.T @ F
            self.rhs[t] = self.rhs.get(t, 0) + F.T @ y
            self.yy[t] = self.yy.get(t, 0.0) + float(y @ y)

    def solve(self, ridge: float = 0.0) -> LinearAGCoefficients:
        """The least-squares coefficients per step; `ridge` adds ridge * mean(diag G) to the
        diagonal (0: plain least squares, minimum-norm where the design is rank-deficient)."""
        if not self.steps:
            raise InputError("no calibration trajectories were added; record some first")
        if not ridge >= 0:
            raise InputError(f"ridge must be >= 0, got {ridge}")
        weights: list[list[float] | None] = [None] * self.steps
        residual: list[float | None] = [None] * self.steps
        for t, G in self.gram.items():
            r = self.rhs[t]
            A = G + ridge * G.diagonal().mean() * torch.eye(len(G), dtype=G.dtype)
            w = torch.linalg.pinv(A, hermitian=True, rtol=1e-12) @ r
            sse = max(self.yy[t] - 2 * float(w @ r) + float(w @ G @ w), 0.0)
            weights[t] = [float(v) for v in w]
            residual[t] = math.sqrt(sse / self.yy[t]) if self.yy[t] > 0 else 0.0
        return LinearAGCoefficients(history=self.history, weights=weights, steps=self.steps, residual=residual)


def fit_coefficients(cond: Tensor, uncond: Tensor, history: int = 2, ridge: float = 0.0) -> LinearAGCoefficients:
    """Least-squares LinearAG coefficients from trajectories cond, uncond [N, S, ...]."""
    acc = NormalEquations(history)
    acc.add(cond, uncond)
    return acc.solve(ridge)


class TrajectoryRecorder(Guidance):
    """Records, per step, the raw `cond` and `uncond` outputs of the first evaluation (a
    helper for calibration: put it in a stack with CFG; it changes nothing)."""

    name = "linear-ag-recorder"
    description = "records cond/uncond outputs per step for LinearAG calibration"

    def __init__(self) -> None:
        super().__init__()
        self.cond: list[Tensor] = []
        self.uncond: list[Tensor] = []

    def correct(self, ctx, x, pred: Prediction, preds: BranchPredictions) -> Prediction:
        state = self.state(ctx)
        if state.get("step") == ctx.step:
            return pred
        state["step"] = ctx.step
        if "uncond" not in preds or not bool(preds.present("uncond").all()):
            raise InputError("LinearAG calibration needs the unconditional branch at every step: "
                             "record under plain CFG with scale != 1")
        self.cond.append(preds["cond"].value.detach().cpu())
        self.uncond.append(preds["uncond"].value.detach().cpu())
        return pred

    def trajectories(self) -> tuple[Tensor, Tensor]:
        """(cond, uncond), each [N, S, ...]."""
        return torch.stack(self.cond, dim=1), torch.stack(self.uncond, dim=1)


@GUIDANCE.register
class LinearAG(Guidance):
    name = "linear-ag"
    description = "LinearAG: supply the unconditional branch of some steps from a fitted affine map of past outputs"
    role = "policy"
    saves_nfe = True

    def __init__(self, *, coefficients: Any = None, every: int = 2, start: float = 0.0, stop: float = 0.5):
        """coefficients: a `LinearAGCoefficients`, the path of a saved one, or None (the
        `carry` rule); every: predict one step in `every` inside the window."""
        super().__init__(start=start, stop=stop)
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every must be an integer >= 1, got {every!r}")
        if coefficients is None:
            self._coef = LinearAGCoefficients.carry()
            self.coefficients = None
        elif isinstance(coefficients, LinearAGCoefficients):
            self._coef = coefficients
            self.coefficients = "fitted"  # a Python object: shown, not rebuilt, in a spec
        elif isinstance(coefficients, (str, os.PathLike)):
            if str(coefficients) == "fitted":
                raise ValueError("coefficients='fitted' stands for a Python object; pass the LinearAGCoefficients "
                                 "or the path of a saved file")
            self._coef = LinearAGCoefficients.load(coefficients)
            self.coefficients = str(coefficients)
        else:
            raise ValueError(f"coefficients must be a LinearAGCoefficients, a file path or None, "
                             f"got {type(coefficients).__name__}")
        self.every = every

    def refuse(self, ctx) -> str | None:
        reason = super().refuse(ctx)
        if reason:
            return reason
        coef = self._coef
        if coef.steps is not None and coef.steps != ctx.num_steps:
            return (f"linear-ag coefficients were fitted for {coef.steps} steps and this run has {ctx.num_steps}: "
                    f"fit them again at {ctx.num_steps} steps")
        if coef.ts is not None and ctx.grid is not None and len(coef.ts) == len(ctx.grid):
            grid = [float(v) for v in ctx.grid]
            if max(abs(a - b) for a, b in zip(coef.ts, grid)) > 1e-6:
                return "linear-ag coefficients were fitted on another time grid: fit them on this run's grid"
        return None

    def _history(self, ctx) -> list[tuple[Tensor, Tensor]] | None:
        """The K previous steps' (c, u) [B, ...], most recent first, or None if incomplete."""
        state = self.state(ctx)
        K = self._coef.history
        if state.get("hist_steps", [])[:K] != [ctx.step - k for k in range(1, K + 1)]:
            return None
        return [(state["hist_c"][:, k], state["hist_u"][:, k]) for k in range(K)]

    def branches(self, ctx, requests: BranchRequests) -> None:
        state = self.state(ctx)
        if state.get("asked") == ctx.step or ctx.step % self.every != self.every - 1:
            return
        state["asked"] = ctx.step  # only the first evaluation of a step is predicted
        w = self._coef.at(ctx.step)
        hist = self._history(ctx)
        mask = requests.wanted("uncond")
        if w is None or hist is None or not bool(mask.any()):
            return
        weights = torch.tensor(w, dtype=torch.float64)

        def estimate(preds: dict[str, Prediction]) -> Prediction:
            cond = preds["cond"]
            feats = regressors(cond.value, [(c.to(cond.value.device), u.to(cond.value.device)) for c, u in hist])
            value = sum(float(wj) * f.double() for wj, f in zip(weights, feats))
            supplied = requests.deferred["uncond"][0].long().cpu()  # after other modules' drops
            state["predicted"] = state.get("predicted", torch.zeros_like(supplied)) + supplied
            return cond.replace(value.to(cond.value.dtype))

        requests.supply_later("uncond", mask, estimate)

    def correct(self, ctx, x, pred: Prediction, preds: BranchPredictions) -> Prediction:
        """Record the first evaluation's (cond, uncond) outputs of each step as history."""
        state = self.state(ctx)
        if state.get("recorded") == ctx.step:
            return pred
        state["recorded"] = ctx.step
        if "uncond" not in preds:
            state["hist_steps"] = []  # a gap: the recurrence restarts
            return pred
        c = preds["cond"].value.detach()
        u = preds.where("uncond", preds["uncond"].value.detach(), c)
        keep = self._coef.history - 1
        steps = state.get("hist_steps", [])
        # [B, K, ...] tensors, most recent first (batch-first, so particle resampling moves them)
        if steps and state["hist_c"].shape[2:] == c.shape[1:]:
            state["hist_c"] = torch.cat([c[:, None], state["hist_c"][:, :keep]], dim=1)
            state["hist_u"] = torch.cat([u[:, None], state["hist_u"][:, :keep]], dim=1)
            state["hist_steps"] = [ctx.step] + steps[:keep]
        else:
            state["hist_c"], state["hist_u"], state["hist_steps"] = c[:, None], u[:, None], [ctx.step]
        return pred
