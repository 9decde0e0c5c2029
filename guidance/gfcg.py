"""Gradient-free classifier guidance (Shenoy et al., "Gradient-Free Classifier Guidance for
Diffusion Model Sampling", arXiv 2411.15393; there is no official code, so every choice
below is ours and is marked as such).

A corrector: after the combine (CFG, APG, or none), per sample and per evaluation,

    p     = softmax(classifier(x0_hat))          the classifier in inference mode, no gradients
    y     = the asked class                      (two-group prompts: see below)
    r     = argmax_{k not asked} p_k             the time-adaptive reference class
    rho   = p_r / p_y                            the classifier's confusion (> 1: it prefers r)
    s_t   = scale * clip((rho - threshold) / (1 - threshold), 0, 1)
    D     = D_guided + s_t (D_cond - D_ref)      pushed away from the reference prediction

where D_ref is the model's prediction on a declared extra branch, `gfcg_ref`, conditioned on
a caption of r. The push is affine in the prediction at fixed state and time, so it is the
same in every prediction space; it is applied to the raw model output.

Choices (ours):
- x0_hat is the guided clean-image prediction of the *previous* evaluation (after every
  correction), clamped to [-1, 1]: with it the reference is known before the forward pass,
  so `gfcg_ref` is batched with `cond`/`uncond` in one pass as the design requires. The
  paper classifies the current step's denoised estimate, which needs a second sequential
  pass. The first evaluation of a run (pure noise, no estimate yet) is not pushed.
- the reference is the most probable class among those the prompt does not ask for
  ("the most probable class other than the target"), re-chosen at every evaluation;
- the scale grows linearly with the confusion rho and saturates at `scale` once the
  reference is at least as probable as the target; below `threshold` it is exactly 0, and
  then the reference branch is not evaluated at all: with a classifier confident in the
  target the run is exactly its base guidance, at its base NFE. Where it pushes, the
  branch costs one NFE per sample per evaluation (`saves_nfe`: the cost is data-dependent);
- two-group prompts ("two red circles and a blue square"): the target is the asked group
  the classifier finds least probable (the one at risk), the reference excludes both asked
  groups, and the reference caption swaps only the target group for the reference group,
  keeping counts and the other group ("two green circles and a blue square"), so that
  D_cond - D_ref isolates the target's attribute;
- single-group prompts: the reference caption keeps the asked count ("three blue circles"
  against "three red circles");
- a sample whose target is unknown (a prompt that is not a world caption, prompt_embeds in
  a drop-in call) is not pushed.

Classifier: on the shapes model the shipped `ShapesClassifier`'s softmax head
(`class_logits`) over the 12 (shape, colour) groups of `shapes.GROUPS`; targets come from
the captions (the shapes adapter tags each conditioning row with its caption's groups).
Any other classifier maps images [B, C, H, W] (the model's clean sample: latents for
latent models) to class logits [B, K]; give it with `label_to_prompt` (class index ->
prompt of the reference branch) and `targets` (one class index, or one per image). Model
families without a classifier (SD, SDXL, SD3, FLUX) are refused unless those are given.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from flowkit.conditioning import Conditioning
from flowkit.errors import InputError
from flowkit.guidance_base import BranchPredictions, BranchRequests, Guidance
from flowkit.kit import ModelKit
from flowkit.prediction import Prediction
from flowkit.registry import GUIDANCE

__all__ = ["GFCG", "choose_reference", "BRANCH"]

BRANCH = "gfcg_ref"
_NEEDS = ("pass classifier= (images -> class logits [B, K]), label_to_prompt= (class -> prompt) and "
          "targets= (the asked class per image); of the built-in models only shapes hands one over (ctx.kit)")


def choose_reference(probs: Tensor, asked: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(target, reference, log confusion) per sample from class probabilities [B, K] and the
    asked classes [B, G] (-1 = none). target: the asked class with the lowest probability;
    reference: the most probable class not asked; log rho = log p_ref - log p_target.
    Samples with no asked class get target -1 and log rho = -inf."""
    B, K = probs.shape
    logp = probs.double().clamp_min(1e-300).log()
    valid = asked >= 0  # [B, G]
    idx = asked.clamp_min(0)
    lp_asked = torch.where(valid, logp.gather(1, idx), torch.full_like(idx, float("inf"), dtype=logp.dtype))
    j = lp_asked.argmin(dim=1)  # [B]
    target = torch.where(valid.any(dim=1), idx.gather(1, j[:, None])[:, 0], torch.full_like(j, -1))
    excluded = (torch.nn.functional.one_hot(idx, K).bool() & valid[..., None]).any(dim=1)  # [B, K]
    ref = logp.masked_fill(excluded, float("-inf")).argmax(dim=1)
    log_rho = logp.gather(1, ref[:, None])[:, 0] - lp_asked.gather(1, j[:, None])[:, 0]
    log_rho = torch.where(target >= 0, log_rho, torch.full_like(log_rho, float("-inf")))
    return target, ref, log_rho


