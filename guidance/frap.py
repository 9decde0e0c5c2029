"""FRAP: adaptive prompt weighting (Jiang et al., "FRAP: Faithful and Realistic Text-to-Image
Generation with Adaptive Prompt Weighting", arXiv 2408.11706, TMLR 2025).

A modifier. Each sample carries weights w over its text tokens (1 at the start); the
conditional branch's token embeddings are scaled by them, c'_i = w_i c_i (the unconditional
branch is untouched). At each step of the module's window the weights take a gradient step
on a loss of the cross-attention maps the conditional branch makes with them (the latent is
never changed, which is the paper's point against latent-optimising methods):

    L = max_s (1 - max G(A_s))  -  lambda * mean_(s, r) sum min(P G(A_s), P G(A_r))

- presence (Attend-and-Excite's): A_s the map of object token s, G a 3x3 Gaussian
  (sigma 0.5), so 0 when an object's smoothed map reaches 1 somewhere and 1 when it is flat
  at 0; the most neglected object counts;
- binding: P normalises a map to sum 1, so sum min(., .) is the overlap (histogram
  intersection) of object s's map and its modifier r's, 1 when they coincide, 0 when they
  are disjoint; maximised, so a colour attends where its noun does.

The paper's abstract fixes the parts above (token weights, online updates, a presence term
and a binding term). Its method section could not be read here; a secondary summary of it
(a paper review) gives the same two terms, L = L_presence - lambda L_binding with
L_presence = 1 - max G(A_s) and L_binding the pixel sum of min(P G(A_s), P G(A_r)) scaled
by 1/P^2 (a constant, absorbed here into lambda), but not the weight update's rule or
schedule, nor how the objects' terms are pooled. So these choices are ours:
- the weights are applied to the conditional branch only and only object and modifier
  tokens are updated (the others stay 1); they are clamped to [min_weight, max_weight]
  (prompt weights far from 1 break images: on the shapes model x2.5 on one group drops the
  whole caption from 59% to 3%);
- per step, one update: an extra evaluation of the conditional branch with the current
  weights (inside the run, counted as NFE, maps captured), the loss, one backward to the
  weights, w <- w - lr_t dL/dw with lr_t = lr * sqrt(1 - 0.5 step/N) (Attend-and-Excite's
  schedule), then the step's own forward uses the new weights; a second evaluation of the
  same step (Heun) does not update again;
- the maps: `layers="finest"` (the capturable layers with the most image tokens, where
  words localise; chosen at the first update), averaged over heads and layers; `norm="ae"`
  softmaxes 100 * A over the prompt's word tokens as Attend-and-Excite does, `norm="raw"`
  keeps the attention probabilities (on the shapes model A&E's softmax hands every object
  pixel to the colour word);
- token groups come from `words=` (object word first, then its modifiers), `positions=`, or
  the world's own parse of its captions (shapes);
- the window (`start`, `stop`) limits the updates; the weights found are used until the end
  of the run.
"""

from __future__ import annotations

import torch
from flowkit.guidance._maps import (
    finest_layers,
    given_positions,
    groups_reason,
    layer_maps,
    named_layers,
    normalize_maps,
    prompt_groups,
    smooth,
    sqrt_decay,
)
from torch import Tensor

from flowkit.guidance_base import BranchRequests, Guidance
from flowkit.registry import GUIDANCE

__all__ = ["FRAP", "presence_loss", "binding_overlap", "frap_loss"]

BRANCH = "frap"


def presence_loss(maps: Tensor) -> Tensor:
    """1 - max over pixels of (already smoothed) token maps [..., h, w] -> [...]."""
    return 1.0 - maps.flatten(-2).amax(dim=-1)


def binding_overlap(a: Tensor, b: Tensor) -> Tensor:
    """Histogram intersection of two maps [..., h, w] normalised to sum 1 -> [...] in [0, 1]."""
    pa = a.flatten(-2) / a.flatten(-2).sum(dim=-1, keepdim=True).clamp_min(1e-12)
    pb = b.flatten(-2) / b.flatten(-2).sum(dim=-1, keepdim=True).clamp_min(1e-12)
    return torch.minimum(pa, pb).sum(dim=-1)


