"""What every shapes-world bench shares: the model under test, one arm's per-sample scores,
and the Frechet shape distance (FSD) as a paired set statistic.

An arm is (model, sampler, guidance, steps, size, prompt set); sample i uses prompt
i mod len(prompts) and the image seed `seed_for(bench.seed, i)` (the seed every surface
uses), so the arms of one experiment are paired sample by sample. Each record keeps the
exact evaluator's metrics, the saturation of the pre-clamp output, the NFE, and the
classifier features of the image and of a fresh render of the same caption (the
reference of FSD), so the FSD of any subset can be recomputed from the cache; an arm asked
for rewards (`flowkit.rewards`) keeps each one's score as `reward_NAME`.

The model: the shipped `shapes` model; `FLOWKIT_SHAPES_MODEL=/path` points the benches at
another shapes model folder (a checkpoint exported with `flowkit train shapes
--export-only`); a quick run falls back to the random `tiny` model while the weights are
not installed (its numbers only prove that the code runs).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import numpy as np

from flowkit.bench.core import BenchRun
from flowkit.errors import WeightsError

__all__ = ["bench_model", "model_spec", "shapes_arm", "fsd_statistic", "metric_columns", "METRICS"]

METRICS = ("presence", "exact_count", "binding", "whole_caption")
_REFERENCE_TAG = 0x2EF  # third key word of the reference renders' generators


def model_spec(tiny: bool = False) -> str:
    """What `flowkit.load` takes for the shapes model under test: FLOWKIT_SHAPES_MODEL, else
    the shipped `shapes`; `tiny` when a quick run stands in the random model."""
    return "tiny" if tiny else os.environ.get("FLOWKIT_SHAPES_MODEL") or "shapes"


def bench_model(bench: BenchRun) -> tuple[Any, str]:
    """(pipeline, fingerprint) of the shapes model under test; the fingerprint goes into
    every arm's cache key, so results of different weights never mix."""
    import flowkit
    from flowkit.checksums import MANIFEST_FILE, sha256_file

    folder = os.environ.get("FLOWKIT_SHAPES_MODEL")
    if folder:
        pipe = flowkit.load(folder)
        bench.info["model"] = f"shapes model from {folder}"
        return pipe, "shapes:" + sha256_file(os.path.join(folder, MANIFEST_FILE))[:16]
    try:
        pipe = flowkit.load("shapes")
    except WeightsError:
        if not bench.quick:
            raise
        bench.info["model"] = "tiny (random weights: the shipped shapes model is not installed)"
        return flowkit.load("tiny"), "tiny:0"
    from flowkit.storage import weights_dir

    bench.info["model"] = "shapes (shipped)"
    return pipe, "shapes:" + sha256_file(weights_dir() / "shapes" / MANIFEST_FILE)[:16]


def shapes_arm(
    pipe: Any,
    prompts: Sequence[tuple[str, Any]],
    *,
    seed: int,
    sampler: Any = "euler",
    guidance: Any = None,
    steps: int = 30,
    size: int = 32,
    grid: Any = None,
    rewards: Sequence[str] = (),
) -> Callable[[list[int]], list[dict[str, Any]]]:
    """The chunk function of one arm: indices -> one record per sample (see the module doc);
    `rewards`: registered reward names scored on each image against its caption."""
    import flowkit
    from flowkit.metrics import features
    from flowkit.worlds import shapes as world
    from flowkit.worlds.shapes_eval import evaluate, saturation_stats

    def run(indices: list[int]) -> list[dict[str, Any]]:
        chosen = [prompts[i % len(prompts)] for i in indices]
        if indices != list(range(indices[0], indices[0] + len(indices))):
            raise ValueError("shapes_arm takes contiguous index chunks")
        out = flowkit.sample(pipe, [text for text, _ in chosen], sampler=sampler, guidance=guidance, steps=steps,
                             seed=seed, start_index=indices[0], height=size, width=size, grid=grid,
                             output_type="latent")
        x = out.latents.float()
        refs = [world.render_caption(cap, size, np.random.default_rng([seed, i, _REFERENCE_TAG]))[1]
                for i, (_, cap) in zip(indices, chosen)]
        feats, ref_feats = features(x), features(np.stack(refs))
        scores_by_reward = _reward_scores(pipe, x, [text for text, _ in chosen], rewards)
        records = []
        for j, (i, (text, cap)) in enumerate(zip(indices, chosen)):
            scores = evaluate(x[j], cap)
            sat = saturation_stats(x[j])
            records.append({
                "index": i, "prompt": text, "seed": out.seeds[j], "nfe": out.stats.nfe[j],
                "seconds": out.stats.seconds / len(indices),  # the chunk's loop time, shared out
                **{k: (None if scores[k] is None else bool(scores[k])) for k in METRICS},
                "group_counts": scores["group_counts"], "n_objects": scores["n_objects"],
                "frac_out": sat["frac_out"], "mean_excess": sat["mean_excess"],
                "rel_saturation": sat["rel_saturation"],
                "features": feats[j].round(5).tolist(), "ref_features": ref_feats[j].round(5).tolist(),
                **{f"reward_{name}": float(v[j]) for name, v in scores_by_reward.items()},
            })
        return records

    return run


def _reward_scores(pipe: Any, x: Any, prompts: list[str], names: Sequence[str]) -> dict[str, Any]:
    """Each named reward's scores [B] of the final states x (decoded with the family's to_pixels)."""
    if not names:
        return {}
    import torch

    from flowkit.adapters.base import adapt
    from flowkit.rewards import build_reward

    with torch.no_grad():
        images = adapt(pipe).to_pixels(x)
        return {name: build_reward(name)(images, prompts).float().cpu().numpy() for name in names}


def metric_columns(records: Sequence[dict[str, Any]], metric: str) -> np.ndarray:
    """A caption metric as 0/100 per sample (percent); NaN where it does not apply."""
    return np.asarray([np.nan if r[metric] is None else 100.0 * r[metric] for r in records], dtype=np.float64)


def fsd_statistic(treatment: Sequence[dict[str, Any]],
                  baseline: Sequence[dict[str, Any]] | None = None) -> Callable[[np.ndarray], tuple[float, float]]:
    """statistic(indices) -> (FSD of treatment, FSD of baseline) on those samples, each
    against the reference renders of the same samples (the treatment's, which the baseline
    shares when the arms are paired). With no baseline, the second value is the FSD between
    two halves of the references (the floor that finite samples give)."""
    from flowkit.metrics import frechet_distance

    t = np.asarray([r["features"] for r in treatment])
    ref = np.asarray([r["ref_features"] for r in treatment])
    b = None if baseline is None else np.asarray([r["features"] for r in baseline])

    def statistic(idx: np.ndarray) -> tuple[float, float]:
        ft = frechet_distance(t[idx], ref[idx])
        if b is not None:
            return ft, frechet_distance(b[idx], ref[idx])
        half = len(idx) // 2
        return ft, frechet_distance(ref[idx[:half]], ref[idx[half:]])

    return statistic
