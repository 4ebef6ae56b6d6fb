"""The sections of the settings tree, one per room of the server. Defaults are the
dataclasses' own (read from them where importing them is cheap; written out, and checked by
a test, where it is not)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BeforeValidator, DirectoryPath, FilePath, model_validator

from ..admin.auth import ENV_TOKENS as ADMIN_TOKENS_ENV
from ..admin.settings import AdminSettings
from ..ca.authority import KeyAlgorithm
from ..config import ConfigError
from ..inject.settings import InjectorSettings, WebhookSettings
from ..model.security import MtlsMode, SecuritySettings
from ..security import SecurityConfig
from ..sources.reading import Links, ReadLimits
from ..translate.capture import OutboundTrafficPolicy
from ..translate.scope import ScopeSettings
from ..xds.auth import AuthMode, GuardSettings
from ..xds.lrs import LrsSettings
from ..xds.server import ServerSettings
from .leaf import Address, Lifetime, OptionalAddress, Seconds, Section, Words, setting, upper_case

# Admin API tokens in clear (ADMIN_TOKENS_ENV) are a secret: environment only, read by
# admin/auth.py, never a flag (command lines are visible to every user of the machine).

_SERVER = ServerSettings()
_LRS = LrsSettings()
_GUARD = GuardSettings()
_SECURITY = SecurityConfig()
_ADMIN = AdminSettings()
_SCOPE = ScopeSettings()
_MESH = SecuritySettings()
_WEBHOOK = WebhookSettings()
_INJECTOR = InjectorSettings()
_READS = ReadLimits()


def _off(value: object) -> object:
    """'off' (or none, empty) turns an optional name off."""
    if value is None or str(value).strip().lower() in ("", "off", "none"):
        return None
    return value


class LoggingSection(Section):
    level: Literal["debug", "info", "warning", "error"] = setting(
        "info", "--log-level", "Least severe level logged.")
    format: Literal["auto", "json", "text"] = setting(
        "auto", "--log-format", "auto: text on a terminal, JSON otherwise.")


class XdsSection(Section):
    address: Address = setting(_SERVER.address, "--xds-address",
                               "HOST:PORT for xDS gRPC (plaintext).")
    tls_address: OptionalAddress = setting(
        "127.0.0.1:15012", "--xds-tls-address",
        "HOST:PORT for xDS (all services, SDS and CSR included) over mutual TLS with a "
        "mesh-CA certificate: clients present an X.509-SVID, verified against the current "
        "trust bundle, and are who it says. 'off' disables it.")
    tls_token_address: OptionalAddress = setting(
        "127.0.0.1:15013", "--xds-tls-token-address",
        "HOST:PORT for the same services over server-authenticated TLS: clients without a "
        "certificate yet prove who they are with a bearer token (first contact). 'off' "
        "disables it.")
    tls_frontend: Literal["python", "grpc"] = setting(
        _SERVER.tls_frontend, "--xds-tls-frontend",
        "Who performs the mutual-TLS handshake of --xds-tls-address: python (a front in the "
        "server's event loop; refused handshakes are counted by reason in "
        "xds_server_tls_handshake_refusals_total, then bytes are relayed to the gRPC server on "
        "an internal loopback port) or grpc (grpc core's TLS: refusals are not counted).")
    tls_handshake_timeout: Seconds = setting(
        _SERVER.tls_handshake_timeout, "--xds-tls-handshake-timeout",
        "With --xds-tls-frontend python: a client whose TLS handshake is not done this long "
        "after connecting is dropped (counted as reason timeout).", gt=0)
    tls_sans: Words = setting(
        (), "--xds-tls-san",
        "Name in the xDS TLS certificate (the names clients dial, e.g. the Service's DNS "
        "names); repeatable. localhost and the listen hosts are always in.",
        repeatable=True, default_text="localhost and the listen hosts")
    allow_plaintext_tokens_off_host: bool = setting(
        False, "--allow-plaintext-tokens-off-host",
        "INSECURE, lab use only: let --auth tokens run with a plaintext --xds-address beyond "
        "loopback (tokens cross the network in clear; SDS private keys are still never sent "
        "on it). Without it such a start is refused.")
    unix_socket: str | None = setting(
        None, "--xds-unix-socket",
        "Also serve xDS on this Unix socket (absolute path; made 0666): sidecars and agents "
        "of this host reach it from any network namespace.", pattern=r"^/")
    debounce_quiet: Seconds = setting(
        _SERVER.debounce_quiet, "--debounce-quiet",
        "Time without changes before pushing; 0 turns debouncing off.", ge=0)
    debounce_max: Seconds = setting(_SERVER.debounce_max, "--debounce-max",
                                    "Longest a burst of changes delays a push.", ge=0)
    max_concurrent_pushes: int = setting(_SERVER.max_concurrent_pushes, "--max-concurrent-pushes",
                                         "Responses being written at once.", ge=1)
    slow_write_seconds: Seconds = setting(
        _SERVER.slow_write_seconds, "--slow-write-seconds",
        "A write slower than this stops counting against --max-concurrent-pushes.", gt=0)
    max_concurrent_streams: int = setting(_SERVER.max_concurrent_streams,
                                          "--max-concurrent-streams", "Per HTTP/2 connection.",
                                          ge=1)
    max_pending_streams: int = setting(_SERVER.max_pending_streams, "--max-pending-streams",
                                       "Stream opens queued at once (reconnect bursts).", ge=1)
    max_names_per_request: int = setting(_SERVER.max_names_per_request,
                                         "--max-names-per-request",
                                         "Resource names one request may hold.", ge=1)
    max_names_per_stream: int = setting(_SERVER.max_names_per_stream,
                                        "--max-names-per-stream",
                                        "Resource names one stream may subscribe to at once "
                                        "(all types).", ge=1)
    max_send_message_bytes: int = setting(_SERVER.max_send_message_bytes, "--max-message-bytes",
                                          "Largest response sent.", ge=1)
    max_receive_message_bytes: int = setting(_SERVER.max_receive_message_bytes,
                                             "--max-receive-message-bytes",
                                             "Largest request accepted.", ge=1)
    keepalive_time: Seconds = setting(_SERVER.keepalive_time, "--keepalive-time",
                                      "Time between server keepalive pings.", gt=0)
    keepalive_timeout: Seconds = setting(_SERVER.keepalive_timeout, "--keepalive-timeout",
                                         "A ping unanswered this long closes the connection.",
                                         gt=0)
    min_client_ping_interval: Seconds = setting(
        _SERVER.min_client_ping_interval, "--min-client-ping-interval",
        "Clients pinging more often are told off (GOAWAY).", ge=0)
    shutdown_grace: Seconds = setting(_SERVER.shutdown_grace, "--shutdown-grace",
                                      "Time to finish in-flight work on SIGTERM.", ge=0)
    first_request_timeout: Seconds = setting(
        _SERVER.first_request_timeout, "--first-request-timeout",
        "A stream that sends no request this long after opening is ended (DEADLINE_EXCEEDED).",
        gt=0)
    max_stream_opens_per_second: float = setting(
        _SERVER.max_stream_opens_per_second, "--max-stream-opens-per-second",
        "Stream opens admitted a second (a token bucket); more are refused with UNAVAILABLE so "
        "clients back off. 0: no limit.", ge=0)
    stream_open_burst: int = setting(
        _SERVER.stream_open_burst, "--stream-open-burst",
        "Stream opens admitted at once above the rate (the bucket's size).", ge=1)
    max_initializing_streams: int = setting(
        _SERVER.max_initializing_streams, "--max-initializing-streams",
        "Streams being brought to their first full config at once; more opens are refused with "
        "UNAVAILABLE. 0: no cap.", ge=0)
    first_config_timeout: Seconds = setting(
        _SERVER.first_config_timeout, "--first-config-timeout",
        "A stream not settled this long after opening stops counting against "
        "--max-initializing-streams.", gt=0)
    load_report_interval: Seconds = setting(
        _LRS.interval, "--load-report-interval",
        "How often sidecars send their load reports (LRS: requests, errors and in-flight per "
        "destination Service, for the metrics autoscalers read and the /ui page). At least 1s.",
        ge=1)
    workers: int = setting(
        1, "--workers",
        "Server processes on this machine (one per core given): each serves the same xDS "
        "ports (SO_REUSEPORT) from the same sources; worker 0 also runs the admin API and "
        "webhook. More than 1 needs shared state (--redis-url) and fixed ports. At most 64.",
        ge=1, le=64)
    control_plane_id: str | None = setting(
        None, "--control-plane-id",
        "Identifier in every response's control_plane field.",
        default_text="xds-server@HOSTNAME")


class SourcesSection(Section):
    source: DirectoryPath | None = setting(
        None, "--source", "Directory of Kubernetes-shaped YAML (Services, EndpointSlices, Pods, "
        "HTTPRoutes, policies), hot-reloaded.")
    resources: DirectoryPath | None = setting(
        None, "--resources",
        "Directory of raw Envoy resources (YAML/JSON, typed by @type), hot-reloaded.")
    max_source_file_bytes: int = setting(
        _READS.max_file_bytes, "--max-source-file-bytes",
        "Largest file read from --source or --resources; a larger one is reported and not "
        "read.", ge=1)
    source_links: Links = setting(
        _READS.links, "--source-links",
        "Symbolic links followed in --source and --resources: inside (those whose target is "
        "inside the directory, as a mounted ConfigMap's) or any.")


class ScopeSection(Section):
    default_export_to: Words = setting(
        _SCOPE.default_export_to, "--default-export-to",
        "Where services are visible unless they say: '*' (everywhere) or '.' (own namespace "
        "only); a comma-separated list.")
    tenant_label: str = setting(_SCOPE.tenant_label, "--tenant-label",
                                "Namespace label naming a tenant (a hard visibility boundary).",
                                min_length=1)
    outbound_traffic_policy: Annotated[OutboundTrafficPolicy, BeforeValidator(upper_case)] = setting(
        _SCOPE.outbound_traffic_policy, "--outbound-traffic-policy",
        "Where a capture-mode sidecar sends a connection to an address the mesh does not know: "
        "ALLOW_ANY (through, to that address) or REGISTRY_ONLY (refused).")


class KubernetesSection(Section):
    # Defaults of sources/kubernetes.py KubeSettings and sources/leader.py LeaderSettings
    # (written out: importing those loads the Kubernetes client; a test keeps them equal).
    kubeconfig: FilePath | None = setting(
        None, "--kubeconfig", "Follow the mesh in this cluster (a kubeconfig file).")
    in_cluster: bool = setting(
        False, "--in-cluster",
        "Follow the mesh in the cluster this pod runs in (its service account).")
    namespace_selector: str | None = setting(
        None, "--kube-namespace-selector",
        "Label selector: only namespaces matching it are in the mesh (e.g. 'mesh=enabled'); "
        "default every namespace.")
    watch_timeout: Seconds = setting(300.0, "--kube-watch-timeout",
                                     "Server-side watch timeout; each watch picks [t, 2t).", gt=0)
    page_size: int = setting(500, "--kube-page-size", "Objects per list page.", ge=1)
    list_timeout: Seconds = setting(60.0, "--kube-list-timeout", "Timeout of one list call.",
                                    gt=0)
    backoff_initial: Seconds = setting(0.8, "--kube-backoff-initial",
                                       "First retry delay after an API error (doubles).", gt=0)
    backoff_max: Seconds = setting(30.0, "--kube-backoff-max", "Longest retry delay.", gt=0)
    absent_recheck: Seconds = setting(
        30.0, "--kube-absent-recheck", "How often a kind the API server lacks is looked for.",
        gt=0)
    write_status: bool = setting(True, "--kube-write-status",
                                 "Write status conditions on routes and policies.")
    status_retry: Seconds = setting(1.0, "--kube-status-retry",
                                    "Delay before a failed status write is retried.", gt=0)
    leader_election: bool = setting(
        True, "--leader-election",
        "Elect one replica (a Lease) to write status; off: this replica always writes.")
    lease_namespace: str | None = setting(
        None, "--lease-namespace", "Namespace of the Lease.",
        default_text="the pod's own, or default")
    lease_name: str = setting("xds-server", "--lease-name", "Name of the Lease.", min_length=1)
    leader_identity: str | None = setting(
        None, "--leader-identity",
        "This replica's name in the Lease.", default_text="HOSTNAME_<random>")
    lease_duration: Seconds = setting(15.0, "--lease-duration",
                                      "A Lease not renewed this long may be taken over.")
    renew_deadline: Seconds = setting(10.0, "--lease-renew-deadline",
                                      "The leader steps down when it cannot renew this long.")
    retry_period: Seconds = setting(2.0, "--lease-retry-period",
                                    "Time between attempts to take or renew the Lease.")

    @model_validator(mode="after")
    def _lease_timing(self) -> KubernetesSection:
        if not self.lease_duration > self.renew_deadline > 1.2 * self.retry_period > 0:
            raise ConfigError("--lease-duration > --lease-renew-deadline > 1.2 x "
                              "--lease-retry-period > 0 is required")
        return self

    @property
    def enabled(self) -> bool:
        return self.kubeconfig is not None or self.in_cluster


class AuthSection(Section):
    mode: AuthMode | None = setting(
        None, "--auth",
        "Required. How proxies prove who they are. tokens: a bearer token in the stream's "
        "metadata (a workload token of this server, or a Kubernetes service-account token "
        "checked with TokenReview). insecure-node-metadata: believe the node metadata "
        "(loopback demos only). none: no authentication and no SDS secrets.", required=True)
    token_audiences: Words = setting(
        _SECURITY.token_audiences, "--token-audience",
        "Audience Kubernetes tokens must be minted for (TokenReview); repeatable.",
        repeatable=True)
    revocation_check_seconds: Seconds = setting(
        _GUARD.revocation_check_seconds, "--revocation-check-interval",
        "How often open streams' tokens are checked against revocations.", gt=0)


class LimitsSection(Section):
    max_streams_per_identity: int = setting(
        _GUARD.max_streams_per_identity, "--max-streams-per-identity",
        "Open xDS streams one identity may hold per pod it proves: a pod-bound token's pod, "
        "or a mesh pod of that service account whose IP the stream comes from (0: unbounded).",
        ge=0)
    max_unverified_streams_per_identity: int = setting(
        _GUARD.max_unverified_streams_per_identity, "--max-unverified-streams-per-identity",
        "Open xDS streams one identity may hold, all together, from pods it does not prove "
        "(unknown pod, another service account or IP): a leaked token fills only this pool, "
        "never a proven pod's (0: unbounded).", ge=0)
    max_requests_per_second: float = setting(
        _GUARD.max_requests_per_second, "--max-requests-per-second",
        "Requests per second per stream (0: unbounded).", ge=0)
    request_burst: int | None = setting(
        None, "--request-burst",
        "Requests a stream may send at once above the rate.",
        default_text="5 s worth of --max-requests-per-second", ge=1)


class CaSection(Section):
    ca_dir: Path = setting(
        _SECURITY.ca_dir, "--ca-dir",
        "Directory of the CA files (created with a self-signed root when empty) and of the "
        "workload token key.")
    trust_domain: str = setting(_SECURITY.trust_domain, "--trust-domain",
                                "SPIFFE trust domain of the workload certificates.")
    workload_ttl: Lifetime = setting(
        _SECURITY.workload_ttl, "--workload-ttl",
        "Lifetime of workload certificates (renewed at half-life; at most 7d).")
    key_algorithm: KeyAlgorithm = setting(
        KeyAlgorithm(_SECURITY.key_algorithm), "--key-algorithm",
        "Key type of a new root and of workload keys generated for Envoy.")
    clock_skew: Lifetime = setting(
        _SECURITY.clock_skew, "--clock-skew",
        "How far peers' clocks may be off: an old root stays trusted this long past its last "
        "leaf during a root rotation.")
    renewal_jitter: float = setting(
        _SECURITY.renewal_jitter, "--renewal-jitter",
        "Fraction of a certificate's lifetime renewals are spread over.", ge=0, le=0.5)
    rotation_startup_grace: Lifetime = setting(
        _SECURITY.rotation_startup_grace, "--rotation-startup-grace",
        "After a start, a root rotation waits this long before switching signing "
        "(proxies reconnect first).")
    watch_ca_files: bool = setting(_SECURITY.watch_ca_files, "--watch-ca-files",
                                   "Reload the CA files when they change.")
    ca_secret: Annotated[str | None, BeforeValidator(_off)] = setting(
        _SECURITY.ca_secret, "--ca-secret",
        "In a cluster: the Secret (in the server's namespace) holding the one CA and token key "
        "of every replica; created by the Lease holder when missing, watched by all. 'off': "
        "each replica keeps its own in --ca-dir.", min_length=1)
    ca_plugin_secret: Annotated[str | None, BeforeValidator(_off)] = setting(
        _SECURITY.ca_plugin_secret, "--ca-plugin-secret",
        "In a cluster: an operator's CA Secret (ca-cert.pem, ca-key.pem, root-cert.pem, "
        "cert-chain.pem) that wins over a generated root when --ca-secret is first created; "
        "'off': none.", min_length=1)


class SharedSection(Section):
    redis_url: str | None = setting(
        None, "--redis-url",
        "Share state with the other replicas through this Redis (redis://HOST:PORT/DB or "
        "rediss://...): one CA and token key for all (sealed with --state-key-file), workload-"
        "token revocations on every replica. No password in the URL (--redis-password-file).",
        default_text="none: this process only", pattern=r"^rediss?://")
    redis_password_file: FilePath | None = setting(
        None, "--redis-password-file", "File holding the Redis password (e.g. a mounted Secret).")
    redis_ca_file: FilePath | None = setting(
        None, "--redis-ca-file", "PEM roots that verify a rediss:// server.",
        default_text="the system's")
    redis_key_prefix: str = setting(
        "xds-server:", "--redis-key-prefix",
        "Prefix of every key and channel (control planes sharing one Redis use different ones).",
        min_length=1)
    redis_timeout: Seconds = setting(2.0, "--redis-timeout",
                                     "Longest one Redis operation (and connect) may take.", gt=0)
    state_key_file: FilePath | None = setting(
        None, "--state-key-file",
        "The key sealing every secret in shared state: 32 random bytes, base64 (`xds-server "
        "state-key create`); the same file on every replica. Required with --redis-url.")
    replica_id: str | None = setting(
        None, "--replica-id", "This replica's name in shared state.",
        default_text="HOSTNAME-PID", min_length=1)

    @model_validator(mode="after")
    def _key_with_redis(self) -> SharedSection:
        if self.redis_url and self.state_key_file is None:
            raise ConfigError("--redis-url needs --state-key-file (the key sealing shared "
                              "secrets; `xds-server state-key create` writes one)")
        return self


class MeshSection(Section):
    mtls_mode: Annotated[MtlsMode, BeforeValidator(upper_case)] = setting(
        _MESH.default_mode, "--mtls-mode",
        "Mesh default for workloads no MTLSPolicy covers (with certificates on, i.e. --auth "
        "other than none; without them everything is plaintext).")
    root_namespace: str = setting(
        _MESH.root_namespace, "--root-namespace",
        "Policies here apply mesh-wide: an MTLSPolicy without selector is the mesh default "
        "mode, AuthorizationPolicies apply in every namespace.", min_length=1)
    default_deny: bool = setting(
        _MESH.default_deny, "--default-deny",
        "Mesh-wide default-deny: a request is allowed only if an ALLOW AuthorizationPolicy "
        "matches it.")


class AdminSection(Section):
    address: OptionalAddress = setting(
        _ADMIN.address, "--admin-address",
        "HOST:PORT for the admin HTTP API (health, metrics, proxies, CA); 'off' disables it.")
    tokens_file: FilePath | None = setting(
        None, "--admin-tokens-file",
        "YAML/JSON {tokens: [{name, role: read|admin, token_sha256 | token}]}; also read from "
        f"${ADMIN_TOKENS_ENV}. No tokens: /api refuses all.")
    mtls: bool = setting(
        False, "--admin-mtls",
        "Serve the admin API over TLS, requiring client certificates from the mesh CA.")
    docs: bool = setting(
        False, "--admin-docs",
        "Serve interactive API docs at /docs and /redoc (Swagger UI and ReDoc, their files "
        "served by this server: nothing is fetched from elsewhere); /openapi.json is always "
        "served.")
    max_body_bytes: int = setting(
        _ADMIN.max_body_bytes, "--admin-max-body-bytes",
        "Largest admin API request body, for every transfer encoding (a chunked body is "
        "counted as it arrives); refused with 413 before it is buffered or authenticated.",
        ge=1)
    identity_namespace: str = setting(
        _ADMIN.identity_namespace, "--admin-identity-namespace",
        "Namespace in the admin server's own SPIFFE ID (its --admin-mtls certificate).")
    identity_service_account: str = setting(
        _ADMIN.identity_service_account, "--admin-identity-service-account",
        "Service account in the admin server's own SPIFFE ID.")


class WebhookSection(Section):
    address: OptionalAddress = setting(
        None, "--webhook-address",
        "HOST:PORT for the sidecar-injection admission webhook (HTTPS with a mesh-CA "
        "certificate: needs --auth other than none); 'off' disables it.", default_text="off")
    service: str = setting(_WEBHOOK.service, "--webhook-service",
                           "The Service the API server calls the webhook at: its certificate "
                           "names <service>.<namespace>.svc.", min_length=1)
    namespace: str = setting(_WEBHOOK.namespace, "--webhook-namespace",
                             "Namespace of that Service.", min_length=1)
    configuration: str = setting(
        _WEBHOOK.configuration, "--webhook-configuration",
        "MutatingWebhookConfiguration whose caBundle the server keeps on the mesh roots (with "
        "--kubeconfig/--in-cluster); empty: leave it alone.")
    proxy_image: str = setting(_INJECTOR.proxy_image, "--proxy-image",
                               "Image of injected sidecars (xds-server, Envoy, iptables).",
                               min_length=1)
    init_image: str = setting("", "--proxy-init-image",
                              "Image of the injected capture init container.",
                              default_text="--proxy-image")
    xds_address: str = setting(_INJECTOR.xds_address, "--inject-xds-address",
                               "Where injected sidecars reach the server (HOST:PORT).")
