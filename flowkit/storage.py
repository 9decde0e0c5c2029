"""Where flowkit keeps files, and how it writes them.

- `cache_root`: what flowkit computes once and reuses, under `$FLOWKIT_CACHE` (default
  `~/.cache/flowkit`), one subfolder per kind (bench results, BOSS tables, embeddings);
- `weights_dir`: the weights shipped inside the package;
- `write_atomic` / `write_json_atomic`: a temporary file beside the target, flushed to disk,
  then renamed over it, so a reader (or a resume after kill -9) sees the old file or the
  new one, never half of one;
- `slug`: a file-name part made from free text.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from flowkit.errors import InputError

__all__ = ["cache_root", "weights_dir", "write_atomic", "write_json_atomic", "json_text", "slug", "TEMP_PREFIX"]

TEMP_PREFIX = ".flowkit-tmp-"  # every temporary file flowkit writes starts with this


def cache_root(kind: str | None = None) -> Path:
    """`$FLOWKIT_CACHE` (default `~/.cache/flowkit`), or its subfolder `kind`."""
    root = Path(os.environ.get("FLOWKIT_CACHE", "~/.cache/flowkit")).expanduser()
    return root if kind is None else root / kind


def weights_dir() -> Path:
    """The folder of the weights shipped in the package (flowkit/weights)."""
    return Path(__file__).resolve().parent / "weights"


def slug(text: str, limit: int = 40, empty: str = "image") -> str:
    """A file-name part from free text: lower-case ASCII letters and digits joined by '-'
    (at most `limit` characters; `empty` where nothing is left)."""
    out = re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")
    return out[:limit].rstrip("-") or empty


def _temporary(path: Path) -> Path:
    return path.with_name(f"{TEMP_PREFIX}{path.name}.{os.getpid()}.tmp")


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path`: temporary file, fsync, rename. OSError -> InputError naming the path."""
    path = Path(path)
    tmp = _temporary(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _discard(tmp)
        raise InputError(f"cannot write {str(path)!r}: {e.strerror or e}") from None
    except BaseException:
        _discard(tmp)
        raise


def _discard(tmp: Path) -> None:
    try:
        tmp.unlink(missing_ok=True)
    except OSError:  # a read-only folder: nothing was written there either
        pass


_FLAT = re.compile(r"\[[^\[\]{}]*\]|\{[^\[\]{}]*\}")  # a list or dict holding no list or dict


def json_text(obj: Any, indent: int | None = None) -> str:
    """JSON text; when indented, flat lists and dicts (per-sample columns, records) stay on one line."""
    text = json.dumps(obj, indent=indent, allow_nan=True)
    if indent is None:
        return text
    # raw newlines never occur inside JSON strings, so only layout whitespace is removed
    return _FLAT.sub(lambda m: m.group(0)[0] + re.sub(r"\n\s*", " ", m.group(0)[1:-1]).strip() + m.group(0)[-1], text)


def write_json_atomic(path: str | os.PathLike[str], obj: Any, *, indent: int | None = None) -> None:
    """Write `obj` as JSON to `path` atomically, creating its folder (see `json_text` for `indent`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json_text(obj, indent))
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _discard(Path(tmp))
        raise
