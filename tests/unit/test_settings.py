"""The settings tree (xds_server/settings/): every setting of every settings dataclass is
reachable from one flag and one XDS_SERVER_* variable, the README lists them, the names that
manifests, scripts and users already write keep working, and the one duration grammar."""

from __future__ import annotations

import dataclasses
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from xds_server.admin.settings import AdminSettings
from xds_server.cli import main
from xds_server.config import ConfigError, parse_duration
from xds_server.model.security import SecuritySettings
from xds_server.security import SecurityConfig
from xds_server.settings import ServeSettings, leaves
from xds_server.sources.kubernetes import KubeSettings
from xds_server.sources.leader import LeaderSettings
from xds_server.sources.reading import ReadLimits
from xds_server.translate.scope import ScopeSettings
from xds_server.xds.auth import GuardSettings
from xds_server.inject.settings import WebhookSettings
from xds_server.xds.server import ServerSettings

ROOT = Path(__file__).resolve().parents[2]

# The flags and variables of `serve` before the tree existed: manifests, the README, tests,
# scripts and operators use them.
EXISTING = [
    "--xds-address", "--source", "--default-export-to", "--resources", "--debounce-quiet",
    "--debounce-max", "--max-concurrent-pushes", "--max-concurrent-streams",
    "--max-message-bytes", "--keepalive-time", "--shutdown-grace", "--kubeconfig",
    "--in-cluster", "--kube-namespace-selector", "--admin-address", "--admin-tokens-file",
    "--admin-mtls", "--auth", "--ca-dir", "--trust-domain", "--workload-ttl",
    "--token-audience", "--max-streams-per-identity", "--max-requests-per-second",
    "--mtls-mode", "--root-namespace", "--default-deny", "--log-level", "--log-format",
]


def _options() -> dict[str, click.Option]:
    """Every option of `xds-server` and `xds-server serve`, by flag."""
    options: dict[str, click.Option] = {}
    for command in (main, main.commands["serve"]):
        for param in command.params:
            if isinstance(param, click.Option):
                for flag in param.opts:
                    options[flag] = param
    return options


def test_every_leaf_has_one_flag_and_one_variable() -> None:
    options = _options()
    all_leaves = list(leaves())
    assert len({leaf.flag for leaf in all_leaves}) == len(all_leaves), "a flag used twice"
    assert len({leaf.env for leaf in all_leaves}) == len(all_leaves), "a variable used twice"
    for leaf in all_leaves:
        assert leaf.flag in options, f"{leaf.path} has no flag"
        assert options[leaf.flag].envvar == leaf.env, leaf.path
        assert leaf.env == "XDS_SERVER_" + leaf.flag[2:].upper().replace("-", "_")
        assert leaf.help, f"{leaf.path} has no help"


def test_existing_flags_and_variables_keep_working() -> None:
    options = _options()
    for flag in EXISTING:
        assert flag in options, flag
        assert options[flag].envvar == "XDS_SERVER_" + flag[2:].upper().replace("-", "_")


def test_readme_configuration_table_lists_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Running the server"):readme.index("### Authentication")]
    rows = [line for line in section.splitlines() if line.startswith("| `--")]
    listed = {flag for row in rows for flag in re.findall(r"`(--[a-z0-9-]+)`", row.split("|")[1])}
    variables = {v for row in rows for v in re.findall(r"`(XDS_SERVER_[A-Z0-9_]+)`", row)}
    for leaf in leaves():
        assert leaf.flag in listed, f"README: no row for {leaf.flag}"
        assert leaf.env in variables, f"README: {leaf.env} not listed"


# Every field of every settings dataclass is reachable --------------------------------------

