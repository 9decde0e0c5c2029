"""Core IV's contracts and hooks on the analytic Gaussian world (tests/analytic.py) and the
tiny shapes model: stack order, diffusers' windows, Heun's after_step, ctx.evaluate, masked
evaluation, the per-image NFE ledger, module state snapshots, grad_steps and checkpointing.
Each test names the mutant it catches."""

from __future__ import annotations

import itertools

import pytest
import torch
from analytic import conds, context, gaussian_velocity
from flowkit.guidance import (
    APG,
    CFG,
    AdaptiveGuidance,
    Guidance,
    GuidanceStack,
    LinearAG,
)
from flowkit.samplers import Euler, Heun

import flowkit
from flowkit.conditioning import Conditioning
from flowkit.context import NFELedger
from flowkit.guidance_base import ROLES
from flowkit.paths import LinearPath
from flowkit.sampler_base import Sampler, euler_step
from flowkit.sampling_loop import integrate
from flowkit.seeding import generators_for, randn_per_sample
from flowkit.timegrid import TimeGrid

PATH = LinearPath()
STEPS = 8


def _run(modules, steps=STEPS, batch=3, sampler=None, seed=0, **kw):
    noise = randn_per_sample((5,), generators_for(seed, range(batch))).double()
    ctx = context(batch, steps, modules, seed=seed)
    x, stats = integrate(sampler or Euler(), ctx, noise, TimeGrid.uniform().build(steps, PATH), **kw)
    return x, stats, ctx


class Nudge(Guidance):
    """A corrector that adds a constant to the prediction (changes every latent it touches)."""

    name = "nudge"
    description = "adds 0.1 to the prediction"
    role = "corrector"

    def correct(self, ctx, x, pred, preds):
        return pred.replace(pred.value + 0.1)


# --------------------------------------------------------------------------- stack order


STACKS = {
    "cfg+adaptive+nudge": lambda: [CFG(scale=3.0), AdaptiveGuidance(gamma=-1.0, min_guided_steps=3), Nudge()],
    "apg+adaptive+linear-ag": lambda: [APG(scale=4.0, norm_threshold=0.5), AdaptiveGuidance(gamma=-1.0, min_guided_steps=4),
                                       LinearAG(stop=1.0)],
}


def _permutation_results(make):
    out = []
    for perm in itertools.permutations(range(3)):
        mods = make()
        x, stats, _ = _run([mods[i] for i in perm])
        out.append((perm, x, stats.nfe, stats.guidance))
    return out


@pytest.mark.parametrize("name", STACKS)
def test_every_permutation_of_a_stack_gives_the_same_run(name):
    """Hooks run in role order, whatever order the stack was written in. Mutant (the old
    behaviour, checked below): hooks in written order make 'adaptive+cfg' plain CFG."""
    results = _permutation_results(STACKS[name])
    perm0, x0, nfe0, desc0 = results[0]
    assert min(nfe0) < max(_run(STACKS[name]()[:1])[1].nfe)  # the policy did save evaluations
    for perm, x, nfe, desc in results[1:]:
        assert torch.equal(x, x0), (perm, (x - x0).abs().max())
        assert nfe == nfe0 and desc == desc0, (perm, nfe, nfe0)


def test_written_order_mutant_breaks_permutations(monkeypatch):
    """The control: with hooks in written order (the bug Core IV fixed), a policy written
    before its combiner is a no-op and the permutations disagree."""
    monkeypatch.setattr(GuidanceStack, "_active", lambda self, ctx: [m for m in self.modules if m.active(ctx)])
    results = _permutation_results(STACKS["cfg+adaptive+nudge"])
    assert any(nfe != results[0][2] for _, _, nfe, _ in results)


def test_roles_are_validated_and_ordered():
    class Odd(Guidance):
        name = "odd"
        description = "a module of an unknown role"
        role = "wizard"

    with pytest.raises(Exception, match="role"):
        GuidanceStack([Odd()])
    stack = GuidanceStack([Nudge(), AdaptiveGuidance(), CFG()])
    assert [m.role for m in stack.ordered] == ["combiner", "policy", "corrector"]
    assert ROLES == ("modifier", "combiner", "policy", "corrector")


# --------------------------------------------------------------------------- windows


def _diffusers_steps(guider_cls, n, start, stop):
    g = guider_cls(guidance_scale=3.0, start=start, stop=stop)
    on = []
    for i in range(n):
        g.set_state(step=i, num_inference_steps=n, timestep=torch.tensor(999.0))
        on.append(g._is_cfg_enabled() if hasattr(g, "_is_cfg_enabled") else g._is_apg_enabled())
    return on


