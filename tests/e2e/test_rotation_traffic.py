"""Certificate and root rotation under continuous traffic, through real sidecars.

The issue's requirement: "With a 20 s workload TTL, continuous traffic for 60 s through the
sidecars sees every certificate rotate and zero failed requests; the same for a root
rotation."

Two meshed pods, `web` (the client) and `api` (the server), with STRICT mTLS between their
sidecars. The server runs the whole `Security` of `xds-server serve --auth tokens` (the CA, SDS
with renewal at half-life, root rotation): each sidecar proves its identity with a workload
token in its bootstrap and gets its certificate (`default`) and the bundle (`ROOTCA`) over
ADS. A background thread sends requests from web's app through web's sidecar to
`api.shop:80` every 20 ms, alternating a fresh connection and a keep-alive one, and records
every result. A TrafficPolicy caps requests per upstream connection so the sidecars keep
making new mTLS handshakes (with whatever certificate they hold at that moment). Another
thread samples each sidecar's /certs (certificate serials, trusted roots) and its
`listener_manager.total_listeners_draining`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import http.client
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.support.envoy import EnvoyProcess
from tests.support.mesh import MeshHarness, Pod
from tests.support.net import free_port
from xds_server.bootstrap import SidecarSpec, sidecar_bootstrap
from xds_server.ca.authority import fingerprint
from xds_server.ca.rotation import RotationPhase
from xds_server.model.security import SecuritySettings
from xds_server.security import Security, SecurityConfig
from xds_server.xds.auth import AuthMode
from xds_server.xds.cache import ResourceCache

pytestmark = [pytest.mark.envoy, pytest.mark.slow]

NS = "shop"
API_HOST = "api.shop:80"
WORKLOAD_TTL = timedelta(seconds=20)
TRAFFIC_SECONDS = 60.0
INTERVAL = 0.02


class TokenMesh(MeshHarness):
    """A MeshHarness whose server runs `Security` (--auth tokens): sidecars authenticate with
    a workload token and get their certificates over SDS; renewal and root rotation run."""

    def __init__(self, directory: Path, ca_dir: Path, ttl: timedelta) -> None:
        cache = ResourceCache()
        config = SecurityConfig(auth=AuthMode.TOKENS, ca_dir=ca_dir, workload_ttl=ttl,
                                clock_skew=timedelta(0), watch_ca_files=False,
                                rotation_startup_grace=timedelta(0))
        self.security = Security.build(config, cache, "127.0.0.1:0")
        super().__init__(directory, security=SecuritySettings(mtls=True),
                         cache=cache)
        self.security.attach(self.server)
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def start(self) -> TokenMesh:
        await super().start()
        self._task = asyncio.create_task(self.security.run(self._stop))
        return self

    async def stop(self) -> None:
        await super().stop()
        self._stop.set()
        if self._task is not None:
            await asyncio.wait_for(self._task, 10)

    async def sidecar(self, pod: Pod, *, delta: bool = True) -> Pod:
        token = self.security.tokens.create(pod.namespace, pod.service_account, timedelta(hours=1))
        spec = SidecarSpec(
            namespace=pod.namespace, service_account=pod.service_account, pod=pod.name,
            pod_ip=pod.ip, xds_address=self.server.address,
            admin_address=f"{pod.ip}:{free_port(pod.ip)}", labels=pod.labels, delta=delta,
            token=token, interception="explicit",
        )
        pod.envoy = EnvoyProcess(sidecar_bootstrap(spec), name=f"{pod.namespace}-{pod.name}")
        await asyncio.to_thread(pod.envoy.start)
        await asyncio.to_thread(pod.envoy.wait_ready, 20)
        return pod


@dataclass
class Result:
    at: float
    mode: str  # "new" (a fresh connection) or "keepalive"
    status: int  # 0: the request failed (no response)
    error: str = ""


class Traffic:
    """Requests from `pod`'s app through its sidecar, every INTERVAL, until stopped."""

    def __init__(self, pod: Pod) -> None:
        self.pod = pod
        self.results: list[Result] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)

    def start(self) -> Traffic:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    @property
    def ok(self) -> int:
        return sum(1 for r in self.results if r.status == 200)

    @property
    def failures(self) -> list[Result]:
        return [r for r in self.results if r.status != 200]

    def _run(self) -> None:
        keepalive: http.client.HTTPConnection | None = None
        i = 0
        while not self._stop.is_set():
            mode = "new" if i % 2 == 0 else "keepalive"
            i += 1
            at = time.monotonic()
            try:
                if mode == "new":
                    status = self.pod.request(API_HOST, timeout=5).status
                else:
                    if keepalive is None:
                        keepalive = http.client.HTTPConnection(self.pod.ip, 15001, timeout=5)
                    keepalive.request("GET", "/", headers={"Host": API_HOST})
                    response = keepalive.getresponse()
                    response.read()
                    status = response.status
                    if response.will_close:
                        keepalive.close()
                        keepalive = None
                self.results.append(Result(at, mode, status))
            except (OSError, http.client.HTTPException) as err:
                self.results.append(Result(at, mode, 0, repr(err)))
                if mode == "keepalive" and keepalive is not None:
                    keepalive.close()
                    keepalive = None
            self._stop.wait(INTERVAL)
        if keepalive is not None:
            keepalive.close()


