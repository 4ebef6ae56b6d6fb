"""Gateway API routes in mesh mode (GAMMA), end to end: real sidecars, real traffic.

Each test builds a small mesh (an in-process server, a few pods with real Envoy sidecars),
writes Services and an HTTPRoute/GRPCRoute whose parentRef is a Service, and checks what the
Gateway API spec says a client and a backend observe: the backend's echoed name, path, host
and headers, the status and headers the client gets, and how many requests each backend
served.

Waiting for config: every route below carries a marker (a ResponseHeaderModifier setting
`x-route-generation`, or a rule only the new config has); a route configuration reaches
Envoy as one RDS update applied atomically, so once a request shows the marker every rule of
that version is in force. Backends are first reached through their own default routes, so
their clusters and endpoints are known before the route that uses them is checked.
"""

from __future__ import annotations

import asyncio
import http.client
import json
from collections import Counter
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.support.mesh import MeshHarness, Pod
from tests.support.upstreams import UPSTREAM_NAME_HEADER, HttpResponse, HttpUpstream

pytestmark = [pytest.mark.envoy, pytest.mark.slow]

NS = "shop"
GENERATION = "x-route-generation"


@pytest.fixture
async def mesh(tmp_path: Path):
    harness = await MeshHarness(tmp_path / "mesh").start()
    yield harness
    await harness.stop()


# ------------------------------------------------------------------------------ helpers


def http_route(name: str, parent: str, rules: list[dict[str, Any]], *, port: int | None = 80) -> dict:
    parent_ref: dict[str, Any] = {"group": "", "kind": "Service", "name": parent}
    if port is not None:
        parent_ref["port"] = port
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"parentRefs": [parent_ref], "rules": rules},
    }


def backend(name: str, weight: int | None = None, port: int = 80) -> dict[str, Any]:
    ref: dict[str, Any] = {"name": name, "port": port}
    if weight is not None:
        ref["weight"] = weight
    return ref


def marker(generation: str) -> dict[str, Any]:
    return {
        "type": "ResponseHeaderModifier",
        "responseHeaderModifier": {"set": [{"name": GENERATION, "value": generation}]},
    }


def request_tag(rule: str) -> dict[str, Any]:
    """A RequestHeaderModifier telling the backend which rule matched."""
    return {
        "type": "RequestHeaderModifier",
        "requestHeaderModifier": {"set": [{"name": "x-rule", "value": rule}]},
    }


async def http_pods(mesh: MeshHarness, *names: str) -> list[Pod]:
    """HTTP echo pods with sidecars, each behind a Service of its own name (port 80)."""
    pods = [mesh.pod(NS, n, service_account=n) for n in names]
    for pod in pods:
        mesh.service(NS, pod.name, 80, pods=[pod])
    await asyncio.gather(*(mesh.sidecar(p) for p in pods))
    return pods


async def reachable(mesh: MeshHarness, client: Pod, host: str, name: str) -> None:
    """Wait until `client` reaches the pod `name` via `host` (its default route)."""
    await mesh.until(
        lambda: (r := client.request(host, "/")).status == 200 and r.json["name"] == name,
        message=f"{host} -> {name}",
    )


async def route_applied(
    mesh: MeshHarness, client: Pod, host: str, generation: str, path: str = "/",
    headers: dict[str, str] | None = None,
) -> HttpResponse:
    """Wait until a request to host+path carries the route's generation marker."""
    return await mesh.until(
        lambda: (r := client.request(host, path, headers=headers)).headers.get(GENERATION)
        == generation and r,
        message=f"route generation {generation} on {host}{path}",
    )


