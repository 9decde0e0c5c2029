"""Files of a batch folder: atomic writes, the writability probe, stale temporary files.

Every file is written atomically (`flowkit.storage.write_atomic`: a temporary name beside
its target, ``.flowkit-tmp-NAME.PID.tmp``, flushed to disk, then renamed over the target),
so a reader (or a resume after kill -9) sees the old file or the new one, never half of
one. A killed writer leaves only its temporary file, which `remove_stale_temporaries`
deletes at the next start; it touches no other file (a user's own `.notes.1.tmp` stays).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from pathlib import Path
from typing import Any

from flowkit.errors import InputError
from flowkit.storage import TEMP_PREFIX, write_atomic

__all__ = ["lock_folder", "write_atomic", "png_bytes", "write_png", "sha256_bytes", "check_writable", "remove_stale_temporaries",
           "TEMP_PATTERN"]

TEMP_PATTERN = re.compile(r"^" + re.escape(TEMP_PREFIX) + r".+\.\d+\.tmp$")


def _temporary(path: Path) -> Path:
    return path.with_name(f"{TEMP_PREFIX}{path.name}.{os.getpid()}.tmp")


def png_bytes(image: Any) -> bytes:
    """A PIL image encoded as PNG."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_png(image: Any, path: Path) -> tuple[str, int]:
    """Write `image` as a PNG atomically; (sha256, size in bytes) of what was written."""
    data = png_bytes(image)
    write_atomic(path, data)
    return sha256_bytes(data), len(data)


def check_writable(folder: Path, flag: str = "--out") -> None:
    """Create `folder` if needed and prove a file can be written in it; else InputError."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{flag}: cannot create folder {str(folder)!r}: {e.strerror or e}") from None
    if not folder.is_dir():
        raise InputError(f"{flag}: {str(folder)!r} is not a folder")
    probe = _temporary(folder / "write-probe")
    try:
        with open(probe, "wb") as f:
            f.write(b"ok")
        probe.unlink()
    except OSError as e:
        probe.unlink(missing_ok=True)
        raise InputError(f"{flag}: cannot write in {str(folder)!r}: {e.strerror or e}") from None


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files a killed writer left in `folder`; returns them."""
    stale = [p for p in folder.iterdir() if TEMP_PATTERN.match(p.name) and p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def lock_folder(folder: Path) -> Any:
    """Hold an exclusive lock on `folder` (DIR/.flowkit-batch.lock) until the returned file is
    closed or the process ends (kill -9 included); InputError if another run holds it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no advisory locks on this platform
        return None
    f = open(folder / ".flowkit-batch.lock", "a+b")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise InputError(f"another `flowkit batch` is writing to {str(folder)!r}: wait for it, or use "
                         "another --out") from None
    return f