@dataclass
class Sample:
    at: float
    leaf_serials: frozenset[int]  # the certificate(s) in the sidecar's TLS contexts
    ca_serials: frozenset[int]  # the roots it trusts
    draining: int
    # serial -> the URI SANs of that certificate, as the sidecar holds it (not the server's
    # registry, which prunes expired certificates: the test must not race that).
    leaf_uris: dict[int, frozenset[str]] = field(default_factory=dict)


@dataclass
class CertWatch:
    """Samples each sidecar's /certs and draining listeners until stopped."""

    pods: list[Pod]
    samples: dict[str, list[Sample]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    # With a registry: each certificate's issuing root, looked up when first seen (while it
    # is live: the registry prunes expired ones, and the test must not race that).
    registry: Any = None
    roots_of: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.samples = {p.name: [] for p in self.pods}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="certwatch", daemon=True)

    def start(self) -> CertWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            for pod in self.pods:
                try:
                    taken = sample(pod)
                    self.samples[pod.name].append(taken)
                    for serial in taken.leaf_serials - self.roots_of.keys():
                        record = self.registry.get(serial) if self.registry is not None else None
                        if record is not None:
                            self.roots_of[serial] = record.root_fingerprint
                except Exception as err:
                    self.errors.append(f"{pod.name}: {err!r}")
            self._stop.wait(0.2)

    def serials(self, pod: Pod) -> list[int]:
        """The distinct certificates the sidecar held, in the order it held them."""
        seen: list[int] = []
        for s in self.samples[pod.name]:
            for serial in sorted(s.leaf_serials):
                if serial not in seen:
                    seen.append(serial)
        return seen

    def uris(self, pod: Pod, serial: int) -> frozenset[str]:
        """The URI SANs of a certificate the sidecar held."""
        return next(s.leaf_uris[serial] for s in self.samples[pod.name] if serial in s.leaf_uris)

    def max_draining(self) -> int:
        return max((s.draining for samples in self.samples.values() for s in samples), default=0)


def sample(pod: Pod) -> Sample:
    assert pod.envoy is not None
    status, body = pod.envoy.admin_get("/certs")
    assert status == 200, body
    leaves: set[int] = set()
    roots: set[int] = set()
    uris: dict[int, frozenset[str]] = {}
    for context in json.loads(body).get("certificates", ()):
        for cert in context.get("cert_chain", ())[:1]:
            serial = int(cert["serial_number"], 16)
            leaves.add(serial)
            uris[serial] = frozenset(san["uri"] for san in cert.get("subject_alt_names", ()) if "uri" in san)
        for cert in context.get("ca_cert", ()):
            roots.add(int(cert["serial_number"], 16))
    draining = pod.envoy.stats("listener_manager.total_listeners_draining")
    return Sample(time.monotonic(), frozenset(leaves), frozenset(roots),
                  int(draining.get("listener_manager.total_listeners_draining", 0)), uris)


