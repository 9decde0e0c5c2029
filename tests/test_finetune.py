"""Reward backpropagation (flowkit.finetune, `flowkit train alignprop`): LoRA gradients through
the sampling chain against float64 finite differences, the truncation against a detach-based
implementation and the official scheme's distribution, saved-activation bytes with and without
checkpointing, a toy reward that rises (lr 0 and resume controls), the saved LoRA reloaded by
plain diffusers pipelines, and the training target. Each test names the mutant it catches.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import flowkit
import tiny_pipes as tp
from tiny_pipes import one_thread  # noqa: F401  (autouse fixture)
from flowkit.adapters.base import adapt
from flowkit.errors import InputError, UnsupportedError
from flowkit.finetune import (
    add_lora,
    lora_parameters,
    reward_loss,
    truncation_steps,
)
from flowkit.guidance import CFG
from flowkit.rewards import Reward
from flowkit.seeding import generators_for, randn_per_sample

PROMPTS = ["a red circle and two blue squares", "two green circles and a yellow triangle"]


def _toy(images: torch.Tensor) -> torch.Tensor:
    """A differentiable toy reward of any family's images: closeness to a flat grey 0.3."""
    return -((images - 0.3) ** 2).mean(dim=(1, 2, 3))


TOY = Reward.from_fn(_toy, differentiable=True, name="toy")


def _tiny_with_lora(b_std: float = 0.1):
    """The tiny shapes model with a LoRA whose B is drawn (B = 0 would give A no gradient)."""
    pipe = flowkit.load("tiny")
    params = add_lora(pipe)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in params.items():
            if "lora_B" in name:
                p.normal_(0, b_std, generator=g)
    return pipe, params


def test_lora_gradients_equal_float64_finite_differences():
    """d(-mean reward)/d(LoRA weights) through 4 Euler steps with CFG, checkpointed, equals
    float64 central differences of the whole chain (mutant: `grad_steps` off by one in
    reward_loss gives the gradient of 3 steps, far from the differences); control: K = 1 and
    K = 3 give different gradients (mutant: truncation ignored gives equal ones)."""
    pipe, params = _tiny_with_lora()
    pipe.unet.double()
    adapter = adapt(pipe)
    gens = generators_for(0, range(1))
    noise = randn_per_sample(adapter.latent_shape(32, 32), gens, "cpu", torch.float64)
    names = list(params)
    plist = [params[n] for n in names]
    assert plist[0].dtype == torch.float64

    def loss(k):
        return reward_loss(pipe, TOY, PROMPTS[:1], gens, steps=4, grad_steps=k, guidance=[CFG(scale=3.0)],
                           checkpoint=True, noise=noise)[0]

    grads = {k: torch.autograd.grad(loss(k), plist) for k in (1, 3, 4)}
    eps = 1e-6
    for i, idx in ((0, (0, 0)), (1, (1, 0)), (len(plist) - 1, (0, 1))):
        p = plist[i]
        with torch.no_grad():
            old = float(p[idx])
            p[idx] = old + eps
            plus = float(loss(None))
            p[idx] = old - eps
            minus = float(loss(None))
            p[idx] = old
        fd = (plus - minus) / (2 * eps)
        assert abs(fd) > 1e-7, names[i]
        assert float(grads[4][i][idx]) == pytest.approx(fd, rel=1e-5), names[i]
    flat = {k: torch.cat([g.flatten() for g in v]) for k, v in grads.items()}
    assert not torch.allclose(flat[1], flat[3], rtol=1e-2, atol=0)
    assert not torch.allclose(flat[3], flat[4], rtol=1e-2, atol=0)


