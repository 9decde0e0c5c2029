"""The registry's promise: every sampler x every guidance module x every model family runs,
or is refused with a clear reason.

The expected outcome of each combination is derived, not kept by hand: it is refused exactly
when the sampler's or a module's `refuse(ctx)` gives a reason for the model (asked before
the run, on a context built as the API builds it), and then with that reason. Only the
combinations refused elsewhere are listed by hand (`EXCEPTIONS`). A combination that runs
must produce finite latents of the right shape at the NFE its classes declare.
"""

from __future__ import annotations

from unittest import mock

import pytest
import tiny_pipes
import torch
from flowkit.guidance import CFG, GuidanceStack

import flowkit
from flowkit.adapters.base import adapt
from flowkit.api import run_context
from flowkit.context import Context
from flowkit.errors import UnsupportedError
from flowkit.registry import GUIDANCE, SAMPLERS
from flowkit.sampler_base import Sampler
from flowkit.seeding import generators_for

STEPS = 3
one_thread = tiny_pipes.one_thread  # autouse fixture: tiny models run faster on one thread
MODELS = {
    "shapes-tiny": lambda: flowkit.load("tiny"),
    # tiny random diffusers pipelines of the drop-in families (tests/tiny_pipes.py), built lazily
    "sd-tiny": lambda: tiny_pipes.cached("sd"),
    "sdxl-tiny": lambda: tiny_pipes.cached("sdxl"),
    "sd3-tiny": lambda: tiny_pipes.cached("sd3"),
    "flux-tiny": lambda: tiny_pipes.cached("flux"),
    # tiny random sequence models (flowkit.seqmodels): the dna world on the Dirichlet path (with a
    # noisy classifier), its distilled one-step form, and the toy simplex task on the other paths
    "dna-tiny": lambda: tiny_seq("dna", None, classifier=True),
    "dna-distilled-tiny": lambda: tiny_seq("dna", None, one_step=True),
    "simplex-linear-tiny": lambda: tiny_seq("simplex", {"name": "simplex-linear", "num_categories": 8}),
    "simplex-mask-tiny": lambda: tiny_seq("simplex", {"name": "mixture", "num_categories": 8, "source": "mask"}),
}
PROMPTS = {"dna-tiny": ["promoter", "enhancer"], "dna-distilled-tiny": ["silencer", "0"],
           "simplex-linear-tiny": ["", ""], "simplex-mask-tiny": ["", ""]}
# "sampler|guidance|model" -> a part of the reason, for refusals that do not come from refuse()
EXCEPTIONS: dict[str, str] = {}
_cache: dict = {}


def tiny_seq(world, path, **kw):
    from flowkit.seqmodels import tiny_pipeline

    return tiny_pipeline(world, path, **kw)


def _model(name):
    if name not in _cache:
        _cache[name] = MODELS[name]()
    return _cache[name]


def _stack(gname):
    if gname == "none":
        return GuidanceStack([])
    if ":" in gname:  # a spec (the wrapped diffusers guiders, WRAPPED)
        return GuidanceStack(GUIDANCE.build(gname))
    module = GUIDANCE.create(gname)
    mods = [CFG(scale=3.0), module] if module.role == "policy" else [module]
    return GuidanceStack(mods)


def expected_refusal(pipe, sampler, stack, prompts) -> str | None:
    """The first reason the sampler or a module of the stack gives for this model, asked on
    the context the API would build (flowkit.api.run_context without its own checks), in the
    order the API asks them: the sampler, then the modules in hook order."""
    adapter = adapt(pipe)
    gens = generators_for(1, range(len(prompts)))
    h, w = adapter.default_size()
    try:
        with mock.patch.object(Sampler, "refuse", lambda self, ctx: None), \
                mock.patch.object(GuidanceStack, "check", lambda self, ctx: None), \
                mock.patch.object(type(sampler), "refuse", lambda self, ctx: None):
            ctx, _ = run_context(adapter, {}, sampler=sampler, stack=stack, steps=STEPS, grid=None, height=h,
                                 width=w, generators=gens, prompts=prompts)
    except UnsupportedError:  # no grid to run on at all: the sampler's own reason, on a bare context
        ctx = Context(adapter.denoiser, stack, {}, gens, STEPS, kit=adapter.kit(), encode=adapter.encoder())
    for obj in [sampler, *stack.ordered]:
        reason = obj.refuse(ctx)
        if reason:
            return reason
    return None


def cases() -> list[tuple[str, str, str]]:
    """Every registered sampler x ('none' and every registered guidance module) x model."""
    return [(s, g, m) for s in SAMPLERS.names() for g in ["none"] + GUIDANCE.names() for m in MODELS]


