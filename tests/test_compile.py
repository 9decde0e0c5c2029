"""flowkit under torch.compile (issue 19): the denoiser compiled with fullgraph=True traces
flowkit's attention processors without a graph break, runs every step of a run, and a
second run with another guidance stack, on one compiled graph (no recompile), gives the
eager latents, counts attention calls per kernel from outside the graph, and leaves the
compiled graph only on the steps that capture attention maps.

Dynamo's tracing is what these tests check, so they compile with the "eager" and
"aot_eager" backends (seconds); one test runs inductor end to end on the tiniest model
(tiny SD3, about 30-45 s of C++ compilation on one CPU core). Skipped only where the
platform has no torch compiler (dynamo unsupported; for inductor, no C++ compiler).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

import flowkit
import flowkit.attention as A
from flowkit.attention.kernels import Kernel, reference
from flowkit.attention.processors import FlowKitProcessor
from flowkit.errors import InputError
from flowkit.guidance import APG, CFG
from flowkit.pipelines import FlowKitPipeline

from test_attention import forward, net_of
from test_attention_capture import LAYERS, Capture
from tiny_pipes import PROMPTS, SIZE, build, gens, one_thread  # noqa: F401

dynamo = pytest.importorskip("torch._dynamo")
pytestmark = pytest.mark.skipif(not dynamo.is_dynamo_supported(),
                                reason="torch.compile (dynamo) is not supported on this platform")
FAMILIES = ["shapes", "sd", "sdxl", "sd3", "flux"]
TOL = 1e-4  # compiled vs eager latents, in units of the eager latents' std


def reset() -> None:
    """No compiled code, zeroed counters (graphs, graph breaks); dynamo.reset() keeps the counters."""
    from torch._dynamo.utils import counters

    dynamo.reset()
    counters.clear()


@pytest.fixture(autouse=True)
def fresh_dynamo():
    reset()
    yield
    reset()


def graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def pipeline(family: str):
    return flowkit.load("tiny") if family == "shapes" else build(family)


def net_name(pipe) -> str:
    return "unet" if hasattr(pipe, "unet") else "transformer"


def run(pipe, guidance, steps=2, **kw):
    size = {} if type(pipe).__name__ == "ShapesPipeline" else SIZE  # the shapes model: its own 32 px
    return flowkit.sample(pipe, PROMPTS, steps=steps, guidance=guidance, generators=gens(), output_type="latent",
                          **size, **kw)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.std())


class _Recorder:
    """Stands in for a network to record the arguments test_attention.forward calls it with."""

    config = None

    def __init__(self, net):
        self.config = net.config

    def __call__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs
        return (None,)


def dropin(pipe) -> torch.Tensor:
    """Latents of FlowKitPipeline.from_pipe(pipe) under CFG (FLUX: true CFG, so that the batch
    has the cond and uncond rows of the runs above), 2 steps, on PROMPTS."""
    extra = {"true_cfg_scale": 3.0, "negative_prompt": [""] * len(PROMPTS)} if "Flux" in type(pipe).__name__ else {}
    return FlowKitPipeline.from_pipe(pipe)(PROMPTS, num_inference_steps=2, generator=gens(), output_type="latent",
                                           **SIZE, **extra).images


def test_a_compiled_network_is_freed_with_its_pipeline():
    """`compile=` keeps one compiled wrapper per network for later runs, but not the network
    alive: after the last reference goes, the network is collected (mutant: the wrappers kept in
    a module-level WeakKeyDictionary, whose values hold their key through `_orig_mod`, so the
    network, GPU weights included, lived until the process ended). Copies start uncompiled."""
    import copy
    import gc
    import weakref

    from flowkit.denoiser import compile_network

    net = torch.nn.Linear(2, 2)
    wrapped = compile_network(net, {"backend": "eager"})
    assert compile_network(net, {"backend": "eager"}) is wrapped and wrapped._orig_mod is net
    assert compile_network(copy.deepcopy(net), {"backend": "eager"}) is not wrapped
    ref = weakref.ref(net)
    del net, wrapped
    gc.collect()
    assert ref() is None


def explain_network(family: str, net) -> object:
    """torch._dynamo.explain of one forward of `net` on seeded inputs of the family's shapes."""
    if family == "shapes":
        g = torch.Generator().manual_seed(0)
        c = net.config
        args = (torch.randn(2, c.in_channels, c.sample_size, c.sample_size, generator=g), torch.tensor([0.5, 0.3]))
        kwargs = dict(encoder_hidden_states=torch.randn(2, 8, c.cross_attention_dim, generator=g), return_dict=False)
    else:
        rec = _Recorder(net)
        forward(family, rec)
        args, kwargs = rec.args, rec.kwargs
    return dynamo.explain(net)(*args, **kwargs)


