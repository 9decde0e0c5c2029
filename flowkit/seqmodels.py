"""Small sequence denoisers for the discrete paths, and their adapter into the core.

- `SequenceNet`: a 1-D convolutional denoiser [B, L, V] state -> [B, L, K] logits: an input
  projection, dilated residual convolution blocks with FiLM from the time (the path's
  native timestep, Fourier features) and class embeddings (index `num_classes` is the null
  class of classifier-free guidance), optional learned position embeddings (the toy task,
  whose positions have different laws). Variable length; no attention.
- `SequenceClassifier`: the same trunk, max-pooled over positions (a motif anywhere counts), with class logits: a noisy classifier
  of x_t for classifier guidance.
- `SequencePipeline`: what `flowkit.load("dna")` returns: the net, its path, the world's
  alphabet, classes and lengths, defaults, and optionally a noisy classifier.
- `SequenceAdapter`: the `ModelAdapter` of a `SequencePipeline`: prompts are class names or
  0-based indices ('' is the unconditional model, the null class; so is the default
  negative prompt of the unconditional branch; a class as negative prompt guides away from it), the latent is [length, V] (height 1, width = length), and the decoded
  "images" are token sequences (DNA strings for the dna world, letter-index lists for the toy).

Weights: `export_model` writes fp32 safetensors, `config.json` and a sha256 manifest;
`load_model` verifies the manifest before reading and loads strictly.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowkit.adapters.base import ModelAdapter
from flowkit.conditioning import Conditioning
from flowkit.denoiser import Denoiser
from flowkit.errors import InputError, WeightsError
from flowkit.paths.categorical import DiscretePath
from flowkit.registry import MODEL_FAMILIES
from flowkit.timegrid import TimeGrid

__all__ = [
    "SequenceNet",
    "SequenceClassifier",
    "SequencePipeline",
    "SequenceDenoiser",
    "SequenceAdapter",
    "make_path",
    "path_config",
    "export_model",
    "load_model",
    "tiny_pipeline",
    "load_pipeline",
    "load_builtin",
]

WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------- networks


class _TimeClassEmbedding(nn.Module):
    """Fourier features of the timestep plus a class embedding -> [B, width]."""

    def __init__(self, width: int, num_classes: int, frequencies: int = 8):
        super().__init__()
        self.register_buffer("freqs", 2.0 ** torch.arange(-2, frequencies - 2, dtype=torch.float32), persistent=False)
        self.time = nn.Sequential(nn.Linear(2 * frequencies + 2, width), nn.SiLU(), nn.Linear(width, width))
        self.cls = nn.Embedding(num_classes + 1, width)
        self.num_classes = num_classes

    def forward(self, timestep: Tensor, class_labels: Tensor | None) -> Tensor:
        ts = timestep.float().reshape(-1, 1)
        f = ts * self.freqs * math.pi
        emb = self.time(torch.cat([ts, torch.log1p(ts.clamp_min(0)), f.sin(), f.cos()], dim=1))
        if class_labels is None:
            class_labels = torch.full((ts.shape[0],), self.num_classes, dtype=torch.long, device=ts.device)
        return emb + self.cls(class_labels.long())


class _Block(nn.Module):
    def __init__(self, width: int, kernel: int, dilation: int):
        super().__init__()
        self.norm = nn.GroupNorm(1, width)
        self.conv1 = nn.Conv1d(width, width, kernel, dilation=dilation, padding="same")
        self.conv2 = nn.Conv1d(width, width, 1)
        self.film = nn.Linear(width, 2 * width)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:  # h [B, W, L], emb [B, W]
        scale, shift = self.film(emb).unsqueeze(-1).chunk(2, dim=1)
        y = self.norm(h) * (1 + scale) + shift
        return h + self.conv2(F.silu(self.conv1(F.silu(y))))


class _Trunk(nn.Module):
    def __init__(self, state_size: int, num_classes: int, width: int, depth: int, kernel: int, positions: int):
        super().__init__()
        self.inp = nn.Conv1d(state_size, width, 1)
        self.emb = _TimeClassEmbedding(width, num_classes)
        self.pos = nn.Embedding(positions, width) if positions else None
        self.blocks = nn.ModuleList(_Block(width, kernel, 2 ** (i % 4)) for i in range(depth))
        self.norm = nn.GroupNorm(1, width)

    def forward(self, x: Tensor, timestep: Tensor, class_labels: Tensor | None) -> Tensor:
        h = self.inp(x.float().transpose(1, 2))  # [B, W, L]
        if self.pos is not None:
            if x.shape[1] > self.pos.num_embeddings:
                raise InputError(f"this model takes sequences of at most {self.pos.num_embeddings} positions")
            h = h + self.pos.weight[: x.shape[1]].T.unsqueeze(0)
        emb = self.emb(timestep, class_labels)
        for block in self.blocks:
            h = block(h, emb)
        return F.silu(self.norm(h))  # [B, W, L]


class SequenceNet(nn.Module):
    """x [B, L, V], timestep [B], class_labels [B] (num_classes = null) -> logits [B, L, K]."""

    kind = "denoiser"

    def __init__(self, state_size: int, num_categories: int, num_classes: int = 0, width: int = 64,
                 depth: int = 4, kernel: int = 5, positions: int = 0):
        super().__init__()
        self.config = dict(state_size=state_size, num_categories=num_categories, num_classes=num_classes,
                           width=width, depth=depth, kernel=kernel, positions=positions)
        self.trunk = _Trunk(state_size, num_classes, width, depth, kernel, positions)
        self.out = nn.Conv1d(width, num_categories, 1)

    def forward(self, x: Tensor, timestep: Tensor, class_labels: Tensor | None = None) -> Tensor:
        return self.out(self.trunk(x, timestep, class_labels)).transpose(1, 2)


class SequenceClassifier(nn.Module):
    """A noisy classifier: x_t [B, L, V], timestep [B] -> class logits [B, num_classes]."""

    kind = "classifier"

    def __init__(self, state_size: int, num_classes: int, width: int = 48, depth: int = 3, kernel: int = 5):
        super().__init__()
        self.config = dict(state_size=state_size, num_classes=num_classes, width=width, depth=depth, kernel=kernel)
        self.trunk = _Trunk(state_size, 0, width, depth, kernel, 0)
        self.out = nn.Linear(width, num_classes)

    def forward(self, x: Tensor, timestep: Tensor) -> Tensor:
        return self.out(self.trunk(x, timestep, None).amax(dim=-1))  # max-pool: a motif anywhere


_NETS = {"denoiser": SequenceNet, "classifier": SequenceClassifier}


# ----------------------------------------------------------------------------- paths


def make_path(config: dict) -> DiscretePath:
    """A discrete path from its config ({"name": ..., options})."""
    from flowkit.paths.dirichlet import DirichletPath
    from flowkit.paths.mixture import MixturePath
    from flowkit.paths.simplex_linear import SimplexLinearPath

    cfg = dict(config)
    name = cfg.pop("name", None)
    kinds = {"dirichlet": DirichletPath, "mixture": MixturePath, "simplex-linear": SimplexLinearPath}
    if name not in kinds:
        raise InputError(f"unknown discrete path {name!r}; use one of {', '.join(kinds)}")
    return kinds[name](**cfg)


def path_config(path: DiscretePath) -> dict:
    """The config `make_path` rebuilds `path` from."""
    cfg: dict[str, Any] = {"name": path.name, "num_categories": path.num_categories}
    if path.name == "dirichlet":
        cfg["alpha_max"] = path.alpha_max
    if path.name == "mixture":
        cfg.update(source=path.source_kind, power=path.power)
    return cfg


# ----------------------------------------------------------------------------- pipeline


@dataclass
class SequencePipeline:
    """A sequence model of a world: net, path, alphabet, classes, lengths and defaults."""

    net: SequenceNet
    path: DiscretePath
    world: str  # "dna" or "simplex"
    classes: tuple[str, ...] = ()
    alphabet: str | None = None  # letters of the vocabulary, or None (letters are indices)
    lengths: tuple[int, int] = (4, 4)
    default_length: int = 4
    default_guidance_scale: float = 1.0
    default_sampler: str = "dirichlet"
    classifier: SequenceClassifier | None = None
    one_step: bool = False  # a distilled one-step student
    name: str = ""
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.net.eval().requires_grad_(False)
        if self.classifier is not None:
            self.classifier.eval().requires_grad_(False)

    def to(self, device: Any = None, dtype: Any = None) -> "SequencePipeline":
        self.net.to(device)
        if self.classifier is not None:
            self.classifier.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device


class SequenceDenoiser(Denoiser):
    """The net's softmax as a "probs" prediction; `classifier` and `one_step` travel with it."""

    def __init__(self, pipe: SequencePipeline):
        super().__init__(pipe.path, "probs")
        self.net = pipe.net
        self.classifier = pipe.classifier
        self.one_step = pipe.one_step

    def forward(self, x_native: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
        logits = self.net(x_native, timestep.to(x_native.device), cond.get("class_labels"))
        return torch.softmax(logits.float(), dim=-1)

    def classifier_logits(self, x: Tensor, t: Tensor) -> Tensor:
        """The noisy classifier's logits at state x [B, L, V] and flowkit times t [B]."""
        if self.classifier is None:
            raise InputError("this model ships no noisy classifier")
        timestep = self.path.at(t.cpu()).timestep.to(x.device)
        return self.classifier(x, timestep)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device


@MODEL_FAMILIES.register
class SequenceAdapter(ModelAdapter):
    family = "sequence"
    title = "sequence models (flowkit's dna and simplex worlds)"

    @classmethod
    def matches(cls, pipe: Any) -> bool:
        return isinstance(pipe, SequencePipeline)

    def __init__(self, pipe: SequencePipeline):
        super().__init__(pipe)
        self._denoiser = SequenceDenoiser(pipe)
        self.default_guidance_scale = pipe.default_guidance_scale
        self.default_sampler = pipe.default_sampler

    @property
    def scheduler(self) -> Any:
        return None

    @property
    def denoiser(self) -> SequenceDenoiser:
        return self._denoiser

    def _classes(self, prompts: Sequence[str], what: str) -> Tensor:
        from flowkit.worlds.dna import parse_class

        pipe: SequencePipeline = self.pipe
        null = pipe.net.config["num_classes"]  # the empty prompt: the unconditional model
        if not pipe.classes and any(str(p).strip() for p in prompts):
            raise InputError(f"the {pipe.name or pipe.world} model is unconditional: give empty {what}s ('')")
        ids = [null if not str(p).strip() else parse_class(p, pipe.classes) for p in prompts]
        return torch.tensor(ids, dtype=torch.long)

    def encode(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None, need_uncond: bool):
        device = self.device
        out = {"cond": Conditioning({"class_labels": self._classes(prompts, "prompt").to(device)})}
        if need_uncond:
            negs = [""] * len(prompts) if negative_prompts is None else list(negative_prompts)
            out["uncond"] = Conditioning({"class_labels": self._classes(negs, "negative prompt").to(device)})
        return out

    def default_size(self) -> tuple[int, int]:
        return 1, self.pipe.default_length

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        from flowkit.worlds.dna import check_length

        if height != 1:
            raise InputError(f"sequence models take height 1 and width = the sequence length (or length=), "
                             f"got height {height!r}")
        what = f"the {self.pipe.name or self.pipe.world} model"
        length = check_length(width, self.pipe.lengths, what)
        return (length, self.pipe.path.state_size)

    def default_grid(self) -> TimeGrid:
        return TimeGrid.uniform()

    def decode(self, x: Tensor, output_type: str) -> Any:
        if output_type == "latent":
            return x
        tokens = x.argmax(dim=-1).cpu()
        if output_type == "pt":
            return tokens
        if output_type == "np":
            return tokens.numpy()
        if output_type == "pil":
            if self.pipe.alphabet is None:
                return [row.tolist() for row in tokens]
            return ["".join(self.pipe.alphabet[i] for i in row.tolist()) for row in tokens]
        raise InputError(f"output_type must be pil (token sequences), np, pt or latent, got {output_type!r}")




# ----------------------------------------------------------------------------- weights


def export_model(net: nn.Module, folder: str | Path, meta: dict) -> list[Path]:
    """Write `net` (fp32 safetensors), its config and `meta` (path, world, ...) and a sha256
    manifest to `folder`."""
    from safetensors.torch import save_file

    from flowkit.checksums import write_manifest

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights, config = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    save_file({k: v.detach().float().contiguous() for k, v in net.state_dict().items()}, str(weights),
              metadata={"format": "pt", "kind": net.kind})
    config.write_text(json.dumps({"kind": net.kind, "format": FORMAT_VERSION, "args": net.config, **meta},
                                 indent=2) + "\n")
    return [weights, config, write_manifest(folder, (weights, config))]


def load_model(folder: str | Path, kind: str, hint: str = "reinstall flowkit") -> tuple[nn.Module, dict]:
    """(net, config) from an `export_model` folder: manifest verified first, strict state dict."""
    from safetensors.torch import load_file

    from flowkit.checksums import verify_manifest

    folder = Path(folder)
    verify_manifest(folder, (WEIGHTS_FILE, CONFIG_FILE), hint=hint)
    config_path, weights = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    try:
        config = json.loads(config_path.read_text())
        net = _NETS[kind](**config["args"])
    except (ValueError, KeyError, TypeError) as e:
        raise WeightsError(f"weights config {config_path} is unreadable ({e!r}): {hint}") from None
    if config.get("kind") != kind:
        raise WeightsError(f"weights config {config_path} is for a {config.get('kind')!r}, expected {kind!r}")
    try:
        state = load_file(str(weights))
        net.load_state_dict(state, strict=True)
    except Exception as e:  # safetensors' own errors, or a state dict that does not fit
        raise WeightsError(f"weights file {weights} does not load into its config: {str(e).splitlines()[0]}") from None
    return net.eval().requires_grad_(False), config


def tiny_pipeline(world: str = "dna", path: dict | None = None, *, seed: int = 0, one_step: bool = False,
                  classifier: bool = False) -> SequencePipeline:
    """A seeded random-weight model of a world's shape (tests, the sweep)."""
    from flowkit.worlds import dna

    path_cfg = path or {"name": "dirichlet", "num_categories": 4 if world == "dna" else 8}
    p = make_path(path_cfg)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if world == "dna":
            net = SequenceNet(p.state_size, p.num_categories, len(dna.CLASSES), width=16, depth=2)
            clf = SequenceClassifier(p.state_size, len(dna.CLASSES), width=16, depth=1) if classifier else None
        else:
            net = SequenceNet(p.state_size, p.num_categories, 0, width=16, depth=2, positions=4)
            clf = None
    if world == "dna":
        return SequencePipeline(net, p, "dna", dna.CLASSES, dna.ALPHABET, (dna.MIN_LENGTH, dna.MAX_LENGTH), 64,
                                1.0, _default_sampler(p, one_step), clf, one_step, name=f"{world}-tiny")
    return SequencePipeline(net, p, "simplex", (), None, (4, 4), 4, 1.0, _default_sampler(p, one_step), None,
                            one_step, name=f"{world}-tiny")


def _default_sampler(path: DiscretePath, one_step: bool = False) -> str:
    if one_step:
        return "dirichlet-onestep"
    return {"dirichlet": "dirichlet", "mixture": "discrete", "simplex-linear": "simplex-linear"}[path.name]


def load_pipeline(folder: str | Path, *, classifier: str | Path | None = None, name: str = "",
                  hint: str = "reinstall flowkit") -> SequencePipeline:
    """A `SequencePipeline` from an `export_model` folder (and a classifier folder), strictly."""
    net, cfg = load_model(folder, "denoiser", hint)
    clf = load_model(classifier, "classifier", hint)[0] if classifier is not None else None
    try:
        path = make_path(cfg["path"])
        one_step = bool(cfg.get("one_step", False))
        return SequencePipeline(
            net, path, cfg["world"], tuple(cfg.get("classes", ())), cfg.get("alphabet"), tuple(cfg["lengths"]),
            int(cfg["default_length"]), float(cfg.get("default_guidance_scale", 1.0)),
            _default_sampler(path, one_step), clf, one_step, name=name or cfg["world"], info=cfg)
    except (KeyError, TypeError, ValueError) as e:
        raise WeightsError(f"weights config {Path(folder) / CONFIG_FILE} lacks what a sequence model needs "
                           f"({e!r}): {hint}") from None


def load_builtin(name: str) -> SequencePipeline:
    """The shipped sequence models: `dna` (with its noisy classifier), `dna-distilled`, `simplex`."""
    from flowkit.storage import weights_dir

    root = weights_dir()
    if name == "dna":
        clf = root / "dna" / "classifier"
        return load_pipeline(root / "dna" / "denoiser", classifier=clf if clf.is_dir() else None, name="dna")
    if name == "dna-distilled":
        return load_pipeline(root / "dna" / "distilled", name="dna-distilled")
    return load_pipeline(root / "simplex" / "denoiser", name=name)

