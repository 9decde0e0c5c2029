"""The manifest of a batch folder, its per-rank parts, and the run fingerprint.

Files in DIR:

- ``manifest.jsonl``: one JSON record per finished image, sorted by item index, one record
  per index: the job (index, prompt, seeds, sampler, guidance, steps, size, model) plus
  file, sha256, bytes, seconds, nfe, rank, world_size, batch_size.
- ``manifest.part-R.jsonl``: what rank R finished in the current run, appended and fsynced
  after each micro-batch; rank 0 merges the parts into manifest.jsonl at the end, and a
  run that finds parts left by a killed run merges them first.
- ``run.json``: the fingerprint (model, prompt-file hash, settings); a resume with other
  settings is refused unless --force.
- ``orphans.jsonl``: the records of finished images that no longer belong to the run (their
  line was dropped or changed, or --no-resume started over). A batch run never deletes or
  overwrites a finished image: it keeps these files, lists them here and reports them.

Readers skip a line that is not a JSON object (a killed writer's last, partial line): that
item is simply not done.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

from flowkit.batch.files import sha256_bytes, write_atomic
from flowkit.errors import InputError

__all__ = ["MANIFEST", "RUN_FILE", "ORPHANS", "add_orphans", "is_image_name", "part_path", "part_paths", "read_records", "merged_records", "write_manifest",
           "merge_parts", "verify", "PartWriter", "check_fingerprint", "write_fingerprint"]

MANIFEST = "manifest.jsonl"
RUN_FILE = "run.json"
ORPHANS = "orphans.jsonl"
_PART = re.compile(r"^manifest\.part-(\d+)\.jsonl$")
_IMAGE = re.compile(r"^\d{6,}-[a-z0-9-]+\.png$")


def is_image_name(name: Any) -> bool:
    """Whether `name` is an image name a batch run gives (NNNNNN-slug.png), nothing else."""
    return isinstance(name, str) and bool(_IMAGE.match(name))


def add_orphans(folder: Path, records: Iterable[Mapping[str, Any]]) -> list[str]:
    """Append the records of orphaned images to orphans.jsonl (a file listed once); the names added."""
    listed = {r.get("file") for r in read_records(folder / ORPHANS)}
    new = [dict(r) for r in records if r.get("file") not in listed]
    if new:
        old = (folder / ORPHANS).read_bytes() if (folder / ORPHANS).exists() else b""
        if old and not old.endswith(b"\n"):
            old += b"\n"
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in new)
        write_atomic(folder / ORPHANS, old + text.encode("utf-8"))
    return [r["file"] for r in new]


def part_path(folder: Path, rank: int) -> Path:
    return folder / f"manifest.part-{rank}.jsonl"


def part_paths(folder: Path) -> list[Path]:
    """The manifest parts in `folder`, by rank."""
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _PART.match(p.name))]
    return [p for _, p in sorted(found)]


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of one JSONL file; lines that are not JSON objects with an int index are skipped."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    out = []
    for raw in data.split(b"\n"):
        try:
            rec = json.loads(raw)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("index"), int) and not isinstance(rec["index"], bool):
            out.append(rec)
    return out


def merged_records(folder: Path) -> dict[int, dict[str, Any]]:
    """index -> record from manifest.jsonl, then the parts (a later record of an index wins)."""
    records: dict[int, dict[str, Any]] = {}
    for path in (folder / MANIFEST, *part_paths(folder)):
        for rec in read_records(path):
            records[rec["index"]] = rec
    return records


def write_manifest(folder: Path, records: Mapping[int, Mapping[str, Any]]) -> None:
    """Write manifest.jsonl atomically, one line per record, sorted by index."""
    text = "".join(json.dumps(records[i], ensure_ascii=False) + "\n" for i in sorted(records))
    write_atomic(folder / MANIFEST, text.encode("utf-8"))


def merge_parts(folder: Path) -> dict[int, dict[str, Any]]:
    """Fold the parts into manifest.jsonl (written before the parts are deleted, so a kill
    in between only means merging the same records again)."""
    parts = part_paths(folder)
    records = merged_records(folder)
    if parts or not (folder / MANIFEST).exists():
        write_manifest(folder, records)
    for p in parts:
        p.unlink(missing_ok=True)
    return records


def verify(folder: Path, record: Mapping[str, Any]) -> bool:
    """Whether the record's image is in `folder`, whole, with the recorded sha256."""
    name = record.get("file")
    if not is_image_name(name):
        return False
    try:
        data = (folder / name).read_bytes()
    except OSError:
        return False
    return len(data) == record.get("bytes") and sha256_bytes(data) == record.get("sha256")


class PartWriter:
    """Appends records to one rank's part, flushed and fsynced after each call."""

    def __init__(self, path: Path):
        self.path = path
        self.indices: set[int] = set()

    def append(self, records: Iterable[Mapping[str, Any]]) -> None:
        records = list(records)
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise InputError(f"cannot write {str(self.path)!r}: {e.strerror or e}") from None
        self.indices.update(r["index"] for r in records)


# --------------------------------------------------------------------------- fingerprint


def _describe_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    changes = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            changes.append(f"{key} {_short(old.get(key))} -> {_short(new.get(key))}")
    return "; ".join(changes)


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 40 else text[:37] + "..."


def _flatten(fp: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in fp.items() if k != "settings"}
    out.update(fp.get("settings", {}))
    return out


def check_fingerprint(folder: Path, fingerprint: Mapping[str, Any], force: bool) -> None:
    """Refuse (InputError) to resume in `folder` with other settings than its run.json, unless `force`."""
    path = folder / RUN_FILE
    if force or not path.exists():
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        old = None
    if not isinstance(old, dict):
        raise InputError(f"{path} is damaged: pass --force to redo what does not match, or use another --out")
    changes = _describe_changes(_flatten(old), _flatten(fingerprint))
    if changes:
        raise InputError(f"{folder} holds a run with other settings ({changes}): use the same settings, another "
                         "--out, or --force to redo the images that change")


def write_fingerprint(folder: Path, fingerprint: Mapping[str, Any]) -> None:
    write_atomic(folder / RUN_FILE, (json.dumps(fingerprint, indent=1, sort_keys=True) + "\n").encode("utf-8"))
