"""The shared outputs of one service: built once, shared by every proxy that may see it.

  cluster-security  what its clusters say about mTLS (the SPIFFE IDs of its servers and,
                    per port, whether every endpoint accepts mTLS): a derived value, so an
                    endpoint change rebuilds the clusters only when it changes
  clusters          one Cluster per service port
  assignments       one ClusterLoadAssignment per service port
  proxyless         its clusters reshaped for gRPC, while a proxyless proxy is connected
  vhosts            its virtual hosts (encoded), as seen from its own namespace and others
  proxyless-vhosts  the same translated for gRPC, while a proxyless proxy is connected
  capture           what capture-mode sidecars need of it (translate/capture.py): its
                    ClusterIP's filter chains (encoded, both forms), a route configuration
                    per HTTP port for traffic by address, and its endpoints' pod IPs

Each is one builder over the "service" family: a new Service gets all of them, and each
rebuilds when something it read changed (translate/reads.py records what that is).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable
from dataclasses import dataclass, field

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.route.v3 import route_pb2

from ..model.mesh import EndpointSlice, Service, ServiceKey, ServicePort, Workload
from ..xds import types
from ..xds.resource import Resource
from . import capture, proxyless
from .batch import Batch
from .clusters import service_cluster
from .dependencies import Parts
from .endpoints import load_assignment, slice_port
from .orchestrator import Built
from .reads import Reader
from .routes import service_virtual_host
from .views import Published

ClusterSecurity = tuple[tuple[str, ...], tuple[bool, ...]]
NO_SECURITY: ClusterSecurity = ((), ())


@dataclass
class ServiceOutputs:
    """What the service builders produced that other builders read."""

    security: dict[ServiceKey, ClusterSecurity] = field(default_factory=dict)
    clusters: dict[ServiceKey, list[str]] = field(default_factory=dict)  # sorted names
    cluster_resources: dict[ServiceKey, list[Resource]] = field(default_factory=dict)
    vhosts: dict[tuple[ServiceKey, bool], bytes] = field(default_factory=dict)  # (key, local)
    grpc_vhosts: dict[tuple[ServiceKey, bool], bytes] = field(default_factory=dict)  # the same, for gRPC
    proxyless: dict[ServiceKey, list[str]] = field(default_factory=dict)
    proxyless_connected: bool = False  # set by the proxy registry
    capture_connected: bool = False  # a capture-mode sidecar is: set by the proxy registry
    capture_chains: dict[tuple[ServiceKey, bool], bytes] = field(default_factory=dict)  # (key, local)
    pod_ips: dict[ServiceKey, frozenset[capture.PodIp]] = field(default_factory=dict)
    destination_routes: dict[ServiceKey, list[str]] = field(default_factory=dict)
    sniffed_ports: dict[ServiceKey, frozenset[int]] = field(default_factory=dict)  # with a ClusterIP


def _key(arg: Hashable) -> ServiceKey:
    assert isinstance(arg, ServiceKey)
    return arg


class ClusterSecurityBuilder:
    kind, phase, family = "cluster-security", 0, "service"

    def __init__(self, outputs: ServiceOutputs, mtls: bool) -> None:
        self.outputs = outputs
        self.mtls = mtls

    def build(self, arg: Hashable, reader: Reader, parts: Parts, batch: Batch) -> Built:
        key = _key(arg)
        service = reader.service(key) if self.mtls else None
        value = self._compute(key, service, reader) if service is not None else NO_SECURITY
        before = self.outputs.security.get(key, NO_SECURITY)
        if service is None:
            self.outputs.security.pop(key, None)
        else:
            self.outputs.security[key] = value
        emits = frozenset({("cluster-security", key)}) if value != before else frozenset()
        return Built(emits, alive=service is not None)

    @staticmethod
    def _compute(key: ServiceKey, service: Service, reader: Reader) -> ClusterSecurity:
        slices = reader.slices(key)
        workloads = [
            owner for s in slices for e in s.endpoints
            if (owner := reader.workload(key.namespace, e.pod, e.address)) is not None
        ]
        ids = reader.spiffe_ids(workloads)
        if not ids:
            return ids, ()
        return ids, tuple(_all_endpoints_mtls(key, port, slices, reader) for port in service.ports)


def _all_endpoints_mtls(
    key: ServiceKey, port: ServicePort, slices: list[EndpointSlice], reader: Reader
) -> bool:
    """Whether every endpoint of the port accepts mTLS (gRPC clients, which cannot choose per
    endpoint, then originate it)."""
    found = False
    for endpoint_slice in slices:
        target = slice_port(port, endpoint_slice)
        if target is None:
            continue
        for endpoint in endpoint_slice.endpoints:
            owner: Workload | None = reader.workload(key.namespace, endpoint.pod, endpoint.address)
            if owner is None or not reader.endpoint_mtls(owner, target):
                return False
            found = True
    return found


class ClustersBuilder:
    kind, phase, family = "clusters", 1, "service"

    def __init__(self, outputs: ServiceOutputs, published: Published) -> None:
        self.outputs = outputs
        self.published = published

    def build(self, arg: Hashable, reader: Reader, parts: Parts, batch: Batch) -> Built:
        key = _key(arg)
        service = reader.service(key)
        old = self.outputs.clusters.get(key, [])
        owners = self.published.cluster_owner
        if service is None:
            self.outputs.clusters.pop(key, None)
            self.outputs.cluster_resources.pop(key, None)
            batch.remove(types.CLUSTER, old)
            batch.remove(types.ENDPOINT, old)
            batch.on_publish(lambda: [owners.pop(n, None) for n in old])
            emits = {("clusters", key), ("cluster-resources", key)} if old else set()
            return Built(frozenset(emits), alive=False)
        policy = reader.policy(key)
        reader.derived("cluster-security", key)
        ids, all_mtls = self.outputs.security.get(key, NO_SECURITY)
        messages = [service_cluster(service, port, policy, mtls_ids=ids) for port in service.ports]
        for message, enabled in zip(messages, all_mtls, strict=False):  # all_mtls is () without mTLS
            proxyless.mark_proxyless_mtls(message, enabled)
        resources = [Resource.from_message(m) for m in messages]
        new = sorted({r.name for r in resources})
        gone = set(old) - set(new)
        batch.put(resources)
        batch.remove(types.CLUSTER, gone)
        batch.remove(types.ENDPOINT, gone)

        def publish() -> None:
            for name in gone:
                owners.pop(name, None)
            for name in new:
                owners[name] = key

        batch.on_publish(publish)
        emits = set()
        if new != old:
            emits.add(("clusters", key))
        if resources != self.outputs.cluster_resources.get(key):
            emits.add(("cluster-resources", key))
        self.outputs.clusters[key] = new
        self.outputs.cluster_resources[key] = resources
        return Built(frozenset(emits), translations=len(messages))


class AssignmentsBuilder:
    kind, phase, family = "assignments", 1, "service"

    def __init__(self, mtls: bool) -> None:
        self.mtls = mtls

    def build(self, arg: Hashable, reader: Reader, parts: Parts, batch: Batch) -> Built:
        key = _key(arg)
        service = reader.service(key)
        if service is None:  # its clusters' builder removes the assignments with them
            return Built(alive=False)
        slices = reader.slices(key)
        mtls = reader.endpoint_mtls if self.mtls else None
        assignments = [
            Resource.from_message(load_assignment(service, port, slices, reader.workload, mtls))
            for port in service.ports
        ]
        batch.put(assignments)
        return Built(translations=len(assignments))


class ProxylessClustersBuilder:
    """Service clusters reshaped for gRPC (proxyless.client_cluster), kept only while a
    proxyless proxy is connected: views hand them out in place of the Envoy ones."""

    kind, phase, family = "proxyless-clusters", 2, "service"

    def __init__(self, outputs: ServiceOutputs, published: Published) -> None:
        self.outputs = outputs
        self.published = published

    def build(self, arg: Hashable, reader: Reader, parts: Parts, batch: Batch) -> Built:
        key = _key(arg)
        reader.derived("proxyless-connected")
        reader.derived("cluster-resources", key)
        old = self.outputs.proxyless.get(key, [])
        resources = []
        if self.outputs.proxyless_connected:
            resources = [
                Resource.from_message(proxyless.client_cluster(r.unpack(cluster_pb2.Cluster)))
                for r in self.outputs.cluster_resources.get(key, ())
            ]
        new = [r.name for r in resources]
        gone = set(old) - set(new)
        if new:
            self.outputs.proxyless[key] = new
        else:
            self.outputs.proxyless.pop(key, None)
        reshaped = self.published.proxyless_clusters

        def publish() -> None:
            for name in gone:
                reshaped.pop(name, None)
            for resource in resources:
                reshaped[resource.name] = resource

        if resources or gone:
            batch.on_publish(publish)
        return Built(alive=key in self.outputs.cluster_resources)


class VirtualHostsBuilder:
    """A service's virtual hosts in both forms, encoded as `RouteConfiguration.virtual_hosts`
    entries: a scope's route configuration is then a byte join (translate/scopes.py)."""

    kind, phase, family = "vhosts", 1, "service"
    grpc = False

    def __init__(self, outputs: ServiceOutputs) -> None:
        self.outputs = outputs

    def _slots(self) -> dict[tuple[ServiceKey, bool], bytes]:
        return self.outputs.vhosts

    def _wanted(self, reader: Reader) -> bool:
        return True

    def build(self, arg: Hashable, reader: Reader, parts: Parts, batch: Batch) -> Built:
        key = _key(arg)
        service = reader.service(key)
        wanted = self._wanted(reader)
        slots = self._slots()
        changed = False
        translations = 0
        for local in (True, False):
            entry = None
            if service is not None and wanted:
                entry, count = self._encode(service, local, reader)
                translations += count
            slot = (key, local)
            if entry is None:
                changed = slots.pop(slot, None) is not None or changed
            elif slots.get(slot) != entry:
                slots[slot] = entry
                changed = True
        emits = frozenset({(self.kind, key)}) if changed else frozenset()
        return Built(emits, alive=service is not None, translations=translations)

    def _encode(self, service: Service, local: bool, reader: Reader) -> tuple[bytes, int]:
        service = _routable(service, reader)
        routes = reader.routes_of(service.key)
        policy = reader.policy(service.key)
        services = reader.services()
        http_ports = [p for p in service.ports if p.routes_http]
        default = _default_port(http_ports)
        hosts = []
        for port in http_ports:
            attached = [
                r for r in routes
                if any(p.service == service.key and p.port in (None, port.port) for p in r.parents)
            ]
            hosts.append(service_virtual_host(
                service, port, attached, policy, services, local=local, default_port=port is default,
                grpc=self.grpc,
            ))
        encoded = route_pb2.RouteConfiguration(virtual_hosts=hosts).SerializeToString(deterministic=True)
        return encoded, len(hosts)


