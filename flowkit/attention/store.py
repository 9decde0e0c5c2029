"""The attention-map store a run hands to guidance: capture requests and captured maps.

A guidance module asks for the cross-attention maps of named layers at named global steps
(`store.request(layers, steps)`, before the step's forward, e.g. in its `branches` hook),
and reads them after the forward (`store.get(layer, step, branch)`). Only the requested
calls run the reference kernel (which yields the probabilities); every other call stays
on the fused kernel.

The sampling loop batches branches (cond, uncond, ...) into one forward; it opens a
`store.forward(step, layout)` scope around each network call, where `layout` lists
(branch, sample indices) in the order of the forward's rows, so each captured map is
split back into one `AttentionMap` per branch with the sample index of every row. The
scope is also where the run's attention controller fixes the call's kernel and captured
layers and, after the call, counts it (see flowkit.attention.control): a forward that
captures runs eagerly, every other one may run compiled.

Maps are not detached: captured inside `torch.enable_grad()`, a loss on them can be
differentiated with respect to the latents or the conditioning (FRAP, counting guidance).
"""

from __future__ import annotations

import fnmatch
import math
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterable, Iterator, Sequence

import torch
from torch import Tensor

from flowkit.errors import InputError, UnsupportedError, closest

if TYPE_CHECKING:
    from flowkit.perturbation import Perturbation

__all__ = ["AttentionMap", "AttentionStore", "resolve_layers"]

HEADS = ("mean", "all")