def counter(pod: Pod, pattern: str) -> int:
    assert pod.envoy is not None
    return sum(int(v) for v in pod.envoy.stats(pattern).values() if isinstance(v, int))


def describe_failures(traffic: Traffic, start: float) -> str:
    return "; ".join(f"{r.at - start:.2f}s {r.mode} {r.status} {r.error}"
                     for r in traffic.failures[:20])


async def strict_pair(mesh: TokenMesh) -> tuple[Pod, Pod]:
    mesh.write("mtls-strict.yaml", {
        "apiVersion": "mesh.xds-server.io/v1alpha1", "kind": "MTLSPolicy",
        "metadata": {"name": "strict", "namespace": NS}, "spec": {"mode": "STRICT"},
    })
    api = mesh.pod(NS, "api-1", service_account="api")
    web = mesh.pod(NS, "web-1", service_account="web", labels={"app": "web"})
    mesh.service(NS, "api", pods=[api])
    # New upstream connections (new mTLS handshakes) all the time, not one pooled forever.
    mesh.write("policy-api.yaml", {
        "apiVersion": "mesh.xds-server.io/v1alpha1", "kind": "TrafficPolicy",
        "metadata": {"name": "api-pool", "namespace": NS},
        "spec": {"targetRef": {"kind": "Service", "name": "api"},
                 "connectionPool": {"http": {"maxRequestsPerConnection": 5}}},
    })
    await asyncio.gather(mesh.sidecar(api), mesh.sidecar(web))

    def served() -> bool:
        try:
            return web.request(API_HOST, timeout=3).status == 200
        except OSError:
            return False

    await mesh.until(served, 20, "web -> api over mTLS")
    # Both sidecars hold a certificate from the CA, and the client did mTLS handshakes.
    await mesh.until(lambda: all(sample(p).leaf_serials for p in (api, web)), 10, "certificates")
    assert counter(api, r"listener\.inbound\.ssl\.handshake") >= 1
    assert counter(api, r"listener\.inbound\.ssl\.no_certificate") == 0
    return api, web


@pytest.fixture
async def mesh(tmp_path: Path):
    harness = await TokenMesh(tmp_path / "mesh", tmp_path / "ca", WORKLOAD_TTL).start()
    yield harness
    await harness.stop()


async def test_every_certificate_rotates_under_traffic_without_a_failed_request(
    mesh: TokenMesh,
) -> None:
    api, web = await strict_pair(mesh)
    handshakes_before = counter(api, r"listener\.inbound\.ssl\.handshake")
    watch = CertWatch([api, web]).start()
    traffic = Traffic(web).start()
    start = time.monotonic()
    try:
        await asyncio.sleep(TRAFFIC_SECONDS)  # the issue's 60 s of continuous traffic
    finally:
        traffic.stop()
        watch.stop()

    assert not traffic.failures, (
        f"{len(traffic.failures)} of {len(traffic.results)} failed: "
        f"{describe_failures(traffic, start)}")
    # Continuous: about every 20 ms, both kinds of client connection, no gap of a second.
    assert traffic.ok >= TRAFFIC_SECONDS / 0.2
    assert {r.mode for r in traffic.results} == {"new", "keepalive"}
    gaps = [b.at - a.at for a, b in itertools.pairwise(traffic.results)]
    assert max(gaps) < 1.0

    # Renewal at half of 20 s: each sidecar's certificate was replaced at least twice (more
    # like five times), each one (as the sidecar held it) for that sidecar's identity alone.
    # Its TLS contexts name only the SDS secrets, so SDS is where each one came from.
    for pod in (api, web):
        serials = watch.serials(pod)
        assert len(serials) >= 3, (pod.name, serials)
        spiffe_id = f"spiffe://cluster.local/ns/{NS}/sa/{pod.service_account}"
        for serial in serials:
            assert watch.uris(pod, serial) == {spiffe_id}, (pod.name, format(serial, "x"))
    # New mTLS handshakes happened throughout (with the certificates of the moment), and no
    # listener ever drained: the secrets changed in place.
    assert counter(api, r"listener\.inbound\.ssl\.handshake") - handshakes_before >= 100
    assert counter(api, r"listener\.inbound\.ssl\.connection_error") == 0
    assert watch.max_draining() == 0
    for pod in (api, web):
        stats = pod.envoy.stats("listener_manager")
        assert stats["listener_manager.total_listeners_draining"] == 0
        assert stats["listener_manager.listener_modified"] == 0
        assert stats["listener_manager.listener_removed"] == 0
    print(f"\nrotation: {len(traffic.results)} requests, 0 failed; serials "
          + ", ".join(f"{p.name}: {[format(s, 'x')[:8] for s in watch.serials(p)]}"
                      for p in (api, web)))


