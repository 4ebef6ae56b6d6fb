"""The workload agent's certificate directory, swapped as one unit.

Readers (Envoy's file-based SDS, gRPC's `file_watcher` provider, any TLS server) must never
pair a new key with an old certificate. Renaming three files one after the other cannot
promise that, so the directory is laid out as the kubelet lays out Secret volumes
(Kubernetes' AtomicWriter):

    DIR/..2026_12_08_01_40_00.123456/  cert.pem key.pem ca.pem   one generation, complete
    DIR/..data -> ..2026_12_08_01_40_00.123456                  the current generation
    DIR/cert.pem -> ..data/cert.pem   (and key.pem, ca.pem)       stable paths for readers

A new generation is written in full into a fresh hidden directory, then `..data` is replaced
by renaming a new symlink over it: one atomic step switches all three files. Envoy watches
DIR for moves (`watched_directory`), and that rename is a move into DIR, so it re-reads the
certificate, key and bundle together. Older generations are removed afterwards (one is kept
for a reader that resolved `..data` just before the swap).

Envoy also needs the SDS resources that name those files (`path_config_source`): the
`xds-cert.yaml` and `xds-ca.yaml` files here, written once; their content never changes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from .files import KEY_MODE, PUBLIC_MODE, _fsync_dir, write_atomic

CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
CA_FILE = "ca.pem"
DATA_LINK = "..data"
# Envoy file-based SDS: one Secret per file, named as the bootstrap's sds configs name them.
SDS_CERT_FILE = "xds-cert.yaml"
SDS_CA_FILE = "xds-ca.yaml"
SDS_CERT_NAME = "xds-client-certificate"
SDS_CA_NAME = "xds-trust-bundle"
_SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
KEEP_GENERATIONS = 2


def _generation_name() -> str:
    return "..gen-" + datetime.now(UTC).strftime("%Y_%m_%d_%H_%M_%S.%f")


def write_generation(directory: Path, cert_pem: bytes, key_pem: bytes, ca_pem: bytes) -> Path:
    """Write one complete generation and make it current in one rename. Returns its path."""
    directory = Path(directory)
    generation = directory / _generation_name()
    suffix = 0
    while generation.exists():  # two renewals within a microsecond (tests with tiny TTLs)
        suffix += 1
        generation = directory / f"{_generation_name()}-{suffix}"
    generation.mkdir(mode=0o755)
    write_atomic(generation / CA_FILE, ca_pem, PUBLIC_MODE)
    write_atomic(generation / KEY_FILE, key_pem, KEY_MODE)
    write_atomic(generation / CERT_FILE, cert_pem, PUBLIC_MODE)
    link = directory / DATA_LINK
    tmp_link = directory / f"{DATA_LINK}_tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp_link.unlink()
    tmp_link.symlink_to(generation.name)
    os.replace(tmp_link, link)  # the atomic switch
    for name in (CERT_FILE, KEY_FILE, CA_FILE):
        stable = directory / name
        if not stable.is_symlink():
            with contextlib.suppress(FileNotFoundError):
                stable.unlink()  # a plain file from an older agent's layout
            stable.symlink_to(f"{DATA_LINK}/{name}")
    _fsync_dir(directory)
    _prune(directory, generation.name)
    return generation


def _prune(directory: Path, current: str) -> None:
    generations = sorted(p for p in directory.iterdir()
                         if p.name.startswith("..gen-") and p.is_dir() and not p.is_symlink())
    for old in generations[:-KEEP_GENERATIONS]:
        if old.name != current:
            shutil.rmtree(old, ignore_errors=True)


def sds_resources(directory: Path) -> dict[str, dict[str, Any]]:
    """{file name: content} of the two file-based SDS resources Envoy reads."""
    directory = Path(directory).absolute()
    watched = {"path": str(directory)}
    cert = {"resources": [{
        "@type": _SECRET, "name": SDS_CERT_NAME,
        "tls_certificate": {
            "certificate_chain": {"filename": str(directory / CERT_FILE)},
            "private_key": {"filename": str(directory / KEY_FILE)},
            # Reloads on moves into DIR (the ..data swap), cert and key read as one pair.
            "watched_directory": watched,
        },
    }]}
    ca = {"resources": [{
        "@type": _SECRET, "name": SDS_CA_NAME,
        "validation_context": {
            "trusted_ca": {"filename": str(directory / CA_FILE)},
            "watched_directory": watched,
        },
    }]}
    return {SDS_CERT_FILE: cert, SDS_CA_FILE: ca}


def write_sds_files(directory: Path) -> None:
    """The SDS resource files, when missing or different (they only name paths)."""
    for name, content in sds_resources(directory).items():
        data = yaml.safe_dump(content, sort_keys=False).encode()
        path = Path(directory) / name
        if not path.exists() or path.read_bytes() != data:
            write_atomic(path, data, PUBLIC_MODE)
