"""The fake API server behaves as the Kubernetes API documents, as seen by the real client.

Each test drives the double with the official `kubernetes` client (typed APIs, `Watch`,
`CustomObjectsApi`) the way a controller would, and checks what the API concepts page
(https://kubernetes.io/docs/reference/using-api/api-concepts/) says a real server does. If the
double drifts from the real thing, tests of the source would pass against a lie: these keep
it honest.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import urllib3
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from tests.support.fake_apiserver import FakeApiServer, LabelSelector

pytestmark = pytest.mark.timeout(60)

GATEWAY = ("gateway.networking.k8s.io", "v1")
MESH = ("mesh.xds-server.io", "v1alpha1")


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeApiServer]:
    with FakeApiServer(bookmark_interval=0.1) as server:
        yield server


@pytest.fixture(scope="module")
def api(
    fake: FakeApiServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[client.ApiClient]:
    path = fake.kubeconfig(tmp_path_factory.mktemp("kube") / "config")
    api_client = config.new_client_from_config(str(path))
    api_client.configuration.retries = False
    yield api_client
    api_client.close()


@pytest.fixture
def ns(fake: FakeApiServer, request: pytest.FixtureRequest) -> str:
    """A fresh namespace per test (the server is shared by the module)."""
    name = request.node.name.replace("_", "-")[:50].strip("-").lower()
    fake.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    return name


def service(ns: str, name: str, labels: dict[str, str] | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
            "spec": {"ports": [{"port": 80}]}}


def policy(ns: str, name: str, **spec: object) -> dict:
    return {"apiVersion": "mesh.xds-server.io/v1alpha1", "kind": "TrafficPolicy",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"targetRef": {"kind": "Service", "name": "cart"}, **spec}}


def raw_get(api: client.ApiClient, path: str, **query: str) -> tuple[int, dict]:
    request = api.param_serialize("GET", path, query_params=list(query.items()),
                                  header_params={"Accept": "application/json"},
                                  auth_settings=["BearerToken"])
    response = api.call_api(*request)
    return response.status, json.loads(response.read())


def events(api_call, *args, **kwargs) -> list[tuple[str, str, str]]:
    """(type, name, resourceVersion) of every event until the watch's timeout ends it."""
    result = []
    for event in watch.Watch().stream(api_call, *args, **kwargs):
        meta = event["raw_object"].get("metadata", {})
        result.append((event["type"], meta.get("name", ""), meta.get("resourceVersion", "")))
    return result


# Lists ------------------------------------------------------------------------------------------


def test_a_list_has_a_resource_version_and_items_like_the_real_server(
    fake: FakeApiServer, api: client.ApiClient, ns: str
) -> None:
    fake.create(service(ns, "b"))
    fake.create(service(ns, "a"))
    fake.create(policy(ns, "p"))
    services = client.CoreV1Api(api).list_namespaced_service(ns)  # typed: it deserializes
    assert [s.metadata.name for s in services.items] == ["a", "b"]  # etcd key order
    assert int(services.metadata.resource_version) == fake.resource_version
    assert services.items[0].spec.ports[0].port == 80
    assert services.items[0].metadata.uid and services.items[0].metadata.creation_timestamp

    # Built-in items carry no kind/apiVersion on the wire; custom resources keep theirs.
    _, raw = raw_get(api, f"/api/v1/namespaces/{ns}/services")
    assert raw["kind"] == "ServiceList" and raw["apiVersion"] == "v1"
    assert "kind" not in raw["items"][0] and "apiVersion" not in raw["items"][0]
    policies = client.CustomObjectsApi(api).list_namespaced_custom_object(*MESH, ns,
                                                                          "trafficpolicies")
    assert policies["kind"] == "TrafficPolicyList"
    assert policies["items"][0]["kind"] == "TrafficPolicy"
    assert policies["items"][0]["metadata"]["generation"] == 1


