"""Adapter for FLUX.1 (`FluxPipeline`, FluxTransformer2DModel).

flowkit keeps FLUX latents unpacked, [C, H/f, W/f] (f = the VAE's scale factor), so
samplers and guidance see an image-shaped state; the denoiser packs them into 2x2 patch
tokens [H/2f * W/2f, 4C] with their image ids for the transformer and unpacks the
velocity. Text: CLIP's pooled embedding plus T5 tokens (`prompt`, `prompt_2`) with their
text ids. Guidance-distilled models (`guidance_embeds=True`, FLUX.1-dev) take
`guidance_scale` as an embedding, a per-row conditioning tensor `guidance`; classifier-free
guidance runs on a negative-prompt branch (diffusers' `true_cfg_scale`). The grid is the
pipeline's: sigmas linspace(1, 1/N, N) dynamically shifted by the image's token count.

Difference from diffusers: a height or width that is not a multiple of the packing factor
(2 f) is an error here; diffusers silently rounds the size down.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from flowkit.adapters.base import check_multiple
from flowkit.adapters.latent import LatentAdapter
from flowkit.conditioning import Conditioning
from flowkit.denoiser import TransformerDenoiser
from flowkit.errors import InputError
from flowkit.paths.linear import LinearPath
from flowkit.registry import MODEL_FAMILIES
from flowkit.schedulers import frame_scale
from flowkit.tokens import word_positions

__all__ = ["FluxAdapter", "FluxDenoiser", "pack", "unpack", "image_ids"]


def pack(x: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, H/2 * W/2, 4C]: 2x2 patches as tokens (FluxPipeline._pack_latents)."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: Tensor, h: int, w: int) -> Tensor:
    """[B, H/2 * W/2, 4C] -> [B, C, H, W], the inverse of `pack`."""
    b, _, d = tokens.shape
    x = tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """[h/2 * w/2, 3] token positions (0, row, column) of packed latents of size h x w."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h // 2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxDenoiser(TransformerDenoiser):
    """FluxTransformer2DModel on unpacked latents [N, C, H, W] (packing done here, with the
    image ids of the latents' own size, so any even size runs: bottleneck stages)."""

    latent_multiple = 2  # 2x2 packing

    def forward(self, x_native: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
        _, _, h, w = x_native.shape
        dev, dt = x_native.device, self.dtype
        guidance = cond.get("guidance")
        out = self.transformer(
            hidden_states=pack(x_native.to(dt)),
            timestep=timestep.to(device=dev, dtype=dt) / 1000,  # as the pipeline: timestep in the latents' dtype
            guidance=None if guidance is None else guidance.to(device=dev, dtype=torch.float32),
            pooled_projections=cond["pooled_projections"].to(dt),
            encoder_hidden_states=cond["encoder_hidden_states"].to(dt),
            txt_ids=cond.shared["txt_ids"],
            img_ids=image_ids(h, w, dev, dt),
            joint_attention_kwargs=self.joint_attention_kwargs,
            return_dict=False,
        )[0]
        return unpack(out, h, w)


@MODEL_FAMILIES.register
class FluxAdapter(LatentAdapter):
    family = "flux"
    title = "FLUX (FluxPipeline)"

    @classmethod
    def matches(cls, pipe: Any) -> bool:
        from diffusers import FluxPipeline

        return isinstance(pipe, FluxPipeline)

    default_guidance_scale = 1.0  # no CFG by default, as the pipeline (true_cfg_scale = 1)
    network = "transformer"
    attention_kwargs_name = "joint_attention_kwargs"
    pass_sigmas = True
    max_sequence_length = 512  # the pipeline call's default T5 length

    def __init__(self, pipe: Any, *, embedded_guidance: float = 3.5):
        """`embedded_guidance`: the distilled guidance scale of guidance_embeds=True models
        (the pipeline's `guidance_scale`, 3.5 by default) when sampling with `flowkit.sample`."""
        super().__init__(pipe)
        n = int(pipe.scheduler.config.get("num_train_timesteps", 1000))
        self._denoiser = FluxDenoiser(pipe.transformer, LinearPath(n))
        self.embedded_guidance = float(embedded_guidance)

    @property
    def denoiser(self) -> FluxDenoiser:
        return self._denoiser

    @property
    def guidance_embeds(self) -> bool:
        return bool(getattr(self.net.config, "guidance_embeds", False))

    def default_size(self) -> tuple[int, int]:
        s = int(self.pipe.default_sample_size) * self.vae_scale_factor
        return s, s

    def factor(self) -> int:
        return 2 * self.vae_scale_factor

    def latent_channels(self) -> int:
        return int(self.net.config.in_channels) // 4

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        f = self.factor()
        if isinstance(height, int) and isinstance(width, int) and (height % f or width % f):
            raise InputError(
                f"FLUX packs latents in 2x2 patches, so height and width must be multiples of {f}, got "
                f"{height}x{width} (diffusers would silently round down to "
                f"{height // f * f}x{width // f * f}; flowkit asks you to choose)")
        check_multiple(height, width, f, self.family)
        return super().latent_shape(height, width)

    def image_seq_len(self, height: int, width: int) -> int:
        f = self.factor()
        return (height // f) * (width // f)

    def encode_call(self, kw: Mapping[str, Any], need_uncond: bool, num_images_per_prompt: int):
        pipe = self.pipe
        msl = kw.get("max_sequence_length", self.max_sequence_length)
        lora = self.lora_scale(kw, "joint_attention_kwargs")
        pos, pooled, txt_ids = pipe.encode_prompt(
            prompt=kw.get("prompt"), prompt_2=kw.get("prompt_2"), prompt_embeds=kw.get("prompt_embeds"),
            pooled_prompt_embeds=kw.get("pooled_prompt_embeds"), device=self.device,
            num_images_per_prompt=num_images_per_prompt, max_sequence_length=msl, lora_scale=lora)
        scale = kw.get("guidance_scale", self.embedded_guidance)
        out = {"cond": self._cond(pos, pooled, txt_ids, scale)}
        if need_uncond:
            neg_embeds = kw.get("negative_prompt_embeds")
            negative, negative_2 = kw.get("negative_prompt"), kw.get("negative_prompt_2")
            batch = pos.shape[0] // num_images_per_prompt
            if negative is None and neg_embeds is None:  # CFG without a negative prompt: the empty one
                negative = ""
            if isinstance(negative, str):  # one negative prompt for every prompt
                negative = [negative] * batch
            if isinstance(negative_2, str):
                negative_2 = [negative_2] * batch
            neg, neg_pooled, neg_ids = pipe.encode_prompt(
                prompt=negative, prompt_2=negative_2, prompt_embeds=neg_embeds,
                pooled_prompt_embeds=kw.get("negative_pooled_prompt_embeds"), device=self.device,
                num_images_per_prompt=num_images_per_prompt, max_sequence_length=msl, lora_scale=lora)
            if neg.shape != pos.shape:
                raise InputError(f"the negative prompt's embeddings {list(neg.shape)} must have the prompt's shape "
                                 f"{list(pos.shape)}: encode both with the same max_sequence_length")
            out["uncond"] = self._cond(neg, neg_pooled, neg_ids, scale)
        return out

    def _cond(self, embeds: Tensor, pooled: Tensor, txt_ids: Tensor, scale: float) -> Conditioning:
        tensors = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        if self.guidance_embeds:
            tensors["guidance"] = torch.full((embeds.shape[0],), float(scale), device=embeds.device,
                                             dtype=torch.float32)
        return Conditioning(tensors, {"txt_ids": txt_ids})

    # -- words as token positions: the T5 sequence (CLIP gives only the pooled embedding) ------
    def text_length(self, max_sequence_length: int | None = None) -> int:
        return self.t5_length(max_sequence_length)

    def word_tokens(self, text: str, span: tuple[int, int], max_sequence_length: int | None = None) -> tuple[int, ...]:
        return word_positions(self.pipe.tokenizer_2, text, span, self.text_length(max_sequence_length))

    # -- latents as the pipeline holds them: packed ------------------------------------------
    # (noise is drawn unpacked, as the pipeline draws it before packing)
    def noise_from_latents(self, latents: Tensor, height: int, width: int) -> Tensor:
        c, h, w = self.latent_shape(height, width)
        if latents.ndim != 3 or tuple(latents.shape[1:]) != (h * w // 4, 4 * c):
            raise InputError(f"FLUX latents are packed: shape [batch, {h * w // 4}, {4 * c}] for {height}x{width}, "
                             f"got {list(latents.shape)}")
        return unpack(latents, h, w)

    def to_pipeline_latents(self, x: Tensor, t: float, frame: str) -> Tensor:
        return pack(x * frame_scale(frame, t))

    def from_pipeline_latents(self, latents: Tensor, like: Tensor, t: float, frame: str) -> Tensor:
        _, _, h, w = like.shape
        return unpack(latents, h, w) / frame_scale(frame, t)

    @property
    def output_class(self) -> type:
        from diffusers.pipelines.flux import FluxPipelineOutput

        return FluxPipelineOutput

    def vae_input(self, x: Tensor) -> Tensor:
        """Unpacked latents [B, C, h, w] (flowkit's FLUX layout) -> x / scaling_factor + shift_factor."""
        if x.ndim != 4:
            raise InputError(f"FLUX latents go to the VAE unpacked, [batch, C, h, w], got {list(x.shape)}: "
                             "unpack packed latents with flowkit.adapters.flux.unpack(tokens, h, w)")
        cfg = self.pipe.vae.config
        return x / cfg.scaling_factor + cfg.shift_factor

    def decode_full(self, x: Tensor, output_type: str, generator: Any = None):
        if output_type == "latent":
            return pack(x).to(self.dtype), {}
        return self._postprocess(self.to_pixels(x), output_type), {}

