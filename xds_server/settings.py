"""Every setting of `xds-server serve`, in one tree (pydantic-settings).

    logging     --log-level, --log-format (options of `xds-server` itself, before `serve`)
    xds         the gRPC server: address, debouncing, push and message bounds, keepalive
    sources     the mesh directory and the raw-resources directory
    scope       which services a proxy sees (export defaults, tenant label)
    kubernetes  the cluster source: watches, status writing, leader election
    auth        how proxies prove who they are (--auth), TokenReview audiences
    limits      bounds per identity and per stream
    ca          the built-in CA and workload certificates (SDS)
    mesh        mesh-wide mTLS and authorization defaults
    admin       the admin HTTP API

Each leaf has exactly one flag and one environment variable, named alike: `--xds-address`
and `XDS_SERVER_XDS_ADDRESS` (`ENV_PREFIX` + the flag in capitals). A flag wins over the
environment, the environment over the default. The `serve` options are generated from this
tree (`cli.py`), so a setting cannot exist without its flag, variable and help text, and a
test checks that the README's table lists them all.

The tree is validated once, naming the flag and variable of any bad value, and then builds
the dataclasses the other modules define (`ServeSettings.app_config()`): those stay plain
and free of pydantic, and this is the only place that knows how operator input maps to them.
Durations take the one grammar of config.py ('1.5s', '100ms', '1h30m', '7d', or seconds).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, replace
from datetime import timedelta
from enum import Enum
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    DirectoryPath,
    Field,
    FilePath,
    JsonValue,
    ValidationError,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from .admin.auth import ENV_TOKENS as ADMIN_TOKENS_ENV
from .admin.settings import AdminSettings
from .app import AppConfig, KubernetesConfig
from .ca.authority import KeyAlgorithm
from .config import ConfigError, parse_address, parse_duration
from .model.security import MtlsMode, SecuritySettings
from .security import DEFAULT_TOKEN_AUDIENCE, SecurityConfig
from .translate.scope import ScopeSettings
from .xds.auth import AuthMode, GuardSettings
from .xds.server import ServerSettings

ENV_PREFIX = "XDS_SERVER_"
# Admin API tokens in clear (ADMIN_TOKENS_ENV) are a secret: environment only, read by
# admin/auth.py, never a flag (command lines are visible to every user of the machine).

# The environment `ServeSettings.load` reads, when not os.environ (tests, tools).
_ENVIRON: ContextVar[Mapping[str, str] | None] = ContextVar("xds_server_environ", default=None)

_SERVER = ServerSettings()
_GUARD = GuardSettings()
_SECURITY = SecurityConfig()
_ADMIN = AdminSettings()
_SCOPE = ScopeSettings()
_MESH = SecuritySettings()


def setting(default: Any, flag: str, help: str, *, repeatable: bool = False,
            required: bool = False, default_text: str = "", **constraints: Any) -> Any:
    """A leaf of the tree: its default, its flag (the variable follows) and its help.
    `repeatable`: the flag may be given more than once (a list). `required`: `serve` refuses
    to start without it (the tree itself can be built without, for tools and tests).
    `default_text`: what a None default means."""
    extra: dict[str, JsonValue] = {"flag": flag, "repeatable": repeatable,
                                   "required": required, "default_text": default_text}
    return Field(default, description=help, json_schema_extra=extra, **constraints)


# Value types ------------------------------------------------------------------------------


def _seconds(value: object) -> float:
    return parse_duration(value, settings_form=True)


def _timedelta(value: object) -> timedelta:
    return value if isinstance(value, timedelta) else timedelta(seconds=_seconds(value))


def _address(value: str) -> str:
    parse_address(value)
    return value


def _optional_address(value: object) -> object:
    """'off' (or none, disabled, empty) turns a listener off."""
    if value is None or str(value).strip().lower() in ("", "off", "none", "disabled"):
        return None
    return value


def _word_list(value: object) -> object:
    """A comma- or space-separated list, as flags and environment variables carry one."""
    if isinstance(value, str):
        return tuple(v for v in value.replace(",", " ").split() if v)
    if isinstance(value, (list, tuple)):
        return tuple(w for item in value for w in str(item).replace(",", " ").split() if w)
    return value


def _upper(value: object) -> object:
    return value.upper() if isinstance(value, str) else value


Seconds = Annotated[float, BeforeValidator(_seconds)]
Lifetime = Annotated[timedelta, BeforeValidator(_timedelta)]
Address = Annotated[str, AfterValidator(_address)]
Words = Annotated[tuple[str, ...], BeforeValidator(_word_list)]


class Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# Sections ---------------------------------------------------------------------------------


class LoggingSection(Section):
    level: Literal["debug", "info", "warning", "error"] = setting(
        "info", "--log-level", "Least severe level logged.")
    format: Literal["auto", "json", "text"] = setting(
        "auto", "--log-format", "auto: text on a terminal, JSON otherwise.")


class XdsSection(Section):
    address: Address = setting(_SERVER.address, "--xds-address",
                               "HOST:PORT for xDS gRPC (plaintext).")
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


class ScopeSection(Section):
    default_export_to: Words = setting(
        _SCOPE.default_export_to, "--default-export-to",
        "Where services are visible unless they say: '*' (everywhere) or '.' (own namespace "
        "only); a comma-separated list.")
    tenant_label: str = setting(_SCOPE.tenant_label, "--tenant-label",
                                "Namespace label naming a tenant (a hard visibility boundary).",
                                min_length=1)


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
        "Open xDS streams one identity may hold (0: unbounded).", ge=0)
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


class MeshSection(Section):
    mtls_mode: Annotated[MtlsMode, BeforeValidator(_upper)] = setting(
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
    address: Annotated[Address | None, BeforeValidator(_optional_address)] = setting(
        _ADMIN.address, "--admin-address",
        "HOST:PORT for the admin HTTP API (health, metrics, proxies, CA); 'off' disables it.")
    tokens_file: FilePath | None = setting(
        None, "--admin-tokens-file",
        "YAML/JSON {tokens: [{name, role: read|admin, token_sha256 | token}]}; also read from "
        f"${ADMIN_TOKENS_ENV}. No tokens: /api refuses all.")
    mtls: bool = setting(
        False, "--admin-mtls",
        "Serve the admin API over TLS, requiring client certificates from the mesh CA.")
    identity_namespace: str = setting(
        _ADMIN.identity_namespace, "--admin-identity-namespace",
        "Namespace in the admin server's own SPIFFE ID (its --admin-mtls certificate).")
    identity_service_account: str = setting(
        _ADMIN.identity_service_account, "--admin-identity-service-account",
        "Service account in the admin server's own SPIFFE ID.")


# The tree ---------------------------------------------------------------------------------


class ServeSettings(BaseSettings):
    """Everything `xds-server serve` can be told. `load()` reads flags and the environment."""

    model_config = SettingsConfigDict(frozen=True, extra="forbid")

    logging: LoggingSection = Field(default_factory=LoggingSection)
    xds: XdsSection = Field(default_factory=XdsSection)
    sources: SourcesSection = Field(default_factory=SourcesSection)
    scope: ScopeSection = Field(default_factory=ScopeSection)
    kubernetes: KubernetesSection = Field(default_factory=KubernetesSection)
    auth: AuthSection = Field(default_factory=AuthSection)
    limits: LimitsSection = Field(default_factory=LimitsSection)
    ca: CaSection = Field(default_factory=CaSection)
    mesh: MeshSection = Field(default_factory=MeshSection)
    admin: AdminSection = Field(default_factory=AdminSection)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Flags (passed as init values) over XDS_SERVER_<FLAG> variables; nothing else.
        return init_settings, FlagNamedEnvironment(settings_cls)

    @model_validator(mode="after")
    def _cluster_choice(self) -> ServeSettings:
        kube = self.kubernetes
        if kube.kubeconfig is not None and kube.in_cluster:
            raise ConfigError("--kubeconfig and --in-cluster exclude each other")
        if kube.namespace_selector and not kube.enabled:
            raise ConfigError("--kube-namespace-selector needs --kubeconfig or --in-cluster")
        return self

    @classmethod
    def load(cls, flags: Mapping[str, Mapping[str, Any]] | None = None,
             environ: Mapping[str, str] | None = None) -> ServeSettings:
        """The settings from `flags` ({section: {field: value}}, what the command line gave)
        over the environment (`environ`, default os.environ). Raises ConfigError naming each
        bad setting's flag and variable."""
        token = _ENVIRON.set(environ)
        try:
            values: dict[str, Any] = {name: dict(fields) for name, fields in (flags or {}).items()}
            return cls(**values)
        except ValidationError as err:
            raise ConfigError(describe_errors(err)) from None
        finally:
            _ENVIRON.reset(token)

    def app_config(self) -> AppConfig:
        """The dataclasses the server's modules take, built from this tree."""
        if self.auth.mode is None:
            raise ConfigError(f"Missing option --auth (or {leaf_by_path('auth.mode').env}): "
                              "choose tokens, insecure-node-metadata or none")
        x, limits = self.xds, self.limits
        server = ServerSettings(
            address=x.address, debounce_quiet=x.debounce_quiet, debounce_max=x.debounce_max,
            max_concurrent_pushes=x.max_concurrent_pushes, slow_write_seconds=x.slow_write_seconds,
            keepalive_time=x.keepalive_time, keepalive_timeout=x.keepalive_timeout,
            min_client_ping_interval=x.min_client_ping_interval,
            max_receive_message_bytes=x.max_receive_message_bytes,
            max_send_message_bytes=x.max_send_message_bytes,
            max_concurrent_streams=x.max_concurrent_streams,
            max_pending_streams=x.max_pending_streams,
            max_names_per_request=x.max_names_per_request, shutdown_grace=x.shutdown_grace,
        )
        if x.control_plane_id:
            server.control_plane_id = x.control_plane_id
        guard = GuardSettings(
            max_streams_per_identity=limits.max_streams_per_identity,
            max_requests_per_second=limits.max_requests_per_second,
            request_burst=(limits.request_burst if limits.request_burst is not None
                           else max(1, int(limits.max_requests_per_second * 5))),
            revocation_check_seconds=self.auth.revocation_check_seconds,
        )
        ca = self.ca
        security = SecurityConfig(
            auth=self.auth.mode, ca_dir=ca.ca_dir, trust_domain=ca.trust_domain,
            workload_ttl=ca.workload_ttl,
            token_audiences=self.auth.token_audiences or (DEFAULT_TOKEN_AUDIENCE,),
            key_algorithm=ca.key_algorithm, limits=guard, clock_skew=ca.clock_skew,
            renewal_jitter=ca.renewal_jitter, rotation_startup_grace=ca.rotation_startup_grace,
            watch_ca_files=ca.watch_ca_files,
        )
        admin = None
        if self.admin.address is not None:
            admin = AdminSettings(
                address=self.admin.address, tokens_file=self.admin.tokens_file,
                mtls=self.admin.mtls, identity_namespace=self.admin.identity_namespace,
                identity_service_account=self.admin.identity_service_account,
            )
        mesh = SecuritySettings(default_mode=self.mesh.mtls_mode,
                                root_namespace=self.mesh.root_namespace,
                                default_deny=self.mesh.default_deny)
        return AppConfig(
            server=server, source=self.sources.source, resources=self.sources.resources,
            scope=ScopeSettings(default_export_to=self.scope.default_export_to or ("*",),
                                tenant_label=self.scope.tenant_label),
            kubernetes=self._kubernetes_config(), admin=admin, security=security,
            mesh_security=mesh,
        )

    def _kubernetes_config(self) -> KubernetesConfig | None:
        kube = self.kubernetes
        if not kube.enabled:
            return None
        # Imported here: they load the Kubernetes client, which only this case needs.
        from .sources.kubernetes import KubeSettings
        from .sources.leader import LeaderSettings

        leader = None
        if kube.leader_election:
            leader = LeaderSettings(name=kube.lease_name, lease_duration=kube.lease_duration,
                                    renew_deadline=kube.renew_deadline,
                                    retry_period=kube.retry_period)
            if kube.leader_identity:
                leader = replace(leader, identity=kube.leader_identity)
        watch = KubeSettings(
            namespace_selector=kube.namespace_selector or None,
            watch_timeout=kube.watch_timeout, page_size=kube.page_size,
            list_timeout=kube.list_timeout, backoff_initial=kube.backoff_initial,
            backoff_max=kube.backoff_max, absent_recheck=kube.absent_recheck,
            write_status=kube.write_status, leader=leader, status_retry=kube.status_retry,
        )
        return KubernetesConfig(kubeconfig=kube.kubeconfig, in_cluster=kube.in_cluster,
                                namespace_selector=kube.namespace_selector or None,
                                lease_namespace=kube.lease_namespace, watch=watch)


