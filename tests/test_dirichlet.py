"""Dirichlet flow matching: the C table, the vector field against the path, the simplex
invariants, scores and classifier guidance, and sampling the toy task with the exact denoiser."""

import numpy as np
import pytest
import torch
from scipy import special as sp
from scipy import stats

from flowkit.conditioning import Conditioning
from flowkit.context import Context
from flowkit.denoiser import Denoiser
from flowkit.errors import InputError
from flowkit.guidance import CFG, GuidanceStack
from flowkit.paths.categorical import dirichlet_from_normal
from flowkit.paths.dirichlet import DirichletPath, c_factor_row
from flowkit.samplers import DirichletEuler
from flowkit.sampling_loop import integrate
from flowkit.seeding import generators_for, randn_per_sample
from flowkit.worlds.simplex import ExactDenoiser, ToyTask


def exact_run(path, den, n, steps, *, stack=None, conds=None, callback=None, sampler=None, seed=0):
    gens = generators_for(seed, range(n))
    conds = conds or {"cond": Conditioning({"class_labels": torch.zeros(n, dtype=torch.long)})}
    ctx = Context(den, stack or GuidanceStack([]), conds, gens, steps)
    noise = randn_per_sample((4, path.state_size), gens)
    x, stats_ = integrate(sampler or DirichletEuler(), ctx, noise, path.uniform_grid(steps), callback=callback)
    return x, stats_


# -- the C table ------------------------------------------------------------------------

@pytest.mark.parametrize("K", [2, 4, 20, 64])
@pytest.mark.parametrize("alpha", [1.0, 1.001, 3.5, 8.0, 60.0])
def test_c_table_is_finite_with_the_exact_face_limits(K, alpha):
    row = c_factor_row(alpha, K)
    assert np.isfinite(row).all() and (row >= -1e-12).all()
    b = K - 1
    assert row[0] == 0.0 and row[-1] == pytest.approx((sp.digamma(alpha + b) - sp.digamma(alpha)) / b, rel=1e-12)
    # continuous into both faces: the grid points next to them agree with the limits
    assert row[1] < 1e-9 and row[-2] == pytest.approx(row[-1], rel=1e-6)


@pytest.mark.parametrize("K, alpha", [(4, 2.0), (4, 7.5), (20, 1.5), (20, 6.0), (40, 3.0)])
def test_vector_field_matches_finite_differences_of_the_path(K, alpha):
    """x_i moves along its own Beta(alpha, K-1) quantile: dQ/dalpha = C(Q, alpha) (1 - Q) (eq. 14)."""
    path = DirichletPath(K, alpha_max=80.0)
    u = np.array([1e-6, 1e-3, 0.05, 0.3, 0.5, 0.7, 0.95, 0.999, 1 - 1e-6])
    h = 1e-5
    q = sp.betaincinv(alpha, K - 1, u)
    dq = (sp.betaincinv(alpha + h, K - 1, u) - sp.betaincinv(alpha - h, K - 1, u)) / (2 * h)
    x = torch.from_numpy(q)
    ours = (path.c_factor(x, alpha) * (1 - x)).numpy()
    np.testing.assert_allclose(ours, dq, rtol=2e-4, atol=1e-10)
    wrong = (DirichletPath(K + 1).c_factor(x, alpha) * (1 - x)).numpy()  # negative control: another K
    assert np.abs(wrong - dq).max() > 100 * np.abs(ours - dq).max()


def test_conditional_flow_carries_the_path_from_alpha_to_alpha():
    """Euler on u(x | e_0) from Dir(1 + e_0) (alpha = 2) reaches Dir(1 + 5 e_0) (alpha = 6)."""
    K, n = 5, 4000
    path = DirichletPath(K, alpha_max=10.0)
    gen = torch.Generator().manual_seed(0)
    x = path.sample(torch.zeros(n, 1, dtype=torch.long), torch.full((n,), float(path.time_from_alpha(2.0))),
                    generator=gen).double()
    rest0 = x[..., 1:] / x[..., 1:].sum(-1, keepdim=True)
    p = torch.zeros_like(x)
    p[..., 0] = 1.0
    alphas = np.linspace(2.0, 6.0, 201)
    for a, a_next in zip(alphas[:-1], alphas[1:]):
        x = x + (a_next - a) * path.velocity(p, x, float(a))
    assert stats.kstest(x[:, 0, 0].numpy(), stats.beta(6.0, K - 1).cdf).pvalue > 1e-3
    assert stats.kstest(x[:, 0, 0].numpy(), stats.beta(5.5, K - 1).cdf).pvalue < 1e-6  # negative control
    rest = x[..., 1:] / x[..., 1:].sum(-1, keepdim=True)
    torch.testing.assert_close(rest, rest0, rtol=1e-6, atol=1e-9)  # the others shrink in proportion