def test_pages_are_one_consistent_snapshot(
    fake: FakeApiServer, api: client.ApiClient, ns: str
) -> None:
    for name in "abcde":
        fake.create(service(ns, name))
    core = client.CoreV1Api(api)
    first = core.list_namespaced_service(ns, limit=2)
    assert [s.metadata.name for s in first.items] == ["a", "b"]
    assert first.metadata.remaining_item_count == 3
    fake.create(service(ns, "c0"))  # created between pages: not part of this list
    fake.delete("Service", ns, "e")
    second = core.list_namespaced_service(ns, limit=2, _continue=first.metadata._continue)
    third = core.list_namespaced_service(ns, limit=2, _continue=second.metadata._continue)
    assert [s.metadata.name for s in second.items + third.items] == ["c", "d", "e"]
    assert third.metadata._continue is None
    assert third.metadata.resource_version == first.metadata.resource_version

    # A continue token from before a compaction has expired.
    page = core.list_namespaced_service(ns, limit=1)
    fake.create(service(ns, "f"))
    fake.compact()
    with pytest.raises(ApiException) as info:
        core.list_namespaced_service(ns, limit=1, _continue=page.metadata._continue)
    assert info.value.status == 410


def test_label_and_field_selectors_filter_lists(
    fake: FakeApiServer, api: client.ApiClient, ns: str
) -> None:
    fake.create(service(ns, "web", {"app": "web", "tier": "front"}))
    fake.create(service(ns, "db", {"app": "db", "tier": "back"}))
    fake.create(service(ns, "job", {"app": "job"}))
    core = client.CoreV1Api(api)

    def names(**kwargs: str) -> list[str]:
        return [s.metadata.name for s in core.list_namespaced_service(ns, **kwargs).items]

    assert names(label_selector="app=web") == ["web"]
    assert names(label_selector="tier!=front") == ["db", "job"]  # absent counts as not equal
    assert names(label_selector="app in (web, db),tier") == ["db", "web"]
    assert names(label_selector="app notin (web),!tier") == ["job"]
    assert names(field_selector="metadata.name=db") == ["db"]
    with pytest.raises(ApiException) as info:
        names(label_selector="app in ()")
    assert info.value.status == 400
    with pytest.raises(ApiException) as info:
        names(field_selector="spec.type=ClusterIP")
    assert info.value.status == 400


def test_label_selector_grammar() -> None:
    assert LabelSelector("").matches({})
    assert LabelSelector("a==1,b!=2").matches({"a": "1"})
    assert not LabelSelector("a").matches({"b": "1"})
    assert LabelSelector("x>5").matches({"x": "7"}) and not LabelSelector("x<5").matches({"x": "7"})
    assert LabelSelector("team in (a,b), env notin (prod)").matches({"team": "b", "env": "dev"})


# Watches ----------------------------------------------------------------------------------------


def test_a_watch_streams_every_change_after_its_resource_version(
    fake: FakeApiServer, api: client.ApiClient, ns: str
) -> None:
    core = client.CoreV1Api(api)
    start = core.list_namespaced_service(ns).metadata.resource_version
    created = fake.create(service(ns, "cart"))
    changed = fake.update({**service(ns, "cart"), "spec": {"ports": [{"port": 81}]}})
    deleted = fake.delete("Service", ns, "cart")
    seen = events(core.list_namespaced_service, ns, resource_version=start, timeout_seconds=1)
    assert seen == [
        ("ADDED", "cart", created["metadata"]["resourceVersion"]),
        ("MODIFIED", "cart", changed["metadata"]["resourceVersion"]),
        ("DELETED", "cart", deleted["metadata"]["resourceVersion"]),
    ]
    # Every write has its own, increasing resourceVersion; a delete has one too.
    versions = [int(rv) for _, _, rv in seen]
    assert versions == sorted(versions) and len(set(versions)) == 3


def test_a_watch_delivers_live_events_in_order(
    fake: FakeApiServer, api: client.ApiClient, ns: str
) -> None:
    core = client.CoreV1Api(api)
    start = core.list_namespaced_service(ns).metadata.resource_version

    def writer() -> None:
        fake.wait_for_watches(1, "Service")
        for i in range(20):
            fake.create(service(ns, f"s{i:02}"))

    thread = threading.Thread(target=writer)
    thread.start()
    seen = events(core.list_namespaced_service, ns, resource_version=start, timeout_seconds=2)
    thread.join()
    assert [name for _, name, _ in seen] == [f"s{i:02}" for i in range(20)]


