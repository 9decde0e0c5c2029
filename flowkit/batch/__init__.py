"""`flowkit batch`: images from a prompt file, resumable, sharded over processes with accelerate.

Modules, one concern each: `prompts` (the .txt/.jsonl/.csv parser), `plan` (jobs, seeds,
micro-batches, shards), `microbatch` (sampling with out-of-memory halving), `files`
(atomic writes), `manifest` (records, parts, merge, fingerprint), `dist` (ranks through
accelerate), `runner` (one rank's run), `command` (the CLI subcommand). Names are imported
lazily, so building the CLI parser does not import torch.
"""

from importlib import import_module
from typing import Any

_LAZY = {
    "BatchConfig": "runner", "Summary": "runner", "run_batch": "runner",
    "Defaults": "plan", "Job": "plan", "plan": "plan", "resolve": "plan", "shard": "plan",
    "LineError": "prompts", "PromptFile": "prompts", "PromptItem": "prompts", "parse_prompt_lines": "prompts",
    "read_prompt_file": "prompts",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(f"flowkit.batch.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'flowkit.batch' has no attribute {name!r}")
