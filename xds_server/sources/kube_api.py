"""Raw JSON access to the Kubernetes API through the official `kubernetes` client.

The official client does the hard parts: kubeconfig and in-cluster configuration (token
files that rotate, exec and OIDC credential plugins, client certificates), TLS, proxies, and
the watch stream decoder (`kubernetes.watch.Watch`). Requests go through its generic
`ApiClient.param_serialize` / `call_api`, one code path for core kinds, Gateway API and our own
CRDs alike, and objects stay plain dicts in the API's own JSON shape: that is what
`k8s_objects.convert` reads (the same dicts the file source reads), so nothing is converted to
the client's model classes and back.

Every call here blocks: callers run them in threads.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import socket
import uuid
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes import watch as k8s_watch
from kubernetes.client.exceptions import ApiException

# Raised for no usable cluster configuration (bad kubeconfig, not in a cluster...).
from ..config import ConfigError

log = logging.getLogger(__name__)

__all__ = [
    "ApiException",
    "ConfigError",
    "KubeApi",
    "ResourceKind",
    "default_identity",
    "in_cluster_namespace",
    "make_api_client",
    "status_message",
]

SERVICE_ACCOUNT_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
CONNECT_TIMEOUT = 10.0
REQUEST_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class ResourceKind:
    """Where a kind lives in the API: /api/v1/... or /apis/<group>/<version>/..."""

    kind: str
    group: str
    version: str
    plural: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str | None = None, name: str | None = None,
             subresource: str | None = None) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name is not None:
            base += f"/{name}"
            if subresource:
                base += f"/{subresource}"
        return base


LEASE = ResourceKind("Lease", "coordination.k8s.io", "v1", "leases")
SECRET = ResourceKind("Secret", "", "v1", "secrets")
TOKEN_REVIEW = ResourceKind("TokenReview", "authentication.k8s.io", "v1", "tokenreviews",
                            namespaced=False)


def make_api_client(
    kubeconfig: str | Path | None = None,
    *,
    context: str | None = None,
    in_cluster: bool | None = None,
    user_agent: str | None = None,
    pool_size: int = 32,
) -> k8s_client.ApiClient:
    """An `ApiClient` for the cluster: in-cluster when asked (or when neither a kubeconfig is
    given nor $KUBECONFIG set and we run in a pod), else the kubeconfig file ($KUBECONFIG or
    ~/.kube/config when None), as kubectl chooses. Raises ConfigError."""
    configuration = k8s_client.Configuration()
    if in_cluster is None:
        in_cluster = (kubeconfig is None and "KUBECONFIG" not in os.environ
                      and "KUBERNETES_SERVICE_HOST" in os.environ)
    try:
        if in_cluster:
            k8s_config.load_incluster_config(client_configuration=configuration)
        else:  # None: the client's default, $KUBECONFIG (merged, as kubectl does) or ~/.kube
            k8s_config.load_kube_config(
                config_file=str(kubeconfig) if kubeconfig else None, context=context,
                client_configuration=configuration, persist_config=False,
            )
    except (k8s_config.ConfigException, OSError, ValueError, TypeError) as e:
        where = ("in-cluster configuration" if in_cluster
                 else f"kubeconfig {kubeconfig or '~/.kube/config'}")
        raise ConfigError(f"cannot load the {where}: {e}") from e
    # One connection per watched kind plus status, lease and TokenReview calls.
    configuration.connection_pool_maxsize = pool_size
    # Every caller retries on its own schedule (backoff with jitter, lease periods...);
    # urllib3's immediate retries underneath would only multiply requests and log lines.
    configuration.retries = False
    api = k8s_client.ApiClient(configuration)
    api.user_agent = user_agent or f"xds-server/{_version()}"
    return api


def _version() -> str:
    try:
        return importlib.metadata.version("xds-server")
    except importlib.metadata.PackageNotFoundError:
        return "dev"


def in_cluster_namespace(default: str = "default") -> str:
    """The namespace this pod runs in ($POD_NAMESPACE, else the service account's), or
    `default` outside a cluster."""
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    try:
        return SERVICE_ACCOUNT_NAMESPACE_FILE.read_text().strip() or default
    except OSError:
        return default


def default_identity() -> str:
    """A leader-election identity unique per process: hostname (the pod name) and a UUID, as
    client-go recommends, so a restarted pod never mistakes an old lease for its own."""
    return f"{socket.gethostname()}_{uuid.uuid4().hex[:12]}"


def status_message(error: BaseException) -> str:
    """A short description of an API error: the Status message when the server sent one."""
    if isinstance(error, ApiException):
        try:
            body = json.loads(error.body or "")
        except (ValueError, TypeError):
            body = None
        if isinstance(body, dict) and body.get("message"):
            return f"{error.status} {body.get('reason') or error.reason}: {body['message']}"
        return f"{error.status} {error.reason or ''}".strip()
    return f"{type(error).__name__}: {error}"


_Query = Sequence[tuple[str, str | None]]


class KubeApi:
    """Plain-dict requests over one `ApiClient` (thread-safe: urllib3's pool is)."""

    def __init__(self, api_client: k8s_client.ApiClient) -> None:
        self.client = api_client

    def close(self) -> None:
        self.client.close()

    # Requests --------------------------------------------------------------------------------

    def _call(self, method: str, path: str, *, query: _Query = (), body: Any = None,
              content_type: str = "application/json",
              timeout: float | tuple[float, float] | None = None) -> Any:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        request = self.client.param_serialize(
            method, path,
            query_params=[(k, v) for k, v in query if v is not None],
            header_params=headers, body=body, auth_settings=["BearerToken"],
        )
        return self.client.call_api(
            *request, _request_timeout=timeout or (CONNECT_TIMEOUT, REQUEST_TIMEOUT)
        )

    def request(self, method: str, path: str, *, query: _Query = (), body: Any = None,
                content_type: str = "application/json",
                timeout: float | tuple[float, float] | None = None) -> dict[str, Any]:
        """One request; the decoded JSON answer. Raises ApiException for non-2xx answers,
        urllib3/OS errors when the server cannot be reached."""
        response = self._call(method, path, query=query, body=body, content_type=content_type,
                              timeout=timeout)
        data = response.read()
        if not 200 <= response.status <= 299:
            raise ApiException(http_resp=response, body=data.decode("utf-8", "replace"))
        return json.loads(data) if data else {}

    def get(self, kind: ResourceKind, namespace: str | None, name: str) -> dict[str, Any]:
        return self.request("GET", kind.path(namespace, name))

    def create(self, kind: ResourceKind, namespace: str | None, body: dict) -> dict[str, Any]:
        return self.request("POST", kind.path(namespace), body=body)

    def replace(self, kind: ResourceKind, namespace: str | None, name: str, body: dict,
                *, subresource: str | None = None) -> dict[str, Any]:
        return self.request("PUT", kind.path(namespace, name, subresource), body=body)

    def merge_patch(self, kind: ResourceKind, namespace: str | None, name: str, patch: dict,
                    *, subresource: str | None = None) -> dict[str, Any]:
        return self.request("PATCH", kind.path(namespace, name, subresource), body=patch,
                            content_type="application/merge-patch+json")

    def list_page(self, kind: ResourceKind, *, label_selector: str | None = None,
                  limit: int | None = None, continue_token: str | None = None,
                  timeout: float | None = None) -> dict[str, Any]:
        """One page of a list across all namespaces (a `<Kind>List`)."""
        query = [
            ("labelSelector", label_selector),
            ("limit", str(limit) if limit else None),
            ("continue", continue_token),
        ]
        return self.request("GET", kind.path(), query=query,
                            timeout=(CONNECT_TIMEOUT, timeout or REQUEST_TIMEOUT))

    def watch(self, kind: ResourceKind, watcher: k8s_watch.Watch, *, resource_version: str,
              timeout_seconds: int, label_selector: str | None = None,
              namespace: str | None = None, field_selector: str | None = None,
              ) -> Generator[dict[str, Any], None, None]:
        """Events from `resource_version` on, as decoded by the official `Watch`: dicts with
        `type` and `object` (the raw dict). Ends when the server closes the watch (after
        `timeout_seconds`). An ERROR event raises ApiException (410 for an expired
        resourceVersion). `watcher.stop()` from another thread ends it early."""

        def open_stream(**_: Any) -> Any:
            query = [
                ("watch", "true"),
                ("resourceVersion", resource_version),
                ("allowWatchBookmarks", "true"),
                ("timeoutSeconds", str(timeout_seconds)),
                ("labelSelector", label_selector),
                ("fieldSelector", field_selector),
            ]
            # The read timeout only catches a dead connection: the server itself ends the
            # watch after timeout_seconds, so silence for longer than that means it is gone.
            response = self._call("GET", kind.path(namespace), query=query,
                                  timeout=(CONNECT_TIMEOUT, timeout_seconds + 30.0))
            if not 200 <= response.status <= 299:
                data = response.read()
                raise ApiException(http_resp=response, body=data.decode("utf-8", "replace"))
            return response.response  # the urllib3 response, streamed by Watch

        # timeout_seconds makes Watch.stream return when the server ends the stream, and raise
        # on a 410 instead of silently retrying: re-listing is the caller's decision.
        yield from watcher.stream(open_stream, timeout_seconds=timeout_seconds)
