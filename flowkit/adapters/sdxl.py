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

    @property
    def output_class(self) -> type:
        from diffusers.pipelines.stable_diffusion_xl import (
            StableDiffusionXLPipelineOutput,
        )

        return StableDiffusionXLPipelineOutput

    def decode_full(self, x: Tensor, output_type: str, generator: Any = None):
        if output_type == "latent":
            return x.to(self.dtype), {}
        pipe = self.pipe
        vae = pipe.vae
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast
        if upcast:
            vae.to(dtype=torch.float32)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            c = x.shape[1]
            mean = torch.tensor(mean).view(1, c, 1, 1).to(x.device, x.dtype)
            std = torch.tensor(std).view(1, c, 1, 1).to(x.device, x.dtype)
            latents = x * std / vae.config.scaling_factor + mean
        else:
            latents = x / vae.config.scaling_factor
        try:
            image = vae_decode(pipe, latents)
        finally:
            if upcast:
                vae.to(dtype=torch.float16)
        if getattr(pipe, "watermark", None) is not None:
            image = pipe.watermark.apply_watermark(image)
        return self._postprocess(image, output_type), {}
