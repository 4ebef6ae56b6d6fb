"""A tiny gRPC backend for proxyless-gRPC and mesh tests: `Who` answers its own name;
`Headers` answers JSON {"name": ..., "metadata": [[key, value], ...]} with the request
metadata as received (every value of a repeated key, in order), so a test can check what a
route's header modifier did to a gRPC call."""

from __future__ import annotations

import json
from concurrent import futures

import grpc

WHO_METHOD = "/xds_server.test.Echo/Who"
HEADERS_METHOD = "/xds_server.test.Echo/Headers"


class GrpcBackend:
    """A real gRPC server on (host, port) answering `Who` with its name and `Headers` with
    its name and the call's metadata. Stop it with stop()."""

    def __init__(self, name: str, host: str, port: int = 0) -> None:
        self.name = name
        self.host = host
        self.calls = 0
        self.metadata_seen: list[list[tuple[str, str]]] = []  # of each `Headers` call, in order
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=4), options=[("grpc.so_reuseport", 0)]
        )
        handlers: dict[str, grpc.RpcMethodHandler] = {
            "Who": grpc.unary_unary_rpc_method_handler(self._who),
            "Headers": grpc.unary_unary_rpc_method_handler(self._headers),
        }
        self._server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("xds_server.test.Echo", handlers)]
        )
        self.port = self._server.add_insecure_port(f"{host}:{port}")

    def _who(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.calls += 1
        return self.name.encode()

    def _headers(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.calls += 1
        metadata = [[str(k), v if isinstance(v, str) else v.hex()] for k, v in context.invocation_metadata()]
        self.metadata_seen.append([(k, v) for k, v in metadata])
        return json.dumps({"name": self.name, "metadata": metadata}).encode()

    def start(self) -> GrpcBackend:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=None).wait(5)