def check_combination(sampler_name: str, guidance: str, model: str) -> str:
    """Run one combination; 'ran' or 'refused'. Fails if the outcome is not the expected one."""
    key = f"{sampler_name}|{guidance}|{model}"
    pipe = _model(model)
    stack = _stack(guidance)
    smp = SAMPLERS.create(sampler_name)
    prompts = PROMPTS.get(model, ["a red circle", "two blue squares"])
    expected = expected_refusal(pipe, smp, stack, prompts)
    try:
        out = flowkit.sample(pipe, prompts, sampler=smp, guidance=stack, steps=STEPS, seed=1, output_type="latent")
    except UnsupportedError as e:
        if key in EXCEPTIONS:
            assert EXCEPTIONS[key] in str(e), (key, str(e))
        else:
            assert expected is not None, f"{key} was refused, but no refuse() gives a reason: {e}"
            assert str(e) == expected, (key, str(e), expected)
        return "refused"
    assert expected is None and key not in EXCEPTIONS, f"{key} should be refused ({expected}) but ran"
    x = out.latents
    adapter = adapt(pipe)
    assert x.shape == (2, *adapter.latent_shape(*adapter.default_size())) and torch.isfinite(x).all()
    evals = smp.evaluations(STEPS)
    full = evals * (1 + sum(m.extra_branches for m in stack))
    if any(m.saves_nfe for m in stack):  # data-dependent savings: bounded by conditional-only and full
        assert all(evals <= n <= full for n in out.stats.nfe), out.stats.nfe
    else:
        assert out.stats.nfe == [full] * 2
    return "ran"


@pytest.mark.parametrize("sampler, guidance, model", cases())
def test_combination_runs_or_is_refused_with_its_reason(sampler, guidance, model):
    check_combination(sampler, guidance, model)


# Each of diffusers' guiders through `diffusers:name=...` (the registered "diffusers" module runs
# above with every sampler, as diffusers' CFG); a guider that perturbs layers twice: layers named
# for a DiT ("auto": its transformer_blocks) and for a UNet (its mid block), each refused where
# the network has no such blocks.
_MID = '"{\\"indices\\": [0], \\"fqn\\": \\"mid_block.attentions.0.transformer_blocks\\"}"'
_AUTO = '"{\\"indices\\": [0], \\"fqn\\": \\"auto\\"}"'
WRAPPED = [
    "diffusers:name=ClassifierFreeZeroStarGuidance,guidance_scale=3",
    "diffusers:name=AdaptiveProjectedGuidance,guidance_scale=3,adaptive_projected_guidance_momentum=-0.5",
    "diffusers:name=AdaptiveProjectedMixGuidance,guidance_scale=3,adaptive_projected_guidance_start_step=1",
    "diffusers:name=FrequencyDecoupledGuidance,guidance_scales=[3.0;2.0]",
    "diffusers:name=MagnitudeAwareGuidance,guidance_scale=3",
    "diffusers:name=TangentialClassifierFreeGuidance,guidance_scale=3",
    "diffusers:name=LTX2Guidance,guidance_scale=3",
    "diffusers:name=LTX2Guidance,guidance_scale=3,stg_scale=1",
] + [f"diffusers:name={name},{key}={layers}{extra}"
     for layers in (_AUTO, _MID)
     for name, key, extra in [
         ("PerturbedAttentionGuidance", "perturbed_guidance_config", ",perturbed_guidance_stop=1"),
         ("SkipLayerGuidance", "skip_layer_config", ",skip_layer_guidance_stop=1"),
         ("SmoothedEnergyGuidance", "seg_guidance_config", ""),
         ("AutoGuidance", "auto_guidance_config", ""),
     ]]


@pytest.mark.parametrize("spec", WRAPPED)
@pytest.mark.parametrize("model", list(MODELS))
def test_each_wrapped_diffusers_guider_runs_or_is_refused_with_its_reason(spec, model):
    if "FrequencyDecoupledGuidance" in spec:
        pytest.importorskip("kornia")  # diffusers' FDG needs it (the `test` extra installs it)
    check_combination("euler", spec, model)


def test_the_wrapped_guiders_cover_diffusers_twelve():
    from flowkit.guidance.diffusers_guider import GUIDERS

    named = {s.split("name=")[1].split(",")[0] for s in WRAPPED} | {"ClassifierFreeGuidance"}  # the default
    assert named == set(GUIDERS)


def test_exceptions_name_real_combinations():
    for key in EXCEPTIONS:
        s, g, m = key.split("|")
        assert s in SAMPLERS.names() and (g == "none" or g in GUIDANCE.names()) and m in MODELS, key


def test_the_check_fails_on_a_missing_or_a_stray_refusal(monkeypatch):
    """Negative controls. (a) A sampler whose refuse() stops refusing discrete models runs a
    Gaussian update on a sequence model: the check fails. (b) A refusal raised at run time
    that no refuse() announces (a module refusing inside the loop) fails it too."""
    from flowkit.samplers import Euler

    with monkeypatch.context() as m:
        m.setattr(Euler, "refuse", lambda self, ctx: None)
        with pytest.raises(Exception):
            check_combination("euler", "none", "simplex-linear-tiny")

    def surprise(self, ctx):
        raise UnsupportedError("a refusal no refuse() announced")

    with monkeypatch.context() as m:
        m.setattr(GuidanceStack, "check", surprise)
        with pytest.raises(AssertionError, match="no refuse"):
            check_combination("euler", "cfg", "shapes-tiny")
    assert check_combination("euler", "cfg", "shapes-tiny") == "ran"
