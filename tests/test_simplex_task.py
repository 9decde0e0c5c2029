"""The toy simplex task: its targets, its KL and the guard against letters never sampled."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from flowkit.errors import InputError
from flowkit.worlds.simplex import ToyTask, kl_per_position


def test_targets_are_seeded_softmaxes_of_uniforms():
    a, b = ToyTask(10), ToyTask(10)
    np.testing.assert_array_equal(a.probs, b.probs)
    assert a.probs.shape == (4, 10) and np.allclose(a.probs.sum(1), 1)
    assert not np.allclose(ToyTask(10, seed=1).probs, a.probs)
    logits = np.log(a.probs)
    spread = logits.max(1) - logits.min(1)
    assert (spread < 1).all()  # softmax of values in [0, 1)


def test_kl_of_the_target_itself_is_small_and_of_a_wrong_law_is_large():
    task = ToyTask(8)
    rng = np.random.default_rng(0)
    good = task.sample(50000, rng)
    assert task.kl(good) < 3 * 7 / (2 * 50000)
    wrong = torch.from_numpy(rng.integers(0, 2, size=(50000, 4)))
    assert task.kl(wrong) > 0.5


def test_letters_never_sampled_keep_the_kl_finite():
    task = ToyTask(40)
    few = task.sample(10, np.random.default_rng(0))  # most of the 40 letters never appear
    value = task.kl(few)
    assert np.isfinite(value) and value > 0
    one = torch.zeros(5, 4, dtype=torch.long)
    np.testing.assert_allclose(kl_per_position(one.numpy(), task.probs), -np.log(task.probs[:, 0]))


def test_kl_rejects_bad_shapes():
    with pytest.raises(InputError, match="expected samples"):
        ToyTask(4).kl(np.zeros((3, 5), dtype=int))
    with pytest.raises(InputError, match="K >= 2"):
        ToyTask(1)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 5), min_size=4, max_size=4), min_size=1, max_size=30))
def test_kl_is_finite_and_nonnegative_for_any_sample(rows):
    value = ToyTask(6).kl(np.array(rows))
    assert np.isfinite(value) and value >= -1e-12
