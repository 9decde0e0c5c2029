"""diffusers' twelve guiders through `DiffusersGuider` (flowkit.guidance.diffusers_guider).

Each guider, run by flowkit on the tiny shapes model for 6 steps, gives at every step exactly
what the same guider, called directly with its own `set_state` / `prepare_inputs` /
`forward` on the same branch predictions, gives (to 1e-6): windows, step state and momentum
are exercised (start/stop inside the run, APG momentum, CFG-Zero*'s zero-init step, APG-mix's
switch). Mutants caught: the wrapper not following the run's step (`set_state` skipped:
windows and zero-init wrong), re-creating its guider every step (momentum lost), mapping a
condition to the wrong branch (cond/uncond swapped, the perturbed branch taken for cond);
negative control: the same guider at a wrong scale misses by far.
"""

from __future__ import annotations

import json

import pytest
import torch
import tiny_pipes
from flowkit.guidance import DiffusersGuider

import flowkit
from flowkit.errors import SpecError, UnsupportedError

one_thread = tiny_pipes.one_thread
STEPS = 6
MID = "mid_block.attentions.0.transformer_blocks"
PROMPTS = ["a red circle", "two blue squares"]
CASES = {
    "ClassifierFreeGuidance": dict(guidance_scale=4.0, guidance_rescale=0.3, start=0.2),
    "ClassifierFreeZeroStarGuidance": dict(guidance_scale=4.0, zero_init_steps=1),
    "AdaptiveProjectedGuidance": dict(guidance_scale=4.0, adaptive_projected_guidance_momentum=-0.5,
                                      adaptive_projected_guidance_rescale=2.0, eta=0.5),
    "AdaptiveProjectedMixGuidance": dict(guidance_scale=3.0, adaptive_projected_guidance_scale=5.0,
                                         adaptive_projected_guidance_start_step=2,
                                         adaptive_projected_guidance_rescale=2.0),
    "AutoGuidance": dict(guidance_scale=3.0, auto_guidance_config={"indices": [0], "fqn": MID}, stop=0.7),
    "FrequencyDecoupledGuidance": dict(guidance_scales=[5.0, 2.0], parallel_weights=0.5),
    "MagnitudeAwareGuidance": dict(guidance_scale=5.0, alpha=2.0),
    "PerturbedAttentionGuidance": dict(guidance_scale=3.0, perturbed_guidance_scale=2.0, perturbed_guidance_start=0.2,
                                       perturbed_guidance_stop=0.8,
                                       perturbed_guidance_config={"indices": [0], "fqn": MID}),
    "SkipLayerGuidance": dict(guidance_scale=3.0, skip_layer_guidance_scale=2.0, skip_layer_guidance_start=0.1,
                              skip_layer_guidance_stop=0.9, skip_layer_config={"indices": [0], "fqn": MID}),
    "SmoothedEnergyGuidance": dict(guidance_scale=3.0, seg_guidance_scale=2.0, seg_blur_sigma=2.0,
                                   seg_guidance_config={"indices": [0], "fqn": MID}),
    "TangentialClassifierFreeGuidance": dict(guidance_scale=4.0),
    "LTX2Guidance": dict(guidance_scale=4.0, guidance_rescale=0.2),
}
# the condition each identifier names, as flowkit branches (fixed here, not read from the wrapper)
BRANCH = {"pred_cond": "cond", "pred_uncond": "uncond", "pred_cond_skip": "cond_skip", "pred_cond_seg": "cond_seg"}
SCALE_KEY = {"FrequencyDecoupledGuidance": "guidance_scales"}


@pytest.fixture(scope="module")
def shapes():
    return flowkit.load("tiny")


def guider(name, **over):
    from diffusers import guiders

    kw = {**CASES[name], **over}
    return DiffusersGuider(getattr(guiders, name)(**kw)).guider


def branch_of(name, ident):
    return "uncond_perturbed" if name == "AutoGuidance" and ident == "pred_uncond" else BRANCH[ident]


def run_recorded(pipe, module, monkeypatch, steps=STEPS):
    """flowkit.sample with `module`, recording each combine's step, branch predictions and result."""
    calls = []
    real = DiffusersGuider.combine

    def spy(self, ctx, preds):
        out = real(self, ctx, preds)
        calls.append((ctx.step, float(ctx.timestep[0]), {k: preds[k].value.clone() for k in preds},
                      out.value.clone()))
        return out

    monkeypatch.setattr(DiffusersGuider, "combine", spy)
    out = flowkit.sample(pipe, PROMPTS, guidance=[module], steps=steps, seed=3, output_type="latent")
    monkeypatch.undo()
    return out, calls


