"""One CA and one token issuer for every replica, through the shared state (Redis, sealed).

The CA keeps working on its files (ca/authority.py reads `--ca-dir`); this module keeps those
files equal on every replica:

- at start, before the CA is loaded, `obtain()` reads the sealed `ca` entry and writes its
  files into `--ca-dir`. When there is none, exactly one replica creates it: the one that takes
  the `ca-create` lock (SET NX with a TTL) generates a root and a token-signing key (or takes an
  operator's plugged-in files from `--ca-dir`) and stores them with SET NX; every other replica
  waits for the entry. A replica never serves with a root of its own, and while Redis cannot be
  reached at start it waits (logging why) rather than invent one.
- while running, a change of the CA files made here (a root rotation step, an operator's new
  files) is sealed and stored with a higher generation and announced on the `ca` channel; the
  other replicas read it, write the files and reload. A change Redis could not take is stored
  when Redis returns (and the entry re-read).
- an entry that does not open under the state key, or is malformed, is refused and counted
  (`SharedStore.refused`), never used: at start the replica refuses to start, later the last
  good CA stays in use.

The files hold private keys on the replica's own disk (0600), as in local mode; in Redis they
are only ever sealed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import random
import shutil
import tempfile
from pathlib import Path
from collections.abc import Awaitable, Callable
from typing import Any

from .ca.authority import CA_CERT, CA_KEY, CERT_CHAIN, NEXT_CERT, NEXT_KEY, ROOT_CERT, CertificateAuthority
from .ca.files import ensure_private_dir, write_atomic, write_key
from .ca.tokens import TOKEN_KEY, TokenIssuer
from .config import ConfigError
from .shared.sealed import SealError
from .shared.store import SharedStateUnavailable, SharedStore

log = logging.getLogger("xds_server.shared")

CA_ENTRY = "ca"
CA_CHANNEL = "ca"
CREATE_LOCK = "ca-create"
SHARED_FILES = (CA_CERT, CA_KEY, ROOT_CERT, CERT_CHAIN, NEXT_CERT, NEXT_KEY, TOKEN_KEY)
KEY_FILES = frozenset({CA_KEY, NEXT_KEY, TOKEN_KEY})
MAX_FILE_BYTES = 1 << 20
RESYNC_SECONDS = 30.0  # a missed announcement is caught up this late at worst


def read_files(directory: Path) -> dict[str, bytes]:
    files = {}
    for name in SHARED_FILES:
        path = Path(directory) / name
        if path.exists():
            files[name] = path.read_bytes()
    return files


def write_files(directory: Path, files: dict[str, bytes]) -> None:
    """Keys first (a certificate never waits on disk for its key), then certificates, then
    what the entry no longer holds goes (the next root after its activation)."""
    ensure_private_dir(directory)
    directory = Path(directory)
    for name in sorted(files, key=lambda n: n not in KEY_FILES):
        path = directory / name
        if path.exists() and path.read_bytes() == files[name]:
            continue
        (write_key if name in KEY_FILES else write_atomic)(path, files[name])
    for name in SHARED_FILES:
        if name not in files:
            with contextlib.suppress(FileNotFoundError):
                (directory / name).unlink()


def encode(files: dict[str, bytes], generation: int) -> bytes:
    return json.dumps({"generation": generation,
                       "files": {n: base64.b64encode(d).decode() for n, d in sorted(files.items())}},
                      sort_keys=True).encode()


def decode(data: bytes) -> tuple[dict[str, bytes], int]:
    """(files, generation); ValueError for anything that is not a CA entry."""
    try:
        doc = json.loads(data)
        generation = int(doc["generation"])
        raw = doc["files"]
        if not isinstance(raw, dict):
            raise ValueError("files")
        files = {str(n): base64.b64decode(v, validate=True) for n, v in raw.items()}
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"the shared CA entry is malformed ({type(err).__name__})") from None
    unknown = set(files) - set(SHARED_FILES)
    if unknown:
        raise ValueError(f"the shared CA entry holds unknown files {sorted(unknown)}")
    for name in (CA_CERT, CA_KEY, TOKEN_KEY):
        if name not in files:
            raise ValueError(f"the shared CA entry lacks {name}")
    if any(len(d) > MAX_FILE_BYTES for d in files.values()):
        raise ValueError("the shared CA entry holds an oversized file")
    return files, generation



def publish_on_change(authority: CertificateAuthority,
                      loop_of: Callable[[], asyncio.AbstractEventLoop | None],
                      publish: Callable[[], Awaitable[None]]) -> None:
    """Chain `publish` onto the CA's change callback: a rotation step (run in a worker
    thread) schedules the write of the shared copy on the owner's loop, once it runs."""
    previous = authority.changed

    def changed(changed_authority: CertificateAuthority) -> None:
        if previous is not None:
            previous(changed_authority)
        loop = loop_of()
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(lambda: asyncio.ensure_future(publish()))

    authority.changed = changed

