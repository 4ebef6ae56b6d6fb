"""mTLS modes and authorization for one workload, and the index the controller keeps of them.

The inbound listener (ARCHITECTURE.md "Sidecar traffic model") is one port, 15006, for every
app port of the workload: HTTP is routed to an app port by the Host header, one TCP app port
is reached by what is not HTTP. The layer that decides "TLS or plaintext" (filter chain
match) runs before any HTTP is parsed and sees only port 15006, so per-port modes cannot be
told apart there. The design (see `InboundSecurity`):

- Modes are resolved per app port (mtls_policy_chain / resolve_mode, Istio precedence).
- The listener terminates mTLS when any app port accepts it (STRICT or PERMISSIVE) and
  accepts plaintext when any app port does (PERMISSIVE or DISABLE): TLS and plaintext filter
  chains side by side, told apart by the TLS inspector (`transport_protocol`). A workload
  whose ports are all STRICT has no plaintext chain, so a plaintext client is refused at
  connection level; one whose ports are all DISABLE has no TLS chain (the listener is then
  exactly the plaintext one).
- Per-port enforcement of a mixed workload happens where the app port is known: HTTP
  plaintext requests go through their own route configuration (`inbound|http|plaintext|..`)
  in which the virtual hosts of STRICT ports answer 403 "mTLS required" and route nowhere;
  the TCP app port's plaintext chain exists only when its mode accepts plaintext. A DISABLE
  port on a listener that terminates TLS anyway (another port needs it) also accepts mTLS:
  DISABLE means "clients send plaintext", and refusing a stronger connection protects nothing.
- Clients decide per endpoint: EDS marks endpoints whose workload is meshed and whose mode
  for that app port is not DISABLE (tls.mark_mtls), and the client's cluster originates
  mTLS to exactly those.

Authorization per app port: see rbac.py.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from envoy.config.route.v3 import route_components_pb2, route_pb2

from ..model.mesh import AppProtocol, Workload
from ..model.security import (
    AuthorizationPolicy,
    MTLSPolicy,
    MTLSPolicySpec,
    MtlsMode,
    SecuritySettings,
    authorization_policies,
    mtls_policy_chain,
    resolve_mode,
)
from ..model.store import AUTHORIZATION_POLICY, MTLS_POLICY, ObjectChange
from . import rbac
from .rbac import PortAuthz

_Policy = TypeVar("_Policy", MTLSPolicy, AuthorizationPolicy)

MTLS_REQUIRED_STATUS = 403
MTLS_REQUIRED_BODY = "mTLS required: this port of the workload is STRICT\n"


def inbound_plaintext_route_name(namespace: str, pod: str) -> str:
    """The route configuration of the plaintext chain when some HTTP port is STRICT."""
    return f"inbound|http|plaintext|{namespace}/{pod}"


@dataclass(frozen=True)
class InboundSecurity:
    """What the inbound listener and its routes need: modes and authorization per app port."""

    http_modes: dict[int, MtlsMode] = field(default_factory=dict)
    tcp_port: int | None = None
    tcp_mode: MtlsMode = MtlsMode.DISABLE
    authz: dict[int, PortAuthz] = field(default_factory=dict)
    trust_domain: str = "cluster.local"

    @property
    def modes(self) -> list[MtlsMode]:
        out = list(self.http_modes.values())
        if self.tcp_port is not None:
            out.append(self.tcp_mode)
        return out

    @property
    def terminates_tls(self) -> bool:
        return any(m.accepts_tls for m in self.modes)

    @property
    def accepts_plaintext(self) -> bool:
        return any(m.accepts_plaintext for m in self.modes)

    @property
    def strict_http_ports(self) -> list[int]:
        return sorted(p for p, m in self.http_modes.items() if not m.accepts_plaintext)

    @property
    def plaintext_http(self) -> bool:
        """Whether plaintext HTTP has its own chain (some port accepts plaintext)."""
        return bool(self.http_modes) and self.accepts_plaintext

    @property
    def plaintext_tcp(self) -> bool:
        return self.tcp_port is not None and self.tcp_mode.accepts_plaintext

    def tcp_authz(self) -> PortAuthz:
        return self.authz.get(self.tcp_port, PortAuthz()) if self.tcp_port is not None else PortAuthz()


def _vhost_port(vhost: route_components_pb2.VirtualHost) -> int | None:
    """The app port of an inbound virtual host (`inbound|8080` or `inbound|8080|1`)."""
    parts = vhost.name.split("|")
    if len(parts) >= 2 and parts[0] == "inbound" and parts[1].isdigit():
        return int(parts[1])
    return None


def secure_inbound_routes(
    config: route_pb2.RouteConfiguration, security: InboundSecurity, *, namespace: str, pod: str
) -> list[route_pb2.RouteConfiguration]:
    """The inbound route configuration with each virtual host's authorization, plus (when a
    STRICT HTTP port shares the listener with plaintext) the plaintext chain's copy in which
    STRICT ports answer 403."""
    for vhost in config.virtual_hosts:
        port = _vhost_port(vhost)
        authz = security.authz.get(port) if port is not None else None
        for name, packed in rbac.http_per_route(authz or PortAuthz()).items():
            vhost.typed_per_filter_config[name].CopyFrom(packed)
    configs = [config]
    strict = set(security.strict_http_ports)
    if security.plaintext_http and security.terminates_tls and strict:
        plain = route_pb2.RouteConfiguration()
        plain.CopyFrom(config)
        plain.name = inbound_plaintext_route_name(namespace, pod)
        for vhost in plain.virtual_hosts:
            if _vhost_port(vhost) in strict:
                del vhost.routes[:]
                route = vhost.routes.add(name="mtls-required")
                route.match.prefix = "/"
                route.direct_response.status = MTLS_REQUIRED_STATUS
                route.direct_response.body.inline_string = MTLS_REQUIRED_BODY
        configs.append(plain)
    return configs


def plaintext_route_name(security: InboundSecurity, main: str, namespace: str, pod: str) -> str:
    if security.terminates_tls and security.strict_http_ports:
        return inbound_plaintext_route_name(namespace, pod)
    return main


# The controller's index ---------------------------------------------------------------------


class SecurityIndex:
    """The security policies by namespace, and what they mean for a workload."""

    def __init__(self, settings: SecuritySettings | None = None) -> None:
        self.settings = settings or SecuritySettings()
        self._mtls: dict[str, dict[str, MTLSPolicy]] = defaultdict(dict)
        self._authz: dict[str, dict[str, AuthorizationPolicy]] = defaultdict(dict)
        # Mode chains by (namespace, labels): asked for every endpoint of every build.
        self._chains: dict[tuple[str, tuple[tuple[str, str], ...]], list[MTLSPolicySpec]] = {}

    def apply(self, change: ObjectChange) -> set[str] | None:
        """Record a policy change; return the namespaces whose workloads it may affect
        (None: every namespace, for a policy in the root namespace)."""
        index = self._mtls if change.kind == MTLS_POLICY else self._authz
        assert change.kind in (MTLS_POLICY, AUTHORIZATION_POLICY)
        if change.kind == MTLS_POLICY:
            self._chains.clear()
        affected: set[str] = set()
        for obj in (change.old, change.new):
            if obj is not None:
                affected.add(obj.namespace)
        if change.old is not None:
            index[change.old.namespace].pop(change.old.name, None)
            if not index[change.old.namespace]:
                del index[change.old.namespace]
        if change.new is not None:
            index[change.new.namespace][change.new.name] = change.new
        if self.settings.root_namespace in affected:
            return None
        return affected

    def _candidates(
        self, index: Mapping[str, Mapping[str, _Policy]], namespace: str
    ) -> list[_Policy]:
        out = list(index.get(namespace, {}).values())
        if namespace != self.settings.root_namespace:
            out += index.get(self.settings.root_namespace, {}).values()
        return out

    def mode_chain(self, workload: Workload) -> list[MTLSPolicySpec]:
        key = (workload.namespace, workload.labels)
        chain = self._chains.get(key)
        if chain is None:
            if len(self._chains) > 100_000:
                self._chains.clear()
            chain = self._chains[key] = mtls_policy_chain(
                workload.namespace, workload.label_map,
                self._candidates(self._mtls, workload.namespace), self.settings,
            )
        return chain

    def mode(self, workload: Workload, port: int | None) -> MtlsMode:
        return resolve_mode(self.mode_chain(workload), port, self.settings)

    def endpoint_mtls(self, workload: Workload, port: int) -> bool:
        """Whether clients should originate mTLS to this workload's app port."""
        return workload.mtls_capable and self.settings.mtls and self.mode(workload, port).accepts_tls

    def authorization(self, workload: Workload) -> list[AuthorizationPolicy]:
        return authorization_policies(
            workload.namespace, workload.label_map,
            self._candidates(self._authz, workload.namespace), self.settings,
        )

    def inbound(self, workload: Workload, ports: Iterable[tuple[int, AppProtocol]]) -> InboundSecurity:
        chain = self.mode_chain(workload)
        policies = self.authorization(workload)
        http_modes: dict[int, MtlsMode] = {}
        tcp_port: int | None = None
        authz: dict[int, PortAuthz] = {}
        for port, protocol in ports:
            if protocol.is_http:
                http_modes.setdefault(port, resolve_mode(chain, port, self.settings))
            elif tcp_port is None:
                tcp_port = port
            else:
                continue
            authz[port] = rbac.authorize(policies, self.settings, port, http=protocol.is_http)
        return InboundSecurity(
            http_modes=http_modes,
            tcp_port=tcp_port,
            tcp_mode=resolve_mode(chain, tcp_port, self.settings) if tcp_port is not None else MtlsMode.DISABLE,
            authz=authz,
            trust_domain=self.settings.trust_domain,
        )

    def spiffe_ids(self, workloads: Iterable[Workload]) -> tuple[str, ...]:
        """The SPIFFE IDs a client accepts from a service's servers: the service accounts of
        its mTLS-capable workloads (sidecars, proxyless gRPC)."""
        return tuple(sorted({
            self.settings.spiffe_id(w.namespace, w.service_account) for w in workloads if w.mtls_capable
        }))

