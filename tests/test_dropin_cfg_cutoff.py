"""diffusers' CFG cut-off callbacks through the drop-in, and flowkit's `cfg:stop=` window.

diffusers' `SDCFGCutoffCallback(cutoff_step_ratio=r)` (and its SDXL / SD3 variants) sets
`pipe._guidance_scale = 0` at the end of step int(N*r): CFG runs int(N*r) + 1 steps, then
the conditional branch alone. `FlowKitPipeline` honours the callback, and `CFG(stop=k/N)`
(the `adaptive` bench's fixed-cutoff arm) is the same run with k = int(N*r) + 1 guided steps.
"""

import pytest
import torch

import tiny_pipes as tp
from tiny_pipes import one_thread  # noqa: F401  (autouse fixture)
from flowkit.errors import UnsupportedError
from flowkit.pipelines import FlowKitPipeline

STEPS, SCALE = 4, 5.0
PROMPT = tp.PROMPTS[:1]  # diffusers' cut-off callbacks keep prompt_embeds[-1:]: one prompt per call


def _callback(name: str, ratio: float):
    from diffusers.callbacks import SD3CFGCutoffCallback, SDCFGCutoffCallback, SDXLCFGCutoffCallback

    return {"sd": SDCFGCutoffCallback, "sdxl": SDXLCFGCutoffCallback, "sd3": SD3CFGCutoffCallback}[name](
        cutoff_step_ratio=ratio)


def _run(caller, callback=None, **kw):
    args = dict(num_inference_steps=STEPS, guidance_scale=SCALE, generator=torch.Generator().manual_seed(3),
                output_type="latent", **tp.SIZE)
    if callback is not None:
        args.update(callback_on_step_end=callback, callback_on_step_end_tensor_inputs=callback.tensor_inputs)
    args.update(kw)
    return caller(PROMPT, **args).images


@pytest.mark.parametrize("name", ["sd", "sdxl", "sd3"])
@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_dropin_honours_diffusers_cfg_cutoff_callbacks(name, ratio):
    pipe = tp.cached(name)
    ref = _run(pipe, _callback(name, ratio))
    fk = FlowKitPipeline.from_pipe(pipe)
    out = _run(fk, _callback(name, ratio))
    guided = int(STEPS * ratio) + 1
    assert tp.rel_err(out, ref) < tp.TOL
    assert fk.stats.nfe == [2 * guided + (STEPS - guided)]  # the uncond branch stops after the cut-off
    # negative control: a cut-off one step away (0.25 <-> 0.5) changes the latents; early
    # steps matter most, so the run without the callback is a control at the early cut-off only
    assert tp.rel_err(_run(fk, _callback(name, 0.75 - ratio)), ref) > 10 * tp.TOL
    if ratio == 0.25:
        assert tp.rel_err(_run(fk), ref) > 10 * tp.TOL


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_cfg_stop_window_is_the_cutoff_callback(ratio):
    import flowkit
    from flowkit.guidance import CFG

    pipe = tp.cached("sd")
    ref = _run(pipe, _callback("sd", ratio))
    guided = int(STEPS * ratio) + 1

    def ours(stop):
        return flowkit.sample(pipe, PROMPT, steps=STEPS, guidance=[CFG(scale=SCALE, stop=stop)],
                              generators=[torch.Generator().manual_seed(3)], output_type="latent", **tp.SIZE)

    out = ours(guided / STEPS)
    assert tp.rel_err(out.images, ref) < tp.TOL and out.stats.nfe == [STEPS + guided]
    assert tp.rel_err(ours((guided - 1) / STEPS).images, ref) > 10 * tp.TOL  # one guided step fewer


def test_a_callback_may_change_the_scale_mid_run_as_in_diffusers():
    pipe = tp.cached("sd")

    def to_two(p, i, t, tensors):
        if i == 1:
            p._guidance_scale = 2.0
        return {}

    to_two.tensor_inputs = []
    ref = _run(pipe, to_two)
    fk = FlowKitPipeline.from_pipe(pipe)
    assert tp.rel_err(_run(fk, to_two), ref) < tp.TOL and fk.stats.nfe == [2 * STEPS]
    assert tp.rel_err(_run(fk), ref) > 10 * tp.TOL  # the scale change matters


def test_a_callback_that_changes_the_conditioning_is_refused():
    fk = FlowKitPipeline.from_pipe(tp.cached("sd"))

    def doubles(p, i, t, tensors):
        return {"prompt_embeds": tensors["prompt_embeds"] * 2}

    doubles.tensor_inputs = ["prompt_embeds"]
    with pytest.raises(UnsupportedError, match="changed 'prompt_embeds'"):
        _run(fk, doubles)
