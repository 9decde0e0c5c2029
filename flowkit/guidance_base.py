"""The guidance base: modules with optional hooks, composed into a `GuidanceStack`.

The sampling loop evaluates the denoiser on named *branches* (`cond`, `uncond`, and any a
module adds), each with its own conditioning, batching every branch a step needs into one
forward pass. It calls, for every module whose window covers the step:

1. `branches(ctx, requests)`: declare the branches needed this step, per sample; a module
   may `supply` a branch itself (a *predicted* branch), `supply_later` it from this
   evaluation's other branches (after the forward pass), or `drop` it for some samples;
2. `conditioning(ctx, branch, cond)`: change a branch's conditioning;
3. `combine(ctx, preds)`: map the branch predictions to one prediction (one combiner per
   stack; with none, or outside its window, the conditional prediction is used);
4. `correct(ctx, x, pred, preds)`: add a term after the combine (`preds`: this
   evaluation's branch predictions);
5. `after_step(ctx, x, pred, preds)`: update state once the step is taken (`pred` and
   `preds` are those of the step's evaluation the sampler names, the first by default);
6. `on_stage_change(ctx, old_shape, new_shape)`: the sampler changed resolution.

Hooks run in the order of the modules' roles, whatever order the stack was written in:
modifiers, then the combiner, then policies, then correctors (`ROLES`); modules of one role
run in the order of their names, so any permutation of a stack is the same run. A module's window is `int(start * N) <= step < int(stop * N)`
for a run of N steps, as in diffusers' guiders.

Decisions are per sample (boolean masks over the batch), never per batch. Module state
lives in the run's context (`ctx.state_for(self)`), so one module object can serve many
runs; tensors stored there with the batch as first dimension follow particle resampling.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Callable, ClassVar, Iterator, Sequence

import torch
from torch import Tensor

from flowkit.errors import GuidanceStackError, SpecError, UnsupportedError

ROLES = ("modifier", "combiner", "policy", "corrector")  # the order in which hooks run

if TYPE_CHECKING:
    from flowkit.conditioning import Conditioning
    from flowkit.context import Context
    from flowkit.perturbation import Perturbation
    from flowkit.prediction import Prediction

__all__ = ["Guidance", "GuidanceStack", "BranchRequests", "BranchPredictions"]


class BranchRequests:
    """Which samples need which branch this step; and branches supplied by modules."""

    def __init__(self, batch: int, device: torch.device):
        self.batch = batch
        self.device = device
        self.masks: dict[str, Tensor] = {}
        self.supplied: dict[str, tuple[Tensor, "Prediction"]] = {}
        # branches supplied after the forward pass, from that pass's predictions (LinearAG)
        self.deferred: dict[str, tuple[Tensor, Callable[[dict[str, "Prediction"]], "Prediction"]]] = {}
        # branches evaluated with the network perturbed (PAG, SEG, SLG): each in a forward of its own
        self.perturbations: dict[str, "Perturbation"] = {}

    def _mask(self, mask: Tensor | None) -> Tensor:
        if mask is None:
            return torch.ones(self.batch, dtype=torch.bool, device=self.device)
        return mask.to(device=self.device, dtype=torch.bool)

    def need(self, name: str, mask: Tensor | None = None, *, perturbation: "Perturbation | None" = None) -> None:
        """Evaluate branch `name` for the samples in `mask` (all if None); with `perturbation`,
        on the perturbed network, in a forward of its own (flowkit.perturbation)."""
        if perturbation is not None:
            old = self.perturbations.get(name)
            if old is not None and old != perturbation:
                raise GuidanceStackError(f"branch {name!r} is asked for with two different perturbations")
            self.perturbations[name] = perturbation
        elif name in self.perturbations:
            raise GuidanceStackError(f"branch {name!r} is perturbed; ask for it with its perturbation")
        m = self._mask(mask)
        self.masks[name] = self.masks[name] | m if name in self.masks else m

    def drop(self, name: str, mask: Tensor | None = None) -> None:
        """Skip branch `name` for the samples in `mask` (all if None); a deferred supply of it
        for those samples is withdrawn too."""
        if name in self.masks:
            self.masks[name] = self.masks[name] & ~self._mask(mask)
        if name in self.deferred:
            m, fn = self.deferred[name]
            self.deferred[name] = (m & ~self._mask(mask), fn)

    def supply(self, name: str, mask: Tensor, pred: "Prediction") -> None:
        """Provide branch `name` for the samples in `mask` from `pred` (full batch) instead of the model."""
        m = self._mask(mask)
        self.drop(name, m)
        if name in self.supplied:
            old_m, old_p = self.supplied[name]
            value = torch.where(_rows(m, pred.value), pred.value, old_p.value)
            pred, m = old_p.replace(value), old_m | m
        self.supplied[name] = (m, pred)

    def supply_later(self, name: str, mask: Tensor | None,
                     fn: Callable[[dict[str, "Prediction"]], "Prediction"]) -> None:
        """Provide branch `name` for the samples in `mask` from `fn(preds)` (a full-batch
        Prediction), called after this evaluation's forward pass with the branch predictions
        made so far; e.g. LinearAG's estimate of `uncond` from the current conditional."""
        m = self._mask(mask)
        self.drop(name, m)
        self.deferred[name] = (m, fn)

    def restrict(self, mask: Tensor) -> None:
        """Keep only the rows in `mask` (masked evaluation: other rows are not evaluated,
        supplied or charged this time)."""
        m = self._mask(mask)
        self.masks = {k: v & m for k, v in self.masks.items()}
        self.supplied = {k: (v & m, p) for k, (v, p) in self.supplied.items()}
        self.deferred = {k: (v & m, fn) for k, (v, fn) in self.deferred.items()}

    def wanted(self, name: str) -> Tensor:
        return self.masks.get(name, torch.zeros(self.batch, dtype=torch.bool, device=self.device))

    def names(self) -> list[str]:
        return sorted(set(self.masks) | set(self.supplied), key=lambda n: (n != "cond", n != "uncond", n))


