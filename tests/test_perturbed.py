"""Perturbed branches (flowkit.perturbation) through DiffusersGuider, against diffusers itself.

- PAG through flowkit on tiny SD and SDXL reproduces StableDiffusionPAGPipeline /
  StableDiffusionXLPAGPipeline latents (control: another perturbed layer misses by far);
- SLG on tiny SD3 (3 blocks): FlowKitPipeline with the pipeline's own `skip_guidance_layers`
  keywords reproduces StableDiffusion3Pipeline (controls: another skipped layer; the guider's
  stop not rounded to the pipeline's step rule);
- each perturbed branch (PAG, SEG, SLG, AutoGuidance) equals the network run under diffusers'
  own hooks (`prepare_models`) on the same input, on a UNet and on SD3's transformer;
- the perturbed branch runs in a forward of its own: a spy on the attention calls sees the
  perturbation only in a forward of that branch's rows, and the other branches' predictions
  equal those of a run without it (mutant: the perturbation applied to the batched forward);
- NFE per branch as predicted.
"""

from __future__ import annotations

import pytest
import torch
import tiny_pipes as tp
from diffusers import guiders
from diffusers.hooks import LayerSkipConfig
from flowkit.guidance import DiffusersGuider

import flowkit
from flowkit.attention.processors import FlowKitProcessor
from flowkit.pipelines import FlowKitPipeline

one_thread = tp.one_thread
MID = "mid_block.attentions.0.transformer_blocks"
UP = "up_blocks.0.attentions.0.transformer_blocks"
STEPS, SCALE, PAG_SCALE = 4, 5.0, 3.0


def pag(fqn):
    # the PAG pipelines perturb every step; diffusers' guider window for the perturbed condition is
    # start * N < step (exclusive), so every step is start = -1
    return DiffusersGuider(guiders.PerturbedAttentionGuidance(
        guidance_scale=SCALE, perturbed_guidance_scale=PAG_SCALE, perturbed_guidance_start=-1.0,
        perturbed_guidance_stop=1.0, perturbed_guidance_config=LayerSkipConfig(
            indices=[0], fqn=fqn, skip_attention=False, skip_attention_scores=True, skip_ff=False)))


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_pag_reproduces_the_diffusers_pag_pipeline(name):
    from diffusers import StableDiffusionPAGPipeline, StableDiffusionXLPAGPipeline

    pipe = tp.cached(name)
    cls = StableDiffusionPAGPipeline if name == "sd" else StableDiffusionXLPAGPipeline
    ref_pipe = cls(**pipe.components, pag_applied_layers=["mid"])
    ref_pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=STEPS, guidance_scale=SCALE, output_type="latent", **tp.SIZE)
    ref = ref_pipe(tp.PROMPTS, pag_scale=PAG_SCALE, generator=torch.Generator().manual_seed(3), **kw).images

    def ours(fqn):
        fk = FlowKitPipeline.from_pipe(pipe, guidance=[pag(fqn)])
        out = fk(tp.PROMPTS, generator=torch.Generator().manual_seed(3), **kw).images
        return out, fk.stats

    out, stats = ours(MID)
    assert tp.rel_err(out, ref) < tp.TOL
    assert stats.nfe == [3 * STEPS] * 2
    assert all(r.branches == {"cond": 2, "uncond": 2, "cond_skip": 2} for r in stats.steps)
    assert tp.rel_err(ours(UP)[0], ref) > 10 * tp.TOL  # control: another perturbed layer


