"""`--resources DIR`: raw Envoy resources from YAML/JSON files, validated and hot-reloaded."""

from __future__ import annotations

import asyncio
import json
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from google.protobuf import json_format

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from xds_server.sources.resource_files import ResourceDirectory, ResourceError, load_file
from xds_server.sources.reading import MAX_FILE_BYTES
from xds_server.translate.raw import RawResources
from xds_server.xds.cache import ResourceCache
from xds_server.xds.types import CLUSTER, ENDPOINT, LISTENER, ROUTE

T = "type.googleapis.com/"

LISTENER_DOC = {
    "@type": T + "envoy.config.listener.v3.Listener",
    "name": "outbound",
    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 15001}},
    "filter_chains": [
        {
            "filters": [
                {
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": T
                        + "envoy.extensions.filters.network.http_connection_manager.v3"
                        + ".HttpConnectionManager",
                        "stat_prefix": "outbound",
                        "rds": {"route_config_name": "outbound", "config_source": {"ads": {}}},
                        "http_filters": [
                            {
                                "name": "envoy.filters.http.router",
                                "typed_config": {
                                    "@type": T + "envoy.extensions.filters.http.router.v3.Router"
                                },
                            }
                        ],
                    },
                }
            ]
        }
    ],
}
CLUSTER_DOC = {
    "@type": T + "envoy.config.cluster.v3.Cluster",
    "name": "web",
    "type": "EDS",
    "connect_timeout": "5s",
    "eds_cluster_config": {"eds_config": {"ads": {}}},
}
ROUTE_DOC = {
    "@type": T + "envoy.config.route.v3.RouteConfiguration",
    "name": "outbound",
    "virtual_hosts": [
        {
            "name": "web",
            "domains": ["web", "web.default"],
            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "web"}}],
        }
    ],
}
CLA_DOC = {
    "@type": T + "envoy.config.endpoint.v3.ClusterLoadAssignment",
    "cluster_name": "web",
    "endpoints": [
        {
            "lb_endpoints": [
                {
                    "endpoint": {
                        "address": {
                            "socket_address": {"address": "127.0.0.2", "port_value": 15006}
                        }
                    }
                }
            ]
        }
    ],
}


def cluster(name: str, timeout: str = "5s") -> dict:
    return {"@type": CLUSTER, "name": name, "connect_timeout": timeout}


def write_yaml(path: Path, *documents: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump_all(documents, sort_keys=False))


def as_dict(message) -> dict:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def without_type(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k != "@type"}


def timeout_of(cache: ResourceCache, name: str) -> int:
    resource = cache.get(CLUSTER, name)
    assert resource is not None, f"cluster {name} missing"
    return resource.unpack(cluster_pb2.Cluster).connect_timeout.seconds


# Loading --------------------------------------------------------------------------------------


def test_loads_yaml_json_lists_and_multi_document_files(tmp_path: Path) -> None:
    write_yaml(tmp_path / "listener.yaml", LISTENER_DOC)  # one resource
    write_yaml(tmp_path / "routing" / "multi.yml", CLUSTER_DOC, ROUTE_DOC)  # two documents
    (tmp_path / "endpoints.json").write_text(json.dumps([CLA_DOC], indent=2))  # a list
    cache = ResourceCache()

    assert ResourceDirectory(tmp_path, RawResources(cache)).load() == []

    assert set(cache.resources(LISTENER)) == {"outbound"}
    assert set(cache.resources(CLUSTER)) == {"web"}
    assert set(cache.resources(ROUTE)) == {"outbound"}
    assert set(cache.resources(ENDPOINT)) == {"web"}
    # What is served is exactly what was written, nested typed_config Anys included.
    listener = cache.get(LISTENER, "outbound").unpack(listener_pb2.Listener)
    assert as_dict(listener) == without_type(LISTENER_DOC)
    web = cache.get(CLUSTER, "web").unpack(cluster_pb2.Cluster)
    assert as_dict(web) == without_type(CLUSTER_DOC)
    route = cache.get(ROUTE, "outbound").unpack(route_pb2.RouteConfiguration)
    assert as_dict(route) == without_type(ROUTE_DOC)
    cla = cache.get(ENDPOINT, "web").unpack(endpoint_pb2.ClusterLoadAssignment)
    assert as_dict(cla) == without_type(CLA_DOC)
    # And the fields an Envoy would act on, spelled out.
    assert listener.address.socket_address.port_value == 15001
    hcm = hcm_pb2.HttpConnectionManager()
    assert listener.filter_chains[0].filters[0].typed_config.Unpack(hcm)
    assert hcm.rds.route_config_name == "outbound"
    assert timeout_of(cache, "web") == 5
    assert cla.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value == 15006