# Leaves: flags and environment variables ------------------------------------------------------


@dataclass(frozen=True)
class Leaf:
    """One setting: `section.name` in the tree, `flag` on the command line, `env`."""

    section: str
    name: str
    info: FieldInfo

    @property
    def flag(self) -> str:
        return str(self._extra["flag"])

    @property
    def repeatable(self) -> bool:
        return bool(self._extra.get("repeatable"))

    @property
    def required(self) -> bool:
        return bool(self._extra.get("required"))

    @property
    def _extra(self) -> dict[str, Any]:
        extra = self.info.json_schema_extra
        assert isinstance(extra, dict)
        return extra

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.flag.removeprefix("--").upper().replace("-", "_")

    @property
    def path(self) -> str:
        return f"{self.section}.{self.name}"

    @property
    def help(self) -> str:
        return self.info.description or ""

    @property
    def default(self) -> Any:
        return self.info.get_default(call_default_factory=True)

    @property
    def kind(self) -> str:
        """What the value is, for the command line: flag (a boolean), choice, duration,
        address, integer, number, path, list or text."""
        validators = {getattr(m, "func", None) for m in self.info.metadata}
        if _seconds in validators or _timedelta in validators:
            return "duration"
        if _address in validators or _optional_address in validators:
            return "address"
        if _word_list in validators:
            return "list"
        base = _base_type(self.info.annotation)
        if base is bool:
            return "flag"
        if self.choices():
            return "choice"
        for kind, types in (("integer", int), ("number", float), ("path", Path)):
            if isinstance(base, type) and issubclass(base, types):
                return kind
        return "text"

    def choices(self) -> tuple[str, ...]:
        base = _base_type(self.info.annotation)
        if get_origin(base) is Literal:
            return tuple(str(a) for a in get_args(base))
        if isinstance(base, type) and issubclass(base, Enum):
            return tuple(str(m.value) for m in base)
        return ()

    @property
    def shown_default(self) -> str:
        """The default as an operator writes it."""
        value = self.default
        if self.required:
            return "required"
        if value is None and self._extra.get("default_text"):
            return str(self._extra["default_text"])
        if value is None:
            return "none"
        if isinstance(value, bool):
            return "on" if value else "off"
        if isinstance(value, Enum):
            return str(value.value)
        if isinstance(value, timedelta):
            return format_duration(value.total_seconds())
        if self.kind == "duration":
            return format_duration(float(value))
        if isinstance(value, tuple):
            return ",".join(value)
        return str(value)