def test_a_watch_without_resource_version_starts_with_the_current_state(
    fake: FakeApiServer, api: client.ApiClient, ns: str
) -> None:
    fake.create(service(ns, "a"))
    fake.create(service(ns, "b"))
    fake.delete("Service", ns, "a")
    for version in (None, "0"):  # unset: most recent; "0": any; both open with synthetic ADDs
        kwargs = {"timeout_seconds": 1}
        if version is not None:
            kwargs["resource_version"] = version
        seen = events(client.CoreV1Api(api).list_namespaced_service, ns, **kwargs)
        assert [(t, n) for t, n, _ in seen] == [("ADDED", "b")]


def test_bookmarks_come_only_when_asked_for(
    fake: FakeApiServer, api: client.ApiClient, ns: str
) -> None:
    core = client.CoreV1Api(api)
    start = core.list_namespaced_service(ns).metadata.resource_version
    fake.create({"apiVersion": "v1", "kind": "ConfigMap",
                 "metadata": {"name": "x", "namespace": ns}})
    with_bookmarks = events(core.list_namespaced_service, ns, resource_version=start,
                            allow_watch_bookmarks=True, timeout_seconds=1)
    assert with_bookmarks and {t for t, _, _ in with_bookmarks} == {"BOOKMARK"}
    # A bookmark's resourceVersion moves past writes to other kinds: resuming from it is safe.
    assert int(with_bookmarks[-1][2]) >= fake.resource_version > int(start)
    without = events(core.list_namespaced_service, ns, resource_version=start, timeout_seconds=1)
    assert without == []


def test_a_compacted_resource_version_gets_410_gone(
    fake: FakeApiServer, api: client.ApiClient, ns: str
) -> None:
    core = client.CoreV1Api(api)
    old = core.list_namespaced_service(ns).metadata.resource_version
    fake.create(service(ns, "a"))
    fake.compact()
    with pytest.raises(ApiException) as info:
        events(core.list_namespaced_service, ns, resource_version=old, timeout_seconds=1)
    assert info.value.status == 410 and "too old resource version" in info.value.reason
    # On the wire: HTTP 200 and one ERROR event holding a Status, as the real server sends.
    request = api.param_serialize(
        "GET", f"/api/v1/namespaces/{ns}/services",
        query_params=[("watch", "true"), ("resourceVersion", old)],
        auth_settings=["BearerToken"])
    response = api.call_api(*request)
    assert response.status == 200
    [line] = response.read().decode().splitlines()
    event = json.loads(line)
    assert event["type"] == "ERROR"
    assert event["object"]["kind"] == "Status" and event["object"]["code"] == 410
    assert event["object"]["reason"] == "Expired"
    # A watch from the current resourceVersion is fine.
    now = core.list_namespaced_service(ns).metadata.resource_version
    assert events(core.list_namespaced_service, ns, resource_version=now, timeout_seconds=1) == []


def test_timeout_seconds_ends_a_watch_cleanly(
    fake: FakeApiServer, api: client.ApiClient, ns: str
) -> None:
    started = time.monotonic()
    assert events(client.CoreV1Api(api).list_namespaced_service, ns,
                  resource_version=str(fake.resource_version), timeout_seconds=1) == []
    assert 0.9 < time.monotonic() - started < 5


def test_objects_moving_in_and_out_of_a_selector_are_added_and_deleted(
    fake: FakeApiServer, api: client.ApiClient, ns: str
) -> None:
    core = client.CoreV1Api(api)
    fake.create(service(ns, "s", {"mesh": "off"}))
    start = core.list_namespaced_service(ns).metadata.resource_version
    fake.update(service(ns, "s", {"mesh": "on"}))
    fake.update(service(ns, "s", {"mesh": "on", "x": "1"}))
    fake.update(service(ns, "s", {"mesh": "off"}))
    seen = events(core.list_namespaced_service, ns, resource_version=start,
                  label_selector="mesh=on", timeout_seconds=1)
    assert [t for t, _, _ in seen] == ["ADDED", "MODIFIED", "DELETED"]


