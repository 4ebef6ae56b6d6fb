"""Pod-scoped config through the real server (issue 13, hostile-client review): a workload
token for service account `web` whose node claims a pod of service account `db` is served its
namespace's shared config and none of that pod's listeners; the pod's own token gets them."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

from tests.integration.test_sds_auth import bearer, node
from tests.support.xds_client import XdsClient, sotw_resources
from xds_server.model.mesh import AppProtocol, Endpoint, EndpointPort, EndpointSlice, Service, ServicePort, Workload
from xds_server.model.store import MeshStore
from xds_server.security import Security, SecurityConfig
from xds_server.translate import names
from xds_server.translate.controller import MeshController
from xds_server.xds import types
from xds_server.xds.auth import AuthMode
from xds_server.xds.cache import ResourceCache
from xds_server.xds.server import ServerSettings, XdsServer

NS = "shop"


async def test_a_token_of_another_service_account_gets_nothing_of_the_pod_it_claims(tmp_path: Path) -> None:
    store, cache = MeshStore(), ResourceCache()
    controller = MeshController(store, cache)
    store.sync("test", [
        Service(NS, "db", (ServicePort(5432, "tcp", 5432, AppProtocol.TCP),), cluster_ip="10.96.0.5"),
        Workload(NS, "db-0", "10.0.0.5", service_account="db", meshed=True),
        EndpointSlice(NS, "db-1", "db", (EndpointPort("tcp", 5432, AppProtocol.TCP),),
                      (Endpoint("10.0.0.5", pod="db-0"),)),
    ])
    server = XdsServer(cache, ServerSettings(address="127.0.0.1:0", debounce_quiet=0.01, debounce_max=0.05),
                       view_for=controller.view_for, release_view=controller.release)
    security = Security.build(SecurityConfig(auth=AuthMode.TOKENS, ca_dir=tmp_path / "ca"), cache, "127.0.0.1:0")
    security.attach(server)
    stop = asyncio.Event()
    await server.start()
    task = asyncio.create_task(security.run(stop))
    pod_listener = names.inbound_listener_name(NS, "db-0")
    try:
        web_token = security.tokens.issue(NS, "web", timedelta(hours=1)).token
        async with XdsClient(server.address, metadata=bearer(web_token)) as client:
            ads = client.ads(node=node(NS, "web", pod="db-0"))  # web's token, db's pod
            await ads.request(types.LISTENER)
            listeners = sotw_resources(await ads.recv())
            assert pod_listener not in listeners
            assert not [n for n in listeners if n.endswith(names.proxy_names_prefix(NS, "db-0"))]
            assert names.capture_outbound_listener_name(NS) in listeners  # its namespace's share
        db_token = security.tokens.issue(NS, "db", timedelta(hours=1)).token
        async with XdsClient(server.address, metadata=bearer(db_token)) as client:
            ads = client.ads(node=node(NS, "db", pod="db-0"))
            await ads.request(types.LISTENER)
            assert pod_listener in sotw_resources(await ads.recv())
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await server.stop(0)
