"""`mesh.xds-server.io/v1alpha1`: TrafficPolicy, MTLSPolicy and AuthorizationPolicy specs."""

from .common import API_VERSION, GROUP, VERSION, DURATION_PATTERN, Spec, parse_duration
from .security import AuthorizationPolicySpec, MTLSPolicySpec
from .traffic import TrafficPolicySpec

__all__ = [
    "API_VERSION",
    "DURATION_PATTERN",
    "GROUP",
    "VERSION",
    "AuthorizationPolicySpec",
    "MTLSPolicySpec",
    "Spec",
    "TrafficPolicySpec",
    "parse_duration",
]