# A value other than the default for every leaf, as an operator would write it.
NON_DEFAULT = {
    "logging.level": "debug", "logging.format": "json",
    "xds.address": "127.0.0.1:25010", "xds.unix_socket": "{tmp}/xds.sock", "xds.debounce_quiet": "50ms", "xds.debounce_max": "2s",
    "xds.max_concurrent_pushes": "10", "xds.slow_write_seconds": "3s",
    "xds.max_concurrent_streams": "16", "xds.max_pending_streams": "100",
    "xds.max_names_per_request": "50", "xds.max_names_per_stream": "70", "xds.max_send_message_bytes": "1000000",
    "xds.max_receive_message_bytes": "2000000", "xds.keepalive_time": "1m",
    "xds.keepalive_timeout": "20s", "xds.min_client_ping_interval": "5s",
    "xds.shutdown_grace": "1s", "xds.first_request_timeout": "3s", "xds.control_plane_id": "cp-1",
    "xds.workers": 3,
    "xds.load_report_interval": "20s",
    "xds.tls_address": "127.0.0.1:25012", "xds.tls_token_address": "127.0.0.1:25013",
    "xds.tls_sans": "xds.example.org", "xds.allow_plaintext_tokens_off_host": True,
    "xds.tls_frontend": "python", "xds.tls_handshake_timeout": "3s",
    "xds.max_stream_opens_per_second": "25", "xds.stream_open_burst": "50",
    "xds.max_initializing_streams": "200", "xds.first_config_timeout": "45s",
    "sources.source": "{tmp}", "sources.resources": "{tmp}",
    "admin.max_body_bytes": "2048", "sources.max_source_file_bytes": "1024", "sources.source_links": "any",
    "scope.default_export_to": ".,shared", "scope.tenant_label": "example.com/tenant",
    "scope.outbound_traffic_policy": "registry_only",
    "kubernetes.kubeconfig": "{kubeconfig}", "kubernetes.in_cluster": False,
    "kubernetes.namespace_selector": "mesh=on", "kubernetes.watch_timeout": "1m",
    "kubernetes.page_size": "100", "kubernetes.list_timeout": "30s",
    "kubernetes.backoff_initial": "1s", "kubernetes.backoff_max": "1m",
    "kubernetes.absent_recheck": "1m", "kubernetes.write_status": False,
    "kubernetes.status_retry": "2s", "kubernetes.leader_election": True,
    "kubernetes.lease_namespace": "ops", "kubernetes.lease_name": "xds-lease",
    "kubernetes.leader_identity": "replica-a", "kubernetes.lease_duration": "30s",
    "kubernetes.renew_deadline": "20s", "kubernetes.retry_period": "5s",
    "auth.mode": "tokens", "auth.token_audiences": "a,b",
    "auth.revocation_check_seconds": "10s",
    "limits.max_streams_per_identity": "5", "limits.max_unverified_streams_per_identity": "3",
    "limits.max_requests_per_second": "7.5",
    "limits.request_burst": "9",
    "ca.ca_dir": "{tmp}/ca", "ca.trust_domain": "example.org", "ca.workload_ttl": "2h",
    "ca.key_algorithm": "rsa-2048", "ca.clock_skew": "1m", "ca.renewal_jitter": "0.2",
    "ca.rotation_startup_grace": "1m", "ca.watch_ca_files": False,
    "ca.ca_secret": "mesh-ca", "ca.ca_plugin_secret": "off",
    "shared.redis_url": "rediss://redis.ops.svc:6380/1", "shared.redis_password_file": "{kubeconfig}",
    "shared.redis_ca_file": "{kubeconfig}", "shared.redis_key_prefix": "cp-b:",
    "shared.redis_timeout": "3s", "shared.state_key_file": "{kubeconfig}",
    "shared.replica_id": "replica-z",
    "mesh.mtls_mode": "strict", "mesh.root_namespace": "mesh-root", "mesh.default_deny": True,
    "admin.address": "127.0.0.1:25014", "admin.tokens_file": "{kubeconfig}",
    "admin.mtls": True, "admin.docs": True, "admin.identity_namespace": "ops",
    "admin.identity_service_account": "xds-admin",
    "webhook.address": "127.0.0.1:25017", "webhook.service": "injector",
    "webhook.namespace": "ops", "webhook.configuration": "injector-config",
    "webhook.proxy_image": "mirror.example/proxy:1", "webhook.init_image": "mirror.example/init:1",
    "webhook.xds_address": "xds.ops.svc:25010",
}
# Fields decided by the app, not by an operator: mTLS is on exactly when certificates can be
# issued (--auth other than none), and the mesh's trust domain is the CA's (--trust-domain).
# Each `--workers` worker binds its ports with SO_REUSEPORT (workers.worker_config), never
# a lone server. Only the demo lets a taken admin port fall back to a free one (it prints the
# address it got); `serve` fails with the flag named.
DERIVED = {(SecuritySettings, "mtls"), (SecuritySettings, "trust_domain"),
           (ServerSettings, "reuse_port"), (AdminSettings, "any_port_if_taken")}


