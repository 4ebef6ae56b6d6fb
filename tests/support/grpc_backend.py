"""A tiny gRPC backend for proxyless-gRPC tests: one unary method that answers its own name."""

from __future__ import annotations

from concurrent import futures

import grpc

WHO_METHOD = "/xds_server.test.Echo/Who"


class GrpcBackend:
    """A real gRPC server on (host, port) answering `Who` with its name. Stop it with stop()."""

    def __init__(self, name: str, host: str, port: int = 0) -> None:
        self.name = name
        self.host = host
        self.calls = 0
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=4), options=[("grpc.so_reuseport", 0)]
        )
        handler = grpc.unary_unary_rpc_method_handler(
            self._who, request_deserializer=None, response_serializer=None
        )
        self._server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("xds_server.test.Echo", {"Who": handler})]
        )
        self.port = self._server.add_insecure_port(f"{host}:{port}")

    def _who(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.calls += 1
        return self.name.encode()

    def start(self) -> GrpcBackend:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=None).wait(5)
