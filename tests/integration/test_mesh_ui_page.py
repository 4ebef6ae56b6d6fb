"""The /ui page in a real headless browser (Debian's chromium via Playwright) at the size the
issue asks for, and its access rules: 50 services in 5 namespaces with traffic between them
are all drawn, no two boxes overlap; the data needs a read token; the page loads nothing
from anywhere but this server.

`UPDATE_SCREENSHOTS=1` also writes docs/mesh-ui-50.png."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml

from tests.support.admin import AdminStack
from tests.support.browser import browser_page
from xds_server.load_reports import LoadAggregator
from xds_server.model.identity import ProxyClaim
from xds_server.model.mesh import ServiceKey
from xds_server.model.store import MeshStore
from xds_server.sources.mesh_files import MeshDirectory
from xds_server.translate.names import cluster_name
from xds_server.xds.lrs import ClusterLoad

pytestmark = pytest.mark.xdist_group("browser")

ROOT = Path(__file__).resolve().parents[2]
NAMESPACES = ["shop", "payments", "search", "users", "edge"]
NAMES = ["gateway", "catalog", "cart", "orders", "pricing", "inventory", "reviews", "media",
         "audit", "notify"]


def _mesh(directory: Path) -> MeshStore:
    docs = []
    for n, ns in enumerate(NAMESPACES):
        docs.append({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        for k, name in enumerate(NAMES):
            ip = f"10.{n + 1}.{k}.1"
            docs.append({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
                         "spec": {"clusterIP": f"10.96.{n}.{k + 1}",
                                  "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}})
            docs.append({"apiVersion": "v1", "kind": "Pod",
                         "metadata": {"name": f"{name}-0", "namespace": ns, "labels": {"app": name},
                                      "annotations": {"sidecar.xds-server.io/inject": "true"}},
                         "spec": {"serviceAccountName": name, "containers": [{"name": "app"}]},
                         "status": {"podIP": ip}})
            docs.append({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                         "metadata": {"name": f"{name}-1", "namespace": ns,
                                      "labels": {"kubernetes.io/service-name": name}},
                         "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
                         "endpoints": [{"addresses": [ip], "conditions": {"ready": True},
                                        "targetRef": {"kind": "Pod", "name": f"{name}-0", "namespace": ns}}]})
    directory.mkdir(parents=True)
    (directory / "mesh.yaml").write_text(yaml.safe_dump_all(docs))
    store = MeshStore()
    errors = [e for e in MeshDirectory(directory, store).load() if e.severity == "error"]
    assert not errors, errors
    return store


def _calls() -> list[tuple[ServiceKey, ServiceKey, int, int]]:
    """(caller, callee, successful, errors) per 10 s: a gateway per namespace calling three
    services that call the rest, and each gateway calling the next namespace's."""
    calls = []
    for n, ns in enumerate(NAMESPACES):
        svc = [ServiceKey(ns, name) for name in NAMES]
        calls += [(svc[0], svc[k], 400 * k, k) for k in (1, 2, 3)]
        calls += [(svc[1 + k % 3], svc[k], 50 + 10 * k, 20 if k == 8 else 0) for k in range(4, 10)]
        calls.append((svc[0], ServiceKey(NAMESPACES[(n + 1) % len(NAMESPACES)], "gateway"), 90, 0))
    return calls


