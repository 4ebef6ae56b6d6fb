"""What proxyless gRPC clients receive is built for gRPC (CONFORMANCE 22, model/client_kinds.py):
the gRPC form of virtual hosts and clusters, the Envoy form's `num_retries`, what is reported
where a TrafficPolicy field cannot apply, and where the gRPC route configuration lives."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from envoy.config.cluster.v3 import outlier_detection_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from pydantic import ValidationError

from tests.unit.test_translate_routes import API, SERVICES, policy, prefix, route, rule
from xds_server.api.v1alpha1 import traffic as api
from xds_server.model.client_kinds import grpc_notes
from xds_server.model.identity import VerifiedProxy
from xds_server.model.mesh import Namespace
from xds_server.model.routes import Retry
from xds_server.model.store import MeshStore
from xds_server.sources.kube_status import policy_status
from xds_server.sources.validate import validate_directory
from xds_server.translate import names
from xds_server.translate.clusters import service_cluster
from xds_server.translate.controller import MeshController
from xds_server.translate.proxyless import client_cluster, grpc_outlier_detection
from xds_server.translate.routes import service_virtual_host
from xds_server.xds import types
from xds_server.xds.cache import ResourceCache
from xds_server.xds.node import proxy_claim


def vhost(routes: list[Any] = (), pol: Any = None, *, grpc: bool) -> rc.VirtualHost:  # type: ignore[assignment]
    port = API.port(8080)
    assert port is not None
    return service_virtual_host(API, port, list(routes), pol, SERVICES, local=True, default_port=False, grpc=grpc)


def only_route(routes: list[Any] = (), pol: Any = None, *, grpc: bool) -> rc.RouteAction:  # type: ignore[assignment]
    return vhost(routes, pol, grpc=grpc).routes[0].route


# ------------------------------------------------------------------------ timeouts, retries


def test_backend_timeout_without_retry_has_no_retry_policy_in_either_form() -> None:
    """The issue's bug: backendRequest and no retry was `num_retries: 0`, which gRPC rejects."""
    r = [route("t", rule(prefix("/"), backend_timeout=2.5))]
    envoy = only_route(r, grpc=False)
    assert not envoy.HasField("retry_policy") and envoy.timeout.ToMilliseconds() == 2500
    grpc = only_route(r, grpc=True)
    assert not grpc.HasField("retry_policy") and not grpc.HasField("timeout")
    assert grpc.max_stream_duration.max_stream_duration.ToMilliseconds() == 2500
    assert grpc.max_stream_duration.grpc_timeout_header_max.ToMilliseconds() == 2500


@pytest.mark.parametrize("grpc", [False, True])
def test_zero_attempts_never_make_num_retries_zero(grpc: bool) -> None:
    for spec in ({"attempts": 0}, {"attempts": 0, "perTryTimeout": "1s"}):
        action = only_route(pol=policy(retries=spec), grpc=grpc)
        assert not action.HasField("retry_policy"), spec
    with_rule = only_route([route("t", rule(prefix("/"), retry=Retry(attempts=0), backend_timeout=1.0))], grpc=grpc)
    assert not with_rule.HasField("retry_policy")


def test_grpc_timeouts() -> None:
    # The policy's timeout; none without one (Envoy's 15 s default is Envoy's, not the user's).
    assert only_route(pol=policy(timeout="3s"), grpc=True).max_stream_duration.max_stream_duration.seconds == 3
    assert not only_route(grpc=True).HasField("max_stream_duration")
    assert only_route(grpc=False).timeout.seconds == 15  # API's port is HTTP
    # 0 disables it.
    assert not only_route([route("t", rule(prefix("/"), request_timeout=0.0))], grpc=True).HasField("max_stream_duration")
    # Without retries, the only try's timeout bounds the call; with retries gRPC has no
    # per-try timeout, and the overall one applies.
    single = only_route(pol=policy(timeout="5s", retries={"attempts": 0, "perTryTimeout": "2s"}), grpc=True)
    assert single.max_stream_duration.max_stream_duration.seconds == 2
    retried = only_route(pol=policy(timeout="5s", retries={"attempts": 2, "perTryTimeout": "2s"}), grpc=True)
    assert retried.max_stream_duration.max_stream_duration.seconds == 5
    assert not retried.retry_policy.HasField("per_try_timeout")


def test_grpc_retry_policy_keeps_only_what_grpc_reads() -> None:
    action = only_route(pol=policy(retries={"attempts": 9, "retryOn": "5xx,unavailable,reset,cancelled,503"}), grpc=True)
    retry = action.retry_policy
    assert retry.retry_on == "unavailable,cancelled" and retry.num_retries.value == 4  # gRPC caps at 5 attempts
    assert not retry.retriable_status_codes and not retry.retry_host_predicate
    assert retry.host_selection_retry_max_attempts == 0
    # Nothing gRPC can retry on: no policy at all (an empty one would be dropped anyway).
    assert not only_route(pol=policy(retries={"attempts": 2, "retryOn": "5xx"}), grpc=True).HasField("retry_policy")
    # A GEP-1731 route retry is on HTTP codes and connection failures: nothing for gRPC.
    r = [route("t", rule(prefix("/"), retry=Retry(attempts=3, codes=(503,), backoff=0.05)))]
    assert only_route(r, grpc=False).retry_policy.num_retries.value == 3
    assert not only_route(r, grpc=True).HasField("retry_policy")


