"""Where flowkit keeps files, and how it writes them.

- `cache_root`: what flowkit computes once and reuses, under `$FLOWKIT_CACHE` (default
  `~/.cache/flowkit`), one subfolder per kind (bench results, BOSS tables, embeddings);
- `weights_dir`: the weights shipped inside the package;
- `write_atomic` / `write_json_atomic`: a temporary file beside the target, flushed to disk,
  then renamed over it, so a reader (or a resume after kill -9) sees the old file or the
  new one, never half of one;
- `write_new`: the same, but never over an existing file (FileExistsError instead);
- `image_bytes` / `image_format`: an image encoded in the format its file name asks for,
  with its generation settings as metadata (PNG text chunks, a JPEG comment);
- `slug`: a file-name part made from free text.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping

from flowkit.errors import InputError

__all__ = ["cache_root", "weights_dir", "write_atomic", "write_new", "write_synced", "write_json_atomic", "json_text", "slug",
           "TEMP_PREFIX", "image_format", "image_bytes"]

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


def write_synced(path: Path, data: bytes) -> None:
    """Write `data` to `path` and flush it to disk (no rename: the caller's temporary file)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path`: temporary file, fsync, rename. OSError -> InputError naming the path."""
    path = Path(path)
    tmp = _temporary(path)
    try:
        write_synced(tmp, data)
        os.replace(tmp, path)
    except OSError as e:
        _discard(tmp)
        raise InputError(f"cannot write {str(path)!r}: {e.strerror or e}") from None
    except BaseException:
        _discard(tmp)
        raise


def write_new(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` atomically (temporary file, fsync, then a hard link), never over
    an existing file: FileExistsError if `path` is taken, even by a writer racing this one.
    Other OSError -> InputError naming the path."""
    path = Path(path)
    tmp = _temporary(path)
    try:
        write_synced(tmp, data)
        try:
            os.link(tmp, path)  # fails if path exists: no overwrite, even in a race
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links: check, then rename (a race may still lose)
            if os.path.lexists(path):
                raise FileExistsError(f"{path} exists") from None
            os.replace(tmp, path)
    except FileExistsError:
        _discard(tmp)
        raise
    except OSError as e:
        _discard(tmp)
        raise InputError(f"cannot write {str(path)!r}: {e.strerror or e}") from None
    except BaseException:
        _discard(tmp)
        raise
    _discard(tmp)


def image_format(path: str | os.PathLike[str]) -> str | None:
    """The PIL format a file name's extension asks for ("PNG" for x.png, "JPEG" for x.jpg),
    if PIL can write it; None otherwise."""
    from PIL import Image

    Image.init()
    fmt = Image.registered_extensions().get(Path(path).suffix.lower())
    return fmt if fmt in Image.SAVE else None


def image_bytes(image: Any, fmt: str = "PNG", metadata: Mapping[str, Any] | None = None) -> bytes:
    """A PIL image encoded as `fmt`; `metadata` (name -> value; None values are left out) goes into PNG text chunks
    (UTF-8, read back with `Image.open(path).text`) or, for JPEG, a JSON comment."""
    import io
    import json

    kwargs: dict[str, Any] = {}
    text = {str(k): str(v) for k, v in (metadata or {}).items() if v is not None}
    if fmt == "PNG" and text:
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        for key, value in text.items():
            info.add_itxt(key, value)
        kwargs["pnginfo"] = info
    elif fmt == "JPEG":
        if image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        kwargs["quality"] = 95
        if text:
            kwargs["comment"] = json.dumps(text, ensure_ascii=False).encode("utf-8")
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


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
    """Write `obj` as JSON to `path` atomically, creating its folder (see `json_text` for `indent`);
    OSError -> InputError naming the path."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:  # a read-only location, a file in the way
        raise InputError(f"cannot write {str(path)!r}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json_text(obj, indent))
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _discard(Path(tmp))
        raise InputError(f"cannot write {str(path)!r}: {e.strerror or e}") from None
    except BaseException:
        _discard(Path(tmp))
        raise