async def test_fifty_services_are_drawn_without_overlap(tmp_path):
    store = _mesh(tmp_path / "mesh")
    load = LoadAggregator(store, 10.0)
    reports: dict[ServiceKey, list[ClusterLoad]] = {}
    for caller, callee, ok, errors in _calls():  # one report per caller's sidecar, as Envoy sends
        reports.setdefault(caller, []).append(
            ClusterLoad(cluster_name(callee, 80), 10.0, ok, errors, ok + errors, 2))
    for caller, loads in reports.items():
        claim = ProxyClaim(node_id=f"{caller.name}-0.{caller.namespace}", namespace=caller.namespace,
                           service_account=caller.name, pod=f"{caller.name}-0")
        load.report(claim, loads)
    async with AdminStack(store=store, load=load) as stack, browser_page(height=1900) as page:
        await page.goto(f"{stack.url}/ui#token={stack.tokens.read}")
        # (Not wait_for_function: the page's CSP forbids the eval it polls with.)
        await page.locator("#graph g.node").nth(49).wait_for(timeout=15_000)
        assert await page.locator("#graph g.node").count() == 50
        edges = await page.locator("#graph .edges g.edge.traffic").count()
        assert edges == len(_calls())
        boxes = await page.evaluate("""() => [...document.querySelectorAll('#graph g.node rect.box')]
                .map(r => { const b = r.getBoundingClientRect(); return [b.x, b.y, b.width, b.height]; })""")
        for i, (x, y, w, h) in enumerate(boxes):
            for (x2, y2, w2, h2) in boxes[i + 1:]:
                assert x + w <= x2 or x2 + w2 <= x or y + h <= y2 or y2 + h2 <= y, "boxes overlap"
        # The busiest edge's label is readable text with its rate.
        label = await page.evaluate("""() => [...document.querySelectorAll('#graph .labels text')]
                .map(t => t.textContent)""")
        assert "120/s · 0.2 %" in label  # gateway -> orders: 1,203 per 10 s, 3 errors
        if os.environ.get("UPDATE_SCREENSHOTS"):
            await page.screenshot(path=str(ROOT / "docs" / "mesh-ui-50.png"), full_page=True)


async def test_the_data_needs_a_read_token_and_the_page_loads_only_from_here(tmp_path):
    async with AdminStack() as stack:
        async with stack.client(token=None) as anonymous:
            page = await anonymous.get("/ui")
            assert page.status_code == 200 and "frame-ancestors 'none'" in page.headers["content-security-policy"]
            assert "default-src 'none'" in page.headers["content-security-policy"]
            assert (await anonymous.get("/api/v1/ui/mesh")).status_code == 401
            assert (await anonymous.get("/ui/assets/secrets.txt")).status_code == 404
            # Everything the page loads is its own: no absolute URL in the page or its assets.
            for name in ("/ui", "/ui/assets/app.js", "/ui/assets/style.css"):
                text = (await anonymous.get(name)).text
                urls = set(re.findall(r"https?://[^\s\"'`)]+", text)) - {"http://www.w3.org/2000/svg"}
                assert not urls, (name, urls)
        async with stack.client("read") as reader:
            data = (await reader.get("/api/v1/ui/mesh")).json()
            assert data["nodes"] == [] and data["proxies"] == []
        async with browser_page() as page:
            await page.goto(f"{stack.url}/ui")
            await page.fill("#token", "not-a-token")
            await page.click("#login button")
            await page.wait_for_selector("#login-error:has-text('refused')", timeout=10_000)
            await page.fill("#token", stack.tokens.read)
            await page.click("#login button")
            await page.wait_for_selector("#main:not([hidden])", timeout=10_000)
            await page.wait_for_selector("#updated:has-text('updated')", timeout=10_000)


async def test_certificates_close_to_expiry_and_source_errors_show(tmp_path):
    """A certificate with under a quarter of its lifetime left and a source's error are on the
    page (a 24 h certificate is not)."""
    from datetime import timedelta

    from tests.support.admin import CA
    from xds_server.model.identity import Identity

    ca = CA(tmp_path / "ca")
    ca.issuer.issue_for_identity(Identity("shop", "web"), ttl=timedelta(minutes=1), proxy="web-0.shop")
    ca.issuer.issue_for_identity(Identity("shop", "api"), ttl=timedelta(hours=24), proxy="api-0.shop")
    (tmp_path / "mesh").mkdir()
    (tmp_path / "mesh" / "bad.yaml").write_text(
        "apiVersion: v1\nkind: Service\nmetadata: { name: broken, namespace: shop }\n"
        "spec: { ports: [{ port: 99999 }] }\n")
    store = MeshStore()
    source = MeshDirectory(tmp_path / "mesh", store)
    source.load()
    assert source.errors
    async with AdminStack(store=store, ca=ca, sources={"files": source}) as stack, browser_page() as page:
        await page.goto(f"{stack.url}/ui#token={stack.tokens.read}")
        expiring = page.locator('#certificates li[data-spiffe-id="spiffe://cluster.local/ns/shop/sa/web"]')
        await expiring.wait_for(timeout=15_000)
        assert "min" in await expiring.text_content()
        assert await page.locator('#certificates li[data-spiffe-id$="/sa/api"]').count() == 0
        assert "1 of 2" in await page.locator("#cert-count").text_content()
        errors = await page.locator("#source-errors li").all_text_contents()
        assert any("files" in e and "99999" in e for e in errors), errors