async def test_root_rotation_under_traffic_without_a_failed_request(mesh: TokenMesh) -> None:
    api, web = await strict_pair(mesh)
    security = mesh.security
    registry = security.registry
    old_root = security.authority.state.root
    watch = CertWatch([api, web], registry=registry).start()
    traffic = Traffic(web).start()
    start = time.monotonic()
    try:
        await mesh.until(lambda: traffic.ok >= 100, 10, "traffic flowing")
        status = await security.start_root_rotation()  # what POST /admin/ca/rotate-root calls
        assert status["phase"] == RotationPhase.PUBLISHING.value
        new_fp = status["new_root"]
        # 1. Both sidecars get the bundle with both roots; their ACKs switch signing.
        await mesh.until(lambda: security.rotation.phase is RotationPhase.RETIRING, 15,
                         "signing switched after every proxy ACKed the new bundle")
        new_root = security.authority.state.root
        assert fingerprint(new_root) == new_fp
        both = {old_root.serial_number, new_root.serial_number}
        await mesh.until(lambda: all(sample(p).ca_serials == both for p in (api, web)), 10,
                         "sidecars trust both roots")

        # 2. Both sidecars hold certificates from the new root.
        def from_new_root(pod: Pod) -> bool:
            leaves = sample(pod).leaf_serials
            return bool(leaves) and all(
                (r := registry.get(s)) is not None and r.root_fingerprint == new_fp for s in leaves)

        await mesh.until(lambda: all(from_new_root(p) for p in (api, web)), 15,
                         "certificates from the new root")
        # 3. Once the old root's last certificate expired (<= 20 s TTL, no skew here), it
        # leaves the bundle, and the sidecars trust only the new root.
        await mesh.until(lambda: security.rotation.phase is RotationPhase.IDLE, 30,
                         "old root retired")
        await mesh.until(lambda: all(sample(p).ca_serials == {new_root.serial_number}
                                     for p in (api, web)), 10, "sidecars trust only the new root")
        # Traffic keeps flowing after the bundle shrank: new handshakes on the new root only.
        settled = traffic.ok
        handshakes = counter(api, r"listener\.inbound\.ssl\.handshake")
        await mesh.until(lambda: traffic.ok >= settled + 100, 10, "traffic after the rotation")
        assert counter(api, r"listener\.inbound\.ssl\.handshake") > handshakes
    finally:
        traffic.stop()
        watch.stop()
    elapsed = time.monotonic() - start

    assert not traffic.failures, (
        f"{len(traffic.failures)} of {len(traffic.results)} failed: "
        f"{describe_failures(traffic, start)}")
    assert elapsed <= 60, elapsed
    assert {r.mode for r in traffic.results} == {"new", "keepalive"}
    assert counter(api, r"listener\.inbound\.ssl\.connection_error") == 0
    assert watch.max_draining() == 0
    for pod in (api, web):
        # Old-root certificate(s) first, then new-root ones, never a gap.
        roots = [watch.roots_of.get(s) for s in watch.serials(pod)]
        assert fingerprint(old_root) in roots and roots[-1] == new_fp, (pod.name, roots)
        stats = pod.envoy.stats("listener_manager")
        assert stats["listener_manager.total_listeners_draining"] == 0
        assert stats["listener_manager.listener_modified"] == 0
    print(f"\nroot rotation: {len(traffic.results)} requests in {elapsed:.1f}s, 0 failed; serials "
          + ", ".join(f"{p.name}: {[format(s, 'x')[:8] for s in watch.serials(p)]}"
                      for p in (api, web)))
