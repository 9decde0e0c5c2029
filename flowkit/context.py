"""Per-run state handed to every guidance hook and sampler: `Context`, its NFE ledger and the
snapshot of module state per row."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import Tensor

from flowkit.seeding import randn_per_sample

if TYPE_CHECKING:
    from flowkit.conditioning import Conditioning
    from flowkit.denoiser import Denoiser
    from flowkit.guidance_base import GuidanceStack
    from flowkit.kit import ModelKit
    from flowkit.prediction import Prediction
    from flowkit.timegrid import TimeGrid

__all__ = ["Context", "NFELedger", "RowState"]


class NFELedger:
    """Network evaluations charged per row of the batch and per image.

    A row is a sample being integrated; `image_of[row]` is the image it belongs to (rows and
    images are the same unless a sampler runs several particles per image). Each evaluation
    of a row is charged to that row and to its image, so when particles are resampled
    (`reindex`) the per-image totals keep what every particle ever cost.
    """

    def __init__(self, rows: int, images: int | None = None, image_of: Tensor | None = None):
        self.image_of = torch.arange(rows) if image_of is None else image_of.to(torch.long).cpu()
        n_images = rows if images is None else images
        if len(self.image_of) != rows or (rows and int(self.image_of.max()) >= n_images):
            raise ValueError(f"image_of must map {rows} rows to images 0..{n_images - 1}")
        self.per_row = torch.zeros(rows, dtype=torch.long)
        self.per_image = torch.zeros(n_images, dtype=torch.long)

    def charge(self, rows: Tensor, n: int = 1) -> None:
        """Charge `n` evaluations to each of `rows` (indices) and to their images."""
        rows = rows.to(torch.long).cpu()
        ones = torch.full((len(rows),), n, dtype=torch.long)
        self.per_row.index_add_(0, rows, ones)
        self.per_image.index_add_(0, self.image_of[rows], ones)

    def reindex(self, index: Tensor) -> None:
        """Rows become rows `index` of the old batch (their images follow; images keep their totals)."""
        index = index.to(torch.long).cpu()
        self.per_row = self.per_row[index]
        self.image_of = self.image_of[index]

    @property
    def total(self) -> int:
        return int(self.per_image.sum())


@dataclass
class RowState:
    """Module state of some rows, taken by `Context.snapshot` (tensors cloned)."""

    rows: Tensor
    states: dict[int, dict[str, Any]]


@dataclass
class Context:
    """What a run knows: the model, the guidance stack, branch conditionings, time, counters.

    step: global step index (across bottleneck stages); num_steps: total steps; t: the
    current flowkit time per row [B] (1 = noise); x: the state of the current evaluation;
    grid: the current stage's times; ledger: network evaluations per row and per image
    (`nfe` is its per-row view); scheduler: the pipeline's scheduler with its timesteps set
    (what sampler='pipeline' steps with); noise_scale: the initial state's scale
    (diffusers' `init_noise_sigma` seen in the flow frame); model_grid: the model's own
    default grid (its scheduler's, or its static shift), for samplers that walk their own
    times but keep the model's time shift (bottleneck), None where unknown; step_generator:
    what sampler='pipeline' hands a stochastic scheduler's step; prompts: each row's prompt
    text (None where only embeddings were given); kit: what the model's world hands methods
    (flowkit.kit.ModelKit: classifier, ...), or None; active: the rows evaluated this step
    (None: all).
    """

    denoiser: "Denoiser"
    stack: "GuidanceStack"
    conds: dict[str, "Conditioning"]
    generators: list[torch.Generator]
    num_steps: int
    device: torch.device = torch.device("cpu")
    encode: Callable[[Sequence[str]], "Conditioning"] | None = None
    step: int = 0
    stage: int = 0
    t: Tensor | None = None
    x: Tensor | None = None
    grid: Tensor | None = None
    ledger: NFELedger = field(default=None)  # type: ignore[assignment]
    forward_calls: int = 0
    backward_calls: int = 0  # backward passes modules ran (FRAP's, counting guidance's): not NFE
    reward_calls: int = 0  # calls of rewards, classifiers and counters by modules: not NFE
    attention: Any = None  # the run's AttentionStore: request and read attention maps (flowkit.attention.store)
    scheduler: Any = None  # the wrapped pipeline's scheduler (a private copy, timesteps set), if any
    noise_scale: float | None = None  # x_flow at the start = noise_scale * unit noise (None: grid[0])
    model_grid: "TimeGrid | None" = None  # the adapter's default grid (the model's own shift rule)
    step_generator: Any = None
    prompts: list[str] | None = None
    kit: "ModelKit | None" = None
    active: Tensor | None = None
    log: list[str] = field(default_factory=list)
    _state: dict[int, dict] = field(default_factory=dict, repr=False)
    _evaluator: Callable[..., "Prediction"] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.ledger is None:
            self.ledger = NFELedger(len(self.generators))

    @property
    def nfe(self) -> Tensor:
        """Network evaluations per row so far [B] (long)."""
        return self.ledger.per_row

    @property
    def batch_size(self) -> int:
        return len(self.generators)

    @property
    def sigma(self) -> Tensor | None:
        """The flow-frame noise level (equal to t)."""
        return self.t

    @property
    def timestep(self) -> Tensor | None:
        """The model's native timestep at the current time."""
        return None if self.t is None else self.denoiser.point(self.t.cpu()).timestep

    # -- evaluations by modules -------------------------------------------------------------
    def evaluate(self, x: Tensor, t: Tensor | float, cond: "Conditioning", branch: str = "extra", *,
                 grad: bool = False, rows: Tensor | Sequence[int] | None = None) -> "Prediction":
        """One extra network evaluation by a module, inside the run: in the attention scope
        (maps captured where requested, tagged with `branch`), charged to the rows' NFE and
        to this step's record, under `torch.enable_grad()` when `grad` (the loop itself runs
        without gradients). x [N, ...] and cond [N] are the batch rows `rows` (default: all
        B rows, in order)."""
        if self._evaluator is None:
            raise RuntimeError("ctx.evaluate works during a run (inside a hook), not before or after it")
        return self._evaluator(x, t, cond, branch, grad, rows)

    # -- module state ------------------------------------------------------------------------
    def state_for(self, module: object) -> dict:
        """This run's private state dict of `module`."""
        return self._state.setdefault(id(module), {})

    def snapshot(self, rows: Tensor | Sequence[int]) -> RowState:
        """The module state of `rows` (e.g. a particle's APG momentum, LinearAG history and
        Adaptive Guidance decisions), copied, to `restore` later into the same or other rows.
        Batch-first tensors (also inside lists, tuples and dicts) are taken row by row; the
        other values (a module's per-run bookkeeping, such as the step it last recorded) are
        copied whole and go back whole on restore, so restore at the step of the snapshot."""
        index = torch.as_tensor(rows, dtype=torch.long).cpu()
        B = self.batch_size
        states = {key: _take(state, index, B) for key, state in self._state.items()}
        return RowState(index, states)

    def restore(self, saved: RowState, rows: Tensor | Sequence[int] | None = None) -> None:
        """Write `saved` module state into `rows` (default: the rows it was taken from); a
        row of `saved` goes to the row at the same position in `rows`; per-run values go back
        to what they were at the snapshot."""
        index = saved.rows if rows is None else torch.as_tensor(rows, dtype=torch.long).cpu()
        if len(index) != len(saved.rows):
            raise ValueError(f"{len(saved.rows)} saved rows cannot go to {len(index)} rows")
        B = self.batch_size
        for key, taken in saved.states.items():
            state = self._state.setdefault(key, {})
            for name, value in taken.items():
                state[name] = _put(state.get(name), value, index, B, name)

    # -- randomness and particles --------------------------------------------------------------
    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
        """Fresh noise [B, *shape], each row from its own sample's generator."""
        return randn_per_sample(shape, self.generators, self.device, dtype)

    def randn_like(self, x: Tensor) -> Tensor:
        return self.randn(x.shape[1:], x.dtype)

    def reindex(self, index: Tensor) -> None:
        """Reorder/resample the batch (particle samplers): state, counters, conditionings.

        Generators are re-seeded from the originals' next draws, so two copies of a
        particle continue with different noise; the NFE ledger keeps each image's total.
        """
        index = index.to(torch.long).cpu()
        self.ledger.reindex(index)
        self.conds = {k: v.select(index.to(v.tensors[next(iter(v.tensors))].device) if len(v) else index)
                      for k, v in self.conds.items()}
        if self.prompts is not None:
            self.prompts = [self.prompts[i] for i in index.tolist()]
        gens = []
        for i in index.tolist():
            seed = int(torch.randint(0, 2**62, (1,), generator=self.generators[i]))
            gens.append(torch.Generator("cpu").manual_seed(seed))
        old_b = len(self.generators)
        self.generators = gens
        for state in self._state.values():
            for k, v in list(state.items()):
                state[k] = _select(v, index, old_b)


@dataclass(frozen=True)
class _Rows:
    """A batch-first tensor's rows, as taken by a snapshot."""

    value: Tensor


def _take(value: Any, index: Tensor, batch: int) -> Any:
    """A snapshot of `value`: batch-first tensors (also inside lists, tuples and dicts) reduced
    to rows `index`, every other value copied."""
    if isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] == batch:
        return _Rows(value[index.to(value.device)].clone())
    if isinstance(value, dict):
        return {k: _take(v, index, batch) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        out = [_take(v, index, batch) for v in value]
        return tuple(out) if isinstance(value, tuple) else out
    return copy.deepcopy(value)


def _select(value: Any, index: Tensor, batch: int) -> Any:
    """`value` with its batch-first tensors reduced to rows `index` (particle resampling)."""
    if isinstance(value, Tensor):
        return value[index.to(value.device)] if value.ndim > 0 and value.shape[0] == batch else value
    if isinstance(value, dict):
        return {k: _select(v, index, batch) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        out = [_select(v, index, batch) for v in value]
        return tuple(out) if isinstance(value, tuple) else out
    return value


def _put(current: Any, saved: Any, index: Tensor, batch: int, name: str) -> Any:
    """`current` with the snapshot `saved` written back: rows into rows `index`, other values as they were."""
    if isinstance(saved, _Rows):
        if not (isinstance(current, Tensor) and current.ndim > 0 and current.shape[0] == batch
                and current.shape[1:] == saved.value.shape[1:]):
            raise ValueError(f"module state {name!r} changed shape since the snapshot; restore it at the same step")
        out = current.clone()
        out[index.to(out.device)] = saved.value.to(out.device, out.dtype)
        return out
    if isinstance(saved, dict):
        current = dict(current) if isinstance(current, dict) else {}
        for k, v in saved.items():
            current[k] = _put(current.get(k), v, index, batch, f"{name}.{k}")
        return current
    if isinstance(saved, (list, tuple)):
        if not isinstance(current, (list, tuple)) or len(current) != len(saved):
            current = [None] * len(saved)
        out = [_put(c, v, index, batch, f"{name}[{i}]") for i, (c, v) in enumerate(zip(current, saved))]
        return tuple(out) if isinstance(saved, tuple) else out
    return copy.deepcopy(saved)
