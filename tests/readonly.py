"""A folder that behaves as if it sat on a read-only file system (EROFS), for root too.

`read_only(monkeypatch, root)` makes every write under `root` fail as Linux fails it on a
read-only mount: opening for writing, creating, renaming, linking and unlinking raise
OSError(EROFS), and so does unlinking a file that does not exist (the kernel asks for
write access before it looks the name up, so `unlink(missing_ok=True)` raises too: the
error handler's own clean-up raised in issue 22); making a folder that exists raises
FileExistsError, as the kernel does. Reads work. chmod cannot do this when tests run as
root, which ignores permission bits.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
from pathlib import Path

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _under(path, root: str) -> bool:
    if isinstance(path, int):
        return False
    try:
        full = os.path.abspath(os.fsdecode(path))
    except (TypeError, ValueError):
        return False
    return full == root or full.startswith(root + os.sep)


def _erofs(path) -> OSError:
    return OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))


def read_only(monkeypatch, root: Path) -> None:
    """Make `root` (and everything under it) read-only for this test."""
    root_s = os.path.abspath(root)
    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

    def fake_open(file, mode="r", *args, **kwargs):
        if _under(file, root_s) and any(c in mode for c in "wax+"):
            raise _erofs(file)
        return real_open(file, mode, *args, **kwargs)

    def fake_os_open(path, flags, *args, **kwargs):
        if _under(path, root_s) and flags & _WRITE_FLAGS:
            raise _erofs(path)
        return real_os_open(path, flags, *args, **kwargs)

    def fake_mkdir(path, *args, **kwargs):
        if _under(path, root_s):
            if os.path.lexists(path):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fsdecode(path))
            raise _erofs(path)
        return real_mkdir(path, *args, **kwargs)

    def refuse_one(real):
        def fake(path, *args, **kwargs):
            if _under(path, root_s):
                raise _erofs(path)
            return real(path, *args, **kwargs)
        return fake

    def refuse_two(real):
        def fake(src, dst, *args, **kwargs):
            if _under(src, root_s) or _under(dst, root_s):
                raise _erofs(dst)
            return real(src, dst, *args, **kwargs)
        return fake

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)
    for name in ("unlink", "remove", "rmdir", "truncate"):
        monkeypatch.setattr(os, name, refuse_one(getattr(os, name)))
    for name in ("replace", "rename", "link", "symlink"):
        monkeypatch.setattr(os, name, refuse_two(getattr(os, name)))