class ProxylessVirtualHostsBuilder(VirtualHostsBuilder):
    """A service's virtual hosts translated for proxyless gRPC clients (routes.py `grpc`), in
    both forms, kept only while a proxyless proxy is connected: scopes join them into the
    namespace's gRPC route configuration."""

    kind, phase, family = "proxyless-vhosts", 1, "service"
    grpc = True

    def _slots(self) -> dict[tuple[ServiceKey, bool], bytes]:
        return self.outputs.grpc_vhosts

    def _wanted(self, reader: Reader) -> bool:
        reader.derived("proxyless-connected")
        return self.outputs.proxyless_connected


class CaptureBuilder:
    """A service as capture-mode sidecars reach it by ClusterIP: its chains and a route
    configuration per HTTP port, from its virtual hosts. Built while a capture-mode sidecar
    is connected (a mesh of explicit-mode sidecars pays nothing for it)."""

    kind, phase, family = "capture", 2, "service"

    def __init__(self, outputs: ServiceOutputs, published: Published) -> None:
        self.outputs = outputs
        self.published = published

    def build(self, arg: Hashable, reader: Reader, parts: Parts, batch: Batch) -> Built:
        key = _key(arg)
        reader.derived("capture-connected")
        service = reader.service(key)
        old_routes = self.outputs.destination_routes.get(key, [])
        owners = self.published.route_owner
        if service is None or not self.outputs.capture_connected:
            changed = self.outputs.sniffed_ports.pop(key, None) is not None
            for local in (True, False):
                changed = self.outputs.capture_chains.pop((key, local), None) is not None or changed
            self.outputs.destination_routes.pop(key, None)
            batch.remove(types.ROUTE, old_routes)
            if old_routes:
                batch.on_publish(lambda: [owners.pop(n, None) for n in old_routes])
            emits = frozenset({("capture", key)}) if changed else frozenset()
            return Built(emits, alive=service is not None)
        reader.derived("vhosts", key)
        service = _routable(service, reader)
        local_routes = capture.destination_routes(self.outputs.vhosts.get((key, True), b""), key, consumers=False)
        remote_routes = capture.destination_routes(self.outputs.vhosts.get((key, False), b""), key, consumers=True)
        routes: list[route_pb2.RouteConfiguration] = list(local_routes.values())
        remote_names: dict[int, str] = {}
        for port, config in remote_routes.items():
            same = local_routes.get(port)
            if same is not None and list(same.virtual_hosts) == list(config.virtual_hosts):
                remote_names[port] = same.name  # no consumer route: one configuration serves all
            else:
                remote_names[port] = config.name
                routes.append(config)
        sniffed = frozenset(p.port for p in service.ports if p.sniffed) if capture.has_cluster_ip(service) else frozenset()
        changed = self.outputs.sniffed_ports.get(key, frozenset()) != sniffed
        if sniffed:
            self.outputs.sniffed_ports[key] = sniffed
        else:
            self.outputs.sniffed_ports.pop(key, None)
        for local, route_names in ((True, {p: c.name for p, c in local_routes.items()}), (False, remote_names)):
            entry = capture.encode_chains(capture.service_chains(service, route_names))
            if self.outputs.capture_chains.get((key, local)) != entry:
                self.outputs.capture_chains[(key, local)] = entry
                changed = True
        resources = [Resource.from_message(c) for c in routes]
        new = sorted(r.name for r in resources)
        gone = set(old_routes) - set(new)
        batch.put(resources)
        batch.remove(types.ROUTE, gone)
        self.outputs.destination_routes[key] = new

        def publish() -> None:
            for name in gone:
                owners.pop(name, None)
            for name in new:
                owners[name] = key

        batch.on_publish(publish)
        return Built(frozenset({("capture", key)}) if changed else frozenset(), translations=len(routes))


