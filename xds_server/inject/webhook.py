"""The mutating admission webhook, served over HTTPS by the server process (`serve
--webhook-address`), in its own event loop like the admin API.

`POST /inject` takes the AdmissionReview the API server sends and answers with review.py's.
Bodies over 1 MiB (counted as they arrive, whatever the transfer encoding), bodies that are not
an AdmissionReview for a Pod, get 400 and a JSON `{"error": ...}` naming the problem; nothing
else is ever in an error body. Every answer is counted by result (`stats`, exported as
`xds_server_webhook_requests_total{result}`).

TLS: a serving certificate from the mesh CA for `<service>.<namespace>.svc` (ca/serving.py),
its key only in memory. It is replaced at half its lifetime, and at once when the CA's signing
certificate changes (a root rotation, new CA files): the API server trusts the roots the
MutatingWebhookConfiguration's caBundle holds (ca_bundle.py keeps it on the mesh bundle, which
gains a new root before anything is signed with it).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import socket
import ssl
from datetime import timedelta
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ..ca.authority import CertificateAuthority, KeyAlgorithm, fingerprint
from ..ca.serving import SERVING_TTL, issue_serving_certificate, load_chain, on_ca_change
from ..ca.svid import CertificateRegistry, IssuedCertificate
from ..config import parse_address
from ..http_task import HttpTask
from .review import MAX_BODY_BYTES, BadReview, admission_response
from .settings import WebhookSettings

log = logging.getLogger("xds_server.webhook")

__all__ = ["INJECT_PATH", "WebhookServer", "bind_webhook", "on_ca_change"]

INJECT_PATH = "/inject"
RESULTS = ("injected", "skipped", "denied", "allowed", "bad-request")


def bind_webhook(address: str) -> socket.socket:
    """The webhook's listening socket. Raises OSError naming the flag."""
    host, port = parse_address(address, "--webhook-address")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise OSError(f"cannot listen on {address} (--webhook-address): {err.strerror or err}") from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


class WebhookServer:
    """HTTPS, one route. `start()` issues the certificate and listens; `close()` stops."""

    def __init__(self, settings: WebhookSettings, authority: CertificateAuthority, *,
                 registry: CertificateRegistry | None = None,
                 key_algorithm: KeyAlgorithm | str = KeyAlgorithm.EC_P256,
                 ttl: timedelta = SERVING_TTL, check_interval: float = 60.0) -> None:
        self.settings = settings
        self.authority = authority
        self.registry = registry
        self.key_algorithm = key_algorithm
        self.ttl = ttl
        self.check_interval = check_interval
        self.stats: collections.Counter[str] = collections.Counter()
        self.certificate: IssuedCertificate | None = None
        self.host = ""
        self.port = 0
        self._context: ssl.SSLContext | None = None
        self._signer = ""
        self._http: HttpTask | None = None
        self._renewal: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self.ca_bundle: Any = None  # the ca_bundle.CaBundleSync, when a cluster is followed
        self.app = Starlette(routes=[
            Route(INJECT_PATH, self._inject, methods=["POST"]),
            Route("/healthz", self._healthz, methods=["GET"]),
        ])

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    # HTTP -------------------------------------------------------------------------------------

    async def _healthz(self, _request: Request) -> Response:
        return PlainTextResponse("ok\n")

    def _bad(self, message: str) -> Response:
        self.stats["bad-request"] += 1
        log.warning("admission request refused", extra={"reason": message})
        return JSONResponse({"error": message}, status_code=400)

    async def _inject(self, request: Request) -> Response:
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > MAX_BODY_BYTES:
            return self._bad(f"the body is larger than {MAX_BODY_BYTES} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                return self._bad(f"the body is larger than {MAX_BODY_BYTES} bytes")
        try:
            # The agent trusts the current mesh roots at first contact (a root rotation
            # publishes the new root here before the server's certificate uses it).
            injector = dataclasses.replace(
                self.settings.injector, ca_bundle_pem=self.authority.trust_bundle_pem.decode())
            review = admission_response(bytes(body), injector)
        except BadReview as err:
            return self._bad(str(err))
        except Exception:  # a bug of ours: the API server applies failurePolicy
            log.exception("admission request failed")
            return JSONResponse({"error": "internal error"}, status_code=500)
        self.stats[review.result] += 1
        response = review.response["response"]
        log.info("admission request answered", extra={
            "uid": response["uid"], "result": review.result, "reason": review.reason})
        return JSONResponse(review.response)

    # Certificate ------------------------------------------------------------------------------

    def _issue(self) -> IssuedCertificate:
        return issue_serving_certificate(
            self.authority, self.settings.dns_names, ttl=self.ttl,
            key_algorithm=self.key_algorithm, registry=self.registry, owner="webhook")

    def _signer_now(self) -> str:
        return fingerprint(self.authority.state.signing_cert)

    async def _renew(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.check_interval)
            self._wake.clear()
            issued = self.certificate
            assert issued is not None and self._context is not None
            half = issued.issued_at + issued.lifetime / 2
            signer = self._signer_now()
            if signer == self._signer and self.authority.clock() < half:
                continue
            try:
                issued = await asyncio.to_thread(self._issue)
            except Exception as err:
                log.error("webhook certificate renewal failed: %s", err)
                continue
            load_chain(self._context, issued.chain_pem, issued.key_pem or b"")
            self.certificate, self._signer = issued, signer
            log.info("webhook certificate renewed", extra={
                "serial": issued.serial_hex, "not_after": issued.not_after.isoformat()})

    def ca_changed(self) -> None:
        """The CA changed: check the certificate now (call in the loop)."""
        self._wake.set()

    # Life -------------------------------------------------------------------------------------

    async def start(self, sock: socket.socket | None = None) -> None:
        for name in ("uvicorn", "uvicorn.error"):
            if logging.getLogger(name).level == logging.NOTSET:
                logging.getLogger(name).setLevel(logging.WARNING)
        self.certificate = await asyncio.to_thread(self._issue)
        self._signer = self._signer_now()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        load_chain(context, self.certificate.chain_pem, self.certificate.key_pem or b"")
        self._context = context
        sock = sock or bind_webhook(self.settings.address)
        self.host, self.port = sock.getsockname()[:2]
        self._http = HttpTask(self.app, f"webhook server on {self.settings.address}")
        await self._http.start(sock, context)
        self._renewal = asyncio.create_task(self._renew(), name="webhook-cert-renewal")
        log.info("admission webhook listening", extra={
            "address": self.address, "path": INJECT_PATH,
            "dns_names": ",".join(self.settings.dns_names)})

    async def close(self) -> None:
        if self._renewal is not None:
            self._renewal.cancel()
            await asyncio.gather(self._renewal, return_exceptions=True)
        if self._http is not None:
            await self._http.close()


async def start_webhook(settings: WebhookSettings, authority: CertificateAuthority,
                        **options: Any) -> WebhookServer:
    """A started WebhookServer that follows the CA's changes."""
    server = WebhookServer(settings, authority, **options)
    await server.start()
    on_ca_change(authority, server.ca_changed)
    return server
