"""What the injector puts into pods, and where the webhook listens. Plain dataclasses (the
CLI and the settings tree read them on every start: nothing heavy is imported here)."""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, field

from ..config import ConfigError, parse_address


def _version() -> str:
    try:
        return importlib.metadata.version("xds-server")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - not installed
        return "dev"


VERSION = _version()
# One image holds `xds-server` (the bootstrap, the capture rules), Envoy and iptables, as
# Istio's proxyv2 image does for istio-init and istio-proxy. The Dockerfile does not build it
# yet: set --proxy-image to yours.
DEFAULT_PROXY_IMAGE = f"xds-server-proxy:{VERSION}"
# manifests/service.yaml: the Service xds-server in xds-system. With a token (the default),
# sidecars use mutual TLS on grpc-xds-tls and their agent gets its SVID on grpc-xds-token; the
# plaintext grpc-xds port serves only pods injected without a token (a loopback/lab server).
DEFAULT_XDS_ADDRESS = "xds-server.xds-system.svc:15010"
DEFAULT_XDS_TLS_ADDRESS = "xds-server.xds-system.svc:15012"
DEFAULT_CA_ADDRESS = "xds-server.xds-system.svc:15013"
# A name in the server's certificate (manifests: XDS_SERVER_XDS_TLS_SAN).
DEFAULT_SERVER_NAME = "xds-server.xds-system.svc"
# What the server checks Kubernetes tokens for (security.DEFAULT_TOKEN_AUDIENCE, --token-audience).
DEFAULT_TOKEN_AUDIENCE = "xds-server"
LOG_LEVELS = ("trace", "debug", "info", "warning", "error", "critical", "off")


@dataclass(frozen=True)
class InjectorSettings:
    """The sidecar an injected pod gets."""

    proxy_image: str = DEFAULT_PROXY_IMAGE
    init_image: str = ""  # the capture init container's image; empty: proxy_image
    image_pull_policy: str = "IfNotPresent"
    xds_address: str = DEFAULT_XDS_ADDRESS  # plaintext, for pods injected without a token
    # Audience of the projected service-account token the workload agent presents to the
    # server's certificate service (the server's --token-audience); empty: no token and no
    # agent, the sidecar on plaintext `xds_address` (--auth insecure-node-metadata or none).
    token_audience: str = DEFAULT_TOKEN_AUDIENCE
    xds_tls_address: str = DEFAULT_XDS_TLS_ADDRESS  # the sidecar's mutual-TLS xDS
    ca_address: str = DEFAULT_CA_ADDRESS  # the agent's certificate service (tokens over TLS)
    server_name: str = DEFAULT_SERVER_NAME  # checked in the server's certificate
    # The mesh roots (PEM) the agent trusts at first contact. The webhook fills them in from
    # the CA at every admission; `xds-server inject` takes --ca-bundle.
    ca_bundle_pem: str = ""
    agent_ready_port: int = 15020  # the agent's /healthz/ready
    # Istio's istio-token lives 12 h; the kubelet refreshes the file at 80 % of it.
    token_expiration_seconds: int = 43200
    proxy_uid: int = 1337
    proxy_gid: int = 1337
    readiness_port: int = 15021
    concurrency: int = 2  # Envoy worker threads
    log_level: str = "warning"

    @property
    def capture_image(self) -> str:
        return self.init_image or self.proxy_image

    def check(self, *, require_bundle: bool = False) -> InjectorSettings:
        """Raises ConfigError naming the option of a bad value. `require_bundle`: the roots
        must be known now (`xds-server inject`; the webhook adds them per admission)."""
        if not self.proxy_image.strip():
            raise ConfigError("--proxy-image: must not be empty")
        if not self.xds_address.startswith("unix:"):
            parse_address(self.xds_address, "--xds-address")
        parse_address(self.xds_tls_address, "--xds-tls-address")
        parse_address(self.ca_address, "--ca-address")
        if require_bundle and self.token_audience and \
                "-----BEGIN CERTIFICATE-----" not in self.ca_bundle_pem:
            raise ConfigError("--ca-bundle: the mesh roots (PEM) the workload agent trusts at first "
                              "contact, e.g. the injector webhook's caBundle: kubectl get "
                              "mutatingwebhookconfiguration xds-server-sidecar-injector -o "
                              "jsonpath='{.webhooks[0].clientConfig.caBundle}' | base64 -d")
        if not 1 <= self.agent_ready_port <= 65535 or self.agent_ready_port == self.readiness_port:
            raise ConfigError(f"agent readiness port {self.agent_ready_port}: not a free port")
        if self.image_pull_policy not in ("Always", "IfNotPresent", "Never"):
            raise ConfigError(f"--image-pull-policy: {self.image_pull_policy!r} is not Always, "
                              "IfNotPresent or Never")
        if not 600 <= self.token_expiration_seconds <= 2**31 - 1:
            raise ConfigError("token expiration: at least 600 seconds (the API server's minimum)")
        if not 1 <= self.readiness_port <= 65535:
            raise ConfigError(f"readiness port {self.readiness_port}: not a port (1-65535)")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"--proxy-log-level: {self.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
        if self.concurrency < 0:
            raise ConfigError("--proxy-concurrency: must be 0 (one per CPU) or more")
        return self


@dataclass
class WebhookSettings:
    """The admission webhook of `serve` (`--webhook-address`)."""

    address: str = "127.0.0.1:15017"
    # The Service the API server calls: the serving certificate names <service>.<namespace>.svc.
    service: str = "xds-server"
    namespace: str = "xds-system"
    # The MutatingWebhookConfiguration whose caBundle the server keeps on the mesh roots (with
    # the Kubernetes source); empty: nobody does.
    configuration: str = "xds-server-sidecar-injector"
    injector: InjectorSettings = field(default_factory=InjectorSettings)

    @property
    def dns_names(self) -> tuple[str, ...]:
        base = f"{self.service}.{self.namespace}"
        return (f"{base}.svc", f"{base}.svc.cluster.local", base, self.service)
