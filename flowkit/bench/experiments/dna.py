"""dna: the dna world's sequence samplers against its known law (Stark et al., "Dirichlet Flow
Matching with Applications to DNA Sequence Design", Sec. 3.4 and 5.2).

Claims measured on the shipped dna model (Dirichlet FM, 20 Euler steps in alpha, length 128,
classes cycled promoter, enhancer, silencer by sample index, one seed per index):
- classifier-free guidance raises the motif rate of the asked class (Sec. 3.4; scales 2 and
  4 against the unguided model), keeping the likelihood under the background chain and the
  k-mer statistics of the world;
- classifier guidance with the shipped noisy classifier raises it as well;
- the distilled one-step sampler keeps the multi-step sampler's motif rate and likelihood
  at a fraction of the time (Sec. 5.2, "distillation").
Per sequence: the asked motif present (0/1) and the log-likelihood per letter (nats). Per
group of 32 sequences (paired by index): the Jensen-Shannon divergence of 3-mer frequencies
against fresh draws of the world with the same classes, and seconds per sequence.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flowkit.bench.core import BenchRun, column, experiment
from flowkit.bench.verdict import Claim

LENGTH, STEPS, GROUP = 128, 20, 32


def _run(pipe, sampler: str, steps: int, guidance: Any, seed: int, indices: list[int]) -> list[dict[str, Any]]:
    import flowkit
    from flowkit.seeding import generators_for
    from flowkit.worlds import dna

    classes = [i % len(dna.CLASSES) for i in indices]
    out = flowkit.sample(pipe, [dna.CLASSES[c] for c in classes], sampler=sampler, steps=steps, guidance=guidance,
                         generators=generators_for(seed, indices), length=LENGTH)
    hits = [bool(dna.has_motif([s], c)[0]) for s, c in zip(out.images, classes)]
    ll = dna.log_likelihood(out.images)
    per = out.stats.seconds / len(indices)
    return [{"index": i, "cls": c, "motif": float(h), "loglik": float(v), "seconds": per, "seq": s}
            for i, c, h, v, s in zip(indices, classes, hits, ll, out.images)]


def _kmer_groups(results: list[dict[str, Any]], seed: int) -> np.ndarray:
    """3-mer JS divergence of each group of GROUP sequences against fresh world draws."""
    from flowkit.worlds import dna

    out = []
    for g in range(len(results) // GROUP):
        part = results[g * GROUP:(g + 1) * GROUP]
        rng = np.random.default_rng([seed, 7, g])
        fresh = [dna.decode(dna.sample(1, r["cls"], LENGTH, rng)[0]) for r in part]
        out.append(dna.kmer_js([r["seq"] for r in part], fresh, k=3))
    return np.array(out)


@experiment("dna", "dna world: CFG and classifier guidance raise the motif rate; one-step distilled vs multi-step")
def dna_bench(bench: BenchRun) -> None:
    from flowkit.loading import load

    n = bench.n(full=384, quick=2 * GROUP)
    pipe = load("dna")
    arms: dict[str, list[dict[str, Any]]] = {}
    specs = {"unguided": "none", "cfg-2": "cfg:scale=2", "cfg-4": "cfg:scale=4"}
    if pipe.classifier is not None:
        specs["classifier-20"] = "dirichlet-classifier:scale=20"
    for name, spec in specs.items():
        arms[name] = bench.arm(name, {"guidance": spec, "steps": STEPS, "length": LENGTH, "version": 1},
                               lambda idx, s=spec: _run(pipe, "dirichlet", STEPS, s, bench.seed, idx), n=n, chunk=GROUP)
    base = arms["unguided"]
    for name in specs:
        if name == "unguided":
            continue
        arm = arms[name]
        bench.compare(name, "asked motif rate", claim=Claim("higher"), treatment=column(arm, "motif"),
                      baseline=column(base, "motif"), baseline_name="unguided", units="fraction")
        bench.compare(name, "log-likelihood per letter", claim=Claim("no_worse", margin=0.05, better="higher"),
                      treatment=column(arm, "loglik"), baseline=column(base, "loglik"), baseline_name="unguided",
                      units="nats")
        bench.compare(name, "3-mer JS to the world", claim=Claim("no_worse", margin=0.02, better="lower"),
                      treatment=_kmer_groups(arm, bench.seed), baseline=_kmer_groups(base, bench.seed),
                      baseline_name="unguided", units="nats", notes=f"groups of {GROUP} sequences")
    cls = column(base, "cls")
    for c in range(3):
        rows = cls == c
        bench.info[f"motif_rate_class{c}"] = {k: float(column(a, "motif")[rows].mean()) for k, a in arms.items()}
    try:
        student = load("dna-distilled")
    except Exception as e:  # the distilled model is optional until it ships
        bench.info["distilled"] = f"not available: {e}"
        return
    one = bench.arm("onestep", {"sampler": "dirichlet-onestep", "length": LENGTH, "version": 1},
                    lambda idx: _run(student, "dirichlet-onestep", 1, "none", bench.seed, idx), n=n, chunk=GROUP)
    bench.compare("one-step distilled", "asked motif rate", claim=Claim("no_worse", margin=0.1, better="higher"),
                  treatment=column(one, "motif"), baseline=column(base, "motif"),
                  baseline_name=f"Dirichlet FM, {STEPS} steps", units="fraction")
    bench.compare("one-step distilled", "log-likelihood per letter",
                  claim=Claim("no_worse", margin=0.05, better="higher"), treatment=column(one, "loglik"),
                  baseline=column(base, "loglik"), baseline_name=f"Dirichlet FM, {STEPS} steps", units="nats")
    speed = column(base, "seconds") / column(one, "seconds")
    bench.measure("one-step distilled", "speed-up over multi-step", speed, Claim("at_least", target=5.0), units="x",
                  notes=f"seconds per sequence, {STEPS} steps vs 1")