# -- graph breaks, recompiles, parity: every family --------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_fullgraph_compiled_denoiser_no_break_no_recompile_same_latents(family):
    """flowkit's processors trace as one graph (explain: 0 breaks; before issue 19 a ContextVar
    read in each attention call broke the graph once per call); `pipe.unet = torch.compile(...,
    fullgraph=True)` then runs two flowkit runs with different guidance stacks on one graph: 2
    steps of CFG, then 2 steps of APG under dynamo's "fail_on_recompile" stance (the "eager"
    backend: dynamo's tracing and guards are what is checked; aot_eager and inductor below). The compiled
    latents equal the eager ones, and the attention calls are counted as in eager mode."""
    pipe = pipeline(family)
    name = net_name(pipe)
    net = getattr(pipe, name)
    n_attn = len(net.attn_processors)
    eager_cfg, eager_apg = run(pipe, [CFG(scale=3.0)]), run(pipe, [APG(scale=5.0)])
    eager_dropin = None if family == "shapes" else dropin(pipe)

    A.install(net)
    ex = explain_network(family, net)
    A.uninstall(net)
    assert ex.graph_break_count == 0 and ex.graph_count == 1, ex.break_reasons[:1]
    reset()

    setattr(pipe, name, torch.compile(net, fullgraph=True, backend="eager"))  # as a diffusers user does
    try:
        cfg = run(pipe, [CFG(scale=3.0)])
        assert graphs() == 1 and graph_breaks() == 0  # two steps (batched CFG forwards): one graph
        with torch.compiler.set_stance("fail_on_recompile"):  # a recompile would raise
            apg = run(pipe, [APG(scale=5.0)])
            # the drop-in on the user's compiled network: the same graph, no recompile
            compiled_dropin = None if family == "shapes" else dropin(pipe)
        assert graphs() == 1
    finally:
        setattr(pipe, name, net)
    if compiled_dropin is not None:
        assert rel(compiled_dropin, eager_dropin) < TOL
    assert rel(cfg.latents, eager_cfg.latents) < TOL and rel(apg.latents, eager_apg.latents) < TOL
    assert rel(apg.latents, cfg.latents) > 100 * TOL  # negative control: the two stacks differ
    assert cfg.stats.attention == eager_cfg.stats.attention == {"sdpa": cfg.stats.forward_calls * n_attn}
    assert cfg.stats.compiled and cfg.stats.compiles == 1 and cfg.stats.compile_seconds > 0
    assert apg.stats.compiles == 0 and apg.stats.compile_seconds == 0.0  # warm: nothing compiled
    assert not eager_cfg.stats.compiled
    assert not any(isinstance(p, FlowKitProcessor) for p in net.attn_processors.values())  # restored after runs


