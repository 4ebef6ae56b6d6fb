"""NetworkPolicy objects as the sources read them: Kubernetes' defaulting, and every invalid
form refused naming its field as `kubectl` would (pkg/apis/networking/validation)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from xds_server.model.netpol import IpBlock, LabelSelector, NetworkPolicy, PolicyPort, Requirement
from xds_server.sources.k8s_objects import ObjectError, convert

GOOD: dict[str, Any] = {
    "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
    "metadata": {"name": "api", "namespace": "shop"},
    "spec": {
        "podSelector": {"matchLabels": {"app": "api"}},
        "ingress": [{
            "from": [{"podSelector": {"matchLabels": {"app": "frontend"}}},
                     {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}],
            "ports": [{"port": 8080}, {"port": "http"}, {"port": 9000, "endPort": 9010}, {"protocol": "UDP", "port": 53}],
        }],
        "egress": [{"to": [{"namespaceSelector": {"matchExpressions": [
            {"key": "team", "operator": "In", "values": ["a"]}]}}]}],
    },
}


def test_a_policy_becomes_the_model_with_kubernetes_defaults() -> None:
    policy = convert(GOOD)
    assert isinstance(policy, NetworkPolicy)
    assert policy.pod_selector == LabelSelector((("app", "api"),))
    assert policy.policy_types == {"Ingress", "Egress"}  # egress rules written: both
    rule = policy.ingress[0]
    assert rule.peers[1].ip_block == IpBlock("10.0.0.0/8", ("10.1.0.0/16",))
    assert rule.ports == (PolicyPort("TCP", 8080), PolicyPort("TCP", "http"), PolicyPort("TCP", 9000, 9010),
                          PolicyPort("UDP", 53))
    assert policy.egress[0].peers[0].namespace_selector == LabelSelector(
        expressions=(Requirement("team", "In", ("a",)),))
    ingress_only = copy.deepcopy(GOOD)
    del ingress_only["spec"]["egress"]
    assert convert(ingress_only).policy_types == {"Ingress"}


def _set(path: list[Any], value: Any) -> dict[str, Any]:
    obj = copy.deepcopy(GOOD)
    node: Any = obj["spec"]
    for step in path[:-1]:
        node = node[step]
    if value is KeyError:
        del node[path[-1]]
    elif path[-1] == "+":
        node.append(value)
    else:
        node[path[-1]] = value
    return obj


@pytest.mark.parametrize("obj, field, message", [
    (_set(["podSelector"], KeyError), "spec.podSelector", "required"),
    (_set(["ingress", 0, "from", 1, "ipBlock", "except"], ["11.0.0.0/16"]),
     "spec.ingress[0].from[1].ipBlock.except[0]", "strict subset of cidr 10.0.0.0/8"),
    (_set(["ingress", 0, "from", 1, "ipBlock", "cidr"], "10.0.0.0"),
     "spec.ingress[0].from[1].ipBlock.cidr", "write the prefix length"),
    (_set(["ingress", 0, "ports", 2, "endPort"], 10), "spec.ingress[0].ports[2].endPort", "greater than or equal"),
    (_set(["ingress", 0, "ports", 1, "endPort"], 90), "spec.ingress[0].ports[1].endPort", "numeric port"),
    (_set(["ingress", 0, "ports", 1, "port"], "8080"), "spec.ingress[0].ports[1].port", "without quotes"),
    (_set(["ingress", 0, "ports", 0, "protocol"], "ICMP"), "spec.ingress[0].ports[0].protocol", "not one of"),
    (_set(["ingress", 0, "from", 0, "ipBlock"], {"cidr": "1.2.3.4/32"}), "spec.ingress[0].from[0].ipBlock",
     "may not be combined"),
    (_set(["ingress", 0, "from", "+"], {}), "spec.ingress[0].from[2]", "must specify a peer"),
    (_set(["egress", 0, "to", 0, "namespaceSelector", "matchExpressions", 0, "operator"], "Exists"),
     "spec.egress[0].to[0].namespaceSelector.matchExpressions[0].values", "may not be specified"),
    (_set(["egress", 0, "to", 0, "namespaceSelector", "matchExpressions", 0, "values"], []),
     "spec.egress[0].to[0].namespaceSelector.matchExpressions[0].values", "must be specified"),
    (_set(["policyTypes"], ["Ingress", "Bogus"]), "spec.policyTypes[1]", "not one of Ingress, Egress"),
    (_set(["policyTypes"], ["Egress", "Egress"]), "spec.policyTypes[1]", "duplicate Egress"),
    (_set(["podSelector", "matchLabels"], {"bad key!": "x"}), "spec.podSelector.matchLabels[bad key!]",
     "not a label key"),
])
def test_an_invalid_policy_names_the_field(obj: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(ObjectError) as raised:
        convert(obj)
    error = raised.value
    assert (error.kind, error.namespace, error.name) == ("NetworkPolicy", "shop", "api")
    assert error.field_path == field, error
    assert message in error.message, error


def test_the_api_version_is_checked() -> None:
    with pytest.raises(ObjectError) as raised:
        convert({**GOOD, "apiVersion": "networking.k8s.io/v1beta1"})
    assert raised.value.field_path == "apiVersion"
