"""Adapter for Stable Diffusion 3 (`StableDiffusion3Pipeline`, SD3Transformer2DModel).

A rectified-flow transformer (velocity prediction on the linear path, timestep = 1000 t)
conditioned on the joint CLIP + T5 token embeddings (`prompt`, `prompt_2`, `prompt_3`) and
the pooled CLIP projections. The time grid is the pipeline's FlowMatchEulerDiscreteScheduler
(static shift, or a dynamic one from the image's token count). Decoding: latents /
scaling_factor + shift_factor through the VAE.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from flowkit.adapters.latent import LatentAdapter, agreed_positions
from flowkit.conditioning import Conditioning
from flowkit.denoiser import TransformerDenoiser
from flowkit.errors import InputError
from flowkit.paths.linear import LinearPath
from flowkit.registry import MODEL_FAMILIES
from flowkit.tokens import word_positions

__all__ = ["SD3Adapter", "SD3Denoiser"]


class SD3Denoiser(TransformerDenoiser):
    """SD3Transformer2DModel: velocity from latents [N, C, H, W], timesteps, tokens and pooled projections."""

    @property
    def latent_multiple(self) -> int:
        """Latent sizes must be multiples of the patch size (the transformer patches any such size)."""
        return int(self.transformer.config.patch_size)

    def forward(self, x_native: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
        return self.transformer(
            hidden_states=x_native.to(self.dtype),
            timestep=timestep.to(device=x_native.device, dtype=torch.float32),
            encoder_hidden_states=cond["encoder_hidden_states"].to(self.dtype),
            pooled_projections=cond["pooled_projections"].to(self.dtype),
            joint_attention_kwargs=self.joint_attention_kwargs,
            return_dict=False,
        )[0]


@MODEL_FAMILIES.register
class SD3Adapter(LatentAdapter):
    family = "sd3"
    title = "SD3 (StableDiffusion3Pipeline)"

    @classmethod
    def matches(cls, pipe: Any) -> bool:
        from diffusers import StableDiffusion3Pipeline

        return isinstance(pipe, StableDiffusion3Pipeline)

    default_guidance_scale = 7.0
    network = "transformer"
    attention_kwargs_name = "joint_attention_kwargs"
    max_sequence_length = 256  # the pipeline call's default T5 length

    def __init__(self, pipe: Any):
        super().__init__(pipe)
        n = int(pipe.scheduler.config.get("num_train_timesteps", 1000))
        self._denoiser = SD3Denoiser(pipe.transformer, LinearPath(n))

    @property
    def denoiser(self) -> SD3Denoiser:
        return self._denoiser

    def default_size(self) -> tuple[int, int]:
        s = int(self.pipe.default_sample_size) * self.vae_scale_factor
        return s, s

    def factor(self) -> int:
        return self.vae_scale_factor * int(self.net.config.patch_size)

    def image_seq_len(self, height: int, width: int) -> int:
        p = int(self.net.config.patch_size)
        f = self.vae_scale_factor
        return (height // f // p) * (width // f // p)

    def encode_call(self, kw: Mapping[str, Any], need_uncond: bool, num_images_per_prompt: int):
        pos, neg, pooled, neg_pooled = self.pipe.encode_prompt(
            prompt=kw.get("prompt"), prompt_2=kw.get("prompt_2"), prompt_3=kw.get("prompt_3"),
            negative_prompt=kw.get("negative_prompt"), negative_prompt_2=kw.get("negative_prompt_2"),
            negative_prompt_3=kw.get("negative_prompt_3"), do_classifier_free_guidance=need_uncond,
            prompt_embeds=kw.get("prompt_embeds"), negative_prompt_embeds=kw.get("negative_prompt_embeds"),
            pooled_prompt_embeds=kw.get("pooled_prompt_embeds"),
            negative_pooled_prompt_embeds=kw.get("negative_pooled_prompt_embeds"), device=self.device,
            clip_skip=kw.get("clip_skip"), num_images_per_prompt=num_images_per_prompt,
            max_sequence_length=kw.get("max_sequence_length", self.max_sequence_length),
            lora_scale=self.lora_scale(kw, "joint_attention_kwargs"))
        out = {"cond": Conditioning({"encoder_hidden_states": pos, "pooled_projections": pooled})}
        if need_uncond:
            out["uncond"] = Conditioning({"encoder_hidden_states": neg, "pooled_projections": neg_pooled})
        return out

    # -- words as token positions: the joint sequence [CLIP (77) | T5 (max_sequence_length)] -----
    def _lengths(self, max_sequence_length: int | None) -> tuple[int, int]:
        return int(self.pipe.tokenizer_max_length), self.t5_length(max_sequence_length)

    def text_length(self, max_sequence_length: int | None = None) -> int:
        return sum(self._lengths(max_sequence_length))

    def word_tokens(self, text: str, span: tuple[int, int], max_sequence_length: int | None = None) -> tuple[int, ...]:
        """The word's CLIP positions p (both CLIP encoders, joined feature-wise) and its T5 positions
        q + CLIP length: `encode_prompt` concatenates the CLIP and T5 tokens along the sequence. A word
        past CLIP's 77 tokens keeps its T5 positions; without a T5 encoder its part is zeros."""
        clip_len, t5_len = self._lengths(max_sequence_length)
        pipe = self.pipe
        clip = agreed_positions([pipe.tokenizer, pipe.tokenizer_2], text, span, clip_len, required=False)
        t5 = ()
        if pipe.text_encoder_3 is not None and pipe.tokenizer_3 is not None:
            t5 = tuple(clip_len + q for q in word_positions(pipe.tokenizer_3, text, span, t5_len, required=False))
        if not clip and not t5:
            raise InputError(f"the word {text[span[0]:span[1]]!r} of the prompt {text!r} falls beyond the text "
                             f"encoders' {clip_len} CLIP and {t5_len} T5 tokens: shorten the prompt")
        return clip + t5

    @property
    def output_class(self) -> type:
        from diffusers.pipelines.stable_diffusion_3 import (
            StableDiffusion3PipelineOutput,
        )

        return StableDiffusion3PipelineOutput

    def vae_input(self, x: Tensor) -> Tensor:
        cfg = self.pipe.vae.config
        return x / cfg.scaling_factor + cfg.shift_factor

    def decode_full(self, x: Tensor, output_type: str, generator: Any = None):
        if output_type == "latent":
            return x.to(self.dtype), {}
        return self._postprocess(self.to_pixels(x), output_type), {}

