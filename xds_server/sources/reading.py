"""Reading a source directory's files within bounds: a file larger than MAX_FILE_BYTES, or a
symbolic link that leads out of the directory, is refused with a message for the operator and
never read (a mounted ConfigMap's links stay inside the directory and are read as usual).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["MAX_FILE_BYTES", "Refused", "read_bounded"]

# A mesh of 10,000 services is ~4 MiB of YAML in total: one file past this is a mistake (or an
# attack on the server's memory).
MAX_FILE_BYTES = 8 * 1024 * 1024


class Refused(Exception):
    """The file was not read; the message says why."""


def read_bounded(path: Path, root: Path | None) -> bytes:
    """The file's bytes. Raises Refused, FileNotFoundError (gone) or OSError."""
    if root is not None and not path.resolve().is_relative_to(root.resolve()):
        raise Refused("a symbolic link out of the source directory: not read")
    with path.open("rb") as handle:
        raw = handle.read(MAX_FILE_BYTES + 1)
    if len(raw) > MAX_FILE_BYTES:
        raise Refused(f"larger than the {MAX_FILE_BYTES // (1024 * 1024)} MiB limit of a "
                      "source file: not read")
    return raw
