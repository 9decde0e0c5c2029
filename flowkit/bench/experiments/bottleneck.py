"""bottleneck: bottleneck sampling vs full resolution with the same steps, in one run.

The claim of Tian et al. ("Training-free Diffusion Acceleration with Bottleneck Sampling"):
a high-low-high workflow is up to 3x faster on FLUX at about the same quality. Here on the
shapes model, 32 -> 16 -> 32 px (the `default` stage preset) against Euler at full
resolution with the same total steps, same prompts and seeds, CFG at the model's scale:
wall-clock time of the sampling loop lower by at least 20% (the ratio of means, timed in
alternating repeats of one batch in this run; the bound a 4x cheaper middle half allows
is 1.6x), FSD (to renders of the same captions) and caption accuracy no worse (2 points);
NFE equal. The FLUX-scale speed-up needs a GPU (a random-weight FLUX-shaped transformer at
1024 px) and is not measured here.
"""

from __future__ import annotations

import time

import numpy as np

from flowkit.bench.core import BenchRun, column, experiment
from flowkit.bench.experiments._shapes_guidance import ShapesBench, prompt_items
from flowkit.bench.timing import alternating_seconds
from flowkit.bench.verdict import Claim

SAMPLER = "bottleneck"
FASTER = Claim("lower", margin=0.2, stat="ratio_of_means")
NO_WORSE = Claim("no_worse", margin=2.0, better="higher")
VERSION = 1


def loop_seconds(pipe, prompts: list[str], sampler: str, steps: int, seed: int) -> float:
    """Seconds of the sampling loop (stats.seconds: no text encoding, no decoding) for one batch."""
    import flowkit

    out = flowkit.sample(pipe, prompts, sampler=sampler, steps=steps, seed=seed, output_type="latent")
    return float(out.stats.seconds)


@experiment("bottleneck", "bottleneck sampling 32->16->32 px vs full resolution, same steps: loop time, FSD, "
                          "caption accuracy")
def bottleneck(bench: BenchRun) -> None:
    steps = bench.n(full=16, quick=4)
    shapes = ShapesBench(bench, prompt_items("single", "two"), steps=steps, quick_steps=steps)
    n = bench.sample_count(full=256, quick=4)

    def arm(name: str, sampler: str):
        from flowkit.bench.shapes_world import shapes_arm

        fn = shapes_arm(shapes.pipe, shapes.items, seed=bench.seed, sampler=sampler, steps=steps, size=shapes.size)
        results = bench.arm(name, {**shapes.base, "sampler": sampler, "bottleneck_version": VERSION}, fn, n=n)
        bench.samples[name] = [{k: v for k, v in r.items() if "features" not in k} for r in results]
        return results

    full = arm("full", "euler")
    low = arm("bottleneck", SAMPLER)
    method, base = f"bottleneck {steps} steps", f"full resolution {steps} steps"
    # speed: alternating repeats of one batch (warm-up first), timed now (never cached)
    batch = [t for t, _ in shapes.items[: bench.n(full=16, quick=2)]]
    repeats = bench.n(full=12, quick=2)
    low_secs, full_secs = alternating_seconds(
        lambda r: loop_seconds(shapes.pipe, batch, SAMPLER, steps, bench.seed + r),
        lambda r: loop_seconds(shapes.pipe, batch, "euler", steps, bench.seed + r), repeats)
    bench.compare(method, "loop seconds", claim=FASTER, treatment=low_secs, baseline=full_secs, baseline_name=base,
                  units="s",
                  notes=f"ratio of means over {repeats} alternating repeats of a batch of {len(batch)}")
    shapes.fsd_row(method, low, full, Claim("no_worse", margin=0.1, relative=True, better="lower"), base)
    shapes.rate_row(method, "caption accuracy", "whole_caption", low, full, NO_WORSE, base)
    shapes.rate_row(method, "presence", "presence", low, full, NO_WORSE, base)
    shapes.show(method, None, base, None, sampler=SAMPLER, steps=steps, baseline_extra={"steps": steps})
    bench.info.update({"n": n, "steps": steps, "stages": "default preset: 32 -> 16 -> 32 px",
                       "nfe_equal": bool(np.array_equal(column(low, "nfe"), column(full, "nfe"))),
                       "speed_batch": len(batch), "speed_repeats": repeats, "timed_at": time.strftime("%Y-%m-%d")})
