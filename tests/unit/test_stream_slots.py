"""The per-identity stream bound (CONFORMANCE rule 19) is per pod for a pod-bound credential
(issue 13): a leaked projected token can use up its own pod's streams, never its siblings'."""

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


def admit(guard: StreamGuard, pod: str, stream_id: int) -> Connection:
    conn = Connection(new_stream(Variant.DELTA, stream_id), "ipv4:10.0.0.1:1", "StreamAggregatedResources")
    claim = ProxyClaim(node_id=f"{pod}.shop", namespace="shop", service_account="web", pod=pod)
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
