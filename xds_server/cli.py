"""The `xds-server` command line.

`serve`'s options (and `--log-level`, `--log-format`) are generated from the settings tree
(xds_server/settings/): each has an XDS_SERVER_* environment equivalent named after it.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from pydantic import ValidationError

from . import logs
from .app import serve
from .config import ConfigError, parse_address
from .settings import (
    Leaf,
    LoggingSection,
    ServeSettings,
    describe_errors,
    environment_values,
    leaves,
)
from .translate.scope import ScopeSettings
from .xds.server import ServerSettings

_DEFAULTS = ServerSettings()
_Command = TypeVar("_Command", bound=Callable[..., Any])
SERVE_SECTIONS = tuple(s for s in ServeSettings.model_fields if s != "logging")


def _address(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if value.startswith("unix:/"):  # a Unix socket (the bootstrap's `pipe` address)
        return value
    try:
        parse_address(value, f"--{(param.name or '').replace('_', '-')}")
    except ConfigError as err:
        raise click.BadParameter(str(err)) from None
    return value


def _xds_addresses(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    """Repeated and comma-separated --xds-address values, each checked, in order."""
    from .bootstrap import xds_addresses

    try:
        listed = xds_addresses(",".join(value)) if value else []
    except ValueError as err:
        raise click.BadParameter(str(err).removeprefix("--xds-address: ")) from None
    return tuple(_address(ctx, param, item) for item in listed)


# Options generated from the settings tree ---------------------------------------------------


def _param_name(leaf: Leaf) -> str:
    return leaf.flag.removeprefix("--").replace("-", "_")


_LEAF_OF_PARAM = {_param_name(leaf): leaf for leaf in leaves()}


_METAVARS = {"duration": "DURATION", "address": "HOST:PORT", "integer": "INTEGER",
             "number": "NUMBER", "path": "PATH", "list": "LIST", "text": "TEXT"}


def _option(leaf: Leaf) -> Callable[[_Command], _Command]:
    """The flag of one leaf. Values stay text here: the tree parses and checks flags and
    environment variables alike (settings/), so both give the same errors. click knows
    the variable too, for `--help` and for tools that read a command's parameters."""
    help_text = f"{leaf.help}  [default: {leaf.shown_default}; env: {leaf.env}]"
    if leaf.kind == "flag":
        declaration = f"{leaf.flag}/--no-{leaf.flag[2:]}" if leaf.default else leaf.flag
        return click.option(declaration, _param_name(leaf), is_flag=True, default=None,
                            envvar=leaf.env, help=help_text)
    choices = leaf.choices()
    return click.option(
        leaf.flag, _param_name(leaf), default=None, multiple=leaf.repeatable, envvar=leaf.env,
        help=help_text,
        type=click.Choice(choices, case_sensitive=False) if choices else click.STRING,
        metavar=None if choices else _METAVARS[leaf.kind],
    )


def tree_options(sections: tuple[str, ...]) -> Callable[[_Command], _Command]:
    """One option per leaf of `sections`."""

    def decorate(command: _Command) -> _Command:
        for leaf in reversed(list(leaves(sections))):
            command = _option(leaf)(command)
        return command

    return decorate


def given_flags(ctx: click.Context | None) -> dict[str, dict[str, Any]]:
    """{section: {field: value}} of the tree options given on the command line of `ctx` and
    its parents (the tree reads the environment itself, and knows the defaults)."""
    given: dict[str, dict[str, Any]] = {}
    while ctx is not None:
        for name, value in ctx.params.items():
            leaf = _LEAF_OF_PARAM.get(name)
            if leaf and ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE:
                given.setdefault(leaf.section, {})[leaf.name] = value
        ctx = ctx.parent
    return given


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@tree_options(("logging",))
@click.pass_context
def main(ctx: click.Context, /, **_: Any) -> None:
    """An xDS control plane for Envoy service meshes."""
    values = environment_values(os.environ, ("logging",)).get("logging", {})
    values.update(given_flags(ctx).get("logging", {}))
    try:
        logging_settings = LoggingSection.model_validate(values)
    except ValidationError as err:
        raise click.UsageError(describe_errors(err, "logging")) from None
    logs.configure(logging_settings.level, logging_settings.format)


