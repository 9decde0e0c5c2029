"""Adapter for Stable Diffusion 1.x / 2.x (`StableDiffusionPipeline`, UNet2DConditionModel).

The UNet predicts noise ("epsilon") or v ("v_prediction") on the DDPM schedule of the
pipeline's scheduler config (`DDPMPath.from_scheduler_config`); prompts go through the
pipeline's own `encode_prompt` (LoRA scale and clip_skip included); decoding divides by
the VAE's scaling factor and runs the pipeline's safety checker, as the pipeline does.
Guidance-distilled UNets (LCM, `time_cond_proj_dim`) are refused.
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor

from flowkit.adapters.latent import LatentAdapter, agreed_positions
from flowkit.conditioning import Conditioning
from flowkit.denoiser import UNetDenoiser
from flowkit.errors import UnsupportedError
from flowkit.paths.ddpm import DDPMPath
from flowkit.registry import MODEL_FAMILIES

__all__ = ["SDAdapter"]


@MODEL_FAMILIES.register
class SDAdapter(LatentAdapter):
    family = "sd"
    title = "SD 1.x/2.x (StableDiffusionPipeline)"

    @classmethod
    def matches(cls, pipe: Any) -> bool:
        from diffusers import StableDiffusionPipeline

        return isinstance(pipe, StableDiffusionPipeline)

    default_guidance_scale = 7.5

    def __init__(self, pipe: Any):
        super().__init__(pipe)
        unet = pipe.unet
        if getattr(unet.config, "time_cond_proj_dim", None) is not None:
            raise UnsupportedError("this UNet embeds the guidance scale (LCM, time_cond_proj_dim); flowkit's "
                                   "drop-in supports text-to-image UNets with classifier-free guidance")
        config = pipe.scheduler.config
        kind = config.get("prediction_type", "epsilon")
        if kind not in ("epsilon", "v_prediction", "sample"):
            raise UnsupportedError(f"prediction_type {kind!r} is not supported; use epsilon, v_prediction or sample")
        self._denoiser = UNetDenoiser(unet, DDPMPath.from_scheduler_config(config), kind)

    @property
    def denoiser(self) -> UNetDenoiser:
        return self._denoiser

    def default_size(self) -> tuple[int, int]:
        s = self.pipe.unet.config.sample_size
        h, w = (s, s) if isinstance(s, int) else (s[0], s[1])
        return int(h) * self.vae_scale_factor, int(w) * self.vae_scale_factor

    def factor(self) -> int:
        return 8  # as the pipeline's check_inputs

    def encode_call(self, kw: Mapping[str, Any], need_uncond: bool, num_images_per_prompt: int):
        pos, neg = self.pipe.encode_prompt(
            kw.get("prompt"), self.device, num_images_per_prompt, need_uncond, kw.get("negative_prompt"),
            prompt_embeds=kw.get("prompt_embeds"), negative_prompt_embeds=kw.get("negative_prompt_embeds"),
            lora_scale=self.lora_scale(kw, "cross_attention_kwargs"), clip_skip=kw.get("clip_skip"))
        out = {"cond": Conditioning({"encoder_hidden_states": pos})}
        if need_uncond:
            out["uncond"] = Conditioning({"encoder_hidden_states": neg})
        return out

    # -- words as token positions: the CLIP sequence (77 tokens, BOS first) -------------------
    def clip_tokenizers(self) -> list[Any]:
        """The tokenizers whose token sequences the UNet attends to (joined feature-wise)."""
        return [self.pipe.tokenizer]

    def text_length(self, max_sequence_length: int | None = None) -> int:
        self.t5_length(max_sequence_length)  # refuses one
        return int(self.clip_tokenizers()[0].model_max_length)

    def word_tokens(self, text: str, span: tuple[int, int], max_sequence_length: int | None = None) -> tuple[int, ...]:
        return agreed_positions(self.clip_tokenizers(), text, span, self.text_length(max_sequence_length))

    @property
    def output_class(self) -> type:
        from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

        return StableDiffusionPipelineOutput

    def decode_full(self, x: Tensor, output_type: str, generator: Any = None):
        if output_type == "latent":
            return x.to(self.dtype), {"nsfw_content_detected": None}
        pipe = self.pipe
        image = self.to_pixels(x, generator=generator)
        image, nsfw = pipe.run_safety_checker(image, self.device, self.dtype)
        denormalize = [True] * image.shape[0] if nsfw is None else [not n for n in nsfw]
        return self._postprocess(image, output_type, do_denormalize=denormalize), {"nsfw_content_detected": nsfw}
