"""Built-in bench experiments, one module per method or paper.

The registry (`flowkit.bench.core`) imports every module named in `MODULES` on its first
lookup, so importing `flowkit.bench` stays cheap. Add a new experiment by writing a module
here that registers itself with `@experiment(...)` and listing it below.
"""

from __future__ import annotations

__all__ = ["MODULES"]

MODULES: tuple[str, ...] = ("selftest", "batch", "shapes", "overhead", "apg", "adaptive", "gfcg", "simplex", "dna",
                            "boss", "bottleneck")