@main.command("serve")
@tree_options(SERVE_SECTIONS)
@click.pass_context
def serve_command(ctx: click.Context, /, **_: Any) -> None:
    """Run the xDS server.

    Every option has an environment variable (XDS_SERVER_ and the option in capitals);
    an option given wins over its variable. Durations: 1.5s, 100ms, 1h30m, 7d or seconds.
    """
    from . import workers

    try:
        settings = ServeSettings.load(given_flags(ctx))
        config = settings.app_config()
        count = settings.xds.workers
        index = workers.worker_index() if count > 1 else None
        if count > 1:
            workers.check_workers(config, count)
    except ConfigError as err:
        raise click.UsageError(str(err)) from None
    if count > 1 and index is None:
        sys.exit(workers.supervise(count, sys.argv[1:], grace=config.server.shutdown_grace))
    if index is not None:
        workers.tag_logs(index)
        config = workers.worker_config(config, index)
    try:
        asyncio.run(serve(config))
    except (OSError, ConfigError) as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        pass


def _export_list(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip()) or ("*",)


@main.command("validate")
@click.argument("directory", type=click.Path(exists=True, path_type=Path))
@click.option("--pod", "pods", multiple=True, metavar="NAMESPACE/NAME",
              help="Also show which NetworkPolicies select this pod and what they allow (repeatable).")
def validate_command(directory: Path, pods: tuple[str, ...]) -> None:
    """Check a mesh directory: every error, with file:line, object and field."""
    from .sources.validate import describe_pod, format_errors, has_errors, validate_directory

    errors = validate_directory(directory)
    click.echo(format_errors(errors))
    missing = False
    for pod in pods:
        namespace, _, name = pod.partition("/")
        described = describe_pod(directory, namespace, name) if name else None
        if described is None:
            click.echo(f"pod {pod}: not found (write NAMESPACE/NAME)", err=True)
            missing = True
            continue
        click.echo(_network_policy_text(described))
    sys.exit(1 if has_errors(errors) or missing else 0)


def _network_policy_text(described: dict) -> str:
    """A pod's NetworkPolicy (model/netpol.describe) for a terminal."""
    lines = [f"\npod {described['pod']}: NetworkPolicy"]
    selected = described["selected_by"] or {}
    lines.append("  selected by: " + (", ".join(f"{p} ({', '.join(d)})" for p, d in selected.items()) or "none"))
    if not described["enforced"]:
        lines.append(f"  NOT ENFORCED: {described['not_enforced_because']}")
    for direction in ("ingress", "egress"):
        section = described[direction]
        allows = section["allows"]
        if isinstance(allows, str):
            lines.append(f"  {direction}: {allows}")
            continue
        lines.append(f"  {direction}: isolated; allowed:" + ("" if allows else " nothing (default deny)"))
        for entry in allows:
            ports = entry["tcp_ports"] if isinstance(entry["tcp_ports"], str) else ",".join(entry["tcp_ports"])
            lines.append(f"    {entry['rule']}: TCP ports {ports}; " + "; ".join(entry["peers"]))
        for note in section["notes"]:
            lines.append(f"    note: {note}")
    return "\n".join(lines)


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
@click.option("--proxyless", is_flag=True,
              help="The proxy is a proxyless gRPC client/server (its node says gRPC), not Envoy.")
@click.option("--target", "targets", multiple=True,
              help="Proxyless clients: a target gRPC asks a listener for (`xds:///api.shop:8080` "
                   "asks for `api.shop:8080`); repeatable.")
