"""The drop-in as a thin wrapper: components, to(), dtype, offload, LoRA, output classes,
flowkit.load of local diffusers folders."""

import pytest
import torch

import flowkit
import tiny_pipes as tp
from flowkit.pipelines import FlowKitPipeline
from tiny_pipes import one_thread  # noqa: F401  (autouse fixture)


def test_components_and_settings_pass_through():
    pipe = tp.cached("sd")
    fk = FlowKitPipeline.from_pipe(pipe, sampler="heun")
    assert fk.unet is pipe.unet and fk.vae is pipe.vae and fk.components.keys() == pipe.components.keys()
    assert fk.to("cpu") is fk and fk.dtype == torch.float32 and fk.device.type == "cpu"
    assert fk.stats is None
    other = tp.build("sd")
    fk2 = FlowKitPipeline.from_pipe(other)
    fk2.scheduler = tp.sd_scheduler("trailing")  # setting a component sets it on the wrapped pipeline
    assert other.scheduler.config.timestep_spacing == "trailing"


def test_output_classes_and_tuple_form():
    from diffusers.pipelines.flux import FluxPipelineOutput
    from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

    fk = FlowKitPipeline.from_pipe(tp.cached("sd"))
    out = fk("a red cat", num_inference_steps=2, **tp.SIZE)
    assert isinstance(out, StableDiffusionPipelineOutput) and out.images[0].size == (32, 32)
    assert out.nsfw_content_detected is None
    images, nsfw = fk("a red cat", num_inference_steps=2, output_type="np", return_dict=False, **tp.SIZE)
    assert images.shape == (1, 32, 32, 3) and nsfw is None
    out = FlowKitPipeline.from_pipe(tp.cached("flux"))("a red cat", num_inference_steps=2, output_type="pt",
                                                       max_sequence_length=32, **tp.SIZE)
    assert isinstance(out, FluxPipelineOutput) and out.images.shape == (1, 3, 32, 32)


def test_num_images_per_prompt_and_one_generator_for_the_batch():
    pipe = tp.cached("sd3")
    kw = dict(num_inference_steps=3, num_images_per_prompt=2, output_type="latent", max_sequence_length=16,
              **tp.SIZE)
    ref = pipe(tp.PROMPTS, generator=torch.Generator().manual_seed(1), **kw).images
    fk = FlowKitPipeline.from_pipe(pipe)
    ours = fk(tp.PROMPTS, generator=torch.Generator().manual_seed(1), **kw).images
    assert ours.shape == (4, 4, 16, 16) and tp.rel_err(ours, ref) < tp.TOL
    ref = pipe(tp.PROMPTS, generator=tp.gens(4), **kw).images
    assert tp.rel_err(fk(tp.PROMPTS, generator=tp.gens(4), **kw).images, ref) < tp.TOL


def test_lora_behaves_the_same_through_the_wrapper():
    from peft import LoraConfig

    pipe = tp.build("sd")
    with torch.random.fork_rng():
        torch.manual_seed(7)
        pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                         target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    kw = dict(num_inference_steps=3, guidance_scale=5.0, output_type="latent", **tp.SIZE)

    def run(caller, scale):
        return caller(tp.PROMPTS, generator=torch.Generator().manual_seed(2),
                      cross_attention_kwargs={"scale": scale}, **kw).images

    fk = FlowKitPipeline.from_pipe(pipe)
    ref, ref0 = run(pipe, 0.5), run(pipe, 0.0)
    assert tp.rel_err(ref, ref0) > 10 * tp.TOL  # the LoRA changes the result
    assert tp.rel_err(run(fk, 0.5), ref) < tp.TOL
    assert tp.rel_err(run(fk, 0.0), ref0) < tp.TOL


@pytest.mark.parametrize("name", ["sd", "sdxl", "sd3", "flux"])
def test_bf16_pipelines_run_on_cpu(name):
    pipe = tp.build(name).to(torch.bfloat16)
    fk = FlowKitPipeline.from_pipe(pipe)
    out = fk(tp.PROMPTS, num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0),
             **tp.SIZE).images
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert out.shape[0] == 2
    img = fk("a red cat", num_inference_steps=1, output_type="np", **tp.SIZE).images
    assert img.shape == (1, 32, 32, 3) and bool(((img >= 0) & (img <= 1)).all())


def test_model_cpu_offload_through_the_wrapper():
    pipe = tp.build("sd")
    kw = dict(num_inference_steps=2, output_type="latent", **tp.SIZE)
    ref = FlowKitPipeline.from_pipe(pipe)("a red cat", generator=torch.Generator().manual_seed(0), **kw).images
    fk = FlowKitPipeline.from_pipe(pipe)
    try:
        fk.enable_model_cpu_offload(device="cpu")
    except Exception as e:  # accelerate's offload needs an accelerator to offload to
        pytest.skip(f"enable_model_cpu_offload does not work on this CPU-only machine: {type(e).__name__}: {e}")
    out = fk("a red cat", generator=torch.Generator().manual_seed(0), **kw).images
    assert tp.rel_err(out, ref) < tp.TOL


@pytest.mark.parametrize("name", ["sd", "flux"])
def test_load_a_local_diffusers_folder(name, tmp_path):
    pipe = tp.cached(name)
    pipe.save_pretrained(tmp_path)
    loaded = flowkit.load(tmp_path)
    assert type(loaded) is type(pipe)
    kw = dict(steps=2, seed=0, output_type="latent", **tp.SIZE)
    a = flowkit.sample(loaded, "a red cat", **kw).images
    b = flowkit.sample(pipe, "a red cat", **kw).images
    assert tp.rel_err(a, b) < tp.TOL