def test_a_dropped_connection_breaks_a_watch_mid_stream(
    fake: FakeApiServer, api: client.ApiClient, ns: str
) -> None:
    core = client.CoreV1Api(api)
    start = core.list_namespaced_service(ns).metadata.resource_version
    fake.create(service(ns, "before"))

    def dropper() -> None:
        fake.wait_for_watches(1, "Service")
        time.sleep(0.2)
        fake.drop_connections()

    thread = threading.Thread(target=dropper)
    thread.start()
    seen = []
    with pytest.raises(urllib3.exceptions.ProtocolError):
        for event in watch.Watch().stream(core.list_namespaced_service, ns,
                                          resource_version=start, timeout_seconds=30):
            seen.append(event["object"].metadata.name)
    thread.join()
    assert seen == ["before"]


def test_a_server_that_is_down_refuses_connections_and_keeps_its_state(
    fake: FakeApiServer, api: client.ApiClient, ns: str
) -> None:
    fake.create(service(ns, "kept"))
    with fake.down():
        with socket.socket() as sock:
            sock.settimeout(2)
            assert sock.connect_ex(("127.0.0.1", fake.port)) != 0
        with pytest.raises(urllib3.exceptions.HTTPError):
            client.CoreV1Api(api).list_namespaced_service(ns, _request_timeout=2)
        fake.create(service(ns, "while-down"))  # the cluster goes on without its API server
    names = [s.metadata.name for s in client.CoreV1Api(api).list_namespaced_service(ns).items]
    assert names == ["kept", "while-down"]


def test_latency_and_injected_errors(fake: FakeApiServer, api: client.ApiClient, ns: str) -> None:
    core = client.CoreV1Api(api)
    fake.latency = 0.3
    try:
        started = time.monotonic()
        core.list_namespaced_service(ns)
        assert time.monotonic() - started >= 0.3
    finally:
        fake.latency = 0
    fake.fail(503, path=f"/namespaces/{ns}/services", times=2)
    for _ in range(2):
        with pytest.raises(ApiException) as info:
            core.list_namespaced_service(ns)
        assert info.value.status == 503
        assert json.loads(info.value.body)["kind"] == "Status"
    core.list_namespaced_service(ns)  # the fault was used up


# Writes -----------------------------------------------------------------------------------------


def test_writes_follow_optimistic_concurrency(
    fake: FakeApiServer, api: client.ApiClient, ns: str
) -> None:
    core = client.CoreV1Api(api)
    created = core.create_namespaced_service(ns, client.V1Service(
        metadata=client.V1ObjectMeta(name="cart"),
        spec=client.V1ServiceSpec(ports=[client.V1ServicePort(port=80)])))
    with pytest.raises(ApiException) as info:
        core.create_namespaced_service(
            ns, client.V1Service(metadata=client.V1ObjectMeta(name="cart")))
    assert info.value.status == 409 and json.loads(info.value.body)["reason"] == "AlreadyExists"

    fake.update(service(ns, "cart"))  # somebody else writes
    created.spec.ports[0].port = 81
    with pytest.raises(ApiException) as info:
        core.replace_namespaced_service("cart", ns, created)  # stale resourceVersion
    assert info.value.status == 409 and json.loads(info.value.body)["reason"] == "Conflict"

    current = core.read_namespaced_service("cart", ns)
    current.spec.ports[0].port = 81
    replaced = core.replace_namespaced_service("cart", ns, current)
    assert replaced.spec.ports[0].port == 81
    assert int(replaced.metadata.resource_version) > int(current.metadata.resource_version)
    assert replaced.metadata.uid == created.metadata.uid

    # A write that changes nothing stores nothing and keeps the resourceVersion.
    again = core.replace_namespaced_service("cart", ns, replaced)
    assert again.metadata.resource_version == replaced.metadata.resource_version

    with pytest.raises(ApiException) as info:
        core.read_namespaced_service("nope", ns)
    assert info.value.status == 404 and json.loads(info.value.body)["reason"] == "NotFound"
    with pytest.raises(ApiException) as info:
        core.create_namespaced_service("no-such-namespace", client.V1Service(
            metadata=client.V1ObjectMeta(name="x")))
    assert info.value.status == 404