def test_slg_through_the_dropin_reproduces_sd3_skip_guidance_layers():
    pipe = tp.cached("sd3-3layers")
    kw = dict(num_inference_steps=5, guidance_scale=4.0, skip_layer_guidance_scale=2.5,
              skip_layer_guidance_start=0.01, skip_layer_guidance_stop=0.7, output_type="latent", **tp.SIZE)

    def run(caller, layers=(1,), **over):
        args = {**kw, "skip_guidance_layers": list(layers), **over}
        return caller(tp.PROMPTS, generator=torch.Generator().manual_seed(4), **args).images

    ref = run(pipe)
    fk = FlowKitPipeline.from_pipe(pipe)
    assert tp.rel_err(run(fk), ref) < tp.TOL
    # the pipeline skips at steps i with 5 * 0.01 < i < 5 * 0.7: steps 1, 2, 3
    assert [sorted(r.branches) for r in fk.stats.steps] == [["cond", "uncond"]] + \
        [["cond", "cond_skip", "uncond"]] * 3 + [["cond", "uncond"]]
    assert fk.stats.nfe == [5 * 2 + 3] * 2
    assert tp.rel_err(run(fk, layers=(0,)), ref) > 10 * tp.TOL  # control: another skipped layer
    plain = FlowKitPipeline.from_pipe(pipe, guidance=[DiffusersGuider(guiders.SkipLayerGuidance(
        guidance_scale=4.0, skip_layer_guidance_scale=2.5, skip_layer_guidance_start=0.01,
        skip_layer_guidance_stop=0.7, skip_layer_guidance_layers=[1]))])
    assert tp.rel_err(run(plain, skip_guidance_layers=None), ref) > 10 * tp.TOL  # control: stop not rounded
    with pytest.raises(flowkit.errors.UnsupportedError, match="skip_guidance_layers"):
        run(plain)


def _first_branch(pipe, module, branch, monkeypatch):
    """flowkit's prediction of `branch` at the first step that evaluates it, with the state, time and conditioning it was made at."""
    seen = {}
    real = DiffusersGuider.combine

    def spy(self, ctx, preds):
        if branch in preds and not seen:
            seen.update(x=ctx.x.clone(), t=ctx.t.clone(), cond=ctx.conds["uncond" if branch.startswith("uncond")
                                                                            else "cond"],
                        value=preds[branch].value.clone(), denoiser=ctx.denoiser)
        return real(self, ctx, preds)

    monkeypatch.setattr(DiffusersGuider, "combine", spy)
    flowkit.sample(pipe, ["a red circle", "two blue squares"], guidance=[module], steps=3, seed=5,
                   output_type="latent", height=32, width=32)
    monkeypatch.undo()
    assert seen, f"no step evaluated branch {branch}"
    return seen


def _diffusers_hooks(g, network):
    """The guider's own hooks on `network` for its perturbed condition, as a modular pipeline
    applies them for that batch (`prepare_models` of its last condition); returns the cleanup."""
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.smoothed_energy_guidance_utils import _apply_smoothed_energy_guidance_hook

    g.set_state(1, 2, torch.tensor(500.0))
    if isinstance(g, guiders.SmoothedEnergyGuidance):  # its prepare_models never counts itself up
        for name, config in zip(g._seg_layer_hook_names, g.seg_guidance_config):
            _apply_smoothed_energy_guidance_hook(network, config, g.seg_blur_sigma, name=name)
        names = g._seg_layer_hook_names
    else:
        g._count_prepared = 1 if isinstance(g, guiders.AutoGuidance) else 2  # the perturbed batch is next
        g.prepare_models(network)
        names = getattr(g, "_auto_guidance_hook_names", None) or g._skip_layer_hook_names

    def cleanup():
        registry = HookRegistry.check_if_exists_or_initialize(network)
        for name in names:
            registry.remove_hook(name, recurse=True)

    return cleanup


HOOK_CASES = {
    # (diffusers' PAG guider cannot hook SD3's joint attention, whose processor its registry lacks)
    "pag-unet": ("sd", lambda: guiders.PerturbedAttentionGuidance(
        guidance_scale=3.0, perturbed_guidance_scale=2.0, perturbed_guidance_start=-1.0,
        perturbed_guidance_stop=1.0, perturbed_guidance_config={"indices": [0], "fqn": UP}), "cond_skip"),
    # (diffusers' `*_layers=[i]` builds configs with an int index its hooks cannot iterate: give configs)
    "seg-sd3": ("sd3-3layers", lambda: guiders.SmoothedEnergyGuidance(
        guidance_scale=3.0, seg_guidance_scale=2.0, seg_blur_sigma=1.5,
        seg_guidance_config={"indices": [1], "fqn": "auto"}), "cond_seg"),
    "seg-unet": ("sd", lambda: guiders.SmoothedEnergyGuidance(
        guidance_scale=3.0, seg_guidance_scale=2.0, seg_blur_sigma=1.5,
        seg_guidance_config={"indices": [0], "fqn": MID}), "cond_seg"),
    "slg-unet": ("sd", lambda: guiders.SkipLayerGuidance(
        guidance_scale=3.0, skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0, skip_layer_config={"indices": [0], "fqn": MID}),
        "cond_skip"),
    # (on SD3, diffusers' block-skip hook returns (hidden, encoder) where the joint block returns
    # (encoder, hidden); flowkit follows the block's order, as the SD3 pipeline's skip_layers does)
    "auto-unet": ("sd", lambda: guiders.AutoGuidance(
        guidance_scale=3.0, auto_guidance_config={"indices": [0], "fqn": UP}), "uncond_perturbed"),
}


