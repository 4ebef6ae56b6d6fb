"""One CA and one token issuer for every replica in a cluster: a Kubernetes Secret.

The Secret (`--ca-secret`, default `xds-server-ca`, in the server's namespace) holds the CA
files in the layout of `--ca-dir` (`ca-cert.pem`, `ca-key.pem`, `root-cert.pem`,
`cert-chain.pem`, during a rotation `next-ca-*.pem`) and `token-signing-key.pem`.

- At start, before the CA is loaded, `obtain()` reads it and writes its files into `--ca-dir`.
  When it does not exist, only the replica holding the leader Lease creates it (a create, so of
  two writers exactly one wins: the other gets 409 and reads the winner's): from a plugged-in
  `cacerts`-style Secret (`--ca-plugin-secret`, Istio's layout) when there is one, otherwise a
  new self-signed root; plus a token-signing key. Every other replica waits for it, logging
  why: a replica never serves with a root of its own.
- Every replica watches the Secret (a watch on that one name, which RBAC can grant by
  `resourceNames`): a change (a root rotation step on another replica, an operator's edit) is
  written to `--ca-dir` and the CA reloaded.
- A change of the CA made here (a rotation step) is written back with the Secret's
  resourceVersion (409: re-read, the newer one wins).

The Secret's content is validated as the CA files are (ca/authority.py): a bad edit is
reported and the last good CA stays in use.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import random
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .ca.authority import CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT, CertificateAuthority
from .ca.tokens import TokenIssuer
from .config import ConfigError
from .shared_ca import SHARED_FILES, publish_on_change, read_files, write_files
from .sources.kube_api import SECRET, ApiException, KubeApi, status_message

log = logging.getLogger("xds_server.shared")

PLUGIN_FILES = (CA_CERT, CA_KEY, ROOT_CERT, CERT_CHAIN)
WATCH_SECONDS = 300


def secret_files(secret: dict[str, Any]) -> dict[str, bytes]:
    """The CA files a Secret holds (ValueError when it holds no usable CA)."""
    data = secret.get("data") or {}
    files: dict[str, bytes] = {}
    for name in SHARED_FILES:
        if name in data:
            try:
                files[name] = base64.b64decode(data[name], validate=True)
            except ValueError:
                raise ValueError(f"data.{name} is not base64") from None
    for name in (CA_CERT, CA_KEY):
        if name not in files:
            raise ValueError(f"data.{name} is missing")
    return files


def secret_body(namespace: str, name: str, files: dict[str, bytes]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": name, "namespace": namespace,
                         "labels": {"app.kubernetes.io/managed-by": "xds-server"}},
            "data": {n: base64.b64encode(d).decode() for n, d in sorted(files.items())}}


class SecretCA:
    """Keeps `--ca-dir` equal to the CA Secret on this replica (see the module doc)."""

    def __init__(self, api: KubeApi, namespace: str, name: str, directory: Path, *,
                 is_leader: Callable[[], bool], plugin_secret: str | None = "cacerts",
                 trust_domain: str = "cluster.local", key_algorithm: Any = "ec-p256",
                 poll_seconds: float = 1.0) -> None:
        self.api = api
        self.namespace = namespace
        self.name = name
        self.directory = Path(directory)
        self.is_leader = is_leader
        self.plugin_secret = plugin_secret
        self.trust_domain = trust_domain
        self.key_algorithm = key_algorithm
        self.poll_seconds = poll_seconds
        self.authority: CertificateAuthority | None = None
        self.resource_version = ""
        self._synced: dict[str, bytes] = {}
        self.created = False
        self.refreshes = 0
        self.errors = 0
        self.last_error = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = asyncio.Lock()

    @property
    def where(self) -> str:
        return f"Secret {self.namespace}/{self.name}"

    # -- start ------------------------------------------------------------------------------

    def _get(self, name: str) -> dict[str, Any] | None:
        try:
            return self.api.get(SECRET, self.namespace, name)
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    async def obtain(self, stop: asyncio.Event | None = None) -> None:
        """Put the Secret's CA files in `--ca-dir`; the Lease holder creates the Secret when
        none exists. Waits otherwise. Raises ConfigError for a Secret holding no usable CA."""
        logged = ""
        while stop is None or not stop.is_set():
            try:
                secret = await asyncio.to_thread(self._get, self.name)
                if secret is not None:
                    await self._adopt(secret)
                    return
                if self.is_leader():
                    files = await asyncio.to_thread(self._initial_files)
                    try:
                        created = await asyncio.to_thread(
                            self.api.create, SECRET, self.namespace,
                            secret_body(self.namespace, self.name, files))
                    except ApiException as err:
                        if err.status != 409:
                            raise
                        continue  # another writer won: read theirs
                    await asyncio.to_thread(write_files, self.directory, files)
                    self._synced, self.created = files, True
                    self.resource_version = created.get("metadata", {}).get("resourceVersion", "")
                    log.info("created the CA Secret: every replica signs with this root",
                             extra={"secret": self.where})
                    return
                reason = "not created yet; the replica holding the Lease creates it"
            except ConfigError:
                raise
            except Exception as err:
                reason = f"the API server cannot be asked ({status_message(err)})"
            if reason != logged:
                log.warning("waiting for the CA %s: %s", self.where, reason)
                logged = reason
            await asyncio.sleep(random.uniform(0.5, 1.0) * self.poll_seconds)
        raise ConfigError(f"stopped while waiting for the CA {self.where}")

    async def _adopt(self, secret: dict[str, Any]) -> None:
        try:
            files = secret_files(secret)
        except ValueError as err:
            raise ConfigError(f"--ca-secret: the {self.where} holds no usable CA: {err}") from None
        await asyncio.to_thread(write_files, self.directory, files)
        self._synced = files
        self.resource_version = secret.get("metadata", {}).get("resourceVersion", "")
        log.info("using the CA from the Secret", extra={"secret": self.where})

    def _initial_files(self) -> dict[str, bytes]:
        """A plugged-in `cacerts`-style Secret wins; otherwise a new self-signed root. Plus a
        token-signing key. Validated as the CA files are, in a scratch directory."""
        scratch = Path(tempfile.mkdtemp(prefix="xds-secret-ca-"))
        try:
            plugin = self._get(self.plugin_secret) if self.plugin_secret else None
            if plugin is not None:
                data = plugin.get("data") or {}
                files = {n: base64.b64decode(data[n]) for n in PLUGIN_FILES if n in data}
                write_files(scratch, files)
                try:
                    CertificateAuthority(scratch, trust_domain=self.trust_domain, create=False)
                except Exception as err:
                    raise ConfigError(f"--ca-plugin-secret: Secret {self.namespace}/"
                                      f"{self.plugin_secret}: {err}") from None
                log.info("sharing the plugged-in CA", extra={"secret": f"{self.namespace}/{self.plugin_secret}"})
            else:
                CertificateAuthority(scratch, trust_domain=self.trust_domain,
                                     key_algorithm=self.key_algorithm)
            TokenIssuer(scratch)
            return read_files(scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    # -- running ----------------------------------------------------------------------------

    def attach(self, authority: CertificateAuthority) -> None:
        """Write this replica's CA changes (rotation steps) back to the Secret."""
        self.authority = authority
        publish_on_change(authority, lambda: self._loop, self.publish)

    async def publish(self) -> None:
        async with self._lock:
            files = await asyncio.to_thread(read_files, self.directory)
            if files == self._synced:
                return
            body = secret_body(self.namespace, self.name, files)
            body["metadata"]["resourceVersion"] = self.resource_version
            try:
                updated = await asyncio.to_thread(self.api.replace, SECRET, self.namespace, self.name, body)
            except Exception as err:
                self.errors += 1
                self.last_error = status_message(err)
                log.error("could not write the CA change to the %s: %s", self.where, self.last_error)
                return
            self._synced = files
            self.resource_version = updated.get("metadata", {}).get("resourceVersion", "")
            log.info("wrote the CA change to the Secret", extra={"secret": self.where})

    async def _changed(self, secret: dict[str, Any]) -> None:
        async with self._lock:
            try:
                files = secret_files(secret)
            except ValueError as err:
                self.errors += 1
                self.last_error = str(err)
                log.error("the %s holds no usable CA, keeping the CA in use: %s", self.where, err)
                return
            self.resource_version = secret.get("metadata", {}).get("resourceVersion", "")
            if files == self._synced:
                return
            await asyncio.to_thread(write_files, self.directory, files)
            self._synced = files
            self.refreshes += 1
            log.info("the CA Secret changed", extra={"secret": self.where})
            if self.authority is not None:
                await asyncio.to_thread(self.authority.reload)

    async def run(self, stop: asyncio.Event) -> None:
        """Watch the Secret until `stop`: a daemon thread follows it (re-read and re-watched
        after errors, with backoff) and hands changes to the loop."""
        from kubernetes import watch as k8s_watch

        self._loop = loop = asyncio.get_running_loop()
        watcher = k8s_watch.Watch()
        stopper = threading.Event()

        def post(secret: dict[str, Any]) -> None:
            asyncio.run_coroutine_threadsafe(self._changed(secret), loop)

        def follow() -> None:
            delay = 1.0
            while not stopper.is_set():
                try:
                    secret = self._get(self.name)
                    version = ""
                    if secret is not None:
                        post(secret)
                        version = secret.get("metadata", {}).get("resourceVersion", "")
                    for event in self.api.watch(SECRET, watcher, resource_version=version,
                                                timeout_seconds=WATCH_SECONDS,
                                                namespace=self.namespace,
                                                field_selector=f"metadata.name={self.name}"):
                        if event.get("type") in ("ADDED", "MODIFIED") and isinstance(event.get("object"), dict):
                            post(event["object"])
                    delay = 1.0
                except Exception as err:
                    if stopper.is_set():
                        return
                    log.warning("CA Secret watch: %s", status_message(err), extra={"secret": self.where})
                    stopper.wait(random.uniform(0.5, 1.0) * delay)
                    delay = min(30.0, delay * 2)

        thread = threading.Thread(target=follow, name="ca-secret-watch", daemon=True)
        thread.start()
        try:
            await stop.wait()
        finally:
            stopper.set()
            with contextlib.suppress(Exception):
                watcher.stop()

    def status(self) -> dict[str, Any]:
        return {"secret": self.where, "resource_version": self.resource_version,
                "created_here": self.created, "refreshes": self.refreshes,
                "errors": self.errors, "last_error": self.last_error}
