"""Reading a source directory's files within bounds: a file larger than the limit
(`--max-source-file-bytes`), or a symbolic link that leads out of the directory (unless
`--source-links any`), is refused with a message for the operator and never read (a mounted
ConfigMap's links stay inside the directory and are read as usual). Refusals are counted by
reason for the metrics (`xds_server_source_files_refused_total`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

__all__ = ["MAX_FILE_BYTES", "BoundedReader", "Links", "ReadLimits", "Refused", "read_bounded"]

# A mesh of 10,000 services is ~4 MiB of YAML in total: one file past this is a mistake (or an
# attack on the server's memory).
MAX_FILE_BYTES = 8 * 1024 * 1024


class Links(str, Enum):
    """Which symbolic links of a source directory are followed."""

    INSIDE = "inside"  # links whose target is inside the directory (a mounted ConfigMap's)
    ANY = "any"  # every link: the directory is assembled from files kept elsewhere


@dataclass(frozen=True)
class ReadLimits:
    max_file_bytes: int = MAX_FILE_BYTES
    links: Links = Links.INSIDE


class Refused(Exception):
    """The file was not read; the message says why, `reason` is the counter's label."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class BoundedReader:
    """Reads files of one source within `limits`, counting what it refuses."""

    limits: ReadLimits = field(default_factory=ReadLimits)
    refused: Counter[str] = field(default_factory=Counter)  # "too-large", "link-outside"

    def read(self, path: Path, root: Path | None) -> bytes:
        """The file's bytes. Raises Refused, FileNotFoundError (gone) or OSError."""
        try:
            return read_bounded(path, root, self.limits)
        except Refused as refused:
            self.refused[refused.reason] += 1
            raise


def read_bounded(path: Path, root: Path | None, limits: ReadLimits = ReadLimits()) -> bytes:
    """The file's bytes. Raises Refused, FileNotFoundError (gone) or OSError."""
    if (limits.links is Links.INSIDE and root is not None
            and not path.resolve().is_relative_to(root.resolve())):
        raise Refused("a symbolic link out of the source directory: not read "
                      "(--source-links any follows it)", "link-outside")
    limit = limits.max_file_bytes
    with path.open("rb") as handle:
        raw = handle.read(limit + 1)
    if len(raw) > limit:
        raise Refused(f"larger than the {_size(limit)} limit of a source file "
                      "(--max-source-file-bytes): not read", "too-large")
    return raw


def _size(count: int) -> str:
    if count % (1024 * 1024) == 0:
        return f"{count // (1024 * 1024)} MiB"
    if count % 1024 == 0:
        return f"{count // 1024} KiB"
    return f"{count} bytes"