def test_custom_resources_need_a_resource_version_and_count_generations(
    fake: FakeApiServer, api: client.ApiClient, ns: str
) -> None:
    custom = client.CustomObjectsApi(api)
    created = custom.create_namespaced_custom_object(*MESH, ns, "trafficpolicies",
                                                     policy(ns, "p", timeout="1s"))
    assert created["metadata"]["generation"] == 1
    body = policy(ns, "p", timeout="2s")  # no resourceVersion: rejected for custom resources
    with pytest.raises(ApiException) as info:
        custom.replace_namespaced_custom_object(*MESH, ns, "trafficpolicies", "p", body)
    assert info.value.status == 422
    body["metadata"]["resourceVersion"] = created["metadata"]["resourceVersion"]
    updated = custom.replace_namespaced_custom_object(*MESH, ns, "trafficpolicies", "p", body)
    assert updated["metadata"]["generation"] == 2

    # Labels are metadata: no new generation.
    updated["metadata"]["labels"] = {"team": "cart"}
    relabelled = custom.replace_namespaced_custom_object(*MESH, ns, "trafficpolicies", "p", updated)
    assert relabelled["metadata"]["generation"] == 2


def test_the_status_subresource_changes_status_and_nothing_else(
    fake: FakeApiServer, api: client.ApiClient, ns: str
) -> None:
    custom = client.CustomObjectsApi(api)
    created = custom.create_namespaced_custom_object(
        *MESH, ns, "trafficpolicies", {**policy(ns, "p"), "status": {"ignored": True}})
    assert "status" not in created  # status is not set through create

    condition = {"type": "Accepted", "status": "True", "reason": "Accepted", "message": "",
                 "lastTransitionTime": "2024-01-01T00:00:00Z"}
    body = dict(created, status={"conditions": [condition]})
    body["spec"] = {"targetRef": {"kind": "Service", "name": "other"}}  # ignored on /status
    written = custom.replace_namespaced_custom_object_status(*MESH, ns, "trafficpolicies", "p",
                                                             body)
    assert written["status"]["conditions"] == [condition]
    assert written["spec"]["targetRef"]["name"] == "cart"
    assert written["metadata"]["generation"] == 1

    # A stale resourceVersion on /status conflicts too.
    with pytest.raises(ApiException) as info:
        custom.replace_namespaced_custom_object_status(*MESH, ns, "trafficpolicies", "p", body)
    assert info.value.status == 409

    # The main resource cannot change status.
    main = dict(written, status={"conditions": []})
    kept = custom.replace_namespaced_custom_object(*MESH, ns, "trafficpolicies", "p", main)
    assert kept["status"]["conditions"] == [condition]

    # JSON merge patch on /status; other patch types are refused, not misapplied.
    patched = custom.patch_namespaced_custom_object_status(
        *MESH, ns, "trafficpolicies", "p", {"status": {"note": "hi"}},
        _content_type="application/merge-patch+json")
    assert patched["status"] == {"conditions": [condition], "note": "hi"}
    with pytest.raises(ApiException) as info:
        custom.patch_namespaced_custom_object_status(
            *MESH, ns, "trafficpolicies", "p", {"status": {}},
            _content_type="application/strategic-merge-patch+json")
    assert info.value.status == 415


def test_deleting_a_namespace_deletes_what_is_in_it(
    fake: FakeApiServer, api: client.ApiClient
) -> None:
    fake.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "doomed"}})
    fake.create(service("doomed", "a"))
    start = str(fake.resource_version)
    client.CoreV1Api(api).delete_namespace("doomed")
    seen = events(client.CoreV1Api(api).list_service_for_all_namespaces,
                  resource_version=start, timeout_seconds=1)
    assert [(t, n) for t, n, _ in seen] == [("DELETED", "a")]
    assert fake.get("Namespace", None, "doomed") is None


# Leases, TokenReview, authentication, discovery ---------------------------------------------------


