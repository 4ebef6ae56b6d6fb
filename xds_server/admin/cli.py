"""Operator commands that talk to a running server's admin API.

    xds-server status                 a table of proxies and their per-type status
    xds-server config-dump PROXY      one proxy's current config (Envoy JSON, secrets redacted)
    xds-server certs                  issued workload certificates and their expiry
    xds-server admin-token create     a new random token and the tokens-file entry for it

The address and token come from `--admin-address` / `$XDS_SERVER_ADMIN_ADDRESS` and `--token`
/ `$XDS_SERVER_ADMIN_TOKEN` (prefer the environment: command lines are visible to other
users). `--output json` prints what the API returned. For an mTLS admin API pass the mesh's
trust bundle (`--cacert`) and a client certificate and key from the mesh CA.
"""

from __future__ import annotations

import functools
import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, UTC
from pathlib import Path
from typing import Any

import click

from .settings import DEFAULT_ADDRESS

STATUS_TYPES = ("CDS", "LDS", "EDS", "RDS", "SDS")


# The client -------------------------------------------------------------------------------------


class AdminClient:
    def __init__(self, address: str, token: str | None, *, cacert: Path | None = None,
                 cert: Path | None = None, key: Path | None = None, timeout: float = 10.0) -> None:
        tls = cacert is not None or cert is not None
        if "://" in address:
            self.base = address.rstrip("/")
            tls = tls or address.startswith("https://")
        else:
            self.base = f"{'https' if tls else 'http'}://{address}"
        self.token = token
        self.timeout = timeout
        self.context: ssl.SSLContext | None = None
        if tls:
            context = ssl.create_default_context(cafile=str(cacert) if cacert else None)
            # SPIFFE certificates name a workload (URI SAN), not a host: trust is the chain to
            # the mesh's trust bundle.
            context.check_hostname = False
            if cert is not None:
                context.load_cert_chain(str(cert), str(key) if key else None)
            self.context = context

    def request(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
        if self.context is not None:
            handlers.append(urllib.request.HTTPSHandler(context=self.context))
        # No proxies from the environment: the admin API is the server's own, usually loopback.
        opener = urllib.request.build_opener(*handlers)
        try:
            with opener.open(request, timeout=self.timeout) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as err:
            try:
                message = json.loads(err.read()).get("error") or err.reason
            except (ValueError, AttributeError):
                message = err.reason
            raise click.ClickException(f"{method} {path}: {err.code} {message}") from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise click.ClickException(f"cannot reach the admin API at {self.base}: {reason}") from None

    def get(self, path: str) -> Any:
        return self.request("GET", path)


def client_options(command):
    @click.option("--admin-address", envvar="XDS_SERVER_ADMIN_ADDRESS", default=DEFAULT_ADDRESS,
                  show_default=True, help="The server's admin API, HOST:PORT or a URL.")
    @click.option("--token", envvar="XDS_SERVER_ADMIN_TOKEN", default=None,
                  help="Bearer token (prefer $XDS_SERVER_ADMIN_TOKEN).")
    @click.option("--cacert", envvar="XDS_SERVER_ADMIN_CACERT", default=None,
                  type=click.Path(exists=True, dir_okay=False, path_type=Path),
                  help="Trust bundle of an mTLS admin API (the mesh CA's roots).")
    @click.option("--cert", envvar="XDS_SERVER_ADMIN_CERT", default=None,
                  type=click.Path(exists=True, dir_okay=False, path_type=Path),
                  help="Client certificate (chain) from the mesh CA, for mTLS.")
    @click.option("--key", envvar="XDS_SERVER_ADMIN_KEY", default=None,
                  type=click.Path(exists=True, dir_okay=False, path_type=Path),
                  help="The client certificate's key.")
    @click.option("--output", "-o", type=click.Choice(["table", "json"]), default="table",
                  show_default=True)
    @functools.wraps(command)
    def wrapper(*args, admin_address: str, token: str | None, cacert: Path | None,
                cert: Path | None, key: Path | None, **kwargs):
        client = AdminClient(admin_address, token, cacert=cacert, cert=cert, key=key)
        return command(*args, client=client, **kwargs)

    return wrapper


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False))


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["   ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for row in rows:
        lines.append("   ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def _since(iso: str | None) -> str:
    if not iso:
        return "-"
    seconds = int((datetime.now(UTC) - datetime.fromisoformat(iso)).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


def _until(iso: str) -> str:
    seconds = int((datetime.fromisoformat(iso) - datetime.now(UTC)).total_seconds())
    if seconds <= 0:
        return "expired"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def status_table(proxies: list[dict]) -> str:
    """istioctl proxy-status, for this server: one row per proxy, a column per type."""
    shown = [t for t in STATUS_TYPES if any(t in p["types"] for p in proxies)] or list(STATUS_TYPES[:4])
    headers = ["NAME", "IDENTITY", *shown, "VARIANT", "ADDRESS", "CONNECTED"]
    rows = []
    errors = []
    claimed = False
    for proxy in proxies:
        cells = []
        for short in shown:
            entry = proxy["types"].get(short)
            cells.append(entry["status"] if entry else "-")
            if entry and entry["status"] == "NACKED" and entry.get("error"):
                errors.append(f"{proxy['id']} {short} NACKED (version {entry['error']['version']}): "
                              f"{entry['error']['message']}")
        identity = proxy["identity"]["spiffe_id"] or "-"
        if identity != "-" and not proxy["identity"]["verified"]:
            identity += "*"
            claimed = True
        rows.append([proxy["id"], identity, *cells, proxy["variant"], proxy["address"],
                     _since(proxy["connected_since"])])
    out = _table(headers, rows) if rows else "no proxies connected"
    if claimed:
        out += "\n* the identity the node claims; the stream did not authenticate it"
    if errors:
        out += "\n\nrejected config:\n" + "\n".join(f"  {e}" for e in errors)
    return out


@click.command("status")
@client_options
def status_command(client: AdminClient, output: str) -> None:
    """Connected proxies and their per-type sync status (SYNCED, STALE, NACKED, NOT SENT)."""
    data = client.get("/api/v1/proxies")
    if output == "json":
        _echo_json(data)
    else:
        click.echo(status_table(data["proxies"]))


@click.command("config-dump")
@click.argument("proxy")
@click.option("--type", "types_", multiple=True, type=click.Choice(STATUS_TYPES),
              help="Only this type (repeatable).")
@client_options
def config_dump_command(client: AdminClient, output: str, proxy: str, types_: tuple[str, ...]) -> None:
    """One proxy's current config as Envoy JSON (secrets redacted). PROXY is its node id."""
    query = urllib.parse.urlencode([("type", t) for t in types_])
    path = f"/api/v1/proxies/{urllib.parse.quote(proxy, safe='')}/config" + (f"?{query}" if query else "")
    data = client.get(path)
    if output == "json":
        _echo_json(data)
        return
    for short, section in data["types"].items():
        click.echo(f"{short}  status {section['status']}  sent {section['sent_version'] or '-'}  "
                   f"acked {section['acked_version'] or '-'}  {len(section['resources'])} resources, "
                   f"{section['size_bytes']} bytes")
        for item in section["resources"]:
            click.echo(f"  {item['name']}  (version {item['version']})")
    click.echo("\n(--output json prints every resource as Envoy JSON)")


@click.command("certs")
@click.option("--proxy", default=None, help="Only certificates issued to this proxy.")
@client_options
def certs_command(client: AdminClient, output: str, proxy: str | None) -> None:
    """Issued workload certificates still valid, soonest expiry first."""
    query = f"?{urllib.parse.urlencode({'proxy': proxy})}" if proxy else ""
    data = client.get(f"/api/v1/ca/certificates{query}")
    if output == "json":
        _echo_json(data)
        return
    certificates = data["certificates"]
    if not certificates:
        click.echo("no certificates issued")
        return
    rows = [[c["serial"], c["spiffe_id"], c["not_after"], _until(c["not_after"]), c["proxy"] or "-",
             c["kind"]] for c in certificates]
    click.echo(_table(["SERIAL", "SPIFFE ID", "NOT AFTER", "EXPIRES IN", "PROXY", "KIND"], rows))


@click.group("admin-token")
def admin_token() -> None:
    """Tokens for the admin API."""


@admin_token.command("create")
@click.option("--name", required=True, help="A name for logs and metrics (e.g. ops, grafana).")
@click.option("--role", type=click.Choice(["read", "admin"]), required=True)
def admin_token_create(name: str, role: str) -> None:
    """Print a new random token (stderr) and its tokens-file entry, hash only (stdout)."""
    from .auth import digest, new_token

    token = new_token()
    click.echo(f"token (shown once; give it to the client): {token}", err=True)
    click.echo(json.dumps({"name": name, "role": role, "token_sha256": digest(token).hex()}))


COMMANDS = [status_command, config_dump_command, certs_command, admin_token]

