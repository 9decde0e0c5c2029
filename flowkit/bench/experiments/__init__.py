"""Built-in bench experiments, one module per method or paper.

Each module registers its experiments with `@experiment(...)` (flowkit.bench.core); the
registry (`flowkit.registry.EXPERIMENTS`) imports every module of this folder on its first
lookup, so importing `flowkit.bench` stays cheap and a new experiment is one file. Modules
whose name starts with '_' hold shared helpers and register nothing.
"""