def test_grpc_matches_and_skipped_routes() -> None:
    from xds_server.model.routes import MatchType, ValueMatch

    r = route("m", rule(prefix("/pkg.Svc")), rule(prefix("/q", query=(ValueMatch("v", "1", MatchType.EXACT),))))
    envoy = vhost([r], grpc=False)
    assert [x.match.path_separated_prefix for x in envoy.routes] == ["/pkg.Svc", "/q"]  # longest prefix first
    grpc = vhost([r], grpc=True)
    # gRPC knows no path_separated_prefix; it skips routes with query matches (gRFC A28).
    assert [x.match.safe_regex.regex for x in grpc.routes] == [r"/pkg\.Svc(/.*)?"]
    assert not grpc.routes[0].match.path_separated_prefix


def test_grpc_hashing_on_headers_only() -> None:
    header = policy(loadBalancer={"consistentHash": {"httpHeaderName": "x-user"}})
    assert only_route(pol=header, grpc=True).hash_policy[0].header.header_name == "x-user"
    cookie = policy(loadBalancer={"consistentHash": {"httpCookie": "session"}})
    assert only_route(pol=cookie, grpc=False).hash_policy
    assert not only_route(pol=cookie, grpc=True).hash_policy


# -------------------------------------------------------------------------------- fault


@pytest.mark.parametrize("grpc", [False, True])
def test_fault_abort_with_grpc_status(grpc: bool) -> None:
    pol = policy(fault={"abort": {"percentage": 100, "grpcStatus": "RESOURCE_EXHAUSTED"}})
    fault = fault_pb2.HTTPFault()
    assert vhost(pol=pol, grpc=grpc).routes[0].typed_per_filter_config[names.FAULT_FILTER].Unpack(fault)
    assert fault.abort.grpc_status == 8 and not fault.abort.http_status


def test_fault_abort_takes_exactly_one_status() -> None:
    for abort in ({"percentage": 5}, {"percentage": 5, "httpStatus": 503, "grpcStatus": "UNAVAILABLE"}):
        with pytest.raises(ValidationError):
            api.FaultAbort.model_validate(abort)
    with pytest.raises(ValidationError):
        api.FaultAbort.model_validate({"percentage": 5, "grpcStatus": "SOMETIMES"})


# ---------------------------------------------------------------------- outlier detection


def _cluster(**detection: Any) -> Any:
    port = API.port(8080)
    assert port is not None
    return service_cluster(API, port, policy(outlierDetection=detection))


def test_envoy_outlier_detection_fields() -> None:
    plain = _cluster().outlier_detection
    assert plain.consecutive_5xx.value == 5 and plain.enforcing_success_rate.value == 0
    assert not plain.HasField("enforcing_failure_percentage")
    full = _cluster(failurePercentageThreshold=50, failurePercentageMinimumHosts=3,
                    failurePercentageRequestVolume=10, successRateStdevFactor=1500,
                    enforcingSuccessRate=40).outlier_detection
    assert (full.failure_percentage_threshold.value, full.failure_percentage_minimum_hosts.value,
            full.failure_percentage_request_volume.value) == (50, 3, 10)
    assert full.enforcing_failure_percentage.value == 100  # on: unset enforcing means 100
    assert full.success_rate_stdev_factor.value == 1500 and full.enforcing_success_rate.value == 40


def test_grpc_outlier_detection() -> None:
    # Consecutive 5xx: gRPC has none; approximated by failure percentage at 100 %.
    consecutive = client_cluster(_cluster(consecutive5xxErrors=3, interval="2s")).outlier_detection
    assert not consecutive.HasField("consecutive_5xx")
    assert (consecutive.failure_percentage_threshold.value, consecutive.failure_percentage_request_volume.value,
            consecutive.failure_percentage_minimum_hosts.value, consecutive.enforcing_failure_percentage.value) == (100, 3, 1, 100)
    assert consecutive.interval.seconds == 2 and consecutive.enforcing_success_rate.value == 0
    # Failure percentage given: used as is; the consecutive form is not mixed in.
    given = client_cluster(_cluster(failurePercentageThreshold=60)).outlier_detection
    assert given.failure_percentage_threshold.value == 60 and not given.HasField("failure_percentage_request_volume")
    # Nothing gRPC can do: no outlier detection at all.
    assert not client_cluster(_cluster(consecutive5xxErrors=0)).HasField("outlier_detection")
    # Envoy's defaults when fields are unset: success rate on.
    assert grpc_outlier_detection(outlier_detection_pb2.OutlierDetection()) is not None