def _flags(tmp_path: Path) -> dict[str, dict[str, Any]]:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("{}")
    flags: dict[str, dict[str, Any]] = {}
    for path, value in NON_DEFAULT.items():
        if isinstance(value, str):
            value = value.format(tmp=tmp_path, kubeconfig=kubeconfig)
        section, name = path.split(".")
        flags.setdefault(section, {})[name] = value
    return flags


def test_every_dataclass_field_is_reachable_from_a_setting(tmp_path: Path) -> None:
    assert set(NON_DEFAULT) == {leaf.path for leaf in leaves()}, "NON_DEFAULT misses a leaf"
    settings = ServeSettings.load(_flags(tmp_path), environ={})
    for leaf in leaves():
        section = getattr(settings, leaf.section)
        assert getattr(section, leaf.name) != leaf.default or (leaf.kind == "flag" and \
            getattr(section, leaf.name) is not None), leaf.path
    config = settings.app_config()
    assert config.kubernetes is not None and config.kubernetes.watch is not None
    assert config.admin is not None and config.security is not None
    assert config.webhook is not None
    shared = config.security.shared
    assert shared is not None and shared.replica == "replica-z"
    assert (shared.redis.url, shared.redis.key_prefix, shared.redis.timeout) == (
        "rediss://redis.ops.svc:6380/1", "cp-b:", 3.0)
    injector = config.webhook.injector
    assert (injector.proxy_image, injector.init_image, injector.xds_address) == (
        "mirror.example/proxy:1", "mirror.example/init:1", "xds.ops.svc:25010")
    assert injector.token_audience == "a"  # the first --token-audience
    assert config.load_reports.interval == 20.0  # LRS's other bounds are fixed, documented
    built = [
        (config.webhook, WebhookSettings()),
        (config.server, ServerSettings()), (config.security.limits, GuardSettings()),
        (config.security, SecurityConfig()), (config.admin, AdminSettings()),
        (config.scope, ScopeSettings()), (config.mesh_security, SecuritySettings()),
        (config.kubernetes.watch, KubeSettings()),
        (config.kubernetes.watch.leader, LeaderSettings()),
        (config.source_limits, ReadLimits()),
    ]
    for value, default in built:
        for field in dataclasses.fields(default):
            if (type(default), field.name) in DERIVED or field.name == "leader":
                continue
            if type(default) is LeaderSettings and field.name == "namespace":
                # the Lease namespace is resolved at start (--lease-namespace or the pod's)
                assert config.kubernetes.lease_namespace == "ops"
                continue
            assert getattr(value, field.name) != getattr(default, field.name), \
                f"{type(default).__name__}.{field.name} cannot be set"


