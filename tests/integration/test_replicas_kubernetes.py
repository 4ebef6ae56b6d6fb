"""Replicas in a cluster share one CA through a Secret (the fake API server stands in for the
Kubernetes API; the replicas are real `xds-server serve` processes).

Two replicas start with no CA Secret: exactly one root is created (by the Lease holder) and
both serve it. With an operator's plugged-in `cacerts` Secret, that CA wins over a generated
root. A change of the Secret reaches every replica through its watch.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest
from cryptography import x509

from tests.support.admin import CA, Tokens
from tests.support.fake_apiserver import FakeApiServer
from tests.support.replicas import Replica

pytestmark = pytest.mark.slow

LEASE_ARGS = ["--lease-namespace", "default", "--lease-duration", "3s",
              "--lease-renew-deadline", "2s", "--lease-retry-period", "0.5s"]


@pytest.fixture
def fake():
    with FakeApiServer(bookmark_interval=0.2) as server:
        server.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}})
        yield server


def start_replicas(fake: FakeApiServer, tmp_path: Path, count: int) -> tuple[list[Replica], Tokens]:
    tokens = Tokens()
    tokens_file = tmp_path / "admin-tokens.yaml"
    tokens_file.write_text(tokens.document())
    env = {**os.environ, "XDS_SERVER_ADMIN_TOKENS_FILE": str(tokens_file)}
    env.pop("XDS_SERVER_AUTH", None)
    replicas = []
    for i in range(count):
        kubeconfig = fake.kubeconfig(tmp_path / f"kubeconfig-{i}")
        replicas.append(Replica(f"replica-{i}", tmp_path, ["--kubeconfig", str(kubeconfig),
                                                             *LEASE_ARGS], env).start())
    return replicas, tokens


def bundle(replica: Replica, tokens: Tokens) -> str:
    import httpx

    answer = httpx.get(f"{replica.admin_url}/api/v1/ca/trust-bundle", headers=tokens.auth("read"),
                       timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.json()["pem"]


def test_two_replicas_without_a_ca_secret_create_exactly_one_root(fake: FakeApiServer,
                                                                  tmp_path: Path) -> None:
    replicas, tokens = start_replicas(fake, tmp_path, 2)
    try:
        for replica in replicas:
            replica.wait_ready()
        secrets = fake.list("Secret", "default")
        assert [s["metadata"]["name"] for s in secrets] == ["xds-server-ca"]
        root_pem = base64.b64decode(secrets[0]["data"]["root-cert.pem"]).decode()
        assert {bundle(r, tokens) for r in replicas} == {root_pem}
        assert len(x509.load_pem_x509_certificates(root_pem.encode())) == 1
        creators = [r.name for r in replicas
                    if any("created the CA Secret" in str(line.get("msg")) for line in r.logs())]
        assert len(creators) == 1, creators
        assert "token-signing-key.pem" in secrets[0]["data"]
    finally:
        for replica in replicas:
            replica.stop()


def test_a_plugged_in_cacerts_secret_wins_and_secret_changes_reach_every_replica(
        fake: FakeApiServer, tmp_path: Path) -> None:
    plugged = CA(tmp_path / "operator-ca")
    files = {name: base64.b64encode((tmp_path / "operator-ca" / name).read_bytes()).decode()
             for name in ("ca-cert.pem", "ca-key.pem", "root-cert.pem", "cert-chain.pem")}
    fake.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "cacerts", "namespace": "default"},
                 "data": files})
    replicas, tokens = start_replicas(fake, tmp_path, 2)
    try:
        for replica in replicas:
            replica.wait_ready()
        plugged_pem = plugged.authority.trust_bundle_pem.decode()
        assert {bundle(r, tokens) for r in replicas} == {plugged_pem}

        # An operator's edit of the shared Secret (here: another CA) reaches both replicas.
        other = CA(tmp_path / "next-ca")
        secret = fake.get("Secret", "default", "xds-server-ca")
        for name in ("ca-cert.pem", "ca-key.pem", "root-cert.pem", "cert-chain.pem"):
            secret["data"][name] = base64.b64encode((tmp_path / "next-ca" / name).read_bytes()).decode()
        fake.update(secret)
        wanted = other.authority.trust_bundle_pem.decode()
        import time

        deadline = time.monotonic() + 30
        while {bundle(r, tokens) for r in replicas} != {wanted}:
            assert time.monotonic() < deadline, "the Secret change did not reach every replica"
            time.sleep(0.2)
    finally:
        for replica in replicas:
            replica.stop()