@pytest.mark.parametrize("case", list(HOOK_CASES))
def test_a_perturbed_branch_equals_the_network_under_diffusers_own_hooks(case, monkeypatch):
    pipe_name, make, branch = HOOK_CASES[case]
    pipe = tp.cached(pipe_name)
    module = DiffusersGuider(make())
    seen = _first_branch(pipe, module, branch, monkeypatch)
    den = seen["denoiser"]
    network = den.network
    cleanup = _diffusers_hooks(make(), network)
    try:
        with torch.no_grad():
            ref = den(seen["x"], seen["t"], seen["cond"]).value
    finally:
        cleanup()
    with torch.no_grad():
        plain = den(seen["x"], seen["t"], seen["cond"]).value
    scale = float(ref.std())
    assert float((seen["value"] - ref).abs().max()) / scale < 1e-5
    assert float((plain - ref).abs().max()) / scale > 1e-3  # the perturbation changes the prediction


def test_the_perturbed_branch_runs_alone_and_leaves_the_other_rows_unchanged(monkeypatch):
    """Spy on the attention calls and their inputs: the perturbation is active only in forwards
    whose rows are the perturbed branch's; at step 0 the cond and uncond rows' attention inputs
    (q, k, v of every layer) and predictions equal those of plain CFG bit for bit. Mutants caught:
    the perturbation applied to the batched forward (sampling_loop hands every group the
    step's perturbation), the perturbed branch batched with the others (no forward of its own)."""
    pipe = flowkit.load("tiny")
    calls, inputs = [], {"pag": [], "cfg": []}
    run = ["pag"]
    real_attend = FlowKitProcessor.attend

    def attend(self, q, k, v, mask=None, cross=None):
        scope = self.controller.store.scope
        branches = [b for b, _ in scope.layout]
        calls.append((self.layer, branches, scope.perturbation is not None, q.shape[0]))
        if scope.step == 0 and "cond_skip" not in branches:
            inputs[run[0]].append((self.layer, branches, q.clone(), k.clone(), v.clone()))
        return real_attend(self, q, k, v, mask, cross)

    monkeypatch.setattr(FlowKitProcessor, "attend", attend)
    spec = (f'diffusers:name=PerturbedAttentionGuidance,guidance_scale=3,perturbed_guidance_scale=2,'
            f'perturbed_guidance_start=-1,perturbed_guidance_stop=1,perturbed_guidance_config=\'{{"indices": [0], "fqn": "{MID}"}}\'')
    seen = {}

    real = DiffusersGuider.combine

    def spy(self, ctx, preds):
        if ctx.step == 0:
            seen.update({k: preds[k].value.clone() for k in preds})
        return real(self, ctx, preds)

    monkeypatch.setattr(DiffusersGuider, "combine", spy)
    out = flowkit.sample(pipe, ["a red circle", "two blue squares"], guidance=spec, steps=2, seed=2,
                         output_type="latent")
    perturbed = [c for c in calls if c[2]]
    assert perturbed and all(c[1] == ["cond_skip"] and c[3] == 2 for c in perturbed)
    assert all(c[1] == ["cond", "uncond"] and c[3] == 4 for c in calls if not c[2])
    assert out.stats.attention["identity"] == 2  # one self-attention layer, once per step
    cfg = {}

    def spy_cfg(self, ctx, preds):
        if ctx.step == 0:
            cfg.update({k: preds[k].value.clone() for k in preds})
        return preds["cond"].replace(preds["uncond"].value + 3 * (preds["cond"].value - preds["uncond"].value))

    from flowkit.guidance import CFG

    monkeypatch.setattr(CFG, "combine", spy_cfg)
    run[0] = "cfg"
    flowkit.sample(pipe, ["a red circle", "two blue squares"], guidance="cfg:scale=3", steps=2, seed=2,
                   output_type="latent")
    # the same attention calls on the cond/uncond rows, with the same inputs
    assert [(c[0], c[1]) for c in inputs["pag"]] == [(c[0], c[1]) for c in inputs["cfg"]] and inputs["cfg"]
    for (layer, _, *ours), (_, _, *theirs) in zip(inputs["pag"], inputs["cfg"]):
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs)), layer
    for k in ("cond", "uncond"):
        assert torch.equal(seen[k], cfg[k]), k
    assert float((seen["cond_skip"] - seen["cond"]).abs().max()) > 1e-4