def translate_command(
    source: Path, namespace: str, service_account: str, pod: str | None, pod_ip: str,
    type_: str, default_export_to: str, proxyless: bool, targets: tuple[str, ...],
) -> None:
    """Print the xDS resources one proxy would receive, as JSON. With --proxyless, also warn
    of every TrafficPolicy setting gRPC cannot apply as Envoy does."""
    import json

    from google.protobuf import json_format, struct_pb2
    from envoy.config.core.v3 import base_pb2

    from .model.client_kinds import grpc_notes
    from .model.identity import VerifiedProxy
    from .model.policy import TrafficPolicy
    from .model.store import TRAFFIC_POLICY, MeshStore
    from .xds.node import GRPC_FEATURE
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
    if proxyless:
        node.user_agent_name = "gRPC Python"
        node.client_features.append(GRPC_FEATURE)
        for (policy_ns, name), policy in sorted(store.all(TRAFFIC_POLICY).items()):
            assert isinstance(policy, TrafficPolicy)
            for field, message in grpc_notes(policy.spec):
                click.echo(f"warning: TrafficPolicy {policy_ns}/{name}: {field}: {message}", err=True)
    view = controller.view_for(VerifiedProxy.unverified(proxy_claim(node)))
    wanted = {"lds": types.LISTENER, "rds": types.ROUTE, "cds": types.CLUSTER, "eds": types.ENDPOINT}
    sections = {"lds": "listeners", "rds": "routes", "cds": "clusters", "eds": "endpoints"}
    output: dict[str, list[dict[str, Any]]] = {}
    for short, type_url in wanted.items():
        if type_ not in ("all", short):
            continue
        message_class = _message_class(type_url)
        found = proxy_resources(view)[type_url]
        if type_url == types.LISTENER:  # gRPC's client listeners are made when asked for
            found = found + [r for t in targets if (r := view.get(type_url, t)) is not None]
        output[sections[short]] = [
            json_format.MessageToDict(r.unpack(message_class), preserving_proto_field_name=True)
            for r in found
        ]
    click.echo(json.dumps(output, indent=2))


def _message_class(type_url: str) -> Any:
    from google.protobuf import symbol_database

    return symbol_database.Default().GetSymbol(type_url.rsplit("/", 1)[-1])


@main.command("bootstrap")
@click.option("--namespace", required=True)
@click.option("--service-account", default="default")
@click.option("--pod", required=True)
@click.option("--pod-ip", required=True)
@click.option("--xds-address", "xds_address_list", multiple=True, callback=_xds_addresses,
              help="Where the server is; repeat it (or give A,B) to list replicas Envoy fails "
                   "over between (at most 16).  [default: 127.0.0.1:15010; with --tls or --grpc "
                   "127.0.0.1:15012, the mutual-TLS port]")
@click.option("--admin-address", default="127.0.0.1:15000", callback=_address,
              help="Envoy admin: keep it on loopback.")
@click.option("--inbound-port", type=int, default=15006)
@click.option("--outbound-port", type=int, default=15001)
@click.option("--label", "labels", multiple=True, help="KEY=VALUE, repeatable.")
@click.option("--sotw", is_flag=True, help="State-of-the-world ADS instead of delta.")
@click.option("--tls", is_flag=True,
              help="Mutual TLS to the server's --xds-tls-address with the certificate `xds-server "
                   "agent` keeps in --cert-dir (file-based SDS: renewals apply without a restart; "
                   "no token in the bootstrap).")
@click.option("--grpc", "grpc_client", is_flag=True,
              help="Write a proxyless gRPC xDS bootstrap (JSON) instead: mutual TLS to the server "
                   "(gRFC A65 channel_creds) and the file_watcher provider, from --cert-dir.")
@click.option("--cert-dir", type=click.Path(file_okay=False, path_type=Path),
              help="The workload agent's directory (`xds-server agent --cert-dir`), absolute.")
