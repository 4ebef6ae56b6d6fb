"""Which services a proxy may see: its own namespace, what is exported to it, and never
across a tenant boundary. The server enforces this (views), so it is a security rule, not
just a size optimisation: a tenant's proxy must not learn another tenant's services."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..model.mesh import Namespace, Service
from .capture import OutboundTrafficPolicy

TENANT_LABEL = "xds-server.io/tenant"
EXPORT_ANNOTATION = "xds-server.io/export-to"


@dataclass(frozen=True, slots=True)
class ScopeSettings:
    # Where a service is visible when it does not say: "*" everywhere (Kubernetes' default:
    # any pod may reach any Service), "." only in its own namespace.
    default_export_to: tuple[str, ...] = ("*",)
    tenant_label: str = TENANT_LABEL
    # Where a capture-mode sidecar sends a connection to an address the mesh does not know.
    outbound_traffic_policy: OutboundTrafficPolicy = OutboundTrafficPolicy.ALLOW_ANY


def tenant_of(namespace: str, namespaces: Mapping[str, Namespace], settings: ScopeSettings) -> str | None:
    ns = namespaces.get(namespace)
    if ns is None:
        return None
    return ns.label_map.get(settings.tenant_label)


def visible(
    service: Service,
    proxy_namespace: str,
    namespaces: Mapping[str, Namespace],
    settings: ScopeSettings,
) -> bool:
    """Whether a proxy in `proxy_namespace` may see `service`."""
    if service.namespace == proxy_namespace:
        return True
    # Tenants are a hard boundary: a tenant's services are seen only inside that tenant,
    # whatever they export. Shared services (in no tenant) follow their export rules.
    service_tenant = tenant_of(service.namespace, namespaces, settings)
    if service_tenant is not None and service_tenant != tenant_of(proxy_namespace, namespaces, settings):
        return False
    export_to = service.export_to if service.export_to is not None else settings.default_export_to
    return any(target == "*" or target == proxy_namespace for target in export_to)
