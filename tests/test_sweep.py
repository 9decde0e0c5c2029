"""The registry's promise: every sampler x every guidance module x every model family runs,
or is refused with the reason listed in tests/sweep_refusals.json."""

import json
from pathlib import Path

import pytest
import torch

import flowkit
import tiny_pipes
from flowkit.adapters.base import adapt
from flowkit.errors import UnsupportedError
from flowkit.guidance import CFG, GuidanceStack
from flowkit.registry import GUIDANCE, SAMPLERS

STEPS = 3
one_thread = tiny_pipes.one_thread  # autouse fixture: tiny models run faster on one thread
TABLE = json.loads((Path(__file__).parent / "sweep_refusals.json").read_text())["refusals"]
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
    module = GUIDANCE.create(gname)
    mods = [CFG(scale=3.0), module] if module.role == "policy" else [module]
    return GuidanceStack(mods)


CASES = [(s, g, m) for s in SAMPLERS.names() for g in ["none"] + GUIDANCE.names() for m in MODELS]


@pytest.mark.parametrize("sampler, guidance, model", CASES)
def test_combination_runs_or_is_refused_as_listed(sampler, guidance, model):
    key = f"{sampler}|{guidance}|{model}"
    pipe = _model(model)
    stack = _stack(guidance)
    smp = SAMPLERS.create(sampler)
    try:
        out = flowkit.sample(pipe, PROMPTS.get(model, ["a red circle", "two blue squares"]), sampler=smp, guidance=stack,
                             steps=STEPS, seed=1, output_type="latent")
    except UnsupportedError as e:
        assert key in TABLE, f"{key} was refused but is not in the table: {e}"
        assert TABLE[key] in str(e)
        return
    assert key not in TABLE, f"{key} is listed as refused but ran"
    x = out.latents
    adapter = adapt(pipe)
    assert x.shape == (2, *adapter.latent_shape(*adapter.default_size())) and torch.isfinite(x).all()
    evals = smp.evaluations(STEPS)
    full = evals * (1 + sum(m.extra_branches for m in stack))
    if any(m.saves_nfe for m in stack):  # data-dependent savings: bounded by conditional-only and full
        assert all(evals <= n <= full for n in out.stats.nfe), out.stats.nfe
    else:
        assert out.stats.nfe == [full] * 2


def test_refusal_table_names_real_combinations():
    for key in TABLE:
        s, g, m = key.split("|")
        assert s in SAMPLERS.names() and (g == "none" or g in GUIDANCE.names()) and m in MODELS, key
