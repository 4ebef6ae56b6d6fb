"""Mutual TLS between sidecars: the TLS contexts of inbound listeners and outbound clusters.

Certificates reach Envoy over SDS on the ADS stream under two stable names: `default` (the
proxy's own X509-SVID and key) and `ROOTCA` (the trust bundle). Rotation replaces the secret,
never the listener or cluster, so it never drains a connection.

- Inbound (`downstream_tls_context`): the sidecar presents `default`, requires a client
  certificate that chains to `ROOTCA` and carries a SPIFFE ID of the mesh's trust domain.
  Who may do what is authorization's job (rbac.py), on the peer's URI SAN.
- Outbound (`upstream_mtls_match`): a client sidecar originates mTLS only to endpoints whose
  EDS metadata says the destination accepts it (a meshed workload whose mode is not
  DISABLE, see `mark_mtls`), through the cluster's `transport_socket_matches`: one cluster
  may mix meshed and plain endpoints (a migration) and each gets what it understands. The
  server's certificate must carry the SPIFFE ID of one of the service accounts that back
  the service (from the pods of its EndpointSlices), so a workload cannot impersonate
  another service even with a valid mesh certificate. SNI is the service's FQDN.
- Proxyless gRPC (`CertificateSource.provider`): gRPC rejects SDS in TLS contexts (see
  FIELD-NOTES); it reads certificate files through certificate provider instances named in
  its bootstrap (`file_watcher`, written by `xds-server agent`). The same contexts are
  built with `CertificateProviderPluginInstance` references instead of SDS.

Pure functions: no I/O, no globals, no clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from envoy.config.core.v3 import config_source_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import any_pb2, struct_pb2, wrappers_pb2
from google.protobuf.message import Message

from ..model.mesh import AppProtocol

TLS_TRANSPORT_SOCKET = "envoy.transport_sockets.tls"
SDS_CERTIFICATE = "default"  # the proxy's own certificate chain and key
SDS_ROOT = "ROOTCA"  # the trust bundle
# Endpoint metadata that selects the mTLS transport socket of a cluster (Envoy looks under
# this filter name), and the match that cluster carries.
TRANSPORT_SOCKET_MATCH = "envoy.transport_socket_match"
TLS_MODE_KEY = "tlsMode"
TLS_MODE_MTLS = "mtls"
MTLS_MATCH_NAME = "mtls"
# Proxyless gRPC: the certificate provider instance its bootstrap defines (the workload agent's files).
DEFAULT_PROVIDER_INSTANCE = "default"
# ALPN of the inbound TLS chains (clients offer what their cluster speaks).
HTTP_ALPN = ("h2", "http/1.1")


@dataclass(frozen=True, slots=True)
class CertificateSource:
    """Where a TLS context gets its certificate and trust bundle: SDS over ADS (Envoy), or a
    certificate provider instance of the client's bootstrap (proxyless gRPC)."""

    provider: str | None = None  # None: SDS `default` / `ROOTCA`

    @classmethod
    def sds(cls) -> CertificateSource:
        return cls(None)

    @classmethod
    def provider_instance(cls, name: str = DEFAULT_PROVIDER_INSTANCE) -> CertificateSource:
        return cls(name)


SDS = CertificateSource.sds()


def pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def ads_config_source() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(), resource_api_version=config_source_pb2.V3
    )


def alpn_for(app_protocol: AppProtocol) -> tuple[str, ...]:
    """What a client cluster offers: the protocol it speaks upstream (TCP: nothing)."""
    if not app_protocol.is_http:
        return ()
    return ("h2",) if app_protocol.needs_http2 else ("http/1.1",)


def sds_secret(name: str) -> secret_pb2.SdsSecretConfig:
    return secret_pb2.SdsSecretConfig(name=name, sds_config=ads_config_source())


