"""CLI commands of the CA: `xds-server token create|revoke` and `xds-server cert-agent`.

Registered on the main group in xds_server/cli.py:

    from .ca.cli import cert_agent, token
    main.add_command(token)
    main.add_command(cert_agent)
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import re
import signal
import sys
from datetime import timedelta
from pathlib import Path

import click

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> timedelta:
    """'90s', '15m', '24h', '7d', '1h30m', or plain seconds ('3600')."""
    text = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return timedelta(seconds=float(text))
    pos, total = 0, 0.0
    for match in _DURATION.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise ValueError(f"invalid duration {text!r}: use e.g. 90s, 15m, 24h, 7d or 1h30m")
    return timedelta(seconds=total)


class Duration(click.ParamType):
    name = "duration"

    def convert(self, value, param, ctx):
        if isinstance(value, timedelta):
            return value
        try:
            return parse_duration(str(value))
        except ValueError as err:
            self.fail(str(err), param, ctx)


DURATION = Duration()

_ca_dir = click.option(
    "--ca-dir", envvar="XDS_SERVER_CA_DIR", default="certs", show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory of the CA files (the token signing key and revocation list live there).",
)


@click.group("token")
def token() -> None:
    """Workload tokens issued by this server (for workloads outside Kubernetes)."""


@token.command("create")
@click.option("--namespace", "-n", required=True, help="Namespace of the workload.")
@click.option("--service-account", "--sa", required=True, help="Service account of the workload.")
@click.option("--ttl", type=DURATION, default="24h", show_default=True,
              help="Lifetime, e.g. 1h, 24h, 30d.")
@_ca_dir
def token_create(namespace: str, service_account: str, ttl: timedelta, ca_dir: Path) -> None:
    """Create a token. The token goes to stdout (only it, for scripts); its id and expiry
    to stderr."""
    from .tokens import TokenIssuer

    try:
        issued = TokenIssuer(ca_dir).issue(namespace, service_account, ttl)
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
def token_revoke(token_id: str, ca_dir: Path) -> None:
    """Revoke a token by id. A running server applies it on the next verification."""
    from .tokens import TokenIssuer

    try:
        fresh = TokenIssuer(ca_dir).revoke(token_id)
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"token {token_id} {'revoked' if fresh else 'was already revoked'}", err=True)


def _is_loopback_target(target: str) -> bool:
    host = target.rsplit(":", 1)[0].strip("[]") if ":" in target else target
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.command("cert-agent")
@click.option("--out-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Where cert.pem, key.pem (0600) and ca.pem are written.")
@click.option("--server", envvar="XDS_SERVER_CA_ADDRESS", default="127.0.0.1:15010", show_default=True,
              help="HOST:PORT of the xDS server's certificate service.")
@click.option("--token", "token_value", envvar="XDS_SERVER_TOKEN",
              help="Bearer token (prefer --token-file: environment variables leak into ps).")
@click.option("--token-file", envvar="XDS_SERVER_TOKEN_FILE",
              type=click.Path(dir_okay=False, path_type=Path),
              help="File holding the bearer token, re-read on every renewal.")
@click.option("--server-ca", envvar="XDS_SERVER_CA_FILE",
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="PEM roots to verify the server's TLS certificate; without it the connection "
                   "is plaintext (loopback only).")
@click.option("--server-name", help="TLS name to expect from the server (default: its host).")
@click.option("--ttl", type=DURATION, help="Certificate lifetime to request (server default if unset).")
@click.option("--key-algorithm", type=click.Choice(["ec-p256", "rsa-2048"]), default="ec-p256",
              show_default=True)
@click.option("--once", is_flag=True, help="Obtain one certificate and exit (init containers).")
def cert_agent(out_dir: Path, server: str, token_value: str | None, token_file: Path | None,
               server_ca: Path | None, server_name: str | None, ttl: timedelta | None,
               key_algorithm: str, once: bool) -> None:
    """Obtain a workload certificate with a locally generated key and renew it at half-life."""
    import grpc

    from .agent import CertAgent, GrpcCsrSigner

    if not token_value and not token_file:
        raise click.UsageError("give --token-file (or --token / XDS_SERVER_TOKEN)")
    credentials = None
    options: list[tuple[str, object]] = []
    if server_ca is not None:
        credentials = grpc.ssl_channel_credentials(root_certificates=server_ca.read_bytes())
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
    elif not _is_loopback_target(server):
        click.echo(f"WARNING: plaintext connection to {server}: the bearer token travels "
                   "unencrypted. Use --server-ca on anything but loopback.", err=True)

    async def run() -> None:
        signer = GrpcCsrSigner(server, token=token_value, token_file=token_file,
                               credentials=credentials, options=options)
        agent = CertAgent(signer, out_dir, ttl=ttl, key_algorithm=key_algorithm)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        try:
            await agent.run(stop, once=once)
        finally:
            await signer.close()

    try:
        asyncio.run(run())
    except Exception as err:  # noqa: BLE001 - --once failures: one clear line, exit 1
        click.echo(f"cert-agent: {err}", err=True)
        sys.exit(1)


# `xds-server ca ...` -------------------------------------------------------------------------


@click.group("ca")
def ca() -> None:
    """The built-in CA: root rotation and its status."""


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


# `xds-server serve` options -------------------------------------------------------------------


_ca_dir_serve = click.option(
    "--ca-dir", envvar="XDS_SERVER_CA_DIR", default="certs", show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory of the CA files (created with a self-signed root when empty) and of the "
         "workload token key.",
)


def security_options(command):
    """Add the authentication, CA and SDS options to `serve`; the command gets one `security`
    argument: a SecurityConfig (xds_server/security.py).

    `--auth` has no default on purpose: an operator chooses between real authentication and
    none (`XDS_SERVER_AUTH` in an image or manifest counts as a choice)."""

    @click.option(
        "--auth", envvar="XDS_SERVER_AUTH", required=True,
        type=click.Choice(["tokens", "insecure-node-metadata", "none"]),
        help="How proxies prove who they are. tokens: a bearer token in the stream's "
             "metadata (a workload token of this server, or a Kubernetes service-account "
             "token checked with TokenReview). insecure-node-metadata: believe the node "
             "metadata (loopback demos only). none: no authentication and no SDS secrets.")
    @_ca_dir_serve
    @click.option("--trust-domain", envvar="XDS_SERVER_TRUST_DOMAIN", default="cluster.local",
                  show_default=True, help="SPIFFE trust domain of the workload certificates.")
    @click.option("--workload-ttl", envvar="XDS_SERVER_WORKLOAD_TTL", type=DURATION,
                  default="24h", show_default=True,
                  help="Lifetime of workload certificates (renewed at half-life).")
    @click.option("--token-audience", "token_audiences", envvar="XDS_SERVER_TOKEN_AUDIENCE",
                  multiple=True, default=("xds-server",), show_default=True,
                  help="Audience Kubernetes tokens must be minted for (TokenReview); "
                       "repeatable.")
    @click.option("--max-streams-per-identity", envvar="XDS_SERVER_MAX_STREAMS_PER_IDENTITY",
                  type=click.IntRange(min=0), default=4096, show_default=True,
                  help="Open xDS streams one identity may hold (0: unbounded).")
    @click.option("--max-requests-per-second", envvar="XDS_SERVER_MAX_REQUESTS_PER_SECOND",
                  type=click.FloatRange(min=0), default=200.0, show_default=True,
                  help="Requests per second per stream, with a burst of 5 s worth "
                       "(0: unbounded).")
    @functools.wraps(command)
    def wrapper(*args, auth: str, ca_dir: Path, trust_domain: str, workload_ttl: timedelta,
                token_audiences: tuple[str, ...], max_streams_per_identity: int,
                max_requests_per_second: float, **kwargs):
        from ..security import SecurityConfig
        from ..xds.auth import AuthMode, GuardSettings

        limits = GuardSettings(
            max_streams_per_identity=max_streams_per_identity,
            max_requests_per_second=max_requests_per_second,
            request_burst=max(1, int(max_requests_per_second * 5)),
        )
        security = SecurityConfig(
            auth=AuthMode(auth), ca_dir=ca_dir, trust_domain=trust_domain,
            workload_ttl=workload_ttl, limits=limits,
            token_audiences=tuple(a for a in token_audiences if a) or ("xds-server",),
        )
        return command(*args, security=security, **kwargs)

    return wrapper