# -- counts per kernel, and the kernel that ran, under compile ----------------------------------
@torch.no_grad()
def test_compiled_runs_count_and_run_the_chosen_kernel(monkeypatch):
    """The kernel is fixed before each forward and the calls are counted outside the graph: a
    compiled run on another kernel counts it, and runs it (a kernel with a wrong scale changes
    the compiled output as it changes the eager one); the pipeline's own calls through a
    compiled network (the wrapper's hooks) are counted on the model's kernel."""
    monkeypatch.setitem(A.KERNELS, "broken", Kernel("broken", "wrong scale", lambda q, k, v, m=None, s=None:
                                                       reference(q, k, v, m, 1.5 * q.shape[-1] ** -0.5)))
    pipe = build("sd")
    net = pipe.unet
    n = len(net.attn_processors)
    eager = {k: run(pipe, [CFG(scale=3.0)], attention=k) for k in ("sdpa", "broken")}
    pipe.unet = torch.compile(net, fullgraph=True, backend="eager")
    for k in ("broken", "reference"):
        out = run(pipe, [CFG(scale=3.0)], attention=k)
        assert out.stats.attention == {k: out.stats.forward_calls * n}
        if k == "broken":
            assert rel(out.latents, eager["broken"].latents) < TOL
            assert rel(out.latents, eager["sdpa"].latents) > 100 * TOL
    assert graph_breaks() == 0
    A.set_kernel(pipe, "reference")  # the diffusers pipeline's own calls, compiled
    pipe(PROMPTS, num_inference_steps=2, output_type="latent", **SIZE)
    assert A.controller(pipe).counts == {"reference": 2 * n}  # two CFG-batched forwards
    A.set_kernel(pipe, None)
    pipe.unet = net


# -- map capture with a compiled model ----------------------------------------------------------
class EagerCalls:
    """Counts attention-module calls that run as Python (eagerly); inside a compiled graph the
    hook is traced with is_compiling() True, so compiled calls are not counted."""

    def __init__(self, net):
        self.n = 0
        for m in net.modules():
            if hasattr(m, "processor"):
                m.register_forward_pre_hook(self.hook)

    def hook(self, *args):
        if not torch.compiler.is_compiling():
            self.n += 1


@torch.no_grad()
def test_capture_steps_run_eagerly_and_the_others_compiled():
    """Maps requested at step 1 of 3 are captured from a compiled network, equal to the eager
    run's; only step 1's forward runs its attention as Python (n_attn eager calls, where an
    uncompiled run makes 3 * n_attn), the graph is neither broken nor recompiled, and the
    counts are those of the eager run."""
    pipe = build("sd")
    net = pipe.unet
    n = len(net.attn_processors)
    spy = EagerCalls(net)
    grab_eager = Capture(LAYERS, steps=[1])
    eager = run(pipe, [CFG(scale=3.0), grab_eager], steps=3)
    assert spy.n == 3 * n  # negative control: uncompiled, every call is Python
    spy.n = 0
    pipe.unet = torch.compile(net, fullgraph=True, backend="eager")
    try:
        grab = Capture(LAYERS, steps=[1])
        out = run(pipe, [CFG(scale=3.0), grab], steps=3)
        assert spy.n == n  # the capture step's forward only
        assert graphs() == 1 and graph_breaks() == 0
        with torch.compiler.set_stance("fail_on_recompile"):
            again = run(pipe, [CFG(scale=3.0), Capture(LAYERS, steps=[0, 2])], steps=3)
        assert spy.n == 3 * n  # two more capture steps, eager
    finally:
        pipe.unet = net
    for layer in LAYERS:
        for branch in ("cond", "uncond"):
            ours, ref = grab.store.get(layer, 1, branch), grab_eager.store.get(layer, 1, branch)
            assert torch.allclose(ours.probs, ref.probs, atol=1e-6)
    assert rel(out.latents, eager.latents) < TOL
    assert out.stats.attention == eager.stats.attention == {"captured": 2, "sdpa": 3 * n - 2}
    assert again.stats.attention == {"captured": 4, "sdpa": 3 * n - 4}