@dataclass
class AttentionMap:
    """The cross-attention probabilities of one layer in one forward, for one branch.

    probs: [n, Lq, Lk] (heads averaged) or [n, H, Lq, Lk] (heads="all"): for each of the n
        rows, each image token's attention over the text tokens (rows sum to 1 over Lk for
        a UNet's cross-attention; a joint-attention block's image-to-text block sums to <= 1,
        since its softmax also runs over the image tokens).
    samples: [n] the sample index of each row; branch: the branch name (None outside the loop).
    step: the global step; call: the forward's index within the step (Heun calls twice).
    latent_hw: the latent's (height, width) in that forward, to lay image tokens out.
    """

    layer: str
    step: int
    call: int
    branch: str | None
    samples: Tensor
    probs: Tensor
    latent_hw: tuple[int, ...] | None = None

    def spatial(self) -> Tensor:
        """probs as token maps [n, (H,) Lk, h, w]: image tokens laid out on the latent grid."""
        lq = self.probs.shape[-2]
        if self.latent_hw is None or len(self.latent_hw) != 2:
            raise InputError(f"layer {self.layer!r}: no 2-D latent size recorded, so its {lq} tokens have no layout")
        h, w = self.latent_hw
        s = math.isqrt(max(h * w // max(lq, 1), 1))
        if s * s * lq != h * w or h % s or w % s:
            raise InputError(f"layer {self.layer!r}: {lq} image tokens do not tile a {h}x{w} latent")
        m = self.probs.transpose(-1, -2)  # [..., Lk, Lq]
        return m.reshape(*m.shape[:-1], h // s, w // s)


def resolve_layers(patterns: str | Iterable[str], known: Sequence[str]) -> list[str]:
    """The known layer names matched by `patterns` (exact names or fnmatch globs such as
    "up_blocks.*.attn2"), in model order; a pattern matching none is an InputError."""
    if isinstance(patterns, str):
        patterns = [patterns]
    try:
        patterns = list(patterns)
    except TypeError:
        raise InputError(f"layers must be a name or a list of names, got {type(patterns).__name__}") from None
    if not patterns:
        raise InputError("give at least one layer name (see flowkit.attention.layers(pipe))")
    chosen: set[str] = set()
    for p in patterns:
        if not isinstance(p, str) or not p:
            raise InputError(f"a layer name must be a non-empty string, got {p!r}")
        hits = [name for name in known if name == p or fnmatch.fnmatchcase(name, p)]
        if not hits:
            if not known:
                raise InputError(f"no layer {p!r}: this model has no capturable cross-attention layers")
            raise InputError(f"no capturable cross-attention layer {p!r}{closest(p, known)}; "
                             f"known: {', '.join(known[:6])}{', ...' if len(known) > 6 else ''}")
        chosen.update(hits)
    return [name for name in known if name in chosen]


def _steps(steps: int | Iterable[int] | None) -> frozenset[int] | None:
    if steps is None:
        return None
    if isinstance(steps, bool):
        raise InputError(f"steps must be global step indices (ints >= 0), got {steps!r}")
    items = [steps] if isinstance(steps, int) else list(steps)
    for s in items:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise InputError(f"steps must be global step indices (ints >= 0), got {s!r}")
    return frozenset(items)


@dataclass
class _Scope:
    step: int
    call: int
    layout: list[tuple[str | None, Tensor]] | None
    latent_hw: tuple[int, ...] | None
    perturbation: "Perturbation | None" = None


class AttentionStore:
    """Capture requests and captured maps of one run (see the module docstring).

    layers: the capturable cross-attention layer names of the run's network.
    counts: attention calls in this run by kernel name, captured calls as "captured".
    """

    def __init__(self, layers: Sequence[str] = ()):
        self.layers = list(layers)
        self.counts: Counter[str] = Counter()
        self.maps: list[AttentionMap] = []
        # layer -> (steps or None: all, heads, branches or None: any call)
        self._requests: dict[str, tuple[frozenset[int] | None, str, frozenset[str] | None]] = {}
        self._scope: _Scope | None = None
        self._calls: Counter[int] = Counter()  # forwards opened per step
        self.replaying = False  # a checkpointed call is being recomputed in the backward pass
        self.controller: Any = None  # the run's AttentionController (set by `session`), or None
        # the network's way to apply a perturbation for one forward (set by the run's session)
        self.perturber: Callable[["Perturbation"], ContextManager[Any]] | None = None

    # -- requests ----------------------------------------------------------------------
    def resolve(self, layers: str | Iterable[str]) -> list[str]:
        """The capturable layer names that `layers` (names or globs) match, in model order."""
        return resolve_layers(layers, self.layers)

    def request(self, layers: str | Iterable[str], steps: int | Iterable[int] | None = None, *,
                heads: str = "mean", branches: Iterable[str] | None = None) -> list[str]:
        """Capture `layers` (names or globs) at global `steps` (None: every step); returns the names.
        heads: "mean" keeps [n, Lq, Lk] maps averaged over heads, "all" keeps [n, H, Lq, Lk];
        branches: capture only the calls that evaluate one of these branches (None: any call),
        e.g. a module's own extra evaluation and not the step's batched forward."""
        if heads not in HEADS:
            raise InputError(f"heads must be 'mean' or 'all', got {heads!r}")
        names = resolve_layers(layers, self.layers)
        when = _steps(steps)
        which = None if branches is None else frozenset([branches] if isinstance(branches, str) else branches)
        for name in names:
            old = self._requests.get(name)
            if old is not None and old[1] != heads:
                raise InputError(f"layer {name!r} is already captured with heads={old[1]!r}")
            merged = None if when is None or (old is not None and old[0] is None) else \
                when | (old[0] if old is not None else frozenset())
            merged_branches = None if which is None or (old is not None and old[2] is None) else \
                which | (old[2] if old is not None else frozenset())
            self._requests[name] = (merged, heads, merged_branches)
        return names

    def cancel(self, layers: str | Iterable[str] | None = None) -> None:
        """Stop capturing `layers` (None: all)."""
        for name in (list(self._requests) if layers is None else resolve_layers(layers, self.layers)):
            self._requests.pop(name, None)

    # -- the forward scope (opened by the sampling loop) ---------------------------------
    @contextmanager
    def forward(self, step: int, layout: Sequence[tuple[str | None, Tensor]] | None = None,
                latent_hw: Sequence[int] | None = None, *,
                perturbation: "Perturbation | None" = None) -> Iterator[None]:
        """Tag the captures of one network call: global step, (branch, sample rows) per block of rows;
        with `perturbation`, the network is perturbed for this call (flowkit.perturbation)."""
        if perturbation is not None and self.perturber is None:
            raise UnsupportedError(f"this run's network cannot be perturbed ({perturbation.describe()}): "
                                   "flowkit's attention processors are not installed on it")
        call = self._calls[step]
        self._calls[step] += 1
        lay = None if layout is None else [(b, torch.as_tensor(r).flatten().cpu()) for b, r in layout]
        outer, self._scope = self._scope, _Scope(step, call, lay, tuple(latent_hw) if latent_hw is not None else None,
                                                 perturbation)
        try:
            with self.perturber(perturbation) if perturbation is not None else nullcontext(), \
                    self.controller.forward(self) if self.controller is not None else nullcontext():
                yield
        finally:
            self._scope = outer

    @property
    def scope(self) -> "_Scope | None":
        """The network call being run (None outside the loop's calls)."""
        return self._scope

    @contextmanager
    def replay(self, scope: "_Scope | None") -> Iterator[None]:
        """Recompute the call `scope` (activation checkpointing's backward pass): the same
        layers are captured (same kernels), but no map is recorded and no call counted again."""
        outer, self._scope, self.replaying = self._scope, scope, True
        try:
            yield
        finally:
            self._scope, self.replaying = outer, False

    def wants(self, layer: str) -> bool:
        """Whether the current call of `layer` is to be captured."""
        scope = self._scope
        if scope is None:
            return False
        req = self._requests.get(layer)
        if req is None or not (req[0] is None or scope.step in req[0]):
            return False
        return req[2] is None or any(branch in req[2] for branch, _ in (scope.layout or []))

    def record(self, layer: str, probs: Tensor) -> None:
        """Keep the probabilities [rows, H, Lq, Lk] of a captured call, split by branch."""
        scope = self._scope
        assert scope is not None, "record() outside a forward scope"
        if self.replaying:
            return
        if self._requests[layer][1] == "mean":
            probs = probs.mean(dim=1)
        layout = scope.layout or [(None, torch.arange(probs.shape[0]))]
        offset = 0
        for branch, rows in layout:
            n = len(rows)
            self.maps.append(AttentionMap(layer, scope.step, scope.call, branch, rows,
                                          probs[offset:offset + n], scope.latent_hw))
            offset += n
        if offset != probs.shape[0]:
            raise InputError(f"the forward's layout names {offset} rows, but layer {layer!r} saw {probs.shape[0]}")

    # -- reading -----------------------------------------------------------------------
    def get(self, layer: str, step: int, branch: str | None = "cond", *, call: int = -1) -> AttentionMap:
        """The map of `layer` at global `step` for `branch` (call: which forward of the step, last by default)."""
        found = [m for m in self.maps if m.layer == layer and m.step == step and m.branch == branch]
        if not found:
            have = sorted({(m.layer, m.step, m.branch) for m in self.maps})
            raise InputError(f"no captured map of layer {layer!r} at step {step} for branch {branch!r}; request it "
                             f"before the step's forward (captured: {have[:4]}{' ...' if len(have) > 4 else ''})")
        calls = sorted({m.call for m in found})
        want = calls[call] if -len(calls) <= call < len(calls) else None
        if want is None:
            raise InputError(f"step {step} of layer {layer!r} has {len(calls)} captured forwards; call={call} is out of range")
        return next(m for m in found if m.call == want)

    def clear(self, before_step: int | None = None, *, branch: str | None = None) -> None:
        """Drop captured maps (of steps before `before_step`, or all; of `branch` only, or of
        every branch), releasing their graphs."""
        self.maps = [m for m in self.maps if not ((before_step is None or m.step < before_step)
                                                  and (branch is None or m.branch == branch))]
