"""Proxyless gRPC processes for tests: an xDS-enabled server and a client with xDS credentials.

gRPC keeps one XdsClient per process and reads its bootstrap once, so each runs in its own
process with its own GRPC_XDS_BOOTSTRAP_CONFIG (see `bootstrap`).

    python -m tests.support.proxyless server NAME HOST PORT
        serves `Who` on HOST:PORT with xDS server credentials (insecure fallback); prints
        {"serving": true} once started. `Who` answers {"name": NAME, "peer": <SPIFFE ID or "">}.
    python -m tests.support.proxyless client TARGET SECONDS [INTERVAL]
        calls `Who` on TARGET (xds:///...) with xDS channel credentials; one JSON line per
        call: {"ok": true, "answer": {...}} or {"ok": false, "code": ..., "details": ...}.
"""

from __future__ import annotations

import json
import sys
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

SERVICE = "xds_server.test.Echo"
WHO_METHOD = f"/{SERVICE}/Who"
SERVER_TEMPLATE = "grpc/server?xds.resource.listening_address=%s"


def bootstrap(
    xds_address: str, *, namespace: str, pod: str, service_account: str, pod_ip: str,
    cert_dir: Path | None = None,
) -> dict[str, Any]:
    """A gRPC xDS bootstrap: the server, the node the mesh knows (as `xds-server bootstrap`
    writes for sidecars), and the `default` file_watcher provider over cert-agent's files."""
    config: dict[str, Any] = {
        "xds_servers": [{
            "server_uri": xds_address,
            "channel_creds": [{"type": "insecure"}],
            "server_features": ["xds_v3"],
        }],
        "node": {
            "id": f"{pod}.{namespace}",
            "cluster": f"{service_account}.{namespace}",
            "metadata": {"namespace": namespace, "pod": pod, "service_account": service_account,
                         "pod_ip": pod_ip},
            "locality": {"zone": ""},
        },
        "server_listener_resource_name_template": SERVER_TEMPLATE,
    }
    if cert_dir is not None:
        config["certificate_providers"] = {
            "default": {
                "plugin_name": "file_watcher",
                "config": {
                    "certificate_file": str(cert_dir / "cert.pem"),
                    "private_key_file": str(cert_dir / "key.pem"),
                    "ca_certificate_file": str(cert_dir / "ca.pem"),
                    "refresh_interval": "1s",
                },
            }
        }
    return config


def _peer_spiffe_id(context: grpc.ServicerContext) -> str:
    auth = context.auth_context() or {}
    for key in ("peer_spiffe_id", "x509_subject_alternative_name"):
        for value in auth.get(key, ()):
            text = value.decode() if isinstance(value, bytes) else str(value)
            if text.startswith("spiffe://"):
                return text
    return ""


def serve(name: str, host: str, port: int) -> None:
    def who(request: bytes, context: grpc.ServicerContext) -> bytes:
        return json.dumps({"name": name, "peer": _peer_spiffe_id(context)}).encode()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), xds=True)
    handler = grpc.unary_unary_rpc_method_handler(who, request_deserializer=None, response_serializer=None)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {"Who": handler})])
    server.add_secure_port(f"{host}:{port}", grpc.xds_server_credentials(grpc.insecure_server_credentials()))
    server.start()
    print(json.dumps({"serving": True}), flush=True)
    server.wait_for_termination()


def call(target: str, seconds: float, interval: float) -> None:
    from grpc.experimental import insecure_channel_credentials

    # Plaintext only when the control plane sends no security config (mTLS off).
    credentials = grpc.xds_channel_credentials(insecure_channel_credentials())
    deadline = time.monotonic() + seconds
    with grpc.secure_channel(target, credentials) as channel:
        who = channel.unary_unary(WHO_METHOD, request_serializer=None, response_deserializer=None)
        while time.monotonic() < deadline:
            try:
                answer = who(b"", timeout=5, wait_for_ready=True)
                print(json.dumps({"ok": True, "answer": json.loads(answer)}), flush=True)
            except grpc.RpcError as err:
                print(json.dumps({"ok": False, "code": err.code().name, "details": err.details()}),
                      flush=True)
            time.sleep(interval)


def main() -> None:
    mode = sys.argv[1]
    if mode == "server":
        serve(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif mode == "client":
        call(sys.argv[2], float(sys.argv[3]), float(sys.argv[4]) if len(sys.argv) > 4 else 0.1)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
