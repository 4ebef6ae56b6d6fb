"""The `xds-server` command line. Every option has an XDS_SERVER_* environment equivalent."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import click

from . import logs
from .app import AppConfig, serve
from .config import ConfigError, parse_address
from .xds.server import ServerSettings

_DEFAULTS = ServerSettings()


def _address(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        parse_address(value, f"--{param.name.replace('_', '-')}")
    except ConfigError as err:
        raise click.BadParameter(str(err)) from None
    return value


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--log-level", envvar="XDS_SERVER_LOG_LEVEL", default="info",
              type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--log-format", envvar="XDS_SERVER_LOG_FORMAT", default="auto",
              type=click.Choice(["auto", "json", "text"]),
              help="auto: text on a terminal, JSON otherwise.")
def main(log_level: str, log_format: str) -> None:
    """An xDS control plane for Envoy service meshes."""
    logs.configure(log_level, log_format)


@main.command("serve")
@click.option("--xds-address", envvar="XDS_SERVER_XDS_ADDRESS", default=_DEFAULTS.address,
              callback=_address, help="HOST:PORT for xDS gRPC (plaintext).")
@click.option("--resources", envvar="XDS_SERVER_RESOURCES",
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Directory of raw Envoy resources (YAML/JSON, typed by @type), hot-reloaded.")
@click.option("--debounce-quiet", envvar="XDS_SERVER_DEBOUNCE_QUIET", type=float,
              default=_DEFAULTS.debounce_quiet,
              help="Seconds without changes before pushing; 0 turns debouncing off.")
@click.option("--debounce-max", envvar="XDS_SERVER_DEBOUNCE_MAX", type=float,
              default=_DEFAULTS.debounce_max, help="Longest a burst of changes delays a push.")
@click.option("--max-concurrent-pushes", envvar="XDS_SERVER_MAX_CONCURRENT_PUSHES", type=int,
              default=_DEFAULTS.max_concurrent_pushes)
@click.option("--max-concurrent-streams", envvar="XDS_SERVER_MAX_CONCURRENT_STREAMS", type=int,
              default=_DEFAULTS.max_concurrent_streams, help="Per HTTP/2 connection.")
@click.option("--max-message-bytes", envvar="XDS_SERVER_MAX_MESSAGE_BYTES", type=int,
              default=_DEFAULTS.max_send_message_bytes, help="Largest response sent.")
@click.option("--keepalive-time", envvar="XDS_SERVER_KEEPALIVE_TIME", type=float,
              default=_DEFAULTS.keepalive_time, help="Seconds between server keepalive pings.")
@click.option("--shutdown-grace", envvar="XDS_SERVER_SHUTDOWN_GRACE", type=float,
              default=_DEFAULTS.shutdown_grace, help="Seconds to finish in-flight work on SIGTERM.")
def serve_command(
    xds_address: str,
    resources: Path | None,
    debounce_quiet: float,
    debounce_max: float,
    max_concurrent_pushes: int,
    max_concurrent_streams: int,
    max_message_bytes: int,
    keepalive_time: float,
    shutdown_grace: float,
) -> None:
    """Run the xDS server."""
    settings = ServerSettings(
        address=xds_address,
        debounce_quiet=debounce_quiet,
        debounce_max=debounce_max,
        max_concurrent_pushes=max_concurrent_pushes,
        max_concurrent_streams=max_concurrent_streams,
        max_send_message_bytes=max_message_bytes,
        keepalive_time=keepalive_time,
        shutdown_grace=shutdown_grace,
    )
    try:
        asyncio.run(serve(AppConfig(server=settings, resources=resources)))
    except OSError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
