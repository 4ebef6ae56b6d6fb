"""Identity, CA and SDS wired into a server process (`xds-server serve --auth ...`).

One `Security` holds the pieces the other modules define and connects them to an
`XdsServer`:

    CertificateAuthority (ca/authority.py)   the root or plugged-in intermediate, in --ca-dir
    SvidIssuer + CertificateRegistry          X.509-SVIDs, --workload-ttl
    TokenIssuer (ca/tokens.py)                workload tokens (`xds-server token create`)
    TokenReviewer (sources/tokenreview.py)    Kubernetes tokens, when the mesh is a cluster
    Authenticator + StreamGuard (xds/auth.py) checked on every stream before anything is sent
    WorkloadCertificates (ca/workloads.py)    issuance, renewal, root rotation steps
    SdsSecrets (sds.py)                       `default` and `ROOTCA` over ADS and SDS
    RootRotation (ca/rotation.py)             started by `start_root_rotation()` (admin) or
                                              `xds-server ca rotate-root` (CA files)
    CertificateService (ca/service.py)        CSR signing on the xDS port, same authenticator
    ServingCertificateKeeper (tls_serving.py) the xDS TLS ports' certificate and client roots

The guard and SDS follow the server's streams as `StreamHooks`; the CA reaches the xDS side
only through them (and `TokenVerifier`, which `TokenIssuer` implements). With `--auth none`
only the guard's bounds run: no CA is loaded, nothing is issued.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .ca.authority import CLOCK_SKEW, CAError, CertificateAuthority, KeyAlgorithm
from .model.identity import DEFAULT_TRUST_DOMAIN, Identity, validate_trust_domain
from .ca.rotation import RootRotation
from .ca.serving import SERVING_TTL
from .ca.service import CertificateService
from .ca.svid import DEFAULT_TTL, MAX_TTL, SvidIssuer
from .ca.tokens import TokenIssuer
from .ca.workloads import WorkloadCertificates
from .config import ConfigError
from .sds import SdsSecrets
from .tls_serving import ServingCertificateKeeper, serving_names
from .xds.auth import Authenticator, AuthMode, GuardSettings, StreamGuard
from .xds.cache import ResourceCache
from .xds.tls import peer_certificate
from .xds.server import XdsServer
from .shared.store import SharedConfig

if TYPE_CHECKING:
    from .shared.store import SharedStore
    from .shared_ca import SharedCA
    from .shared_tokens import SharedRevocations

log = logging.getLogger("xds_server.security")

# The audience Kubernetes tokens must be minted for (a projected service-account token
# volume with `audience: xds-server`): a token for another service is no proof for us.
DEFAULT_TOKEN_AUDIENCE = "xds-server"


@dataclass
class SecurityConfig:
    auth: AuthMode = AuthMode.NONE
    ca_dir: Path = Path("certs")
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    workload_ttl: timedelta = DEFAULT_TTL
    token_audiences: tuple[str, ...] = (DEFAULT_TOKEN_AUDIENCE,)
    key_algorithm: KeyAlgorithm | str = KeyAlgorithm.EC_P256
    limits: GuardSettings = field(default_factory=GuardSettings)
    # How long past its NotAfter a leaf may still be trusted by a peer with a slow clock:
    # the old root stays in the bundle that much longer during a root rotation.
    clock_skew: timedelta = CLOCK_SKEW
    renewal_jitter: float = 0.10
    # A root rotation does not switch signing during this long after start-up: proxies
    # connected before a restart must reconnect (and ACK the new bundle) first.
    rotation_startup_grace: timedelta = timedelta(seconds=30)
    watch_ca_files: bool = True
    # Names in the xDS TLS certificate besides `localhost` and the listen hosts
    # (`--xds-tls-san`: the Service DNS names clients dial).
    tls_sans: tuple[str, ...] = ()
    # Replicas acting as one (--redis-url, --state-key-file): one CA and token key for all,
    # revocations on every replica. None: everything in this process and --ca-dir.
    shared: SharedConfig | None = None
    # In a cluster (--kubeconfig/--in-cluster): the Secret holding the one CA and token key of
    # every replica (created by the Lease holder), and an operator's plugged-in CA Secret.
    # None: each replica keeps its CA in --ca-dir (with --redis-url: in Redis).
    ca_secret: str | None = "xds-server-ca"
    ca_plugin_secret: str | None = "cacerts"


def _certificate_identity(authenticator: Authenticator) -> Any:
    """For the CSR service: the identity of a call's verified client certificate, or None."""

    def identity(auth: Any, peer: str) -> Identity | None:
        cert = peer_certificate(auth, peer)
        return None if cert is None else authenticator.prove_certificate(cert).identity

    return identity


