"""LinearAG: the least-squares fit, predicted branches at zero NFE, exact reduction to CFG."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flowkit
import tiny_pipes
from analytic import context
from flowkit.errors import InputError, SpecError, UnsupportedError
from flowkit.calibration import fit_linear_ag
from flowkit.guidance import CFG, AdaptiveGuidance, GuidanceStack, LinearAG, LinearAGCoefficients
from flowkit.guidance.linear_ag import TrajectoryRecorder, fit_coefficients
from flowkit.paths import LinearPath
from flowkit.registry import GUIDANCE
from flowkit.samplers import Euler, Heun
from flowkit.sampling_loop import integrate
from flowkit.timegrid import TimeGrid

one_thread = tiny_pipes.one_thread
PATH = LinearPath()
STEPS = 8


def _sample(modules, steps=STEPS, batch=3, seed=0, sampler=None):
    ctx = context(batch, steps, modules, seed=seed)
    noise = ctx.randn((5,)).double()
    x, stats = integrate(sampler or Euler(), ctx, noise, TimeGrid.uniform().build(steps, PATH))
    return x, stats, ctx


def _linear_recurrence(N=4, S=7, D=40, K=2, seed=0):
    """Trajectories whose uncond follows an exact linear recurrence with known coefficients."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(N, S, D, generator=g, dtype=torch.float64)
    u = torch.randn(N, S, D, generator=g, dtype=torch.float64)
    true = {}
    for t in range(K, S):
        w = torch.rand(1 + 2 * K, generator=g, dtype=torch.float64) - 0.5
        feats = [c[:, t]] + [v for k in range(1, K + 1) for v in (c[:, t - k], u[:, t - k])]
        u[:, t] = sum(wj * f for wj, f in zip(w, feats))
        true[t] = w
    return c, u, true


