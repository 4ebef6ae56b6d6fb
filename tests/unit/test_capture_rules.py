"""The capture rules as text (capture/rules.py) and how they are applied (capture/apply.py),
without touching the machine: options checked by name, rules in the order that matters, a
refused rule named. The rules' effect is shown in real namespaces by
tests/integration/test_capture_netns.py."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from xds_server.capture.apply import CaptureError, apply, cleanup
from xds_server.capture.rules import CaptureSettings, nat_rules
from xds_server.config import ConfigError


def rules_of(**options: object) -> list[str]:
    return [r for r in nat_rules(CaptureSettings.from_options(**options)) if r.startswith("-A")]  # type: ignore[arg-type]


def test_the_defaults_capture_everything_but_the_proxy_and_loopback() -> None:
    rules = rules_of()
    output = [r for r in rules if r.startswith("-A XDS_OUTPUT")]
    # The sidecar's own traffic and loopback return before anything is redirected.
    redirect = output.index("-A XDS_OUTPUT -p tcp -j XDS_REDIRECT")
    assert output.index("-A XDS_OUTPUT -m owner --uid-owner 1337 -j RETURN") < redirect
    assert output.index("-A XDS_OUTPUT -m owner --gid-owner 1337 -j RETURN") < redirect
    assert output.index("-A XDS_OUTPUT -d 127.0.0.1/32 -j RETURN") < redirect
    assert "-A XDS_REDIRECT -p tcp -j REDIRECT --to-ports 15001" in rules
    assert "-A XDS_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006" in rules
    # The sidecar's own ports are never captured inbound.
    assert "-A XDS_INBOUND -p tcp -m multiport --dports 15006,15001 -j RETURN" in rules
    assert rules[-2:] == ["-A PREROUTING -p tcp -j XDS_INBOUND", "-A OUTPUT -p tcp -j XDS_OUTPUT"]


def test_included_cidrs_and_ports_narrow_the_capture() -> None:
    rules = rules_of(outbound_port=16001, proxy_uid=2000, include_outbound_cidrs="10.96.0.0/12",
                     include_outbound_ports="80,8080", include_inbound_ports="8080")
    assert "-A XDS_OUTPUT -d 10.96.0.0/12 -p tcp -m multiport --dports 80,8080 -j XDS_REDIRECT" in rules
    assert "-A XDS_INBOUND -p tcp -m tcp --dport 8080 -j XDS_IN_REDIRECT" in rules
    assert "-A XDS_REDIRECT -p tcp -j REDIRECT --to-ports 16001" in rules
    assert "-A XDS_OUTPUT -m owner --uid-owner 2000 -j RETURN" in rules
    assert not any(r == "-A XDS_INBOUND -p tcp -j XDS_IN_REDIRECT" for r in rules)


def test_long_port_lists_are_split_for_the_multiport_match() -> None:
    ports = ",".join(str(p) for p in range(9000, 9020))
    rules = [r for r in rules_of(exclude_outbound_ports=ports) if r.startswith("-A XDS_OUTPUT") and "dports" in r]
    assert len(rules) == 2 and all(len(r.split("--dports ")[1].split()[0].split(",")) <= 15 for r in rules)


@pytest.mark.parametrize("options, named", [
    ({"include_outbound_cidrs": "10.0.0.0/8,nope"}, "--include-outbound-cidrs"),
    ({"exclude_outbound_cidrs": "*"}, "--exclude-outbound-cidrs"),
    ({"exclude_outbound_ports": "80,0"}, "--exclude-outbound-ports"),
    ({"include_inbound_ports": "http"}, "--include-inbound-ports"),
    ({"exclude_inbound_ports": "*"}, "--exclude-inbound-ports"),
    ({"inbound_port": 70000}, "--inbound-port"),
    ({"proxy_uid": -1}, "--proxy-uid"),
])
def test_invalid_options_name_the_option(options: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        CaptureSettings.from_options(**options)  # type: ignore[arg-type]


class FakeTools:
    def __init__(self, restore_status: int = 0, restore_output: str = "") -> None:
        self.calls: list[tuple[list[str], str | None]] = []
        self.restore = (restore_status, restore_output)

    def __call__(self, argv: Sequence[str], stdin: str | None) -> tuple[int, str]:
        self.calls.append((list(argv), stdin))
        if argv[0] == "iptables-restore":
            return self.restore
        if "-D" in argv:  # one old jump to remove, then none
            removed = sum(1 for call, _ in self.calls if "-D" in call and call[-1] == argv[-1])
            return (0, "") if removed == 1 else (1, "Bad rule")
        return 0, ""


def test_apply_removes_old_jumps_then_restores_without_flushing_the_table() -> None:
    tools = FakeTools()
    rules = apply(CaptureSettings(), run=tools)
    programs = [argv[0] for argv, _ in tools.calls]
    assert programs[-1] == "iptables-restore" and all(p == "iptables" for p in programs[:-1])
    restore_argv, restore_input = tools.calls[-1]
    assert "--noflush" in restore_argv  # other rules in the namespace are left alone
    assert restore_input == "\n".join(rules) + "\n"
    deletes = [argv for argv, _ in tools.calls if "-D" in argv]
    assert {argv[5] for argv in deletes} == {"PREROUTING", "OUTPUT"}


def test_a_refused_rule_is_named() -> None:
    tools = FakeTools(1, "iptables-restore: line 7 failed")
    with pytest.raises(CaptureError) as caught:
        apply(CaptureSettings(), run=tools)
    rules = nat_rules(CaptureSettings())
    assert "rule 7" in str(caught.value) and rules[6] in str(caught.value)


def test_cleanup_removes_the_jumps_and_the_chains() -> None:
    tools = FakeTools()
    cleanup(run=tools)
    flushed = [argv[-1] for argv, _ in tools.calls if "-F" in argv]
    deleted = [argv[-1] for argv, _ in tools.calls if "-X" in argv]
    assert flushed == deleted == ["XDS_INBOUND", "XDS_IN_REDIRECT", "XDS_OUTPUT", "XDS_REDIRECT"]
