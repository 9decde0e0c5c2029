"""A small mutation check: for each test that used to pass vacuously, the mutant it must
catch is monkeypatched in and the test's own check (a helper shared with the real test)
must fail. A mutant that slips through means the test has gone vacuous again."""

import flowkit.guidance.apg as apg_module
import pytest
import torch
from flowkit.guidance import APG, CFG, GFCG, LinearAG
from test_apg import check_algorithm1, check_rescale
from test_dirichlet import check_toy_task
from test_discrete import check_masked_dependent
from test_gfcg import check_gfcg_reading
from test_guidance_core import check_cfg_rescale
from test_linear_ag import check_linear_ag_history

import flowkit.prediction as prediction_module
from flowkit.paths.dirichlet import DirichletPath
from flowkit.paths.mixture import MixturePath

# -- masked-source discrete sampler: the jump schedule -------------------------------------------

@pytest.mark.parametrize("forced", [0.0, 1.0])
def test_masked_dependent_target_catches_a_forced_jump_probability(monkeypatch, forced):
    monkeypatch.setattr(MixturePath, "jump_probability", lambda self, t, t_next: forced)
    with pytest.raises(AssertionError):
        check_masked_dependent()


# -- Dirichlet toy task: the transport ------------------------------------------------------------

@pytest.mark.parametrize("factor", [0.5, 2.0])
def test_toy_task_catches_a_scaled_velocity(monkeypatch, factor):
    velocity = DirichletPath.velocity
    monkeypatch.setattr(DirichletPath, "velocity", lambda self, p, x, a: factor * velocity(self, p, x, a))
    with pytest.raises(AssertionError):
        check_toy_task(4)


# -- CFG: each space runs its own conversions --------------------------------------------------------

def test_cfg_rescale_catches_a_wrong_conversion_in_one_space(monkeypatch):
    from_x0_eps = prediction_module.from_x0_eps

    def wrong_noise(kind, x0, eps, alpha, sigma):
        out = from_x0_eps(kind, x0, eps, alpha, sigma)
        return 1.01 * out if kind == "epsilon" else out

    monkeypatch.setattr(prediction_module, "from_x0_eps", wrong_noise)
    with pytest.raises(AssertionError):
        check_cfg_rescale("epsilon", "velocity")
    check_cfg_rescale("x0", "velocity")  # the other spaces do not go through it


def test_cfg_rescale_catches_an_ignored_space(monkeypatch):
    init = CFG.__init__

    def model_output_only(self, **kw):
        init(self, **{**kw, "space": "model_output"})

    monkeypatch.setattr(CFG, "__init__", model_output_only)
    with pytest.raises(AssertionError):
        check_cfg_rescale("x0", "velocity")


# -- APG: Algorithm 1 and the rescale ------------------------------------------------------------------

def _flip_momentum(monkeypatch):
    guide = APG.guide
    monkeypatch.setattr(APG, "guide", lambda self, c, u, avg: guide(self, c, u, None if avg is None else -avg))


def _drop_projection(monkeypatch):
    monkeypatch.setattr(apg_module, "project", lambda v0, v1: (torch.zeros_like(v0), v0))


def _factor_one(monkeypatch):
    monkeypatch.setattr(apg_module, "rescale_factor", lambda diff, r, norm="l2": torch.ones(diff.shape[0],
                                                                                             dtype=diff.dtype))


def _no_clamp(monkeypatch):
    def unclamped(diff, r, norm="l2"):
        size = diff.flatten(1).norm(dim=1) / (diff[0].numel() ** 0.5 if norm == "rms" else 1.0)
        return r / size

    monkeypatch.setattr(apg_module, "rescale_factor", unclamped)


@pytest.mark.parametrize("mutate", [_flip_momentum, _drop_projection, _factor_one, _no_clamp])
def test_apg_algorithm_1_catches(monkeypatch, mutate):
    mutate(monkeypatch)
    with pytest.raises(AssertionError):
        check_algorithm1()


@pytest.mark.parametrize("mutate", [_factor_one, _no_clamp])
@pytest.mark.parametrize("norm", ["l2", "rms"])
def test_apg_rescale_catches(monkeypatch, mutate, norm):
    mutate(monkeypatch)
    with pytest.raises(AssertionError):
        check_rescale(norm)


# -- LinearAG: the history's alignment -------------------------------------------------------------

def test_linear_ag_catches_a_history_misaligned_by_one_step(monkeypatch):
    correct = LinearAG.correct

    def lagged(self, ctx, x, pred, preds):
        """Step j's history entry holds step j-1's outputs (the first step's its own)."""
        state = self.state(ctx)
        if state.get("recorded") == ctx.step:
            return correct(self, ctx, x, pred, preds)
        before = state.get("lag")
        state["lag"] = preds
        return correct(self, ctx, x, pred, before if before is not None else preds)

    monkeypatch.setattr(LinearAG, "correct", lagged)
    with pytest.raises(AssertionError):
        check_linear_ag_history()


# -- GFCG: which x0 is classified --------------------------------------------------------------------

def test_gfcg_catches_classifying_the_conditional_x0(monkeypatch):
    correct = GFCG.correct

    def cond_x0(self, ctx, x, pred, preds):
        out = correct(self, ctx, x, pred, preds)
        self.state(ctx)["x0"] = preds["cond"].x0.detach()
        return out

    monkeypatch.setattr(GFCG, "correct", cond_x0)
    with pytest.raises(AssertionError):
        check_gfcg_reading()


def test_gfcg_catches_classifying_an_older_x0(monkeypatch):
    correct = GFCG.correct

    def older(self, ctx, x, pred, preds):
        out = correct(self, ctx, x, pred, preds)
        state = self.state(ctx)
        new, state["x0"] = state["x0"], state.get("older", state["x0"])
        state["older"] = new
        return out

    monkeypatch.setattr(GFCG, "correct", older)
    with pytest.raises(AssertionError):
        check_gfcg_reading()