def _base_type(annotation: Any) -> Any:
    """`X` of `X | None` and of `Annotated[X, ...]`."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) in (Union, UnionType) and len(args) == 1:
        annotation = args[0]
    if get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    return annotation


def format_duration(seconds: float) -> str:
    """Seconds as the grammar writes them: 24h, 30s, 0.8s, 100ms."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= 2 * size and seconds % size == 0 or seconds == size < 86400:
            return f"{int(seconds // size)}{unit}"
    if 0 < seconds < 1 and (seconds * 1000) == int(seconds * 1000):
        return f"{int(seconds * 1000)}ms"
    return f"{seconds:g}s"


def leaves(sections: tuple[str, ...] | None = None) -> Iterator[Leaf]:
    """Every leaf of the tree, in order (only those of `sections` when given)."""
    for section, info in ServeSettings.model_fields.items():
        if sections is not None and section not in sections:
            continue
        model = info.annotation
        assert isinstance(model, type) and issubclass(model, Section)
        for name, leaf_info in model.model_fields.items():
            yield Leaf(section, name, leaf_info)


def leaf_by_path(path: str) -> Leaf:
    return next(leaf for leaf in leaves() if leaf.path == path)


def environment_values(environ: Mapping[str, str],
                       sections: tuple[str, ...] | None = None) -> dict[str, dict[str, Any]]:
    """{section: {field: text}} from the XDS_SERVER_<FLAG> variables that are set (an empty
    variable counts as unset, as click treats it)."""
    values: dict[str, dict[str, Any]] = {}
    for leaf in leaves(sections):
        text = environ.get(leaf.env)
        if text:
            # choices in any case, as their flags take them (`--mtls-mode strict`)
            canonical = [c for c in leaf.choices() if c.lower() == text.strip().lower()]
            values.setdefault(leaf.section, {})[leaf.name] = canonical[0] if canonical else text
    return values


class FlagNamedEnvironment(PydanticBaseSettingsSource):
    """pydantic-settings source: each leaf from the variable named after its flag."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ reads the whole tree at once

    def __call__(self) -> dict[str, Any]:
        environ = _ENVIRON.get()
        return environment_values(os.environ if environ is None else environ)


def describe_errors(err: ValidationError, section: str = "") -> str:
    """One line per problem, naming the flag and variable: '--workload-ttl /
    XDS_SERVER_WORKLOAD_TTL: invalid duration 'soon' ...'. `section`: the errors are of that
    section's model alone."""
    by_path = {(leaf.section, leaf.name): leaf for leaf in leaves()}
    lines = []
    for error in err.errors():
        message = str(error["msg"]).removeprefix("Value error, ")
        loc = tuple(str(part) for part in ((section,) if section else ()) + tuple(error["loc"]))
        leaf = by_path.get((loc[0], loc[1])) if len(loc) >= 2 else None
        if leaf is not None:
            got = error.get("input")
            shown = (f" (got {got!r})" if isinstance(got, (str, int, float))
                     and repr(got) not in message else "")
            lines.append(f"{leaf.flag} / {leaf.env}: {message}{shown}")
        else:
            lines.append(message)
    return "\n".join(lines)
