"""Typed models of the Kubernetes and Gateway API objects the sources read: only the fields
the mesh uses, with the upstream schemas' constraints, one module per API group (meta, core,
discovery, gateway). They validate; `sources/k8s_objects.py` converts them to the model.
"""

from .base import Invalid, KubeModel, field_path, problems
from .core import Namespace, Pod, Service
from .discovery import EndpointSlice
from .gateway import GATEWAY_GROUP, GRPCRoute, HTTPRoute
from .networking import NetworkPolicy

__all__ = [
    "GATEWAY_GROUP",
    "EndpointSlice",
    "GRPCRoute",
    "HTTPRoute",
    "Invalid",
    "KubeModel",
    "Namespace",
    "NetworkPolicy",
    "Pod",
    "Service",
    "field_path",
    "problems",
]
