"""FRAP and counting guidance: their losses, their updates against hand transcriptions, their
costs, and the drop-in on every family. Each test names the mutant it catches."""

from __future__ import annotations

import math

import pytest
import torch

import flowkit
import tiny_pipes
from flowkit.conditioning import Conditioning
from flowkit.context import Context
from flowkit.denoiser import FunctionDenoiser
from flowkit.guidance import CFG, GuidanceStack
from flowkit.guidance.counting import CountingGuidance, attention_loss, count_loss, region_masks
from flowkit.guidance.frap import FRAP, binding_overlap, frap_loss, presence_loss
from flowkit.kit import ModelKit
from flowkit.paths.vp import VPCosinePath
from flowkit.samplers import Euler, Heun
from flowkit.sampling_loop import integrate
from flowkit.seeding import generators_for, randn_per_sample
from flowkit.timegrid import TimeGrid
from flowkit.tokens import TokenGroup

one_thread = tiny_pipes.one_thread
PROMPTS = ["two red circles and a blue square", "a green triangle and three yellow circles"]


# --------------------------------------------------------------------------- FRAP: losses


def _block(h=8, w=8, at=(2, 2), value=1.0):
    m = torch.zeros(h, w)
    m[at[0]:at[0] + 3, at[1]:at[1] + 3] = value
    return m


def test_presence_and_binding_on_synthetic_maps():
    """A map reaching 1 gives presence loss 0, a flat zero map 1 (mutant: max -> mean fails);
    coincident maps bind better than disjoint ones (mutant: a flipped sign of the binding)."""
    from flowkit.guidance._maps import smooth

    peak = smooth(_block())  # a 3x3 plateau of 1: its smoothed centre stays 1
    assert presence_loss(peak) == pytest.approx(0.0, abs=1e-6)
    assert presence_loss(torch.zeros(8, 8)) == pytest.approx(1.0)
    a, b = _block(at=(0, 0)), _block(at=(5, 5))
    assert binding_overlap(a, a) == pytest.approx(1.0) and binding_overlap(a, b) == pytest.approx(0.0)
    maps = torch.stack([a, a, b])  # token 0: object, 1: a modifier where it is, 2: one elsewhere
    bound = frap_loss(maps, [TokenGroup(object=(0,), modifiers=((1,),))], binding=1.0)
    apart = frap_loss(maps, [TokenGroup(object=(0,), modifiers=((2,),))], binding=1.0)
    assert bound < apart and apart - bound == pytest.approx(1.0)


def test_ae_normalisation_is_a_softmax_over_word_tokens():
    """norm='ae': softmax of 100 A over each row's word tokens only, others 0 (mutant: over all tokens)."""
    from flowkit.guidance._maps import normalize_maps

    maps = torch.rand(1, 5, 4, 4)
    out = normalize_maps(maps, [(1, 2, 3)], "ae")
    assert torch.allclose(out[0, [1, 2, 3]].sum(dim=0), torch.ones(4, 4))
    assert out[0, 0].abs().max() == 0 and out[0, 4].abs().max() == 0
    assert torch.equal(normalize_maps(maps, [(1, 2, 3)], "raw"), maps)


# --------------------------------------------------------------------------- FRAP: runs


def _shapes_run(guidance, steps=6, sampler="euler", prompts=PROMPTS):
    pipe = flowkit.load("tiny")
    return flowkit.sample(pipe, prompts, steps=steps, seed=2, sampler=sampler, guidance=guidance,
                          output_type="latent")


def test_frap_with_lr_zero_is_bit_identical_and_weights_touch_only_the_conditional_rows(monkeypatch):
    """lr = 0 leaves every latent bit-identical to the base stack (mutant: weights applied
    to the unconditional branch, or a non-1 initial weight, changes them); with lr > 0 the
    network sees other conditional embeddings and the very same unconditional ones (a spy on
    its inputs), and the run changes."""
    base = _shapes_run([CFG(scale=4.0)])
    zero = _shapes_run([CFG(scale=4.0), FRAP(lr=0.0, stop=0.5)])
    assert torch.equal(zero.latents, base.latents)
    assert zero.stats.nfe == [n + 3 for n in base.stats.nfe] and zero.stats.backward_calls == 3

    seen = []
    from flowkit.denoiser import UNetDenoiser

    real = UNetDenoiser.forward

    def spy(self, x, timestep, cond):
        seen.append(cond["encoder_hidden_states"].detach().clone())
        return real(self, x, timestep, cond)

    monkeypatch.setattr(UNetDenoiser, "forward", spy)
    _shapes_run([CFG(scale=4.0)])
    plain = list(seen)
    seen.clear()
    moved = _shapes_run([CFG(scale=4.0), FRAP(lr=50.0, stop=0.5)])
    assert not torch.equal(moved.latents, base.latents)
    # the batched forwards of the last step (no update there): rows [cond (2); uncond (2)]
    last_plain, last_frap = plain[-1], seen[-1]
    assert torch.equal(last_plain[2:], last_frap[2:])  # the unconditional rows are untouched
    assert not torch.equal(last_plain[:2], last_frap[:2])


