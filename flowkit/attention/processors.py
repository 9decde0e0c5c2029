"""flowkit's attention processors for diffusers' Attention modules.

Each one does what the diffusers processor it replaces does (projections, norms, rotary
embedding, output projections), and runs the attention itself, q/k/v as [B, H, L, D], on
the kernel its controller chose before the forward (`controller.fn`), or, on a captured
call (`capture` set for this forward), through the controller's eager capture path: the
reference kernel, which also yields the probabilities; in a perturbed forward (`identity`,
`blur` set), through the controller's eager perturbation paths. A processor reads plain
attributes only, so a compiled network traces it without a graph break. The replaced processors:

- `AttnProcessor2_0` (UNet2DConditionModel: SD 1.x/2.x, SDXL, the shapes model) ->
  `UNetAttnProcessor`: self-attention (attn1) and cross-attention to the text (attn2);
- `JointAttnProcessor2_0` (SD3) -> `JointAttnProcessor`: image tokens then text tokens in
  one softmax; the cross-attention map is the image-query x text-key block;
- `FluxAttnProcessor` (FLUX) -> `FluxAttnProcessor`: text tokens then image tokens, with
  the rotary embedding; double-stream blocks are capturable, single-stream ones (which see
  one concatenated sequence) are not.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from flowkit.attention.control import AttentionController

__all__ = ["FlowKitProcessor", "UNetAttnProcessor", "JointAttnProcessor", "FluxAttnProcessor", "replacements"]


class FlowKitProcessor:
    """Base: the layer's name, its controller, and the processor it replaced (restored on uninstall)."""

    def __init__(self, layer: str, controller: "AttentionController", original: Any):
        self.layer = layer
        self.controller = controller
        self.original = original
        self.capture = False  # set by the controller for a forward that captures this layer's map
        self.identity = False  # set for a perturbed forward that makes this layer's attention the identity (PAG)
        self.blur = False  # set for a perturbed forward that blurs this layer's queries (SEG)

    @staticmethod
    def capturable(attn: Any) -> bool:
        """Whether this module's calls have a cross-attention map."""
        return False

    def query(self, query: Tensor) -> Tensor:
        """The projected queries [B, L, C] as the controller hands them on (blurred in a SEG forward)."""
        if self.blur:
            return self.controller.blur_query(query)
        return query

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None,
               cross: tuple[slice, slice] | None = None) -> Tensor:
        """[B, H, Lq, D] attention output; `cross`: (image-query rows, text-key columns) of a map;
        the values themselves in a perturbed forward that makes this layer's attention the identity."""
        if self.identity and q.shape[2] == v.shape[2]:
            return self.controller.identity_call(v)
        if self.capture and cross is not None:
            return self.controller.capture_call(self.layer, q, k, v, mask, cross)
        return self.controller.fn(q, k, v, mask)


class UNetAttnProcessor(FlowKitProcessor):
    """Replaces diffusers' AttnProcessor2_0 (UNet self- and cross-attention)."""

    @staticmethod
    def capturable(attn: Any) -> bool:
        return bool(getattr(attn, "is_cross_attention", False))

    def __call__(self, attn: Any, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, *args: Any, **kwargs: Any) -> Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image = hidden_states.ndim == 4
        if image:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)  # [B, HW, C]
        cross = encoder_hidden_states is not None
        batch, length = (encoder_hidden_states if cross else hidden_states).shape[:2]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = self.query(attn.to_q(hidden_states))
        context = hidden_states
        if cross:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states
        key, value = attn.to_k(context), attn.to_v(context)
        d = key.shape[-1] // attn.heads
        q, k, v = (t.view(batch, -1, attn.heads, d).transpose(1, 2) for t in (query, key, value))  # [B, H, L, d]
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        out = self.attend(q, k, v, attention_mask, (slice(None), slice(None)) if cross else None)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * d).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if image:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class JointAttnProcessor(FlowKitProcessor):
    """Replaces diffusers' JointAttnProcessor2_0 (SD3): one softmax over [image; text] tokens."""

    @staticmethod
    def capturable(attn: Any) -> bool:
        return getattr(attn, "add_q_proj", None) is not None

    def __call__(self, attn: Any, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        batch, n_img = hidden_states.shape[:2]
        d = attn.to_k.out_features // attn.heads

        def heads(t: Tensor) -> Tensor:
            return t.view(batch, -1, attn.heads, d).transpose(1, 2)  # [B, H, L, d]

        q = heads(self.query(attn.to_q(hidden_states)))
        k, v = heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        joint = encoder_hidden_states is not None
        if joint:
            e = encoder_hidden_states
            eq, ek, ev = heads(attn.add_q_proj(e)), heads(attn.add_k_proj(e)), heads(attn.add_v_proj(e))
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            q, k, v = (torch.cat([a, b], dim=2) for a, b in ((q, eq), (k, ek), (v, ev)))
        # as diffusers' processor: no mask
        out = self.attend(q, k, v, None, (slice(0, n_img), slice(n_img, None)) if joint else None)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * d).to(q.dtype)
        text = None
        if joint:
            out, text = out[:, :n_img], out[:, n_img:]
            if not attn.context_pre_only:
                text = attn.to_add_out(text)
        out = attn.to_out[1](attn.to_out[0](out))
        return (out, text) if joint else out