def test_velocity_is_tangent_and_finite_on_the_faces():
    path = DirichletPath(6)
    x = dirichlet_from_normal(torch.randn(64, 3, 6, generator=torch.Generator().manual_seed(1)))
    x[:8, :, :3] = 0.0  # faces
    x[8:16] = torch.nn.functional.one_hot(torch.arange(3) % 6, 6).double()  # vertices
    x = x / x.sum(-1, keepdim=True)
    p = torch.softmax(torch.randn(64, 3, 6, dtype=torch.float64), -1)
    for alpha in (1.0, 2.0, 8.0):
        v = path.velocity(p, x, alpha)
        assert torch.isfinite(v).all()
        torch.testing.assert_close(v.sum(-1), torch.zeros(64, 3, dtype=torch.float64), atol=1e-12, rtol=0)


def test_dirichlet_path_samples_have_the_beta_marginal():
    path = DirichletPath(4, alpha_max=8.0)
    t = torch.full((20000,), 0.5)
    x = path.sample(torch.full((20000, 1), 2), t, generator=torch.Generator().manual_seed(0))
    a = float(path.alpha(0.5))
    assert torch.allclose(x.sum(-1), torch.ones(20000, 1))
    assert stats.kstest(x[:, 0, 2].numpy(), stats.beta(a, 3).cdf).pvalue > 1e-3


# -- scores and classifier guidance -----------------------------------------------------