@GUIDANCE.register
class GFCG(Guidance):
    name = "gfcg"
    description = "gradient-free classifier guidance: push away from the classifier's most likely wrong class"
    role = "corrector"
    saves_nfe = True  # the reference branch runs only where the classifier is confused

    def __init__(self, *, scale: float = 1.0, threshold: float = 0.1, classifier: Any = None,
                 label_to_prompt: Any = None, targets: list[int] | None = None,
                 start: float = 0.0, stop: float = 1.0):
        """scale: the largest push s_t; threshold: the confusion p_ref / p_target below which
        there is no push; classifier: images -> class logits [B, K] (default: the model's
        world's, `ctx.kit.classifier`); label_to_prompt: class index -> prompt of the
        reference branch (default: the world's prompt with the target asked as the
        reference); targets: the asked class, one or one per image (default: the classes the
        world reads from each prompt)."""
        super().__init__(start=start, stop=stop)
        if not scale >= 0:
            raise ValueError(f"scale must be >= 0, got {scale}")
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"threshold is a confusion ratio in [0, 1), got {threshold}")
        for what, fn in (("classifier", classifier), ("label_to_prompt", label_to_prompt)):
            if fn == "custom":
                raise ValueError(f"{what}='custom' stands for a Python object; pass the object itself")
            if fn is not None and not callable(fn):
                raise ValueError(f"{what} must be callable (or None for the shapes world's), got {type(fn).__name__}")
        if targets is not None:
            targets = [targets] if isinstance(targets, int) else list(targets)
            if not targets or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in targets):
                raise ValueError(f"targets must be class indices >= 0 (one, or one per image), got {targets!r}")
        self.scale = float(scale)
        self.threshold = float(threshold)
        self._classifier, self._label_to_prompt = classifier, label_to_prompt
        self.classifier = None if classifier is None else "custom"  # objects are shown, not rebuilt, in a spec
        self.label_to_prompt = None if label_to_prompt is None else "custom"
        self.targets = targets

    @property
    def extra_branches(self) -> int:
        return 1

    def refuse(self, ctx) -> str | None:
        reason = super().refuse(ctx)
        if reason:
            return reason
        kit = ctx.kit or ModelKit()
        missing = [what for what, ok in (("classifier", self._classifier is not None or kit.classifier is not None),
                                         ("label_to_prompt", self._label_to_prompt is not None
                                          or kit.reference_prompt is not None),
                                         ("targets", self.targets is not None or kit.asked_classes is not None))
                   if not ok]
        if missing:
            return f"gfcg needs a classifier for this model (missing {', '.join(missing)}): {_NEEDS}"
        if ctx.encode is None:
            return "gfcg needs the model's text encoder to condition its reference branch"
        return None

    # -- the classifier -------------------------------------------------------------------
    def _probs(self, ctx, x0: Tensor) -> Tensor:
        """Class probabilities [B, K] (float64) of clean-image predictions x0 [B, ...]."""
        net = self._classifier if self._classifier is not None else ctx.kit.classifier
        fn = getattr(net, "class_logits", net)
        weights = list(net.parameters())[:1] if isinstance(net, torch.nn.Module) else []
        device = weights[0].device if weights else x0.device
        with torch.no_grad():
            out = fn(x0.detach().float().clamp(-1.0, 1.0).to(device))
        ctx.reward_calls += 1  # a classifier call: counted apart from NFE
        logits = getattr(out, "class_logits", out)
        if not isinstance(logits, Tensor) or logits.ndim != 2 or logits.shape[0] != x0.shape[0] or logits.shape[1] < 2:
            shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise InputError(f"gfcg: the classifier must map images [B, ...] to class logits [B, K] with K >= 2; "
                             f"got {shape} for {x0.shape[0]} images")
        world_classes = ctx.kit.num_classes if ctx.kit is not None else None
        if (self._label_to_prompt is None or self.targets is None) and world_classes is not None \
                and logits.shape[1] != world_classes:
            raise InputError(f"gfcg: with the world's prompts and targets the classifier must give logits over the "
                             f"world's {world_classes} {ctx.kit.class_kind}; got {logits.shape[1]} classes")
        return torch.softmax(logits.double(), dim=1).to(x0.device)

    def _asked(self, ctx, K: int) -> Tensor:
        """The asked classes [B, G] (-1 = none)."""
        B = ctx.batch_size
        if self.targets is not None:
            if len(self.targets) not in (1, B):
                raise InputError(f"gfcg: {len(self.targets)} targets for {B} images; give one, or one per image")
            t = torch.tensor(self.targets * (B if len(self.targets) == 1 else 1), dtype=torch.long)
        elif ctx.prompts is not None:
            t = ctx.kit.asked_classes(ctx.prompts).to(torch.long).cpu()
        else:  # prompt embeddings only: the asked classes are unknown, nothing is pushed
            t = torch.full((B, 1), -1, dtype=torch.long)
        if int(t.max()) >= K:
            raise InputError(f"gfcg: target class {int(t.max())} is outside the classifier's {K} classes")
        return t.reshape(B, -1)

    # -- hooks ------------------------------------------------------------------------------
    def branches(self, ctx, requests: BranchRequests) -> None:
        state = self.state(ctx)
        state.pop("pending", None)
        x0 = state.get("x0")
        if x0 is None:
            return  # the first evaluation: nothing to classify yet
        probs = self._probs(ctx, x0).cpu()
        target, ref, log_rho = choose_reference(probs, self._asked(ctx, probs.shape[1]))
        rho = log_rho.clamp(max=0.0).exp()  # min(rho, 1), exactly 0 for unknown targets
        s = self.scale * ((rho - self.threshold) / (1.0 - self.threshold)).clamp(0.0, 1.0)
        state["scale"], state["reference"], state["target"] = s, ref, target
        push = s > 0
        if not bool(push.any()):
            return
        state["pending"] = s
        state["cond_ref"] = self._reference_conditioning(ctx, target, ref, push)
        requests.need(BRANCH, push.to(requests.device))
        state["pushes"] = state.get("pushes", torch.zeros(ctx.batch_size, dtype=torch.long)) + push.long()

    def _reference_conditioning(self, ctx, target: Tensor, ref: Tensor, push: Tensor) -> Conditioning:
        """The `gfcg_ref` conditioning [B]: a reference caption's encoding where pushed, the
        sample's own conditioning elsewhere (those rows are not evaluated)."""
        cache: dict[str, Conditioning] = self.state(ctx).setdefault("encoded", {})
        rows = push.nonzero().flatten().tolist()
        if self._label_to_prompt is not None:
            texts = {i: str(self._label_to_prompt(int(ref[i]))) for i in rows}
        else:  # a row is pushed only where its prompt told the world its target
            texts = {i: ctx.kit.reference_prompt(ctx.prompts[i], int(target[i]), int(ref[i])) for i in rows}
        new = sorted({t for t in texts.values() if t not in cache})
        if new:
            enc = ctx.encode(new)
            for k, text in enumerate(new):
                cache[text] = enc.select([k])
        cond = ctx.conds["cond"]
        rows = [cache[texts[i]] if i in texts else cond.select([i]) for i in range(ctx.batch_size)]
        return Conditioning.cat(rows)

    def conditioning(self, ctx, branch: str, cond: Conditioning | None) -> Conditioning | None:
        if branch == BRANCH:
            return self.state(ctx)["cond_ref"]
        return cond

    def correct(self, ctx, x: Tensor, pred: Prediction, preds: BranchPredictions) -> Prediction:
        state = self.state(ctx)
        s = state.pop("pending", None)
        if s is not None and BRANCH in preds:
            present = preds.present(BRANCH)
            c, r = preds["cond"].as_kind(pred.kind), preds[BRANCH].as_kind(pred.kind)
            shape = (-1,) + (1,) * (pred.value.ndim - 1)
            rows, sv = present.view(shape), s.to(device=pred.value.device, dtype=pred.value.dtype).view(shape)
            pred = pred.replace(torch.where(rows, pred.value + sv * (c - r), pred.value))  # D + s_t (D_c - D_ref)
        state["x0"] = pred.x0.detach()
        return pred
