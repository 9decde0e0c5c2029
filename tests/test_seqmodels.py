"""Sequence models in the core: loading the shipped weights (sha256-checked), sampling through
`flowkit.sample`, input errors, and `flowkit generate --model dna` printing FASTA."""

import shutil

import pytest
import torch

import flowkit
from flowkit.cli import main
from flowkit.errors import InputError, UnknownNameError, UnsupportedError, WeightsError
from flowkit.loading import weights_dir
from flowkit.seqmodels import load_pipeline, tiny_pipeline
from flowkit.worlds import dna


@pytest.fixture(scope="module")
def dna_model():
    return flowkit.load("dna")


def test_shipped_models_load_and_check_their_sha256(tmp_path):
    for name, world in (("dna", "dna"), ("dna-distilled", "dna"), ("simplex", "simplex")):
        pipe = flowkit.load(name)
        assert pipe.world == world and not pipe.net.training

    copy = tmp_path / "simplex"
    shutil.copytree(weights_dir() / "simplex" / "denoiser", copy)
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        load_pipeline(copy)


def test_distilled_model_samples_in_one_step_and_learned_the_motifs():
    """The one-step student plants its class's motif far more often than the background chain
    alone would (a random 100-letter background sequence holds a given 6-mer < 5% of the time)."""
    from flowkit.worlds import dna

    pipe = flowkit.load("dna-distilled")
    out = flowkit.sample(pipe, ["silencer"] * 32, sampler="dirichlet-onestep", guidance="none", seed=3, length=100)
    assert out.stats.nfe == [1] * 32
    assert dna.motif_rate(out.images, 2) >= 0.25
    assert dna.motif_rate(out.images, 0) < 0.15  # negative control: another class's motif stays rare
    with pytest.raises(UnsupportedError, match="distilled one-step model"):
        flowkit.sample(flowkit.load("dna"), ["silencer"], sampler="dirichlet-onestep", guidance="none")


def test_sampling_sequences_and_their_errors(dna_model):
    out = flowkit.sample(dna_model, ["promoter", "2"], steps=4, seed=0, guidance="none", length=70)
    assert [len(s) for s in out.images] == [70, 70] and all(set(s) <= set("ACGT") for s in out.images)
    assert out.stats.sampler == "dirichlet" and out.stats.nfe == [4, 4]
    again = flowkit.sample(dna_model, ["promoter"], steps=4, seed=0, guidance="none", length=70)
    assert again.images[0] == out.images[0]  # a sequence never depends on its batch partners
    with pytest.raises(InputError, match="lengths from 64 to 200, got 300"):
        flowkit.sample(dna_model, ["promoter"], steps=2, length=300)
    with pytest.raises(UnknownNameError, match="unknown class 'promotor'"):
        flowkit.sample(dna_model, ["promotor"], steps=2)
    with pytest.raises(InputError, match="height 1"):
        flowkit.sample(dna_model, ["promoter"], steps=2, height=8, width=64)
    with pytest.raises(InputError, match="unconditional"):
        flowkit.sample(flowkit.load("simplex"), ["a red circle"], steps=2)


def test_output_types():
    pipe = tiny_pipeline("dna")
    pt = flowkit.sample(pipe, ["enhancer"], steps=2, length=64, output_type="pt").images
    strings = flowkit.sample(pipe, ["enhancer"], steps=2, length=64).images
    assert pt.dtype == torch.long and dna.decode(pt[0]) == strings[0]
    toy = flowkit.sample(tiny_pipeline("simplex"), [""], steps=2).images
    assert isinstance(toy[0], list) and len(toy[0]) == 4
    with pytest.raises(InputError, match="output_type"):
        flowkit.sample(pipe, ["enhancer"], steps=2, length=64, output_type="png")


def test_generate_prints_fasta(capsys, tmp_path):
    assert main(["generate", "--model", "dna", "--class", "promoter", "-n", "2", "--steps", "4", "--length", "64"]) == 0
    records = dna.parse_fasta(capsys.readouterr().out)
    assert len(records) == 2 and all(len(s) == 64 for _, s in records)
    assert records[0][0].startswith("0 class=promoter seed=")
    assert main(["generate", "--model", "dna", "--class", "1", "--steps", "2", "--out", str(tmp_path / "x.fa")]) == 0
    assert dna.parse_fasta((tmp_path / "x.fa").read_text())[0][0].startswith("0 class=enhancer")
    capsys.readouterr()
    for argv, msg in [(["--class", "promotr"], "did you mean 'promoter'"), (["--length", "20"], "lengths from 64"),
                      (["--out", str(tmp_path)], "one FASTA file"), (["--sampler", "euler"], "gaussian paths")]:
        assert main(["generate", "--model", "dna", "--steps", "2", *argv]) == 2
        assert msg in capsys.readouterr().err