def test_a_skipped_block_keeps_its_diffusers_hook_after_the_slg_run():
    """A diffusers hook (HookRegistry / ModelHook, as first-block cache or group offload install
    on a block's instance `forward`) on SD3's `transformer_blocks.1` survives an SLG run that
    skips that block: a later plain CFG run still goes through it, once per forward of the block.
    Mutant caught: `perturbing` deleting the instance `forward` in its cleanup (the old
    `del module.forward`, which threw the hook's forward away: the hook then fires 2 times
    instead of 5 already in the SLG run, and never in the CFG run)."""
    from diffusers.hooks import HookRegistry, ModelHook

    class Counter(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Counter.calls += 1
            return args, kwargs

    pipe = tp.cached("sd3-3layers")
    block = pipe.transformer.transformer_blocks[1]
    registry = HookRegistry.check_if_exists_or_initialize(block)
    registry.register_hook(Counter(), "flowkit_test_counter")
    try:
        kw = dict(num_inference_steps=5, guidance_scale=4.0, output_type="latent", **tp.SIZE)
        fk = FlowKitPipeline.from_pipe(pipe)
        fk(tp.PROMPTS, generator=torch.Generator().manual_seed(4), skip_guidance_layers=[1],
           skip_layer_guidance_scale=2.5, skip_layer_guidance_start=0.01, skip_layer_guidance_stop=0.7, **kw)
        assert sorted(fk.stats.steps[1].branches) == ["cond", "cond_skip", "uncond"]  # block 1 was skipped
        assert Counter.calls == 5  # the batched cond/uncond forwards went through the hook, the skipped ones not
        Counter.calls = 0
        fk = FlowKitPipeline.from_pipe(pipe)
        fk(tp.PROMPTS, generator=torch.Generator().manual_seed(4), **kw)
        assert fk.stats.nfe == [5 * 2] * 2
        assert Counter.calls == 5, "the block's diffusers hook no longer runs after the SLG run"
    finally:
        registry.remove_hook("flowkit_test_counter")


def test_attention_counts_leave_out_the_layers_of_skipped_blocks(monkeypatch):
    """`stats.attention` counts the calls each forward made: under SLG the layers inside a
    skipped block make none, so the counted total equals the calls a spy on the processors
    sees (mutant caught: every installed processor counted once per forward, skipped blocks
    included, which over-counts by the skipped block's layers in each perturbed forward)."""
    seen = []
    real_attend = FlowKitProcessor.attend

    def attend(self, q, k, v, mask=None, cross=None):
        seen.append(self.layer)
        return real_attend(self, q, k, v, mask, cross)

    monkeypatch.setattr(FlowKitProcessor, "attend", attend)
    pipe = tp.cached("sd3-3layers")
    fk = FlowKitPipeline.from_pipe(pipe)
    fk(tp.PROMPTS, generator=torch.Generator().manual_seed(4), skip_guidance_layers=[1],
       skip_layer_guidance_scale=2.5, skip_layer_guidance_start=0.01, skip_layer_guidance_stop=0.7,
       num_inference_steps=5, guidance_scale=4.0, output_type="latent", **tp.SIZE)
    skip_forwards = sum(1 for r in fk.stats.steps if "cond_skip" in r.branches)
    assert skip_forwards > 0
    assert sum(fk.stats.attention.values()) == len(seen)