def test_grad_steps_equals_a_detach_based_implementation_and_zero_gives_none():
    """reward_loss with grad_steps = K differentiates through the last K steps only: equal to
    a full-graph run whose state is detached before step N - K (mutant: an off-by-one window
    differs from it and from the K+1 reference), and K = 0 leaves no graph at all."""
    pipe, params = _tiny_with_lora()
    adapter = adapt(pipe)
    plist = list(params.values())
    steps = 4

    def reference(k):  # the detach-based implementation: the whole graph, cut before step N - K
        def callback(ctx, step, x, pred):
            return x.detach() if step == steps - k - 1 else None

        out = flowkit.sample(pipe, PROMPTS, steps=steps, generators=generators_for(5, range(2)), grad=True,
                             callback=callback, output_type="latent", guidance=[CFG(scale=3.0)])
        r = TOY(adapter.to_pixels(out.latents), PROMPTS)
        return torch.autograd.grad(-r.mean(), plist)

    def ours(k):
        loss, _ = reward_loss(pipe, TOY, PROMPTS, generators_for(5, range(2)), steps=steps, grad_steps=k,
                              guidance=[CFG(scale=3.0)], checkpoint=False)
        return loss, (torch.autograd.grad(loss, plist) if loss.requires_grad else None)

    for k in (1, 2):
        _, g = ours(k)
        ref, ref_more = reference(k), reference(k + 1)
        for a, b, c in zip(g, ref, ref_more):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-9)
        assert not all(torch.allclose(a, c, rtol=1e-3, atol=1e-9) for a, c in zip(g, ref_more))
    loss0, g0 = ours(0)
    assert not loss0.requires_grad and g0 is None


def test_truncation_follows_the_official_schemes():
    """fixed: K = k; uniform and random: K in 1..N-1, drawn from the generator; random is the
    official t = int(x), x ~ N(42, 5) of 50 steps, t >= 50 redrawn: E[x | x < 50] = 41.41, the
    floor takes 0.5 more, so the mean K is 9.09 (mutant: round() instead of int() gives 8.59);
    uniform's mean is N/2 and K = 1 occurs (mutant: t from randint(0, N - 1) never gives K = 1)."""
    assert truncation_steps("fixed", 10, torch.Generator(), k=3) == 3
    g = torch.Generator().manual_seed(0)
    random = [truncation_steps("random", 50, g) for _ in range(4000)]
    assert min(random) >= 1 and max(random) <= 49
    assert 8.9 < sum(random) / len(random) < 9.3
    uniform = [truncation_steps("uniform", 50, g) for _ in range(4000)]
    assert min(uniform) == 1 and max(uniform) == 49
    assert 24.6 < sum(uniform) / len(uniform) < 25.4  # t uniform on 1..49 (0 redrawn): mean K 25
    a = [truncation_steps("random", 10, torch.Generator().manual_seed(3)) for _ in range(3)]
    assert a == [a[0]] * 3  # a function of the generator only
    with pytest.raises(InputError, match="truncation must be one of"):
        truncation_steps("gaussian", 10, g)
    with pytest.raises(InputError, match="k must be"):
        truncation_steps("fixed", 10, g, k=11)


def test_saved_activation_bytes_stay_flat_in_k_with_checkpointing_and_grow_linearly_without():
    """The bytes autograd saves for the backward pass (saved_tensors_hooks, every saved tensor
    counted) of reward_loss at K = 1, 2, 3: with checkpointing they grow by under 1% of what
    each step adds without it (mutant: checkpoint=True not handed to the run grows them like
    the run without), and without it they grow by the same amount for every step."""
    pipe, _ = _tiny_with_lora()

    def saved(k, checkpoint):
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            reward_loss(pipe, TOY, PROMPTS, generators_for(0, range(2)), steps=4, grad_steps=k,
                        checkpoint=checkpoint)
        return total[0]

    ck = [saved(k, True) for k in (1, 2, 3)]
    full = [saved(k, False) for k in (1, 2, 3)]
    per_step = full[1] - full[0]
    assert per_step > 1e6  # a step's activations: megabytes even on the tiny model
    assert full[2] - full[1] == pytest.approx(per_step, rel=0.01)  # linear in K
    assert ck[2] - ck[0] < 0.01 * (full[2] - full[0])  # flat in K
    assert ck[0] < 0.01 * full[0]