# ------------------------------------------------------------------------------- reports


def test_grpc_notes() -> None:
    assert grpc_notes(policy(timeout="3s", fault={"abort": {"percentage": 1, "httpStatus": 503}})) == []
    notes = dict(grpc_notes(policy(
        retries={"attempts": 7, "perTryTimeout": "1s", "retryOn": "5xx,unavailable"},
        outlierDetection={"consecutive5xxErrors": 4},
        loadBalancer={"simple": "LEAST_REQUEST"},
        healthCheck={},
    )))
    assert set(notes) == {
        "spec.retries.retryOn", "spec.retries.perTryTimeout", "spec.retries.attempts",
        "spec.outlierDetection.consecutive5xxErrors", "spec.loadBalancer.simple", "spec.healthCheck",
    }
    assert "at least 4 requests" in notes["spec.outlierDetection.consecutive5xxErrors"]
    with_fp = dict(grpc_notes(policy(outlierDetection={"failurePercentageThreshold": 50})))
    assert "use the failure-percentage settings" in with_fp["spec.outlierDetection.consecutive5xxErrors"]


POLICY = {
    "apiVersion": "mesh.xds-server.io/v1alpha1", "kind": "TrafficPolicy",
    "metadata": {"name": "api", "namespace": "shop"},
    "spec": {"targetRef": {"name": "api"}, "retries": {"attempts": 2, "retryOn": "5xx"}},
}


def test_validate_warns_where_proxyless_workloads_exist(tmp_path: Path) -> None:
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(POLICY))
    assert validate_directory(tmp_path) == []  # an Envoy-only mesh: nothing to say
    (tmp_path / "pod.yaml").write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "client-1", "namespace": "shop",
                     "annotations": {"xds-server.io/proxyless": "true"}},
        "spec": {"containers": [{"name": "app"}]}, "status": {"podIP": "10.0.0.9"},
    }))
    (warning,) = validate_directory(tmp_path)
    assert warning.severity == "warning" and warning.field == "spec.retries.retryOn"
    assert "do not retry" in warning.message


def test_policy_status_names_what_grpc_cannot_apply() -> None:
    from xds_server.model.mesh import ServiceKey

    notes = grpc_notes(policy(retries={"attempts": 2, "retryOn": "5xx"}))
    status = policy_status(POLICY, error=None, kept_last_good=False, services={ServiceKey("shop", "api")},
                           notes=notes)
    (accepted,) = status["conditions"]
    assert accepted["status"] == "True" and "spec.retries.retryOn" in accepted["message"]
    plain = policy_status(POLICY, error=None, kept_last_good=False, services={ServiceKey("shop", "api")})
    assert plain["conditions"][0]["message"] == "the mesh applies this policy"


# -------------------------------------------------------------- where the gRPC form lives


def _node(pod: str, *, grpc: bool) -> VerifiedProxy:
    node = base_pb2.Node(id=f"{pod}.shop")
    node.metadata.update({"namespace": "shop", "pod": pod})
    if grpc:
        node.user_agent_name = "gRPC Python"
    return VerifiedProxy.unverified(proxy_claim(node))


def test_grpc_route_configuration_exists_while_a_proxyless_client_is_connected() -> None:
    store, cache = MeshStore(), ResourceCache()
    controller = MeshController(store, cache)
    store.put("test", Namespace("shop"))
    store.put("test", API)
    sidecar = controller.view_for(_node("web-1", grpc=False))
    grpc_name = names.proxyless_route_name("shop")
    assert cache.get(types.ROUTE, grpc_name) is None  # no proxyless client: not built
    client = controller.view_for(_node("client-1", grpc=True))
    found = client.get(types.ROUTE, grpc_name)
    assert found is not None
    config = found.unpack(route_pb2.RouteConfiguration)
    assert not any(r.route.HasField("timeout") for v in config.virtual_hosts for r in v.routes)
    # The sidecar neither sees the gRPC form nor the client the Envoy one.
    assert sidecar.get(types.ROUTE, grpc_name) is None
    assert client.get(types.ROUTE, names.outbound_route_name("shop")) is None
    listener = client.get(types.LISTENER, "api.shop:8080")
    assert listener is not None and grpc_name.encode() in listener.body
    # A policy change reaches the gRPC form.
    from xds_server.model.policy import TargetRef, TrafficPolicy, TrafficPolicySpec

    store.put("test", TrafficPolicy("shop", "api", TrafficPolicySpec(TargetRef("api"), timeout=4.0)))
    found = client.get(types.ROUTE, grpc_name)
    assert found is not None
    action = found.unpack(route_pb2.RouteConfiguration).virtual_hosts[0].routes[0].route
    assert action.max_stream_duration.max_stream_duration.seconds == 4
    controller.release(_node("client-1", grpc=True))
    assert cache.get(types.ROUTE, grpc_name) is None