@click.option("--server-name", default=None,
              help="The name the server's certificate must carry (SNI and SAN check).  "
                   "[default: the host of --xds-address]")
@click.option("--token-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A bearer token (`xds-server token create`, or a projected service-account "
                   "token) Envoy sends on its xDS streams. The bootstrap then holds a secret; "
                   "prefer --tls, whose certificate the agent renews.")
@click.option("--readiness-port", type=click.IntRange(0, 65535), default=0,
              help="Serve GET /healthz/ready (Envoy's readiness) on this port of every address "
                   "of the pod, for the kubelet's probes; 0: none.")
@click.option("--interception", type=click.Choice(["capture", "explicit"]), default="capture",
              help="How the pod's traffic reaches the sidecar: iptables capture, or the app "
                   "sending to the outbound port (the pod's sidecar.xds-server.io/interception).")
def bootstrap_command(
    namespace: str, service_account: str, pod: str, pod_ip: str, xds_address_list: tuple[str, ...],
    admin_address: str, inbound_port: int, outbound_port: int, labels: tuple[str, ...], sotw: bool,
    tls: bool, grpc_client: bool, cert_dir: Path | None, server_name: str | None,
    token_file: Path | None, readiness_port: int, interception: str,
) -> None:
    """Print an Envoy bootstrap (YAML) for one workload's sidecar, or with --grpc a proxyless
    gRPC xDS bootstrap (JSON)."""
    import json

    import yaml

    from .bootstrap import SidecarSpec, sidecar_bootstrap

    secure = tls or grpc_client
    if secure and cert_dir is None:
        raise click.UsageError("--tls and --grpc need --cert-dir (where `xds-server agent` writes)")
    if cert_dir is not None and not secure:
        raise click.UsageError("--cert-dir goes with --tls (Envoy) or --grpc (proxyless gRPC)")
    if secure and token_file is not None:
        raise click.UsageError("--token-file: with --tls/--grpc the agent's certificate is the "
                               "credential; the token stays with the agent")
    if server_name is not None and not tls:
        raise click.UsageError("--server-name goes with --tls (gRPC checks the host of --xds-address)")
    xds_address = ",".join(xds_address_list) or ("127.0.0.1:15012" if secure else "127.0.0.1:15010")
    if grpc_client:
        if len(xds_address_list) > 1:
            raise click.BadParameter("--grpc takes one address (a name that resolves to the "
                                     "replicas spreads proxyless clients)", param_hint="--xds-address")
        from .grpc_bootstrap import grpc_bootstrap

        assert cert_dir is not None
        try:
            config = grpc_bootstrap(namespace=namespace, service_account=service_account, pod=pod,
                                    pod_ip=pod_ip, xds_address=xds_address,
                                    cert_dir=str(cert_dir.absolute()))
        except (ValueError, ConfigError) as err:
            raise click.UsageError(str(err)) from None
        click.echo(json.dumps(config, indent=2))
        return
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
        readiness_port=readiness_port, interception=interception,
        cert_dir=str(cert_dir.absolute()) if cert_dir is not None else None, server_name=server_name,
    )
    try:
        bootstrap = sidecar_bootstrap(spec)
    except (ValueError, ConfigError) as err:
        text = str(err)
        for hint in ("--readiness-port", "--cert-dir", "--xds-address", "--tls"):
            if text.startswith(hint):
                raise click.BadParameter(text.removeprefix(f"{hint}: "), param_hint=hint) from None
        raise click.BadParameter(text, param_hint="--token-file") from None
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