# -- the surfaces: compile=, FlowKitPipeline, batch, generate --compile ----------------------------
@torch.no_grad()
def test_compile_option_on_sample_and_the_drop_in():
    """`compile=` compiles the network for the run (once: a later call reuses it), leaves the
    pipeline's network as it was, and reports the first call's compile time; FlowKitPipeline
    takes the same option."""
    pipe = build("sd")
    net = pipe.unet
    eager = run(pipe, [CFG(scale=3.0)])
    first = run(pipe, [CFG(scale=3.0)], compile={"backend": "aot_eager"})
    assert pipe.unet is net and {type(p).__name__ for p in net.attn_processors.values()} == {"AttnProcessor2_0"}
    assert first.stats.compiled and first.stats.compiles == 1 and first.stats.compile_seconds > 0
    assert first.stats.compile_seconds <= first.stats.forward_seconds
    second = run(pipe, [APG(scale=5.0)], compile={"backend": "aot_eager"})
    assert second.stats.compiles == 0 and graphs() == 1
    assert rel(first.latents, eager.latents) < TOL
    fk = FlowKitPipeline.from_pipe(pipe, compile={"backend": "aot_eager"})
    theirs = fk(PROMPTS, num_inference_steps=2, generator=gens(), output_type="latent", **SIZE).images
    assert fk.stats.compiled and fk.stats.compiles == 0 and graphs() == 1  # the same compiled network
    plain = FlowKitPipeline.from_pipe(pipe)(PROMPTS, num_inference_steps=2, generator=gens(), output_type="latent",
                                            **SIZE).images
    assert rel(theirs, plain) < TOL
    for bad in ({"fullgrph": True}, 3):
        with pytest.raises(InputError, match="compile"):
            run(pipe, [CFG(scale=3.0)], compile=bad)
        with pytest.raises(InputError, match="compile"):
            FlowKitPipeline.from_pipe(pipe, compile=bad)


def test_batch_and_generate_compile(tmp_path, capsys, monkeypatch):
    """`flowkit batch --compile` and `flowkit generate --compile` run compiled (torch.compile is
    given the eager backend here, for speed): the summary and stats report it, and the images
    are those of the eager commands."""
    import tiny_pipes
    from flowkit.cli import main

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real(model, **{**kw, "backend": "eager"}))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\ntwo blue squares\nthree green triangles\n")
    small = ["--model", "tiny", "--steps", "2", "--height", "16", "--width", "16", "--no-progress", "--json"]
    with tiny_pipes.memoised_load():
        summaries = {}
        for flag in ([], ["--compile"]):
            assert main(["batch", str(prompts), "--out", str(tmp_path / f"b{len(flag)}"), "--batch-size", "2",
                         *small, *flag]) == 0
            summaries[len(flag)] = json.loads(capsys.readouterr().out)
        assert not summaries[0]["compiled"] and summaries[1]["compiled"]
        assert summaries[1]["compiles"] == 2 and summaries[1]["compile_seconds"] > 0  # micro-batches of 2, then 1
        files = sorted(p.name for p in (tmp_path / "b0").glob("*.png"))
        assert len(files) == 3 and files == sorted(p.name for p in (tmp_path / "b1").glob("*.png"))
        for name in files:
            assert (tmp_path / "b0" / name).read_bytes() == (tmp_path / "b1" / name).read_bytes()
        outs = {}
        for flag in ([], ["--compile"]):
            assert main(["generate", "a red circle", "--out", str(tmp_path / f"g{len(flag)}"), *small, *flag]) == 0
            outs[len(flag)] = json.loads(capsys.readouterr().out)
        assert outs[1]["stats"]["compiled"] and not outs[0]["stats"]["compiled"]
        assert open(outs[0]["files"][0], "rb").read() == open(outs[1]["files"][0], "rb").read()


# -- inductor, end to end ---------------------------------------------------------------------------
def _cxx() -> str | None:
    return next((c for c in ("g++", "c++", "clang++") if shutil.which(c)), None)


@pytest.mark.skipif(_cxx() is None, reason="no C++ compiler: torch.compile's inductor backend cannot run")
@torch.no_grad()
def test_inductor_end_to_end_on_tiny_sd3(monkeypatch):
    """`compile=True` (inductor, fullgraph) on the tiniest model: the first call compiles one
    graph and reports its time, the second compiles nothing, and the latents agree with the
    eager ones to 1e-4 of their std."""
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config, "compile_threads", 1)  # no worker pool on a small machine
    pipe = build("sd3")
    kw = dict(steps=2, output_type="latent", **SIZE)
    eager = flowkit.sample(pipe, PROMPTS[:1], guidance=[CFG(scale=3.0)], generators=gens(1), **kw)
    first = flowkit.sample(pipe, PROMPTS[:1], guidance=[CFG(scale=3.0)], generators=gens(1), compile=True, **kw)
    second = flowkit.sample(pipe, PROMPTS[:1], guidance=[APG(scale=5.0)], generators=gens(1), compile=True, **kw)
    assert first.stats.compiles == 1 and first.stats.compile_seconds > 0.5
    assert second.stats.compiles == 0 and second.stats.seconds < first.stats.compile_seconds
    assert rel(first.latents, eager.latents) < TOL
    assert first.stats.attention == eager.stats.attention


