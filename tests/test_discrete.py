"""Discrete flow matching (mixture path, jump sampler) and linear flow matching on the simplex."""

import pytest
import torch

from flowkit.conditioning import Conditioning
from flowkit.context import Context
from flowkit.denoiser import Denoiser
from flowkit.errors import InputError, UnsupportedError
from flowkit.guidance import GuidanceStack
from flowkit.paths.categorical import categorical_from_normal, one_hot, project_simplex
from flowkit.paths.mixture import MixturePath
from flowkit.paths.simplex_linear import SimplexLinearPath
from flowkit.samplers import DirichletEuler, DiscreteEuler, SimplexLinear
from flowkit.sampling_loop import integrate
from flowkit.seeding import generators_for, randn_per_sample
from flowkit.worlds.simplex import ToyTask


def exact_run(path, sampler, task, n, steps, callback=None):
    gens = generators_for(0, range(n))
    conds = {"cond": Conditioning({"class_labels": torch.zeros(n, dtype=torch.long)})}
    ctx = Context(task.exact_denoiser(path), GuidanceStack([]), conds, gens, steps)
    noise = randn_per_sample((task.length, path.state_size), gens)
    return integrate(sampler, ctx, noise, path.uniform_grid(steps), callback=callback)


def test_kappa_maps_flowkit_time_and_back():
    path = MixturePath(5, "mask", power=2.0)
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(path.kappa(t), (1 - t) ** 2)
    torch.testing.assert_close(path.time_of(path.at(t).timestep), t)
    assert path.kappa(1.0) == 0 and path.kappa(0.0) == 1
    assert path.state_size == 6 and path.mask_index == 5
    assert MixturePath(5, "uniform").state_size == 5 and MixturePath(5, "uniform").mask_index is None
    assert path.jump_probability(0.5, 0.25) == pytest.approx((0.75**2 - 0.25) / (1 - 0.25))


@pytest.mark.parametrize("source", ["mask", "uniform"])
def test_mixture_path_keeps_the_clean_letter_with_probability_kappa(source):
    K, n = 6, 20000
    path = MixturePath(K, source)
    tokens = torch.full((n, 2), 3)
    x = path.sample(tokens, torch.full((n,), 0.3), torch.randn(n, 2, path.state_size, generator=torch.Generator().manual_seed(0)))
    letters = x.argmax(-1)
    kept = (letters == 3).double().mean().item()
    chance = 0.0 if source == "mask" else (1 - 0.7) / K
    assert kept == pytest.approx(0.7 + chance, abs=0.015)
    if source == "mask":
        assert set(letters.unique().tolist()) == {3, K}


@pytest.mark.parametrize("source", ["mask", "uniform"])
@pytest.mark.parametrize("K", [4, 20])
def test_jump_sampler_with_the_exact_denoiser_samples_the_toy_task(source, K):
    task = ToyTask(K)
    path = MixturePath(K, source)
    x, stats = exact_run(path, DiscreteEuler(), task, 20000, 10)
    assert task.kl(x.argmax(-1)) < 0.01 and stats.nfe == [10] * 20000
    assert (x.sum(-1) == 1).all()


class MixtureOfProducts(Denoiser):
    """The exact denoiser of the masked mixture path for a target with dependent positions:
    x1 ~ sum_c pi_c prod_l q_c[l] (each sequence from one of C factorised components), so
    p(x1_l | x_t) at a masked position depends on the letters already drawn elsewhere."""

    def __init__(self, path, log_pi, log_q):
        super().__init__(path, "probs")
        self.log_pi, self.log_q = log_pi, log_q  # [C], [C, L, K]

    def forward(self, x, timestep, cond):
        K = self.path.num_categories
        letter = x.argmax(-1)  # [B, L]
        seen = letter < K
        C = self.log_q.shape[0]
        idx = letter.clamp(max=K - 1)[:, None, :, None].expand(-1, C, -1, 1)
        loglik = self.log_q[None].expand(x.shape[0], -1, -1, -1).gather(3, idx)[..., 0]  # [B, C, L]
        w = torch.softmax(self.log_pi[None] + (loglik * seen[:, None]).sum(-1), dim=-1)  # p(c | seen letters)
        masked = (w[:, :, None, None] * self.log_q.exp()[None]).sum(1)  # [B, L, K]
        return torch.where(seen[..., None], one_hot(letter.clamp(max=K - 1), K, torch.float64), masked).float()

    def joint(self):
        """p(x1) [K^L] over all sequences, in lexicographic order."""
        C, L, K = self.log_q.shape
        seqs = torch.cartesian_prod(*[torch.arange(K)] * L).reshape(-1, L)  # [K^L, L]
        lp = self.log_pi[:, None] + sum(self.log_q[:, l, seqs[:, l]] for l in range(L))  # [C, K^L]
        return torch.logsumexp(lp, 0).exp()


