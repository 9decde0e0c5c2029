"""The shapes text-to-image pipeline: a pixel-space flow-matching UNet on MiniLM tokens.

A regular diffusers `DiffusionPipeline` (unet, text_encoder, tokenizer, scheduler) with a
plain Euler + classifier-free-guidance loop in `__call__`, so it behaves like any diffusers
pipeline and `FlowKitPipeline` can wrap it. It takes diffusers' SD LoRA loader
(`load_lora_weights`, `save_lora_weights`) for its UNet, as SD pipelines do. Velocity prediction on the linear path
(x_t = (1 - t) x0 + t noise, v = noise - x0), model timestep 1000 t.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from diffusers import (
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    UNet2DConditionModel,
)
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from flowkit.text import MAX_LENGTH

__all__ = ["ShapesPipeline", "shapes_unet_config", "shapes_scheduler"]


def shapes_unet_config(size: str = "base") -> dict:
    """UNet2DConditionModel config of the shapes model (`base`) or a tiny test variant."""
    channels = {"base": (64, 128, 128), "tiny": (32, 32, 32)}[size]
    return dict(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=channels,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=384,
        attention_head_dim=4,
        norm_num_groups=32 if size == "base" else 8,
    )


def shapes_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


class ShapesPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    """Text-to-image pipeline of the shapes world (pixel space, 32 px native)."""

    model_cpu_offload_seq = "text_encoder->unet"
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(self, unet: UNet2DConditionModel, text_encoder, tokenizer,
                 scheduler: FlowMatchEulerDiscreteScheduler):
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)

    @property
    def default_sample_size(self) -> int:
        return int(self.unet.config.sample_size)

    @torch.no_grad()
    def encode_prompt(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None,
                      do_classifier_free_guidance: bool = True, num_images_per_prompt: int = 1,
                      device: torch.device | None = None):
        """(prompt_embeds, negative_prompt_embeds) of shape [B * n, 16, 384]."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        device = device or self._execution_device

        def enc(texts):
            batch = self.tokenizer(texts, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                                   return_tensors="pt")
            batch = {k: v.to(device) for k, v in batch.items()}
            emb = self.text_encoder(**batch).last_hidden_state
            return emb.to(self.unet.dtype).repeat_interleave(num_images_per_prompt, dim=0)

        pos = enc(prompts)
        neg = None
        if do_classifier_free_guidance:
            if negative_prompt is None:
                negs = [""] * len(prompts)
            else:
                negs = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
                if len(negs) != len(prompts):
                    raise ValueError(f"{len(negs)} negative prompts for {len(prompts)} prompts: give one per prompt")
            neg = enc(negs)
        return pos, neg

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 30,
        sigmas: list[float] | None = None,
        guidance_scale: float = 4.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
    ):
        height = height or self.default_sample_size
        width = width or self.default_sample_size
        factor = 2 ** (len(self.unet.config.block_out_channels) - 1)
        if height % factor or width % factor:
            raise ValueError(f"height and width must be multiples of {factor}, got {height}x{width}")
        device = self._execution_device
        do_cfg = guidance_scale > 1.0
        if prompt_embeds is None:
            if prompt is None:
                raise ValueError("give a prompt or prompt_embeds")
            prompt_embeds, negative_prompt_embeds = self.encode_prompt(
                prompt, negative_prompt, do_cfg, num_images_per_prompt, device)
        elif do_cfg and negative_prompt_embeds is None:
            negative_prompt_embeds = self.encode_prompt([""] * (prompt_embeds.shape[0] // num_images_per_prompt),
                                                        None, False, num_images_per_prompt, device)[0]
        batch = prompt_embeds.shape[0]
        shape = (batch, self.unet.config.in_channels, height, width)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        latents = latents.to(device=device, dtype=torch.float32)

        if sigmas is None:
            sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        self.scheduler.set_timesteps(sigmas=sigmas, device=device)
        timesteps = self.scheduler.timesteps
        context = torch.cat([negative_prompt_embeds, prompt_embeds]) if do_cfg else prompt_embeds
        self._num_timesteps = len(timesteps)
        for i, t in enumerate(self.progress_bar(timesteps)):
            model_in = torch.cat([latents] * 2) if do_cfg else latents
            v = self.unet(model_in.to(self.unet.dtype), t.expand(model_in.shape[0]),
                          encoder_hidden_states=context).sample.float()
            if do_cfg:
                v_uncond, v_cond = v.chunk(2)
                v = v_uncond + guidance_scale * (v_cond - v_uncond)
            latents = self.scheduler.step(v, t, latents, return_dict=False)[0]
            if callback_on_step_end is not None:
                local = {"latents": latents, "prompt_embeds": prompt_embeds,
                         "negative_prompt_embeds": negative_prompt_embeds}
                outs = callback_on_step_end(self, i, t, {k: local[k] for k in callback_on_step_end_tensor_inputs})
                latents = outs.pop("latents", latents)
        self.maybe_free_model_hooks()
        if output_type == "latent":
            images = latents
        else:
            images = ((latents.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
