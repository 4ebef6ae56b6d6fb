"""The `xds-server` command line. Every option has an XDS_SERVER_* environment equivalent."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import click

from . import logs
from .admin.cli import admin_options
from .app import AppConfig, KubernetesConfig, serve
from .ca.cli import security_options
from .config import ConfigError, parse_address
from .policy_cli import mesh_security_options
from .translate.scope import ScopeSettings
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
@click.option("--source", envvar="XDS_SERVER_SOURCE",
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Directory of Kubernetes-shaped YAML (Services, EndpointSlices, Pods, "
                   "HTTPRoutes, policies), hot-reloaded.")
@click.option("--default-export-to", envvar="XDS_SERVER_DEFAULT_EXPORT_TO", default="*",
              help="Where services are visible unless they say: '*' (everywhere) or '.' "
                   "(own namespace only).")
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
@click.option("--kubeconfig", envvar="XDS_SERVER_KUBECONFIG",
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Follow the mesh in this cluster (a kubeconfig file).")
@click.option("--in-cluster", envvar="XDS_SERVER_IN_CLUSTER", is_flag=True,
              help="Follow the mesh in the cluster this pod runs in (its service account).")
@click.option("--kube-namespace-selector", envvar="XDS_SERVER_KUBE_NAMESPACE_SELECTOR",
              default=None, help="Label selector: only namespaces matching it are in the mesh "
                                 "(e.g. 'mesh=enabled'); default every namespace.")
@admin_options
@security_options
@mesh_security_options
def serve_command(
    xds_address: str,
    source: Path | None,
    default_export_to: str,
    resources: Path | None,
    debounce_quiet: float,
    debounce_max: float,
    max_concurrent_pushes: int,
    max_concurrent_streams: int,
    max_message_bytes: int,
    keepalive_time: float,
    shutdown_grace: float,
    kubeconfig: Path | None,
    in_cluster: bool,
    kube_namespace_selector: str | None,
    admin=None,
    security=None,
    mesh_security=None,
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
    if kubeconfig is not None and in_cluster:
        raise click.UsageError("--kubeconfig and --in-cluster exclude each other")
    if kube_namespace_selector and kubeconfig is None and not in_cluster:
        raise click.UsageError("--kube-namespace-selector needs --kubeconfig or --in-cluster")
    kubernetes = None
    if kubeconfig is not None or in_cluster:
        kubernetes = KubernetesConfig(kubeconfig=kubeconfig, in_cluster=in_cluster,
                                      namespace_selector=kube_namespace_selector or None)
    try:
        scope = ScopeSettings(default_export_to=_export_list(default_export_to))
        asyncio.run(serve(AppConfig(server=settings, source=source, resources=resources,
                                    scope=scope, kubernetes=kubernetes, admin=admin,
                                    security=security, mesh_security=mesh_security)))
    except (OSError, ConfigError) as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        pass


def _export_list(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip()) or ("*",)


@main.command("validate")
@click.argument("directory", type=click.Path(exists=True, path_type=Path))
def validate_command(directory: Path) -> None:
    """Check a mesh directory: every error, with file:line, object and field."""
    from .sources.validate import format_errors, has_errors, validate_directory

    errors = validate_directory(directory)
    click.echo(format_errors(errors))
    sys.exit(1 if has_errors(errors) else 0)


@main.command("translate")
@click.option("--source", required=True, type=click.Path(exists=True, path_type=Path),
              help="The mesh directory.")
@click.option("--namespace", required=True)
@click.option("--service-account", default="default")
@click.option("--pod", default=None, help="Pod name (default: a proxy with no pod of its own).")
@click.option("--pod-ip", default="", help="Pod IP, when the pod is not in the source.")
@click.option("--type", "type_", type=click.Choice(["lds", "rds", "cds", "eds", "all"]),
              default="all")
@click.option("--default-export-to", default="*")
def translate_command(
    source: Path, namespace: str, service_account: str, pod: str | None, pod_ip: str,
    type_: str, default_export_to: str,
) -> None:
    """Print the Envoy resources one proxy would receive, as JSON."""
    import json

    from google.protobuf import json_format, struct_pb2
    from envoy.config.core.v3 import base_pb2

    from .model.identity import VerifiedProxy
    from .model.store import MeshStore
    from .sources.mesh_files import MeshDirectory
    from .translate.controller import MeshController, proxy_resources
    from .xds.node import proxy_claim
    from .xds import types
    from .xds.cache import ResourceCache

    store, cache = MeshStore(), ResourceCache()
    controller = MeshController(store, cache, ScopeSettings(_export_list(default_export_to)))
    errors = MeshDirectory(source, store).load()
    for error in errors:
        click.echo(f"warning: {error}", err=True)
    pod_name = pod or f"{service_account}-proxy"
    metadata = struct_pb2.Struct()
    metadata.update({"namespace": namespace, "service_account": service_account,
                     "pod": pod_name, "pod_ip": pod_ip})
    node = base_pb2.Node(id=f"{pod_name}.{namespace}", metadata=metadata)
    view = controller.view_for(VerifiedProxy.unverified(proxy_claim(node)))
    wanted = {"lds": types.LISTENER, "rds": types.ROUTE, "cds": types.CLUSTER, "eds": types.ENDPOINT}
    sections = {"lds": "listeners", "rds": "routes", "cds": "clusters", "eds": "endpoints"}
    output: dict[str, list] = {}
    for short, type_url in wanted.items():
        if type_ not in ("all", short):
            continue
        message_class = _message_class(type_url)
        output[sections[short]] = [
            json_format.MessageToDict(r.unpack(message_class), preserving_proto_field_name=True)
            for r in proxy_resources(view)[type_url]
        ]
    click.echo(json.dumps(output, indent=2))


def _message_class(type_url: str):
    from google.protobuf import symbol_database

    return symbol_database.Default().GetSymbol(type_url.rsplit("/", 1)[-1])


@main.command("bootstrap")
@click.option("--namespace", required=True)
@click.option("--service-account", default="default")
@click.option("--pod", required=True)
@click.option("--pod-ip", required=True)
@click.option("--xds-address", default="127.0.0.1:15010", callback=_address)
@click.option("--admin-address", default="127.0.0.1:15000", callback=_address,
              help="Envoy admin: keep it on loopback.")
@click.option("--inbound-port", type=int, default=15006)
@click.option("--outbound-port", type=int, default=15001)
@click.option("--label", "labels", multiple=True, help="KEY=VALUE, repeatable.")
@click.option("--sotw", is_flag=True, help="State-of-the-world ADS instead of delta.")
@click.option("--token-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A bearer token (`xds-server token create`, or a projected service-account "
                   "token) Envoy sends on its xDS streams. The bootstrap then holds a secret.")
def bootstrap_command(
    namespace: str, service_account: str, pod: str, pod_ip: str, xds_address: str,
    admin_address: str, inbound_port: int, outbound_port: int, labels: tuple[str, ...], sotw: bool,
    token_file: Path | None,
) -> None:
    """Print an Envoy bootstrap (YAML) for one workload's sidecar."""
    import yaml

    from .bootstrap import SidecarSpec, sidecar_bootstrap

    label_map = {}
    for item in labels:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--label")
        label_map[key] = value
    spec = SidecarSpec(
        namespace=namespace, service_account=service_account, pod=pod, pod_ip=pod_ip,
        xds_address=xds_address, admin_address=admin_address, inbound_port=inbound_port,
        outbound_port=outbound_port, labels=label_map, delta=not sotw,
        token=token_file.read_text().strip() if token_file is not None else None,
    )
    try:
        bootstrap = sidecar_bootstrap(spec)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--token-file") from None
    click.echo(yaml.safe_dump(bootstrap, sort_keys=False))


