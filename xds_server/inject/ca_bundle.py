"""Keeps the injector's MutatingWebhookConfiguration trusting the mesh roots: every webhook
in it gets `clientConfig.caBundle` = the CA's trust bundle (every root, PEM, base64), at start
and whenever the bundle changes (a root rotation adds the new root before anything is signed
with it, so the API server trusts the webhook's next certificate before it exists).

How: GET the configuration, and when a caBundle differs, a JSON merge patch carrying the
`webhooks` list with the new bundles and the `resourceVersion` read (a list is replaced whole
by a merge patch; the resourceVersion makes it fail with 409 rather than overwrite a change
made in between, and the next round reads again). RBAC: get and patch on that one object.
A missing configuration or an unreachable API server is logged and retried with backoff; a
periodic resync (every 5 minutes) repairs a caBundle someone else changed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import random
from collections.abc import Callable
from typing import Any

from ..sources.kube_api import KubeApi, ResourceKind, status_message

log = logging.getLogger("xds_server.webhook")

__all__ = ["MUTATING_WEBHOOK_CONFIGURATION", "CaBundleSync"]

MUTATING_WEBHOOK_CONFIGURATION = ResourceKind(
    "MutatingWebhookConfiguration", "admissionregistration.k8s.io", "v1",
    "mutatingwebhookconfigurations", namespaced=False)


class CaBundleSync:
    """Patches the caBundle of configuration `name` to `bundle()` (PEM bytes)."""

    def __init__(self, api: KubeApi, name: str, bundle: Callable[[], bytes], *,
                 resync: float = 300.0, backoff_initial: float = 1.0,
                 backoff_max: float = 30.0) -> None:
        self.api = api
        self.name = name
        self.bundle = bundle
        self.resync = resync
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.patches = 0  # successful writes
        self.last_error = ""
        self.synced_bundle = b""  # the bundle the configuration holds, as last seen
        self._wake = asyncio.Event()

    def bundle_changed(self) -> None:
        """Sync now (call in the loop; on_ca_change does)."""
        self._wake.set()

    def sync_once(self) -> bool:
        """One round (blocking). True when it patched. Raises what the API raised."""
        bundle = self.bundle()
        encoded = base64.b64encode(bundle).decode()
        current = self.api.get(MUTATING_WEBHOOK_CONFIGURATION, None, self.name)
        webhooks: list[dict[str, Any]] = list(current.get("webhooks") or [])
        if not webhooks:
            raise LookupError(f"MutatingWebhookConfiguration {self.name} has no webhooks")
        if all((w.get("clientConfig") or {}).get("caBundle") == encoded for w in webhooks):
            self.synced_bundle = bundle
            return False
        for webhook in webhooks:
            webhook.setdefault("clientConfig", {})["caBundle"] = encoded
        patch = {"metadata": {"resourceVersion": current["metadata"]["resourceVersion"]},
                 "webhooks": webhooks}
        self.api.merge_patch(MUTATING_WEBHOOK_CONFIGURATION, None, self.name, patch)
        self.patches += 1
        self.synced_bundle = bundle
        log.info("webhook caBundle updated", extra={
            "configuration": self.name, "webhooks": len(webhooks), "bundle_bytes": len(bundle)})
        return True

    async def run(self, stop: asyncio.Event) -> None:
        delay = self.backoff_initial
        while not stop.is_set():
            self._wake.clear()
            try:
                await asyncio.to_thread(self.sync_once)
                self.last_error, delay, wait = "", self.backoff_initial, self.resync
            except Exception as err:
                conflict = getattr(err, "status", None) == 409
                self.last_error = str(err) if isinstance(err, LookupError) else status_message(err)
                log.warning("cannot update the webhook caBundle (retrying): %s", self.last_error,
                            extra={"configuration": self.name})
                wait = 0.05 if conflict else delay * random.uniform(1.0, 1.5)
                delay = min(delay * 2, self.backoff_max)
            waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._wake.wait())]
            try:
                await asyncio.wait(waiters, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.gather(*waiters, return_exceptions=True)