def _flowkit_steps(module, n):
    _, stats, _ = _run([module], steps=n, batch=1)
    return [r.branches.get("uncond", 0) > 0 for r in stats.steps]


WINDOWS = [(10, 0.0, 0.25), (10, 0.15, 0.55), (7, 1 / 3, 2 / 3), (9, 0.05, 0.95), (12, 0.26, 1.0), (5, 0.0, 0.5)]


@pytest.mark.parametrize("n, start, stop", WINDOWS)
def test_windows_match_diffusers_guiders(n, start, stop):
    """int(start*N) <= step < int(stop*N) as diffusers' guiders count. Mutant: the old
    fraction test start <= step/N < stop (N=10, stop=0.25 guides 3 steps, diffusers 2)."""
    from diffusers.guiders import AdaptiveProjectedGuidance, ClassifierFreeGuidance

    assert _flowkit_steps(CFG(scale=3.0, start=start, stop=stop), n) == \
        _diffusers_steps(ClassifierFreeGuidance, n, start, stop)
    assert _flowkit_steps(APG(scale=3.0, start=start, stop=stop), n) == \
        _diffusers_steps(AdaptiveProjectedGuidance, n, start, stop)


def test_window_equals_diffusers_on_a_grid_of_runs_and_fractions():
    """`Guidance.window` against diffusers' `_is_cfg_enabled` on every N in 1..20 and every
    start < stop on a 0.05 grid (4,200 windows; no sampling run: the window itself). Mutants:
    round() in place of int(), the fraction test start <= i/N < stop, stop inclusive."""
    from diffusers.guiders import ClassifierFreeGuidance

    fractions = [round(k * 0.05, 2) for k in range(21)]
    for n in range(1, 21):
        for start in fractions:
            for stop in fractions:
                if start >= stop:
                    continue
                first, end = CFG(scale=3.0, start=start, stop=stop).window(n)
                ours = [first <= i < end for i in range(n)]
                assert ours == _diffusers_steps(ClassifierFreeGuidance, n, start, stop), (n, start, stop)


def test_the_fraction_window_mutant_disagrees_with_diffusers(monkeypatch):
    from diffusers.guiders import ClassifierFreeGuidance

    monkeypatch.setattr(Guidance, "active", lambda self, ctx: self.start <= ctx.step / ctx.num_steps < self.stop)
    assert _flowkit_steps(CFG(scale=3.0, stop=0.25), 10) != _diffusers_steps(ClassifierFreeGuidance, 10, 0.0, 0.25)


# --------------------------------------------------------------------------- Heun's after_step


def _manual_heun_ag(noise, steps, w, gamma, k):
    """Heun with CFG and Adaptive Guidance written out by hand: the decision to drop the
    unconditional branch uses the cosine of the step's first evaluation (at x_i, t_i)."""
    from flowkit.guidance.adaptive import cosine

    from flowkit.prediction import Prediction

    x = noise.clone()
    ts = TimeGrid.uniform().build(steps, PATH)
    B = x.shape[0]
    c, u = conds(B)["cond"], conds(B)["uncond"]
    fired = torch.zeros(B, dtype=torch.bool)
    guided = torch.zeros(B, dtype=torch.long)

    def v(x_, t_, branch):
        return gaussian_velocity(x_, torch.full((B,), float(t_) * 1000, dtype=torch.float64), branch)

    def guided_v(x_, t_):
        vc, vu = v(x_, t_, c), v(x_, t_, u)
        g = torch.where(fired.view(-1, 1), vc, vu + w * (vc - vu))
        return g, vc, vu

    for i in range(steps):
        t, tn = float(ts[i]), float(ts[i + 1])
        d, vc, vu = guided_v(x, t)
        x_euler = x + (tn - t) * d
        if tn == 0:
            x_next = x_euler
        else:
            d2, _, _ = guided_v(x_euler, tn)
            x_next = x + (tn - t) * (d + d2) / 2
        # the decision, from the first evaluation's branches at (x, t)
        point = PATH.at(torch.full((B,), t, dtype=torch.float64))
        x0c = Prediction(vc, "velocity", x, point, PATH).x0
        x0u = Prediction(vu, "velocity", x, point, PATH).x0
        guided = guided + (~fired).long()
        fired = fired | ((cosine(x0c, x0u) > gamma) & (guided >= k) & ~fired)
        x = x_next
    return x