# -- start-up: nothing on stderr but flowkit's own lines ---------------------------------------------
def test_generate_writes_nothing_to_stderr_but_its_own_lines(tmp_path):
    """`flowkit generate` on a fresh process: transformers' notes about image processors
    falling back without torchvision (modules flowkit does not use) are not shown."""
    res = subprocess.run([sys.executable, "-m", "flowkit", "generate", "a red circle", "--model", "tiny",
                          "--steps", "1", "--height", "16", "--width", "16", "--out", str(tmp_path),
                          "--no-progress"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert [line for line in res.stderr.splitlines() if not line.startswith("flowkit")] == []
    assert "1 image in" in res.stdout


def test_quiet_transformers_drops_only_the_image_processor_fallback():
    import logging

    from transformers.utils import logging as transformers_logging

    from flowkit.cli.options import quiet_transformers

    logger = transformers_logging.get_logger("transformers.utils.import_utils")
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Keep()
    logger.addHandler(handler)
    try:
        quiet_transformers()
        quiet_transformers()  # idempotent
        logger.warning("`FooImageProcessor` requires torchvision (not installed); falling back to `FooImageProcessorPil`")
        logger.warning("something else")
        assert seen == ["something else"]
        assert transformers_logging.get_verbosity() == transformers_logging.WARNING  # the user's verbosity is kept
    finally:
        logger.removeHandler(handler)


@torch.no_grad()
def test_compile_bench_pairs_rotate_restore_and_count_recompiles():
    """`flowkit bench compile`'s paired runs (also scripts/bench_gpu.py's): the three variants
    rotate which runs first, the compiled variants give the eager latents, no graph is
    compiled after the warm-up, the pipeline gets its eager network back, and a compiled
    network passed as the eager one is refused. Mutants caught: a fixed order (every record
    first "diffusers-compiled"), the eager network not restored after the records, a
    record's recompiles miscounted (one graph too many per record)."""
    from flowkit.bench.experiments.compile import VARIANTS, compiled_pairs

    pipe = pipeline("sd")
    eager = pipe.unet
    compiled = torch.compile(eager, fullgraph=True, backend="eager")

    def diffusers(seed):
        return pipe([PROMPTS[0]], num_inference_steps=1, guidance_scale=4.0, output_type="latent", **SIZE,
                    generator=[torch.Generator().manual_seed(seed)]).images

    def fk(seed):
        return flowkit.sample(pipe, [PROMPTS[0]], steps=1, guidance=[CFG(scale=4.0)], output_type="latent",
                              generators=[torch.Generator().manual_seed(seed)], **SIZE).latents

    calls = {"diffusers-compiled": diffusers, "flowkit-compiled": fk, "flowkit-eager": fk}
    compiled_pairs(pipe, "unet", compiled, calls, [0], torch.device("cpu"))  # warm-up
    recs = compiled_pairs(pipe, "unet", compiled, calls, [0, 1, 2], torch.device("cpu"))
    assert [r["first"] for r in recs] == list(VARIANTS)
    assert all(r["recompiles"] == 0 for r in recs)
    assert all(r["flowkit-compiled_rel_err"] < TOL for r in recs)
    assert all(r[f"{v}_seconds"] > 0 for r in recs for v in VARIANTS)
    assert pipe.unet is eager
    pipe.unet = compiled
    with pytest.raises(ValueError, match="eager network"):
        compiled_pairs(pipe, "unet", compiled, calls, [0], torch.device("cpu"))
    pipe.unet = eager