def burst(
    pod: Pod, host: str, path: str, count: int, *, workers: int = 8,
    headers: dict[str, str] | None = None,
) -> list[tuple[int, str | None]]:
    """`count` GETs through the pod's sidecar on a few keep-alive connections.

    Returns (status, echoed backend name) per request. Envoy applies a route update to the
    next request of an open connection, so keep-alive does not hide config changes.
    """

    def one_connection(n: int) -> list[tuple[int, str | None]]:
        conn = http.client.HTTPConnection(pod.ip, 15001, timeout=10)
        out = []
        try:
            for _ in range(n):
                conn.request("GET", path, headers={"Host": host, **(headers or {})})
                resp = conn.getresponse()
                body = resp.read()
                name = json.loads(body)["name"] if resp.status == 200 else None
                out.append((resp.status, name))
        finally:
            conn.close()
        return out

    shares = [count // workers + (1 if i < count % workers else 0) for i in range(workers)]
    with futures.ThreadPoolExecutor(workers) as pool:
        results = pool.map(one_connection, shares)
        return [item for chunk in results for item in chunk]


async def send(pod: Pod, host: str, path: str = "/", method: str = "GET",
               headers: dict[str, str] | None = None) -> HttpResponse:
    return await asyncio.to_thread(pod.request, host, path, method, headers)


class RecordingUpstream(HttpUpstream):
    """An echo backend that also records every request as (method, path, header pairs) and
    echoes the header pairs as a list, so repeated headers stay visible."""

    def __init__(self, name: str, host: str, port: int) -> None:
        super().__init__(name, host, port)
        self.seen: list[tuple[str, str, list[tuple[str, str]]]] = []
        seen = self.seen

        class Recording(self._server.RequestHandlerClass):  # type: ignore[misc, name-defined]
            def _handle(self) -> None:
                self._read_body()
                headers = list(self.headers.items())
                seen.append((self.command, self.path, headers))
                self.server.count_request()
                data = json.dumps({"name": self.server.upstream_name, "path": self.path,
                                   "headers": headers}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _handle

        self._server.RequestHandlerClass = Recording


async def recording_pod(mesh: MeshHarness, name: str) -> Pod:
    """Like http_pods, with a RecordingUpstream as the app."""
    pod = mesh.pod(NS, name, service_account=name, app="none")
    pod.backend = RecordingUpstream(name, pod.ip, pod.app_port).start()
    mesh.service(NS, name, 80, pods=[pod])
    await mesh.sidecar(pod)
    return pod


# ---------------------------------------------------------------------- traffic splitting


@pytest.fixture
async def canary(mesh: MeshHarness):
    """Service `api` (no pods of its own) split 90/10 over api-v1/api-v2; api-v3 weight 0."""
    client = mesh.pod(NS, "client", service_account="client")
    v1, v2, v3 = await http_pods(mesh, "api-v1", "api-v2", "api-v3")
    mesh.service(NS, "api", 80)
    await mesh.sidecar(client)
    for pod in (v1, v2, v3):
        await reachable(mesh, client, pod.name, pod.name)
    mesh.write("route-api.yaml", http_route("api-split", "api", [{
        "backendRefs": [backend("api-v1", 90), backend("api-v2", 10), backend("api-v3", 0)],
        "filters": [marker("1")],
    }]))
    await route_applied(mesh, client, "api", "1")
    return client, v1, v2, v3


async def test_weighted_split_90_10_and_weight_zero_gets_nothing(mesh: MeshHarness, canary) -> None:
    client, v1, v2, v3 = canary
    before = {p.name: p.backend.requests_total for p in (v1, v2, v3)}
    results = await asyncio.to_thread(burst, client, "api", "/split", 1000)

    assert Counter(status for status, _ in results) == {200: 1000}
    names = Counter(name for _, name in results)
    assert set(names) <= {"api-v1", "api-v2"}, names
    assert 850 <= names["api-v1"] <= 950, names  # 90 % +- 5 points (5 standard deviations)
    assert 50 <= names["api-v2"] <= 150, names
    served = {p.name: p.backend.requests_total - before[p.name] for p in (v1, v2, v3)}
    # Each backend served exactly the requests the client saw it answer; weight 0: none.
    assert served == {"api-v1": names["api-v1"], "api-v2": names["api-v2"], "api-v3": 0}


async def test_route_update_moves_traffic_without_restart(mesh: MeshHarness, canary) -> None:
    client, v1, v2, v3 = canary
    envoy_pids = {p.name: p.envoy.pid for p in mesh.pods}
    mesh.write("route-api.yaml", http_route("api-split", "api", [{
        "backendRefs": [backend("api-v1", 0), backend("api-v2", 100)],
        "filters": [marker("2")],
    }]))
    await route_applied(mesh, client, "api", "2")

    before = {p.name: p.backend.requests_total for p in (v1, v2, v3)}
    results = await asyncio.to_thread(burst, client, "api", "/after-update", 200)
    assert Counter(results) == {(200, "api-v2"): 200}
    served = {p.name: p.backend.requests_total - before[p.name] for p in (v1, v2, v3)}
    assert served == {"api-v1": 0, "api-v2": 200, "api-v3": 0}

    # And back: all traffic to api-v1, which had weight 0 a moment ago.
    mesh.write("route-api.yaml", http_route("api-split", "api", [{
        "backendRefs": [backend("api-v1", 1), backend("api-v2", 0)],
        "filters": [marker("3")],
    }]))
    await route_applied(mesh, client, "api", "3")
    results = await asyncio.to_thread(burst, client, "api", "/after-second-update", 200)
    assert Counter(results) == {(200, "api-v1"): 200}
    # Same processes throughout: nothing was restarted.
    assert {p.name: p.envoy.pid for p in mesh.pods} == envoy_pids
    assert all(p.envoy.running for p in mesh.pods)


# -------------------------------------------------------------------------------- matches


async def test_matches_route_by_path_header_query_and_method(mesh: MeshHarness) -> None:
    client = mesh.pod(NS, "client", service_account="client")
    await http_pods(mesh, "match-echo")
    mesh.service(NS, "match", 80)
    await mesh.sidecar(client)
    await reachable(mesh, client, "match-echo", "match-echo")
    to_echo = [backend("match-echo")]

    def rule(tag: str, *matches: dict[str, Any]) -> dict[str, Any]:
        return {"matches": list(matches), "filters": [request_tag(tag), marker("1")],
                "backendRefs": to_echo}

    mesh.write("route-match.yaml", http_route("match", "match", [
        rule("exact", {"path": {"type": "Exact", "value": "/exact"}}),
        rule("prefix", {"path": {"type": "PathPrefix", "value": "/foo"}}),
        rule("longer-prefix", {"path": {"type": "PathPrefix", "value": "/foo/deeper/"}}),
        rule("regex", {"path": {"type": "RegularExpression", "value": "/re/[0-9]+"}}),
        rule("header", {"path": {"type": "PathPrefix", "value": "/any"},
                        "headers": [{"name": "X-Variant", "value": "blue"}]}),
        rule("header-regex", {"path": {"type": "PathPrefix", "value": "/any"},
                              "headers": [{"name": "x-build", "type": "RegularExpression",
                                           "value": "v[0-9]+\\.[0-9]+"}]}),
        rule("query", {"path": {"type": "PathPrefix", "value": "/any"},
                       "queryParams": [{"name": "tier", "value": "gold"}]}),
        rule("method", {"path": {"type": "PathPrefix", "value": "/any"}, "method": "POST"}),
        # Two matches in one rule: either one selects the rule (ORed).
        rule("either", {"path": {"type": "Exact", "value": "/one"}},
             {"path": {"type": "Exact", "value": "/two"}}),
    ]))
    await route_applied(mesh, client, "match", "1", path="/exact")

    async def rule_for(path: str, method: str = "GET", headers: dict[str, str] | None = None) -> str | int:
        """The rule a request matched (the tag the backend saw), or the status if none."""
        r = await send(client, "match", path, method, headers)
        if r.status != 200:
            return r.status
        assert r.json["name"] == "match-echo" and r.json["path"] == path
        return r.json["headers"]["x-rule"]

    cases: list[tuple[tuple[Any, ...], dict[str, str], str | int]] = [
        # Exact: the path and nothing else.
        (("/exact",), {}, "exact"),
        (("/exact?x=1",), {}, "exact"),  # the query string is not part of the path
        (("/exact/",), {}, 404),
        (("/exact/more",), {}, 404),
        (("/exactly",), {}, 404),
        # PathPrefix: element-wise; /foo is not a prefix of /foobar.
        (("/foo",), {}, "prefix"),
        (("/foo/",), {}, "prefix"),
        (("/foo/bar",), {}, "prefix"),
        (("/foo?x=1",), {}, "prefix"),
        (("/foobar",), {}, 404),
        (("/fo",), {}, 404),
        # The longest prefix wins; its trailing `/` is ignored (/foo/deeper == /foo/deeper/).
        (("/foo/deeper",), {}, "longer-prefix"),
        (("/foo/deeper/x",), {}, "longer-prefix"),
        (("/foo/deeperx",), {}, "prefix"),
        # RegularExpression: matches the whole path.
        (("/re/42",), {}, "regex"),
        (("/re/42?q=a",), {}, "regex"),
        (("/re/42a",), {}, 404),
        (("/x/re/42",), {}, 404),
        # Headers: name case-insensitive, value exact (case-sensitive) or regex.
        (("/any",), {"x-variant": "blue"}, "header"),
        (("/any/thing",), {"X-VARIANT": "blue"}, "header"),
        (("/any",), {"x-variant": "Blue"}, 404),
        (("/any",), {"x-variant": "blue-ish"}, 404),
        (("/any",), {"x-build": "v1.2"}, "header-regex"),
        (("/any",), {"x-build": "v1"}, 404),
        # Query parameters: exact name and value.
        (("/any?tier=gold",), {}, "query"),
        (("/any?a=b&tier=gold",), {}, "query"),
        (("/any?tier=silver",), {}, 404),
        (("/any?tier=golden",), {}, 404),
        (("/any?Tier=gold",), {}, 404),
        # Method.
        (("/any", "POST"), {}, "method"),
        (("/any", "PUT"), {}, 404),
        (("/any", "GET"), {}, 404),
        # Matches of one rule are ORed.
        (("/one",), {}, "either"),
        (("/two",), {}, "either"),
        (("/three",), {}, 404),
        # Precedence among matching rules: method > number of header matches > query.
        (("/any?tier=gold", "POST"), {"x-variant": "blue"}, "method"),
        (("/any?tier=gold",), {"x-variant": "blue"}, "header"),
        # No rule matches: 404.
        (("/",), {}, 404),
        (("/nothing/here",), {}, 404),
    ]
    got = [await rule_for(*args, headers=hdrs) for args, hdrs, _ in cases]
    expected = [want for _, _, want in cases]
    mismatches = [(c[0], c[1], g, w) for c, g, w in zip(cases, got, expected, strict=True) if g != w]
    assert not mismatches, "request -> (got, expected):\n" + "\n".join(map(str, mismatches))


async def test_service_without_route_gets_default_route_and_unmatched_gets_404(mesh: MeshHarness) -> None:
    client = mesh.pod(NS, "client", service_account="client")
    _plain, routed = await http_pods(mesh, "plain", "routed")
    await mesh.sidecar(client)
    mesh.write("route-routed.yaml", http_route("routed", "routed", [{
        "matches": [{"path": {"type": "PathPrefix", "value": "/only"}}],
        "backendRefs": [backend("routed")],
        "filters": [marker("1")],
    }]))
    await route_applied(mesh, client, "routed", "1", path="/only")

    # No route: every path and method reaches the service's own pods, untouched.
    for path, method in (("/", "GET"), ("/any/path?q=1", "GET"), ("/submit", "POST"), ("/x", "DELETE")):
        r = await send(client, "plain", path, method)
        assert r.status == 200, (path, method, r.status)
        assert (r.json["name"], r.json["path"], r.json["method"]) == ("plain", path, method)
    # A route attached: only its rules apply; what matches none of them is 404, and the
    # service's own pods are not a fallback.
    served = routed.backend.requests_total
    r = await send(client, "routed", "/only/yes")
    assert (r.status, r.json["name"]) == (200, "routed")
    for path in ("/", "/other", "/onlyx"):
        assert (await send(client, "routed", path)).status == 404, path
    assert routed.backend.requests_total == served + 1


# -------------------------------------------------------------------------------- filters


async def test_request_redirect_is_seen_by_the_client(mesh: MeshHarness) -> None:
    client = mesh.pod(NS, "client", service_account="client")
    (web,) = await http_pods(mesh, "web")
    await mesh.sidecar(client)

    def redirect(prefix: str, **spec: Any) -> dict[str, Any]:
        return {"matches": [{"path": {"type": "PathPrefix", "value": prefix}}],
                "filters": [{"type": "RequestRedirect", "requestRedirect": spec}]}

    mesh.write("route-web.yaml", http_route("web", "web", [
        redirect("/moved", statusCode=301, hostname="new.example.com",
                 path={"type": "ReplaceFullPath", "replaceFullPath": "/landing"}),
        redirect("/old", path={"type": "ReplacePrefixMatch", "replacePrefixMatch": "/new"}),
        redirect("/secure", scheme="https", hostname="secure.example.com", statusCode=308),
        redirect("/scheme", scheme="https"),
        redirect("/elsewhere", hostname="other.example.com", port=8443, statusCode=307),
        {"backendRefs": [backend("web")], "filters": [marker("1")]},
    ]))
    await route_applied(mesh, client, "web", "1")

    cases = [
        ("/moved/a/b", 301, "http://new.example.com/landing"),
        ("/old/page?x=1", 302, "http://web/new/page?x=1"),  # default 302, request host kept
        ("/old", 302, "http://web/new"),
        ("/secure/login", 308, "https://secure.example.com/secure/login"),  # 443 implied
        ("/scheme/a", 302, "https://web/scheme/a"),  # the request's host; the default port omitted
        ("/elsewhere/x", 307, "http://other.example.com:8443/elsewhere/x"),
    ]
    served = web.backend.requests_total
    for path, status, location in cases:
        r = await send(client, "web", path)
        assert (r.status, r.headers.get("location")) == (status, location), path
    assert web.backend.requests_total == served  # a redirect never reaches the backend
    r = await send(client, "web", "/stay")
    assert (r.status, r.json["name"], r.json["path"]) == (200, "web", "/stay")


async def test_url_rewrite_is_seen_by_the_backend(mesh: MeshHarness) -> None:
    client = mesh.pod(NS, "client", service_account="client")
    (_app,) = await http_pods(mesh, "app")
    await mesh.sidecar(client)

    def rewrite(match: dict[str, Any], **spec: Any) -> dict[str, Any]:
        return {"matches": [{"path": match}], "backendRefs": [backend("app")],
                "filters": [{"type": "URLRewrite", "urlRewrite": spec}, marker("1")]}

    mesh.write("route-app.yaml", http_route("app", "app", [
        rewrite({"type": "PathPrefix", "value": "/prefix"},
                path={"type": "ReplacePrefixMatch", "replacePrefixMatch": "/replaced"}),
        rewrite({"type": "PathPrefix", "value": "/strip"},
                path={"type": "ReplacePrefixMatch", "replacePrefixMatch": "/"}),
        rewrite({"type": "PathPrefix", "value": "/full"},
                path={"type": "ReplaceFullPath", "replaceFullPath": "/one"}),
        rewrite({"type": "PathPrefix", "value": "/host"}, hostname="rewritten.example"),
        rewrite({"type": "PathPrefix", "value": "/both"}, hostname="both.example",
                path={"type": "ReplacePrefixMatch", "replacePrefixMatch": "/b"}),
        {"backendRefs": [backend("app")], "filters": [marker("1")]},
    ]))
    await route_applied(mesh, client, "app", "1")

    cases = [
        # ReplacePrefixMatch: the matched prefix is replaced, the rest (and query) kept.
        ("/prefix/one/two", "app", "/replaced/one/two"),
        ("/prefix", "app", "/replaced"),
        ("/prefix/", "app", "/replaced/"),
        ("/prefix/x?q=1", "app", "/replaced/x?q=1"),
        # Replacement `/`: the prefix is removed.
        ("/strip/one", "app", "/one"),
        ("/strip", "app", "/"),
        # ReplaceFullPath: the whole path becomes the value.
        ("/full/one/two", "app", "/one"),
        ("/full", "app", "/one"),
        # Hostname: the backend sees the new Host; the path is untouched.
        ("/host/keep", "rewritten.example", "/host/keep"),
        ("/both/x", "both.example", "/b/x"),
        # No filter: Host and path as sent.
        ("/plain/path", "app", "/plain/path"),
    ]
    for path, host, backend_path in cases:
        r = await send(client, "app", path)
        assert r.status == 200, path
        got = (r.json["name"], r.json["headers"]["host"], r.json["path"])
        assert got == ("app", host, backend_path), path


async def test_header_modifiers_seen_by_backend_and_client(mesh: MeshHarness) -> None:
    client = mesh.pod(NS, "client", service_account="client")
    (_hdr,) = await http_pods(mesh, "hdr")
    await mesh.sidecar(client)
    mesh.write("route-hdr.yaml", http_route("hdr", "hdr", [
        {
            "matches": [{"path": {"type": "PathPrefix", "value": "/modify"}}],
            "backendRefs": [backend("hdr")],
            "filters": [
                {"type": "RequestHeaderModifier", "requestHeaderModifier": {
                    "set": [{"name": "X-Set", "value": "set-by-route"}],
                    "add": [{"name": "X-Added", "value": "added-by-route"}],
                    "remove": ["X-Remove-Me"],
                }},
                {"type": "ResponseHeaderModifier", "responseHeaderModifier": {
                    "set": [{"name": "X-Resp-Set", "value": "resp-set"},
                            {"name": "Content-Type", "value": "application/json; route=1"}],
                    "add": [{"name": "X-Resp-Added", "value": "resp-added"}],
                    "remove": [UPSTREAM_NAME_HEADER],
                }},
            ],
        },
        {"backendRefs": [backend("hdr")], "filters": [marker("1")]},
    ]))
    await route_applied(mesh, client, "hdr", "1")

    sent = {"X-Set": "from-client", "X-Remove-Me": "please", "X-Keep": "kept"}
    r = await send(client, "hdr", "/modify", headers=sent)
    assert r.status == 200 and r.json["name"] == "hdr"
    seen = r.json["headers"]
    # Request side, as the backend sees it.
    assert seen["x-set"] == "set-by-route"  # set overwrites the client's value
    assert seen["x-added"] == "added-by-route"  # add adds
    assert "x-remove-me" not in seen  # remove removes
    assert seen["x-keep"] == "kept"  # others untouched
    # Response side, as the client sees it.
    assert r.headers["x-resp-set"] == "resp-set"
    assert r.headers["content-type"] == "application/json; route=1"  # set overwrites
    assert r.headers["x-resp-added"] == "resp-added"
    assert UPSTREAM_NAME_HEADER not in r.headers  # removed (the backend always sends it)

    # Only the rule with the filters modifies anything.
    r = await send(client, "hdr", "/other", headers=sent)
    assert r.json["headers"]["x-set"] == "from-client"
    assert r.json["headers"]["x-remove-me"] == "please"
    assert "x-added" not in r.json["headers"]
    assert r.headers[UPSTREAM_NAME_HEADER] == "hdr"
    assert "x-resp-set" not in r.headers


async def test_backend_ref_filters_apply_to_their_backend_only(mesh: MeshHarness) -> None:
    """backendRefs[].filters (as upstream's backend request header modifier case): each
    backend's header changes reach only the requests sent to it; the rule's own filters reach
    all of them."""
    client = mesh.pod(NS, "client", service_account="client")
    await asyncio.gather(http_pods(mesh, "front", "v1", "v2"), mesh.sidecar(client))

    def tagged(name: str, **modifier: Any) -> dict[str, Any]:
        ref = backend(name, weight=1)
        ref["filters"] = [{"type": "RequestHeaderModifier", "requestHeaderModifier": modifier},
                          {"type": "ResponseHeaderModifier", "responseHeaderModifier": {
                              "set": [{"name": "x-backend", "value": name}]}}]
        return ref

    mesh.write("route-front.yaml", http_route("front", "front", [{
        "backendRefs": [
            tagged("v1", set=[{"name": "x-version", "value": "one"}], remove=["x-drop"]),
            tagged("v2", add=[{"name": "x-version", "value": "two"}]),
        ],
        "filters": [request_tag("all"), marker("1")],
    }]))
    await route_applied(mesh, client, "front", "1")

    seen: dict[str, list[dict[str, Any]]] = {"v1": [], "v2": []}
    for _ in range(40):
        r = await send(client, "front", "/", headers={"x-drop": "yes"})
        assert r.status == 200, r.status
        name = r.json["name"]
        assert r.headers["x-backend"] == name  # its own response filter
        seen[name].append(r.json["headers"])
        if all(len(v) >= 3 for v in seen.values()):
            break
    assert all(seen.values()), {k: len(v) for k, v in seen.items()}  # both got traffic
    for headers in seen["v1"]:
        assert headers["x-version"] == "one" and "x-drop" not in headers and headers["x-rule"] == "all"
    for headers in seen["v2"]:
        assert headers["x-version"] == "two" and headers["x-drop"] == "yes" and headers["x-rule"] == "all"


async def test_request_header_add_appends_to_an_existing_value(mesh: MeshHarness) -> None:
    """Gateway API: `add` appends to a header the request already has (`a,b`)."""
    client = mesh.pod(NS, "client", service_account="client")
    await asyncio.gather(recording_pod(mesh, "raw"), mesh.sidecar(client))
    mesh.write("route-raw.yaml", http_route("raw", "raw", [{
        "backendRefs": [backend("raw")],
        "filters": [
            {"type": "RequestHeaderModifier", "requestHeaderModifier": {
                "add": [{"name": "X-Append", "value": "from-route"}]}},
            marker("1"),
        ],
    }]))
    await route_applied(mesh, client, "raw", "1")
    r = await send(client, "raw", "/", headers={"X-Append": "from-client"})
    values = [v for k, v in r.json["headers"] if k.lower() == "x-append"]
    # One header with both values, or the same header twice: equivalent in HTTP.
    assert ",".join(values).replace(", ", ",") == "from-client,from-route", values


async def test_request_mirror_copies_to_mirror_backend(mesh: MeshHarness) -> None:
    client = mesh.pod(NS, "client", service_account="client")
    (primary,) = await http_pods(mesh, "primary")
    shadow = await recording_pod(mesh, "shadow")
    await mesh.sidecar(client)
    await reachable(mesh, client, "shadow", "shadow")
    mesh.write("route-primary.yaml", http_route("primary", "primary", [
        {
            "matches": [{"path": {"type": "PathPrefix", "value": "/mirrored"}}],
            "backendRefs": [backend("primary")],
            "filters": [{"type": "RequestMirror",
                         "requestMirror": {"backendRef": backend("shadow")}}],
        },
        {"backendRefs": [backend("primary")], "filters": [marker("1")]},
    ]))
    # The marker is on the rule that does not mirror, so waiting mirrors nothing.
    await route_applied(mesh, client, "primary", "1", path="/not-mirrored")
    del shadow.backend.seen[:]
    primary_before = primary.backend.requests_total

    # Requests of other rules first: had they been mirrored, those copies would be at the
    # shadow before the copies of the mirrored requests below.
    results = await asyncio.to_thread(burst, client, "primary", "/not-mirrored", 20, workers=2)
    assert Counter(results) == {(200, "primary"): 20}
    results = await asyncio.to_thread(burst, client, "primary", "/mirrored/x?n=1", 50, workers=5)
    assert Counter(results) == {(200, "primary"): 50}  # the client gets the primary's answer
    await mesh.until(lambda: len(shadow.backend.seen) >= 50, message="50 mirrored requests")
    assert Counter((m, p) for m, p, _ in shadow.backend.seen) == {("GET", "/mirrored/x?n=1"): 50}
    assert primary.backend.requests_total - primary_before == 70


# ---------------------------------------------------------------------------------- gRPC


class AnyMethodGrpcBackend:
    """A gRPC server answering every unary method with `<name> <method>`; counts calls."""

    def __init__(self, name: str, host: str, port: int) -> None:
        self.name = name
        self.calls: Counter[str] = Counter()
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=4), options=[("grpc.so_reuseport", 0)]
        )
        self._server.add_generic_rpc_handlers([self._Handler(self)])
        self._server.add_insecure_port(f"{host}:{port}")

    class _Handler(grpc.GenericRpcHandler):
        def __init__(self, outer: AnyMethodGrpcBackend) -> None:
            self.outer = outer

        def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
            method = details.method

            def answer(request: bytes, context: grpc.ServicerContext) -> bytes:
                self.outer.calls[method] += 1
                return f"{self.outer.name} {method}".encode()

            return grpc.unary_unary_rpc_method_handler(answer)

    def start(self) -> AnyMethodGrpcBackend:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=None).wait(5)