def test_score_and_probabilities_round_trip():
    path = DirichletPath(5)
    g = torch.Generator().manual_seed(0)
    x = dirichlet_from_normal(torch.randn(10, 4, 5, generator=g))
    p = torch.softmax(torch.randn(10, 4, 5, generator=g, dtype=torch.float64), -1)
    alpha = torch.full((10,), 3.0, dtype=torch.float64)
    s = path.score(p, x, alpha)
    torch.testing.assert_close(s.sum(-1), torch.zeros(10, 4, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(path.probs_from_score(s, x, alpha), p, atol=1e-10, rtol=0)


def _two_class_world(K=4, L=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(3 * torch.randn(2, L, K, generator=g, dtype=torch.float64), -1)  # [2, L, K]


def _log_evidence(log_q, x, alpha):
    """log p(x | y) up to a y-free constant: sum_l log sum_j q_ylj x_lj^(alpha-1) [B, 2]."""
    return torch.logsumexp(log_q[None] + (alpha - 1) * x.log()[:, None], dim=-1).sum(-1)


def test_classifier_tilt_is_exact_on_a_two_class_world():
    """With the exact unconditional denoiser and the exact classifier, the tilt at scale 1 gives
    the exact conditional denoiser (eq. 19-20)."""
    K, L, B = 4, 3, 32
    log_q = _two_class_world(K, L)
    path = DirichletPath(K)
    x = dirichlet_from_normal(torch.randn(B, L, K, generator=torch.Generator().manual_seed(2)))
    t = torch.full((B,), 0.6, dtype=torch.float64)
    point = path.at(t)
    alpha = float(point.alpha[0])
    xg = x.clone().requires_grad_(True)
    ev = _log_evidence(log_q, xg, alpha)  # [B, 2]
    log_py = torch.log_softmax(ev, -1)  # p(y | x) with p(y) = 1/2
    (grad,) = torch.autograd.grad(log_py[:, 1].sum(), xg)
    w = log_py.exp().detach()  # [B, 2]
    per_class = torch.stack([path.posterior(log_q[y], x, t) for y in (0, 1)], 1)  # [B, 2, L, K]
    uncond = (w[:, :, None, None] * per_class).sum(1)
    tilted = path.classifier_tilt(uncond, x, point, grad)
    torch.testing.assert_close(tilted, per_class[:, 1], atol=1e-9, rtol=0)
    assert (path.classifier_tilt(uncond, x, point, 0.5 * grad) - per_class[:, 1]).abs().max() > 1e-3
    # alpha = 1: g / (alpha - 1) is 0/0; the path refuses rather than guess (the guidance takes the limit)
    at_one = path.at(torch.ones(B, dtype=torch.float64))
    with pytest.raises(InputError, match="0/0 at alpha = 1"):
        path.classifier_tilt(uncond, x, at_one, grad)


class TwoClassWorld(Denoiser):
    """The two-class world as a model: the exact unconditional denoiser (classes equally likely)
    and its exact noisy classifier p(y | x_t), in float64."""

    classifier = "exact"  # what the guidance's refusal checks for

    def __init__(self, path, log_q):
        super().__init__(path, "probs")
        self.log_q = log_q

    def classifier_logits(self, x, t):
        return _log_evidence(self.log_q, x.double(), self.path.alpha(t.double())[:, None, None, None])

    def per_class(self, x, t):
        return torch.stack([self.path.posterior(self.log_q[y], x, t) for y in (0, 1)], 1)  # [B, 2, L, K]

    def forward(self, x_native, timestep, cond):
        t = self.path.time_of(timestep.double())
        w = torch.softmax(self.classifier_logits(x_native, t), -1)
        return (w[:, :, None, None] * self.per_class(x_native, t)).sum(1).float()


def guided_errors(steps=10, n=16, guidance=None):
    """Errors [steps] of the classifier-guided probabilities (scale 1, target class 1) against
    the exact class-1 denoiser at each step of a run, the first at alpha = 1."""
    from flowkit.guidance import DirichletClassifierGuidance

    K, L = 4, 4  # exact_run's sequences have 4 positions
    path = DirichletPath(K)
    world = TwoClassWorld(path, _two_class_world(K, L))
    errors = []

    def check(ctx, step, x, pred):
        exact = world.per_class(pred.x.double(), pred.point.t)[:, 1]  # at the state the step was taken from
        errors.append(float((pred.probs.double() - exact).abs().max()))

    stack = GuidanceStack([guidance or DirichletClassifierGuidance(scale=1.0, target=1)])
    exact_run(path, world, n, steps, stack=stack, callback=check)
    return errors


def test_classifier_guidance_is_exact_from_the_first_step():
    """At alpha = 1 (t = 1, every run's first step) the tilt is the limit dg/dalpha of the
    classifier's gradient, which on the two-class world gives the class's prior exactly.
    Mutant caught: the correction set to 0 at alpha = 1 (error 0.485 on the first step)."""
    errors = guided_errors()
    assert len(errors) == 10
    assert errors[0] < 1e-3, errors  # the limit's forward difference over 1e-4 in alpha: O(1e-4)
    assert max(errors[1:]) < 1e-6, errors  # alpha > 1: the closed form (float32 state)


# -- sampling the toy task with the exact denoiser -----------------------------------------

def toy_task_check(K, path=None, n=20000, steps=20):
    """(KL of the tokens, max |z| of the state's means, NFE) for the exact denoiser on the toy
    task. The z-scores compare the mean of every coordinate x_lj of the state at the last
    evaluation (alpha = 7.65) with its exact value under the path's marginal,
    E[x_lj] = (q_lj alpha + 1 - q_lj) / (alpha + K - 1), in standard errors: the tokens alone
    are drawn from the exact posterior of whatever state was reached, so they hide a wrong
    transport (KL 0.003-0.016 with the velocity halved or doubled, under the old bound 0.01)."""
    task = ToyTask(K)
    path = path or DirichletPath(K)
    last = {}

    def keep(ctx, i, x, pred):
        if i == steps - 1:
            last["x"], last["t"] = pred.x.double(), pred.point.t[0]

    x, st = exact_run(path, task.exact_denoiser(path), n, steps, callback=keep)
    alpha = float(path.alpha(last["t"]))
    q = torch.from_numpy(task.probs)
    mean = (q * alpha + 1 - q) / (alpha + K - 1)
    z = (last["x"].mean(0) - mean).abs() / (last["x"].std(0) / n ** 0.5)
    return task.kl(x.argmax(-1)), float(z.max()), st.nfe


def check_toy_task(K, path=None):
    kl, z, nfe = toy_task_check(K, path)
    assert kl < 0.0015 and z < 5.0, (kl, z)
    return nfe


@pytest.mark.parametrize("K", [4, 20])
def test_exact_denoiser_samples_the_toy_task(K):
    """KL below 0.0015 (the exact sampler's expected KL is (K - 1) / 2n: 7.5e-5 and 4.8e-4;
    measured 1.5e-4 and 3.7e-4) and every coordinate's mean within 5 standard errors of the
    path's marginal (measured 3.0). Mutants caught (tests/test_mutants.py): the velocity
    halved (KL 0.0034, z 10-21) or doubled (KL 0.007-0.016, z 16-37)."""
    nfe = check_toy_task(K)
    assert nfe == [20] * 20000
    task = ToyTask(K)
    # negative control: without the transport the state stays flat and the final draw is wrong
    still = DirichletPath(K)
    still.velocity = lambda p, xx, a: torch.zeros_like(xx, dtype=torch.float64)
    x_bad, _ = exact_run(still, task.exact_denoiser(still), 5000, 20)
    assert task.kl(x_bad.argmax(-1)) > 0.01


def test_every_state_is_a_distribution_even_under_strong_guidance():
    K, n = 8, 256
    path = DirichletPath(K)
    cond_q, uncond_q = ToyTask(K, seed=1).log_probs * 4, ToyTask(K, seed=2).log_probs * 4

    class TwoBranch(ExactDenoiser):
        def forward(self, x_native, timestep, cond):
            t = self.path.time_of(timestep.double())
            y = cond["class_labels"].reshape(-1, 1, 1)
            return torch.where(y == 0, path.posterior(cond_q, x_native, t), path.posterior(uncond_q, x_native, t)).float()

    conds = {"cond": Conditioning({"class_labels": torch.zeros(n, dtype=torch.long)}),
             "uncond": Conditioning({"class_labels": torch.ones(n, dtype=torch.long)})}
    seen = []

    def check(ctx, step, x, pred):
        seen.append(step)
        assert torch.isfinite(x).all() and (x >= 0).all()
        torch.testing.assert_close(x.sum(-1), torch.ones(x.shape[:2]), atol=1e-5, rtol=0)
        assert (pred.probs >= 0).all()

    for space in ("model_output", "log_probs"):
        seen.clear()
        exact_run(path, TwoBranch(path, cond_q), n, 12, stack=GuidanceStack([CFG(scale=6.0, space=space)]),
                  conds=conds, callback=check)
        assert seen == list(range(12))