def test_load_file_accepts_camel_case_json_names(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "'@type': type.googleapis.com/envoy.config.cluster.v3.Cluster\n"
        "name: web\nconnectTimeout: 2.5s\nlbPolicy: LEAST_REQUEST\n"
    )
    messages, errors = load_file(path)
    assert errors == []
    [message] = messages
    assert message.connect_timeout.nanos == 500_000_000
    assert message.lb_policy == cluster_pb2.Cluster.LEAST_REQUEST


def test_hidden_and_temporary_files_are_ignored(tmp_path: Path) -> None:
    write_yaml(tmp_path / "a.yaml", cluster("a"))
    for name in (".#a.yaml", "a.yaml~", ".a.yaml.swp", "notes.txt", ".hidden/b.yaml"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("not: [valid")
    cache = ResourceCache()
    assert ResourceDirectory(tmp_path, RawResources(cache)).load() == []
    assert set(cache.resources(CLUSTER)) == {"a"}


def test_links_out_of_the_directory_and_oversized_files_are_refused(tmp_path: Path) -> None:
    source = tmp_path / "resources"
    write_yaml(source / "a.yaml", cluster("a"))
    write_yaml(tmp_path / "outside.yaml", cluster("stolen"))
    (source / "link.yaml").symlink_to(tmp_path / "outside.yaml")
    with (source / "huge.yaml").open("wb") as handle:  # sparse
        handle.truncate(MAX_FILE_BYTES + 1)
    cache = ResourceCache()
    errors = {e.file: e.message for e in ResourceDirectory(source, RawResources(cache)).load()}
    assert set(cache.resources(CLUSTER)) == {"a"}
    assert "out of the source directory" in errors["link.yaml"] and "limit" in errors["huge.yaml"]


# Errors ---------------------------------------------------------------------------------------


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("name: web\nports: [1, 2\nother: x\n")
    [error] = ResourceDirectory(tmp_path, RawResources(ResourceCache())).load()
    assert error.file == "bad.yaml"
    assert error.line in (2, 3, 4)
    assert str(error).startswith(f"bad.yaml:{error.line}: invalid YAML:")


def test_malformed_json_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "bad.json").write_text('{"name": "web",\n "port" 1}')
    [error] = ResourceDirectory(tmp_path, RawResources(ResourceCache())).load()
    assert (error.file, error.line) == ("sub/bad.json", 2)
    assert str(error).startswith("sub/bad.json:2: invalid JSON: Expecting ':' delimiter")


def test_unknown_field_names_the_field_and_its_line(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        textwrap.dedent(
            """\
            "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
            name: web
            circuit_breakers:
              thresholds:
              - max_connections: 10
                max_connectionz: 1
            """
        )
    )
    _, [error] = load_file(path, display="c.yaml")
    assert error.resource == 'Cluster "web"'
    assert error.field == "circuit_breakers.thresholds[0].max_connectionz"
    assert error.line == 6
    assert str(error) == (
        'c.yaml:6: Cluster "web": field circuit_breakers.thresholds[0].max_connectionz: '
        "unknown field"
    )


def test_wrong_value_names_the_field(tmp_path: Path) -> None:
    path = tmp_path / "routes" / "a.yaml"
    write_yaml(path, cluster("ok"), cluster("web", timeout="5x"))
    messages, [error] = load_file(path, display="routes/a.yaml")
    assert [m.name for m in messages] == ["ok"]
    assert (error.field, error.line, error.resource) == ("connect_timeout", 7, 'Cluster "web"')
    assert str(error).startswith('routes/a.yaml:7: Cluster "web": field connect_timeout: ')
    assert "5x" in error.message


def test_errors_inside_nested_typed_config_name_the_full_path(tmp_path: Path) -> None:
    doc = json.loads(json.dumps(LISTENER_DOC))
    hcm = doc["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"][0]["typed_config"]["bogus"] = 1
    path = tmp_path / "l.json"
    path.write_text(json.dumps(doc, indent=2))
    _, [error] = load_file(path)
    assert error.field == (
        "filter_chains[0].filters[0].typed_config.http_filters[0].typed_config.bogus"
    )
    assert error.line is not None and error.line > 1


def test_unknown_or_missing_type_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    write_yaml(
        path,
        [
            {"@type": T + "envoy.config.cluster.v3.Clustr", "name": "a"},
            {"name": "b"},
            {"@type": T + "google.protobuf.Duration"},
            "just a string",
        ],
    )
    _, errors = load_file(path, display="t.yaml")
    assert [str(e) for e in errors] == [
        't.yaml:1: "a": field @type: '
        'unknown @type "type.googleapis.com/envoy.config.cluster.v3.Clustr"',
        't.yaml:3: "b": missing "@type" (e.g. type.googleapis.com/envoy.config.cluster.v3.Cluster)',
        "t.yaml:4: Duration: field @type: google.protobuf.Duration is not an xDS resource type"
        " (it has no name)",
        "t.yaml:5: expected a resource (a mapping with @type), got str",
    ]


