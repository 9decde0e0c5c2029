"""GFCG: exact reduction with a confident classifier, the push and its NFE, target and
reference choice, captions, refusals and bad parameters."""

import pytest
import torch

import flowkit
import tiny_pipes
from analytic import conds, context, gaussian_velocity
from flowkit.conditioning import Conditioning
from flowkit.errors import InputError, SpecError, UnsupportedError
from flowkit.guidance import CFG, GFCG, GuidanceStack
from flowkit.guidance.gfcg import choose_reference
from flowkit.paths import LinearPath
from flowkit.registry import GUIDANCE
from flowkit.samplers import Euler
from flowkit.sampling_loop import integrate
from flowkit.timegrid import TimeGrid

one_thread = tiny_pipes.one_thread
PATH = LinearPath()
STEPS = 6
SHIFTS = [0.0, 0.6, -0.4]  # class k of the analytic world: data mean shifted by SHIFTS[k]; cond is class 0


def encode(texts):
    return Conditioning({"shift": torch.tensor([SHIFTS[int(t.split()[1])] for t in texts], dtype=torch.float64)})


def fixed(logits):
    """A classifier that gives every image the same logits."""
    return lambda x: torch.tensor([logits], dtype=torch.float32).expand(x.shape[0], -1)


def gfcg(classifier, **kw):
    return GFCG(classifier=classifier, label_to_prompt=lambda k: f"class {k}", **kw)


def _sample(modules, steps=STEPS, batch=3, encoder=encode):
    ctx = context(batch, steps, modules)
    ctx.encode = encoder
    noise = ctx.randn((5,)).double()
    x, stats = integrate(Euler(), ctx, noise, TimeGrid.uniform().build(steps, PATH))
    return x, stats, ctx


def test_confident_classifier_reduces_exactly_to_the_base_guidance():
    agree = fixed([10.0, 0.0, 0.0])  # p_ref / p_target = e^-10, below the threshold
    for base in ([CFG(scale=3.0)], []):
        x, stats, ctx = _sample(base + [gfcg(agree, scale=2.0, targets=[0])])
        x_base, s_base, _ = _sample(base)
        assert torch.equal(x, x_base) and stats.nfe == s_base.nfe
        assert all("gfcg_ref" not in r.branches for r in stats.steps)
    # negative control: the same run with a confused classifier is pushed
    x_conf, _, _ = _sample([CFG(scale=3.0), gfcg(fixed([0.0, 1.0, 0.0]), scale=2.0, targets=[0])])
    assert not torch.allclose(x_conf, x_base, atol=1e-3)


def _manual(noise, w, s, ref_shift):
    """Euler with v = v_u + w (v_c - v_u) + s (v_c - v_ref), no push at the first step."""
    x = noise.clone()
    ts = TimeGrid.uniform().build(STEPS, PATH)
    c, u = conds(x.shape[0])["cond"], conds(x.shape[0])["uncond"]
    r = Conditioning({"shift": torch.full((x.shape[0],), ref_shift, dtype=torch.float64)})
    for i in range(STEPS):
        t = ts[i].expand(x.shape[0]) * 1000
        vc, vu, vr = (gaussian_velocity(x, t, k) for k in (c, u, r))
        v = vu + w * (vc - vu) + (s * (vc - vr) if i > 0 else 0)
        x = x + (ts[i + 1] - ts[i]) * v
    return x


def test_confused_classifier_pushes_away_from_the_reference_at_one_branch_per_step():
    confused = fixed([0.0, 1.0, 0.2])  # prefers class 1 over the target 0: full scale, reference 1
    x, stats, ctx = _sample([CFG(scale=3.0), gfcg(confused, scale=2.0, targets=[0])])
    ref = _manual(_noise(), 3.0, 2.0, SHIFTS[1])
    assert torch.allclose(x, ref, atol=1e-9)
    assert not torch.allclose(x, _manual(_noise(), 3.0, 2.0, SHIFTS[2]), atol=1e-3)  # the other class
    # one reference row per sample at every evaluation after the first
    assert stats.nfe == [2 * STEPS + STEPS - 1] * 3
    assert [r.branches.get("gfcg_ref", 0) for r in stats.steps] == [0] + [3] * (STEPS - 1)
    state = ctx.state_for(ctx.stack.modules[1])
    assert state["reference"].tolist() == [1, 1, 1] and state["scale"].tolist() == [2.0, 2.0, 2.0]


def _noise():
    return context(3, STEPS).randn((5,)).double()