def masked_dependent_tv(steps=20, n=20000, K=3, L=3):
    """Total variation between the empirical joint law of n masked-source jump-sampler draws
    and the exact law of a two-component mixture with dependent positions (exact denoiser).
    Each step draws its jumping positions independently, so the error is O(1/steps) (about
    0.02 at 20 steps); a sampler that draws every position in the same step (jump probability
    forced to 1, or to 0 so that the last step draws all) gets the product of the marginals,
    0.4 away."""
    g = torch.Generator().manual_seed(0)
    log_q = torch.log_softmax(3 * torch.randn(2, L, K, generator=g, dtype=torch.float64), -1)
    den = MixtureOfProducts(MixturePath(K, "mask"), torch.full((2,), 0.5, dtype=torch.float64).log(), log_q)
    gens = generators_for(0, range(n))
    conds = {"cond": Conditioning({"class_labels": torch.zeros(n, dtype=torch.long)})}
    ctx = Context(den, GuidanceStack([]), conds, gens, steps)
    x, _ = integrate(DiscreteEuler(), ctx, randn_per_sample((L, K + 1), gens), den.path.uniform_grid(steps))
    tokens = x.argmax(-1)
    assert (tokens < K).all()  # nothing left masked
    codes = (tokens * torch.tensor([K ** (L - 1 - l) for l in range(L)])).sum(-1)
    empirical = torch.bincount(codes, minlength=K ** L).double() / n
    return 0.5 * float((empirical - den.joint()).abs().sum())


def test_masked_jump_sampler_keeps_dependent_positions_together():
    """The jump schedule matters only where positions depend on each other: on a two-component
    mixture the sampler's joint law is within 0.05 in total variation of the exact one.
    Mutants caught (tests/test_mutants.py): the jump probability forced to 0 or to 1 (0.42)."""
    check_masked_dependent()


def check_masked_dependent():
    tv = masked_dependent_tv()
    assert tv < 0.05, tv


def test_masked_letters_once_drawn_never_change():
    task, path = ToyTask(6), MixturePath(6, "mask")
    history = []
    exact_run(path, DiscreteEuler(), task, 500, 8, callback=lambda ctx, i, x, p: history.append(x.argmax(-1)))
    for before, after in zip(history, history[1:]):
        drawn = before != 6
        assert (after[drawn] == before[drawn]).all()
    assert (history[-1] != 6).all()  # nothing masked at the end
    masked = [(h == 6).double().mean().item() for h in history]
    assert masked == sorted(masked, reverse=True)


def test_linear_path_and_its_sampler():
    K = 4
    task, path = ToyTask(K), SimplexLinearPath(K)
    x, _ = exact_run(path, SimplexLinear(), task, 20000, 20)
    assert task.kl(x.argmax(-1)) < 0.01
    # the conditional path: x_i >= 1 - t on the support of e_i
    toks = torch.randint(0, K, (100, 3), generator=torch.Generator().manual_seed(0))
    xt = path.sample(toks, torch.full((100,), 0.4), torch.randn(100, 3, K))
    assert (xt.gather(-1, toks[..., None]) >= 0.6 - 1e-6).all()
    torch.testing.assert_close(xt.sum(-1), torch.ones(100, 3))


def test_samplers_refuse_other_paths():
    task = ToyTask(4)
    for sampler, path in [(DiscreteEuler(), SimplexLinearPath(4)), (SimplexLinear(), MixturePath(4)),
                          (DirichletEuler(), MixturePath(4))]:
        with pytest.raises(UnsupportedError, match=f"steps the {sampler.path_name} path"):
            gens = generators_for(0, range(2))
            ctx = Context(task.exact_denoiser(path), GuidanceStack([]), {}, gens, 2)
            reason = sampler.refuse(ctx)
            raise UnsupportedError(reason)


def test_simplex_helpers():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(500, 7, generator=g, dtype=torch.float64) * 2
    p = project_simplex(v)
    assert (p >= 0).all()
    torch.testing.assert_close(p.sum(-1), torch.ones(500, dtype=torch.float64))
    on = torch.softmax(v, -1)
    torch.testing.assert_close(project_simplex(on), on)  # identity on the simplex
    # the projection is the closest point: no simplex point from a random sample is closer
    cand = torch.softmax(torch.randn(500, 7, generator=g, dtype=torch.float64), -1)
    assert ((v - p).norm(dim=-1) <= (v - cand).norm(dim=-1) + 1e-12).all()
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3], dtype=torch.float64)
    draws = categorical_from_normal(probs.expand(40000, 4), torch.randn(40000, generator=g))
    freq = torch.bincount(draws, minlength=4).double() / 40000
    assert freq[1] == 0 and torch.allclose(freq, probs, atol=0.01)


def test_paths_reject_bad_tokens():
    with pytest.raises(InputError, match="lie in"):
        MixturePath(4).sample(torch.tensor([[0, 4]]), torch.tensor([0.5]), torch.randn(1, 2, 5))
    with pytest.raises(InputError, match="at least 2"):
        MixturePath(1)
    with pytest.raises(InputError, match="source"):
        MixturePath(4, "gaussian")