@main.command("iptables")
@click.option("--outbound-port", type=int, default=15001, help="The sidecar's outbound listener.")
@click.option("--inbound-port", type=int, default=15006, help="The sidecar's inbound listener.")
@click.option("--proxy-uid", type=int, default=1337, help="The sidecar's UID: its traffic is not captured.")
@click.option("--proxy-gid", type=int, default=1337, help="The sidecar's GID: its traffic is not captured.")
@click.option("--include-outbound-cidrs", default="*", help="CIDRs captured outbound ('*': all).")
@click.option("--exclude-outbound-cidrs", default="", help="CIDRs never captured outbound.")
@click.option("--include-outbound-ports", default="*", help="Ports captured outbound ('*': all).")
@click.option("--exclude-outbound-ports", default="", help="Ports never captured outbound.")
@click.option("--include-inbound-ports", default="*", help="Ports captured inbound ('*': all).")
@click.option("--exclude-inbound-ports", default="", help="Ports never captured inbound.")
@click.option("--dry-run", is_flag=True, help="Print the rules (iptables-restore input); change nothing.")
@click.option("--cleanup", is_flag=True, help="Remove the rules instead.")
def iptables_command(dry_run: bool, cleanup: bool, **options: Any) -> None:
    """Capture this network namespace's TCP traffic into the sidecar (as istio-iptables does).

    Outbound connections go to --outbound-port and inbound ones to --inbound-port, except the
    sidecar's own (--proxy-uid/--proxy-gid), loopback, and what is excluded. Running it twice
    leaves the same rules. This is what an injected init container runs.
    """
    from .capture.apply import CaptureError
    from .capture.apply import apply as apply_rules
    from .capture.apply import cleanup as remove_rules
    from .capture.rules import CaptureSettings, nat_rules

    try:
        settings = CaptureSettings.from_options(**options)
        if dry_run:
            click.echo("\n".join(nat_rules(settings)))
        elif cleanup:
            remove_rules()
            click.echo("capture rules removed")
        else:
            rules = apply_rules(settings)
            click.echo(f"capture rules applied ({sum(line.startswith('-A') for line in rules)} rules)")
    except (ConfigError, CaptureError) as err:
        raise click.ClickException(str(err)) from None


@main.command("inject")
@click.option("-f", "--filename", "source", required=True, type=click.File("r", encoding="utf-8"),
              help="Kubernetes YAML (several documents); '-' reads standard input.")
@click.option("-o", "--output", type=click.File("w", encoding="utf-8", atomic=True), default="-",
              help="Where to write the result ('-': standard output).")
@click.option("--proxy-image", default=None, help="The sidecar's image (xds-server, Envoy, iptables).  "
              "[default: xds-server-proxy:<version>]")
@click.option("--init-image", default="", help="The capture init container's image.  [default: --proxy-image]")
@click.option("--xds-address", default=None, callback=lambda c, p, v: v if v is None else _address(c, p, v),
              help="Plaintext xDS, for pods injected without a token (--token-audience '').  "
                   "[default: xds-server.xds-system.svc:15010]")
@click.option("--xds-tls-address", default=None, callback=lambda c, p, v: v if v is None else _address(c, p, v),
              help="The server's mutual-TLS xDS port, for sidecars with the agent.  "
                   "[default: xds-server.xds-system.svc:15012]")
@click.option("--ca-address", default=None, callback=lambda c, p, v: v if v is None else _address(c, p, v),
              help="The server's certificate service (tokens over TLS), for the agent.  "
                   "[default: xds-server.xds-system.svc:15013]")
@click.option("--server-name", default=None,
              help="A name in the server's certificate.  [default: xds-server.xds-system.svc]")
@click.option("--ca-bundle", type=click.File("r", encoding="utf-8"), default=None,
              help="The mesh roots (PEM) the workload agent trusts at first contact; required "
                   "with a token (the webhook's caBundle holds them).")
@click.option("--token-audience", default=None,
              help="Audience of the service-account token the workload agent presents ('' for "
                   "none: no agent, plaintext xDS).  [default: xds-server]")
@click.option("--image-pull-policy", type=click.Choice(["Always", "IfNotPresent", "Never"]),
              default="IfNotPresent")
