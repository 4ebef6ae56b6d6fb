"""Request and response bodies of the admin API (they make its OpenAPI document)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

TypeName = Literal["CDS", "EDS", "LDS", "RDS", "SDS"]
Status = Literal["SYNCED", "STALE", "NACKED", "NOT SENT"]


class _Strict(BaseModel):
    """Request bodies: no unknown field and no coercion (`{"resend": 0.0}` is not `false`:
    the document says boolean, so anything else is a 422 naming the field)."""

    model_config = ConfigDict(extra="forbid", strict=True)


# Errors -------------------------------------------------------------------------------------


class FieldProblem(BaseModel):
    field: str = Field(description="The offending field, dotted (e.g. `types.0`); `body` for the "
                                   "body as a whole.")
    location: Literal["body", "query", "path", "header", "cookie"] | str
    message: str


class ErrorResponse(BaseModel):
    error: str = Field(description="What went wrong, for a human.")
    fields: list[FieldProblem] = Field(default_factory=list,
                                       description="The fields at fault, for bad input.")


# Health -------------------------------------------------------------------------------------


class Health(BaseModel):
    status: Literal["ok"]


class Check(BaseModel):
    ok: bool
    detail: str


class Readiness(BaseModel):
    ready: bool
    checks: dict[str, Check]


# Proxies ------------------------------------------------------------------------------------


class Nack(BaseModel):
    message: str = Field(description="The error text the proxy sent with its NACK.")
    version: str
    at: str | None


class TypeStatus(BaseModel):
    type_url: str
    status: Status
    sent_version: str | None
    acked_version: str | None
    error: Nack | None = Field(description="The last NACK of this type, until an ACK clears it.")
    wildcard: bool
    subscribed_names: int
    last_sent: str | None
    last_acked: str | None


class Identity(BaseModel):
    spiffe_id: str | None
    verified: bool = Field(description="True when the stream authenticated as this identity; "
                                       "false when it is only what the node claims.")


class Stream(BaseModel):
    id: int
    method: str
    variant: Literal["sotw", "delta"]
    address: str
    connected_since: str | None


class Proxy(BaseModel):
    id: str = Field(description="The Envoy node id.")
    cluster: str
    identity: Identity
    address: str = Field(description="The peer address of its newest stream.")
    connected_since: str | None
    variant: Literal["sotw", "delta"]
    streams: list[Stream]
    status: Status = Field(description="The worst status of its types.")
    types: dict[str, TypeStatus]
    replica: str | None = Field(default=None, description="With shared state: the replica "
                                "(--replica-id) serving it.")


class ProxyList(BaseModel):
    proxies: list[Proxy]
    replicas: list[str] | None = Field(
        default=None, description="With shared state: the replicas whose proxies are listed.")
    complete: bool | None = Field(
        default=None, description="With shared state: false when Redis could not be asked "
        "(only this replica's proxies are listed).")


class ConfigDump(BaseModel):
    proxy: str
    generated_at: str | None
    types: dict[str, Any] = Field(description="By type (CDS, EDS, LDS, RDS, SDS): status, "
                                              "versions, size and the resources as Envoy JSON, "
                                              "secrets redacted.")


# Server, model and sources ------------------------------------------------------------------


class ServerInfo(BaseModel):
    xds_address: str
    control_plane_id: str
    serving: bool
    streams: int
    proxies: int
    # Counters; those kept by reason (limits, csds_refusals) as {reason: count}.
    stats: dict[str, int | dict[str, int]]
    # Admission and push queues: initializing streams, push-slot waiters by queue (first
    # config, incremental), writes in flight, refusals by reason, and their limits.
    overload: dict[str, int] = Field(default_factory=dict)
    shared_state: dict[str, Any] | None = Field(
        default=None, description="Redis shared with the other replicas: up, or degraded (xDS "
        "keeps serving; what could not be shared is re-published when it returns); refused "
        "entries by reason. Absent without --redis-url.")


class Model(BaseModel):
    namespaces: list[dict[str, Any]] = Field(default_factory=list)
    services: list[dict[str, Any]] = Field(default_factory=list)
    endpoints: list[dict[str, Any]] = Field(default_factory=list)
    workloads: list[dict[str, Any]] = Field(default_factory=list)
    routes: list[dict[str, Any]] = Field(default_factory=list)
    policies: list[dict[str, Any]] = Field(default_factory=list)


class NetworkPolicyDirection(BaseModel):
    isolated: bool
    policies: list[str]
    allows: list[dict[str, Any]] | str  # a string: everything (the pod is not isolated)
    notes: list[str]


class PodNetworkPolicy(BaseModel):
    pod: str
    selected_by: dict[str, list[str]]
    enforced: bool
    not_enforced_because: str | None = None
    ingress: NetworkPolicyDirection
    egress: NetworkPolicyDirection


class NetworkPolicyEntry(BaseModel):
    namespace: str
    name: str
    policy_types: list[str]
    selects: list[str]
    not_enforced: list[str]
    notes: list[str]


class NetworkPolicyList(BaseModel):
    policies: list[NetworkPolicyEntry]


class Source(BaseModel):
    name: str
    synced: bool
    errors: list[dict[str, Any]]
    directory: str | None = None


class SourceList(BaseModel):
    sources: list[Source]


# CA -----------------------------------------------------------------------------------------


class Certificate(BaseModel):
    subject: str
    serial: str
    fingerprint: str
    not_before: str
    not_after: str
    signing: bool | None = None
    pending: bool | None = None


class CAStatus(BaseModel):
    trust_domain: str
    self_signed: bool
    signing_certificate: Certificate
    not_after: str
    roots: list[Certificate]
    rotation: dict[str, Any] | None
    issued_certificates: int | None


class TrustBundle(BaseModel):
    pem: str = Field(description="Every trusted root, PEM.")
    roots: list[Certificate]


class IssuedCertificate(BaseModel):
    serial: str
    spiffe_id: str
    not_before: str
    not_after: str
    issued_at: str
    proxy: str
    root_fingerprint: str
    kind: str


class IssuedList(BaseModel):
    certificates: list[IssuedCertificate]


class RotationRequest(_Strict):
    action: Literal["start", "cancel"] = Field(
        description="start: generate the next root and publish it in the trust bundle (it "
                    "signs once every proxy has it); cancel: abandon a rotation still publishing.")


class RotationResult(BaseModel):
    action: str
    rotation: dict[str, Any]


# Workload tokens ----------------------------------------------------------------------------


class TokenRequest(_Strict):
    namespace: str = Field(min_length=1, max_length=63)
    service_account: str = Field(min_length=1, max_length=253)
    ttl: str = Field(default="24h", min_length=1, max_length=16,
                     description="Lifetime: 1h, 24h, 30d (at most 365d).")


class TokenIssued(BaseModel):
    token: str = Field(description="The bearer token (shown once; never logged).")
    token_id: str
    identity: str
    expires_at: str


class TokenRevoked(BaseModel):
    token_id: str
    revoked: bool = Field(description="false: it was already revoked.")


# Debug --------------------------------------------------------------------------------------


class PushRequest(_Strict):
    proxy: str | None = Field(default=None, min_length=1, max_length=1024,
                              description="A node id; every proxy when omitted.")
    types: list[TypeName] | None = Field(default=None, min_length=1, max_length=5,
                                         description="Only these types; all when omitted.")
    resend: bool = Field(default=False, description="Forget what was sent and send the "
                                                    "complete current config again (otherwise "
                                                    "only what differs is sent).")


class PushResult(BaseModel):
    streams: int
    proxies: list[str]


# The live mesh page ---------------------------------------------------------------------------


class MeshNode(BaseModel):
    id: str = Field(description="`namespace/name` for a Service, `namespace/sa:NAME` for a "
                                "calling workload behind no Service (its service account).")
    kind: Literal["service", "workload"]
    namespace: str
    name: str
    endpoints: int = Field(description="Ready endpoints.")
    rps: float = Field(description="Requests per second to it, from load reports.")
    error_ratio: float
    in_flight: int


class MeshEdge(BaseModel):
    source: str
    target: str
    kind: Literal["traffic", "route"] = Field(
        description="traffic: what the source's sidecars reported sending to the target; "
                    "route: an HTTPRoute/GRPCRoute on the source sends to the target.")
    rps: float | None = None
    error_ratio: float | None = None
    in_flight: int | None = None
    route: str | None = None
    weight_percent: float | None = None


class MeshProxy(BaseModel):
    id: str
    identity: str | None
    status: Status
    types: dict[str, Status]
    errors: list[dict[str, Any]] = Field(description="NACKs: type, message, version, at.")
    connected_since: str | None


class MeshGraph(BaseModel):
    generated_at: str
    load_report_interval: float | None
    nodes: list[MeshNode]
    edges: list[MeshEdge]
    proxies: list[MeshProxy] = Field(description="The worst first, at most 200 (all of them: "
                                                 "/api/v1/proxies).")
    proxy_counts: dict[str, int] = Field(description="Proxies by overall status.")
    certificates: dict[str, Any] = Field(description="`issued`, and `expiring`: certificates "
                                                     "with under a quarter of their lifetime left.")
    source_errors: list[dict[str, Any]]