def test_heun_after_step_sees_the_first_evaluations_branches():
    """Adaptive Guidance under Heun equals a hand-written loop whose decisions use the
    first evaluation of each step. Mutant (the old bug): after_step read the branches of the
    step's last evaluation (Heun's corrector at x_euler), which fires on other steps."""
    noise = randn_per_sample((5,), generators_for(0, range(3))).double()
    gamma, k = 0.9999, 1
    ctx = context(3, STEPS, [CFG(scale=3.0), AdaptiveGuidance(gamma=gamma, min_guided_steps=k)])
    x, stats = integrate(Heun(), ctx, noise, TimeGrid.uniform().build(STEPS, PATH))
    ref = _manual_heun_ag(noise, STEPS, 3.0, gamma, k)
    assert torch.allclose(x, ref, atol=1e-12, rtol=0), (x - ref).abs().max()
    fired_at = [r.branches.get("uncond", 0) for r in stats.steps]
    assert fired_at[0] > 0 and fired_at[-1] < fired_at[0]  # it fired during the run


def test_heun_last_evaluation_mutant_differs(monkeypatch):
    from flowkit.sampling_loop import GuidedModel

    real = GuidedModel.end_step

    def last_evaluation(self, x, pred):
        if self._evaluations:
            self._evaluations = [(pred, self._evaluations[-1][1])]
        return real(self, x, pred)

    monkeypatch.setattr(GuidedModel, "end_step", last_evaluation)
    noise = randn_per_sample((5,), generators_for(0, range(3))).double()
    ctx = context(3, STEPS, [CFG(scale=3.0), AdaptiveGuidance(gamma=0.9999, min_guided_steps=1)])
    x, _ = integrate(Heun(), ctx, noise, TimeGrid.uniform().build(STEPS, PATH))
    assert not torch.allclose(x, _manual_heun_ag(noise, STEPS, 3.0, 0.9999, 1), atol=1e-9, rtol=0)


# --------------------------------------------------------------------------- ctx.evaluate


class ExtraEval(Guidance):
    """A corrector that evaluates the conditional branch once more through ctx.evaluate and
    adds a multiple of its difference to the guided prediction (0 * diff: no change)."""

    name = "extra-eval"
    description = "one extra evaluation per step"
    role = "corrector"

    def __init__(self, *, weight: float = 0.0, grad: bool = False):
        super().__init__()
        self.weight, self.grad = weight, grad
        self.seen: list[torch.Tensor] = []

    def correct(self, ctx, x, pred, preds):
        cond = ctx.conds["cond"].replace(shift=ctx.conds["cond"]["shift"] + 0.5)
        xx = x.detach().requires_grad_(self.grad)
        extra = ctx.evaluate(xx, ctx.t, cond, "shifted", grad=self.grad)
        self.seen.append(extra.value)
        return pred.replace(pred.value + self.weight * (extra.value.detach() - pred.value))


def test_ctx_evaluate_is_counted_recorded_and_correct():
    """ctx.evaluate's call is charged to every row and recorded under its branch; its value is
    the network's (mutant: an evaluation not charged, or charged once per batch, fails)."""
    mod = ExtraEval(weight=0.0)
    x, stats, ctx = _run([CFG(scale=3.0), mod])
    x_ref, stats_ref, _ = _run([CFG(scale=3.0)])
    assert torch.equal(x, x_ref)
    assert stats.nfe == [n + STEPS for n in stats_ref.nfe]
    assert all(r.branches.get("shifted") == 3 for r in stats.steps)
    # its value is the analytic velocity of the shifted branch
    noise = randn_per_sample((5,), generators_for(0, range(3))).double()
    t0 = torch.full((3,), 1000.0, dtype=torch.float64)
    expect = gaussian_velocity(noise, t0, Conditioning({"shift": torch.full((3,), 0.5, dtype=torch.float64)}))
    assert torch.allclose(mod.seen[0], expect, atol=1e-12)


def test_ctx_evaluate_grad_builds_a_graph_inside_the_no_grad_loop():
    """With grad=True the extra evaluation keeps its graph though the loop runs under no_grad
    (control: grad=False gives none)."""
    with torch.no_grad():
        mod = ExtraEval(grad=True)
        _run([mod], steps=2)
        off = ExtraEval(grad=False)
        _run([off], steps=2)
    assert mod.seen[0].requires_grad and not off.seen[0].requires_grad


def test_ctx_evaluate_outside_a_run_is_refused():
    ctx = context(2, 3)
    with pytest.raises(RuntimeError, match="during a run"):
        ctx.evaluate(torch.zeros(2, 5), 0.5, ctx.conds["cond"])


# --------------------------------------------------------------------------- masked evaluation