def test_frap_stop_zero_gives_the_base_run_and_nfe():
    """An empty window updates nothing: the base latents and NFE (mutant: an update outside
    the window costs an evaluation)."""
    base = _shapes_run([CFG(scale=4.0)])
    out = _shapes_run([CFG(scale=4.0), FRAP(lr=5.0, stop=0.0)])
    assert torch.equal(out.latents, base.latents) and out.stats.nfe == base.stats.nfe
    assert out.stats.backward_calls == 0


def test_layers_given_as_globs_read_the_layers_they_name():
    """`layers=` takes globs as the attention store does: FRAP and counting guidance read the
    maps of the names a glob matches, the same as the names written out (mutant: reading the
    store by the glob itself fails with 'no captured map'); another layer gives another run."""
    pipe = flowkit.load("tiny")
    names = [n for n in _layer_names(pipe) if n.startswith("up_blocks.1.attentions.0")]
    assert names
    for make in (lambda layers: FRAP(lr=50.0, stop=0.5, layers=layers),
                 lambda layers: CountingGuidance(scale=1.0, counter=lambda img: (img + 1).mean(dim=(1, 2, 3)),
                                                 layers=layers)):
        globbed = _shapes_run([CFG(scale=4.0), make("up_blocks.1.attentions.0.*")], steps=3, prompts=PROMPTS[:1])
        named = _shapes_run([CFG(scale=4.0), make(names)], steps=3, prompts=PROMPTS[:1])
        other = _shapes_run([CFG(scale=4.0), make("down_blocks.1.*")], steps=3, prompts=PROMPTS[:1])
        assert torch.equal(globbed.latents, named.latents)
        assert not torch.equal(globbed.latents, other.latents)


def _layer_names(pipe):
    from flowkit.attention import session

    with session(pipe.unet, None) as store:
        return list(store.layers)


def test_frap_updates_once_per_step_under_heun():
    """Heun evaluates twice per step; FRAP updates once (mutant: an update per evaluation
    doubles the extra evaluations)."""
    base = _shapes_run([CFG(scale=4.0)], steps=4, sampler="heun")
    out = _shapes_run([CFG(scale=4.0), FRAP(lr=5.0, stop=0.5)], steps=4, sampler="heun")
    assert out.stats.nfe == [n + 2 for n in base.stats.nfe] and out.stats.backward_calls == 2
    assert [r.branches.get("frap", 0) for r in out.stats.steps] == [2, 2, 0, 0]


