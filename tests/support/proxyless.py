"""Proxyless gRPC processes for tests: an xDS-enabled server and a client with xDS credentials.

gRPC keeps one XdsClient per process and reads its bootstrap once, so each runs in its own
process with its own GRPC_XDS_BOOTSTRAP_CONFIG (see `bootstrap`).

    python -m tests.support.proxyless server NAME HOST PORT
        serves `Who` on HOST:PORT with xDS server credentials (insecure fallback); prints
        {"serving": true} once started. `Who` answers {"name": NAME, "peer": <SPIFFE ID or "">}.
        With PROXYLESS_FAIL=1 in its environment, `Who` fails every call with UNAVAILABLE (a
        failing backend, for outlier detection). `Slow` sleeps the seconds its request names,
        then answers like `Who`.
    python -m tests.support.proxyless client TARGET SECONDS [INTERVAL [CALLS]]
        calls `Who` on TARGET (xds:///...) with xDS channel credentials; one JSON line per
        call: {"ok": true, "answer": {...}} or {"ok": false, "code": ..., "details": ...},
        each with "method" and "elapsed" (seconds). CALLS: the calls to cycle through, such as
        `Who,Slow:6` (method, then the request: Slow's seconds); default `Who`. Calls have a
        20 s deadline of their own, so a shorter timeout is the control plane's.

`ProxylessProcess` runs either from a test (asyncio) and reads its lines.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

SERVICE = "xds_server.test.Echo"
WHO_METHOD = f"/{SERVICE}/Who"
ROOT = Path(__file__).resolve().parents[2]
SERVER_TEMPLATE = "grpc/server?xds.resource.listening_address=%s"


def bootstrap(
    xds_address: str, *, namespace: str, pod: str, service_account: str, pod_ip: str,
    cert_dir: Path | None = None,
) -> dict[str, Any]:
    """A gRPC xDS bootstrap: the server, the node the mesh knows (as `xds-server bootstrap`
    writes for sidecars), and the `default` file_watcher provider over the workload agent's files."""
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
    failing = os.environ.get("PROXYLESS_FAIL") == "1"

    def who(request: bytes, context: grpc.ServicerContext) -> bytes:
        if failing:  # a status, not context.abort (which crashes an xDS server in grpcio 1.85)
            context.set_code(grpc.StatusCode.UNAVAILABLE)
            context.set_details(f"{name} is failing")
            return b""
        return json.dumps({"name": name, "peer": _peer_spiffe_id(context)}).encode()

    def slow(request: bytes, context: grpc.ServicerContext) -> bytes:
        time.sleep(float(request.decode() or 0))
        return who(request, context)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), xds=True)
    handlers = {
        method: grpc.unary_unary_rpc_method_handler(fn, request_deserializer=None, response_serializer=None)
        for method, fn in (("Who", who), ("Slow", slow))
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
    server.add_secure_port(f"{host}:{port}", grpc.xds_server_credentials(grpc.insecure_server_credentials()))
    server.start()
    print(json.dumps({"serving": True}), flush=True)
    server.wait_for_termination()


def call(target: str, seconds: float, interval: float, calls: str = "Who") -> None:
    from grpc.experimental import insecure_channel_credentials

    # Plaintext only when the control plane sends no security config (mTLS off).
    credentials = grpc.xds_channel_credentials(insecure_channel_credentials())
    deadline = time.monotonic() + seconds
    plan = [(m, a) for m, _, a in (c.partition(":") for c in calls.split(","))]
    with grpc.secure_channel(target, credentials) as channel:
        stubs = {m: channel.unary_unary(f"/{SERVICE}/{m}", request_serializer=None,
                                        response_deserializer=None) for m, _ in plan}
        i = 0
        while time.monotonic() < deadline:
            method, argument = plan[i % len(plan)]
            i += 1
            start = time.monotonic()
            line: dict[str, Any] = {"method": method}
            try:
                answer = stubs[method](argument.encode(), timeout=20, wait_for_ready=True)
                line.update(ok=True, answer=json.loads(answer))
            except grpc.RpcError as err:
                line.update(ok=False, code=err.code().name, details=err.details())
            line["elapsed"] = round(time.monotonic() - start, 3)
            print(json.dumps(line), flush=True)
            time.sleep(interval)


class ProxylessProcess:
    """A `python -m tests.support.proxyless ...` process (its own gRPC XdsClient and
    bootstrap), its JSON lines read as they come."""

    def __init__(self, *args: str, bootstrap: dict[str, Any], env: dict[str, str] | None = None) -> None:
        self.args = args
        self.bootstrap = bootstrap
        self.env = env or {}
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[dict] = []

    async def start(self) -> ProxylessProcess:
        env = {**os.environ, "GRPC_XDS_BOOTSTRAP_CONFIG": json.dumps(self.bootstrap),
               "PYTHONPATH": str(ROOT), **self.env}
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.support.proxyless", *self.args,
            stdout=asyncio.subprocess.PIPE, env=env, cwd=ROOT,
        )
        return self

    async def until(self, predicate: Any, timeout: float, what: str) -> dict:
        """Read lines until one satisfies `predicate`; fail after `timeout` seconds."""
        assert self.proc is not None and self.proc.stdout is not None
        stdout = self.proc.stdout

        async def scan() -> dict:
            while True:
                line = await stdout.readline()
                if not line:
                    raise AssertionError(f"{self.args[0]} exited; last lines {self.lines[-5:]}")
                event = json.loads(line)
                self.lines.append(event)
                if predicate(event):
                    return event

        try:
            return await asyncio.wait_for(scan(), timeout)
        except TimeoutError:
            raise AssertionError(f"{what}: not seen in {timeout}s; last lines {self.lines[-5:]}") from None

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await self.proc.wait()


def main() -> None:
    mode = sys.argv[1]
    if mode == "server":
        serve(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif mode == "client":
        call(sys.argv[2], float(sys.argv[3]), float(sys.argv[4]) if len(sys.argv) > 4 else 0.1,
             sys.argv[5] if len(sys.argv) > 5 else "Who")
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
