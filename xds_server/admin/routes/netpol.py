"""Kubernetes NetworkPolicy as the sidecars enforce it: for a pod, which policies select it and
what they allow; for every policy, the pods it selects and what could not be expressed by
identity (its status: networking.k8s.io/v1 has no status field to write it to)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request

from ...model import netpol
from ...model.store import ENDPOINT_SLICE, NAMESPACE, NETWORK_POLICY, POD, SERVICE
from ..app import ERROR_RESPONSES, ApiError, context, read_access
from ..schemas import NetworkPolicyList, PodNetworkPolicy

router = APIRouter(prefix="/api/v1", tags=["network-policy"], dependencies=[Depends(read_access)],
                   responses=ERROR_RESPONSES)

Name = Annotated[str, Path(min_length=1, max_length=253)]


def _snapshot(request: Request) -> tuple[list[Any], list[netpol.NetworkPolicy], netpol.PodView]:
    """The store's objects, copied on the loop (the work then runs in a thread)."""
    ctx = context(request)
    store = ctx.store
    if store is None:  # no mesh source (raw resources only): no pods, no policies
        return [], [], netpol.view_of([], {}, [], [], ctx.trust_domain)
    workloads = list(store.all(POD).values())
    view = netpol.view_of(
        workloads, {n.name: n for n in store.all(NAMESPACE).values()},
        list(store.all(SERVICE).values()), list(store.all(ENDPOINT_SLICE).values()), ctx.trust_domain,
    )
    return workloads, list(store.all(NETWORK_POLICY).values()), view


@router.get("/network-policy/{namespace}/{pod}", response_model=PodNetworkPolicy,
            summary="A pod's NetworkPolicy: the policies that select it and what they allow")
async def pod_network_policy(request: Request, namespace: Name, pod: Name) -> dict[str, Any]:
    workloads, policies, view = _snapshot(request)
    workload = next((w for w in workloads if (w.namespace, w.name) == (namespace, pod)), None)
    if workload is None:
        raise ApiError(404, f"no pod {namespace}/{pod} in the mesh model")
    return await asyncio.to_thread(netpol.describe, workload, policies, view)


def _policies(workloads: list[Any], policies: list[netpol.NetworkPolicy], view: netpol.PodView) -> dict[str, Any]:
    out: dict[str, dict[str, Any]] = {}
    for policy in sorted(policies, key=lambda p: (p.namespace, p.name)):
        out[f"{policy.namespace}/{policy.name}"] = {
            "namespace": policy.namespace, "name": policy.name,
            "policy_types": sorted(policy.policy_types), "selects": [], "not_enforced": [], "notes": set(),
        }
    for workload in workloads:
        selecting = netpol.selected_by(workload, policies)
        if not selecting:
            continue
        why = netpol.enforced_by_sidecar(workload)
        for key in selecting:
            out[key]["selects"].append(f"{workload.namespace}/{workload.name}")
            if why is not None:
                out[key]["not_enforced"].append(f"{workload.namespace}/{workload.name}: {why}")
        if why is None:
            for enforcement in (netpol.resolve_ingress(workload, policies, view),
                                netpol.resolve_egress(workload, policies, view)):
                for note in enforcement.notes:
                    out[note.policy]["notes"].add(f"{note.field}: {note.message}")
    for entry in out.values():
        entry["notes"] = sorted(entry["notes"])
        entry["selects"].sort()
        entry["not_enforced"].sort()
    return {"policies": list(out.values())}


@router.get("/network-policies", response_model=NetworkPolicyList,
            summary="Every NetworkPolicy: the pods it selects, those no sidecar enforces it for, "
                    "and rules matched by source IP instead of identity")
async def network_policies(request: Request) -> dict[str, Any]:
    return await asyncio.to_thread(_policies, *_snapshot(request))