def test_frap_loss_gradient_matches_finite_differences_on_tiny_sd():
    """d(loss)/d(weights) by autograd equals float64 central differences on tiny SD (control:
    the loss of another token's presence gives another derivative)."""
    from flowkit.adapters.base import adapt
    from flowkit.attention import session
    from flowkit.guidance._maps import layer_maps, normalize_maps, smooth

    pipe = tiny_pipes.cached("sd")
    adapter = adapt(pipe)
    unet = pipe.unet.double()
    try:
        prompt = "a red cat"
        cond = adapter.encode([prompt], None, False)["cond"].to(dtype=torch.float64)
        text = [adapter.kit().text_tokens(prompt)]
        groups = adapter.token_groups([prompt], words=[("cat", "red")])[0]
        x = torch.randn(1, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        den = adapter.denoiser

        def loss(w, token=None):
            c = cond.replace(encoder_hidden_states=cond["encoder_hidden_states"] * w[..., None])
            with session(unet) as store:
                store.request(store.layers, 0)
                with store.forward(0, [("frap", torch.tensor([0]))], (8, 8)):
                    den(x, torch.tensor([0.5], dtype=torch.float64), c)
                maps = smooth(normalize_maps(layer_maps(store, store.layers, 0, "frap", 1), text, "ae"))
            if token is not None:
                return presence_loss(maps[0, token])
            return frap_loss(maps[0], groups, 1.0)

        L = cond["encoder_hidden_states"].shape[1]
        w = torch.ones(1, L, dtype=torch.float64, requires_grad=True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(loss(w), w)
            (g_other,) = torch.autograd.grad(loss(w, token=groups[0].modifiers[0][0]), w)
        pos = list(groups[0].positions)
        eps = 1e-5
        for i in pos[:3]:
            e = torch.zeros_like(w)
            e[0, i] = eps
            with torch.no_grad():
                fd = (loss(w + e) - loss(w - e)) / (2 * eps)
            assert float(g[0, i]) == pytest.approx(float(fd), rel=1e-5, abs=1e-9)
        assert not torch.allclose(g[0, pos], g_other[0, pos], rtol=1e-3, atol=1e-9)
    finally:
        pipe.unet.float()


# --------------------------------------------------------------------------- counting: losses


def test_count_and_attention_losses():
    """count_loss is sum ((c - N) / N)^2 over asked kinds only (mutant: unasked kinds count);
    the attention loss is the official sum min - 0.1 sum max + 0.3 |sum a - sum b| after
    min-max normalisation."""
    c = torch.tensor([[2.0, 5.0, 1.0]])
    n = torch.tensor([[4.0, 0.0, 1.0]])
    assert count_loss(c, n).item() == pytest.approx(0.25)
    a, b = _block(at=(0, 0)), _block(at=(5, 5)) * 3
    expect = 0.0 - 0.1 * 18 + 0.3 * 0.0
    assert attention_loss(a, b).item() == pytest.approx(expect)
    assert attention_loss(a, a).item() == pytest.approx(9 - 0.9)


def test_swapped_word_groups_give_swapped_masks(monkeypatch):
    """The per-object masks come from each group's own attention map: the same prompt with its
    word groups given in swapped order gives, at every step, the masks swapped (and the same
    run), while the two objects' masks differ (mutant: `_object_maps` taking the maps in prompt
    order, not the groups' order, gives the masks unswapped). On synthetic maps, region masks
    follow the maps."""
    from flowkit.guidance import counting

    maps = torch.stack([_block(at=(0, 0)), _block(at=(5, 5))]) + 0.01
    m = region_masks(maps, (16, 16))
    assert torch.equal(m.flip(0), region_masks(maps.flip(0), (16, 16)))
    assert m[0, 2, 2] == 1 and m[0, 12, 12] == 0 and m[1, 12, 12] == 1

    seen = []

    def spy(maps, size):
        out = region_masks(maps, size)
        seen.append(out)
        return out

    monkeypatch.setattr(counting, "region_masks", spy)
    pipe = flowkit.load("tiny")
    counter = lambda img: (img + 1).mean(dim=(1, 2, 3))  # noqa: E731 (class-agnostic: masks from the maps)
    runs = []
    for words, targets in ((["circles red", "square blue"], [2, 1]), (["square blue", "circles red"], [1, 2])):
        seen.clear()
        out = flowkit.sample(pipe, PROMPTS[:1], steps=3, seed=0, output_type="latent", guidance=[
            CFG(scale=4.0), CountingGuidance(scale=1.0, counter=counter, targets=targets, words=words)])
        runs.append((out.latents, list(seen)))
    (first, masks), (second, swapped) = runs
    assert len(masks) == len(swapped) == 3
    for a, b in zip(masks, swapped):
        assert a.shape[0] == 2 and not torch.equal(a[0], a[1])
        assert torch.equal(a.flip(0), b)
    assert torch.equal(first, second)


# --------------------------------------------------------------------------- counting: the update


def _eps_toy(z, timestep, cond):
    return 0.5 * torch.tanh(z + cond["shift"].view(-1, 1))


def _counter(img):
    return torch.sigmoid(3.0 * img.flatten(1)).sum(dim=1)  # [B]: a soft count


def _vp_context(kind="epsilon", modules=(), batch=3):
    path = VPCosinePath()

    def fn(z, timestep, cond):  # the eps toy, expressed as `kind`
        s = (timestep / 1000).view(-1, 1).to(z.dtype)
        a, sg = torch.cos(s * math.pi / 2), torch.sin(s * math.pi / 2)
        eps = _eps_toy(z, timestep, cond)
        x0 = (z - sg * eps) / a
        return {"epsilon": eps, "x0": x0, "v": a * eps - sg * x0}[kind]

    den = FunctionDenoiser(fn, path, kind)
    conds = {"cond": Conditioning({"shift": torch.full((batch,), 0.3, dtype=torch.float64)}),
             "uncond": Conditioning({"shift": torch.full((batch,), -0.2, dtype=torch.float64)})}
    kit = ModelKit(to_pixels=lambda x: x, counter=_counter)
    return Context(den, GuidanceStack(list(modules)), conds, generators_for(0, range(batch)), 4, kit=kit)


TIMES = [0.8, 0.6, 0.4, 0.2, 0.0]


def _flowkit_counting(kind="epsilon", scale=0.5, target=3, w=2.0):
    mods = [CFG(scale=w)] + ([CountingGuidance(scale=scale, counter=_counter, targets=[target])] if scale is not None
                             else [])
    ctx = _vp_context(kind, mods)
    noise = randn_per_sample((5,), generators_for(0, range(3))).double()
    x, stats = integrate(Euler(), ctx, noise, TimeGrid.from_times(TIMES).build(4, ctx.denoiser.path))
    return x, stats, noise


def _official_counting(noise, scale=0.5, target=3, w=2.0):
    """The official step (counting_guidance_pipeline, DDIM eta 0) transcribed on the toy:
    eps = CFG; x0 = (z - sqrt(1-a) eps) / sqrt(a); g = s dL/dz with eps fixed;
    eps' = eps + sqrt(1-a) g; z_prev = sqrt(a_prev) x0' + sqrt(1-a_prev) eps'."""
    path = VPCosinePath()
    ts = torch.tensor(TIMES, dtype=torch.float64)
    p0 = path.at(ts[:1])
    z = noise * ts[0] * (p0.alpha + p0.sigma)  # flowkit's start noise * t0, in the native frame
    cu = {"shift": torch.full((3,), -0.2, dtype=torch.float64)}
    cc = {"shift": torch.full((3,), 0.3, dtype=torch.float64)}
    for i in range(len(TIMES) - 1):
        p, q = path.at(ts[i:i + 1]), path.at(ts[i + 1:i + 2])
        sa, s1a = p.alpha, p.sigma  # sqrt(abar), sqrt(1 - abar)
        eps = _eps_toy(z, None, cu) + w * (_eps_toy(z, None, cc) - _eps_toy(z, None, cu))
        zg = z.detach().requires_grad_(True)
        x0 = (zg - s1a * eps) / sa
        loss = ((_counter(x0) - target) / target) ** 2
        (g,) = torch.autograd.grad(loss.sum(), zg)
        eps2 = eps + s1a * scale * g
        x0n = (z - s1a * eps2) / sa
        z = q.alpha * x0n + q.sigma * eps2
    return z


def test_counting_matches_the_official_update_on_a_vp_epsilon_toy():
    """flowkit's counting guidance (Euler in the flow frame = DDIM) equals the official
    update transcribed by hand, to 1e-6 (mutants: a flipped sign, sigma/alpha instead of
    (sigma/alpha)^2 in x0, the uncombined conditional eps, each miss by far more); scale 0
    is bit-identical to the base stack."""
    x, stats, noise = _flowkit_counting()
    ref = _official_counting(noise)
    assert torch.allclose(x, ref, atol=1e-6, rtol=0), (x - ref).abs().max()
    assert stats.backward_calls == 4 and stats.nfe == [8, 8, 8]
    wrong = _official_counting(noise, scale=-0.5)
    assert (x - wrong).abs().max() > 1e-3
    x0_, _, _ = _flowkit_counting(scale=0.0)
    base, _, _ = _flowkit_counting(scale=None)
    assert torch.equal(x0_, base)


@pytest.mark.parametrize("kind", ["x0", "v"])
def test_counting_is_the_same_in_every_prediction_frame(kind):
    """The same toy as an x0 or a v model gives the same guided run (mutant: an update
    written in one prediction space moves the others differently)."""
    eps, _, _ = _flowkit_counting("epsilon")
    other, _, _ = _flowkit_counting(kind)
    assert torch.allclose(eps, other, atol=1e-9, rtol=0), (eps - other).abs().max()


def test_counting_raises_a_toy_count_and_leaves_a_met_target_alone():
    """On a toy counter (mass of the red channel), guidance raises the count towards a larger
    target. Control: a counter that reads 7 with a nonzero gradient (7 + (img - img.detach()))
    leaves the run bit-identical at targets=[7] (the loss and its gradient are 0 there) and
    moves it at targets=[8] (mutant: the count pushed up whatever the target, the gradient of
    -sum c instead of the loss's, passes the red run and the old constant-counter control but
    moves the targets=[7] run)."""
    pipe = flowkit.load("tiny")
    from flowkit.adapters.base import adapt

    def red(img):
        return (img[:, 0] + 1).clamp_min(0).mean(dim=(1, 2)) * 10  # [B]

    kw = dict(steps=6, seed=4, output_type="latent")
    base = flowkit.sample(pipe, ["a red circle"] * 2, guidance=[CFG(scale=4.0)], **kw)
    current = red(adapt(pipe).to_pixels(base.latents)).mean().item()
    more = flowkit.sample(pipe, ["a red circle"] * 2, guidance=[CFG(scale=4.0), CountingGuidance(
        scale=40.0, counter=red, targets=[round(current) + 6], start=0.3)], **kw)
    assert red(more.latents).mean().item() > current + 0.5

    def seven(img):  # the value 7, the gradient 1 on every pixel
        return 7.0 + (img - img.detach()).flatten(1).sum(dim=1)

    def run(target):
        return flowkit.sample(pipe, ["a red circle"] * 2, guidance=[CFG(scale=4.0), CountingGuidance(
            scale=3.0, counter=seven, targets=[target], start=0.3)], **kw)

    same, other = run(7), run(8)
    assert torch.equal(same.latents, base.latents) and same.stats.backward_calls > 0
    assert not torch.equal(other.latents, base.latents)


def test_counting_without_a_counter_is_refused_on_sd():
    """SD has no counter of its own: counting guidance without counter= is refused before the
    run, in one line saying what to pass (mutant: refuse() without its counter check lets the
    run reach the counter and fail with a TypeError on None)."""
    from flowkit.errors import UnsupportedError

    pipe = tiny_pipes.cached("sd")
    with pytest.raises(UnsupportedError, match=r"^counting guidance needs a counter for this model: pass counter=") \
            as e:
        flowkit.sample(pipe, ["a red cat"], steps=2, height=32, width=32, output_type="latent",
                       guidance=[CFG(scale=3.0), CountingGuidance(scale=1.0, targets=[1])])
    assert "\n" not in str(e.value) and "[B, 3, H, W] -> counts [B] or [B, K]" in str(e.value)


def test_counting_nfe_without_and_with_the_attention_loss():
    """Counting costs no evaluation; the attention loss costs one per step (mutant: charging
    the counter as NFE, or evaluating without charging)."""
    pipe = flowkit.load("tiny")
    kw = dict(steps=4, seed=1, output_type="latent")
    base = flowkit.sample(pipe, PROMPTS, guidance=[CFG(scale=4.0)], **kw)
    count = flowkit.sample(pipe, PROMPTS, guidance=[CFG(scale=4.0), CountingGuidance(scale=1.0)], **kw)
    att = flowkit.sample(pipe, PROMPTS, guidance=[CFG(scale=4.0), CountingGuidance(scale=1.0, attention=1.0)], **kw)
    assert count.stats.nfe == base.stats.nfe and count.stats.backward_calls == 4
    assert att.stats.nfe == [n + 4 for n in base.stats.nfe] and att.stats.backward_calls == 8
    assert all(r.branches.get("counting") == 2 for r in att.stats.steps)


def test_class_agnostic_counter_counts_each_object_in_its_region():
    """A [B] counter with two asked objects counts each in its attention region (0 extra NFE;
    control: the masks' counts differ from the whole image's)."""
    pipe = flowkit.load("tiny")
    calls = []

    def counter(img):
        calls.append(img.detach())
        return (img + 1).mean(dim=(1, 2, 3))

    out = flowkit.sample(pipe, PROMPTS[:1], steps=3, seed=0, output_type="latent",
                         guidance=[CFG(scale=4.0), CountingGuidance(scale=1.0, counter=counter)])
    assert out.stats.nfe == [6]
    whole, first, second = calls[0], calls[1], calls[2]
    assert not torch.equal(first, whole) and not torch.equal(first, second)
    assert out.stats.reward_calls == 3 * 3


# --------------------------------------------------------------------------- positions=


def _embeds_or_text_run(pipe, module, prompt, embeds):
    """CFG 3 + `module` through the drop-in, from the prompt's text or its embeddings."""
    from flowkit.pipelines import FlowKitPipeline

    fk = FlowKitPipeline.from_pipe(pipe, guidance=[CFG(scale=3.0), module])
    kw = dict(num_inference_steps=4, output_type="latent", height=32, width=32,
              generator=torch.Generator().manual_seed(0))
    if embeds:
        emb, neg = pipe.encode_prompt(prompt, "cpu", 1, True)
        out = fk(prompt_embeds=emb, negative_prompt_embeds=neg, **kw)
    else:
        out = fk([prompt], **kw)
    return out.images, fk.stats


def test_positions_with_prompt_embeddings_run_both_modules_on_tiny_sd():
    """Prompt embeddings with positions= give, for FRAP and counting guidance, the very run
    that the prompt's text with the same words gives (mutants: positions not reaching the
    module, or the stack's description choking on them, fail the run; a wrong token, e.g.
    check_positions shifting a position by one, changes it); other positions give another run."""
    pipe = tiny_pipes.cached("sd")
    prompt = "red cat, dog"  # the tiny CLIP is character-level: red 1-3, cat 4-6, dog 8-10
    words, right = ["cat red", "dog"], [[[[4, 5, 6], [1, 2, 3]], [[8, 9, 10]]]]
    wrong = [[[[8, 9, 10], [1, 2, 3]], [[4, 5, 6]]]]
    counter = lambda img: (img + 1).mean(dim=(1, 2, 3))  # noqa: E731 (class-agnostic: masks from the maps)
    for make in (lambda **kw: FRAP(lr=50.0, stop=0.5, norm="raw", **kw),
                 lambda **kw: CountingGuidance(scale=1.0, counter=counter, targets=[1, 2], norm="raw", **kw)):
        text, text_stats = _embeds_or_text_run(pipe, make(words=words), prompt, embeds=False)
        given, given_stats = _embeds_or_text_run(pipe, make(positions=right), prompt, embeds=True)
        other, _ = _embeds_or_text_run(pipe, make(positions=wrong), prompt, embeds=True)
        assert torch.equal(given, text) and given_stats.backward_calls == text_stats.backward_calls > 0
        assert not torch.equal(other, given)
        assert "positions=custom" in given_stats.guidance


def test_positions_are_refused_in_a_spec_and_in_a_flat_list():
    """A spec (the CLI) cannot hold positions' nested lists, and a flat list is not per prompt,
    per group, per word: both refused at construction with one line naming the form (mutant:
    given_positions without its flat-list check gives no spec hint)."""
    from flowkit.errors import SpecError
    from flowkit.registry import GUIDANCE
    from flowkit.spec import build

    for spec in ("frap:positions=[3;2]", "counting:positions=custom", "frap:positions=3"):
        with pytest.raises(SpecError, match=r"positions=.*per prompt, per group, per word.*\[\[\[5, 2\]\]\]") as e:
            build(GUIDANCE, spec)
        assert "\n" not in str(e.value) and "spec cannot hold nested lists" in str(e.value)
    for make in (FRAP, CountingGuidance):
        with pytest.raises(ValueError, match="not per prompt, per group, per word"):
            make(positions=[3, 2])
        with pytest.raises(ValueError, match=r"positions\[0\]\[0\] is empty"):
            make(positions=[[[]]])


# --------------------------------------------------------------------------- every family


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_dropin_runs_frap_and_counting_on_every_family(family):
    """FlowKitPipeline runs both modules on tiny SD, SDXL, SD3 and FLUX (words given: these
    families have no parser), with the NFE and backward passes they declare."""
    from flowkit.pipelines import FlowKitPipeline

    pipe = tiny_pipes.cached(family)
    words = ["cat red"]
    counter = lambda img: (img + 1).mean(dim=(1, 2, 3))  # noqa: E731
    fk = FlowKitPipeline.from_pipe(pipe, guidance=[CFG(scale=3.0), FRAP(lr=2.0, words=words, stop=0.5),
                                                   CountingGuidance(scale=1.0, counter=counter, targets=[1])])
    kw = dict(num_inference_steps=4, output_type="latent", generator=torch.Generator().manual_seed(0),
              height=32, width=32)
    if family == "flux":
        kw["true_cfg_scale"] = 3.0
        kw["negative_prompt"] = ""
    out = fk(["a red cat"], **kw)
    assert fk.stats.backward_calls == 2 + 4  # FRAP's 2 updates, counting's 4 steps
    assert torch.isfinite(out.images if hasattr(out, "images") else out[0]).all()
    base = FlowKitPipeline.from_pipe(pipe, guidance=[CFG(scale=3.0)])
    base(["a red cat"], **kw)
    assert fk.stats.nfe == [n + 2 for n in base.stats.nfe]