def test_tree_defaults_are_the_dataclass_defaults(monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("{}")
    config = ServeSettings.load({"auth": {"mode": "none"},
                                 "kubernetes": {"kubeconfig": str(kubeconfig)}},
                                environ={}).app_config()
    # xDS over TLS is served by `serve` on loopback by default; the library's ServerSettings
    # serves no TLS unless told (tests and embedders would otherwise all bind 15012).
    assert (config.server.tls_address, config.server.tls_token_address) == (
        "127.0.0.1:15012", "127.0.0.1:15013")
    assert dataclasses.replace(config.server, tls_address=None,
                               tls_token_address=None) == ServerSettings()
    assert config.security == SecurityConfig(auth=config.security.auth)
    assert config.admin == AdminSettings() and config.scope == ScopeSettings()
    assert config.mesh_security == SecuritySettings()
    watch = config.kubernetes.watch
    assert dataclasses.replace(watch, leader=None) == dataclasses.replace(KubeSettings(),
                                                                          leader=None)
    assert dataclasses.replace(watch.leader, identity="x") == \
        dataclasses.replace(LeaderSettings(), identity="x")


# Flags, variables and errors ----------------------------------------------------------------


def test_flags_win_over_variables_and_variables_over_defaults(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDS_SERVER_DEBOUNCE_QUIET", "0.02")
    monkeypatch.setenv("XDS_SERVER_SHUTDOWN_GRACE", "9")
    monkeypatch.setenv("XDS_SERVER_IN_CLUSTER", "true")
    monkeypatch.setenv("XDS_SERVER_TOKEN_AUDIENCE", "one two")
    monkeypatch.setenv("XDS_SERVER_MTLS_MODE", "strict")
    monkeypatch.setenv("XDS_SERVER_WORKLOAD_TTL", "2D")
    monkeypatch.setenv("XDS_SERVER_KEY_ALGORITHM", "RSA-2048")  # choices in any case
    settings = ServeSettings.load({"xds": {"shutdown_grace": "2"}})
    assert settings.ca.key_algorithm.value == "rsa-2048"
    assert settings.xds.debounce_quiet == 0.02 and settings.xds.shutdown_grace == 2.0
    assert settings.kubernetes.in_cluster
    assert settings.auth.token_audiences == ("one", "two")
    assert settings.mesh.mtls_mode.value == "STRICT"
    assert settings.ca.workload_ttl == timedelta(days=2)
    assert settings.xds.keepalive_time == ServerSettings().keepalive_time


def test_admin_address_off_turns_the_admin_api_off() -> None:
    settings = ServeSettings.load({"admin": {"address": "off"}, "auth": {"mode": "none"}},
                                  environ={})
    assert settings.admin.address is None and settings.app_config().admin is None


def test_bad_values_are_refused_naming_flag_and_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDS_SERVER_KEEPALIVE_TIME", "often")
    with pytest.raises(ConfigError) as err:
        ServeSettings.load({"ca": {"workload_ttl": "soon"}, "xds": {"address": "nowhere"}})
    message = str(err.value)
    assert "--workload-ttl / XDS_SERVER_WORKLOAD_TTL: invalid duration 'soon'" in message
    assert "--keepalive-time / XDS_SERVER_KEEPALIVE_TIME: invalid duration 'often'" in message
    assert "--xds-address / XDS_SERVER_XDS_ADDRESS: expected HOST:PORT" in message


def test_serve_refuses_bad_settings_as_usage_errors(monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    monkeypatch.delenv("XDS_SERVER_AUTH", raising=False)
    missing = CliRunner().invoke(main, ["serve"])
    assert missing.exit_code == 2 and "--auth" in missing.output
    both = CliRunner().invoke(main, ["serve", "--auth", "none", "--in-cluster",
                                     "--kubeconfig", str(ROOT / "README.md")])
    assert both.exit_code == 2
    assert "--kubeconfig and --in-cluster exclude each other" in both.output
    alone = CliRunner().invoke(main, ["serve", "--auth", "none",
                                      "--kube-namespace-selector", "a=b"])
    assert alone.exit_code == 2 and "needs --kubeconfig or --in-cluster" in alone.output
    lease = CliRunner().invoke(main, ["serve", "--auth", "none", "--lease-duration", "5s"])
    assert lease.exit_code == 2 and "--lease-duration" in lease.output
    absent = CliRunner().invoke(main, ["serve", "--auth", "none", "--source", str(tmp_path / "no")])
    assert absent.exit_code == 2 and "--source / XDS_SERVER_SOURCE" in absent.output


# The one duration grammar -------------------------------------------------------------------


@pytest.mark.parametrize("text, seconds", [
    ("1.5s", 1.5), ("100ms", 0.1), ("1h30m", 5400.0), ("2m", 120.0), ("0s", 0.0), (5, 5.0),
    (0.25, 0.25),
])
def test_durations_in_both_forms(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)
    assert parse_duration(text, settings_form=True) == pytest.approx(seconds)


@pytest.mark.parametrize("text, seconds", [("7d", 604800.0), ("24H", 86400.0), ("4", 4.0),
                                           (" 90s ", 90.0), ("0.02", 0.02)])
def test_settings_form_also_takes_days_any_case_and_plain_seconds(text: str,
                                                                  seconds: float) -> None:
    assert parse_duration(text, settings_form=True) == pytest.approx(seconds)
    if text.strip() not in ("90s",):
        with pytest.raises(ConfigError):
            parse_duration(text)  # API objects: the Gateway API / Go form only


@pytest.mark.parametrize("bad", ["", "h", "24x", "1h 30m", "-1h", "1.s", True, -1, [], None])
def test_bad_durations_are_refused_naming_the_setting(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"^--ttl: "):
        parse_duration(bad, setting="--ttl", settings_form=True)
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_the_webhook_needs_the_mesh_ca() -> None:
    with pytest.raises(ConfigError, match="--webhook-address: the webhook's certificate"):
        ServeSettings.load({"webhook": {"address": "127.0.0.1:0"}, "auth": {"mode": "none"}},
                           environ={}).app_config()
    off = ServeSettings.load({"auth": {"mode": "tokens"}}, environ={}).app_config()
    assert off.webhook is None  # off unless asked for: it needs a port and the CA
