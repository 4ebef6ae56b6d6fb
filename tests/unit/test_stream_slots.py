"""The per-identity stream bound (CONFORMANCE rule 19) is fair per pod (issue 13): a leaked
credential can use up its own pod's streams (a pod-bound token) or its identity's small pool
of unverified claims (any other credential), never a sibling pod's streams."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import grpc
import pytest

from xds_server.model.identity import Proof, ProxyClaim, VerifiedProxy
from xds_server.xds.auth import GuardSettings, StreamGuard, StreamRefused
from xds_server.xds.connection import Connection
from xds_server.xds.stream import Variant, new_stream


class Authenticator:
    """Proves what the test says each pod's credential proves."""

    def __init__(self, proofs: Mapping[str, Proof]) -> None:
        self.proofs = proofs
        self.mode = None

    async def authenticate(self, metadata: Any, claim: ProxyClaim, peer: str,
                           certificate: Any = None) -> Proof:
        return self.proofs[claim.pod]


def admit(guard: StreamGuard, pod: str, stream_id: int, peer: str = "ipv4:10.0.0.1:1",
          ip: str = "") -> Connection:
    conn = Connection(new_stream(Variant.DELTA, stream_id), peer, "StreamAggregatedResources")
    claim = ProxyClaim(node_id=f"{pod}.shop", namespace="shop", service_account="web", pod=pod, ip=ip)
    asyncio.run(guard.admit(conn, VerifiedProxy(claim)))
    return conn


def test_a_pod_bound_credential_uses_up_only_its_own_pods_streams() -> None:
    proofs = {pod: Proof("shop", "web", "kubernetes-token", pod=pod) for pod in ("web-1", "web-2")}
    proofs["vm"] = Proof("shop", "web", "workload-token")  # not pod-bound: the identity's bound
    guard = StreamGuard(Authenticator(proofs), GuardSettings(max_streams_per_identity=2))  # type: ignore[arg-type]
    ids = iter(range(1, 100))
    leaked = [admit(guard, "web-1", next(ids)) for _ in range(2)]
    with pytest.raises(StreamRefused) as refused:
        admit(guard, "web-1", next(ids))
    assert refused.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    # Its sibling, and the identity's other credentials, still connect.
    admit(guard, "web-2", next(ids))
    admit(guard, "web-2", next(ids))
    admit(guard, "vm", next(ids))
    admit(guard, "vm", next(ids))
    with pytest.raises(StreamRefused):
        admit(guard, "vm", next(ids))
    guard.closed(leaked[0])  # a closed stream frees its pod's slot
    admit(guard, "web-1", next(ids))
    assert guard.stats.limited["streams-per-identity"] == 2


PODS = {("shop", "web-1"): ("web", "10.0.0.1"), ("shop", "web-2"): ("web", "10.0.0.2"),
        ("shop", "db-0"): ("db", "10.0.0.9")}


def test_a_credential_that_is_not_pod_bound_fills_only_the_unverified_pool() -> None:
    token = Proof("shop", "web", "workload-token")  # one leaked token, every pod claims it
    proofs = {pod: token for pod in ("web-1", "web-2", "db-0", "ghost")}
    guard = StreamGuard(Authenticator(proofs),  # type: ignore[arg-type]
                        GuardSettings(max_streams_per_identity=2, max_unverified_streams_per_identity=1))
    guard.pods = lambda namespace, pod: PODS.get((namespace, pod))
    ids = iter(range(1, 100))
    # The thief, off the pods' addresses: claiming web-1 from elsewhere, a pod of another
    # service account, or a pod the mesh does not know all draw from one small pool.
    admit(guard, "web-1", next(ids), peer="ipv4:10.9.9.9:5")
    for pod in ("web-1", "db-0", "ghost"):
        with pytest.raises(StreamRefused) as refused:
            admit(guard, pod, next(ids), peer="ipv4:10.9.9.9:5")
        assert refused.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "from pods it could not verify (limit 1)" in refused.value.reason
    # The pods themselves, from their own IPs, each have their own pool.
    for pod, peer in (("web-1", "ipv4:10.0.0.1:7"), ("web-2", "ipv4:10.0.0.2:7")):
        admit(guard, pod, next(ids), peer=peer)
        admit(guard, pod, next(ids), peer=peer)
        with pytest.raises(StreamRefused) as refused:
            admit(guard, pod, next(ids), peer=peer)
        assert f"in pod {pod} (limit 2)" in refused.value.reason
    # On this host (loopback, a Unix socket) the address tells nothing: the node's IP must be the pod's.
    with pytest.raises(StreamRefused) as refused:
        admit(guard, "web-2", next(ids), peer="unix:/run/xds.sock", ip="10.0.0.1")  # web-1's IP
    assert "could not verify" in refused.value.reason
    with pytest.raises(StreamRefused) as refused:
        admit(guard, "web-2", next(ids), peer="ipv6:%5B::1%5D:9", ip="10.0.0.2")
    assert "in pod web-2" in refused.value.reason  # verified: web-2's own pool, which is full
    assert guard.stats.limited == {"streams-unverified-pods": 4, "streams-per-identity": 3}
    assert guard.streams_of(token.identity) == 5


def test_without_a_pod_registry_the_bound_is_per_identity() -> None:
    token = Proof("shop", "web", "workload-token")
    guard = StreamGuard(Authenticator({"web-1": token, "web-2": token}),  # type: ignore[arg-type]
                        GuardSettings(max_streams_per_identity=2, max_unverified_streams_per_identity=1))
    admit(guard, "web-1", 1)
    admit(guard, "web-2", 2)
    with pytest.raises(StreamRefused) as refused:
        admit(guard, "web-1", 3)
    assert refused.value.reason == "too many streams for identity shop/web (limit 2)"


def test_addresses_are_compared_as_addresses() -> None:
    token = Proof("shop", "web", "workload-token")
    guard = StreamGuard(Authenticator({"web-6": token}),  # type: ignore[arg-type]
                        GuardSettings(max_streams_per_identity=1, max_unverified_streams_per_identity=1))
    guard.pods = lambda namespace, pod: ("web", "fd00:0:0:0::0006")
    admit(guard, "web-6", 1, peer="ipv6:%5Bfd00::6%5D:443")  # the pod's own pool
    admit(guard, "web-6", 2, peer="ipv6:[fd00::7]:443")  # another address: unverified pool
    with pytest.raises(StreamRefused) as refused:
        admit(guard, "web-6", 3, peer="ipv6:[fd00::6]:444")
    assert "in pod web-6 (limit 1)" in refused.value.reason
