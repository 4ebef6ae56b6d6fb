"""`--source DIR`: the mesh from Kubernetes-shaped files, per-object last good, hot reload."""

from __future__ import annotations

import asyncio
import json
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from xds_server.model.store import (
    ENDPOINT_SLICE,
    HTTP_ROUTE,
    KINDS,
    NAMESPACE,
    POD,
    SERVICE,
    TRAFFIC_POLICY,
    MeshStore,
)
from xds_server.sources.k8s_objects import convert
from xds_server.sources.reading import MAX_FILE_BYTES
from xds_server.sources.mesh_files import MeshDirectory, MeshError
from xds_server.sources.validate import format_errors, has_errors, validate_directory

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "mesh-basic"


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))


def service(name: str, port: int = 80, namespace: str | None = None) -> str:
    ns = f"\n  namespace: {namespace}" if namespace else ""
    return f"""\
apiVersion: v1
kind: Service
metadata:
  name: {name}{ns}
spec:
  ports:
    - name: http
      port: {port}
"""


def ports_of(store: MeshStore, name: str, namespace: str = "default") -> list[int]:
    return [p.port for p in store.get(SERVICE, namespace, name).ports]


def names(store: MeshStore, kind: str) -> set[str]:
    return {name for _, name in store.all(kind)}


POLICY = """\
apiVersion: mesh.xds-server.io/v1alpha1
kind: TrafficPolicy
metadata:
  name: api-resilience
spec:
  targetRef:
    name: api
  retries:
    attempts: 3
    perTryTimeout: {timeout}
"""


# The example --------------------------------------------------------------------------------


def test_the_example_mesh_loads_without_errors() -> None:
    store = MeshStore()
    assert MeshDirectory(EXAMPLE, store).load() == []
    assert validate_directory(EXAMPLE) == []
    assert names(store, NAMESPACE) == {"shop", "payments"}
    assert {"web", "api", "api-v1", "api-v2", "payments", "ledger-db"} <= names(store, SERVICE)
    assert len(store.all(ENDPOINT_SLICE)) >= 4
    assert any(w.meshed for w in store.all(POD).values())
    route = store.get(HTTP_ROUTE, "shop", "api-canary")
    assert [b.weight for b in route.rules[0].backends] == [90, 10]
    assert route.rules[0].retry is not None
    assert len(store.all("GRPCRoute")) == 1 and len(store.all(TRAFFIC_POLICY)) == 1


# Loading --------------------------------------------------------------------------------------


def test_loads_documents_lists_and_json_recursively(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", service("a") + "---\n" + service("b", namespace="shop") + "---\n")
    listing = {
        "apiVersion": "v1",
        "kind": "List",
        "items": [
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}},
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "c"}, "spec": {}},
        ],
    }
    write(tmp_path / "nested" / "deeper" / "list.json", json.dumps(listing, indent=2))
    write(tmp_path / "more.yml", service("d"))
    # Editor droppings, hidden files and ConfigMap mount internals are not mesh files.
    for ignored in (".hidden.yaml", "a.yaml~", ".a.yaml.swp", "#a.yaml#", "..data/x.yaml", "x.txt"):
        write(tmp_path / ignored, service("ignored"))
    store = MeshStore()
    assert MeshDirectory(tmp_path, store).load() == []
    assert set(store.all(SERVICE)) == {
        ("default", "a"), ("shop", "b"), ("default", "c"), ("default", "d")
    }
    assert names(store, NAMESPACE) == {"shop"}
    assert store.synced("files")


def test_error_names_file_line_object_and_field(tmp_path: Path) -> None:
    write(tmp_path / "mesh" / "api.yaml", service("api") + "---\n" + POLICY.format(timeout="25xs"))
    directory = MeshDirectory(tmp_path, MeshStore())
    [error] = directory.load()
    assert error == MeshError(
        file="mesh/api.yaml",
        line=19,  # the perTryTimeout line
        kind="TrafficPolicy",
        namespace="default",
        name="api-resilience",
        field="spec.retries.perTryTimeout",
        message="invalid duration '25xs': expected e.g. '2s', '150ms', '1m30s'",
    )
    assert str(error) == (
        "mesh/api.yaml:19: TrafficPolicy default/api-resilience: spec.retries.perTryTimeout: "
        "invalid duration '25xs': expected e.g. '2s', '150ms', '1m30s'"
    )
    assert directory.errors == [error]