def common_tls_context(
    source: CertificateSource, sans: Sequence[string_pb2.StringMatcher], alpn: Sequence[str]
) -> tls_pb2.CommonTlsContext:
    context = tls_pb2.CommonTlsContext(alpn_protocols=list(alpn))
    if source.provider is None:
        # Envoy's client default stops at TLS 1.2; both ends of the mesh speak 1.3. (gRPC
        # refuses tls_params: it negotiates 1.2-1.3 by itself.)
        context.tls_params.tls_minimum_protocol_version = common_pb2.TlsParameters.TLSv1_2
        context.tls_params.tls_maximum_protocol_version = common_pb2.TlsParameters.TLSv1_3
    san_matchers = [
        common_pb2.SubjectAltNameMatcher(san_type=common_pb2.SubjectAltNameMatcher.URI, matcher=m)
        for m in sans
    ]
    if source.provider is None:
        context.tls_certificate_sds_secret_configs.append(sds_secret(SDS_CERTIFICATE))
        combined = context.combined_validation_context
        combined.default_validation_context.match_typed_subject_alt_names.extend(san_matchers)
        combined.validation_context_sds_secret_config.CopyFrom(sds_secret(SDS_ROOT))
    else:
        context.tls_certificate_provider_instance.CopyFrom(
            common_pb2.CertificateProviderPluginInstance(
                instance_name=source.provider, certificate_name=SDS_CERTIFICATE
            )
        )
        validation = context.validation_context
        validation.ca_certificate_provider_instance.CopyFrom(
            common_pb2.CertificateProviderPluginInstance(
                instance_name=source.provider, certificate_name=SDS_ROOT
            )
        )
        # gRPC matches the (untyped) list against every SAN of the peer; Envoy prefers the
        # typed list, and URI SANs are all a SPIFFE certificate has.
        validation.match_subject_alt_names.extend(sans)
    return context


def trust_domain_matcher(trust_domain: str) -> string_pb2.StringMatcher:
    """Any SPIFFE ID of the trust domain."""
    return string_pb2.StringMatcher(prefix=f"spiffe://{trust_domain}/")


def downstream_tls_context(
    trust_domain: str, source: CertificateSource = SDS, alpn: Sequence[str] = HTTP_ALPN
) -> tls_pb2.DownstreamTlsContext:
    """An inbound listener's mTLS: present our certificate, require the peer's, which must
    chain to the trust bundle and (Envoy) name a SPIFFE ID of our trust domain. gRPC servers
    refuse SAN matchers ("not supported on servers"): theirs rely on the bundle alone, and
    authorization checks the principal."""
    sans = [trust_domain_matcher(trust_domain)] if source.provider is None else []
    return tls_pb2.DownstreamTlsContext(
        common_tls_context=common_tls_context(source, sans, alpn),
        require_client_certificate=wrappers_pb2.BoolValue(value=True),
    )


def upstream_tls_context(
    sni: str, spiffe_ids: Sequence[str], alpn: Sequence[str] = (), source: CertificateSource = SDS
) -> tls_pb2.UpstreamTlsContext:
    """A client's mTLS to a service: our certificate, and the server's must name one of
    `spiffe_ids` (exactly)."""
    sans = [string_pb2.StringMatcher(exact=i) for i in sorted(set(spiffe_ids))]
    return tls_pb2.UpstreamTlsContext(common_tls_context=common_tls_context(source, sans, alpn), sni=sni)


def transport_socket(context: tls_pb2.UpstreamTlsContext | tls_pb2.DownstreamTlsContext) -> base_pb2.TransportSocket:
    return base_pb2.TransportSocket(name=TLS_TRANSPORT_SOCKET, typed_config=pack(context))


def upstream_mtls_match(sni: str, spiffe_ids: Sequence[str], alpn: Sequence[str] = ()) -> cluster_pb2.Cluster.TransportSocketMatch:
    """The cluster's mTLS transport socket, used for endpoints marked by `mark_mtls`; other
    endpoints use the cluster's default (plaintext)."""
    match = struct_pb2.Struct()
    match.fields[TLS_MODE_KEY].string_value = TLS_MODE_MTLS
    return cluster_pb2.Cluster.TransportSocketMatch(
        name=MTLS_MATCH_NAME,
        match=match,
        transport_socket=transport_socket(upstream_tls_context(sni, spiffe_ids, alpn)),
    )


def mark_mtls(lb_endpoint: endpoint_components_pb2.LbEndpoint) -> None:
    """Mark an endpoint as accepting mTLS (its cluster's `mtls` transport socket applies)."""
    fields = lb_endpoint.metadata.filter_metadata[TRANSPORT_SOCKET_MATCH].fields
    fields[TLS_MODE_KEY].string_value = TLS_MODE_MTLS


def is_marked_mtls(lb_endpoint: endpoint_components_pb2.LbEndpoint) -> bool:
    meta = lb_endpoint.metadata.filter_metadata.get(TRANSPORT_SOCKET_MATCH)
    return meta is not None and meta.fields.get(TLS_MODE_KEY, struct_pb2.Value()).string_value == TLS_MODE_MTLS

