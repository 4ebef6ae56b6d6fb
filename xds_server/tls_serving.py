"""The xDS TLS port's certificate, kept from the mesh CA (composition root, beside
security.py: the CA and the xDS server meet here).

The certificate is a serving certificate (ca/serving.py) for the names clients dial
(`--xds-tls-san`, `localhost`, the listen hosts). `ServingCertificateKeeper` issues it at
build time, hands it and the trust bundle to the server's `TlsCredentials` (xds/tls.py), and
then replaces it at half its lifetime, or at once when the CA's signing certificate changed
(files reloaded, a root rotation switched signing). When only the bundle changed (a rotation
publishing its new root), the client-certificate roots are updated without a new
certificate. New handshakes use the new pair; open streams keep theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from datetime import timedelta

from .ca.authority import CertificateAuthority, KeyAlgorithm, fingerprint
from .ca.serving import SERVING_TTL, issue_serving_certificate, on_ca_change
from .ca.svid import CertificateRegistry, IssuedCertificate
from .config import parse_address
from .xds.tls import TlsCredentials

log = logging.getLogger("xds_server.security")

__all__ = ["ServingCertificateKeeper", "serving_names"]

_UNSPECIFIED = {"", "0.0.0.0", "::", "*"}


def serving_names(sans: Iterable[str], addresses: Iterable[str | None]) -> tuple[str, ...]:
    """The names in the certificate: the configured SANs, `localhost`, and each listen host
    that a client could dial (not 0.0.0.0 or ::)."""
    names = [s.strip() for s in sans if s.strip()] + ["localhost"]
    for address in addresses:
        if address:
            host = parse_address(address)[0].strip("[]")
            if host not in _UNSPECIFIED:
                names.append(host)
    return tuple(dict.fromkeys(n.lower() for n in names))


class ServingCertificateKeeper:
    def __init__(self, authority: CertificateAuthority, names: tuple[str, ...], *,
                 registry: CertificateRegistry | None = None,
                 key_algorithm: KeyAlgorithm | str = KeyAlgorithm.EC_P256,
                 ttl: timedelta = SERVING_TTL, check_interval: float = 60.0) -> None:
        self.authority = authority
        self.names = names
        self.registry = registry
        self.key_algorithm = key_algorithm
        self.ttl = ttl
        # Checked often enough to renew at half-life even with short lifetimes (a 20 s
        # --workload-ttl in a lab), and the CA's changes wake it at once anyway.
        self.check_interval = min(check_interval, max(ttl.total_seconds() / 4, 0.5))
        self.renewals = 0
        self.certificate = self._issue()
        self._signer = fingerprint(authority.state.signing_cert)
        assert self.certificate.key_pem is not None
        self.credentials = TlsCredentials(self.certificate.chain_pem, self.certificate.key_pem,
                                          authority.trust_bundle_pem)
        self._wake: asyncio.Event | None = None

    def _issue(self) -> IssuedCertificate:
        return issue_serving_certificate(self.authority, self.names, ttl=self.ttl,
                                         key_algorithm=self.key_algorithm,
                                         registry=self.registry, owner="xds-tls")

    def ca_changed(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def check(self, *, force: bool = False) -> bool:
        """Renew if due (half-life, signer changed, or `force`) and follow the bundle.
        Returns whether the certificate was replaced."""
        authority = self.authority
        self.credentials.update(roots_pem=authority.trust_bundle_pem)
        issued = self.certificate
        signer = fingerprint(authority.state.signing_cert)
        half = issued.issued_at + issued.lifetime / 2
        if not force and signer == self._signer and authority.clock() < half:
            return False
        try:
            issued = await asyncio.to_thread(self._issue)
        except Exception as err:
            log.error("xDS TLS certificate renewal failed: %s", err)
            return False
        assert issued.key_pem is not None
        self.credentials.update(chain_pem=issued.chain_pem, key_pem=issued.key_pem,
                                roots_pem=authority.trust_bundle_pem)
        self.certificate, self._signer = issued, signer
        self.renewals += 1
        log.info("xDS TLS certificate renewed", extra={
            "serial": issued.serial_hex, "not_after": issued.not_after.isoformat()})
        return True

    async def run(self, stop: asyncio.Event) -> None:
        self._wake = asyncio.Event()
        on_ca_change(self.authority, self.ca_changed)
        while not stop.is_set():
            wake = asyncio.create_task(self._wake.wait())
            stopped = asyncio.create_task(stop.wait())
            await asyncio.wait({wake, stopped}, timeout=self.check_interval,
                               return_when=asyncio.FIRST_COMPLETED)
            for task in (wake, stopped):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if stop.is_set():
                return
            self._wake.clear()
            await self.check()