def test_missing_fields_point_at_the_nearest_line(tmp_path: Path) -> None:
    write(tmp_path / "s.yaml", """
        apiVersion: discovery.k8s.io/v1
        kind: EndpointSlice
        metadata:
          name: api-1
          labels: {app: api}
        endpoints:
          - addresses: [10.0.0.1]
          - addresses: []
    """)
    [error] = MeshDirectory(tmp_path, MeshStore()).load()
    assert (error.line, error.field) == (5, "metadata.labels[kubernetes.io/service-name]")
    assert str(error) == (
        "s.yaml:5: EndpointSlice default/api-1: metadata.labels[kubernetes.io/service-name]: "
        "required: the name of the Service this slice belongs to"
    )


def test_json_errors_have_lines(tmp_path: Path) -> None:
    data = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a"},
            "spec": {"ports": [{"port": 80}, {"port": "http"}]}}
    write(tmp_path / "a.json", json.dumps(data, indent=2))
    [error] = MeshDirectory(tmp_path, MeshStore()).load()
    assert (error.line, error.field) == (13, "spec.ports[1].port")


def test_unknown_kinds_warn_without_blocking_anything(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", """
        apiVersion: apps/v1
        kind: Deployment
        metadata: {name: web, namespace: shop}
        ---
        apiVersion: v1
        kind: Service
        metadata: {name: web, namespace: shop}
    """)
    store = MeshStore()
    [warning] = MeshDirectory(tmp_path, store).load()
    assert warning.severity == "warning" and warning.line == 2  # the kind: line
    assert str(warning) == (
        "a.yaml:2: warning: Deployment shop/web: kind: apps/v1 Deployment is not read by the mesh;"
        " skipped"
    )
    assert names(store, SERVICE) == {"web"}
    assert not has_errors([warning])


# Last good, per object ------------------------------------------------------------------------


def test_a_bad_edit_keeps_that_objects_last_good_version_only(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", service("api", 80) + "---\n" + POLICY.format(timeout="1s"))
    write(tmp_path / "b.yaml", service("web", 80))
    store = MeshStore()
    directory = MeshDirectory(tmp_path, store)
    assert directory.load() == []

    # Same file: the policy breaks, the service next to it changes; another file changes too.
    write(tmp_path / "a.yaml", service("api", 81) + "---\n" + POLICY.format(timeout="oops"))
    write(tmp_path / "b.yaml", service("web", 82))
    [error] = directory.load()
    assert (error.file, error.name, error.field) == (
        "a.yaml", "api-resilience", "spec.retries.perTryTimeout"
    )
    policy = store.get(TRAFFIC_POLICY, "default", "api-resilience")
    assert policy.spec.retries.per_try_timeout == 1.0  # the last good version
    assert ports_of(store, "api") == [81] and ports_of(store, "web") == [82]

    write(tmp_path / "a.yaml", service("api", 81) + "---\n" + POLICY.format(timeout="2s"))
    assert directory.load() == []
    assert store.get(TRAFFIC_POLICY, "default", "api-resilience").spec.retries.per_try_timeout == 2


def test_an_object_that_was_never_valid_is_not_served(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", POLICY.format(timeout="oops"))
    store = MeshStore()
    assert len(MeshDirectory(tmp_path, store).load()) == 1
    assert store.all(TRAFFIC_POLICY) == {}


def test_unparseable_file_keeps_all_it_gave(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", service("api") + "---\n" + service("web"))
    store = MeshStore()
    directory = MeshDirectory(tmp_path, store)
    directory.load()
    write(tmp_path / "a.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: [\n")
    [error] = directory.load()
    assert error.file == "a.yaml" and error.line == 4 and "invalid YAML" in error.message
    assert names(store, SERVICE) == {"api", "web"}


def test_removed_objects_and_deleted_files_disappear(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", service("api") + "---\n" + service("web"))
    write(tmp_path / "b.yaml", service("db"))
    store = MeshStore()
    directory = MeshDirectory(tmp_path, store)
    directory.load()
    write(tmp_path / "a.yaml", service("api"))
    (tmp_path / "b.yaml").unlink()
    assert directory.load() == []
    assert names(store, SERVICE) == {"api"}


def test_an_object_can_move_between_files(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", service("api", 80))
    store = MeshStore()
    directory = MeshDirectory(tmp_path, store)
    directory.load()
    (tmp_path / "a.yaml").unlink()
    write(tmp_path / "b.yaml", service("api", 81))
    assert directory.load() == []
    assert ports_of(store, "api") == [81]


# Duplicates -----------------------------------------------------------------------------------


def test_duplicates_are_reported_and_the_first_is_kept(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", service("api", 80))
    write(tmp_path / "b.yaml", service("other") + "---\n" + service("api", 81))
    store = MeshStore()
    [error] = MeshDirectory(tmp_path, store).load()
    assert str(error) == (
        "b.yaml:10: Service default/api: duplicate: also defined at a.yaml:1, which is used"
    )
    assert ports_of(store, "api") == [80]


def test_a_new_conflicting_file_never_displaces_what_serves(tmp_path: Path) -> None:
    write(tmp_path / "m.yaml", service("api", 80))
    store = MeshStore()
    directory = MeshDirectory(tmp_path, store)
    directory.load()
    write(tmp_path / "a.yaml", service("api", 81))  # sorts first, but came later
    [error] = directory.load()
    assert (error.file, error.line) == ("a.yaml", 1)
    assert "also defined at m.yaml:1" in error.message
    assert ports_of(store, "api") == [80]


def test_duplicates_in_one_file(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", service("api", 80) + "---\n" + service("api", 81))
    store = MeshStore()
    [error] = MeshDirectory(tmp_path, store).load()
    assert (error.line, error.message) == (
        10, "duplicate: also defined in this file at a.yaml:1, which is used"
    )
    assert ports_of(store, "api") == [80]


def test_other_sources_objects_are_left_alone(tmp_path: Path) -> None:
    store = MeshStore()
    directory = MeshDirectory(tmp_path, store, source_name="files")
    write(tmp_path / "a.yaml", service("api"))
    store.put("admin", convert(yaml.safe_load(service("web"))))
    directory.load()
    (tmp_path / "a.yaml").unlink()
    directory.load()
    assert names(store, SERVICE) == {"web"}


# validate -------------------------------------------------------------------------------------


def test_validate_lists_every_error_with_file_and_line(tmp_path: Path, monkeypatch) -> None:
    mesh = tmp_path / "mesh"
    write(mesh / "api.yaml", service("api") + "---\n" + POLICY.format(timeout="25xs"))
    write(mesh / "routes" / "r.yaml", """
        apiVersion: gateway.networking.k8s.io/v1
        kind: HTTPRoute
        metadata: {name: r}
        spec:
          parentRefs: [{group: "", kind: Service, name: api}]
          rules:
            - backendRefs:
                - name: api
                  weight: -1
    """)
    write(mesh / "broken.yaml", "a: [")
    write(mesh / "dup.yaml", service("api"))
    write(mesh / "cm.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    monkeypatch.chdir(tmp_path)
    errors = validate_directory("mesh")
    assert [(e.file, e.line, e.severity) for e in errors] == [
        ("mesh/api.yaml", 1, "warning"),  # no clusterIP: reached by pod IP only in capture mode
        ("mesh/api.yaml", 19, "error"),
        ("mesh/broken.yaml", 2, "error"),
        ("mesh/cm.yaml", 2, "warning"),
        ("mesh/dup.yaml", 1, "error"),
        ("mesh/routes/r.yaml", 9, "error"),
    ]
    assert errors[-1].field == "spec.rules[0].backendRefs[0].weight"
    assert has_errors(errors)
    assert errors[0].field == "spec.clusterIP"
    text = format_errors(errors)
    assert text.splitlines()[1] == (
        "mesh/api.yaml:19: TrafficPolicy default/api-resilience: spec.retries.perTryTimeout: "
        "invalid duration '25xs': expected e.g. '2s', '150ms', '1m30s'"
    )
    assert text.splitlines()[-1] == "4 errors, 2 warnings in 5 files"
    assert format_errors([]) == "no problems found"


def test_validate_a_single_file_or_a_missing_path(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", POLICY.format(timeout="1s"))
    assert validate_directory(tmp_path / "a.yaml") == []
    [error] = validate_directory(tmp_path / "nope")
    assert "no such file or directory" in str(error)


# Hot reload -----------------------------------------------------------------------------------


async def eventually(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_run_hot_reloads_edits_keeps_last_good_and_stops(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", service("api", 80) + "---\n" + POLICY.format(timeout="1s"))
    store = MeshStore()
    directory = MeshDirectory(tmp_path, store)
    directory.load()
    stop = asyncio.Event()
    task = asyncio.create_task(directory.run(stop))
    try:
        await asyncio.sleep(0.3)  # let the watcher start; the test polls, never waits fixed times
        write(tmp_path / "sub" / "b.yaml", service("web"))
        await eventually(lambda: store.get(SERVICE, "default", "web") is not None)

        write(tmp_path / "a.yaml", service("api", 81) + "---\n" + POLICY.format(timeout="bad"))
        expected = ["spec.retries.perTryTimeout"]
        await eventually(lambda: [e.field for e in directory.errors] == expected)
        assert ports_of(store, "api") == [81]
        policy = store.get(TRAFFIC_POLICY, "default", "api-resilience")
        assert policy.spec.retries.per_try_timeout == 1.0

        (tmp_path / "sub" / "b.yaml").unlink()
        await eventually(lambda: store.get(SERVICE, "default", "web") is None)
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=5)
    assert task.done() and task.exception() is None


async def test_an_edit_rereads_only_the_file_that_changed(tmp_path: Path) -> None:
    files = [f"svc-{i:02}.yaml" for i in range(40)]
    for i, file in enumerate(files):
        write(tmp_path / file, service(f"svc-{i:02}", 80))
    store = MeshStore()
    directory = MeshDirectory(tmp_path, store)
    assert directory.load() == []
    stop = asyncio.Event()
    task = asyncio.create_task(directory.run(stop))
    try:
        # The watcher's first pass rescans everything once (a change may have landed between
        # load() and the watch); after that, edits are read one file at a time.
        await eventually(lambda: all(directory.reads[f] >= 2 for f in files))
        before = dict(directory.reads)

        write(tmp_path / "svc-07.yaml", service("svc-07", 81))
        await eventually(lambda: ports_of(store, "svc-07") == [81])
        assert {f for f in files if directory.reads[f] > before[f]} == {"svc-07.yaml"}

        before = dict(directory.reads)
        (tmp_path / "svc-12.yaml").unlink()
        await eventually(lambda: store.get(SERVICE, "default", "svc-12") is None)
        assert names(store, SERVICE) == {f"svc-{i:02}" for i in range(40)} - {"svc-12"}
        assert {f for f in files if directory.reads[f] > before[f]} == set()
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=5)


async def test_run_keeps_everything_when_the_directory_vanishes(tmp_path: Path) -> None:
    root = tmp_path / "mesh"
    write(root / "a.yaml", service("api"))
    store = MeshStore()
    directory = MeshDirectory(root, store)
    stop = asyncio.Event()
    task = asyncio.create_task(directory.run(stop))
    try:
        await eventually(lambda: names(store, SERVICE) == {"api"})
        (root / "a.yaml").unlink()
        root.rmdir()
        await eventually(lambda: bool(directory.errors))
        assert names(store, SERVICE) == {"api"}  # a vanished directory is not an empty one

        write(root / "b.yaml", service("web"))
        await eventually(lambda: names(store, SERVICE) == {"web"})
        assert directory.errors == []
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=5)


async def test_run_can_be_cancelled(tmp_path: Path) -> None:
    task = asyncio.create_task(MeshDirectory(tmp_path, MeshStore()).run())
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout=5)


def test_every_kind_is_known_to_the_store() -> None:
    # The files source relies on the store's kinds being the kinds users write.
    assert {"Namespace", "Service", "EndpointSlice", "Pod", "HTTPRoute", "GRPCRoute",
            "TrafficPolicy", "MTLSPolicy", "AuthorizationPolicy", "NetworkPolicy"} == set(KINDS)


def test_links_out_of_the_directory_and_oversized_files_are_reported_not_read(tmp_path: Path) -> None:
    source, outside = tmp_path / "mesh", tmp_path / "elsewhere"
    write(source / "a.yaml", service("a"))
    write(outside / "secret.yaml", service("stolen"))
    (source / "link.yaml").symlink_to(outside / "secret.yaml")
    # A ConfigMap mount's links stay inside the directory: read as usual.
    write(source / "..2024_01" / "b.yaml", service("b"))
    (source / "..data").symlink_to(source / "..2024_01")
    (source / "b.yaml").symlink_to(source / "..data" / "b.yaml")
    huge = source / "huge.yaml"
    with huge.open("wb") as handle:  # sparse: no disk used, but larger than the limit
        handle.truncate(MAX_FILE_BYTES + 1)
    store = MeshStore()
    errors = MeshDirectory(source, store).load()
    assert names(store, SERVICE) == {"a", "b"}
    by_file = {e.file: e.message for e in errors}
    assert "out of the source directory" in by_file["link.yaml"]
    assert "limit" in by_file["huge.yaml"]


def test_validate_warns_of_a_service_without_a_cluster_ip_but_not_a_headless_one(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", service("api") + "---\n" + service("db").replace(
        "spec:\n", "spec:\n  clusterIP: None\n") + "---\n" + service("web").replace(
        "spec:\n", "spec:\n  clusterIP: 10.96.0.7\n"))
    [warning] = validate_directory(tmp_path)
    assert (warning.name, warning.field, warning.severity) == ("api", "spec.clusterIP", "warning")
    assert "pod IP only" in warning.message
    assert not has_errors([warning])  # the service still works: a warning, not an error
