"""Files of a batch folder: atomic writes, the writability probe, stale temporary files.

Every file is written atomically (`flowkit.storage.write_atomic`: a temporary name beside
its target, ``.flowkit-tmp-NAME.PID.tmp``, flushed to disk, then renamed over the target),
so a reader (or a resume after kill -9) sees the old file or the new one, never half of
one. A killed writer leaves only its temporary file, which `remove_stale_temporaries`
deletes at the next start; it touches no other file (a user's own `.notes.1.tmp` stays).

Images are placed without overwriting (`stage` then `publish`): a name already taken, by a
finished image of an earlier run or by a user's file, is left alone and the image takes the
next free name (``000001-b-2.png``).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

from flowkit.errors import InputError, clip
from flowkit.storage import TEMP_PREFIX, image_bytes, write_atomic, write_synced

__all__ = ["lock_folder", "write_atomic", "png_bytes", "write_png", "sha256_bytes", "check_writable",
           "remove_stale_temporaries", "TEMP_PATTERN", "stage", "publish", "free_name", "image_metadata"]

TEMP_PATTERN = re.compile(r"^" + re.escape(TEMP_PREFIX) + r".+\.\d+\.tmp$")


def _temporary(path: Path) -> Path:
    return path.with_name(f"{TEMP_PREFIX}{path.name}.{os.getpid()}.tmp")


def png_bytes(image: Any, metadata: dict[str, Any] | None = None) -> bytes:
    """A PIL image encoded as PNG, with `metadata` in its text chunks."""
    return image_bytes(image, "PNG", metadata)


def image_metadata(*, prompt: str, negative_prompt: str | None, seed: int, seed_index: int, noise_seed: int,
                   sampler: str, guidance: str | None, steps: int, height: int, width: int, grid: str | None,
                   model: str) -> dict[str, Any]:
    """What an image file records about its making (PNG text chunks): enough to make it again,
    `flowkit.sample(pipe, prompt, seed=seed, start_index=seed_index, ...)`, or
    `flowkit generate PROMPT --seed SEED` when seed_index is 0."""
    from flowkit import __version__

    return {"prompt": prompt, "negative_prompt": negative_prompt, "seed": seed, "seed_index": seed_index,
            "noise_seed": noise_seed, "sampler": sampler, "guidance": guidance, "steps": steps,
            "size": f"{height}x{width}", "grid": grid, "model": model, "flowkit": __version__}


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_png(image: Any, path: Path, metadata: dict[str, Any] | None = None) -> tuple[str, int]:
    """Write `image` as a PNG atomically; (sha256, size in bytes) of what was written."""
    data = png_bytes(image, metadata)
    write_atomic(path, data)
    return sha256_bytes(data), len(data)


def stage(path: Path, data: bytes) -> Path:
    """Write `data` to the temporary file of `path` (flushed to disk); returns the temporary."""
    tmp = _temporary(path)
    try:
        write_synced(tmp, data)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise InputError(f"cannot write {str(path)!r}: {e.strerror or e}") from None
    return tmp


def free_name(folder: Path, name: str) -> str:
    """`name` if nothing in `folder` has it, else the first free STEM-2.png, STEM-3.png, ..."""
    stem, dot, ext = name.rpartition(".")
    candidate, k = name, 1
    while os.path.lexists(folder / candidate):
        k += 1
        candidate = f"{stem}-{k}{dot}{ext}"
    return candidate


def publish(tmp: Path, folder: Path, name: str) -> str:
    """Move a staged temporary into `folder` under `name`, or the next free name if another
    file took it meanwhile (never over an existing file); returns the name used."""
    while True:
        name = free_name(folder, name)
        try:
            os.link(tmp, folder / name)
            break
        except FileExistsError:
            continue
        except OSError:  # no hard links on this file system: rename after the check above
            try:
                os.replace(tmp, folder / name)
            except OSError as e:
                raise InputError(f"cannot write {str(folder / name)!r}: {e.strerror or e}") from None
            return name
    tmp.unlink(missing_ok=True)
    return name


def check_writable(folder: Path, flag: str = "--out") -> None:
    """Create `folder` if needed and prove a file can be written in it; else InputError."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{flag}: cannot create folder {clip(str(folder))!r}: {e.strerror or e}") from None
    if not folder.is_dir():
        raise InputError(f"{flag}: {clip(str(folder))!r} is not a folder")
    probe = _temporary(folder / "write-probe")
    try:
        with open(probe, "wb") as f:
            f.write(b"ok")
        probe.unlink()
    except OSError as e:
        try:
            probe.unlink(missing_ok=True)
        except OSError:  # a read-only location refuses even this (EROFS): nothing was written
            pass
        raise InputError(f"{flag}: cannot write in {clip(str(folder))!r}: {e.strerror or e}") from None


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
