"""The dna world: its law, its exact metrics, and the parsers of user input (fuzzed)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from flowkit.errors import FlowkitError, InputError, UnknownNameError
from flowkit.worlds import dna


def test_encode_decode_round_trip_and_unknown_letters():
    assert dna.decode(dna.encode("ACGTacgt")) == "ACGTACGT"
    with pytest.raises(InputError, match=r"unknown letter 'N' at position 3 .* use only A, C, G, T"):
        dna.encode("ACNGT")
    with pytest.raises(InputError, match="empty"):
        dna.encode("")
    with pytest.raises(InputError, match="lengths from 64 to 200, got 63"):
        dna.check_length(63)
    assert dna.check_length(200) == 200


def test_the_law_plants_each_class_motif_at_the_planted_rate():
    rng = np.random.default_rng(0)
    n = 3000
    for c in range(3):
        seqs = dna.sample(n, c, 128, rng)
        assert seqs.shape == (n, 128)
        own = dna.motif_rate(seqs, c)
        others = [dna.motif_rate(seqs, o) for o in range(3) if o != c]
        assert own == pytest.approx(dna.PLANT, abs=0.05)  # plus a few chance hits
        assert max(others) < 0.15
    background = dna.sample(n, 0, 128, rng)
    assert dna.log_likelihood(background).mean() == pytest.approx(
        dna.log_likelihood(dna.sample(n, 1, 128, rng)).mean(), abs=0.02)


def test_log_likelihood_matches_the_chain_by_hand():
    seq = "ACGTTA"
    T, p0 = dna.TRANSITIONS, dna.stationary()
    idx = [0, 1, 2, 3, 3, 0]
    expect = (np.log(p0[0]) + sum(np.log(T[a, b]) for a, b in zip(idx, idx[1:]))) / 6
    assert dna.log_likelihood([seq])[0] == pytest.approx(expect)
    assert np.allclose(p0 @ T, p0)


def test_kmer_divergence_separates_laws():
    rng = np.random.default_rng(1)
    a, b = dna.sample(400, 0, 128, rng), dna.sample(400, 0, 128, rng)
    uniform = torch.from_numpy(rng.integers(0, 4, size=(400, 128)))
    same, diff = dna.kmer_js(a, b), dna.kmer_js(a, uniform)
    assert 0 <= same < 0.01 < diff
    assert dna.kmer_js(a, a) == pytest.approx(0.0, abs=1e-12)


def test_fasta_parse_and_format():
    text = ">s1 promoter\nACGT\nacg\n\n>s2\nTTTT\n"
    assert dna.parse_fasta(text) == [("s1 promoter", "ACGTACG"), ("s2", "TTTT")]
    assert dna.parse_fasta(dna.format_fasta([("a", "ACGT" * 40)], width=7)) == [("a", "ACGT" * 40)]
    for bad, msg in [("ACGT\n>a\nA", "before any '>' header"), (">a\n>b\nAC", "has no sequence"),
                     ("", "no FASTA records"), (">a\nACXT", "record 'a': unknown letter 'X'")]:
        with pytest.raises(InputError, match=msg):
            dna.parse_fasta(bad)


def test_parse_class_by_name_and_index():
    assert dna.parse_class("promoter") == 0 and dna.parse_class("Silencer") == 2
    assert dna.parse_class(1) == 1 and dna.parse_class(" 2 ") == 2
    with pytest.raises(UnknownNameError, match="did you mean 'enhancer'"):
        dna.parse_class("enhancr")
    with pytest.raises(InputError, match="out of range: use 0 to 2"):
        dna.parse_class("3")
    with pytest.raises(InputError, match="out of range"):
        dna.parse_class(-1)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_fuzz_parsers_raise_only_flowkit_errors(text):
    for parse in (dna.parse_fasta, dna.encode, dna.parse_class):
        try:
            out = parse(text)
        except FlowkitError:
            continue
        if parse is dna.parse_class:
            assert 0 <= out < len(dna.CLASSES)
        elif parse is dna.encode:
            assert dna.decode(out) == text.upper()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.text(alphabet=st.characters(blacklist_categories=("Cc", "Zl", "Zp")), max_size=20),
                          st.text(alphabet="ACGTacgt", min_size=1, max_size=150)), min_size=1, max_size=5),
       st.integers(1, 80))
def test_fuzz_fasta_round_trip(records, width):
    records = [(h.strip(), s) for h, s in records]
    assert dna.parse_fasta(dna.format_fasta(records, width)) == [(h, s.upper()) for h, s in records]
