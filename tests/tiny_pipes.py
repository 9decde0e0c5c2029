"""Tiny random-weight SD, SDXL, SD3 and FLUX pipelines built from config, offline.

Sizes follow diffusers' own fast tests (`get_dummy_components`): a few channels, one or
two layers, 32-dim text encoders. Tokenizers are built in memory: a character-level CLIP
BPE (byte alphabet, no merges) and a character-level T5 unigram model, so nothing is
downloaded. Every component is seeded, float32 and in eval mode; `build(name)` caches
nothing, `cached(name)` shares one pipeline per test session.
"""

from __future__ import annotations

import contextlib
import string
from functools import lru_cache
from unittest import mock

import pytest
import torch

CLIP_MAX_LENGTH = 16


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run far faster on one intra-op thread on a busy machine (no spin-waiting);
    import this fixture into a test module to use it there."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def clip_tokenizer():
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    alphabet = sorted(ByteLevel.alphabet())
    for c in alphabet:
        vocab[c] = len(vocab)
    for c in alphabet:
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_MAX_LENGTH)


def t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in string.ascii_lowercase + string.digits]
    pieces += [("\u2581" + c, -2.5) for c in string.ascii_lowercase]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def _seeded(seed: int, make):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return make().eval()


def clip_text(seed: int, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
                         layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2, vocab_size=600,
                         max_position_embeddings=CLIP_MAX_LENGTH, hidden_act="gelu", projection_dim=32)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return _seeded(seed, lambda: cls(cfg))


def t5_encoder(seed: int):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=80, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return _seeded(seed, lambda: T5EncoderModel(cfg))


def vae(seed: int, latent_channels: int = 4, flow: bool = False):
    from diffusers import AutoencoderKL

    extra = dict(shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False) \
        if flow else {}
    return _seeded(seed, lambda: AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=2, sample_size=32, **extra))


def sd_scheduler(spacing: str = "leading", prediction_type: str = "epsilon"):
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  steps_offset=1, timestep_spacing=spacing, prediction_type=prediction_type)


def sd(spacing: str = "leading", prediction_type: str = "epsilon"):
    """SD 1.x shape: UNet2DConditionModel with 32-dim cross attention, latents 4 x 16 x 16 at 32 px."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    unet = _seeded(0, lambda: UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=2, attention_head_dim=2))
    pipe = StableDiffusionPipeline(vae=vae(1), text_encoder=clip_text(2), tokenizer=clip_tokenizer(), unet=unet,
                                   scheduler=sd_scheduler(spacing, prediction_type), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl():
    """SDXL shape: two CLIP encoders (64-dim cross attention), pooled text embeds and time ids."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    unet = _seeded(0, lambda: UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=2))
    pipe = StableDiffusionXLPipeline(vae=vae(1), text_encoder=clip_text(2), text_encoder_2=clip_text(3, projection=True),
                                     tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(), unet=unet,
                                     scheduler=sd_scheduler("leading"), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flow_scheduler(**config):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**config)


def sd3(num_layers: int = 1):
    """SD3 shape: SD3Transformer2DModel (patch 2), two CLIP encoders with projections and a T5."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    transformer = _seeded(0, lambda: SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=num_layers, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4))
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=flow_scheduler(shift=3.0), vae=vae(1, flow=True),
        text_encoder=clip_text(2, projection=True), tokenizer=clip_tokenizer(),
        text_encoder_2=clip_text(3, projection=True), tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5_encoder(4), tokenizer_3=t5_tokenizer())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux(guidance_embeds: bool = False):
    """FLUX shape: FluxTransformer2DModel on packed 2x2 latents (16 channels), CLIP pooled + T5 text."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    transformer = _seeded(0, lambda: FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 4, 8)))
    scheduler = flow_scheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                               base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae(1, flow=True), text_encoder=clip_text(2),
                        tokenizer=clip_tokenizer(), text_encoder_2=t5_encoder(4), tokenizer_2=t5_tokenizer(),
                        transformer=transformer)
    pipe.default_sample_size = 16  # 32 px by default (the real model's 128 would be 256 px)
    pipe.set_progress_bar_config(disable=True)
    return pipe


BUILDERS = {
    "sd": sd,
    "sd-linspace": lambda: sd("linspace"),
    "sd-v": lambda: sd("trailing", "v_prediction"),
    "sdxl": sdxl,
    "sd3": sd3,
    "sd3-3layers": lambda: sd3(num_layers=3),
    "flux": flux,
    "flux-dev": lambda: flux(guidance_embeds=True),
}


def build(name: str):
    return BUILDERS[name]()


@lru_cache(maxsize=None)
def cached(name: str):
    """One shared pipeline per name for the whole test session (tests must not change it)."""
    return build(name)


# -- parity helpers --------------------------------------------------------------------------
PROMPTS = ["a red cat", "two blue squares"]
SIZE = dict(height=32, width=32)
TOL = 1e-4  # parity tolerance, relative to the reference latents' standard deviation


def gens(n: int = 2, seed: int = 11) -> list:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| in units of the reference latents' standard deviation."""
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float((ours.float() - ref.float()).abs().max() / ref.float().std())


def check_sample_parity(pipe, ref: torch.Tensor, steps: int, scale: float) -> None:
    """`flowkit.sample` with euler + CFG reproduces `ref` (the pipeline's latents from `gens()`),
    its NFE shows flowkit's loop ran, and each negative control misses the same tolerance."""
    import flowkit
    from flowkit.guidance import CFG

    def ours(**kw):
        args = dict(steps=steps, guidance=[CFG(scale=scale)], generators=gens(), output_type="latent", **SIZE)
        args.update(kw)
        return flowkit.sample(pipe, PROMPTS, **args)

    out = ours()
    assert rel_err(out.images, ref) < TOL
    assert out.stats.nfe == [2 * steps] * 2
    assert rel_err(ours(guidance=[CFG(scale=scale - 1)]).images, ref) > 10 * TOL  # wrong scale
    assert rel_err(ours(steps=steps - 1).images, ref) > 10 * TOL  # one step fewer
    assert rel_err(ours(grid="shift:2").images, ref) > 10 * TOL  # wrong shift


def check_dropin_parity(pipe, ref: torch.Tensor, ours, steps: int, scale: float):
    """`ours(wrapper, **call_kw) -> latents` through `FlowKitPipeline` reproduces `ref`, with
    NFE and negative controls (wrong scale, one step fewer, wrong grid). Returns the wrapper."""
    from flowkit.pipelines import FlowKitPipeline
    from flowkit.samplers import Euler

    fk = FlowKitPipeline.from_pipe(pipe)
    assert rel_err(ours(fk), ref) < TOL
    assert fk.stats.nfe == [2 * steps] * 2  # flowkit's loop ran: cond + uncond per step
    assert rel_err(ours(fk, guidance_scale=scale - 1), ref) > 10 * TOL
    assert rel_err(ours(fk, num_inference_steps=steps - 1), ref) > 10 * TOL
    wrong_grid = FlowKitPipeline.from_pipe(pipe, sampler=Euler(grid="shift:2"))
    assert rel_err(ours(wrong_grid), ref) > 10 * TOL
    return fk


@contextlib.contextmanager
def memoised_load():
    """Patch flowkit.loading.load so that each model name is loaded once (a CLI test loads
    its model on every call); yields the mock."""
    import flowkit.loading

    real, cache = flowkit.loading.load, {}

    def load(name, **kwargs):
        if name not in cache:
            cache[name] = real(name, **kwargs)
        return cache[name]

    with mock.patch("flowkit.loading.load", side_effect=load) as patched:
        yield patched
