"""Replicas that act as one: three real `xds-server serve` processes with one real Redis.

What an operator relies on: every replica serves the same trust bundle and signs with the one
root (exactly one replica created it); a workload token made through one replica (admin API or
`xds-server token create --redis-url`) is accepted by the others; a token revoked through one
replica closes the streams it opened on another at once (pub/sub, not the periodic check,
which these replicas run only every 10 minutes); Redis never holds a private key in clear.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import redis
from cryptography import x509
from google.protobuf import struct_pb2

from envoy.config.core.v3 import base_pb2

from tests.support.replicas import ROOT, Replicas
from tests.support.xds_client import StreamClosed, XdsClient, sotw_resources
from xds_server.xds import types

pytestmark = pytest.mark.slow


def node(namespace: str, service_account: str, pod: str) -> base_pb2.Node:
    metadata = struct_pb2.Struct()
    metadata.update({"namespace": namespace, "service_account": service_account, "pod": pod})
    return base_pb2.Node(id=f"{pod}.{namespace}", cluster=f"{service_account}.{namespace}",
                         metadata=metadata)


async def fetch_secrets(address: str, token: str, proxy: base_pb2.Node) -> dict:
    async with XdsClient(address, metadata=[("authorization", f"Bearer {token}")]) as client:
        stream = client.ads(node=proxy)
        await stream.request(types.SECRET, ["default", "ROOTCA"])
        got: dict = {}
        while not {"default", "ROOTCA"} <= set(got):
            response = await stream.recv(timeout=20)
            got.update(sotw_resources(response))
            await stream.ack(response)
        return got


@pytest.fixture
def replicas(tmp_path: Path):
    group = Replicas(tmp_path, 3, ["--revocation-check-interval", "600s"])
    try:
        group.start()
        yield group
    finally:
        group.stop()


async def test_replicas_share_one_ca_and_token_issuer(replicas: Replicas) -> None:
    r0, r1, r2 = replicas.members
    bundles = {r.name: replicas.admin(r, "GET", "/api/v1/ca/trust-bundle").json()["pem"]
               for r in replicas.members}
    assert len(set(bundles.values())) == 1, "every replica serves the same trust bundle"
    roots = x509.load_pem_x509_certificates(bundles[r0.name].encode())
    assert len(roots) == 1
    created = [r.name for r in replicas.members
               if any("created the shared CA" in str(line.get("msg")) for line in r.logs())]
    assert len(created) == 1, f"exactly one replica creates the root, got {created}"

    # Degraded or not, the admin API says where shared state stands.
    server = replicas.admin(r1, "GET", "/api/v1/server").json()
    assert server["shared_state"]["up"] is True and server["shared_state"]["replica"] == r1.name
    metrics = replicas.admin(r1, "GET", "/metrics").text
    assert "xds_server_redis_up 1.0" in metrics

    # A token made through replica 0 is accepted by replicas 1 and 2; both sign with the root.
    made = replicas.admin(r0, "POST", "/api/v1/tokens",
                          json={"namespace": "shop", "service_account": "web", "ttl": "1h"})
    assert made.status_code == 201, made.text
    token = made.json()["token"]
    for i, replica in enumerate((r1, r2)):
        secrets = await fetch_secrets(replica.xds_address, token, node("shop", "web", f"web-{i}"))
        leaf = x509.load_pem_x509_certificates(
            secrets["default"].tls_certificate.certificate_chain.inline_bytes)[0]
        leaf.verify_directly_issued_by(roots[0])
        assert secrets["ROOTCA"].validation_context.trusted_ca.inline_bytes.decode() == bundles[r0.name]

    # The CLI signs with the shared key too.
    cli = subprocess.run(
        [sys.executable, "-m", "xds_server.cli", "token", "create", "-n", "shop", "--sa", "db",
         "--ttl", "1h", "--ca-dir", str(replicas.directory / "cli-ca"), *replicas.shared_args],
        capture_output=True, text=True, cwd=ROOT, env=replicas.env, timeout=60)
    assert cli.returncode == 0, cli.stderr
    assert not (replicas.directory / "cli-ca").exists(), "the CLI wrote no key of its own"
    secrets = await fetch_secrets(r2.xds_address, cli.stdout.strip(), node("shop", "db", "db-0"))
    assert "default" in secrets

    # Nothing in Redis is a private key in clear.
    raw = redis.Redis.from_url(replicas.redis.url, password="replicas-redis-password")
    try:
        for key in raw.scan_iter():
            kind = raw.type(key)
            values = ([raw.get(key)] if kind == b"string" else
                      list(raw.hgetall(key).values()) if kind == b"hash" else [])
            for value in values:
                assert b"PRIVATE KEY" not in value and b"BEGIN" not in value, key
    finally:
        raw.close()


async def test_revocation_through_one_replica_closes_a_stream_on_another(replicas: Replicas) -> None:
    r0, _, r2 = replicas.members
    made = replicas.admin(r0, "POST", "/api/v1/tokens",
                          json={"namespace": "shop", "service_account": "web", "ttl": "1h"}).json()
    proxy = node("shop", "web", "web-7")
    async with XdsClient(r2.xds_address, metadata=[("authorization", f"Bearer {made['token']}")]) as client:
        stream = client.ads(node=proxy)
        await stream.request(types.SECRET, ["ROOTCA"])
        first = await stream.recv(timeout=20)
        await stream.ack(first)

        started = time.monotonic()
        revoked = await asyncio.to_thread(replicas.admin, r0, "DELETE", f"/api/v1/tokens/{made['token_id']}")
        assert revoked.status_code == 200 and revoked.json()["revoked"] is True
        code, details = await stream.closed_with(timeout=30)
        elapsed = time.monotonic() - started
        assert code == grpc.StatusCode.UNAUTHENTICATED and "revoked" in details
        # Not the periodic check (every 600 s here): the announcement closed it.
        print(f"stream on another replica closed {elapsed:.2f} s after the revocation")
        assert elapsed < 60

    # A new stream with the revoked token is refused on every replica.
    for replica in replicas.members:
        with pytest.raises(StreamClosed) as refused:
            await fetch_secrets(replica.xds_address, made["token"], node("shop", "web", "web-8"))
        assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED


STATIC_CLUSTER = """\
"@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
name: {name}
type: STATIC
connect_timeout: 1s
load_assignment:
  cluster_name: {name}
  endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 9}}}}}}}}]}}]