def _rows(mask: Tensor, like: Tensor) -> Tensor:
    return mask.reshape((-1,) + (1,) * (like.ndim - 1))


class BranchPredictions(Mapping):
    """Predictions per branch over the full batch, with the mask of rows that are present."""

    def __init__(self, preds: dict[str, "Prediction"], present: dict[str, Tensor]):
        self._preds = preds
        self._present = present

    def __getitem__(self, name: str) -> "Prediction":
        return self._preds[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._preds)

    def __len__(self) -> int:
        return len(self._preds)

    def present(self, name: str) -> Tensor:
        """Boolean [B]: the rows of `name` that were evaluated or supplied."""
        return self._present[name]

    def where(self, name: str, value: Tensor, fallback: Tensor) -> Tensor:
        """`value` on the rows where branch `name` is present, `fallback` elsewhere."""
        if name not in self._present:
            return fallback
        return torch.where(_rows(self._present[name], value), value, fallback)


class Guidance:
    """Base class of guidance modules.

    Subclasses set `name`, `description` and `role`:
    - "combiner": implements `combine` (CFG, APG); at most one per stack;
    - "policy": changes the branches of a combiner (Adaptive Guidance); needs a combiner;
    - "corrector": adds a term in `correct` (counting guidance, GFCG's push);
    - "modifier": changes conditioning or state only (FRAP).
    Options are keyword-only constructor arguments stored as attributes of the same name.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    role: ClassVar[str] = "modifier"
    # Path kinds the module can work on ("gaussian", "discrete").
    path_kinds: ClassVar[tuple[str, ...]] = ("gaussian",)
    # Whether the module may skip branch evaluations per sample (its NFE is data-dependent).
    saves_nfe: ClassVar[bool] = False
    # Whether the module may ask for the 'uncond' branch, so the prompts' negatives are encoded
    # (a combiner does unless it says otherwise; a module of another role that does says so).
    needs_uncond: ClassVar[bool] = False
    # Whether the branches of one evaluation may share one forward pass (a combiner that needs
    # one pass per branch, e.g. for parity with a pipeline that runs them apart, sets it False).
    batched: bool = True

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if cls.role == "combiner" and "needs_uncond" not in cls.__dict__:
            cls.needs_uncond = True

    def __init__(self, *, start: float = 0.0, stop: float = 1.0):
        if not (0.0 <= start <= 1.0 and 0.0 <= stop <= 1.0):
            raise ValueError(f"start and stop are fractions of the run in [0, 1], got {start}, {stop}")
        if start > stop:
            raise ValueError(f"start ({start}) must not be above stop ({stop}) (start = stop: an empty window)")
        self.start = float(start)
        self.stop = float(stop)

    @property
    def extra_branches(self) -> int:
        """Branches this module adds to every evaluation inside its window (for NFE checks)."""
        return 0

    # -- window and state ---------------------------------------------------------
    def window(self, num_steps: int) -> tuple[int, int]:
        """The steps [first, end) this module acts on in a run of `num_steps` steps, as
        diffusers' guiders count them: int(start * N) <= step < int(stop * N)."""
        n = max(int(num_steps), 1)
        return int(self.start * n), int(self.stop * n)

    def active(self, ctx: "Context") -> bool:
        """Whether the current step lies in this module's window."""
        first, end = self.window(ctx.num_steps)
        return first <= ctx.step < end

    def state(self, ctx: "Context") -> dict:
        return ctx.state_for(self)

    def refuse(self, ctx: "Context") -> str | None:
        """A reason this module cannot run in this context, or None."""
        kind = ctx.denoiser.path.kind
        if kind not in self.path_kinds:
            return f"{self.name} works on {'/'.join(self.path_kinds)} paths, not on {kind} ones"
        return None

    # -- hooks (all optional) -----------------------------------------------------
    def branches(self, ctx: "Context", requests: BranchRequests) -> None:
        return None

    def conditioning(self, ctx: "Context", branch: str, cond: "Conditioning | None") -> "Conditioning | None":
        return cond

    def combine(self, ctx: "Context", preds: BranchPredictions) -> "Prediction":
        raise NotImplementedError(f"{self.name} is not a combiner")

    def correct(self, ctx: "Context", x: Tensor, pred: "Prediction", preds: BranchPredictions) -> "Prediction":
        return pred

    def after_step(self, ctx: "Context", x: Tensor, pred: "Prediction", preds: BranchPredictions) -> None:
        return None

    def on_stage_change(self, ctx: "Context", old_shape: tuple[int, ...], new_shape: tuple[int, ...]) -> None:
        """Default: forget per-run state (momentum, statistics) at a resolution change."""
        ctx.state_for(self).clear()

    # -- description --------------------------------------------------------------
    def params(self) -> dict:
        from flowkit.registry import params_of

        return {k: getattr(self, k) for k in params_of(type(self)) if hasattr(self, k)}

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({inner})"


