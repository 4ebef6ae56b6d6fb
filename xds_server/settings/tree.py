"""The tree: `ServeSettings`, how flags and variables fill it, and the dataclasses it
builds for the server's modules."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import replace
from typing import Any

from pydantic import Field, ValidationError, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from ..admin.settings import AdminSettings
from ..app import AppConfig, KubernetesConfig
from ..config import ConfigError
from ..inject.settings import InjectorSettings, WebhookSettings
from ..model.security import SecuritySettings
from ..security import DEFAULT_TOKEN_AUDIENCE, SecurityConfig
from ..sources.reading import ReadLimits
from ..shared.store import RedisSettings, SharedConfig, default_replica_id
from ..translate.scope import ScopeSettings
from ..xds.auth import AuthMode, GuardSettings
from ..xds.lrs import LrsSettings
from ..xds.server import ServerSettings
from .leaf import Leaf, Section
from .sections import (
    AdminSection,
    AuthSection,
    CaSection,
    KubernetesSection,
    LimitsSection,
    LoggingSection,
    MeshSection,
    ScopeSection,
    SharedSection,
    SourcesSection,
    WebhookSection,
    XdsSection,
)

# The environment `ServeSettings.load` reads, when not os.environ (tests, tools).
_ENVIRON: ContextVar[Mapping[str, str] | None] = ContextVar("xds_server_environ", default=None)


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
    shared: SharedSection = Field(default_factory=SharedSection)
    mesh: MeshSection = Field(default_factory=MeshSection)
    admin: AdminSection = Field(default_factory=AdminSection)
    webhook: WebhookSection = Field(default_factory=WebhookSection)

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
            address=x.address, unix_socket=x.unix_socket, debounce_quiet=x.debounce_quiet, debounce_max=x.debounce_max,
            max_concurrent_pushes=x.max_concurrent_pushes, slow_write_seconds=x.slow_write_seconds,
            keepalive_time=x.keepalive_time, keepalive_timeout=x.keepalive_timeout,
            min_client_ping_interval=x.min_client_ping_interval,
            max_receive_message_bytes=x.max_receive_message_bytes,
            max_send_message_bytes=x.max_send_message_bytes,
            max_concurrent_streams=x.max_concurrent_streams,
            max_pending_streams=x.max_pending_streams,
            max_names_per_request=x.max_names_per_request,
            max_names_per_stream=x.max_names_per_stream, shutdown_grace=x.shutdown_grace,
            first_request_timeout=x.first_request_timeout,
            tls_address=x.tls_address, tls_token_address=x.tls_token_address,
            tls_frontend=x.tls_frontend, tls_handshake_timeout=x.tls_handshake_timeout,
            allow_plaintext_tokens_off_host=x.allow_plaintext_tokens_off_host,
            max_stream_opens_per_second=x.max_stream_opens_per_second,
            stream_open_burst=x.stream_open_burst,
            max_initializing_streams=x.max_initializing_streams,
            first_config_timeout=x.first_config_timeout,
        )
        if x.control_plane_id:
            server.control_plane_id = x.control_plane_id
        guard = GuardSettings(
            max_streams_per_identity=limits.max_streams_per_identity,
            max_unverified_streams_per_identity=limits.max_unverified_streams_per_identity,
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
            watch_ca_files=ca.watch_ca_files, tls_sans=x.tls_sans,
            shared=self._shared_config(), ca_secret=ca.ca_secret,
            ca_plugin_secret=ca.ca_plugin_secret,
        )
        admin = None
        if self.admin.address is not None:
            admin = AdminSettings(
                address=self.admin.address, tokens_file=self.admin.tokens_file,
                mtls=self.admin.mtls, docs=self.admin.docs, max_body_bytes=self.admin.max_body_bytes,
                identity_namespace=self.admin.identity_namespace,
                identity_service_account=self.admin.identity_service_account,
            )
        mesh = SecuritySettings(default_mode=self.mesh.mtls_mode,
                                root_namespace=self.mesh.root_namespace,
                                default_deny=self.mesh.default_deny)
        return AppConfig(
            webhook=self._webhook_config(security),
            server=server, source=self.sources.source, resources=self.sources.resources,
            source_limits=ReadLimits(self.sources.max_source_file_bytes, self.sources.source_links),
            scope=ScopeSettings(default_export_to=self.scope.default_export_to or ("*",),
                                tenant_label=self.scope.tenant_label,
                                outbound_traffic_policy=self.scope.outbound_traffic_policy),
            kubernetes=self._kubernetes_config(), admin=admin, security=security,
            mesh_security=mesh, load_reports=LrsSettings(interval=x.load_report_interval),
        )

    def _shared_config(self) -> SharedConfig | None:
        shared = self.shared
        if not shared.redis_url:
            return None
        if self.auth.mode is AuthMode.NONE:
            raise ConfigError("--redis-url: shared state holds the CA and token revocations, "
                              "which --auth none does not run")
        assert shared.state_key_file is not None  # the section's check
        redis = RedisSettings(url=shared.redis_url, password_file=shared.redis_password_file,
                              ca_file=shared.redis_ca_file, key_prefix=shared.redis_key_prefix,
                              timeout=shared.redis_timeout, connect_timeout=shared.redis_timeout)
        redis.check()
        return SharedConfig(redis=redis, state_key_file=shared.state_key_file,
                            replica=shared.replica_id or default_replica_id())

    def _webhook_config(self, security: SecurityConfig) -> WebhookSettings | None:
        hook = self.webhook
        if hook.address is None:
            return None
        if security.auth is AuthMode.NONE:
            raise ConfigError(f"{leaf_by_path('webhook.address').flag}: the webhook's certificate "
                              "comes from the mesh CA, which --auth none does not run")
        injector = InjectorSettings(proxy_image=hook.proxy_image, init_image=hook.init_image,
                                    xds_address=hook.xds_address,
                                    token_audience=security.token_audiences[0])
        try:
            injector.check()
        except ConfigError as err:
            raise ConfigError(str(err).replace("--xds-address", "--inject-xds-address")) from None
        return WebhookSettings(address=hook.address, service=hook.service,
                               namespace=hook.namespace, configuration=hook.configuration,
                               injector=injector)

    def _kubernetes_config(self) -> KubernetesConfig | None:
        kube = self.kubernetes
        if not kube.enabled:
            return None
        # Imported here: they load the Kubernetes client, which only this case needs.
        from ..sources.kubernetes import KubeSettings
        from ..sources.leader import LeaderSettings

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


# Leaves, variables and errors ---------------------------------------------------------------


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