def test_scale_grows_with_confusion_and_decisions_are_per_sample():
    probs = fixed([0.0, 1.0, 0.0])  # target 1 (sample 1) is the classifier's favourite
    x, stats, ctx = _sample([CFG(scale=3.0), gfcg(probs, scale=2.0, threshold=0.5, targets=[0, 1, 0])])
    assert stats.nfe == [3 * STEPS - 1, 2 * STEPS, 3 * STEPS - 1]
    state = ctx.state_for(ctx.stack.modules[1])
    assert state["scale"].tolist() == [2.0, 0.0, 2.0] and state["reference"].tolist() == [1, 0, 1]
    # a milder confusion gives a smaller push: rho = e^-0.5 ~ 0.61 -> s = 2 (0.61 - 0.5) / 0.5
    _, _, ctx2 = _sample([CFG(scale=3.0), gfcg(fixed([0.5, 0.0, 0.0]), scale=2.0, threshold=0.5, targets=[0])])
    s = ctx2.state_for(ctx2.stack.modules[1])["scale"]
    assert torch.allclose(s, torch.full((3,), 2.0 * (torch.exp(torch.tensor(-0.5)).item() - 0.5) / 0.5,
                                        dtype=s.dtype), atol=1e-6)


def test_choose_reference_for_one_and_two_asked_groups():
    probs = torch.tensor([[0.1, 0.05, 0.3, 0.15, 0.0, 0.4],
                          [0.6, 0.1, 0.1, 0.1, 0.05, 0.05],
                          [0.2, 0.2, 0.2, 0.2, 0.1, 0.1]])
    asked = torch.tensor([[0, 5], [0, -1], [-1, -1]])
    target, ref, log_rho = choose_reference(probs, asked)
    # two asked groups: the weaker (0, p=0.1) is the target; the reference skips both asked ones
    assert target.tolist()[:2] == [0, 0] and ref.tolist()[:2] == [2, 1]
    assert torch.allclose(log_rho[:2], torch.tensor([0.3 / 0.1, 0.1 / 0.6]).double().log())
    assert target[2] == -1 and log_rho[2] == float("-inf")  # nothing asked: never pushed


def test_reference_captions_swap_only_the_target_group():
    """The shapes kit's reference prompt swaps the target group only, keeping counts (mutant:
    swapping every group, or dropping the count, changes these captions)."""
    from flowkit.adapters.shapes import shapes_kit
    from flowkit.worlds.shapes import GROUPS

    g = {key: i for i, key in enumerate(GROUPS)}
    swap = shapes_kit().reference_prompt
    two = "two red circles and a blue square"
    assert swap(two, g[("circle", "red")], g[("circle", "green")]) == "two green circles and a blue square"
    assert swap(two, g[("square", "blue")], g[("triangle", "blue")]) == "two red circles and a blue triangle"
    assert swap("three yellow triangles", g[("triangle", "yellow")], g[("square", "yellow")]) == "three yellow squares"
    asked = shapes_kit().asked_classes([two, "three yellow triangles", "a cat"])
    assert asked.tolist() == [[g[("circle", "red")], g[("square", "blue")]], [g[("triangle", "yellow")], -1], [-1, -1]]


def test_shapes_model_uses_its_classifier_and_caption_targets():
    pipe = flowkit.load("tiny")
    prompts = ["a red circle", "two red circles and a blue square", "not a caption"]
    out = flowkit.sample(pipe, prompts, steps=3, guidance=[CFG(scale=4.0), GFCG(threshold=0.0)], output_type="latent")
    # threshold 0: every known target is pushed after the first step; the unknown one never
    assert out.stats.nfe == [2 * 3 + 2, 2 * 3 + 2, 2 * 3]
    assert out.stats.guidance == "cfg:scale=4.0+gfcg:threshold=0.0"
    with pytest.raises(InputError, match="12 \\(shape, colour\\) groups"):
        flowkit.sample(pipe, prompts[:1], steps=2, guidance=[GFCG(classifier=fixed([0.0, 1.0, 0.0]), threshold=0.0)],
                       output_type="latent")


def test_refusals_and_bad_parameters():
    with pytest.raises(UnsupportedError, match="gfcg needs a classifier"):
        _sample([CFG(scale=3.0), GFCG()])  # no shapes captions, no classifier
    with pytest.raises(UnsupportedError, match="missing targets"):
        _sample([GFCG(classifier=fixed([0.0, 1.0]), label_to_prompt=str)])
    with pytest.raises(UnsupportedError, match="text encoder"):
        _sample([gfcg(fixed([0.0, 1.0, 0.0]), targets=[0])], encoder=None)
    with pytest.raises(ValueError, match="scale must be >= 0"):
        GFCG(scale=-1.0)
    with pytest.raises(ValueError, match="threshold"):
        GFCG(threshold=1.0)
    with pytest.raises(ValueError, match="callable"):
        GFCG(classifier=3)
    with pytest.raises(ValueError, match="targets"):
        GFCG(targets=[-1])
    with pytest.raises(InputError, match="class logits \\[B, K\\]"):
        _sample([gfcg(lambda x: torch.zeros(x.shape[0]), targets=[0])])  # [B], not [B, K]
    with pytest.raises(InputError, match="outside the classifier's 3 classes"):
        _sample([gfcg(fixed([0.0, 1.0, 0.0]), targets=[4])])
    with pytest.raises(InputError, match="2 targets for 3 images"):
        _sample([gfcg(fixed([0.0, 1.0, 0.0]), targets=[0, 1])])
    with pytest.raises(SpecError, match="scale"):
        GUIDANCE.create("gfcg", {"scale": -2})
    with pytest.raises(SpecError, match="Python object"):
        GUIDANCE.create("gfcg", {"classifier": "custom"})
    assert GuidanceStack([gfcg(fixed([0.0, 1.0]), targets=[0])]).describe() == \
        "gfcg:classifier=custom,label_to_prompt=custom,targets=[0]"