def replay(name, g, calls, steps=STEPS):
    """The guider `g` called directly on the recorded branch predictions: max |difference| and
    the identifiers it asked for at each step."""
    worst, asked = 0.0, []
    for step, timestep, preds, result in calls:
        g.set_state(step, steps, torch.tensor(timestep))
        idents = [getattr(b, g._identifier_key) for b in g.prepare_inputs({"x": (0, 1)})]
        asked.append(idents)
        inputs = {i: preds[branch_of(name, i)] for i in idents}
        if name == "MagnitudeAwareGuidance":  # the wrapper hands it [B, C, H*W] (see the module)
            inputs = {k: v.flatten(2) for k, v in inputs.items()}
        out = g.forward(**inputs).pred.reshape(result.shape)
        worst = max(worst, float((out - result).abs().max()))
    return worst, asked


def needs(name):
    """FrequencyDecoupledGuidance needs kornia (the `test` and `guiders` extras install it)."""
    if name == "FrequencyDecoupledGuidance":
        pytest.importorskip("kornia")


@pytest.mark.parametrize("name", list(CASES))
def test_each_guider_through_the_wrapper_equals_the_guider_called_directly(name, shapes, monkeypatch):
    needs(name)
    module = DiffusersGuider(guider(name))
    out, calls = run_recorded(shapes, module, monkeypatch)
    assert [c[0] for c in calls] == list(range(STEPS))
    worst, asked = replay(name, guider(name), calls)
    assert worst < 1e-6, worst
    # the branches evaluated at each step are the guider's conditions, one row each per image
    for rec, idents in zip(out.stats.steps, asked):
        assert rec.branches == {branch_of(name, i): 2 for i in idents}, (rec.step, rec.branches, idents)
    assert out.stats.nfe == [sum(len(i) for i in asked)] * 2
    # negative control: the guider at a wrong scale does not reproduce the run
    key = SCALE_KEY.get(name, "guidance_scale")
    wrong = [v + 1.5 for v in CASES[name][key]] if isinstance(CASES[name][key], list) else CASES[name][key] + 1.5
    assert replay(name, guider(name, **{key: wrong}), calls)[0] > 1e-3


def test_state_windows_and_momentum_are_exercised(shapes, monkeypatch):
    """The cases are not trivial: PAG's window leaves steps out, CFG-Zero* zeroes step 0 and APG's
    momentum matters (a guider without it differs), so the mutants above would show."""
    _, calls = run_recorded(shapes, DiffusersGuider(guider("AdaptiveProjectedGuidance")), monkeypatch)
    assert replay("AdaptiveProjectedGuidance",
                  guider("AdaptiveProjectedGuidance", adaptive_projected_guidance_momentum=None), calls)[0] > 1e-4
    out, calls = run_recorded(shapes, DiffusersGuider(guider("PerturbedAttentionGuidance")), monkeypatch)
    sets = [set(r.branches) for r in out.stats.steps]
    assert {"cond", "uncond"} in sets and {"cond", "uncond", "cond_skip"} in sets
    _, calls = run_recorded(shapes, DiffusersGuider(guider("ClassifierFreeZeroStarGuidance")), monkeypatch)
    assert float(calls[0][3].abs().max()) == 0.0 and float(calls[1][3].abs().max()) > 0


def test_a_spec_builds_the_guider_and_round_trips(shapes):
    from flowkit.registry import GUIDANCE
    from flowkit.spec import to_spec

    cfg = json.dumps({"indices": [0], "fqn": MID})
    text = (f"diffusers:name=PerturbedAttentionGuidance,guidance_scale=5,perturbed_guidance_scale=3,"
            f"perturbed_guidance_config='{cfg}'")
    (m,) = GUIDANCE.build(text)
    assert type(m.guider).__name__ == "PerturbedAttentionGuidance" and m.guider.guidance_scale == 5
    (again,) = GUIDANCE.build(str(to_spec(m)))
    assert to_spec(again) == to_spec(m)
    with pytest.raises(SpecError, match="did you mean 'guidance_scale'"):
        GUIDANCE.build("diffusers:name=AdaptiveProjectedGuidance,scale=3")
    with pytest.raises(SpecError, match="AdaptiveProjectedGuidance"):
        GUIDANCE.build("diffusers:name=AdaptiveProjectedGuidanc")