def test_empty_name_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "e.yaml"
    write_yaml(path, {"@type": CLA_DOC["@type"], "endpoints": []})
    _, [error] = load_file(path, display="e.yaml")
    assert str(error) == "e.yaml:1: ClusterLoadAssignment: field cluster_name: must not be empty"


def test_error_string_format() -> None:
    error = ResourceError(
        file="routes/a.yaml",
        line=12,
        resource='Cluster "web"',
        field="connect_timeout",
        message='invalid duration "5x"',
    )
    assert str(error) == (
        'routes/a.yaml:12: Cluster "web": field connect_timeout: invalid duration "5x"'
    )
    assert str(ResourceError(file="a.json", message="invalid JSON")) == "a.json: invalid JSON"


# Last good, deletion, duplicates --------------------------------------------------------------


def test_bad_edit_keeps_that_files_last_good_version_while_others_apply(tmp_path: Path) -> None:
    write_yaml(tmp_path / "a.yaml", cluster("a", "1s"))
    write_yaml(tmp_path / "b.yaml", cluster("b", "1s"))
    cache = ResourceCache()
    directory = ResourceDirectory(tmp_path, RawResources(cache))
    assert directory.load() == []

    write_yaml(tmp_path / "a.yaml", cluster("a", "2s"), cluster("a2", "nonsense"))
    write_yaml(tmp_path / "b.yaml", cluster("b", "2s"))
    [error] = directory.load()

    assert (error.file, error.field) == ("a.yaml", "connect_timeout")
    assert directory.errors == [error]
    assert set(cache.resources(CLUSTER)) == {"a", "b"}  # all of a.yaml's old version, not half
    assert timeout_of(cache, "a") == 1
    assert timeout_of(cache, "b") == 2

    # Not even a file that no longer parses at all takes its resources away.
    (tmp_path / "a.yaml").write_text("{{{")
    assert [e.file for e in directory.load()] == ["a.yaml"]
    assert timeout_of(cache, "a") == 1

    write_yaml(tmp_path / "a.yaml", cluster("a", "3s"))
    assert directory.load() == []
    assert directory.errors == []
    assert timeout_of(cache, "a") == 3


def test_a_file_that_was_never_valid_contributes_nothing(tmp_path: Path) -> None:
    write_yaml(tmp_path / "a.yaml", cluster("a"), cluster("b", "bad"))
    cache = ResourceCache()
    assert len(ResourceDirectory(tmp_path, RawResources(cache)).load()) == 1
    assert dict(cache.resources(CLUSTER)) == {}


def test_deleting_a_file_removes_its_resources(tmp_path: Path) -> None:
    write_yaml(tmp_path / "l.yaml", LISTENER_DOC)
    write_yaml(tmp_path / "c.yaml", CLUSTER_DOC, cluster("other"))
    cache = ResourceCache()
    directory = ResourceDirectory(tmp_path, RawResources(cache))
    directory.load()

    (tmp_path / "l.yaml").unlink()
    write_yaml(tmp_path / "c.yaml", CLUSTER_DOC)
    assert directory.load() == []
    assert dict(cache.resources(LISTENER)) == {}
    assert set(cache.resources(CLUSTER)) == {"web"}


def test_reloads_leave_the_meshs_own_resources_in_the_cache_alone(tmp_path: Path) -> None:
    """`--resources` beside `--source`: the cache also holds what the mesh translation
    published. Loading, editing and deleting raw files changes only the raw names; the mesh's
    clusters stay (a reload used to replace the whole type, leaving mesh sidecars with routes
    to clusters they no longer had)."""
    cache = ResourceCache()
    mesh_cluster = cluster_pb2.Cluster(name="outbound|80||api.shop.svc.cluster.local")
    cache.update(CLUSTER, [mesh_cluster])
    write_yaml(tmp_path / "c.yaml", CLUSTER_DOC)
    directory = ResourceDirectory(tmp_path, RawResources(cache))
    directory.load()
    assert set(cache.resources(CLUSTER)) == {"web", mesh_cluster.name}

    write_yaml(tmp_path / "c.yaml", CLUSTER_DOC, cluster("other"))
    directory.load()
    assert set(cache.resources(CLUSTER)) == {"web", "other", mesh_cluster.name}

    (tmp_path / "c.yaml").unlink()
    directory.load()
    assert set(cache.resources(CLUSTER)) == {mesh_cluster.name}