def test_fit_recovers_the_coefficients_of_an_exact_linear_recurrence():
    c, u, true = _linear_recurrence()
    fit = fit_coefficients(c.view(4, 7, 8, 5), u.view(4, 7, 8, 5), history=2)  # any trailing shape
    assert fit.steps == 7 and fit.weights[0] is None and fit.weights[1] is None
    for t, w in true.items():
        assert torch.allclose(torch.tensor(fit.weights[t], dtype=torch.float64), w, atol=1e-9)
        assert fit.residual[t] < 1e-9
    # negative control: noise on the target is not explained by the recurrence
    noisy = u + 0.1 * torch.randn(u.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    bad = fit_coefficients(c, noisy, history=2)
    assert max(abs(bad.weights[t][0] - float(true[t][0])) for t in true) > 1e-3
    assert min(bad.residual[t] for t in true) > 1e-3


def test_supplied_branch_costs_no_nfe():
    x, stats, ctx = _sample([CFG(scale=3.0), LinearAG(every=2, stop=1.0)])  # carry rule, K = 1
    predicted = [i for i in range(STEPS) if i % 2 == 1]
    assert [r.branches.get("uncond", 0) for r in stats.steps] == [0 if i in predicted else 3 for i in range(STEPS)]
    assert stats.nfe == [2 * STEPS - len(predicted)] * 3
    assert ctx.state_for(ctx.stack.modules[1])["predicted"].tolist() == [len(predicted)] * 3
    x_cfg, _, _ = _sample([CFG(scale=3.0)])
    assert not torch.allclose(x, x_cfg, atol=1e-4)  # the carry rule is not exact on this world


def _fit_on_analytic(steps=STEPS, history=1, seed=7):
    rec = TrajectoryRecorder()
    _sample([CFG(scale=3.0), rec], steps=steps, batch=4, seed=seed)
    return fit_coefficients(*rec.trajectories(), history=history)


@pytest.mark.parametrize("history", [1, 2])
def test_coefficients_that_reproduce_uncond_give_cfg(history):
    """On the Gaussian world u_t - c_t is the same vector for every state, so an affine map of
    c_t and the past outputs reproduces u_t exactly; LinearAG then equals CFG."""
    fit = _fit_on_analytic(history=history)  # calibrated on other seeds
    x, stats, ctx = _sample([CFG(scale=3.0), LinearAG(coefficients=fit, every=1, stop=1.0)])
    x_cfg, s_cfg, _ = _sample([CFG(scale=3.0)])
    assert torch.allclose(x, x_cfg, atol=1e-9)
    assert stats.nfe == [STEPS + history] * 3 and s_cfg.nfe == [2 * STEPS] * 3
    # negative control: the same run with perturbed coefficients leaves CFG
    w = [None if v is None else [v[0] + 0.05] + v[1:] for v in fit.weights]
    off = LinearAGCoefficients(history=fit.history, weights=w, steps=fit.steps)
    x_off, _, _ = _sample([CFG(scale=3.0), LinearAG(coefficients=off, every=1, stop=1.0)])
    assert not torch.allclose(x_off, x_cfg, atol=1e-4)


def test_window_and_every_choose_the_predicted_steps():
    _, stats, _ = _sample([CFG(scale=3.0), LinearAG(every=3)])  # default window: first half
    assert [r.branches.get("uncond", 0) for r in stats.steps] == [3, 3, 0, 3, 3, 3, 3, 3]


def test_adaptive_guidance_and_linear_ag_decide_per_sample_in_either_order():
    """Once AG stops a sample's unconditional branch, LinearAG supplies none for it."""
    ag = lambda: AdaptiveGuidance(gamma=-1.0, min_guided_steps=2)  # noqa: E731
    _, s_ag, _ = _sample([CFG(scale=3.0), ag()])
    assert s_ag.nfe == [STEPS + 2] * 3
    xs = []
    for order in ([CFG(scale=3.0), ag(), LinearAG(every=1, stop=1.0)],
                  [CFG(scale=3.0), LinearAG(every=1, stop=1.0), ag()]):
        x, stats, _ = _sample(order)
        xs.append(x)
        # step 1's uncond is predicted (AG counts it as a guided step and fires after it);
        # from step 2 on AG has stopped the branch and LinearAG supplies nothing
        assert [r.branches.get("uncond", 0) for r in stats.steps] == [3] + [0] * (STEPS - 1)
        assert stats.nfe == [STEPS + 1] * 3 and torch.isfinite(x).all()
    # AG's drop withdraws a supply LinearAG made earlier in the stack: the same images
    assert torch.equal(xs[0], xs[1])


def test_heun_predicts_only_the_first_evaluation_of_a_step():
    _, stats, _ = _sample([CFG(scale=3.0), LinearAG(every=2, stop=1.0)], sampler=Heun())
    _, full, _ = _sample([CFG(scale=3.0)], sampler=Heun())
    # on predicted steps (1, 3, 5, 7) one of the step's evaluations skips uncond
    saved = [f.branches.get("uncond", 0) - r.branches.get("uncond", 0) for r, f in zip(stats.steps, full.steps)]
    assert saved == [0, 3, 0, 3, 0, 3, 0, 3]


def test_save_load_spec_and_bad_input(tmp_path):
    fit = _fit_on_analytic(steps=4)
    path = fit.save(tmp_path / "lag.json")
    back = LinearAGCoefficients.load(path)
    assert back.weights == fit.weights and back.history == fit.history and back.steps == 4
    built = GUIDANCE.create("linear-ag", {"coefficients": str(path), "every": 1})
    assert built._coef.weights == fit.weights
    assert "linear-ag:coefficients=" in GuidanceStack([CFG(), built]).describe()
    with pytest.raises(UnsupportedError, match="fitted for 4 steps"):
        _sample([CFG(scale=3.0), built], steps=6)
    with pytest.raises(ValueError, match="every"):
        LinearAG(every=0)
    with pytest.raises(InputError, match="no LinearAG coefficients"):
        LinearAG(coefficients=tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"kind": "other"}')
    with pytest.raises(InputError, match="not a LinearAG coefficient file"):
        LinearAGCoefficients.load(tmp_path / "bad.json")
    with pytest.raises(InputError, match="expected 3 finite numbers"):
        LinearAGCoefficients(history=1, weights=[None, [1.0, float("nan"), 0.0]], steps=2)
    with pytest.raises(SpecError, match="every"):
        GUIDANCE.create("linear-ag", {"every": -1})
    with pytest.raises(InputError, match="unconditional branch at every step"):
        _sample([CFG(scale=1.0), TrajectoryRecorder()], steps=2)


def test_fit_linear_ag_on_a_pipeline_is_cached(tmp_path, monkeypatch):
    pipe = flowkit.load("tiny")
    prompts = ["a red circle", "two blue squares", "a green triangle"]
    cache = tmp_path / "tiny.json"
    fit = fit_linear_ag(pipe, prompts, steps=4, history=1, batch_size=2, cache=cache, model_id="tiny")
    assert cache.is_file() and fit.steps == 4 and fit.ts is not None and len(fit.ts) == 5
    assert all(w is not None for w in fit.weights[1:]) and fit.meta["prompts"] == prompts

    def no_sampling(*a, **k):
        raise AssertionError("the cached fit should have been read back")

    monkeypatch.setattr(flowkit, "sample", no_sampling)
    again = fit_linear_ag(pipe, prompts, steps=4, history=1, batch_size=2, cache=cache, model_id="tiny")
    assert again.weights == fit.weights
    monkeypatch.undo()
    out = flowkit.sample(pipe, prompts[:2], steps=4, guidance=[CFG(scale=4.0), LinearAG(coefficients=fit, every=1,
                                                                                         stop=1.0)],
                         output_type="latent")
    assert out.stats.nfe == [4 + 1] * 2 and torch.isfinite(out.latents).all()


_json = st.recursive(st.none() | st.booleans() | st.integers(-3, 40) | st.floats(allow_nan=True) | st.text(max_size=5),
                     lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
                     max_leaves=20)
_fields = st.fixed_dictionaries({"format": st.just(1), "kind": st.just("linear-ag")},
                                optional={"history": _json | st.integers(0, 3), "steps": _json | st.integers(1, 3),
                                          "weights": _json | st.lists(st.none() | st.lists(
                                              st.floats(-2, 2), min_size=3, max_size=3), max_size=3),
                                          "ts": _json, "residual": _json, "meta": _json})


@settings(max_examples=150, deadline=None)
@given(st.one_of(_json, _fields))
def test_coefficient_files_load_or_fail_with_input_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "c.json"
    path.write_text(json.dumps(data))
    try:
        coef = LinearAGCoefficients.load(path)
    except InputError as e:
        assert str(e)
        return
    for step in range(50):  # whatever loaded is usable
        w = coef.at(step)
        assert w is None or len(w) == 1 + 2 * coef.history


# -- the supplied branch uses the right steps' history -----------------------------------------

def _varied_velocity(x, timestep, cond):
    """A Gaussian world whose branches differ in mean per dimension and in spread, so that
    u - c depends on the state and changes direction from step to step (on the plain
    analytic world it is one fixed vector times a function of t)."""
    t = (timestep / 1000).view(-1, 1).to(x.dtype)
    pattern = torch.tensor([1.0, -0.5, 2.0, 0.3, -1.2], dtype=x.dtype)
    m = 0.7 + cond["shift"].view(-1, 1).to(x.dtype) * pattern
    s = cond["spread"].view(-1, 1).to(x.dtype)
    x0 = m + (1 - t) * s * s / ((1 - t) ** 2 * s * s + t * t) * (x - (1 - t) * m)
    return (x - (1 - t) * x0) / t - x0


def linear_ag_history_check(steps=8, batch=3):
    """(max error of the supplied uncond against the hand formula, min cosine between
    consecutive steps' u - c): a run of CFG + LinearAG (K = 2, fixed coefficients, every other
    step predicted) on the varied world, recorded per step; at each predicted step t the
    supplied u_t must be w . [c_t, c_{t-1}, u_{t-1}, c_{t-2}, u_{t-2}] of the recorded outputs
    (u_{t-1} itself predicted or evaluated)."""
    from flowkit.conditioning import Conditioning
    from flowkit.context import Context
    from flowkit.denoiser import FunctionDenoiser
    from flowkit.seeding import generators_for

    w = [0.9, -0.3, 0.4, 0.2, -0.1]
    coef = LinearAGCoefficients(history=2, weights=[w])
    rec = TrajectoryRecorder()
    stack = [CFG(scale=3.0), LinearAG(coefficients=coef, every=2, stop=1.0), rec]
    full = lambda v: torch.full((batch,), v, dtype=torch.float64)  # noqa: E731
    conds = {"cond": Conditioning({"shift": full(0.0), "spread": full(0.5)}),
             "uncond": Conditioning({"shift": full(1.0), "spread": full(1.2)})}
    ctx = Context(FunctionDenoiser(_varied_velocity, PATH, "velocity"), GuidanceStack(stack), conds,
                  generators_for(0, range(batch)), steps)
    _, stats = integrate(Euler(), ctx, ctx.randn((5,)).double(), TimeGrid.uniform().build(steps, PATH))
    predicted = [i for i, r in enumerate(stats.steps) if r.branches.get("uncond", 0) == 0]
    assert predicted == [3, 5, 7], predicted
    c, u = (v.double() for v in rec.trajectories())  # [B, S, 5]
    err = 0.0
    for t in predicted:
        feats = [c[:, t], c[:, t - 1], u[:, t - 1], c[:, t - 2], u[:, t - 2]]
        err = max(err, float((u[:, t] - sum(wj * f for wj, f in zip(w, feats))).abs().max()))
    d = u - c
    cos = min(float(torch.nn.functional.cosine_similarity(d[:, i].flatten(), d[:, i - 1].flatten(), dim=0))
              for i in range(1, steps))
    return err, cos


def test_supplied_uncond_uses_the_previous_steps_outputs():
    """On a world where u - c changes from step to step, every supplied u_t is the affine map
    of step t's c and steps t-1 and t-2's outputs. Mutant caught (tests/test_mutants.py): the
    history misaligned by one step (step j's entry holding step j-1's outputs)."""
    check_linear_ag_history()


def check_linear_ag_history():
    err, cos = linear_ag_history_check()
    assert err < 1e-12, err
    assert cos < 0.99, cos  # the world's u - c really turns between steps
