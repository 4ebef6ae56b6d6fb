"""The xDS bootstrap of a proxyless gRPC application (`xds-server bootstrap --grpc`).

gRPC reads it from the file named by `GRPC_XDS_BOOTSTRAP` (or the JSON in
`GRPC_XDS_BOOTSTRAP_CONFIG`). Two things use the workload agent's files in `cert_dir`:

- the connection to the xDS server: `channel_creds` of type `tls` (gRFC A65), mutual TLS with
  the agent's certificate, so the client authenticates with `--auth tokens` without ever
  holding a token (gRPC cannot send one to an xDS server). gRPC re-reads the files every
  `refresh_interval`. gRPC checks the server's certificate against the host of `server_uri`:
  dial a name the certificate carries (`--xds-tls-san`, `localhost`, the listen address).
- the data plane: the `file_watcher` certificate provider instance `default`, which the
  clusters and listeners the server sends to gRPC clients name (translate/tls.py).

The node carries what `xds-server bootstrap` puts in a sidecar's node (namespace, service
account, pod, pod IP), so the server gives the proxy its namespace's view.
"""

from __future__ import annotations

from typing import Any

from .ca.certdir import CA_FILE, CERT_FILE, KEY_FILE
from .config import parse_address

# What gRPC asks for when an xDS-enabled server starts (grpc.server(..., xds=True)).
SERVER_LISTENER_TEMPLATE = "grpc/server?xds.resource.listening_address=%s"
PROVIDER_INSTANCE = "default"


def grpc_bootstrap(*, namespace: str, service_account: str, pod: str, pod_ip: str,
                   xds_address: str, cert_dir: str, refresh_interval: str = "60s") -> dict[str, Any]:
    if not cert_dir.startswith("/"):
        raise ValueError(f"--cert-dir: gRPC needs an absolute path, got {cert_dir!r}")
    parse_address(xds_address, "--xds-address")
    cert_dir = cert_dir.rstrip("/") or "/"
    files = {
        "certificate_file": f"{cert_dir}/{CERT_FILE}",
        "private_key_file": f"{cert_dir}/{KEY_FILE}",
        "ca_certificate_file": f"{cert_dir}/{CA_FILE}",
        "refresh_interval": refresh_interval,
    }
    return {
        "xds_servers": [{
            "server_uri": xds_address,
            "channel_creds": [{"type": "tls", "config": dict(files)}],
            "server_features": ["xds_v3"],
        }],
        "node": {
            "id": f"{pod}.{namespace}",
            "cluster": f"{service_account}.{namespace}",
            "metadata": {"namespace": namespace, "service_account": service_account,
                         "pod": pod, "pod_ip": pod_ip},
            "locality": {"zone": ""},
        },
        "certificate_providers": {
            PROVIDER_INSTANCE: {"plugin_name": "file_watcher", "config": dict(files)},
        },
        "server_listener_resource_name_template": SERVER_LISTENER_TEMPLATE,
    }