def test_only_changed_types_are_written(tmp_path: Path) -> None:
    write_yaml(tmp_path / "l.yaml", LISTENER_DOC)
    write_yaml(tmp_path / "c.yaml", CLUSTER_DOC)
    cache = ResourceCache()
    directory = ResourceDirectory(tmp_path, RawResources(cache))
    directory.load()
    listeners, clusters = cache.generation(LISTENER), cache.generation(CLUSTER)

    write_yaml(tmp_path / "c.yaml", CLUSTER_DOC, cluster("new"))
    directory.load()
    assert cache.generation(LISTENER) == listeners
    assert cache.generation(CLUSTER) == clusters + 1

    write_yaml(tmp_path / "c.yaml", cluster("new"), CLUSTER_DOC)  # same set, other order
    directory.load()
    assert cache.generation(CLUSTER) == clusters + 1


def test_duplicate_names_keep_the_file_that_was_good_first(tmp_path: Path) -> None:
    write_yaml(tmp_path / "z.yaml", cluster("web", "1s"))
    cache = ResourceCache()
    directory = ResourceDirectory(tmp_path, RawResources(cache))
    assert directory.load() == []

    # a.yaml sorts first, but z.yaml was serving "web" already: it keeps it.
    write_yaml(tmp_path / "a.yaml", cluster("web", "2s"), cluster("extra"))
    [error] = directory.load()
    assert error.file == "a.yaml" and error.resource == 'Cluster "web"'
    assert "z.yaml" in str(error) and "duplicate" in str(error)
    assert timeout_of(cache, "web") == 1
    assert "extra" in cache.resources(CLUSTER)  # the rest of a.yaml applies

    # Once z.yaml lets go of the name, a.yaml's definition takes over.
    (tmp_path / "z.yaml").unlink()
    assert directory.load() == []
    assert timeout_of(cache, "web") == 2


def test_duplicate_within_one_file_rejects_the_file(tmp_path: Path) -> None:
    write_yaml(tmp_path / "a.yaml", [cluster("web", "1s"), cluster("web", "2s")])
    cache = ResourceCache()
    [error] = ResourceDirectory(tmp_path, RawResources(cache)).load()
    assert str(error) == (
        'a.yaml:4: Cluster "web": duplicate name: defined earlier in this file (line 1)'
    )
    assert dict(cache.resources(CLUSTER)) == {}


def test_missing_directory_keeps_what_was_loaded(tmp_path: Path) -> None:
    root = tmp_path / "resources"
    write_yaml(root / "a.yaml", cluster("a"))
    cache = ResourceCache()
    directory = ResourceDirectory(root, RawResources(cache))
    directory.load()
    (root / "a.yaml").rename(tmp_path / "a.yaml")
    root.rmdir()
    [error] = directory.load()
    assert "cannot list the directory" in str(error)
    assert set(cache.resources(CLUSTER)) == {"a"}


# Hot reload -----------------------------------------------------------------------------------


async def eventually(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_run_hot_reloads_and_stops_cleanly(tmp_path: Path) -> None:
    write_yaml(tmp_path / "a.yaml", cluster("a", "1s"))
    cache = ResourceCache()
    directory = ResourceDirectory(tmp_path, RawResources(cache))
    directory.load()
    stop = asyncio.Event()
    task = asyncio.create_task(directory.run(stop))
    try:
        await asyncio.sleep(0.3)  # let the watcher start; the test polls, never waits fixed times
        write_yaml(tmp_path / "b.yaml", cluster("b"))
        await eventually(lambda: "b" in cache.resources(CLUSTER))

        write_yaml(tmp_path / "a.yaml", cluster("a", "oops"))
        await eventually(lambda: [e.file for e in directory.errors] == ["a.yaml"])
        assert timeout_of(cache, "a") == 1

        (tmp_path / "b.yaml").unlink()
        await eventually(lambda: "b" not in cache.resources(CLUSTER))
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=5)
    assert task.done() and task.exception() is None


async def test_run_survives_the_directory_being_replaced(tmp_path: Path) -> None:
    root = tmp_path / "resources"
    write_yaml(root / "a.yaml", cluster("a"))
    cache = ResourceCache()
    directory = ResourceDirectory(root, RawResources(cache))
    stop = asyncio.Event()
    task = asyncio.create_task(directory.run(stop))
    try:
        await eventually(lambda: "a" in cache.resources(CLUSTER))
        (root / "a.yaml").unlink()
        root.rmdir()
        await eventually(lambda: bool(directory.errors))
        assert "a" in cache.resources(CLUSTER)  # a vanished directory is not an empty one

        write_yaml(root / "b.yaml", cluster("b"))
        await eventually(lambda: set(cache.resources(CLUSTER)) == {"b"})
        assert directory.errors == []
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=5)


async def test_run_can_be_cancelled(tmp_path: Path) -> None:
    directory = ResourceDirectory(tmp_path, RawResources(ResourceCache()))
    task = asyncio.create_task(directory.run())
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout=5)