@main.command("crds")
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write one file per CRD here (e.g. manifests/crds) instead of printing.")
def crds_command(output_dir: Path | None) -> None:
    """Print the project's CustomResourceDefinitions (YAML), generated from the models."""
    from .crds import all_crds_yaml, write_crds

    if output_dir is None:
        click.echo(all_crds_yaml(), nl=False)
    else:
        for path in write_crds(output_dir):
            click.echo(f"wrote {path}")


@main.command("demo")
@click.option("--source", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, help="The demo mesh (Kubernetes-shaped YAML).  [default: examples/demo]")
@click.option("--once", is_flag=True, help="One round of traffic, then exit (0 only if it all worked).")
@click.option("--rounds", type=click.IntRange(min=1), default=None,
              help="Rounds of traffic, then exit.  [default: until Ctrl-C]")
@click.option("--requests", type=click.IntRange(min=1), default=200, help="HTTP requests per round.")
@click.option("--concurrency", type=click.IntRange(min=1, max=64), default=4,
              help="Connections the calling app sends on at once.")
@click.option("--interval", type=click.FloatRange(min=0), default=1.0, help="Seconds between rounds.")
@click.option("--xds-address", default=_DEFAULTS.address, callback=_address,
              help="HOST:PORT for the in-process xDS server (port 0: any free port).")
@click.pass_context
def demo_command(
    ctx: click.Context, source: Path | None, once: bool, rounds: int | None, requests: int,
    concurrency: int, interval: float, xds_address: str,
) -> None:
    """Run a mesh here: the server, real Envoy sidecars, small apps, traffic, a table per round.

    frontend -> api (HTTPRoute 90/10 to v1/v2, retries) and a TCP db, from examples/demo.
    Ctrl-C stops everything cleanly.
    """
    import logging

    from . import demo

    if once:
        rounds = 1
    if ctx.parent is not None and \
            ctx.parent.get_parameter_source("log_level") is click.core.ParameterSource.DEFAULT:
        logging.getLogger().setLevel(logging.WARNING)  # the table is the output; --log-level info for more
    options = demo.DemoOptions(
        source=source or demo.default_source(), xds_address=xds_address, rounds=rounds,
        requests=requests, concurrency=concurrency, interval=interval,
    )
    if not options.source.is_dir():
        raise click.BadParameter(f"{options.source} is not a directory (run from the repository "
                                 "root, or pass --source)", param_hint="--source")
    sys.exit(demo.run(options))


def _register_ca_commands() -> None:
    from .ca.cli import ca, cert_agent, token

    main.add_command(token)
    main.add_command(cert_agent)
    main.add_command(ca)


_register_ca_commands()


def _register_admin_commands() -> None:
    from .admin.cli import COMMANDS

    for command in COMMANDS:
        main.add_command(command)


_register_admin_commands()


if __name__ == "__main__":
    main()
