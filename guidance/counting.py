"""Counting guidance (Kang et al., "Counting Guidance for High Fidelity Text-to-Image
Synthesis", WACV 2025; official code furiosa-ai/counting-guidance).

A corrector. At each step of its window the guided clean-image prediction x0 is decoded to
pixels (the model family's differentiable `to_pixels`), a differentiable counter counts the
objects, and the loss

    L = sum_k ((c_k - N_k) / N_k)^2          (c_k counted, N_k asked, k over the asked kinds)

is differentiated through the counter and the decoder only: the network's output is held
fixed (no network Jacobian, no extra NFE). The official update on an epsilon model,
eps' = eps + s sqrt(1 - abar) dL/dz_t with x0 = (z_t - sqrt(1 - abar) eps) / sqrt(abar), is
written frame-free with the path's alpha and sigma (x = alpha x0 + sigma eps, eps fixed):

    eps' = eps + s * (sigma / alpha) * dL/dx0,   i.e.   x0' = x0 - s * (sigma / alpha)^2 * dL/dx0,

the same step for epsilon, x0 and velocity models. Where alpha = 0 (t = 1 on the linear
path) the update is infinite; those rows are left unguided (start the window later: on the
shapes model a start at 0.2 of the run works and a start at t = 1 breaks images).

Counters and several kinds of objects:
- a counter of kinds ([B, K]: the shapes world's, per (shape, colour) group) counts each
  asked kind directly: N from the world's reading of the prompt, or `targets`;
- a class-agnostic counter ([B], such as the official RCC) counts each object of a prompt
  with two or more objects in its own region: the masks M_k = [A_k >= A_j for all j] of the
  object tokens' cross-attention maps of the same step's forward (0 extra NFE), upsampled to
  the image, applied to the pixels before counting (the official code's rule);
- `attention=s_att` adds the official attention loss on the first two objects' maps,
  L_att = sum min(A0, A1) - 0.1 sum max(A0, A1) + 0.3 |sum A0 - sum A1| (maps min-max
  normalised), differentiated through the network from one extra evaluation of the
  conditional branch (+1 NFE per step and a backward): eps' = eps + s_att sigma dL_att/dx.
- `linear=True` is the official "counting_linear": the gradient times max(0.01, 0.2 N - 1).
Backward passes and counter calls are counted in `stats` (not NFE).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from flowkit.guidance._maps import (
    finest_layers,
    given_positions,
    groups_reason,
    layer_maps,
    named_layers,
    normalize_maps,
    prompt_groups,
    smooth,
)
from torch import Tensor

from flowkit.errors import InputError
from flowkit.guidance_base import BranchPredictions, BranchRequests, Guidance
from flowkit.prediction import Prediction
from flowkit.registry import GUIDANCE

__all__ = ["CountingGuidance", "count_loss", "attention_loss", "region_masks"]

BRANCH = "counting"
_NEEDS = ("pass counter= (images in [-1, 1] [B, 3, H, W] -> counts [B] or [B, K]); of the built-in models only "
          "shapes hands one over (ctx.kit)")


def count_loss(counts: Tensor, asked: Tensor) -> Tensor:
    """sum_k ((c_k - N_k) / N_k)^2 over the asked kinds (N_k > 0), per sample: counts and
    asked [B, K] -> [B]."""
    on = asked > 0
    n = torch.where(on, asked, torch.ones_like(asked))
    return torch.where(on, ((counts - asked) / n) ** 2, torch.zeros_like(counts)).sum(dim=-1)


def attention_loss(a0: Tensor, a1: Tensor) -> Tensor:
    """The official attention loss of two maps [..., h, w] (min-max normalised first) -> [...]."""
    def norm(a: Tensor) -> Tensor:
        flat = a.flatten(-2)
        lo, hi = flat.amin(dim=-1, keepdim=True), flat.amax(dim=-1, keepdim=True)
        return (flat - lo) / (hi - lo).clamp_min(1e-12)

    n0, n1 = norm(a0), norm(a1)
    return (torch.minimum(n0, n1).sum(-1) - 0.1 * torch.maximum(n0, n1).sum(-1)
            + 0.3 * (n0.sum(-1) - n1.sum(-1)).abs())


def region_masks(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Hard masks [K, H, W] of K object maps [K, h, w]: a pixel belongs to every object whose
    (bilinearly upsampled) map is the largest there (ties go to both, as in the official code)."""
    up = F.interpolate(maps[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    return (up >= up.amax(dim=0, keepdim=True)).to(maps.dtype).detach()


@GUIDANCE.register
class CountingGuidance(Guidance):
    name = "counting"
    description = "counting guidance: a differentiable counter's gradient on the decoded clean image"
    role = "corrector"

    def __init__(self, *, scale: float = 1.0, counter: Any = None, targets: list[int] | None = None,
                 attention: float | None = None, linear: bool = False, norm: str = "ae",
                 layers: list[str] | None = None, words: list[str] | None = None, positions: list | None = None,
                 start: float = 0.0, stop: float = 1.0):
        """scale: s; counter: images in [-1, 1] -> counts [B] or [B, K] (default: the model's
        world's, `ctx.kit.counter`); targets: the asked count of each object group in prompt
        order (default: read from the prompt, by the world or the token groups); attention:
        the attention loss's scale (None: off); linear: the official count-dependent factor;
        norm, layers: how the object maps for masks and the attention loss are read (see
        FRAP); words, positions: the object groups when the world cannot read the prompt
        (positions as FRAP's: nested lists, from Python only)."""
        super().__init__(start=start, stop=stop)
        if not scale >= 0:
            raise ValueError(f"scale must be >= 0, got {scale}")
        if counter == "custom":
            raise ValueError("counter='custom' stands for a Python object; pass the object itself")
        if counter is not None and not callable(counter):
            raise ValueError(f"counter must be callable (images -> counts), got {type(counter).__name__}")
        if targets is not None:
            targets = [targets] if isinstance(targets, int) else list(targets)
            if not targets or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in targets):
                raise ValueError(f"targets must be counts >= 1 (one per object group), got {targets!r}")
        if attention is not None and not attention >= 0:
            raise ValueError(f"attention must be >= 0 or none, got {attention}")
        if norm not in ("ae", "raw"):
            raise ValueError(f"norm must be 'ae' or 'raw', got {norm!r}")
        if words is not None and (not isinstance(words, list) or not all(isinstance(w, str) and w.split()
                                                                          for w in words)):
            raise ValueError("words must be a list of groups, each 'object modifier ...', e.g. ['cats three']")
        self.scale = float(scale)
        self._counter = counter
        self.counter = None if counter is None else "custom"  # objects are shown, not rebuilt, in a spec
        self.targets = targets
        self.attention = None if attention is None else float(attention)
        self.linear, self.norm = bool(linear), norm
        self.layers = None if layers is None else ([layers] if isinstance(layers, str) else list(layers))
        self.words = words
        self._positions = given_positions(positions, self.name)
        self.positions = None if positions is None else "custom"  # nested lists are shown, not rebuilt, in a spec

    @property
    def extra_branches(self) -> int:
        return 1 if self.attention else 0

    def refuse(self, ctx) -> str | None:
        reason = super().refuse(ctx)
        if reason:
            return reason
        kit = ctx.kit
        if kit is None or kit.to_pixels is None:
            return "counting guidance needs the model's decoder to pixels, and this model family hands none"
        if self._counter is None and kit.counter is None:
            return f"counting guidance needs a counter for this model: {_NEEDS}"
        if self._world_counting(ctx) or (self.targets is not None and len(self.targets) == 1 and not self.attention):
            return None  # nothing to find in the prompt: one object, its count given
        return groups_reason(ctx, self.words, self._positions, "counting guidance")

    # -- what is asked ------------------------------------------------------------------------
    def _world_counting(self, ctx) -> bool:
        """The world's counter of kinds, with the world's reading of the prompts."""
        return self._counter is None and ctx.kit.asked_counts is not None and self.targets is None \
            and self.words is None and self._positions is None

    def _groups(self, ctx) -> list[list[Any]]:
        state = self.state(ctx)
        if "groups" not in state:
            words = None if self.words is None else [tuple(w.split()) for w in self.words]
            state["groups"] = prompt_groups(ctx, words, self._positions)
            state["text"] = [ctx.kit.text_tokens(p) if ctx.prompts is not None else
                             sorted({q for g in groups for q in g.positions})
                             for p, groups in zip(ctx.prompts or [None] * ctx.batch_size, state["groups"])]
        return state["groups"]

    def _asked(self, ctx, device: torch.device) -> Tensor:
        """The asked counts [B, G]: per kind of the world's counter, or per object group."""
        B = ctx.batch_size
        if self._world_counting(ctx):
            if ctx.prompts is None:
                return torch.zeros(B, ctx.kit.num_classes or 1, device=device)
            return ctx.kit.asked_counts(ctx.prompts).to(device)
        if self.targets is not None:
            return torch.tensor([self.targets] * B, dtype=torch.float32, device=device)
        rows = []
        for groups in self._groups(ctx):
            counts = [g.count for g in groups]
            if any(n is None for n in counts):
                raise InputError("counting guidance: the prompt does not say how many of each object it asks for; "
                                 "pass targets=[...] (one count per object group)")
            rows.append(counts)
        width = max(map(len, rows), default=1)
        return torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.float32, device=device)

    # -- hooks ------------------------------------------------------------------------------------
    def branches(self, ctx, requests: BranchRequests) -> None:
        """Ask for the object maps of this step's conditional forward where a class-agnostic
        counter counts several objects (their masks; the maps cost no evaluation)."""
        if ctx.attention is None or self._world_counting(ctx) or not self.scale:
            return
        if self.targets is not None and len(self.targets) == 1:
            return
        if max((len(g) for g in self._groups(ctx)), default=0) > 1:
            layers = self.layers or self.state(ctx).get("layers") or ctx.attention.layers
            ctx.attention.request(layers, ctx.step, branches=["cond"])

    def correct(self, ctx, x: Tensor, pred: Prediction, preds: BranchPredictions) -> Prediction:
        if not self.scale and not self.attention:
            return pred
        point = pred.point
        shape = (-1,) + (1,) * (x.ndim - 1)
        alpha = point.alpha.to(device=x.device, dtype=torch.float64).view(shape)
        sigma = point.sigma.to(device=x.device, dtype=torch.float64).view(shape)
        ok = alpha > 0  # rows where the update is finite
        ratio = torch.where(ok, sigma / torch.where(ok, alpha, torch.ones_like(alpha)), torch.zeros_like(alpha))
        x0 = pred.x0.double()
        step = torch.zeros_like(x0)
        if self.scale:
            g0 = self._count_grad(ctx, pred.x0.detach(), x)
            step = step + self.scale * ratio ** 2 * g0.double()
        if self.attention:
            gx = self._attention_grad(ctx, x)
            if gx is not None:
                step = step + self.attention * ratio * sigma * gx.double()
        moved = (step != 0).flatten(1).any(dim=1).view(shape)  # rows with no update keep their bits
        new = pred.with_x0((x0 - step).to(pred.value.dtype))
        return pred.replace(torch.where(moved, new.value, pred.value))

    def _count_grad(self, ctx, x0: Tensor, x: Tensor) -> Tensor:
        """dL/dx0 of the counting loss, through the decoder and the counter only."""
        counter = self._counter if self._counter is not None else ctx.kit.counter
        asked = self._asked(ctx, x0.device)
        with torch.enable_grad():
            x0g = x0.float().requires_grad_(True)
            pixels = ctx.kit.to_pixels(x0g)
            counts = counter(pixels)
            ctx.reward_calls += 1
            if counts.ndim == 1 or (counts.ndim == 2 and counts.shape[1] == 1 and asked.shape[1] > 1):
                counts = self._region_counts(ctx, counter, pixels, counts.reshape(-1), asked.shape[1])
            if counts.ndim != 2 or counts.shape != asked.shape:
                raise InputError(f"counting guidance: the counter gave counts of shape {tuple(counts.shape)} for "
                                 f"{tuple(asked.shape)} asked counts (give [B] or [B, K] counts)")
            loss = count_loss(counts.float(), asked)
            if self.linear:  # the official count-dependent factor, on the first object's target
                first = asked[:, :1].clamp_min(0).max(dim=1).values
                loss = loss * (0.2 * first - 1).clamp_min(0.01)
            (g,) = torch.autograd.grad(loss.sum(), x0g)
        ctx.backward_calls += 1
        return g

    def _region_counts(self, ctx, counter: Any, pixels: Tensor, whole: Tensor, kinds: int) -> Tensor:
        """[B, K] counts of a class-agnostic counter, each object counted in its own region."""
        if kinds == 1:
            return whole[:, None]
        maps = self._object_maps(ctx, "cond")
        out = []
        for b in range(pixels.shape[0]):
            masks = region_masks(maps[b], tuple(pixels.shape[-2:]))  # [K, H, W]
            out.append(torch.stack([counter(pixels[b:b + 1] * masks[k])[0].reshape(()) for k in range(len(masks))]))
            ctx.reward_calls += len(masks)
        width = max(len(o) for o in out)
        return torch.stack([F.pad(o, (0, width - len(o))) for o in out])[:, :kinds]

    def _object_maps(self, ctx, branch: str) -> Tensor:
        """Per sample the object tokens' maps [B, K, h, w] (normalised and smoothed) of `branch`
        at this step."""
        state = self.state(ctx)
        if self.layers is None and "layers" not in state:
            state["layers"] = finest_layers(ctx.attention, ctx.step, branch)
        layers = named_layers(ctx.attention, self.layers) if self.layers else state["layers"]
        maps = layer_maps(ctx.attention, layers, ctx.step, branch, ctx.batch_size).float()
        groups = self._groups(ctx)
        maps = smooth(normalize_maps(maps, state["text"], self.norm))
        k = max(len(g) for g in groups)
        out = maps.new_zeros((ctx.batch_size, k) + tuple(maps.shape[-2:]))
        for b, gs in enumerate(groups):
            for j, g in enumerate(gs):
                out[b, j] = maps[b, list(g.object)].mean(dim=0)
        return out

    def _attention_grad(self, ctx, x: Tensor) -> Tensor | None:
        """dL_att/dx through one extra evaluation of the conditional branch (two objects)."""
        groups = self._groups(ctx)
        if all(len(g) < 2 for g in groups) or ctx.attention is None:
            return None
        layers = self.layers or self.state(ctx).get("layers") or ctx.attention.layers
        ctx.attention.request(layers, ctx.step, branches=[BRANCH])
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            ctx.evaluate(xg, ctx.t, ctx.conds["cond"], BRANCH, grad=True)
            maps = self._object_maps(ctx, BRANCH)
            two = torch.tensor([len(g) >= 2 for g in groups], device=maps.device)
            loss = torch.where(two, attention_loss(maps[:, 0], maps[:, 1]), torch.zeros((), device=maps.device))
            (g,) = torch.autograd.grad(loss.sum(), xg)
        ctx.attention.clear(branch=BRANCH)
        ctx.backward_calls += 1
        return g

    def after_step(self, ctx, x, pred, preds) -> None:
        if ctx.attention is not None:
            ctx.attention.clear(branch="cond")  # this step's maps are used up
