"""The sampler base class: a registered update rule that walks a time grid.

One small signature, as in k-diffusion: `sample(model, x, ts) -> x`, where `model(x, t)`
is the guided prediction at flow-frame state x and flowkit time t, `ts` the grid
(steps + 1 descending flowkit times, terminal 0 included), and every step ends with
`x = model.end_step(x, pred)`. Randomness comes from `model.ctx.randn_like(x)` (one
generator per sample). Options are keyword-only constructor arguments.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Callable, ClassVar, Literal

from torch import Tensor

from flowkit.timegrid import TimeGrid

if TYPE_CHECKING:
    from flowkit.context import Context
    from flowkit.prediction import Prediction
    from flowkit.sampling_loop import GuidedModel

__all__ = ["Sampler", "SimplexSampler", "euler_step", "euler_walk"]


def euler_step(x: Tensor, t: float, t_next: float, pred: "Prediction") -> Tensor:
    """One Euler step of the flow ODE dx/dt = v (flow frame) from t to t_next, with the
    prediction's velocity v = noise - x0 held over the step: x + (t_next - t) v. In the flow
    frame this is exactly a deterministic DDIM step and diffusers' Euler schedulers' step."""
    return x + (t_next - t) * pred.velocity.to(x.dtype)


def euler_walk(model: "GuidedModel", x: Tensor, ts: Tensor, *,
               on_step: Callable[[Tensor, "Prediction"], None] | None = None) -> tuple[Tensor, "Prediction | None"]:
    """Euler steps along the grid `ts`, each closed by `model.end_step`; `on_step(x, pred)`
    sees the state after each step. Returns (final state, last prediction)."""
    pred = None
    for i in range(len(ts) - 1):
        t, t_next = float(ts[i]), float(ts[i + 1])
        pred = model(x, t)
        x = model.end_step(euler_step(x, t, t_next, pred), pred)
        if on_step is not None:
            on_step(x, pred)
    return x, pred


class Sampler(ABC):
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    path_kinds: ClassVar[tuple[str, ...]] = ("gaussian",)
    # True for samplers that step with the pipeline's own scheduler (they run on its grid)
    uses_scheduler: ClassVar[bool] = False

    def __init__(self, *, grid: str | None = None):
        self.grid = grid
        self._grid = TimeGrid.parse(grid) if grid else None

    def time_grid(self, default: TimeGrid) -> TimeGrid:
        """The grid this sampler walks: its own `grid` option, else the surface's default."""
        return self._grid or default

    def evaluations(self, steps: int) -> int:
        """Model evaluations per sample and branch for `steps` steps (for stats checks)."""
        return steps

    def refuse(self, ctx: "Context") -> str | None:
        kind = ctx.denoiser.path.kind
        if kind not in self.path_kinds:
            return f"sampler {self.name} works on {'/'.join(self.path_kinds)} paths, not on {kind} ones"
        return None

    def initial_state(self, noise: Tensor, ts: Tensor, ctx: "Context") -> Tensor:
        """The flow-frame state at ts[0] for unit Gaussian `noise` (signal ignored): `noise * ts[0]`,
        or `noise * ctx.noise_scale` where the run starts as a diffusers scheduler does."""
        scale = ctx.noise_scale if ctx.noise_scale is not None else float(ts[0])
        return noise * scale

    @abstractmethod
    def sample(self, model: "GuidedModel", x: Tensor, ts: Tensor) -> Tensor:
        """Integrate from ts[0] to ts[-1]; return the final state."""

    def params(self) -> dict:
        from flowkit.registry import params_of

        return {k: getattr(self, k) for k in params_of(type(self)) if hasattr(self, k)}

    def describe(self) -> str:
        from flowkit.spec import format as format_spec
        from flowkit.spec import to_spec

        return format_spec([to_spec(self)])

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({inner})"


class SimplexSampler(Sampler):
    """Base of the samplers of discrete paths (state [B, L, V] on the simplex, probabilities
    [B, L, K] predicted): the run starts from the path's source drawn from the loop's unit
    noise, and the last step draws the tokens from the final prediction (`final="sample"`,
    exact for an exact denoiser) or takes its most likely letter (`final="argmax"`),
    returning them one-hot."""

    path_kinds = ("discrete",)
    path_name: ClassVar[str] = ""  # the `Path.name` this sampler steps

    def __init__(self, *, final: Literal["sample", "argmax"] = "sample", grid: str | None = None):
        super().__init__(grid=grid)
        if final not in ("sample", "argmax"):
            raise ValueError(f"final must be 'sample' or 'argmax', got {final!r}")
        self.final = final

    def refuse(self, ctx: "Context") -> str | None:
        reason = super().refuse(ctx)
        path = ctx.denoiser.path
        if reason is None and path.name != self.path_name:
            reason = f"sampler {self.name} steps the {self.path_name} path, and this model is on the {path.name} path"
        return reason

    def initial_state(self, noise: Tensor, ts: Tensor, ctx: "Context") -> Tensor:
        return ctx.denoiser.path.source(noise).to(noise.dtype)

    def sample(self, model: "GuidedModel", x: Tensor, ts: Tensor) -> Tensor:
        """One evaluation per step; `update` moves the state, the last step draws the tokens."""
        n = len(ts) - 1
        for i in range(n):
            t, t_next = float(ts[i]), float(ts[i + 1])
            pred = model(x, t)
            x = self.finish(model, pred.probs, x) if i == n - 1 else self.update(model, x, pred.probs, t, t_next)
            x = model.end_step(x, pred)
        return x

    def update(self, model: "GuidedModel", x: Tensor, probs: Tensor, t: float, t_next: float) -> Tensor:
        """The state at `t_next` from the state `x` at `t` and the predicted probabilities there."""
        raise NotImplementedError

    def finish(self, model: "GuidedModel", probs: Tensor, x: Tensor) -> Tensor:
        """One-hot tokens [B, L, V] from the final probabilities [B, L, K]."""
        from flowkit.paths.categorical import categorical_from_normal, one_hot

        if self.final == "argmax":
            tokens = probs.argmax(dim=-1)
        else:
            tokens = categorical_from_normal(probs, model.ctx.randn_like(x)[..., 0])
        return one_hot(tokens, x.shape[-1], x.dtype)