"""


def envoy_for(replica, token: str, directory: Path, pod: str):
    import yaml

    from tests.support.envoy import EnvoyProcess

    token_file = directory / f"{pod}.token"
    token_file.write_text(token)
    out = subprocess.run(
        [sys.executable, "-m", "xds_server.cli", "bootstrap", "--namespace", "shop",
         "--service-account", "web", "--pod", pod, "--pod-ip", "127.0.0.1",
         "--xds-address", replica.xds_address, "--admin-address", "127.0.0.1:0",
         "--interception", "explicit", "--token-file", str(token_file)],
        capture_output=True, text=True, cwd=ROOT, check=True, timeout=60)
    return EnvoyProcess(yaml.safe_load(out.stdout), name=pod)


async def test_redis_outage_is_not_an_outage(tmp_path: Path) -> None:
    resources = tmp_path / "resources"
    resources.mkdir()
    (resources / "first.yaml").write_text(STATIC_CLUSTER.format(name="first"))
    group = Replicas(tmp_path / "group", 2, ["--resources", str(resources),
                                             "--revocation-check-interval", "600s"])
    try:
        group.start()
        r0, r1 = group.members
        made = group.admin(r0, "POST", "/api/v1/tokens",
                           json={"namespace": "shop", "service_account": "web", "ttl": "1h"}).json()
        later = group.admin(r0, "POST", "/api/v1/tokens",
                            json={"namespace": "shop", "service_account": "web", "ttl": "1h"}).json()
        with envoy_for(r1, made["token"], tmp_path, "web-0") as envoy:
            envoy.wait_until(lambda: "first" in envoy.cluster_hosts(), timeout=60, message="first cluster")

            group.redis.stop()
            await eventually(lambda: group.admin(r1, "GET", "/api/v1/server").json()
                             ["shared_state"]["up"] is False)
            assert "xds_server_redis_up 0.0" in group.admin(r1, "GET", "/metrics").text
            ready = group.admin(r1, "GET", "/readyz")
            assert ready.status_code == 200, ready.text
            assert "degraded" in ready.json()["checks"]["shared_state"]["detail"]

            # Config keeps flowing: a new cluster reaches the Envoy while Redis is down.
            (resources / "second.yaml").write_text(STATIC_CLUSTER.format(name="second"))
            envoy.wait_until(lambda: "second" in envoy.cluster_hosts(), timeout=60, message="second cluster")

            # A revocation made now applies on its replica at once and reaches the other
            # when Redis returns.
            revoked = group.admin(r0, "DELETE", f"/api/v1/tokens/{later['token_id']}")
            assert revoked.status_code == 200
            assert group.admin(r0, "GET", "/api/v1/server").json()["shared_state"]["revocations_pending"] == 1

            group.redis.start()
            await eventually(lambda: all(group.admin(r, "GET", "/api/v1/server").json()
                                         ["shared_state"]["up"] for r in group.members))
            await eventually(lambda: group.admin(r0, "GET", "/api/v1/server").json()
                             ["shared_state"]["revocations_pending"] == 0)
            # The other replica learns it from the announcement, or at worst from its periodic
            # re-read (its subscription may come back after the announcement).
            deadline = time.monotonic() + 60
            while True:
                try:
                    await fetch_secrets(r1.xds_address, later["token"], node("shop", "web", "web-9"))
                except StreamClosed as refused:
                    assert refused.code == grpc.StatusCode.UNAUTHENTICATED
                    assert "revoked" in refused.details
                    break
                assert time.monotonic() < deadline, "the revocation never reached the other replica"
                await asyncio.sleep(0.5)
            # The Envoy kept its stream and config through all of it.
            assert {"first", "second"} <= set(envoy.cluster_hosts())
    finally:
        group.stop()


async def eventually(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if await asyncio.to_thread(predicate):
                return
        except Exception:
            pass
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.1)


async def test_status_answers_for_every_replica_and_a_killed_replica_drops_out(replicas: Replicas) -> None:
    import signal

    r0, _, r2 = replicas.members
    made = replicas.admin(r0, "POST", "/api/v1/tokens",
                          json={"namespace": "shop", "service_account": "web", "ttl": "1h"}).json()
    async with XdsClient(r2.xds_address, metadata=[("authorization", f"Bearer {made['token']}")]) as client:
        stream = client.ads(node=node("shop", "web", "web-3"))
        await stream.request(types.SECRET, ["ROOTCA"])
        await stream.ack(await stream.recv(timeout=20))

        def listed_on_r0() -> dict:
            answer = replicas.admin(r0, "GET", "/api/v1/proxies").json()
            return {p["id"]: p.get("replica") for p in answer["proxies"]}

        await eventually(lambda: listed_on_r0().get("web-3.shop") == "replica-2")
        # The operator CLI, asking replica 0, shows the proxy served by replica 2.
        shown = subprocess.run(
            [sys.executable, "-m", "xds_server.cli", "status", "--admin-address",
             f"127.0.0.1:{r0.admin_port}", "--token", replicas.tokens.read],
            capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert shown.returncode == 0 and "web-3.shop" in shown.stdout, shown.stdout + shown.stderr

        r2.stop(signal.SIGKILL)  # no goodbye: its entries expire
        await eventually(lambda: "web-3.shop" not in listed_on_r0())
        answer = replicas.admin(r0, "GET", "/api/v1/proxies").json()
        assert answer["replicas"] == ["replica-0", "replica-1"] and answer["complete"] is True
