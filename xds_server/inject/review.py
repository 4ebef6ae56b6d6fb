"""The admission webhook's one job, without the HTTP: an `admission.k8s.io/v1` AdmissionReview
(the bytes the API server POSTs) in, the AdmissionReview to answer out. Pure.

- A review that is not one (not JSON, another apiVersion or kind, no `request.uid`, a
  `request.kind` other than core/v1 Pod, no `request.object`) raises `BadReview`: the server
  answers 400 with the message, and the API server applies the webhook's failurePolicy.
- A Pod CREATE is injected (template.py) and answered `allowed: true` with a base64 RFC 6902
  JSON Patch (`patchType: JSONPatch`); a pod that is skipped (opted out, host network, already
  injected) is answered `allowed: true` with no patch; other operations too.
- A pod injection refuses (a bad capture annotation) is denied with the field and the reason,
  which `kubectl` shows to whoever created it: better than a pod whose init container fails.

The patch (`json_patch`) is computed member by member: added and removed object members are
`add`/`remove` operations and lists are replaced whole. Every operation is plain RFC 6902 and
the patch is what the API server applies to the very object it sent, so there is nothing to
gain from index-level list diffs (the `jsonpatch` library's `make_patch`), only moves to get
wrong; tests apply the patches with that library, an independent implementation.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

from .settings import InjectorSettings
from .template import InjectionError, inject_pod

__all__ = ["API_VERSION", "BadReview", "Review", "admission_response", "json_patch"]

API_VERSION = "admission.k8s.io/v1"
MAX_BODY_BYTES = 1024 * 1024


class BadReview(ValueError):
    """Not an AdmissionReview this webhook can answer (the message says why)."""


@dataclass
class Review:
    """The answer and what happened: `result` is injected, skipped, denied or allowed (an
    operation other than CREATE)."""

    response: dict[str, Any]
    result: str
    reason: str = ""
    patch: list[dict[str, Any]] = field(default_factory=list)


def _pointer(path: list[str]) -> str:
    return "".join("/" + part.replace("~", "~0").replace("/", "~1") for part in path)


def json_patch(before: Any, after: Any, path: list[str] | None = None) -> list[dict[str, Any]]:
    """RFC 6902 operations turning `before` into `after` (objects member by member)."""
    path = path or []
    if isinstance(before, dict) and isinstance(after, dict):
        ops: list[dict[str, Any]] = []
        for key in before:
            if key not in after:
                ops.append({"op": "remove", "path": _pointer([*path, key])})
        for key, value in after.items():
            if key not in before:
                ops.append({"op": "add", "path": _pointer([*path, key]), "value": value})
            elif before[key] != value or type(before[key]) is not type(value):
                ops += json_patch(before[key], value, [*path, key])
        return ops
    if before == after and type(before) is type(after):
        return []
    if not path:
        return [{"op": "replace", "path": "", "value": after}]
    return [{"op": "replace", "path": _pointer(path), "value": after}]


def _parse(body: bytes) -> dict[str, Any]:
    if len(body) > MAX_BODY_BYTES:
        raise BadReview(f"the body is larger than {MAX_BODY_BYTES} bytes")
    try:
        review = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise BadReview(f"the body is not JSON: {err}") from None
    if not isinstance(review, dict):
        raise BadReview("the body is not a JSON object (an AdmissionReview)")
    if review.get("apiVersion") != API_VERSION or review.get("kind") != "AdmissionReview":
        raise BadReview(f"expected apiVersion {API_VERSION} and kind AdmissionReview, got "
                        f"{review.get('apiVersion')!r} and {review.get('kind')!r}")
    request = review.get("request")
    if not isinstance(request, dict):
        raise BadReview("request: missing (an AdmissionReview request)")
    if not isinstance(request.get("uid"), str) or not request["uid"]:
        raise BadReview("request.uid: missing")
    return request


def _answer(uid: str, **response: Any) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": "AdmissionReview",
            "response": {"uid": uid, **response}}


def admission_response(body: bytes, settings: InjectorSettings) -> Review:
    """The AdmissionReview answering `body`. Raises BadReview."""
    request = _parse(body)
    uid = request["uid"]
    kind = request.get("kind")
    if not isinstance(kind, dict) or (kind.get("group"), kind.get("version"), kind.get("kind")) \
            != ("", "v1", "Pod"):
        raise BadReview(f"request.kind: this webhook injects Pods (core/v1), not {kind!r}; "
                        "check the MutatingWebhookConfiguration's rules")
    if request.get("operation") != "CREATE":
        return Review(_answer(uid, allowed=True), "allowed",
                      f"operation {request.get('operation')!r}")
    pod = request.get("object")
    if not isinstance(pod, dict):
        raise BadReview("request.object: missing (the Pod)")
    try:
        injected, outcome = inject_pod(pod, settings, reinject=False)
    except InjectionError as err:
        name = _pod_name(request, pod)
        message = f"sidecar injection of pod {name}: {err}"
        return Review(_answer(uid, allowed=False,
                              status={"code": 400, "reason": "BadRequest", "message": message}),
                      "denied", str(err))
    if not outcome.injected:
        return Review(_answer(uid, allowed=True), "skipped", outcome.reason)
    patch = json_patch(pod, injected)
    encoded = base64.b64encode(json.dumps(patch, separators=(",", ":")).encode()).decode()
    return Review(_answer(uid, allowed=True, patchType="JSONPatch", patch=encoded), "injected",
                  patch=patch)


def _pod_name(request: dict[str, Any], pod: dict[str, Any]) -> str:
    """namespace/name; at admission a pod of a ReplicaSet has only a generateName."""
    metadata = pod.get("metadata")
    if not isinstance(metadata, dict):
        metadata = {}
    name = request.get("name") or metadata.get("name") or f"{metadata.get('generateName') or ''}*"
    namespace = request.get("namespace") or metadata.get("namespace") or ""
    return f"{namespace}/{name}" if namespace else str(name)