def frap_loss(maps: Tensor, groups: list, binding: float) -> Tensor:
    """The loss of one sample: token maps [Lk, h, w] (normalised and smoothed), its groups."""
    def token(positions: tuple[int, ...]) -> Tensor:
        return maps[list(positions)].mean(dim=0)  # a word of several tokens: their mean map

    presence = torch.stack([presence_loss(token(g.object)) for g in groups]).max()
    pairs = [binding_overlap(token(g.object), token(m)) for g in groups for m in g.modifiers]
    overlap = torch.stack(pairs).mean() if pairs else maps.new_zeros(())
    return presence - binding * overlap


@GUIDANCE.register
class FRAP(Guidance):
    name = "frap"
    description = "FRAP: per-token prompt weights updated online on cross-attention presence and binding"
    role = "modifier"

    def __init__(self, *, lr: float = 1.0, binding: float = 1.0, norm: str = "ae", layers: list[str] | None = None,
                 min_weight: float = 0.5, max_weight: float = 1.5, sigma: float = 0.5,
                 words: list[str] | None = None, positions: list | None = None,
                 start: float = 0.0, stop: float = 0.25):
        """lr: the weights' step size (lr_t decays as in Attend-and-Excite); binding: lambda;
        norm: "ae" or "raw" (see the module doc); layers: layer names or globs (None: the
        finest capturable ones); min_weight, max_weight: the clamp; sigma: the Gaussian's
        (0: no smoothing); words: groups "object modifier ..." (one string a group, words
        separated by spaces) for every prompt; positions: explicit token positions per prompt,
        per group, per word, e.g. [[[5, 2]]] (see ModelAdapter.token_groups; the only way with
        prompt embeddings; Python only: a spec holds no nested lists and shows them as
        "custom"); start, stop: the window of updates."""
        super().__init__(start=start, stop=stop)
        if not lr >= 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not binding >= 0:
            raise ValueError(f"binding must be >= 0, got {binding}")
        if norm not in ("ae", "raw"):
            raise ValueError(f"norm must be 'ae' or 'raw', got {norm!r}")
        if not 0 <= min_weight <= 1 <= max_weight:
            raise ValueError(f"the clamp must hold 1: min_weight <= 1 <= max_weight, got {min_weight}, {max_weight}")
        if not sigma >= 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        if words is not None and (not isinstance(words, list) or not all(isinstance(w, str) and w.split()
                                                                          for w in words)):
            raise ValueError("words must be a list of groups, each 'object modifier ...', e.g. ['cat black', 'dog']")
        self.lr, self.binding, self.norm, self.sigma = float(lr), float(binding), norm, float(sigma)
        self.layers = None if layers is None else ([layers] if isinstance(layers, str) else list(layers))
        self.min_weight, self.max_weight = float(min_weight), float(max_weight)
        self.words = words
        self._positions = given_positions(positions, self.name)
        self.positions = None if positions is None else "custom"  # nested lists are shown, not rebuilt, in a spec

    def active(self, ctx) -> bool:
        """From `start` on: the weights apply until the end of the run (updates: `updating`)."""
        return ctx.step >= self.window(ctx.num_steps)[0]

    def updating(self, ctx) -> bool:
        first, end = self.window(ctx.num_steps)
        return first <= ctx.step < end

    def refuse(self, ctx) -> str | None:
        reason = super().refuse(ctx)
        if reason:
            return reason
        if ctx.kit is None or ctx.kit.token_groups is None:
            return "frap needs a model whose text tokens it can weight (its family hands no token groups)"
        if ctx.attention is not None and not ctx.attention.layers:
            return "frap needs cross-attention maps, and this model has no capturable cross-attention layer"
        return groups_reason(ctx, self.words, self._positions, self.name)

    # -- state --------------------------------------------------------------------------------
    def weights(self, ctx) -> Tensor:
        """The current weights [B, L] (float32, on the device)."""
        state = self.state(ctx)
        if "w" not in state:
            cond = ctx.conds["cond"]["encoder_hidden_states"]
            state["w"] = torch.ones(cond.shape[:2], dtype=torch.float32, device=cond.device)
        return state["w"]

    def _groups(self, ctx) -> list[list]:
        state = self.state(ctx)
        if "groups" not in state:
            words = None if self.words is None else [tuple(w.split()) for w in self.words]
            state["groups"] = prompt_groups(ctx, words, self._positions)
            state["text"] = [ctx.kit.text_tokens(p) if ctx.prompts is not None else
                             sorted({q for g in groups for q in g.positions})
                             for p, groups in zip(ctx.prompts or [None] * ctx.batch_size, state["groups"])]
            mask = torch.zeros_like(self.weights(ctx), dtype=torch.bool)
            for b, groups in enumerate(state["groups"]):
                for g in groups:
                    mask[b, list(g.positions)] = True
            state["mask"] = mask  # the tokens whose weights are updated
        return state["groups"]

    # -- hooks ----------------------------------------------------------------------------------
    def branches(self, ctx, requests: BranchRequests) -> None:
        state = self.state(ctx)
        if not self.updating(ctx) or state.get("updated") == ctx.step or ctx.attention is None:
            return
        state["updated"] = ctx.step  # once per step (Heun's second evaluation reuses the weights)
        groups = self._groups(ctx)
        w = self.weights(ctx).detach().requires_grad_(True)
        layers = self.layers if self.layers is not None else state.get("layers") or ctx.attention.layers
        ctx.attention.request(layers, ctx.step, branches=[BRANCH])
        cond = ctx.conds["cond"]
        rows = torch.arange(ctx.batch_size)
        with torch.enable_grad():  # the loop runs without gradients; this update needs them
            weighted = cond.replace(encoder_hidden_states=cond["encoder_hidden_states"] * w[..., None].to(
                cond["encoder_hidden_states"].dtype))
            ctx.evaluate(ctx.x.detach(), ctx.t, weighted, BRANCH, grad=True, rows=rows)
            if self.layers is None and "layers" not in state:
                state["layers"] = finest_layers(ctx.attention, ctx.step, BRANCH)
            used = named_layers(ctx.attention, self.layers) if self.layers is not None else state["layers"]
            maps = layer_maps(ctx.attention, used, ctx.step, BRANCH, ctx.batch_size).float()
            maps = smooth(normalize_maps(maps, state["text"], self.norm), sigma=self.sigma) if self.sigma else \
                normalize_maps(maps, state["text"], self.norm)
            losses = torch.stack([frap_loss(maps[b], g, self.binding) if g else maps.new_zeros(())
                                  for b, g in enumerate(groups)])
            (grad,) = torch.autograd.grad(losses.sum(), w, allow_unused=True)
        ctx.attention.clear(branch=BRANCH)  # the maps and their graphs are not needed any more
        ctx.backward_calls += 1
        if grad is None:
            grad = torch.zeros_like(w)
        lr = self.lr * sqrt_decay(ctx.step, ctx.num_steps)
        new = (w.detach() - lr * grad * state["mask"]).clamp(self.min_weight, self.max_weight)
        state["w"] = torch.where(state["mask"], new, w.detach())
        state["loss"] = losses.detach().cpu()

    def conditioning(self, ctx, branch: str, cond):
        if branch != "cond" or cond is None:
            return cond
        w = self.weights(ctx)
        ehs = cond["encoder_hidden_states"]
        return cond.replace(encoder_hidden_states=ehs * w[..., None].to(ehs.dtype))

    def on_stage_change(self, ctx, old_shape, new_shape) -> None:
        """The weights belong to the prompt, not the resolution: kept across stages."""
        return None

