"""Schema-driven fuzzing of the admin API (schemathesis against its own OpenAPI document).

Every operation, with valid and invalid input (wrong types, missing and extra fields, bad
enums, unparsable bodies), sent with the admin token so writes reach their validation: the
server never answers 5xx, every answer is one the document declares, with the declared body
(errors are JSON naming the field). The server runs with a CA, a connected proxy and resources,
so every route has something to show. Bounded examples keep the run well under a minute.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from tests.support.admin import CA, ThreadedStack
from tests.support.xds_client import XdsClient, cluster, endpoints
from xds_server.xds import types
from xds_server.xds.cache import ResourceCache

pytestmark = pytest.mark.slow

MAX_EXAMPLES = 60  # per operation and mode (valid / invalid input): the run stays well under a minute


@pytest.fixture(scope="module")
def threaded(tmp_path_factory: pytest.TempPathFactory):
    cache = ResourceCache()
    cache.set_type(types.CLUSTER, [cluster("web"), cluster("api")])
    cache.set_type(types.ENDPOINT, [endpoints("web", 8080)])
    ca = CA(tmp_path_factory.mktemp("fuzz") / "ca")
    from xds_server.model.identity import Identity

    ca.issuer.issue_for_identity(Identity("shop", "web"), proxy="fuzz-proxy")
    threaded = ThreadedStack(cache=cache, ca=ca)
    stack = threaded.start()

    async def connect() -> XdsClient:
        client = XdsClient(stack.server.address, node_id="fuzz-proxy")
        ads = client.ads()
        await ads.request(types.CLUSTER)
        await ads.ack(await ads.recv())
        await ads.request(types.ENDPOINT, ["web"])
        await ads.ack(await ads.recv())
        return client

    client = threaded.run(connect())
    yield threaded
    threaded.run(client.close())
    threaded.stop()


def _static_spec() -> dict:
    """The OpenAPI document, built without a running server (it is static)."""
    from xds_server.admin.app import AdminContext, create_app
    from xds_server.admin.auth import TokenStore

    return create_app(AdminContext(server=None, cache=None, tokens=TokenStore())).openapi()


OPERATIONS = sorted((method.upper(), path) for path, item in _static_spec()["paths"].items()
                    for method in item)
# Invalid input only exists for operations that take some (parameters or a body).
TAKES_INPUT = sorted(
    (method.upper(), path) for path, item in _static_spec()["paths"].items()
    for method, operation in item.items()
    if operation.get("parameters") or operation.get("requestBody")
)
CASES = [(m, p, GenerationMode.POSITIVE) for m, p in OPERATIONS] + [
    (m, p, GenerationMode.NEGATIVE) for m, p in TAKES_INPUT
]


@pytest.fixture(scope="module")
def api_schema(threaded: ThreadedStack):
    # Loaded from the running server: what is fuzzed is what it serves. The admin token goes
    # with every request (writes need it to reach their validation); schemathesis knows it is
    # the real credential, and checks separately that requests without it are refused.
    config = schemathesis.Config.from_dict({
        "headers": {"Authorization": f"Bearer {threaded.stack.tokens.admin}"},
    })
    return schemathesis.openapi.from_url(f"{threaded.stack.url}/openapi.json", config=config)


@pytest.mark.parametrize(
    "method, path, mode", CASES,
    ids=[f"{m} {p} {'valid' if g is GenerationMode.POSITIVE else 'invalid'}" for m, p, g in CASES],
)
def test_no_server_errors_and_every_answer_is_documented(
    method: str, path: str, mode: GenerationMode, api_schema, threaded: ThreadedStack
) -> None:
    operation = api_schema[path][method]
    seen: list[int] = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    def fuzz(case) -> None:
        if mode is GenerationMode.POSITIVE and "proxy_id" in (case.path_parameters or {}) \
                and hash(str(case.path_parameters)) % 2:
            case.path_parameters["proxy_id"] = "fuzz-proxy"  # half the time, a proxy that exists
        response = case.call()  # with the admin token from the schema's config
        seen.append(response.status_code)
        assert response.status_code < 500, (case.method, case.formatted_path, response.text)
        if response.status_code in (400, 422):  # bad input: a JSON error naming each field
            problems = response.json()["fields"]
            assert problems and all(p["field"] and p["message"] for p in problems), response.text
        case.validate_response(response)

    fuzz()
    assert seen


def test_the_document_covers_every_route(threaded: ThreadedStack) -> None:
    import httpx

    spec = httpx.get(f"{threaded.stack.url}/openapi.json", trust_env=False).json()
    operations = {(m.upper(), p) for p, item in spec["paths"].items() for m in item}
    assert {("POST", "/api/v1/push"), ("POST", "/api/v1/ca/root-rotation"),
            ("GET", "/api/v1/proxies/{proxy_id}/config"), ("GET", "/metrics"),
            ("GET", "/readyz")} <= operations
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            if path.startswith("/api/"):
                assert operation.get("security") == [{"HTTPBearer": []}], (method, path)
                assert {"401", "403"} <= set(operation["responses"]), (method, path)
            if method == "post":
                assert {"400", "422"} <= set(operation["responses"]), (method, path)