class SharedCA:
    """Keeps `--ca-dir` equal to the shared `ca` entry on this replica (see the module doc)."""

    def __init__(self, store: SharedStore, directory: Path, *, trust_domain: str,
                 key_algorithm: Any, poll_seconds: float = 1.0) -> None:
        self.store = store
        self.directory = Path(directory)
        self.trust_domain = trust_domain
        self.key_algorithm = key_algorithm
        self.poll_seconds = poll_seconds
        self.authority: CertificateAuthority | None = None
        self.generation = 0
        self._synced: dict[str, bytes] = {}  # the files of the entry we last read or wrote
        self.created = False  # this replica created the shared CA
        self.publish_pending = False
        self.refreshes = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = asyncio.Lock()
        store.subscribe(CA_CHANNEL, lambda _message: self.refresh())
        store.on_reconnect(self._resync)

    # -- start ------------------------------------------------------------------------------

    async def obtain(self, stop: asyncio.Event | None = None) -> None:
        """Put the shared CA's files in `--ca-dir`, creating the entry once if none exists
        (see the module doc). Waits while Redis is unreachable. Raises ConfigError for an
        entry that must not be trusted."""
        delay = self.poll_seconds
        waiting_logged = ""
        while stop is None or not stop.is_set():
            try:
                if await self._adopt_entry():
                    return
                if await self.store.set(CREATE_LOCK, self.store.replica.encode() or b"?",
                                        only_if_absent=True, ttl=60):
                    files = await asyncio.to_thread(self._initial_files)
                    if await self.store.set_sealed(CA_ENTRY, encode(files, 1), only_if_absent=True):
                        await asyncio.to_thread(write_files, self.directory, files)
                        self._synced, self.generation, self.created = files, 1, True
                        log.info("created the shared CA: every replica signs with this root",
                                 extra={"replica": self.store.replica})
                        with contextlib.suppress(SharedStateUnavailable):
                            await self.store.publish(CA_CHANNEL, b"1")
                        return
                    continue  # another replica stored one first: use it
                reason = "another replica is creating the shared CA"
            except SharedStateUnavailable as err:
                reason = f"{err}; a replica never serves with a root of its own"
            if reason != waiting_logged:
                log.warning("waiting for the shared CA: %s", reason)
                waiting_logged = reason
            await asyncio.sleep(random.uniform(0.5, 1.0) * delay)
            delay = min(5.0, delay * 1.5)
        raise ConfigError("stopped while waiting for the shared CA")

    async def _adopt_entry(self) -> bool:
        try:
            data = await self.store.get_sealed(CA_ENTRY)
        except SealError as err:
            raise ConfigError(f"--state-key-file: the shared CA in Redis was refused: {err} "
                              "(every replica needs the same state key)") from None
        if data is None:
            return False
        try:
            files, generation = decode(data)
        except ValueError as err:
            self.store.refused["malformed"] += 1
            raise ConfigError(f"--redis-url: {err}") from None
        await asyncio.to_thread(write_files, self.directory, files)
        self._synced, self.generation = files, generation
        log.info("using the shared CA", extra={"generation": generation})
        return True

    def _initial_files(self) -> dict[str, bytes]:
        """The CA the first replica shares: an operator's plugged-in files in `--ca-dir` win;
        otherwise a new self-signed root. Plus a token-signing key."""
        if (self.directory / CA_CERT).exists() and (self.directory / CA_KEY).exists():
            CertificateAuthority(self.directory, trust_domain=self.trust_domain, create=False)
            TokenIssuer(self.directory)  # the token key, created when missing
            log.info("sharing the CA files found in --ca-dir (plugged in)",
                     extra={"directory": str(self.directory)})
            return read_files(self.directory)
        scratch = Path(tempfile.mkdtemp(prefix="xds-shared-ca-"))
        try:
            CertificateAuthority(scratch, trust_domain=self.trust_domain, key_algorithm=self.key_algorithm)
            TokenIssuer(scratch)
            return read_files(scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    # -- running ----------------------------------------------------------------------------

    def attach(self, authority: CertificateAuthority) -> None:
        """Publish this replica's CA changes (rotation steps, new plugged-in files)."""
        self.authority = authority
        publish_on_change(authority, lambda: self._loop, self.publish)

    async def run(self, stop: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), RESYNC_SECONDS)
                return
            except TimeoutError:
                with contextlib.suppress(SharedStateUnavailable):
                    await self._resync()

    async def _resync(self) -> None:
        if self.publish_pending:
            await self.publish()
        await self.refresh()

    async def publish(self) -> None:
        """Store this replica's CA files when they differ from the shared entry."""
        async with self._lock:
            files = await asyncio.to_thread(read_files, self.directory)
            if files == self._synced:
                self.publish_pending = False
                return
            try:
                generation = self.generation + 1
                await self.store.set_sealed(CA_ENTRY, encode(files, generation))
                await self.store.publish(CA_CHANNEL, str(generation).encode())
            except SharedStateUnavailable:
                self.publish_pending = True
                log.warning("the CA changed while Redis is unreachable: it is shared when Redis "
                            "returns")
                return
            self._synced, self.generation, self.publish_pending = files, generation, False
            log.info("shared the CA change", extra={"generation": generation})

    async def refresh(self) -> None:
        """Read the shared entry; write and reload the CA when it changed elsewhere."""
        async with self._lock:
            if self.publish_pending:
                return  # ours goes first when Redis returns
            try:
                data = await self.store.get_sealed(CA_ENTRY)
            except SealError:
                return  # counted and logged by the store; the last good CA stays
            if data is None:
                return
            try:
                files, generation = decode(data)
            except ValueError as err:
                self.store.refused["malformed"] += 1
                log.error("refused the shared CA entry, keeping the CA in use: %s", err)
                return
            if files == self._synced:
                self.generation = max(self.generation, generation)
                return
            await asyncio.to_thread(write_files, self.directory, files)
            self._synced, self.generation = files, generation
            self.refreshes += 1
            log.info("the shared CA changed on another replica", extra={"generation": generation})
            if self.authority is not None:
                await asyncio.to_thread(self.authority.reload)