class Security:
    """The CA, authentication and SDS of one server process (see the module doc)."""

    def __init__(
        self,
        config: SecurityConfig,
        guard: StreamGuard,
        *,
        authority: CertificateAuthority | None = None,
        issuer: SvidIssuer | None = None,
        tokens: TokenIssuer | None = None,
        reviewer: Any = None,
        certificates: WorkloadCertificates | None = None,
        sds: SdsSecrets | None = None,
        rotation: RootRotation | None = None,
        csr_service: CertificateService | None = None,
        kube_api: Any = None,
    ) -> None:
        self.config = config
        self.guard = guard
        self.authority = authority
        self.issuer = issuer
        self.tokens = tokens
        self.reviewer = reviewer
        self.certificates = certificates
        self.sds = sds
        self.rotation = rotation
        self.csr_service = csr_service
        self._kube_api = kube_api
        self._server: XdsServer | None = None
        self.tls: ServingCertificateKeeper | None = None  # when the server serves TLS
        self.store: SharedStore | None = None  # shared state (set by `create`)
        self.shared_ca: SharedCA | None = None
        self.revocations: SharedRevocations | None = None
        self.secret_ca: Any = None  # kube_ca.SecretCA, in a cluster
        self.proxy_status: Any = None  # shared_status.SharedProxyStatus, with shared state

    @property
    def registry(self) -> Any:
        return self.issuer.registry if self.issuer is not None else None

    @property
    def authenticator(self) -> Authenticator | None:
        return self.guard.authenticator

    @staticmethod
    def load_ca(config: SecurityConfig) -> tuple[CertificateAuthority, TokenIssuer] | None:
        """Load (or create: key generation, slow for RSA) the CA and the token key; None for
        `--auth none`. Blocking: `create()` runs it in a worker thread. Raises ConfigError."""
        if AuthMode(config.auth) is AuthMode.NONE:
            return None
        try:
            validate_trust_domain(config.trust_domain)
        except ValueError as err:
            raise ConfigError(f"--trust-domain: {err}") from None
        if config.workload_ttl <= timedelta(0) or config.workload_ttl > MAX_TTL:
            raise ConfigError(f"--workload-ttl must be positive and at most {MAX_TTL}")
        try:
            authority = CertificateAuthority(config.ca_dir, trust_domain=config.trust_domain,
                                             key_algorithm=config.key_algorithm)
            tokens = TokenIssuer(config.ca_dir)
        except (CAError, ValueError, OSError) as err:
            raise ConfigError(f"--ca-dir {config.ca_dir}: {err}") from None
        return authority, tokens

    @classmethod
    async def create(
        cls,
        config: SecurityConfig,
        cache: ResourceCache,
        listen_address: str,
        *,
        kubernetes: Any = None,
        reviewer: Any = None,
        is_leader: Any = None,
    ) -> Security:
        """`build`, with the CA loaded (or generated) in a worker thread, off the loop.
        With shared state (a CA Secret in a cluster, else Redis), the CA is first obtained
        from it (waiting while it cannot be). `is_leader`: whether this replica holds the
        Lease (it creates a missing CA Secret)."""
        store = shared_ca = None
        secret_ca = None
        active = AuthMode(config.auth) is not AuthMode.NONE
        if active and kubernetes is not None and config.ca_secret:
            secret_ca = cls._secret_ca(config, kubernetes, is_leader)
            try:
                await secret_ca.obtain()
            except BaseException:
                secret_ca.api.close()
                raise
        if config.shared is not None and active:
            store, shared_ca = cls._shared(config)
            try:
                if secret_ca is None:
                    await shared_ca.obtain()
            except BaseException:
                await store.client.aclose()
                raise
        loaded = await asyncio.to_thread(cls.load_ca, config)
        security = cls.build(config, cache, listen_address, kubernetes=kubernetes,
                             reviewer=reviewer, loaded=loaded)
        if store is not None and shared_ca is not None:
            # With a CA Secret, Redis carries revocations only: the Secret is the CA's home.
            security._share(store, shared_ca if secret_ca is None else None)
        if secret_ca is not None:
            assert security.authority is not None
            secret_ca.attach(security.authority)
            security.secret_ca = secret_ca
        return security

    @staticmethod
    def _secret_ca(config: SecurityConfig, kubernetes: Any, is_leader: Any) -> Any:
        from .kube_ca import SecretCA
        from .sources.kube_api import KubeApi, in_cluster_namespace, make_api_client

        assert config.ca_secret
        api = KubeApi(make_api_client(kubernetes.kubeconfig, in_cluster=kubernetes.in_cluster or None))
        namespace = kubernetes.lease_namespace or in_cluster_namespace()
        return SecretCA(api, namespace, config.ca_secret, config.ca_dir,
                        is_leader=is_leader or (lambda: True),
                        plugin_secret=config.ca_plugin_secret, trust_domain=config.trust_domain,
                        key_algorithm=config.key_algorithm)

    @staticmethod
    def _shared(config: SecurityConfig) -> tuple[SharedStore, SharedCA]:
        from .shared.statekey import load_state_key
        from .shared.store import SharedStore
        from .shared_ca import SharedCA

        assert config.shared is not None
        key = load_state_key(config.shared.state_key_file)  # ConfigError naming the file
        store = SharedStore(config.shared.redis, key, replica=config.shared.replica)
        return store, SharedCA(store, config.ca_dir, trust_domain=config.trust_domain,
                               key_algorithm=config.key_algorithm)

    def _share(self, store: SharedStore, shared_ca: SharedCA | None) -> None:
        from .shared_tokens import SharedRevocations

        self.store, self.shared_ca = store, shared_ca
        assert self.authority is not None and self.tokens is not None
        if shared_ca is not None:
            shared_ca.attach(self.authority)
        self.revocations = SharedRevocations(store, self.tokens, self.close_token_streams)

    def close_token_streams(self, token_ids: Any) -> int:
        """Close, now, the open streams proven with one of these workload tokens."""
        server = self._server
        if server is None:
            return 0
        ids = set(token_ids)
        closed = 0
        for conn in list(server.connections):
            proof = conn.proof
            if proof is not None and proof.token_id in ids:
                why = f"token {proof.token_id} was revoked"
                self.guard.stats.revoked_streams += 1
                log.warning("closing a stream: %s", why,
                            extra={"proxy": conn.proxy_id, "identity": str(proof.identity)})
                server.close_connection(conn, grpc.StatusCode.UNAUTHENTICATED, why)
                closed += 1
        return closed

    async def revoke_token(self, token_id: str) -> bool:
        """Revoke a workload token on every replica (this one's streams closed at once).
        False when it was already revoked. Raises ValueError for a malformed id."""
        if self.tokens is None:
            raise ConfigError("workload tokens need the CA: run with --auth tokens")
        if self.revocations is not None:
            return await self.revocations.revoke(token_id)
        fresh = await asyncio.to_thread(self.tokens.revoke, token_id)
        self.close_token_streams([token_id])
        return fresh

    @classmethod
    def build(
        cls,
        config: SecurityConfig,
        cache: ResourceCache,
        listen_address: str,
        *,
        kubernetes: Any = None,
        reviewer: Any = None,
        loaded: tuple[CertificateAuthority, TokenIssuer] | None = None,
    ) -> Security:
        """Load (or create) the CA and build every piece for `config.auth`. `kubernetes` is
        the app's KubernetesConfig: when given, Kubernetes tokens are checked with
        TokenReview against that cluster (or pass a ready `reviewer`). `loaded`: the CA and
        token key `load_ca` already loaded. Raises ConfigError."""
        mode = AuthMode(config.auth)
        if mode is AuthMode.NONE:
            log.warning("--auth none: streams are not authenticated and no workload "
                        "certificate is issued (SDS secrets are not served)")
            return cls(config, StreamGuard(None, config.limits))
        loaded = loaded or cls.load_ca(config)
        assert loaded is not None
        authority, tokens = loaded
        issuer = SvidIssuer(authority, trust_domain=config.trust_domain,
                            default_ttl=config.workload_ttl, key_algorithm=config.key_algorithm)
        rotation = RootRotation(authority, issuer.registry, max_ttl=issuer.max_ttl,
                                clock_skew=config.clock_skew)
        kube_api = None
        if reviewer is None and kubernetes is not None:
            from .sources.kube_api import KubeApi, make_api_client
            from .sources.tokenreview import TokenReviewer

            kube_api = KubeApi(make_api_client(kubernetes.kubeconfig,  # raises ConfigError
                                               in_cluster=kubernetes.in_cluster or None))
            reviewer = TokenReviewer(kube_api, audiences=config.token_audiences)
        authenticator = Authenticator(mode, tokens=tokens, reviewer=reviewer,
                                      listen_address=listen_address,
                                      trust_domain=config.trust_domain,
                                      certificate_backdate=CLOCK_SKEW)
        certificates = WorkloadCertificates(
            issuer, rotation=rotation, jitter=config.renewal_jitter,
            startup_grace=config.rotation_startup_grace.total_seconds(),
        )
        sds = SdsSecrets(cache, certificates)
        guard = StreamGuard(authenticator, config.limits)
        csr = CertificateService(issuer, authenticator.verify_token,
                                 certificate_identity=_certificate_identity(authenticator))
        log.info("authentication and SDS enabled", extra={
            "auth": mode.value, "trust_domain": config.trust_domain,
            "workload_ttl_seconds": int(config.workload_ttl.total_seconds()),
            "token_review": reviewer is not None,
            "token_audiences": ",".join(config.token_audiences) if reviewer is not None else "",
        })
        return cls(config, guard, authority=authority, issuer=issuer, tokens=tokens,
                   reviewer=reviewer, certificates=certificates, sds=sds, rotation=rotation,
                   csr_service=csr, kube_api=kube_api)

    def attach(self, server: XdsServer) -> None:
        """Guard `server`'s streams, serve SDS on them and the CSR service on its port
        (before start)."""
        self._server = server
        server.hooks.add(self.guard)  # first: nothing else sees a stream before it is proven
        if self.sds is not None:
            server.hooks.add(self.sds)
        if self.csr_service is not None:
            server.extra_handlers.append(self.csr_service.handler())
        settings = server.settings
        if self.authority is not None and (settings.tls_address or settings.tls_token_address):
            names = serving_names(self.config.tls_sans,
                                  (settings.tls_address, settings.tls_token_address))
            # No longer-lived than workload certificates: a root rotation keeps the old root
            # until the last certificate it signed has expired, this one included.
            self.tls = ServingCertificateKeeper(
                self.authority, names, registry=self.registry,
                key_algorithm=self.config.key_algorithm,
                ttl=min(SERVING_TTL, self.config.workload_ttl))
            server.tls = self.tls.credentials

    async def run(self, stop: asyncio.Event) -> None:
        """Renewal, root rotation, CA file changes and token revocations, until `stop`."""
        jobs = []
        if self.certificates is not None:
            jobs.append(asyncio.create_task(
                self.certificates.run(stop, watch_files=self.config.watch_ca_files), name="sds"))
        if self.tls is not None:
            jobs.append(asyncio.create_task(self.tls.run(stop), name="xds-tls-certificate"))
        if self.secret_ca is not None:
            jobs.append(asyncio.create_task(self.secret_ca.run(stop), name="ca-secret"))
        if self.store is not None:
            jobs.append(asyncio.create_task(self.store.run(stop), name="shared-state"))
        if self.store is not None and self._server is not None:
            from .admin.views import proxies
            from .shared_status import SharedProxyStatus

            server, trust_domain = self._server, self.config.trust_domain
            self.proxy_status = SharedProxyStatus(
                self.store, lambda: proxies(server.connections, trust_domain))
            jobs.append(asyncio.create_task(self.proxy_status.run(stop), name="shared-status"))
        if self.shared_ca is not None:
            jobs.append(asyncio.create_task(self.shared_ca.run(stop), name="shared-ca"))
        if self.revocations is not None:
            jobs.append(asyncio.create_task(self.revocations.run(stop), name="shared-revocations"))
        if self._server is not None:
            server = self._server
            jobs.append(asyncio.create_task(self.guard.watch_revocations(
                lambda: server.connections, server.close_connection, stop), name="revocations"))
        try:
            if jobs:
                await asyncio.gather(*jobs)
            else:
                await stop.wait()
        finally:
            for job in jobs:
                job.cancel()
            with contextlib.suppress(Exception):
                await asyncio.gather(*jobs, return_exceptions=True)
            if self._kube_api is not None:
                self._kube_api.close()
            if self.secret_ca is not None:
                self.secret_ca.api.close()

    # For the admin API -----------------------------------------------------------------------

    async def start_root_rotation(self) -> dict[str, Any]:
        """Begin a root rotation, the new root generated in a worker thread (raises
        rotation.RotationError when one is under way or the CA is an operator's). Returns
        its status."""
        if self.certificates is None or self.sds is None:
            raise ConfigError("root rotation needs the CA: run with --auth tokens")
        await self.certificates.start_root_rotation()
        return self.sds.rotation_status()

    def shared_status(self) -> dict[str, Any] | None:
        """Redis (up or degraded), the shared CA and what waits to be re-published."""
        if self.store is None:
            return None
        data: dict[str, Any] = {**self.store.status(), "replica": self.store.replica,
                                "degraded": not self.store.up}
        if self.shared_ca is not None:
            data["ca"] = {"generation": self.shared_ca.generation,
                          "created_here": self.shared_ca.created,
                          "publish_pending": self.shared_ca.publish_pending}
        if self.revocations is not None:
            data["revocations_pending"] = len(self.revocations.pending)
        return data

    def rotation_status(self) -> dict[str, Any] | None:
        """The rotation phase with bundle delivery (who still lacks the new bundle)."""
        return self.sds.rotation_status() if self.sds is not None else None

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = {"auth": self.guard.mode.value, "guard": self.guard.stats.to_dict()}
        if self.tls is not None:
            cert = self.tls.certificate
            data["xds_tls"] = {"names": list(self.tls.names), "serial": cert.serial_hex,
                               "not_after": cert.not_after.isoformat(),
                               "renewals": self.tls.renewals}
        if self.store is not None:
            data["shared_state"] = self.shared_status()
        if self.secret_ca is not None:
            data["ca_secret"] = self.secret_ca.status()
        if self.sds is not None:
            data["sds"] = self.sds.status()
            data["identities"] = self.sds.identities()
            data["root_rotation"] = self.sds.rotation_status()
        return data
