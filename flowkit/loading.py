"""`flowkit.load`: the embedded models by name, or a local diffusers folder.

Built-in names: `shapes` (the shipped shapes model; weights in the package) and `tiny`
(the shapes architecture at a tiny width with seeded random weights: for tests and for
trying the machinery without the trained model). Shipped weights are loaded offline and
strictly: no missing or unexpected keys, and the sha256 of each file must match its
manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from flowkit.errors import UnknownNameError, WeightsError, closest

__all__ = ["load", "BUILTIN_MODELS", "weights_dir", "sha256_file", "load_unet_strict"]

BUILTIN_MODELS = {
    "shapes": "the shapes world's text-to-image flow model (32 px, shipped weights)",
    "tiny": "the shapes architecture, tiny and randomly initialised (seeded), for tests",
}


def weights_dir() -> Path:
    return Path(__file__).resolve().parent / "weights"


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_unet_strict(folder: Path, expected_sha256: str | None = None):
    """A UNet2DConditionModel from `folder` (config.json + safetensors), strictly."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    cfg_path = folder / "config.json"
    weights = folder / "diffusion_pytorch_model.safetensors"
    for p in (cfg_path, weights):
        if not p.is_file():
            raise WeightsError(f"missing weights file {p}: reinstall flowkit or retrain with `flowkit train`")
    if expected_sha256 is not None and sha256_file(weights) != expected_sha256:
        raise WeightsError(f"weights file {weights} is damaged (sha256 mismatch): reinstall flowkit")
    try:
        config = json.loads(cfg_path.read_text())
        state = load_file(str(weights))
    except Exception as e:
        raise WeightsError(f"cannot read weights file {weights}: {e}") from None
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    unet = UNet2DConditionModel.from_config(config)
    try:
        unet.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as e:
        raise WeightsError(f"weights file {weights} does not fit its config: {str(e).splitlines()[0]}") from None
    return unet.eval()


def _shapes_pipeline(unet):
    from flowkit.pipelines.shapes import ShapesPipeline, shapes_scheduler
    from flowkit.text import load_minilm

    tokenizer, text_encoder = load_minilm()
    pipe = ShapesPipeline(unet=unet.eval(), text_encoder=text_encoder, tokenizer=tokenizer,
                          scheduler=shapes_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _load_shapes():
    folder = weights_dir() / "shapes"
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        raise WeightsError(f"missing weights manifest {manifest}: the shipped shapes model is not installed "
                           "(use --model tiny, or train it with `flowkit train shapes`)")
    sums = json.loads(manifest.read_text())
    unet = load_unet_strict(folder / "unet", sums.get("unet/diffusion_pytorch_model.safetensors"))
    return _shapes_pipeline(unet)


def _load_tiny(seed: int = 0):
    from diffusers import UNet2DConditionModel

    from flowkit.pipelines.shapes import shapes_unet_config

    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**shapes_unet_config("tiny"))
    return _shapes_pipeline(unet)


def load(name_or_path: str | os.PathLike, **kwargs: Any):
    """A pipeline: a built-in model by name (`shapes`, `tiny`) or a local diffusers folder."""
    name = str(name_or_path)
    if name == "shapes":
        return _load_shapes()
    if name == "tiny":
        return _load_tiny(**kwargs)
    try:
        path = Path(name).expanduser()
        is_dir = path.is_dir()
    except (OSError, RuntimeError, ValueError):
        is_dir = False
    if is_dir:
        return _load_folder(path, **kwargs)
    raise UnknownNameError(f"unknown model {name!r}{closest(name, BUILTIN_MODELS)}: give one of "
                           f"{', '.join(BUILTIN_MODELS)} or the path of a local diffusers folder")


def _load_folder(path: Path, **kwargs: Any):
    """A local diffusers pipeline folder of a family flowkit samples (SD 1.x/2.x, SDXL, SD3,
    FLUX); other pipelines are refused with the list of supported families."""
    from diffusers import DiffusionPipeline

    from flowkit.adapters.base import adapt

    if not (path / "model_index.json").is_file():
        raise WeightsError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
    pipe = DiffusionPipeline.from_pretrained(str(path), local_files_only=True, **kwargs)
    adapt(pipe)  # UnsupportedError naming the supported families
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return pipe