class PodIpsBuilder:
    """A service's endpoints as capture-mode sidecars reach them by pod IP: (IP, port,
    whether it accepts mTLS). A readiness flip leaves them as they are: nothing follows."""

    kind, phase, family = "pod-ips", 1, "service"

    def __init__(self, outputs: ServiceOutputs, mtls: bool) -> None:
        self.outputs = outputs
        self.mtls = mtls

    def build(self, arg: Hashable, reader: Reader, parts: Parts, batch: Batch) -> Built:
        key = _key(arg)
        reader.derived("capture-connected")
        service = reader.service(key)
        found: frozenset[capture.PodIp] = frozenset()
        if service is not None and self.outputs.capture_connected:
            found = self._pod_ips(service, reader)
        before = self.outputs.pod_ips.get(key, frozenset())
        if found:
            self.outputs.pod_ips[key] = found
        else:
            self.outputs.pod_ips.pop(key, None)
        emits = frozenset({("capture", key)}) if found != before else frozenset()
        return Built(emits, alive=service is not None)

    def _pod_ips(self, service: Service, reader: Reader) -> frozenset[capture.PodIp]:
        out: set[capture.PodIp] = set()
        for endpoint_slice in reader.slices(service.key):
            for port in service.ports:
                target = slice_port(port, endpoint_slice)
                if target is None:
                    continue
                for endpoint in endpoint_slice.endpoints:
                    if not capture.is_address(endpoint.address):  # an FQDN slice's hostname
                        continue
                    owner = reader.workload(service.namespace, endpoint.pod, endpoint.address)
                    mtls = self.mtls and owner is not None and reader.endpoint_mtls(owner, target)
                    out.add((endpoint.address, target, mtls))
        return frozenset(out)


def _routable(service: Service, reader: Reader) -> Service:
    """The service as its virtual hosts see it. Two services claiming one cluster IP (an
    error a real cluster never makes, but a file can) would give Envoy a duplicate domain,
    and Envoy rejects the whole route configuration: one odd object must not break the
    namespace, so only the first service (by name) keeps the IP."""
    owners = reader.ip_owners(service.cluster_ip or "")
    if owners and len(owners) > 1 and min(owners) != service.key:
        return dataclasses.replace(service, cluster_ip=None)
    return service


def _default_port(ports: list[ServicePort]) -> ServicePort | None:
    """The port a Host header without a port means: 80 if the service has it, else the first."""
    return next((p for p in ports if p.port == 80), ports[0] if ports else None)