# -- a classifier that reads the image, and which x0 it reads ----------------------------------

def reading_classifier(seen, k=1.5):
    """Logits [k (mean(x0) + 1), 0, -1] per image: the target 0 is more probable the brighter
    the clean-image estimate, the reference is always class 1 and the confusion is
    rho = exp(-k (mean(x0) + 1)). The images it is shown are appended to `seen`."""
    def classify(x):
        seen.append(x.detach().double().clone())
        m = x.double().flatten(1).mean(dim=1)
        return torch.stack([k * (m + 1), torch.zeros_like(m), -torch.ones_like(m)], dim=1)

    return classify


def gfcg_reading_check(w=2.0, scale=1.0, threshold=0.1, k=1.5):
    """(max error of the images the classifier saw, of the final state) against a hand loop:
    at evaluation i >= 1 the classifier sees clamp(x0_hat, -1, 1), x0_hat = x - t v of the
    previous evaluation's guided and pushed velocity v; the push scale is
    s = scale * clip((min(rho, 1) - threshold) / (1 - threshold), 0, 1) (0.28 to 0.59 here, never
    saturated), and v = v_u + w (v_c - v_u) + s (v_c - v_ref) with the reference class 1's
    branch. The classifier sees float32 images, so agreement is to about 1e-7."""
    seen = []
    x_run, stats, _ = _sample([CFG(scale=w), gfcg(reading_classifier(seen, k), scale=scale, threshold=threshold,
                                                  targets=[0])])
    x = _noise()  # the run starts at noise * ts[0] = noise
    ts = TimeGrid.uniform().build(STEPS, PATH)
    c, u = conds(x.shape[0])["cond"], conds(x.shape[0])["uncond"]
    r = Conditioning({"shift": torch.full((x.shape[0],), SHIFTS[1], dtype=torch.float64)})
    shown, x0_hat = [], None
    for i in range(STEPS):
        t = ts[i]
        vc, vu, vr = (gaussian_velocity(x, t.expand(x.shape[0]) * 1000, b) for b in (c, u, r))
        v = vu + w * (vc - vu)
        if x0_hat is not None:
            img = x0_hat.clamp(-1.0, 1.0)
            shown.append(img)
            rho = torch.exp(-k * (img.mean(dim=1) + 1)).clamp(max=1.0)
            s = scale * ((rho - threshold) / (1 - threshold)).clamp(0.0, 1.0)
            v = v + s[:, None] * (vc - vr)
        x0_hat = x - t * v
        x = x + (ts[i + 1] - t) * v
    assert len(seen) == len(shown) == STEPS - 1
    img_err = max(float((a - b).abs().max()) for a, b in zip(seen, shown))
    return img_err, float((x_run - x).abs().max())


def test_gfcg_classifies_the_previous_guided_clean_image():
    """With a classifier that reads the image, the classified image is the previous
    evaluation's guided and pushed clean-image estimate, and the run follows the hand loop.
    Mutants caught (tests/test_mutants.py): classifying the conditional branch's x0 instead of
    the guided one, or the estimate of the evaluation before the previous one."""
    check_gfcg_reading()


def check_gfcg_reading():
    img_err, x_err = gfcg_reading_check()
    assert img_err < 1e-5 and x_err < 1e-5, (img_err, x_err)


def test_classifier_calls_are_counted_apart_from_nfe():
    """The classifier runs once per step after the first (on the whole batch, on the previous
    step's guided clean image), pushed or not, and each run is one `stats.reward_calls`, not an
    NFE; the base guidance makes none. Mutant caught: the `ctx.reward_calls += 1` in
    `GFCG._probs` removed (reward_calls stays 0 for cfg+gfcg)."""
    calls = []

    def counted(logits):
        def fn(x):
            calls.append(x.shape[0])
            return fixed(logits)(x)
        return fn

    for logits, pushed in (([0.0, 1.0, 0.2], 3), ([10.0, 0.0, 0.0], 0)):  # confused: pushed; confident: not
        calls.clear()
        _, stats, _ = _sample([CFG(scale=3.0), gfcg(counted(logits), scale=2.0, targets=[0])])
        assert calls == [3] * (STEPS - 1)
        assert stats.reward_calls == STEPS - 1
        assert stats.nfe == [2 * STEPS + (STEPS - 1) * bool(pushed)] * 3  # NFE untouched by classifier calls
    _, base, _ = _sample([CFG(scale=3.0)])
    assert base.reward_calls == 0
    # the shapes model's own classifier through flowkit.sample: steps 1 and 2 of 3
    out = flowkit.sample(flowkit.load("tiny"), ["a red circle"], steps=3, guidance="cfg:scale=4+gfcg:threshold=0",
                         output_type="latent")
    assert out.stats.reward_calls == 2 and out.stats.nfe == [2 * 3 + 2]