def test_a_users_own_guider_runs_and_a_model_changing_one_is_refused(shapes):
    from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput

    class Halfway(BaseGuidance):
        _input_predictions = ["pred_cond", "pred_uncond"]

        def __init__(self):
            super().__init__(0.0, 1.0, True)

        @property
        def num_conditions(self):
            return 2

        def prepare_inputs(self, data):
            return [self._prepare_batch(data, i, n) for i, n in zip((0, 1), self._input_predictions)]

        def forward(self, pred_cond, pred_uncond=None):
            return GuiderOutput(pred=(pred_cond + pred_uncond) / 2, pred_cond=pred_cond, pred_uncond=pred_uncond)

    mine = flowkit.sample(shapes, PROMPTS, guidance=[DiffusersGuider(Halfway())], steps=3, seed=3,
                          output_type="latent")
    ref = flowkit.sample(shapes, PROMPTS, guidance="cfg:scale=0.5", steps=3, seed=3, output_type="latent")
    assert float((mine.images - ref.images).abs().max()) < 1e-5

    class Hooking(Halfway):
        def prepare_models(self, denoiser):
            self._count_prepared += 1

    with pytest.raises(UnsupportedError, match="changes the model in prepare_models"):
        flowkit.sample(shapes, PROMPTS, guidance=[DiffusersGuider(Hooking())], steps=3, seed=3, output_type="latent")


def test_refusals_name_their_reason(shapes):
    from diffusers import guiders

    cases = [
        (guiders.LTX2Guidance(guidance_scale=3.0, stg_scale=1.0), "pred_cond_stg"),
        (guiders.PerturbedAttentionGuidance(perturbed_guidance_layers=[0]), "fqn='auto' finds no transformer blocks"),
        (guiders.SkipLayerGuidance(skip_layer_config={"indices": [7], "fqn": MID}), "no block [7]"),
        (guiders.AutoGuidance(auto_guidance_layers=[0], dropout=0.5), None),
        (guiders.AutoGuidance(auto_guidance_config={"indices": [0], "fqn": MID, "dropout": 0.5}), "dropout=0.5"),
    ]
    for g, reason in cases:
        if reason is None:
            continue
        with pytest.raises(UnsupportedError, match=reason.replace("[", r"\[").replace("]", r"\]")):
            flowkit.sample(shapes, PROMPTS, guidance=[DiffusersGuider(g)], steps=2, seed=0, output_type="latent")


def test_a_disabled_guider_evaluates_the_conditional_branch_only(shapes):
    """`enabled=False` is the guider's own switch: one branch, the conditional prediction
    (mutant: the wrapper asking for cond and uncond regardless of the guider fails on NFE)."""
    from diffusers import guiders

    off = DiffusersGuider(guiders.ClassifierFreeGuidance(guidance_scale=5.0, enabled=False))
    out = flowkit.sample(shapes, PROMPTS, guidance=[off], steps=3, seed=3, output_type="latent")
    none = flowkit.sample(shapes, PROMPTS, guidance=[], steps=3, seed=3, output_type="latent")
    assert out.stats.nfe == [3, 3] and torch.equal(out.images, none.images)


def test_flowkit_list_guidance_shows_each_wrapped_guider_with_its_options(capsys):
    """Mutant: listing the registry only (no `variants`) drops the twelve rows."""
    from flowkit.cli import main
    from flowkit.guidance.diffusers_guider import GUIDERS

    main(["list", "guidance", "--json"])
    table = json.loads(capsys.readouterr().out)["guidance"]
    for name in GUIDERS:
        assert f"diffusers:name={name}" in table
    assert "perturbed_guidance_scale=2.8" in table["diffusers:name=PerturbedAttentionGuidance"]
    assert "guidance_scales=[10.0, 5.0]" in table["diffusers:name=FrequencyDecoupledGuidance"]


