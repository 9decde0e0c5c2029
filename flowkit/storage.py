"""Where flowkit keeps what it computes once and reuses: `$FLOWKIT_CACHE` (default
`~/.cache/flowkit`), one subfolder per kind (bench results, BOSS tables, caption embeddings)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_root"]


def cache_root(kind: str | None = None) -> Path:
    """`$FLOWKIT_CACHE` (default `~/.cache/flowkit`), or its subfolder `kind`."""
    root = Path(os.environ.get("FLOWKIT_CACHE", "~/.cache/flowkit")).expanduser()
    return root if kind is None else root / kind