class GuidanceStack:
    """A list of guidance modules, validated as a whole; hooks run in role order (`ROLES`)."""

    def __init__(self, modules: Sequence[Guidance] = ()):
        self.modules = list(modules)
        for m in self.modules:
            if not isinstance(m, Guidance):
                raise SpecError(f"{m!r} is not a guidance module; build one from flowkit.guidance")
            if m.role not in ROLES:
                raise GuidanceStackError(f"{m.name} has role {m.role!r}; a module's role is one of {', '.join(ROLES)}")
        # role order, then by name within a role (two modules of one name keep their written order)
        self.ordered = sorted(self.modules, key=lambda m: (ROLES.index(m.role), m.name))
        combiners = [m for m in self.modules if m.role == "combiner"]
        if len(combiners) > 1:
            names = ", ".join(m.name for m in combiners)
            raise GuidanceStackError(f"the stack has {len(combiners)} combiners ({names}); keep exactly one")
        self.combiner = combiners[0] if combiners else None
        policies = [m for m in self.modules if m.role == "policy"]
        if policies and self.combiner is None:
            raise GuidanceStackError(
                f"{policies[0].name} is a policy with no scale of its own; add a combiner, "
                f"e.g. 'cfg:scale=7+{policies[0].name}'"
            )

    def __iter__(self) -> Iterator[Guidance]:
        return iter(self.modules)

    def __len__(self) -> int:
        return len(self.modules)

    def describe(self) -> str:
        """The stack as a spec, in the order its hooks run."""
        from flowkit.spec import format as format_spec
        from flowkit.spec import to_spec

        return format_spec([to_spec(m) for m in self.ordered]) if self.modules else "none"

    def check(self, ctx: "Context") -> None:
        for m in self.ordered:
            reason = m.refuse(ctx)
            if reason:
                raise UnsupportedError(reason)

    def _active(self, ctx: "Context") -> list[Guidance]:
        return [m for m in self.ordered if m.active(ctx)]

    @property
    def batch_branches(self) -> bool:
        return self.combiner is None or bool(self.combiner.batched)

    def requests(self, ctx: "Context") -> BranchRequests:
        req = BranchRequests(ctx.batch_size, ctx.device)
        req.need("cond")
        for m in self._active(ctx):
            m.branches(ctx, req)
        return req

    def conditioning(self, ctx: "Context", branch: str, cond: "Conditioning | None") -> "Conditioning | None":
        for m in self._active(ctx):
            cond = m.conditioning(ctx, branch, cond)
        return cond

    def combine(self, ctx: "Context", preds: BranchPredictions) -> "Prediction":
        if self.combiner is not None and self.combiner.active(ctx):
            return self.combiner.combine(ctx, preds)
        return preds["cond"]

    def correct(self, ctx: "Context", x: Tensor, pred: "Prediction", preds: BranchPredictions) -> "Prediction":
        for m in self._active(ctx):
            pred = m.correct(ctx, x, pred, preds)
        return pred

    def after_step(self, ctx: "Context", x: Tensor, pred: "Prediction", preds: BranchPredictions) -> None:
        for m in self._active(ctx):
            m.after_step(ctx, x, pred, preds)

    def on_stage_change(self, ctx: "Context", old_shape: tuple[int, ...], new_shape: tuple[int, ...]) -> None:
        for m in self.ordered:
            m.on_stage_change(ctx, old_shape, new_shape)
