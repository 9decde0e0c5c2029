"""Adapter for SDXL (`StableDiffusionXLPipeline`): the SD UNet plus added conditioning.

Besides the token embeddings of both CLIP encoders (`prompt`/`prompt_2`), the UNet takes
the pooled embedding of the second (`text_embeds`) and the size/crop micro-conditioning
(`time_ids` = original size + crop top-left + target size), made by the pipeline's own
`_get_add_time_ids`. The negative branch takes `negative_original_size` etc. when given;
unlike diffusers, they are paired with their own rows for batches of several prompts.
Decoding follows the pipeline (fp16 VAE upcast, latents mean/std, watermark).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from flowkit.adapters.latent import vae_decode
from flowkit.adapters.sd import SDAdapter
from flowkit.conditioning import Conditioning
from flowkit.registry import MODEL_FAMILIES

__all__ = ["SDXLAdapter"]


@MODEL_FAMILIES.register
class SDXLAdapter(SDAdapter):
    family = "sdxl"
    title = "SDXL (StableDiffusionXLPipeline)"

    @classmethod
    def matches(cls, pipe: Any) -> bool:
        from diffusers import StableDiffusionXLPipeline

        return isinstance(pipe, StableDiffusionXLPipeline)

    default_guidance_scale = 5.0

    def default_size(self) -> tuple[int, int]:
        s = int(self.pipe.default_sample_size) * self.vae_scale_factor
        return s, s

    def encode_call(self, kw: Mapping[str, Any], need_uncond: bool, num_images_per_prompt: int):
        pipe = self.pipe
        pos, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompt=kw.get("prompt"), prompt_2=kw.get("prompt_2"), device=self.device,
            num_images_per_prompt=num_images_per_prompt, do_classifier_free_guidance=need_uncond,
            negative_prompt=kw.get("negative_prompt"), negative_prompt_2=kw.get("negative_prompt_2"),
            prompt_embeds=kw.get("prompt_embeds"), negative_prompt_embeds=kw.get("negative_prompt_embeds"),
            pooled_prompt_embeds=kw.get("pooled_prompt_embeds"),
            negative_pooled_prompt_embeds=kw.get("negative_pooled_prompt_embeds"),
            lora_scale=self.lora_scale(kw, "cross_attention_kwargs"), clip_skip=kw.get("clip_skip"))
        h, w = kw.get("height") or self.default_size()[0], kw.get("width") or self.default_size()[1]
        if pipe.text_encoder_2 is None:
            proj = int(pooled.shape[-1])
        else:
            proj = pipe.text_encoder_2.config.projection_dim
        original = tuple(kw.get("original_size") or (h, w))
        target = tuple(kw.get("target_size") or (h, w))
        crops = tuple(kw.get("crops_coords_top_left") or (0, 0))
        time_ids = pipe._get_add_time_ids(original, crops, target, dtype=pos.dtype, text_encoder_projection_dim=proj)
        neg_orig, neg_target = kw.get("negative_original_size"), kw.get("negative_target_size")
        if neg_orig is not None and neg_target is not None:
            neg_crops = tuple(kw.get("negative_crops_coords_top_left") or (0, 0))
            neg_time_ids = pipe._get_add_time_ids(tuple(neg_orig), neg_crops, tuple(neg_target), dtype=pos.dtype,
                                                  text_encoder_projection_dim=proj)
        else:
            neg_time_ids = time_ids
        n = pos.shape[0]
        out = {"cond": self._cond(pos, pooled, time_ids, n)}
        if need_uncond:
            out["uncond"] = self._cond(neg, neg_pooled, neg_time_ids, n)
        return out

    def _cond(self, embeds: Tensor, pooled: Tensor, time_ids: Tensor, n: int) -> Conditioning:
        dev = embeds.device
        return Conditioning({"encoder_hidden_states": embeds, "text_embeds": pooled.to(dev),
                             "time_ids": time_ids.to(dev).repeat(n, 1)})

    def clip_tokenizers(self) -> list[Any]:
        """Both CLIP tokenizers tokenize the prompt (as `encode_prompt`, without `tokenizer` on a refiner)."""
        return [t for t in (self.pipe.tokenizer, self.pipe.tokenizer_2) if t is not None]

    @property
    def output_class(self) -> type:
        from diffusers.pipelines.stable_diffusion_xl import (
            StableDiffusionXLPipelineOutput,
        )

        return StableDiffusionXLPipelineOutput

    def vae_input(self, x: Tensor) -> Tensor:
        """x * latents_std / scaling_factor + latents_mean where the VAE config has them, else x / scaling_factor."""
        cfg = self.pipe.vae.config
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is None or std is None:
            return x / cfg.scaling_factor
        c = x.shape[1]
        mean = torch.tensor(mean).view(1, c, 1, 1).to(x.device, x.dtype)
        std = torch.tensor(std).view(1, c, 1, 1).to(x.device, x.dtype)
        return x * std / cfg.scaling_factor + mean

    def to_pixels(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """As the pipeline decodes: an fp16 VAE with `force_upcast` runs in float32. Without a graph
        the VAE is upcast in place and cast back, as diffusers does; with one, float32 copies of
        its weights are used instead, since casting back would change the weights the graph saved."""
        pipe, vae = self.pipe, self.pipe.vae
        latents = self.vae_input(x)
        if not (vae.dtype == torch.float16 and vae.config.force_upcast):
            return vae_decode(pipe, latents, generator)
        if torch.is_grad_enabled() and latents.requires_grad:
            return _decode_with_float32_copies(pipe, latents, generator)
        vae.to(dtype=torch.float32)
        try:
            return vae_decode(pipe, latents, generator)
        finally:
            vae.to(dtype=torch.float16)

    def decode_full(self, x: Tensor, output_type: str, generator: Any = None):
        if output_type == "latent":
            return x.to(self.dtype), {}
        pipe = self.pipe
        image = self.to_pixels(x)
        if getattr(pipe, "watermark", None) is not None:
            image = pipe.watermark.apply_watermark(image)
        return self._postprocess(image, output_type), {}


class _Decoder(torch.nn.Module):
    """`vae_decode` as a module, so that `functional_call` can run it on other weights."""

    def __init__(self, pipe: Any, generator: torch.Generator | None):
        super().__init__()
        self.vae = pipe.vae
        self._pipe, self._generator = pipe, generator

    def forward(self, latents: Tensor) -> Tensor:
        return vae_decode(self._pipe, latents, self._generator)


def _decode_with_float32_copies(pipe: Any, latents: Tensor, generator: torch.Generator | None) -> Tensor:
    """`vae_decode` on float32 copies of the VAE's weights (differentiable; the VAE is left as it is)."""
    decoder = _Decoder(pipe, generator)
    tensors = dict(decoder.named_parameters())
    tensors.update(decoder.named_buffers())
    tensors = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    return torch.func.functional_call(decoder, tensors, (latents,))

