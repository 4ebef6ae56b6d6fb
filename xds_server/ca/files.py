"""Atomic file writes for certificates and keys.

A reader (this server's file watcher, gRPC's `file_watcher` certificate provider, an operator's
`cat`) sees either the old file or the new one, never a half-written one: the data goes to a
temporary file in the same directory, is flushed to disk, then renamed over the target.
Private keys are created with mode 0600 from the first byte: the temporary file is opened
with that mode, so there is no moment where the key is readable by others.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

KEY_MODE = 0o600
PUBLIC_MODE = 0o644


def write_atomic(path: Path, data: bytes, mode: int = PUBLIC_MODE) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        # The umask may have narrowed the mode; a key must be exactly 0600, a cert 0644.
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def write_key(path: Path, data: bytes) -> None:
    write_atomic(path, data, KEY_MODE)


def create_exclusive(path: Path, data: bytes, mode: int = KEY_MODE) -> bool:
    """Write `path` complete and atomically, only if it does not exist yet (two processes
    creating the same key at once: one wins, the other must read the winner's). False when
    the file already existed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.new")
    write_atomic(tmp, data, mode)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    _fsync_dir(path.parent)
    return True


def ensure_private_dir(directory: Path) -> Path:
    """Create the directory (0700) if missing. An existing directory's mode is left alone:
    an operator may have mounted it read-only or shared it with a sidecar on purpose."""
    directory = Path(directory)
    if not directory.exists():
        directory.mkdir(parents=True, mode=0o700)
    return directory


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
