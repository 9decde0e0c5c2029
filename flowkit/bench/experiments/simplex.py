"""simplex: linear FM vs Dirichlet FM vs discrete FM on the toy simplex task, as K grows
(Stark et al., "Dirichlet Flow Matching with Applications to DNA Sequence Design", Sec. 5.1,
Fig. 3: linear flow matching on the simplex degrades as the number of letters K grows,
Dirichlet FM does not; discrete FM (Gat et al.) is the third arm).

For each K, the three paths train the same small net with the same budget (steps, batch,
seed; `flowkit.train.simplex.SimplexTask`, cached under the bench cache so a rerun resumes),
then each samples `groups` groups of `m` sequences with its own sampler (20 steps). A
group's KL(empirical || target), averaged over the 4 positions, is one bench sample; groups
are paired by index (the same seeds). Every estimate carries the same finite-sample bias,
about (K - 1) / (2 m), which `info` reports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from flowkit.bench.core import BenchRun, column, experiment
from flowkit.bench.verdict import Claim

PATHS = {"simplex-linear": "linear FM", "dirichlet": "Dirichlet FM", "mixture": "discrete FM"}


def trained(bench: BenchRun, path: str, K: int, steps: int, batch: int):
    """The path's toy model for K letters, trained once (resumable) under the bench cache."""
    from flowkit.seqmodels import load_pipeline
    from flowkit.train.loop import TrainConfig, train
    from flowkit.train.simplex import SimplexTask

    out = Path(bench.cache.root) / "simplex" / "models" / f"{path}-K{K}-s{steps}-b{batch}"
    if not (out / "export" / "manifest.json").is_file() or not (out / "exported").is_file():
        task = SimplexTask(num_categories=K, path=path)
        train(task, TrainConfig(steps=steps, batch_size=batch, lr=2e-3, warmup=min(100, steps // 5),
                                ema_decay=0.99, ckpt_every=max(steps // 4, 1)), out, progress=False)
    return load_pipeline(out / "export", hint="delete the bench cache folder and run again")


def _groups(pipe, seed: int, m: int, steps: int, indices: list[int]) -> list[dict[str, Any]]:
    import flowkit
    from flowkit.worlds.simplex import ToyTask

    task = ToyTask(pipe.path.num_categories, seed=pipe.info.get("task_seed", 0))
    out = []
    for g in indices:
        res = flowkit.sample(pipe, [""] * m, steps=steps, guidance="none", seed=seed, start_index=g * m,
                             output_type="pt")
        out.append({"index": g, "kl": task.kl(res.images), "seconds": res.stats.seconds})
    return out


@experiment("simplex", "toy simplex task: KL against K for linear FM, Dirichlet FM and discrete FM, same budget")
def simplex(bench: BenchRun) -> None:
    Ks = (4, 20) if bench.quick else (4, 10, 20, 40)
    steps, batch = bench.n(full=1500, quick=100), bench.n(full=128, quick=64)
    groups, m, sample_steps = bench.n(full=8, quick=4), bench.n(full=2048, quick=256), 20
    kl: dict[tuple[str, int], np.ndarray] = {}
    for K in Ks:
        for path in PATHS:
            pipe = trained(bench, path, K, steps, batch)
            config = {"path": path, "K": K, "train_steps": steps, "batch": batch, "m": m, "steps": sample_steps,
                      "version": 1}
            res = bench.arm(f"{path}-K{K}", config, lambda idx, p=pipe: _groups(p, bench.seed, m, sample_steps, idx),
                            n=groups, chunk=2)
            kl[path, K] = column(res, "kl")
    for K in Ks:
        claim = Claim("lower") if K == max(Ks) else Claim("no_worse", margin=0.02, better="lower")
        for path in ("dirichlet", "mixture"):
            bench.compare(f"{PATHS[path]}, K={K}", "KL(samples || target)", claim=claim,
                          treatment=kl[path, K], baseline=kl["simplex-linear", K], baseline_name=f"linear FM, K={K}",
                          notes=f"{groups} groups of {m} samples; bias about {(K - 1) / (2 * m):.4f}")
    bench.info.update({"K": list(Ks), "train_steps": steps, "batch": batch, "groups": groups, "m": m,
                       "sample_steps": sample_steps,
                       "mean_kl": {f"{p}/K={K}": float(kl[p, K].mean()) for p in PATHS for K in Ks},
                       "mean_kl_minus_bias": {f"{p}/K={K}": round(float(kl[p, K].mean()) - (K - 1) / (2 * m), 5)
                                              for p in PATHS for K in Ks}})
