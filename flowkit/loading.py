"""`flowkit.load`: the embedded models by name, or a local diffusers folder.

Built-in names: `shapes` (the shipped shapes model; weights in the package) and `tiny`
(the shapes architecture at a tiny width with seeded random weights: for tests and for
trying the machinery without the trained model). Shipped weights are loaded offline and
strictly: no missing or unexpected keys, and the sha256 of each file must match its
manifest.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

from flowkit.checksums import (
    MANIFEST_FILE,
    sha256_file,
    verify_manifest,
    write_manifest,
)
from flowkit.errors import UnknownNameError, WeightsError, clip, closest
from flowkit.storage import weights_dir

__all__ = ["load", "load_model", "check_builtin_size", "DEFAULT_MODEL", "FALLBACK_MODEL", "BUILTIN_MODELS", "weights_dir", "sha256_file", "load_unet_strict", "save_shapes",
           "load_shapes", "SHAPES_FILES"]

# the files of a shapes model folder (the shipped one, or one written by `save_shapes`)
SHAPES_FILES = ("unet/config.json", "unet/diffusion_pytorch_model.safetensors")

BUILTIN_MODELS = {
    "shapes": "the shapes world's text-to-image flow model (32 px, shipped weights)",
    "tiny": "the shapes architecture, tiny and randomly initialised (seeded), for tests",
    # the sequence models (flowkit.seqmodels.SHIPPED)
    "dna": "the dna world's class-conditional Dirichlet FM model (promoter, enhancer, silencer; lengths 64-200)",
    "dna-distilled": "the dna model distilled into a one-step sampler (sampler dirichlet-onestep)",
    "simplex": "the toy simplex task's Dirichlet FM model (K = 20, length 4, unconditional)",
}
SEQUENCE_MODELS = ("dna", "dna-distilled", "simplex")
DEFAULT_MODEL = "shapes"  # what the command line and batch runs load when no model is named
FALLBACK_MODEL = "tiny"  # ... and what they load instead when its weights are not installed


def check_builtin_size(name: str, height: int, width: int) -> None:
    """The size rules of a built-in image model (`shapes`, `tiny`), checked without loading it:
    the same check its adapter makes once loaded (InputError). Other models: nothing here."""
    if name in ("shapes", "tiny"):
        from flowkit.adapters.shapes import check_shapes_size

        check_shapes_size(height, width)


def builtin_latent_elements(name: str, height: int | None, width: int | None) -> int | None:
    """Values in one latent of a built-in image model (`shapes`, `tiny`: pixel space) at
    height x width (None: its native size), known without loading it; None for other models."""
    if name not in ("shapes", "tiny"):
        return None
    from flowkit.worlds.shapes_pipeline import shapes_unet_config

    config = shapes_unet_config("base" if name == "shapes" else "tiny")
    native = int(config["sample_size"])
    return int(config["in_channels"]) * (height or native) * (width or native)


def load_unet_strict(folder: Path):
    """A UNet2DConditionModel from `folder` (config.json + safetensors), strictly: no
    missing or unexpected keys, no shape mismatch; in eval mode. Checksums are the
    manifest's job (`verify_manifest`), checked before this reads anything."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    cfg_path = folder / "config.json"
    weights = folder / "diffusion_pytorch_model.safetensors"
    for p in (cfg_path, weights):
        if not p.is_file():
            raise WeightsError(f"missing weights file {p}: reinstall flowkit or retrain with `flowkit train`")
    try:
        config = json.loads(cfg_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise WeightsError(f"cannot read weights config {cfg_path}: {e}") from None
    try:
        state = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types
        raise WeightsError(f"cannot read weights file {weights}: {e}") from None
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    unet = UNet2DConditionModel.from_config(config)
    try:
        unet.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as e:
        raise WeightsError(f"weights file {weights} does not fit its config: {str(e).splitlines()[0]}") from None
    return unet.eval()


def _shapes_pipeline(unet):
    from flowkit.text import load_minilm
    from flowkit.worlds.shapes_pipeline import ShapesPipeline, shapes_scheduler

    tokenizer, text_encoder = load_minilm()
    pipe = ShapesPipeline(unet=unet.eval(), text_encoder=text_encoder, tokenizer=tokenizer,
                          scheduler=shapes_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_shapes(unet, folder: str | os.PathLike) -> list[Path]:
    """Write a shapes UNet as a loadable model folder: `unet/` (diffusers config and fp16
    safetensors) and `manifest.json` with their sha256. `flowkit.load(folder)` reads it."""
    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    (folder / "unet").mkdir(parents=True, exist_ok=True)
    config, weights = (folder / name for name in SHAPES_FILES)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in unet.state_dict().items()}
    save_file(state, str(weights))
    config.write_text(json.dumps(dict(unet.config), indent=2, default=list) + "\n")
    return [config, weights, write_manifest(folder, (config, weights))]


def load_shapes(folder: str | os.PathLike | None = None):
    """The shapes pipeline from `folder` (default: the shipped model), offline and strictly:
    the manifest's sha256 are checked before the weights are read."""
    shipped = folder is None
    folder = Path(weights_dir() / "shapes" if shipped else folder)
    if shipped and not (folder / MANIFEST_FILE).is_file():
        raise WeightsError(f"missing weights manifest {folder / MANIFEST_FILE}: the shipped shapes model is not "
                           "installed (use --model tiny, or train it with `flowkit train shapes`)")
    verify_manifest(folder, SHAPES_FILES, hint="reinstall flowkit" if shipped else "export the model again")
    return _shapes_pipeline(load_unet_strict(folder / "unet"))


def _load_tiny(seed: int = 0):
    import torch
    from diffusers import UNet2DConditionModel

    from flowkit.worlds.shapes_pipeline import shapes_unet_config

    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**shapes_unet_config("tiny"))
    return _shapes_pipeline(unet)