def inject_command(source: Any, output: Any, proxy_image: str | None, init_image: str,
                   xds_address: str | None, xds_tls_address: str | None, ca_address: str | None,
                   server_name: str | None, ca_bundle: Any, token_audience: str | None,
                   image_pull_policy: str) -> None:
    """Add the Envoy sidecar and its capture init container to workloads (as istioctl kube-inject).

    Pods, Deployments, StatefulSets, DaemonSets, ReplicaSets, ReplicationControllers, Jobs and
    CronJobs are injected (pods annotated sidecar.xds-server.io/inject: "false" and
    hostNetwork pods are left alone); every other object passes through unchanged. Injecting
    an injected workload again replaces what the first injection added.
    """
    import yaml

    from .inject.settings import InjectorSettings
    from .inject.workloads import DocumentError, inject_documents

    defaults = InjectorSettings()
    try:
        settings = InjectorSettings(
            proxy_image=proxy_image or defaults.proxy_image, init_image=init_image,
            xds_address=xds_address or defaults.xds_address,
            xds_tls_address=xds_tls_address or defaults.xds_tls_address,
            ca_address=ca_address or defaults.ca_address,
            server_name=server_name or defaults.server_name,
            ca_bundle_pem=ca_bundle.read() if ca_bundle is not None else "",
            token_audience=defaults.token_audience if token_audience is None else token_audience,
            image_pull_policy=image_pull_policy,
        ).check(require_bundle=True)
    except ConfigError as err:
        raise click.UsageError(str(err)) from None
    name = getattr(source, "name", "input")
    try:
        documents, results = inject_documents(source.read(), settings)
    except DocumentError as err:
        raise click.ClickException(f"{name}: {err}") from None
    except UnicodeDecodeError as err:
        raise click.ClickException(f"{name}: not UTF-8 text ({err.reason})") from None
    output.write(yaml.safe_dump_all(documents, sort_keys=False) if documents else "")
    for result in results:
        if result.outcome is not None and not result.outcome.injected:
            click.echo(f"skipped {result.kind} {result.name}: {result.outcome.reason}", err=True)


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
@click.option("--mode", type=click.Choice(["auto", "capture", "explicit"]), default="auto",
              envvar="XDS_SERVER_DEMO_MODE", show_default=True,
              help="Pods as network namespaces with captured traffic (capture: needs root, "
                   "iproute2, iptables, setpriv), or on loopback addresses (explicit); auto "
                   "captures when it can and says why not otherwise.  [env: XDS_SERVER_DEMO_MODE]")
@click.option("--admin-address", default="127.0.0.1:15014", show_default=True,
              help="The admin API with the live mesh page (/ui; its address and a read token "
                   "are printed); a busy port: any free one; 'off': none.")
@click.pass_context
def demo_command(
    ctx: click.Context, source: Path | None, once: bool, rounds: int | None, requests: int,
    concurrency: int, interval: float, xds_address: str, mode: str, admin_address: str,
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
        requests=requests, concurrency=concurrency, interval=interval, mode=mode,
        admin_address=None if admin_address == "off" else admin_address,
    )
    if not options.source.is_dir():
        raise click.BadParameter(f"{options.source} is not a directory (run from the repository "
                                 "root, or pass --source)", param_hint="--source")
    sys.exit(demo.run(options))


def _register_ca_commands() -> None:
    from .ca.cli import agent, ca, token

    main.add_command(token)
    main.add_command(agent)
    # Its earlier name: same command, kept so existing scripts and pods keep working.
    main.add_command(agent, name="cert-agent")
    main.add_command(ca)


_register_ca_commands()


def _register_shared_commands() -> None:
    from .shared.cli import state_key

    main.add_command(state_key)


_register_shared_commands()


def _register_admin_commands() -> None:
    from .admin.cli import COMMANDS

    for command in COMMANDS:
        main.add_command(command)


_register_admin_commands()


if __name__ == "__main__":
    main()
