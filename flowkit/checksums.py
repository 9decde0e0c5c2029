"""Checksummed weight folders: every shipped model folder carries `manifest.json`, a map of
relative file name -> sha256, written when the weights are exported and verified before
anything is read. A failure raises `WeightsError` naming the file, so a damaged install
says which file to restore.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

from flowkit.errors import WeightsError

__all__ = ["MANIFEST_FILE", "sha256_file", "write_manifest", "verify_manifest"]

MANIFEST_FILE = "manifest.json"


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: str | os.PathLike, files: Iterable[str | os.PathLike]) -> Path:
    """Write `folder/manifest.json` with the sha256 of `files` (paths inside `folder`)."""
    folder = Path(folder)
    sums = {Path(f).resolve().relative_to(folder.resolve()).as_posix(): sha256_file(f) for f in files}
    manifest = folder / MANIFEST_FILE
    manifest.write_text(json.dumps(sums, indent=2, sort_keys=True) + "\n")
    return manifest


def verify_manifest(folder: str | os.PathLike, required: Iterable[str], *, hint: str = "reinstall flowkit") -> dict:
    """Check that `folder/manifest.json` lists every `required` file and that each listed
    file exists with its sha256; return the manifest. `hint` says how to repair."""
    folder = Path(folder)
    manifest = folder / MANIFEST_FILE
    if not manifest.is_file():
        raise WeightsError(f"missing weights manifest {manifest}: {hint}")
    try:
        sums = json.loads(manifest.read_text())
        if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
            raise ValueError("not a JSON object of file -> sha256")
    except (ValueError, UnicodeDecodeError) as e:
        raise WeightsError(f"weights manifest {manifest} is damaged ({e}): {hint}") from None
    for name in required:
        if name not in sums:
            raise WeightsError(f"weights manifest {manifest} does not list {name}: {hint}")
    for name, digest in sums.items():
        path = folder / name
        if not path.is_file():
            raise WeightsError(f"missing weights file {path}: {hint}")
        if sha256_file(path) != digest:
            raise WeightsError(f"weights file {path} is damaged (sha256 mismatch): {hint}")
    return sums
