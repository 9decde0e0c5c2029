"""The shapes model as shipped: a checksummed folder loaded offline and strictly, and (once
the weights are installed) a model that actually draws what it is asked."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import flowkit
from flowkit.errors import WeightsError
from flowkit.loading import SHAPES_FILES, save_shapes, weights_dir
from flowkit.checksums import MANIFEST_FILE, sha256_file


@pytest.fixture(scope="module")
def tiny_unet():
    return flowkit.load("tiny").unet


@pytest.fixture
def folder(tiny_unet, tmp_path):
    save_shapes(tiny_unet, tmp_path / "model")
    return tmp_path / "model"


def _latents(pipe, seed=3):
    return flowkit.sample(pipe, ["a red circle"], steps=2, seed=seed, output_type="latent").latents


def test_saved_folder_loads_offline_strictly_and_samples_like_the_original(folder, tiny_unet, no_network):
    sums = json.loads((folder / MANIFEST_FILE).read_text())
    assert set(sums) == set(SHAPES_FILES)
    state = load_file(str(folder / SHAPES_FILES[1]))
    assert all(v.dtype == torch.float16 for v in state.values())
    assert set(state) == set(tiny_unet.state_dict())
    pipe = flowkit.load(folder)
    assert not pipe.unet.training
    # fp16 storage: the loaded model samples like the fp32 original up to fp16 rounding,
    # and a different seed is far away (the negative control)
    ref = flowkit.load("tiny")
    a, b, c = _latents(pipe), _latents(ref), _latents(ref, seed=4)
    assert (a - b).abs().max() < 2e-2 < (a - c).abs().max()


@pytest.mark.parametrize("name", SHAPES_FILES)
def test_damaged_file_is_named(folder, name):
    path = folder / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="damaged") as e:
        flowkit.load(folder)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("name", (*SHAPES_FILES, MANIFEST_FILE))
def test_missing_file_is_named(folder, name):
    (folder / name).unlink()
    with pytest.raises(WeightsError, match="missing") as e:
        from flowkit.loading import load_shapes

        load_shapes(folder)
    assert str(folder / name) in str(e.value)


def test_unexpected_key_is_refused_even_with_a_consistent_manifest(folder):
    path = folder / SHAPES_FILES[1]
    state = load_file(str(path))
    state["extra.weight"] = torch.zeros(1, dtype=torch.float16)
    save_file(state, str(path))
    sums = json.loads((folder / MANIFEST_FILE).read_text())
    sums[SHAPES_FILES[1]] = sha256_file(path)
    (folder / MANIFEST_FILE).write_text(json.dumps(sums))
    with pytest.raises(WeightsError, match="does not fit its config") as e:
        flowkit.load(folder)
    assert str(path) in str(e.value)


def test_export_only_writes_a_loadable_folder_from_a_checkpoint(tmp_path, capsys):
    from flowkit.cli import main
    from flowkit.train import TrainConfig, train
    from flowkit.train.shapes import ShapesTask

    out = tmp_path / "run"
    train(ShapesTask(size="tiny", total_steps=2), TrainConfig(steps=2, batch_size=2, ckpt_every=1), out,
          progress=False)
    shutil.rmtree(out / "export")
    assert main(["train", "shapes", "--out", str(out), "--export-only"]) == 2  # base size: the checkpoint does not fit
    assert "does not fit the shapes model" in capsys.readouterr().err
    assert main(["train", "shapes", "--out", str(tmp_path / "empty"), "--export-only"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    from flowkit.train.loop import export_checkpoint

    export_checkpoint(ShapesTask(size="tiny"), out)
    pipe = flowkit.load(out / "export")
    assert torch.isfinite(_latents(pipe)).all()


# ----------------------------------------------------------------------------- the shipped model

SHIPPED = (weights_dir() / "shapes" / MANIFEST_FILE).is_file()
needs_weights = pytest.mark.skipif(not SHIPPED, reason="the shapes model's weights are not installed yet "
                                                       "(flowkit/weights/shapes; see flowkit train shapes)")


@needs_weights
def test_shipped_model_loads_offline_and_strictly(no_network):
    folder = weights_dir() / "shapes"
    assert (folder / SHAPES_FILES[1]).stat().st_size <= 16 << 20
    pipe = flowkit.load("shapes")
    assert not pipe.unet.training


@needs_weights
def test_shipped_model_draws_a_red_circle():
    from flowkit.worlds.shapes_eval import evaluate

    pipe = flowkit.load("shapes")
    out = flowkit.sample(pipe, ["a red circle"] * 16, steps=30, seed=0, output_type="latent")
    present = [evaluate(x, "a red circle")["presence"] for x in out.latents]
    assert sum(present) >= 12, present


def test_random_weights_do_not_pass_the_smoke_test():
    """The negative control of the smoke test: the same check on the random tiny model fails."""
    from flowkit.worlds.shapes_eval import evaluate

    out = flowkit.sample(flowkit.load("tiny"), ["a red circle"] * 16, steps=4, seed=0, output_type="latent")
    assert sum(evaluate(x, "a red circle")["presence"] for x in out.latents) < 12
    assert np.isfinite(out.latents.numpy()).all()


# ----------------------------------------------------------------------------- training inputs


def test_caption_embeddings_are_cached_and_equal_the_encoder(tmp_path, monkeypatch):
    from flowkit.text import encode_texts, load_minilm
    from flowkit.train import shapes as T

    monkeypatch.setenv("FLOWKIT_CACHE", str(tmp_path))
    path = T.caption_embeddings_file()
    assert path.parent == tmp_path / "shapes" and not path.exists()
    first = T.caption_embeddings()
    assert path.is_file() and len(first) == 481 and "" in first
    tok, enc = load_minilm()
    texts = ["three red circles", "a blue square and two yellow triangles", ""]
    direct = encode_texts(tok, enc, texts)
    assert all(torch.equal(first[t], d) for t, d in zip(texts, direct))
    assert not torch.equal(first[texts[0]], first[texts[1]])  # the negative control: captions differ
    # the second call reads the file, without the text encoder
    monkeypatch.setattr(T, "load_minilm", lambda: (_ for _ in ()).throw(AssertionError("encoder loaded")))
    again = T.caption_embeddings()
    assert all(torch.equal(first[t], again[t]) for t in texts)


def test_train_device_is_validated(capsys):
    from flowkit.cli import main

    for device, message in (("gpu", "--device must be cpu or cuda[:N]"), ("cuda", "no CUDA device here")):
        if device == "cuda" and torch.cuda.is_available():
            continue
        assert main(["train", "shapes", "--device", device, "--steps", "1"]) == 2
        assert message in capsys.readouterr().err