def grpc_call(pod: Pod, authority: str, method: str, metadata: tuple = ()) -> str:
    """A unary call through the pod's outbound listener, authority = the service."""
    options = [("grpc.default_authority", authority), ("grpc.enable_http_proxy", 0)]
    with grpc.insecure_channel(f"{pod.ip}:15001", options=options) as channel:
        call = channel.unary_unary(method)
        return call(b"", timeout=5, metadata=metadata).decode()


async def test_grpc_route_sends_a_method_to_another_backend(mesh: MeshHarness) -> None:
    client = mesh.pod(NS, "client", service_account="client")
    pods = {}
    for name in ("greeter", "greeter-admin"):
        pod = mesh.pod(NS, name, service_account=name, app="grpc", app_port=9090)
        pod.backend = AnyMethodGrpcBackend(name, pod.ip, pod.app_port).start()
        mesh.service(NS, name, 9090, app_protocol="grpc", pods=[pod])
        pods[name] = pod
    await asyncio.gather(mesh.sidecar(client), *(mesh.sidecar(p) for p in pods.values()))
    hello, admin, other = "/test.Greeter/Hello", "/test.Greeter/Admin", "/test.Other/Admin"
    for name in pods:
        await mesh.until(lambda n=name: grpc_call(client, f"{n}:9090", hello) == f"{n} {hello}",
                         message=f"gRPC default route to {name}")

    mesh.write("route-greeter.yaml", {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "GRPCRoute",
        "metadata": {"name": "greeter", "namespace": NS},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "greeter", "port": 9090}],
            "rules": [
                {"matches": [{"method": {"service": "test.Greeter", "method": "Admin"}}],
                 "backendRefs": [backend("greeter-admin", port=9090)]},
                {"matches": [{"headers": [{"name": "x-tenant", "value": "gold"}]}],
                 "backendRefs": [backend("greeter-admin", port=9090)]},
                {"backendRefs": [backend("greeter", port=9090)]},
            ],
        },
    })
    await mesh.until(
        lambda: grpc_call(client, "greeter:9090", admin) == f"greeter-admin {admin}",
        message="GRPCRoute applied",
    )
    cases = [
        (admin, (), "greeter-admin"),  # the exact method
        (hello, (), "greeter"),  # another method of the same service
        (other, (), "greeter"),  # same method name, other service
        (hello, (("x-tenant", "gold"),), "greeter-admin"),  # a header match
        (hello, (("x-tenant", "silver"),), "greeter"),
    ]
    before = {n: sum(p.backend.calls.values()) for n, p in pods.items()}
    for method, metadata, want in cases:
        got = await asyncio.to_thread(grpc_call, client, "greeter:9090", method, metadata)
        assert got == f"{want} {method}", (method, metadata)
    served = {n: sum(p.backend.calls.values()) - before[n] for n, p in pods.items()}
    assert served == {"greeter": 3, "greeter-admin": 2}
