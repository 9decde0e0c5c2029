"""Paired wall-time rows: both arms timed in this run, alternating, after a warm-up."""

from __future__ import annotations

import numpy as np
import pytest

from flowkit.bench.timing import alternating_seconds


def test_rounds_alternate_after_one_warm_up_of_each_and_seconds_go_to_their_arm():
    """The call log is warm-up a, warm-up b, then a b / b a / a b ...; each arm gets the seconds
    its own calls returned (mutants: a fixed order, no warm-up, a's and b's seconds swapped,
    a round's index not passed on)."""
    log = []

    def make(name, value):
        def run(r):
            log.append((name, r))
            return value + r
        return run

    a, b = alternating_seconds(make("a", 10.0), make("b", 20.0), 4)
    assert log == [("a", 0), ("b", 0),
                   ("a", 0), ("b", 0), ("b", 1), ("a", 1), ("a", 2), ("b", 2), ("b", 3), ("a", 3)]
    np.testing.assert_array_equal(a, [10, 11, 12, 13])
    np.testing.assert_array_equal(b, [20, 21, 22, 23])


def test_a_drift_in_load_cancels_in_the_ratio_of_means():
    """Two equally fast arms on a machine that slows down call by call: alternating order keeps
    the ratio of means near 1 (a fixed order a-then-b would give b the later, slower slots in
    every round: ratio 0.95 here)."""
    clock = iter(range(1000))

    def run(r):
        return 1.0 + 0.1 * next(clock)

    a, b = alternating_seconds(run, run, 10)
    assert a.mean() / b.mean() == pytest.approx(1.0, abs=1e-12)


def test_repeats_below_one_are_refused():
    with pytest.raises(ValueError, match="repeats"):
        alternating_seconds(lambda r: 0.0, lambda r: 0.0, 0)
