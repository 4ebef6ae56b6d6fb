"""Runs the stock grpcio xDS client in its own process and reports who answered.

gRPC keeps one XdsClient per process and reads its bootstrap once, so each test's client
runs here, with its own GRPC_XDS_BOOTSTRAP_CONFIG. Prints one JSON line per call:
{"ok": true, "backend": "name"} or {"ok": false, "code": "...", "details": "..."}.
Usage: python -m tests.support.grpc_xds_caller TARGET SECONDS [INTERVAL]
"""

from __future__ import annotations

import json
import sys
import time

import grpc

from tests.support.grpc_backend import WHO_METHOD


def main() -> None:
    target, seconds = sys.argv[1], float(sys.argv[2])
    interval = float(sys.argv[3]) if len(sys.argv) > 3 else 0.1
    deadline = time.monotonic() + seconds
    with grpc.insecure_channel(target) as channel:
        who = channel.unary_unary(WHO_METHOD, request_serializer=None, response_deserializer=None)
        while time.monotonic() < deadline:
            try:
                answer = who(b"", timeout=5, wait_for_ready=True)
                print(json.dumps({"ok": True, "backend": answer.decode()}), flush=True)
            except grpc.RpcError as err:
                print(json.dumps({"ok": False, "code": err.code().name, "details": err.details()}),
                      flush=True)
            time.sleep(interval)


if __name__ == "__main__":
    main()
