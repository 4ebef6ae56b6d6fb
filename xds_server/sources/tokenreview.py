"""Who holds a Kubernetes service-account token: the TokenReview API, cached briefly.

The CA authenticates a workload by the projected service-account token it presents, and asks
the API server (authentication.k8s.io/v1 TokenReview) whether the token is valid and for whom.

- Audience-bound: the review names the audiences we accept; a token minted for another
  audience is refused. As the API documents, a review that names audiences must get one of
  them back in `status.audiences`, or the answer is treated as a refusal (an API server that
  ignores audiences must not make every token valid for us).
- Fails closed: an API error, a timeout or an unreadable answer is a refusal
  (`unavailable=True`, so callers can answer UNAVAILABLE rather than UNAUTHENTICATED); it is
  never cached, so the next attempt asks again.
- Cached briefly, keyed by a SHA-256 of the token (tokens themselves are not kept): accepted
  tokens for `ttl` seconds, refused ones for `negative_ttl`. A revoked token may therefore be
  accepted for up to `ttl` more seconds; keep it short. Concurrent reviews of one token share
  one API call.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .kube_api import TOKEN_REVIEW, KubeApi, status_message

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"


@dataclass(frozen=True, slots=True)
class TokenReviewResult:
    authenticated: bool
    username: str = ""
    uid: str = ""
    groups: tuple[str, ...] = ()
    audiences: tuple[str, ...] = ()
    extra: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: MappingProxyType({}))
    error: str = ""
    unavailable: bool = False  # the API could not answer: refused, but not the token's fault

    @property
    def service_account(self) -> tuple[str, str] | None:
        """(namespace, name) for a service-account token, else None."""
        if not self.authenticated or not self.username.startswith(SERVICE_ACCOUNT_PREFIX):
            return None
        namespace, _, name = self.username[len(SERVICE_ACCOUNT_PREFIX):].partition(":")
        return (namespace, name) if namespace and name and ":" not in name else None

    @property
    def pod_name(self) -> str | None:
        """The pod a bound token was issued for, when the API server says so."""
        names = self.extra.get("authentication.kubernetes.io/pod-name")
        return names[0] if names else None


class TokenReviewer:
    """Reviews bearer tokens with the API server. `review` is a coroutine; the blocking call
    runs in a thread."""

    def __init__(
        self,
        api: KubeApi,
        *,
        audiences: Sequence[str] = (),
        ttl: float = 10.0,
        negative_ttl: float = 2.0,
        max_entries: int = 10_000,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._api = api
        self.audiences = tuple(audiences)
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.max_entries = max_entries
        self.timeout = timeout
        self._clock = clock
        self._cache: OrderedDict[str, tuple[float, TokenReviewResult]] = OrderedDict()
        self._pending: dict[str, asyncio.Future[TokenReviewResult]] = {}
        self.api_calls = 0  # reviews actually sent (not answered from the cache)

    async def review(self, token: str) -> TokenReviewResult:
        if not token:
            return TokenReviewResult(False, error="no token")
        key = hashlib.sha256(token.encode()).hexdigest()
        cached = self._cache.get(key)
        if cached is not None:
            expires, result = cached
            if self._clock() < expires:
                self._cache.move_to_end(key)
                return result
            del self._cache[key]
        task = self._pending.get(key)
        if task is None:  # one API call per token at a time, not tied to any one caller
            task = asyncio.ensure_future(self._fetch(key, token))
            self._pending[key] = task
        return await asyncio.shield(task)

    async def _fetch(self, key: str, token: str) -> TokenReviewResult:
        try:
            result = await asyncio.to_thread(self._review, token)
            if not result.unavailable:
                ttl = self.ttl if result.authenticated else self.negative_ttl
                if ttl > 0:
                    self._cache[key] = (self._clock() + ttl, result)
                    while len(self._cache) > self.max_entries:
                        self._cache.popitem(last=False)
            return result
        finally:
            del self._pending[key]

    def clear(self) -> None:
        self._cache.clear()

    def _review(self, token: str) -> TokenReviewResult:
        body: dict[str, Any] = {
            "apiVersion": TOKEN_REVIEW.api_version,
            "kind": TOKEN_REVIEW.kind,
            "spec": {"token": token, **({"audiences": list(self.audiences)} if self.audiences
                                       else {})},
        }
        self.api_calls += 1
        try:
            answer = self._api.request("POST", TOKEN_REVIEW.path(), body=body,
                                       timeout=(min(self.timeout, 5.0), self.timeout))
            return self._result(answer)
        except Exception as e:  # fail closed, whatever went wrong
            message = status_message(e)
            log.warning("token review failed; refusing the token (%s)", message)
            return TokenReviewResult(False, error=f"token review unavailable: {message}",
                                     unavailable=True)

    def _result(self, answer: Any) -> TokenReviewResult:
        status = answer.get("status") if isinstance(answer, dict) else None
        if not isinstance(status, dict):
            raise ValueError("a TokenReview answer without status")
        if status.get("authenticated") is not True:
            return TokenReviewResult(False, error=str(status.get("error") or "not authenticated"))
        audiences = tuple(str(a) for a in status.get("audiences") or ())
        if self.audiences and not set(audiences) & set(self.audiences):
            return TokenReviewResult(
                False, error=f"token not valid for audiences {', '.join(self.audiences)}"
            )
        user = status.get("user") or {}
        extra = {
            str(k): tuple(str(v) for v in (values or ()))
            for k, values in (user.get("extra") or {}).items()
        }
        return TokenReviewResult(
            True,
            username=str(user.get("username") or ""),
            uid=str(user.get("uid") or ""),
            groups=tuple(str(g) for g in user.get("groups") or ()),
            audiences=audiences,
            extra=MappingProxyType(extra),
        )