class FluxAttnProcessor(FlowKitProcessor):
    """Replaces diffusers' FluxAttnProcessor: [text; image] tokens, rotary embedding, RMS norms."""

    @staticmethod
    def capturable(attn: Any) -> bool:
        return getattr(attn, "added_kv_proj_dim", None) is not None

    def __init__(self, layer: str, controller: "AttentionController", original: Any):
        from diffusers.models.embeddings import apply_rotary_emb

        super().__init__(layer, controller, original)
        self.rotary = apply_rotary_emb  # imported here, not in the (traced) call

    def __call__(self, attn: Any, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, image_rotary_emb: Any = None) -> Any:
        apply_rotary_emb = self.rotary
        has_text = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if attn.fused_projections:
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
            if has_text:
                eq, ek, ev = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = self.query(attn.to_q(hidden_states)), attn.to_k(hidden_states), attn.to_v(hidden_states)
            if has_text:
                e = encoder_hidden_states
                eq, ek, ev = attn.add_q_proj(e), attn.add_k_proj(e), attn.add_v_proj(e)
        q, k, v = (t.unflatten(-1, (-1, attn.head_dim)) for t in (q, k, v))  # [B, L, H, d]
        q, k = attn.norm_q(q), attn.norm_k(k)
        n_txt = 0
        if has_text:
            eq, ek, ev = (t.unflatten(-1, (-1, attn.head_dim)) for t in (eq, ek, ev))
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            n_txt = encoder_hidden_states.shape[1]
            q, k, v = (torch.cat([a, b], dim=1) for a, b in ((eq, q), (ek, k), (ev, v)))
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        cross = (slice(n_txt, None), slice(0, n_txt)) if n_txt else None
        out = self.attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attention_mask, cross)
        out = out.transpose(1, 2).flatten(2, 3).to(q.dtype)  # [B, L, H*d]
        if encoder_hidden_states is not None:
            n = encoder_hidden_states.shape[1]
            text, out = out.split_with_sizes([n, out.shape[1] - n], dim=1)
            out = attn.to_out[1](attn.to_out[0](out.contiguous()))
            return out, attn.to_add_out(text.contiguous())
        return out


@lru_cache(maxsize=1)
def replacements() -> dict[type, type[FlowKitProcessor]]:
    """diffusers processor class -> flowkit processor. Exact classes only: subclasses and other
    processors (LoRA, IP-Adapter, a user's own) are kept as they are."""
    from diffusers.models.attention_processor import (
        AttnProcessor2_0,
        JointAttnProcessor2_0,
    )

    out: dict[type, type[FlowKitProcessor]] = {AttnProcessor2_0: UNetAttnProcessor,
                                               JointAttnProcessor2_0: JointAttnProcessor}
    try:
        from diffusers.models.transformers.transformer_flux import (
            FluxAttnProcessor as DiffusersFlux,
        )
    except ImportError:  # a diffusers without the FluxAttention module: FLUX keeps its processors
        return out
    out[DiffusersFlux] = FluxAttnProcessor
    return out