class HalfActive(Sampler):
    """Euler where only rows `mask` are evaluated and moved at each step."""

    name = "half-active"
    description = "Euler on some rows"

    def __init__(self, mask: list[bool]):
        super().__init__()
        self.mask = list(mask)

    def sample(self, model, x, ts):
        mask = torch.tensor(self.mask)
        for i in range(len(ts) - 1):
            t, t_next = float(ts[i]), float(ts[i + 1])
            pred = model(x, t, active=mask)
            x = torch.where(mask.view(-1, 1), euler_step(x, t, t_next, pred), x)
            x = model.end_step(x, pred)
        return x


def test_masked_evaluation_evaluates_and_charges_only_active_rows():
    """Inactive rows are neither evaluated nor charged; active rows move exactly as in a full
    run (mutant: a mask that is ignored charges every row, or moves the inactive one)."""
    mask = [True, False, True]
    x, stats, _ = _run([CFG(scale=3.0)], sampler=HalfActive(mask))
    x_full, stats_full, _ = _run([CFG(scale=3.0)])
    noise = randn_per_sample((5,), generators_for(0, range(3))).double()
    assert stats.nfe == [2 * STEPS, 0, 2 * STEPS] and stats_full.nfe == [2 * STEPS] * 3
    assert torch.equal(x[[0, 2]], x_full[[0, 2]]) and torch.equal(x[1], noise[1])
    assert all(r.branches == {"cond": 2, "uncond": 2} for r in stats.steps)


# --------------------------------------------------------------------------- NFE ledger


class Particles(Sampler):
    """Euler on 3 particles per image, the last particle of each image kept at the end."""

    name = "particles"
    description = "three particles per image"

    def sample(self, model, x, ts):
        ctx = model.ctx
        B = x.shape[0]
        index = torch.arange(B).repeat_interleave(3)
        ctx.reindex(index)
        x = x[index]
        for i in range(len(ts) - 1):
            t, t_next = float(ts[i]), float(ts[i + 1])
            pred = model(x, t)
            x = model.end_step(euler_step(x, t, t_next, pred), pred)
        keep = torch.arange(B) * 3 + 2
        ctx.reindex(keep)
        return x[keep]


def test_the_ledger_adds_every_particle_to_its_image():
    """Per-image NFE is the sum over the image's particles, also after resampling drops them
    (mutant: per-image NFE read from the surviving rows at the end gives 2 * STEPS)."""
    x, stats, ctx = _run([CFG(scale=3.0)], sampler=Particles(), batch=2)
    assert stats.nfe == [3 * 2 * STEPS] * 2
    assert ctx.nfe.tolist() == [2 * STEPS] * 2  # the surviving rows' own cost
    x_plain, _, _ = _run([CFG(scale=3.0)], batch=2)
    assert x.shape == x_plain.shape


def test_ledger_charges_repeated_rows_and_keeps_images_on_reindex():
    led = NFELedger(2, images=2)
    led.charge(torch.tensor([0, 0, 1]))
    led.reindex(torch.tensor([1, 1, 0]))
    led.charge(torch.tensor([0, 1, 2]))
    assert led.per_row.tolist() == [2, 2, 3] and led.per_image.tolist() == [3, 3] and led.total == 6


# --------------------------------------------------------------------------- state snapshots


class Retake(Sampler):
    """Euler that takes step `k` twice: snapshot the module state, take it, restore the state,
    take it again (the second take must see the state as the first did)."""

    name = "retake"
    description = "takes one step twice"

    def __init__(self, k: int, restore: bool = True):
        super().__init__()
        self.k, self.restore = k, restore

    def sample(self, model, x, ts):
        ctx = model.ctx
        for i in range(len(ts) - 1):
            t, t_next = float(ts[i]), float(ts[i + 1])
            if i == self.k:
                saved = ctx.snapshot(torch.arange(x.shape[0]))
                pred = model(x, t)
                ctx.stack.after_step(ctx, x, pred, model._evaluations[-1][1])
                model._evaluations = []
                if self.restore:
                    ctx.restore(saved)
            pred = model(x, t)
            x = model.end_step(euler_step(x, t, t_next, pred), pred)
        return x


@pytest.mark.parametrize("stack", [
    lambda: [APG(scale=4.0, momentum=-0.5, norm_threshold=None)],  # momentum
    lambda: [CFG(scale=3.0), AdaptiveGuidance(gamma=-1.0, min_guided_steps=5)],  # AG decisions (its count)
    lambda: [CFG(scale=3.0), LinearAG(stop=1.0, every=2)],  # LinearAG history
])
def test_restored_state_makes_a_retaken_step_identical(stack):
    """Snapshot + restore of module state per row: a step taken, undone and taken again
    equals the step taken once (mutant: a restore that writes nothing differs)."""
    x_once, _, _ = _run(stack(), sampler=Euler())
    x_twice, _, _ = _run(stack(), sampler=Retake(3))
    assert torch.equal(x_twice, x_once)
    x_stale, _, _ = _run(stack(), sampler=Retake(3, restore=False))
    assert not torch.equal(x_stale, x_once)


