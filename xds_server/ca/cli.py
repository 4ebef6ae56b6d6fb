"""CLI commands of the CA: `xds-server token create|revoke`, `xds-server agent` and
`xds-server ca rotate-root|status`, registered on the main group in xds_server/cli.py.
(`serve`'s CA options are leaves of the settings tree, xds_server/settings/.)"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from datetime import timedelta
from pathlib import Path

import click

from ..config import ConfigError, is_loopback, parse_address, parse_duration


class Duration(click.ParamType):
    """A lifetime in the settings form of the one duration grammar (config.py): 24h, 7d."""

    name = "duration"

    def convert(self, value: object, param: click.Parameter | None,
                ctx: click.Context | None) -> timedelta:
        if isinstance(value, timedelta):
            return value
        try:
            return timedelta(seconds=parse_duration(value, settings_form=True))
        except ConfigError as err:
            self.fail(str(err), param, ctx)


DURATION = Duration()

_ca_dir = click.option(
    "--ca-dir", envvar="XDS_SERVER_CA_DIR", default="certs", show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory of the CA files (the token signing key and revocation list live there).",
)


_redis_url = click.option(
    "--redis-url", envvar="XDS_SERVER_REDIS_URL",
    help="Act on the shared state of replicas using this Redis (with --state-key-file): the "
         "token is signed with the shared key, a revocation reaches every replica.")
_state_key_file = click.option(
    "--state-key-file", envvar="XDS_SERVER_STATE_KEY_FILE",
    type=click.Path(dir_okay=False, path_type=Path), help="The replicas' state key.")
_redis_password_file = click.option(
    "--redis-password-file", envvar="XDS_SERVER_REDIS_PASSWORD_FILE",
    type=click.Path(dir_okay=False, path_type=Path), help="File holding the Redis password.")
_redis_key_prefix = click.option(
    "--redis-key-prefix", envvar="XDS_SERVER_REDIS_KEY_PREFIX", default="xds-server:",
    show_default=True, help="Prefix of the replicas' keys.")
_redis_ca_file = click.option(
    "--redis-ca-file", envvar="XDS_SERVER_REDIS_CA_FILE",
    type=click.Path(dir_okay=False, path_type=Path), help="Roots verifying a rediss:// server.")


def _shared_options(command):
    for option in (_redis_ca_file, _redis_key_prefix, _redis_password_file, _state_key_file, _redis_url):
        command = option(command)
    return command


def _run_shared(action, redis_url: str, state_key_file: Path | None, password_file: Path | None,
                key_prefix: str, ca_file: Path | None):
    """Run `action(store)` against the shared state; errors as click exceptions."""
    from ..shared.sealed import SealError
    from ..shared.statekey import load_state_key
    from ..shared.store import RedisSettings, SharedStateUnavailable, SharedStore

    if state_key_file is None:
        raise click.UsageError("--redis-url needs --state-key-file")

    async def run():
        settings = RedisSettings(url=redis_url, password_file=password_file, ca_file=ca_file,
                                 key_prefix=key_prefix)
        store = SharedStore(settings, load_state_key(state_key_file), replica="cli")
        try:
            return await action(store)
        finally:
            await store.client.aclose()

    try:
        return asyncio.run(run())
    except (ConfigError, SealError, SharedStateUnavailable, ValueError) as err:
        raise click.ClickException(str(err)) from None


@click.group("token")
def token() -> None:
    """Workload tokens issued by this server (for workloads outside Kubernetes)."""


@token.command("create")
@click.option("--namespace", "-n", required=True, help="Namespace of the workload.")
@click.option("--service-account", "--sa", required=True, help="Service account of the workload.")
@click.option("--ttl", type=DURATION, default="24h", show_default=True,
              help="Lifetime, e.g. 1h, 24h, 30d.")
@_ca_dir
@_shared_options
def token_create(namespace: str, service_account: str, ttl: timedelta, ca_dir: Path,
                 redis_url: str | None, state_key_file: Path | None,
                 redis_password_file: Path | None, redis_key_prefix: str,
                 redis_ca_file: Path | None) -> None:
    """Create a token. The token goes to stdout (only it, for scripts); its id and expiry
    to stderr."""
    from .tokens import TokenIssuer

    if redis_url:
        async def shared_issuer(store):
            from cryptography.hazmat.primitives import serialization
            from cryptography.hazmat.primitives.asymmetric import ec

            from ..shared_ca import CA_ENTRY, decode
            from .tokens import TOKEN_KEY

            data = await store.get_sealed(CA_ENTRY)
            if data is None:
                raise click.ClickException("no shared CA in Redis yet: start a replica first")
            key = serialization.load_pem_private_key(decode(data)[0][TOKEN_KEY], password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise click.ClickException("the shared token-signing key is not ECDSA P-256")
            return TokenIssuer(ca_dir, key=key)

        issuer = _run_shared(shared_issuer, redis_url, state_key_file, redis_password_file,
                             redis_key_prefix, redis_ca_file)
    else:
        issuer = None
    try:
        issued = (issuer or TokenIssuer(ca_dir)).issue(namespace, service_account, ttl)
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    click.echo(issued.token)
    click.echo(
        f"token id {issued.token_id} for {issued.identity} expires {issued.expires_at.isoformat()} "
        f"(revoke: xds-server token revoke {issued.token_id})",
        err=True,
    )


@token.command("revoke")
@click.argument("token_id")
@_ca_dir
@_shared_options
def token_revoke(token_id: str, ca_dir: Path, redis_url: str | None, state_key_file: Path | None,
                 redis_password_file: Path | None, redis_key_prefix: str,
                 redis_ca_file: Path | None) -> None:
    """Revoke a token by id. A running server applies it on the next verification; with
    --redis-url every replica closes its streams at once."""
    from .tokens import TokenIssuer, validate_token_id

    if redis_url:
        async def revoke(store):
            from ..shared_tokens import store_revocation
            from .authority import utcnow

            validate_token_id(token_id)
            await store_revocation(store, token_id, utcnow().isoformat())

        _run_shared(revoke, redis_url, state_key_file, redis_password_file, redis_key_prefix,
                    redis_ca_file)
        click.echo(f"token {token_id} revoked on every replica", err=True)
        return
    try:
        fresh = TokenIssuer(ca_dir).revoke(token_id)
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"token {token_id} {'revoked' if fresh else 'was already revoked'}", err=True)


def _is_loopback_target(target: str) -> bool:
    return is_loopback(target.rsplit(":", 1)[0].strip("[]") if ":" in target else target)


@click.command("agent")
@click.option("--cert-dir", "--out-dir", "cert_dir", required=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Where cert.pem, key.pem (0600), ca.pem and Envoy's SDS files are written "
                   "(`xds-server bootstrap --tls --cert-dir` points Envoy here).")
@click.option("--server", envvar="XDS_SERVER_CA_ADDRESS", default="127.0.0.1:15013", show_default=True,
              help="HOST:PORT of the server's certificate service: its tokens-over-TLS port "
                   "(--xds-tls-token-address).")
@click.option("--token", "token_value", envvar="XDS_SERVER_TOKEN",
              help="Bearer token (prefer --token-file: environment variables leak into ps).")
@click.option("--token-file", envvar="XDS_SERVER_TOKEN_FILE",
              type=click.Path(dir_okay=False, path_type=Path),
              help="File holding the bearer token, re-read on every renewal (the kubelet "
                   "replaces projected tokens before they expire).")
@click.option("--server-ca", envvar="XDS_SERVER_CA_FILE",
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="PEM roots that verify the server's TLS certificate at first contact (the "
                   "mesh roots); the agent's own ca.pem is trusted too once written.")
@click.option("--server-ca-pem", envvar="XDS_SERVER_CA_PEM",
              help="The same roots as PEM text (what the injector puts in the pod).")
@click.option("--server-name", help="TLS name to expect from the server (default: its host).")
@click.option("--mtls-server", default=None,
              help="HOST:PORT of the server's mutual-TLS port (--xds-tls-address): renew there with "
                   "the certificate held, falling back to the token when it is refused or expired.")
@click.option("--plaintext", is_flag=True,
              help="No TLS to the server: loopback only (the token would travel in clear).")
@click.option("--ttl", type=DURATION, help="Certificate lifetime to request (server default if unset).")
@click.option("--key-algorithm", type=click.Choice(["ec-p256", "rsa-2048"]), default="ec-p256",
              show_default=True)
@click.option("--ready-address", default=None,
              help="HOST:PORT answering GET /healthz/ready: 200 while a valid certificate is on "
                   "disk, 503 before (the kubelet's probes; the injector uses 0.0.0.0:15020).")
@click.option("--once", is_flag=True, help="Obtain one certificate and exit (init containers).")
def agent(cert_dir: Path, server: str, token_value: str | None, token_file: Path | None,
          server_ca: Path | None, server_ca_pem: str | None, server_name: str | None,
          mtls_server: str | None, plaintext: bool, ttl: timedelta | None, key_algorithm: str, ready_address: str | None,
          once: bool) -> None:
    """The workload agent: obtain an X.509-SVID with a locally generated key over TLS, keep
    it on disk for Envoy (file-based SDS) or proxyless gRPC, and renew it at half-life."""
    from .agent import CertAgent, CertificateRenewalSigner, CsrSigner, GrpcCsrSigner
    from .certdir import CA_FILE

    if not token_value and not token_file:
        raise click.UsageError("give --token-file (or --token / XDS_SERVER_TOKEN)")
    given_roots = server_ca is not None or bool(server_ca_pem)
    if plaintext and given_roots:
        raise click.UsageError("--plaintext and --server-ca/--server-ca-pem exclude each other")
    if not plaintext and not given_roots:
        raise click.UsageError("--server-ca FILE (or --server-ca-pem): the mesh roots that verify "
                               "the server's TLS certificate; --plaintext only for a loopback server")
    if plaintext and not _is_loopback_target(server):
        raise click.UsageError(f"--plaintext: {server} is not loopback, and the bearer token would "
                               "cross the network in clear; give --server-ca and use the "
                               "server's TLS port (--xds-tls-token-address)")
    for value, option in ((ready_address, "--ready-address"), (mtls_server, "--mtls-server")):
        if value is not None:
            try:
                parse_address(value, option)
            except ConfigError as err:
                raise click.BadParameter(str(err), param_hint=option) from None
    if mtls_server is not None and plaintext:
        raise click.UsageError("--mtls-server is TLS: it does not go with --plaintext")
    options: list[tuple[str, object]] = []
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))

    def roots() -> bytes:
        # Re-read: a mounted ConfigMap changes under us; plus our bundle (a rotated root).
        found = server_ca.read_bytes() if server_ca is not None else (server_ca_pem or "").encode()
        with contextlib.suppress(OSError):
            found = found.rstrip(b"\n") + b"\n" + (cert_dir / CA_FILE).read_bytes()
        return found

    async def run() -> None:
        signer: CsrSigner = GrpcCsrSigner(server, token=token_value, token_file=token_file,
                                          roots=None if plaintext else roots, options=options)
        if mtls_server is not None:
            signer = CertificateRenewalSigner(mtls_server, cert_dir, roots, signer, options=options)
        workload_agent = CertAgent(signer, cert_dir, ttl=ttl, key_algorithm=key_algorithm)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        readiness = None
        if ready_address is not None:
            from .agent_health import serve_readiness

            readiness = await serve_readiness(ready_address, workload_agent.ready)
        try:
            await workload_agent.run(stop, once=once)
        finally:
            if readiness is not None:
                readiness.close()
            await signer.close()

    try:
        asyncio.run(run())
    except Exception as err:
        click.echo(f"agent: {err}", err=True)
        sys.exit(1)


# `xds-server ca ...` -------------------------------------------------------------------------


@click.group("ca")
def ca() -> None:
    """The built-in CA: root rotation, its status, identity revocation."""


@ca.command("rotate-root")
@_ca_dir
def ca_rotate_root(ca_dir: Path) -> None:
    """Start a root rotation: a new root joins the trust bundle (it does not sign yet).

    A running server using the same --ca-dir notices the change, pushes the new bundle
    (SDS ROOTCA) to every proxy, switches signing to the new root once all of them have it,
    re-issues every workload certificate, and takes the old root out of the bundle when the
    last certificate it signed has expired. Follow it with `xds-server ca status`.
    """
    from .authority import CAError, CertificateAuthority, describe
    from .rotation import RootRotation, RotationError
    from .svid import CertificateRegistry

    try:
        authority = CertificateAuthority(ca_dir, create=False)
        rotation = RootRotation(authority, CertificateRegistry(authority.clock))
        new = rotation.start_root_rotation()
    except (CAError, RotationError) as err:
        raise click.ClickException(str(err)) from None
    info = describe(new)
    click.echo(f"root rotation started: new root {info['fingerprint']} ({info['subject']}) is in "
               f"the trust bundle; a running server switches signing once every proxy has it",
               err=True)


@ca.command("revoke-identity")
@click.option("--namespace", "-n", required=True)
@click.option("--service-account", "--sa", required=True)
@_ca_dir
def ca_revoke_identity(namespace: str, service_account: str, ca_dir: Path) -> None:
    """Void every credential of an identity issued until now: its workload tokens and its
    certificates (client certificates on the mutual-TLS port, the CSR service). A running
    server with the same --ca-dir refuses them at once and closes their open streams within
    seconds. Credentials issued afterwards are good: the workload's agent gets new ones."""
    from ..model.identity import Identity
    from .tokens import TokenIssuer

    try:
        identity = Identity(namespace, service_account)
        when = TokenIssuer(ca_dir).revoke_identity(identity)
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"identity {identity} revoked: credentials issued up to {when.isoformat()} "
               "are refused", err=True)


@ca.command("status")
@_ca_dir
def ca_status(ca_dir: Path) -> None:
    """Print the CA's roots and root rotation state (JSON)."""
    import json

    from .authority import CAError, CertificateAuthority, describe, fingerprint
    from .rotation import RootRotation
    from .svid import CertificateRegistry

    try:
        authority = CertificateAuthority(ca_dir, create=False)
    except CAError as err:
        raise click.ClickException(str(err)) from None
    state = authority.state
    rotation = RootRotation(authority, CertificateRegistry(authority.clock))
    click.echo(json.dumps({
        "signing": describe(state.signing_cert),
        "signing_root": fingerprint(state.root),
        "bundle": [describe(r) for r in state.roots],
        "rotation": rotation.status(),
    }, indent=2))