def test_as_diffusers_guider_runs_flowkit_combiners_as_diffusers_guiders():
    """The other direction: flowkit's CFG and APG (model-output space, diffusers' formulation)
    exported as diffusers guiders give what diffusers' own CFG and APG give over 5 steps,
    momentum included (control: a wrong scale); combiners that need flowkit's path are refused."""
    from diffusers import guiders
    from flowkit.guidance import APG, CFG, as_diffusers_guider

    gen = torch.Generator().manual_seed(0)
    preds = [(torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)) for _ in range(5)]

    def run(g):
        outs = []
        for step, (c, u) in enumerate(preds):
            g.set_state(step, 5, torch.tensor(999.0 - step))
            idents = [getattr(b, g._identifier_key) for b in g.prepare_inputs({"x": (0, 1)})]
            args = {"pred_cond": c, "pred_uncond": u}
            outs.append(g.forward(**{i: args[i] for i in idents}).pred)
        return torch.stack(outs)

    pairs = [
        (CFG(scale=4.0, guidance_rescale=0.2), guiders.ClassifierFreeGuidance(guidance_scale=4.0, guidance_rescale=0.2),
         guiders.ClassifierFreeGuidance(guidance_scale=5.0, guidance_rescale=0.2)),
        (APG(scale=4.0, eta=0.5, momentum=-0.5, norm_threshold=20.0, space="model_output", formulation="uncond",
             start=0.2),
         guiders.AdaptiveProjectedGuidance(guidance_scale=4.0, eta=0.5, adaptive_projected_guidance_momentum=-0.5,
                                           adaptive_projected_guidance_rescale=20.0, start=0.2),
         guiders.AdaptiveProjectedGuidance(guidance_scale=5.0, eta=0.5, adaptive_projected_guidance_momentum=-0.5,
                                           adaptive_projected_guidance_rescale=20.0, start=0.2)),
    ]
    for module, theirs, wrong in pairs:
        ours = run(as_diffusers_guider(module))
        assert float((ours - run(theirs)).abs().max()) < 1e-5, module
        assert float((ours - run(wrong)).abs().max()) > 1e-2
    with pytest.raises(ValueError, match="model output"):
        as_diffusers_guider(APG(scale=4.0))


def test_the_perturbed_bench_is_registered_and_its_arms_build():
    """`flowkit bench perturbed`: its PAG and SEG specs are diffusers' guiders on the UNet's mid
    block (PAG every step), and they build; the experiment is listed."""
    from flowkit.bench import available
    from flowkit.bench.experiments.perturbed import CANDIDATES, spec
    from flowkit.registry import GUIDANCE

    assert "perturbed" in available()
    (p,) = GUIDANCE.build(spec("pag", 2.0))
    (s,) = GUIDANCE.build(spec("seg", CANDIDATES["seg"][0]))
    assert type(p.guider).__name__ == "PerturbedAttentionGuidance" and p.guider.skip_layer_guidance_scale == 2.0
    assert p.guider.skip_layer_config[0].fqn == "mid_block.attentions.0.transformer_blocks"
    assert type(s.guider).__name__ == "SmoothedEnergyGuidance" and p.guider.guidance_scale == 4.0


def test_as_diffusers_guider_runs_in_a_modular_pipeline():
    """A modular SDXL pipeline (tiny components) with flowkit's CFG and APG as its guider gives
    the latents of diffusers' own CFG and APG guiders (control: CFG at another scale)."""
    from diffusers.guiders import AdaptiveProjectedGuidance, ClassifierFreeGuidance
    from diffusers.modular_pipelines import StableDiffusionXLAutoBlocks
    from flowkit.guidance import APG, CFG, as_diffusers_guider

    src = tiny_pipes.cached("sdxl")
    pipe = StableDiffusionXLAutoBlocks().init_pipeline()
    pipe.update_components(**{k: v for k, v in src.components.items() if v is not None})
    pipe.set_progress_bar_config(disable=True)

    def run(guider):
        pipe.update_components(guider=guider)
        return pipe(prompt=tiny_pipes.PROMPTS, num_inference_steps=4, generator=torch.Generator().manual_seed(3),
                    output="latents", **tiny_pipes.SIZE)

    ref = run(ClassifierFreeGuidance(guidance_scale=5.0))
    assert tiny_pipes.rel_err(run(as_diffusers_guider(CFG(scale=5.0))), ref) < 1e-6
    assert tiny_pipes.rel_err(run(as_diffusers_guider(CFG(scale=4.0))), ref) > 1e-2
    ref = run(AdaptiveProjectedGuidance(guidance_scale=5.0, adaptive_projected_guidance_momentum=-0.5,
                                        adaptive_projected_guidance_rescale=10.0, eta=0.0))
    ours = run(as_diffusers_guider(APG(scale=5.0, momentum=-0.5, norm_threshold=10.0, eta=0.0,
                                       space="model_output", formulation="uncond")))
    assert tiny_pipes.rel_err(ours, ref) < 1e-6