def load(name_or_path: str | os.PathLike, **kwargs: Any):
    """A pipeline: a built-in model by name (`shapes`, `tiny`) or a local diffusers folder."""
    name = str(name_or_path)
    if name == "shapes":
        return load_shapes()
    if name == "tiny":
        return _load_tiny(**kwargs)
    if name in SEQUENCE_MODELS:
        from flowkit.seqmodels import load_builtin

        return load_builtin(name)
    try:
        path = Path(name).expanduser()
        is_dir = path.is_dir()
    except (OSError, RuntimeError, ValueError):
        is_dir = False
    if is_dir and (path / MANIFEST_FILE).is_file() and (path / "unet").is_dir():
        return load_shapes(path)  # a shapes model folder written by `save_shapes`
    if is_dir:
        return _load_folder(path, **kwargs)
    raise UnknownNameError(f"unknown model {name!r}{closest(name, BUILTIN_MODELS)}: give one of "
                           f"{', '.join(BUILTIN_MODELS)} or the path of a local diffusers folder")


def load_model(name: str | None = None, *, on_fallback: Callable[[str], None] | None = None) -> tuple[Any, str]:
    """(pipeline, model name). A named model loads as `load` loads it. With no name, the
    default model (DEFAULT_MODEL) loads; where its weights are not installed the untrained
    FALLBACK_MODEL loads instead, and `on_fallback` (default: a logged warning) is told why."""
    if name is not None:
        return load(name), name
    try:
        return load(DEFAULT_MODEL), DEFAULT_MODEL
    except WeightsError as e:
        note = (f"note: the default model {DEFAULT_MODEL!r} is not available ({e}); using the untrained "
                f"{FALLBACK_MODEL!r} model instead")
        (on_fallback or logging.getLogger(__name__).warning)(note)
        return load(FALLBACK_MODEL), FALLBACK_MODEL


# libraries whose classes a model_index.json may name; anything else is code from the folder or
# a package flowkit does not vet, which it will not import
_COMPONENT_LIBRARIES = ("diffusers", "transformers")


def _check_model_index(path: Path) -> None:
    """Refuse (WeightsError) a model_index.json that is not a JSON object, names a pipeline
    class diffusers does not have, or names custom code (a [module, class] pipeline, or a
    component from a library other than diffusers and transformers): no code from a model
    folder ever runs."""
    import diffusers

    from flowkit.limits import read_bounded

    index = path / "model_index.json"
    try:
        data = json.loads(read_bounded(index, "model_index.json").decode("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise WeightsError(f"{clip(str(index))} is not valid JSON ({clip(str(e), 120)}): the folder is damaged; "
                           "save the pipeline again with save_pretrained") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{clip(str(index))} must hold a JSON object, got {type(data).__name__}")
    name = data.get("_class_name")
    if isinstance(name, list):
        raise WeightsError(f"{clip(str(index))} names a custom pipeline {clip(str(name))}: flowkit runs no code "
                           "from a model folder; save the model with a diffusers pipeline class")
    if not isinstance(name, str) or not name.endswith("Pipeline") or not hasattr(diffusers, name):
        known = [n for n in dir(diffusers) if n.endswith("Pipeline")]
        raise WeightsError(f"{clip(str(index))}: unknown pipeline class {clip(repr(name))}"
                           f"{closest(str(name), known)}; flowkit loads diffusers' own pipeline classes")
    for key, value in data.items():
        if key.startswith("_") or not isinstance(value, list):
            continue
        if len(value) != 2 or value == [None, None]:
            continue
        library, cls = value
        if library not in _COMPONENT_LIBRARIES:
            raise WeightsError(f"{clip(str(index))}: component {clip(key)!r} is {clip(str(value))}, custom code "
                               f"flowkit does not run; components come from {' or '.join(_COMPONENT_LIBRARIES)}")


def _load_folder(path: Path, **kwargs: Any):
    """A local diffusers pipeline folder of a family flowkit samples (SD 1.x/2.x, SDXL, SD3,
    FLUX); other pipelines are refused with the list of supported families."""
    from diffusers import DiffusionPipeline

    from flowkit.adapters.base import adapt

    if not (path / "model_index.json").is_file():
        raise WeightsError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
    from diffusers.utils import logging as diffusers_logging

    _check_model_index(path)
    bar = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()  # "Loading pipeline components": not on a command's stderr
    try:
        pipe = DiffusionPipeline.from_pretrained(str(path), local_files_only=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - diffusers and transformers raise many kinds for a broken folder
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise WeightsError(f"cannot load the diffusers folder {clip(str(path))}: {clip(first, 200)}") from None
    finally:
        if bar:
            diffusers_logging.enable_progress_bar()
    adapt(pipe)  # UnsupportedError naming the supported families
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return pipe