def test_restore_moves_a_rows_state_to_other_rows():
    m = APG()
    ctx = context(3, 4, [m])
    state = ctx.state_for(m)
    state["avg"] = torch.arange(3.0).view(3, 1) * torch.ones(3, 2)
    state["hist"] = [torch.tensor([1.0, 2.0, 3.0]), 7]  # a list of a batch tensor and a per-run value
    saved = ctx.snapshot([2])
    state["avg"] = state["avg"] + 100
    ctx.restore(saved, [0])
    assert state["avg"][:, 0].tolist() == [2.0, 101.0, 102.0]
    assert ctx.state_for(m)["hist"][0].tolist() == [3.0, 2.0, 3.0] and ctx.state_for(m)["hist"][1] == 7
    with pytest.raises(ValueError, match="saved rows"):
        ctx.restore(saved, [0, 1])


# --------------------------------------------------------------------------- gradients


class Capture(Guidance):
    """Asks for a cross-attention map at every step and keeps the run's store."""

    name = "capture"
    description = "captures one layer's maps"

    def __init__(self):
        super().__init__()
        self.store = None

    def branches(self, ctx, requests):
        self.store = ctx.attention
        if ctx.step == 0:
            ctx.attention.request(ctx.attention.layers[:1])


def _shapes_grad(grad_steps=None, checkpoint=False, detach_before=None, steps=4, extra=()):
    """d(sum of the final latents) / d(the tiny shapes UNet's first conv weight)."""
    pipe = flowkit.load("tiny")
    w = pipe.unet.conv_in.weight
    w.grad = None
    pipe.unet.requires_grad_(False)
    w.requires_grad_(True)
    callback = None
    if detach_before is not None:
        def callback(ctx, step, x, pred):  # noqa: E306 - the detach-based reference
            return x.detach() if step == detach_before - 1 else None
    try:
        out = flowkit.sample(pipe, ["a red circle", "two blue squares"], steps=steps, seed=3, output_type="latent",
                             grad=True if grad_steps is None else False, grad_steps=grad_steps,
                             checkpoint=checkpoint, callback=callback, guidance=[CFG(scale=2.0), *extra])
        if not out.latents.requires_grad:
            return torch.zeros_like(w), out
        out.latents.sum().backward()
        return w.grad.clone(), out
    finally:
        w.requires_grad_(False)
        w.grad = None


def test_grad_steps_equals_a_detach_based_truncation():
    """grad_steps=K differentiates through the last K steps only: equal to a run that
    detaches the state before step N-K (mutant: an off-by-one window, K+1 steps, differs),
    and K = 0 gives no gradient at all."""
    g2, _ = _shapes_grad(grad_steps=2)
    ref2, _ = _shapes_grad(detach_before=2)
    ref3, _ = _shapes_grad(detach_before=1)
    assert torch.allclose(g2, ref2, rtol=1e-5, atol=1e-8)
    assert not torch.allclose(g2, ref3, rtol=1e-3, atol=1e-6)
    g0, out0 = _shapes_grad(grad_steps=0)
    assert not out0.latents.requires_grad and torch.count_nonzero(g0) == 0


def test_checkpointing_gives_bitwise_equal_gradients_at_the_same_nfe():
    """Activation checkpointing recomputes each network call in the backward pass: the
    gradients are bitwise equal (captured attention layers included: the recomputation takes
    the same kernels), and the recomputation is neither an NFE nor an attention call nor a
    second map (mutants: dropping the replay guard of the attention counts, or of the map
    store, changes the store after the backward pass)."""
    cap, cap_ck = Capture(), Capture()
    g, out = _shapes_grad(grad_steps=2, extra=[cap])
    g_ck, out_ck = _shapes_grad(grad_steps=2, checkpoint=True, extra=[cap_ck])
    assert torch.equal(g, g_ck) and torch.count_nonzero(g) > 0
    assert out.stats.nfe == out_ck.stats.nfe and out.stats.attention == out_ck.stats.attention
    assert out_ck.stats.attention.get("captured", 0) > 0
    assert dict(cap_ck.store.counts) == out_ck.stats.attention  # after the backward pass too
    assert len(cap_ck.store.maps) == len(cap.store.maps)
