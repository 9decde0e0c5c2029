"""Bad input to the drop-in: each a flowkit ValueError whose message says what to change."""

import pytest
import torch

import flowkit
import tiny_pipes as tp
from flowkit.errors import InputError, UnsupportedError
from flowkit.pipelines import FlowKitPipeline
from tiny_pipes import one_thread  # noqa: F401  (autouse fixture)


@pytest.fixture(scope="module")
def fk():
    return FlowKitPipeline.from_pipe(tp.cached("sd"))


def test_unknown_keyword_names_the_closest(fk):
    with pytest.raises(InputError, match="'num_inference_step'.*did you mean 'num_inference_steps'"):
        fk("a red cat", num_inference_step=2)
    with pytest.raises(InputError, match="negative_prompt"):
        fk("a red cat", negativ_prompt="blurry")
    with pytest.raises(UnsupportedError, match="callback_on_step_end"):
        fk("a red cat", callback_steps=2)


def test_generator_list_must_have_one_per_image(fk):
    with pytest.raises(InputError, match="3 generators for 4 images \\(2 prompts x 2 images per prompt\\)"):
        fk(tp.PROMPTS, num_images_per_prompt=2, generator=tp.gens(3), num_inference_steps=1, output_type="latent")


def test_refused_keywords_name_the_flowkit_way_unless_left_at_default(fk):
    with pytest.raises(UnsupportedError, match="ddim:eta"):
        fk("a red cat", eta=0.5, num_inference_steps=1)
    with pytest.raises(UnsupportedError, match="sigmas="):
        fk("a red cat", timesteps=[999, 500], num_inference_steps=None)
    out = fk("a red cat", eta=0.0, num_inference_steps=1, output_type="latent", **tp.SIZE)  # the default is fine
    assert out.images.shape == (1, 4, 16, 16)
    stacked = FlowKitPipeline.from_pipe(tp.cached("sd"), guidance="cfg:scale=3")
    with pytest.raises(UnsupportedError, match="guidance_rescale"):
        stacked("a red cat", guidance_rescale=0.7, num_inference_steps=1)


def test_unknown_family_and_other_pipeline_kinds_are_refused():
    from diffusers import StableDiffusionImg2ImgPipeline

    with pytest.raises(UnsupportedError, match="supports text-to-image.*SDXL \\(StableDiffusionXLPipeline\\)"):
        FlowKitPipeline.from_pipe(object())
    img2img = StableDiffusionImg2ImgPipeline(**tp.cached("sd").components)
    with pytest.raises(UnsupportedError, match="image-to-image.*text-to-image"):
        FlowKitPipeline.from_pipe(img2img)
    with pytest.raises(UnsupportedError, match="image-to-image"):
        flowkit.sample(img2img, "a red cat", steps=1)


def test_a_folder_of_an_unsupported_family_is_refused(tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=2, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedError, match="DDPMPipeline.*supports text-to-image"):
        flowkit.load(tmp_path)


def test_bad_latents_shape_and_pipeline_sampler_with_flowkit_grid():
    fk = FlowKitPipeline.from_pipe(tp.cached("sd"))
    with pytest.raises(InputError, match="latents must have shape"):
        fk("a red cat", latents=torch.zeros(1, 4, 8, 8), num_inference_steps=1, **tp.SIZE)
    from flowkit.samplers import Euler

    fk = FlowKitPipeline.from_pipe(tp.cached("sd"), sampler=Euler(grid="shift:2"))
    with pytest.raises(UnsupportedError, match="drop the flowkit grid"):
        fk("a red cat", sigmas=[14.6, 1.0, 0.0], **tp.SIZE)


def _junk_latents(pipe, step, timestep, tensors):
    return {"latents": "junk"}


@pytest.mark.parametrize("kwargs, words", [
    (dict(num_inference_steps=0), "num_inference_steps must be an integer from 1 to 10000, got 0"),
    (dict(num_inference_steps=2.5), "num_inference_steps must be an integer from 1 to 10000, got 2.5"),
    (dict(num_inference_steps=None), "num_inference_steps must be an integer"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt must be an integer from 1 to 100000, got 0"),
    (dict(prompt=[]), "prompt is empty"),
    (dict(prompt=5), "prompt must be a string or a list of strings, got an int"),
    (dict(prompt=None), "prompt must be a string or a list of strings, got None"),
    (dict(generator="seed"), "generator must be a torch.Generator or a list of them"),
    (dict(generator=[torch.Generator(), 3]), "got an int"),
    (dict(guidance_scale="7"), "guidance_scale must be a finite number"),
    (dict(callback_on_step_end=_junk_latents, callback_on_step_end_tensor_inputs=["latents"]),
     "the callback returned latents as a str: return a tensor of shape (1, 4, 16, 16)"),
    (dict(callback_on_step_end=lambda *a: [1]), "callback_on_step_end must return a dict"),
    # audit of #22: the size and step limits of flowkit.sample; mutant caught: no height/width
    # check in `_check_call` (16384 x 8 started sampling), or no count check of sigmas=
    (dict(height=16384, width=8), "height must be an integer from 1 to 8192, got 16384"),
    (dict(height=16, width=8200), "width must be an integer from 1 to 8192, got 8200"),
    (dict(height=0), "height must be an integer from 1 to 8192, got 0"),
    (dict(sigmas=[1.0] * 20001, num_inference_steps=None),
     "the number of sigmas must be an integer from 1 to 10000, got 20001"),
    (dict(sigmas=[], num_inference_steps=None), "the number of sigmas must be an integer from 1 to 10000, got 0"),
    (dict(sigmas=0.5, num_inference_steps=None), "sigmas must be a list of numbers, one per step, got a float"),
])
def test_call_arguments_are_checked_as_the_wrapped_pipeline_checks_them(fk, kwargs, words):
    """Item 7: the drop-in ran 1 step for num_inference_steps=0 and 2 for 2.5, made one image for
    num_images_per_prompt=0, and fk([]), fk(5), generator="seed" and a callback returning
    {"latents": "junk"} ended in IndexError / TypeError / AttributeError. Each is now an
    InputError that says what to give. Audit of #22: height/width and the number of sigmas
    are held to flowkit.sample's limits (16384 x 8 and 20001 sigmas started sampling)."""
    kwargs = {"prompt": "a red cat", "num_inference_steps": 1, "output_type": "latent", **tp.SIZE, **kwargs}
    with pytest.raises(InputError) as info:
        fk(**kwargs)
    assert words in str(info.value), str(info.value)