def test_leases_through_the_coordination_api(
    fake: FakeApiServer, api: client.ApiClient, ns: str
) -> None:
    leases = client.CoordinationV1Api(api)
    now = "2024-01-01T00:00:00.000000Z"
    created = leases.create_namespaced_lease(ns, client.V1Lease(
        metadata=client.V1ObjectMeta(name="leader"),
        spec=client.V1LeaseSpec(holder_identity="a", lease_duration_seconds=15,
                                renew_time=now, acquire_time=now)))
    assert created.spec.holder_identity == "a"
    created.spec.holder_identity = "b"
    taken = leases.replace_namespaced_lease("leader", ns, created)
    assert leases.read_namespaced_lease("leader", ns).spec.holder_identity == "b"
    created.spec.holder_identity = "c"  # based on the old version: loses
    with pytest.raises(ApiException) as info:
        leases.replace_namespaced_lease("leader", ns, created)
    assert info.value.status == 409
    taken.spec.lease_duration_seconds = 0
    with pytest.raises(ApiException) as info:
        leases.replace_namespaced_lease("leader", ns, taken)
    assert info.value.status == 422


def test_token_review_through_the_authentication_api(
    fake: FakeApiServer, api: client.ApiClient
) -> None:
    fake.register_token("sa-token", "system:serviceaccount:shop:cart",
                        groups=("system:serviceaccounts",), audiences=("xds", "vault"))
    reviews = client.AuthenticationV1Api(api)

    def review(token: str, audiences: list[str] | None = None) -> client.V1TokenReviewStatus:
        return reviews.create_token_review(client.V1TokenReview(
            spec=client.V1TokenReviewSpec(token=token, audiences=audiences))).status

    ok = review("sa-token", ["xds"])
    assert ok.authenticated and ok.user.username == "system:serviceaccount:shop:cart"
    assert ok.audiences == ["xds"] and ok.user.groups == ["system:serviceaccounts"]
    assert not review("sa-token", ["other"]).authenticated
    assert not review("sa-token").authenticated  # the API server's own audience: not minted for it
    bad = review("forged")
    assert not bad.authenticated and bad.error
    fake.revoke_token("sa-token")
    assert not review("sa-token", ["xds"]).authenticated


def test_requests_without_a_known_bearer_token_are_unauthorized(
    fake: FakeApiServer, tmp_path: Path
) -> None:
    path = fake.kubeconfig(tmp_path / "config", token="not-a-user")
    api_client = config.new_client_from_config(str(path))
    try:
        with pytest.raises(ApiException) as info:
            client.CoreV1Api(api_client).list_namespace()
        assert info.value.status == 401
    finally:
        api_client.close()
    # The in-cluster loader sends "bearer <token>": the scheme is case-insensitive.
    fake.add_user("pod", token="lower-case")
    manager = urllib3.PoolManager(ca_cert_data=fake.ca_pem.decode())
    response = manager.request("GET", f"{fake.url}/api/v1/namespaces",
                               headers={"Authorization": "bearer lower-case"})
    assert response.status == 200


def test_discovery_names_the_served_kinds(api: client.ApiClient) -> None:
    groups = client.ApisApi(api).get_api_versions()
    names = {g.name for g in groups.groups}
    assert {"gateway.networking.k8s.io", "mesh.xds-server.io", "coordination.k8s.io"} <= names
    resources = client.CustomObjectsApi(api).get_api_resources(*MESH)
    assert {r.name for r in resources.resources} == {
        f"{plural}{sub}" for plural in ("trafficpolicies", "mtlspolicies", "authorizationpolicies")
        for sub in ("", "/status")
    }
    assert client.VersionApi(api).get_code().git_version.endswith("-fake")


def test_the_kubeconfig_pins_the_servers_certificate(fake: FakeApiServer, tmp_path: Path) -> None:
    path = fake.kubeconfig(tmp_path / "config")
    cluster = __import__("yaml").safe_load(path.read_text())["clusters"][0]["cluster"]
    assert cluster["server"].startswith("https://127.0.0.1:")
    assert b"BEGIN CERTIFICATE" in base64.b64decode(cluster["certificate-authority-data"])
    with pytest.raises(urllib3.exceptions.SSLError):  # not a publicly trusted certificate
        urllib3.PoolManager(retries=False).request("GET", f"{fake.url}/version")