def test_a_toy_reward_rises_lr0_changes_nothing_and_a_resumed_run_equals_an_uninterrupted_one(tmp_path):
    """12 steps of finetune on the tiny model raise the toy reward on held-out prompts (mutant:
    the loss's sign flipped, +mean reward, makes it fall); lr 0 leaves every weight of the
    network bitwise unchanged (mutant: weight decay applied outside the learning rate); a run of
    2 steps resumed to 4 equals a run of 4 bit for bit, history included (mutant: the step's
    streams drawn from a global generator instead of (seed, step))."""
    held = ["three red squares and a blue circle", "a yellow triangle and two green squares"]
    kw = dict(reward=TOY, prompts=PROMPTS, held_out=held, eval_samples=4, batch_size=2, sample_steps=4,
              truncation="uniform", progress=False, seed=3)
    pipe = flowkit.load("tiny")
    res = flowkit.finetune(pipe, steps=12, lr=3e-2, ckpt_every=12, **kw)
    first, last = res.evaluations[0], res.evaluations[-1]
    assert (first["step"], last["step"]) == (0, 12)
    assert last["toy"] > first["toy"] + 0.1 * abs(first["toy"]), res.evaluations  # +16%
    assert {h["K"] for h in res.history} <= {1, 2, 3} and len(res.history) == 12

    pipe = flowkit.load("tiny")
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    flowkit.finetune(pipe, steps=3, lr=0.0, **{**kw, "held_out": None})
    after = dict(pipe.unet.named_parameters())
    lora = lora_parameters(pipe)
    for name, p in after.items():
        if name in lora:
            continue
        assert torch.equal(p, before[name.replace(".base_layer", "")]), name
    init = add_lora(flowkit.load("tiny"), seed=3)  # the same initial LoRA
    assert all(torch.equal(lora[n], init[n]) for n in lora)

    kw.update(held_out=None, lr=3e-2, ckpt_every=2)
    whole = flowkit.finetune(flowkit.load("tiny"), steps=4, out_dir=tmp_path / "whole", **kw)
    flowkit.finetune(flowkit.load("tiny"), steps=2, out_dir=tmp_path / "parts", **kw)
    pipe = flowkit.load("tiny")
    parts = flowkit.finetune(pipe, steps=4, out_dir=tmp_path / "parts", **kw)
    def timeless(history):
        return [{k: v for k, v in h.items() if k != "seconds"} for h in history]

    assert timeless(parts.history) == timeless(whole.history)
    w = torch.load(tmp_path / "whole" / "latest.pt", weights_only=True)["lora"]
    assert all(torch.equal(p, w[n]) for n, p in lora_parameters(pipe).items())
    assert sorted(parts.checkpoints) == [2, 4]
    with pytest.raises(InputError, match="other settings"):
        flowkit.finetune(flowkit.load("tiny"), steps=4, out_dir=tmp_path / "parts", **{**kw, "batch_size": 1})


def _sample_pair(name: str, pipe, folder, steps: int, scale: float):
    """flowkit's latents from `pipe` (LoRA active) and diffusers' from a fresh pipeline with the
    saved LoRA loaded, and without it."""
    ours = flowkit.sample(pipe, tp.PROMPTS, steps=steps, guidance=[CFG(scale=scale)], generators=tp.gens(),
                          output_type="latent", **tp.SIZE).images
    plain = tp.build(name)
    # FLUX: flowkit's CFG runs on a negative-prompt branch, diffusers' true_cfg_scale
    cfg = dict(true_cfg_scale=scale, negative_prompt=[""] * len(tp.PROMPTS)) if name == "flux" else \
        dict(guidance_scale=scale)

    def theirs():
        return plain(tp.PROMPTS, num_inference_steps=steps, generator=tp.gens(), output_type="latent", **cfg,
                     **tp.SIZE).images

    without = theirs()
    plain.load_lora_weights(str(folder))
    return ours, theirs(), without


@pytest.mark.parametrize("name", ["sd", "sdxl", "sd3", "flux"])
def test_the_saved_lora_reloads_into_a_plain_diffusers_pipeline(name, tmp_path):
    """A LoRA fine-tuned by flowkit.finetune (toy reward, 2 steps) and saved with diffusers'
    save_lora_weights reloads into a fresh diffusers pipeline with load_lora_weights and
    reproduces flowkit's latents to 1e-4 of their std (mutant: saving the peft state without
    the adapter's name, i.e. the wrong adapter, or dropping to_out.0); control: the pipeline
    without the LoRA misses by far. The reward saw exactly `to_pixels` of the latents in
    [-1, 1] (mutant: the official double normalisation, (x / 2 + 0.5) before the reward)."""
    pipe = tp.build(name)
    seen = []

    def spy(images):
        seen.append(images.detach().clone())
        return _toy(images)

    reward = Reward.from_fn(spy, differentiable=True, name="spy")
    res = flowkit.finetune(pipe, reward=reward, prompts=PROMPTS, steps=2, batch_size=2, sample_steps=3, lr=0.05,
                           truncation="fixed", k=2, out_dir=tmp_path, progress=False, guidance=[CFG(scale=3.0)])
    assert res.lora_dir == tmp_path / "lora" and (res.lora_dir / "pytorch_lora_weights.safetensors").is_file()
    ours, theirs, without = _sample_pair(name, pipe, res.lora_dir, steps=4, scale=5.0)
    assert tp.rel_err(ours, theirs) < tp.TOL
    assert tp.rel_err(without, theirs) > 10 * tp.TOL

    # the reward's input: to_pixels of the run's final latents, as flowkit.sample gives them
    from flowkit.finetune import _step_streams

    pipe.disable_lora()  # the LoRA of step 0 (B = 0) is the identity
    rng, gens, _ = _step_streams(0, 0, 2)  # step 0's streams, drawn as finetune draws them
    rows = [PROMPTS[i] for i in rng.integers(len(PROMPTS), size=2)]
    first = flowkit.sample(pipe, rows, steps=3, guidance=[CFG(scale=3.0)], generators=gens, output_type="latent")
    assert torch.allclose(seen[0], adapt(pipe).to_pixels(first.latents), rtol=1e-5, atol=1e-6)
    assert seen[0].min() < -0.2  # in [-1, 1], not [0, 1]


