"""A raw xDS client in a process of its own, for tests of a real `xds-server serve` from
another network namespace (`ip netns exec NS python -m tests.support.stream_probe`): the
server then sees the connection come from that namespace's address, as from a pod.

It reads one JSON command per line on stdin and answers each with one JSON line on stdout:

- `{"op": "stream", "address", "token", "namespace", "service_account", "pod", "pod_ip"?,
  "secret"?: true, "listeners"?: true}`: a new channel and ADS stream with that bearer token
  and node; asks for clusters (and the `default` secret, the listeners). Answers `{"ok": true,
  "serial": HEX?, "listeners": [names]?}` and keeps the stream open, or `{"ok": false, "code",
  "details"}` with the status the server ended it with.
- `{"op": "close"}`: closes every open stream; answers `{"ok": true, "closed": N}`.
- `{"op": "csds", "address", "token"?}`: one FetchClientStatus call; `{"ok": true,
  "configs": N}` or `{"ok": false, "code", "details"}`.

The private key a secret carries is never printed: only the certificate's serial.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import grpc
from cryptography import x509
from google.protobuf import struct_pb2

from envoy.config.core.v3 import base_pb2
from envoy.service.status.v3 import csds_pb2, csds_pb2_grpc
from tests.support.xds_client import StreamClosed, XdsClient, sotw_resources
from xds_server.xds import types


def _node(command: dict[str, Any]) -> base_pb2.Node:
    metadata = struct_pb2.Struct()
    fields = {"namespace": command["namespace"], "service_account": command["service_account"],
              "pod": command["pod"]}
    if command.get("pod_ip"):
        fields["pod_ip"] = command["pod_ip"]
    metadata.update(fields)
    return base_pb2.Node(id=f"{command['pod']}.{command['namespace']}", metadata=metadata)


def _bearer(token: str | None) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")] if token else []


async def _stream(command: dict[str, Any], open_clients: list[XdsClient]) -> dict[str, Any]:
    client = XdsClient(command["address"], metadata=_bearer(command.get("token")))
    stream = client.ads(node=_node(command))
    try:
        await stream.request(types.CLUSTER)
        await stream.recv(timeout=15)
        answer: dict[str, Any] = {"ok": True}
        if command.get("secret"):
            await stream.request(types.SECRET, ["default"])
            secret = sotw_resources(await stream.recv(timeout=15))["default"]
            pem = secret.tls_certificate.certificate_chain.inline_bytes
            answer["serial"] = format(x509.load_pem_x509_certificate(pem).serial_number, "x")
        if command.get("listeners"):
            await stream.request(types.LISTENER)
            answer["listeners"] = sorted(sotw_resources(await stream.recv(timeout=15)))
    except StreamClosed as closed:
        await client.close()
        return {"ok": False, "code": closed.code.name, "details": closed.details}
    except AssertionError as silent:  # no response in time
        await client.close()
        return {"ok": False, "code": "NO_RESPONSE", "details": str(silent)}
    open_clients.append(client)
    return answer


async def _csds(command: dict[str, Any]) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(command["address"]) as channel:
        stub = csds_pb2_grpc.ClientStatusDiscoveryServiceStub(channel)
        try:
            reply = await stub.FetchClientStatus(csds_pb2.ClientStatusRequest(),
                                                 metadata=_bearer(command.get("token")), timeout=15)
        except grpc.aio.AioRpcError as err:
            return {"ok": False, "code": err.code().name, "details": err.details()}
    return {"ok": True, "configs": len(reply.config)}


async def main() -> None:
    open_clients: list[XdsClient] = []
    while True:
        line = await asyncio.to_thread(sys.stdin.readline)
        if not line:
            break
        command = json.loads(line)
        if command["op"] == "stream":
            answer = await _stream(command, open_clients)
        elif command["op"] == "csds":
            answer = await _csds(command)
        else:
            closed = len(open_clients)
            for client in open_clients:
                await client.close()
            open_clients.clear()
            answer = {"ok": True, "closed": closed}
        print(json.dumps(answer), flush=True)
    for client in open_clients:
        await client.close()


if __name__ == "__main__":
    asyncio.run(main())