def test_finetune_refuses_what_it_cannot_train():
    pipe = tp.build("sd")
    with pytest.raises(InputError, match="not differentiable"):
        flowkit.finetune(pipe, reward="oracle", prompts=PROMPTS, steps=1)
    with pytest.raises(UnsupportedError, match="scores shapes images"):
        flowkit.finetune(pipe, reward="count", prompts=PROMPTS, steps=1)
    with pytest.raises(InputError, match="truncation must be one of"):
        flowkit.finetune(pipe, reward=TOY, prompts=PROMPTS, steps=1, truncation="gaussian")
    with pytest.raises(InputError, match="training prompts"):
        flowkit.finetune(pipe, reward=TOY, prompts=[], steps=1)
    add_lora(pipe)
    with pytest.raises(InputError, match="already has a LoRA named 'alignprop'"):
        add_lora(pipe)


def test_flowkit_finetune_is_the_callable_module_whatever_the_import_order():
    """`flowkit.finetune(...)` calls the function and `flowkit.finetune.save_lora` is there,
    whether the lazy attribute or an import came first (mutant: _LAZY handing out the function
    makes `import flowkit.finetune as F; F.save_lora` fail after a lazy access)."""
    import subprocess
    import sys

    check = ("import inspect, flowkit\n{first}\nimport flowkit.finetune as F\n"
             "assert flowkit.finetune is F and callable(F) and F.save_lora and F.finetune\n"
             "assert 'reward' in inspect.signature(flowkit.finetune).parameters\n")
    for first in ("f = flowkit.finetune", "import flowkit.finetune"):
        r = subprocess.run([sys.executable, "-c", check.format(first=first)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]


def test_the_alignprop_target_trains_resumes_and_exports_a_merged_model(tmp_path):
    """`flowkit train alignprop:...` on the tiny model: the held-out split is fixed and
    disjoint, the run resumes, and the export (the LoRA merged into the UNet) samples what the
    LoRA pipeline samples (mutant: exporting the UNet without merging misses)."""
    from flowkit.train import target, train
    from flowkit.train.alignprop import split_prompts

    train_p, held = split_prompts("two", 16)
    assert len(train_p) == 32 and len(held) == 16 and not set(train_p) & set(held)
    assert split_prompts("two", 16) == (train_p, held)
    task, cfg = target("alignprop:model=tiny,sample_steps=3,eval_samples=2,truncation=fixed,k=2")
    assert (task.truncation, task.k, cfg.lr, cfg.weight_decay) == ("fixed", 2, 1e-3, 1e-4)
    cfg = dataclasses.replace(cfg, steps=2, batch_size=2, lr=3e-2, ckpt_every=1)
    losses = train(task, cfg, tmp_path, progress=False)
    assert len(losses) == 2
    more = train(task, dataclasses.replace(cfg, steps=3), tmp_path, progress=False)
    assert len(more) == 1
    state = torch.load(tmp_path / "latest.pt", weights_only=True)
    assert [e["step"] for e in state["evaluations"]] == [0, 1, 2, 3] and "oracle" in state["evaluations"][0]

    from flowkit.finetune import load_lora
    from flowkit.train.loop import merged_copy
    from flowkit.worlds.shapes_pipeline import ShapesPipeline

    pipe = flowkit.load("tiny")
    load_lora(pipe, tmp_path / "lora")  # the final LoRA, as diffusers reloads it
    merged = merged_copy(pipe.unet)
    exported = flowkit.load(str(tmp_path / "export"))  # fp16 weights, as every shapes export
    for name, w in exported.unet.state_dict().items():
        assert torch.equal(w, merged.state_dict()[name].half().float()), name
    a = flowkit.sample(pipe, PROMPTS, steps=3, seed=2, output_type="latent").latents
    b = flowkit.sample(ShapesPipeline(**{**pipe.components, "unet": merged}), PROMPTS, steps=3, seed=2,
                       output_type="latent").latents
    c = flowkit.sample(flowkit.load("tiny"), PROMPTS, steps=3, seed=2, output_type="latent").latents
    assert tp.rel_err(b, a) < tp.TOL and tp.rel_err(c, a) > 10 * tp.TOL
    with pytest.raises(Exception, match="unknown option 'modle'"):
        target("alignprop:modle=tiny")


def test_curves_reach_the_gallery_and_the_docs(tmp_path):
    """A curve recorded with flowkit.gallery.curve is drawn as an SVG by build_gallery, even for
    an experiment without pictures (mutant: curves read only where picture entries exist
    raises 'no gallery entries'), and tabulated by format_result."""
    import xml.dom.minidom

    from flowkit.bench import BenchResult, BenchRun, ResultCache
    from flowkit.bench.cache import write_json_atomic
    from flowkit.bench.report import format_result
    from flowkit.gallery import build_gallery, curve

    bench = BenchRun("curvy", seed=1, cache=ResultCache(tmp_path / "cache"))
    curve(bench, "reward against steps", x_label="step", series={"held-out": ([0, 50], [-2.0, -1.5]),
                                                                 "training": ([25, 50], [-1.8, -1.2])})
    result = BenchResult("curvy", "a curve", False, 1, [], bench.info, {}, {}, "2026-01-01", 1.0)
    write_json_atomic(tmp_path / "results" / "curvy.json", result.to_dict(), indent=1)
    index = build_gallery(tmp_path / "results", tmp_path / "gallery", model="tiny", load=lambda name: None)
    svg = tmp_path / "gallery" / "curvy" / "curve-reward-against-steps.svg"
    assert "(curvy/curve-reward-against-steps.svg)" in index.read_text()
    dom = xml.dom.minidom.parse(str(svg))
    assert len(dom.getElementsByTagName("polyline")) == 2
    text = format_result(result)
    assert "| step | held-out | training |" in text and "| 25 | - | -1.8 |" in text and "| 50 | -1.5 | -1.2 |" in text
    with pytest.raises(InputError, match="as many x as y"):
        curve(bench, "bad", x_label="x", series={"a": ([1, 2], [1.0])})


def test_the_alignprop_bench_runs_quick_and_reuses_its_fine_tunes(tmp_path, monkeypatch):
    """`flowkit bench alignprop --quick` (tiny model): its rows, memory and curves, and a second
    run takes the fine-tunes from the bench cache (mutant: a cache key that changes between
    runs trains again, which the patched finetune refuses)."""
    from flowkit.bench import run_experiment

    first = run_experiment("alignprop", quick=True, out_dir=tmp_path / "out", cache_root=tmp_path / "cache")
    methods = {(r.method, r.metric) for r in first.rows}
    assert ("AlignProp, step 4", "held-out count reward") in methods
    assert ("AlignProp, step 4", "FSD") in methods and ("randomised truncation, step 4", "whole caption") in methods
    mem = first.info["memory"]
    assert mem["checkpointed_MiB"][2] - mem["checkpointed_MiB"][0] < 0.01 * (
        mem["not_checkpointed_MiB"][2] - mem["not_checkpointed_MiB"][0])
    assert [c["title"] for c in first.info["curves"]][0] == "AlignProp: reward against fine-tune steps"
    assert set(first.info["split"]["held_out"]).isdisjoint(first.info["split"]["training"])

    import flowkit.finetune as F

    def refuse(*args, **kwargs):
        raise AssertionError("the bench trained again")

    monkeypatch.setattr(F, "finetune", refuse)
    second = run_experiment("alignprop", quick=True, out_dir=tmp_path / "out2", cache_root=tmp_path / "cache")
    assert [r.estimate for r in second.rows if r.method != "checkpointing"] == \
        [r.estimate for r in first.rows if r.method != "checkpointing"]
