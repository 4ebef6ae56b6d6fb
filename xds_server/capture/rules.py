"""The capture rules, as `istio-iptables` writes them, for one pod's network namespace.

Outbound: every TCP connection a process of the pod opens goes to the sidecar's outbound port
(15001), except the sidecar's own (its UID or GID, 1337), connections to loopback, and the
excluded CIDRs and ports. Inbound: every TCP connection to the pod goes to the inbound port
(15006), except the excluded ports. The sidecar reads where a connection was going with
`SO_ORIGINAL_DST` and routes by it.

Pure: `CaptureSettings` checks the options (naming the one that is wrong) and `nat_rules()`
returns the `iptables-restore` input. `capture/apply.py` runs it.

The rules live in chains of their own (`XDS_*`), entered from PREROUTING and OUTPUT: applying
replaces those chains whole, so applying twice leaves the same rules.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..config import ConfigError

__all__ = [
    "CHAINS",
    "JUMPS",
    "CaptureSettings",
    "nat_rules",
    "parse_cidrs",
    "parse_ports",
]

INBOUND = "XDS_INBOUND"  # PREROUTING: connections to the pod
IN_REDIRECT = "XDS_IN_REDIRECT"
OUTPUT = "XDS_OUTPUT"  # OUTPUT: connections from the pod's processes
REDIRECT = "XDS_REDIRECT"
CHAINS = (INBOUND, IN_REDIRECT, OUTPUT, REDIRECT)
# The rules that enter our chains from the built-in ones (the only rules outside them).
JUMPS = (("PREROUTING", f"-p tcp -j {INBOUND}"), ("OUTPUT", f"-p tcp -j {OUTPUT}"))

ALL = "*"


def parse_ports(value: str, option: str) -> tuple[int, ...] | None:
    """'80,8080' -> (80, 8080); '*' -> None (every port); '' -> ()."""
    text = value.strip()
    if text == ALL:
        return None
    ports: list[int] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        if not item.isdigit() or not 1 <= int(item) <= 65535:
            raise ConfigError(f"{option}: {item!r} is not a port (1-65535)")
        if int(item) not in ports:
            ports.append(int(item))
    return tuple(ports)


def parse_cidrs(value: str, option: str) -> tuple[ipaddress.IPv4Network, ...] | None:
    """'10.0.0.0/8,192.168.1.1' -> networks; '*' -> None (everything); '' -> ()."""
    text = value.strip()
    if text == ALL:
        return None
    networks: list[ipaddress.IPv4Network] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            network = ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ConfigError(f"{option}: {item!r} is not an IPv4 address or CIDR") from None
        if not isinstance(network, ipaddress.IPv4Network):
            raise ConfigError(f"{option}: {item!r} is IPv6; these rules are IPv4 (iptables)")
        if network not in networks:
            networks.append(network)
    return tuple(networks)


def _port(value: int, option: str) -> int:
    if not 1 <= value <= 65535:
        raise ConfigError(f"{option}: {value} is not a port (1-65535)")
    return value


def _id(value: int, option: str) -> int:
    if not 0 <= value <= 2**32 - 2:
        raise ConfigError(f"{option}: {value} is not a user or group id")
    return value


@dataclass(frozen=True)
class CaptureSettings:
    """What to capture. `None` for a CIDR or port list means "all" (`*`)."""

    outbound_port: int = 15001
    inbound_port: int = 15006
    proxy_uid: int = 1337
    proxy_gid: int = 1337
    include_outbound_cidrs: tuple[ipaddress.IPv4Network, ...] | None = None
    exclude_outbound_cidrs: tuple[ipaddress.IPv4Network, ...] = ()
    include_outbound_ports: tuple[int, ...] | None = None
    exclude_outbound_ports: tuple[int, ...] = ()
    include_inbound_ports: tuple[int, ...] | None = None
    exclude_inbound_ports: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _port(self.outbound_port, "--outbound-port")
        _port(self.inbound_port, "--inbound-port")
        if self.outbound_port == self.inbound_port:
            raise ConfigError("--inbound-port: must differ from --outbound-port")
        _id(self.proxy_uid, "--proxy-uid")
        _id(self.proxy_gid, "--proxy-gid")
        for option, ports in (("--include-outbound-ports", self.include_outbound_ports),
                              ("--exclude-outbound-ports", self.exclude_outbound_ports),
                              ("--include-inbound-ports", self.include_inbound_ports),
                              ("--exclude-inbound-ports", self.exclude_inbound_ports)):
            for port in ports or ():
                _port(port, option)

    @classmethod
    def from_options(
        cls,
        *,
        outbound_port: int = 15001,
        inbound_port: int = 15006,
        proxy_uid: int = 1337,
        proxy_gid: int = 1337,
        include_outbound_cidrs: str = ALL,
        exclude_outbound_cidrs: str = "",
        include_outbound_ports: str = ALL,
        exclude_outbound_ports: str = "",
        include_inbound_ports: str = ALL,
        exclude_inbound_ports: str = "",
    ) -> CaptureSettings:
        """From the command line's text options; raises ConfigError naming the option."""
        exclude_cidrs = parse_cidrs(exclude_outbound_cidrs, "--exclude-outbound-cidrs")
        if exclude_cidrs is None:
            raise ConfigError("--exclude-outbound-cidrs: '*' would capture nothing; "
                              "use --include-outbound-cidrs ''")
        excluded: dict[str, tuple[int, ...]] = {}
        for option, value in (("--exclude-outbound-ports", exclude_outbound_ports),
                              ("--exclude-inbound-ports", exclude_inbound_ports)):
            ports = parse_ports(value, option)
            if ports is None:
                raise ConfigError(f"{option}: '*' is not allowed; use the include option")
            excluded[option] = ports
        return cls(
            outbound_port=outbound_port,
            inbound_port=inbound_port,
            proxy_uid=proxy_uid,
            proxy_gid=proxy_gid,
            include_outbound_cidrs=parse_cidrs(include_outbound_cidrs, "--include-outbound-cidrs"),
            exclude_outbound_cidrs=exclude_cidrs,
            include_outbound_ports=parse_ports(include_outbound_ports, "--include-outbound-ports"),
            exclude_outbound_ports=excluded["--exclude-outbound-ports"],
            include_inbound_ports=parse_ports(include_inbound_ports, "--include-inbound-ports"),
            exclude_inbound_ports=excluded["--exclude-inbound-ports"],
        )


def _ports_match(ports: Sequence[int]) -> Iterable[str]:
    """`--dport` matches, 15 ports at a time (the multiport match's limit)."""
    for start in range(0, len(ports), 15):
        chunk = ports[start:start + 15]
        if len(chunk) == 1:
            yield f"-m tcp --dport {chunk[0]}"
        else:
            yield "-m multiport --dports " + ",".join(str(p) for p in chunk)


def nat_rules(settings: CaptureSettings) -> list[str]:
    """The `nat` table's part, as `iptables-restore --noflush` input (with COMMIT)."""
    s = settings
    lines = ["*nat", *(f":{chain} - [0:0]" for chain in CHAINS)]

    def add(chain: str, rule: str) -> None:
        lines.append(f"-A {chain} {rule}")

    # Inbound: to the inbound port, unless excluded; the sidecar's own ports are never captured
    # (its inbound and outbound listeners: connections to them are already where they go).
    add(IN_REDIRECT, f"-p tcp -j REDIRECT --to-ports {s.inbound_port}")
    for match in _ports_match([s.inbound_port, s.outbound_port, *s.exclude_inbound_ports]):
        add(INBOUND, f"-p tcp {match} -j RETURN")
    if s.include_inbound_ports is None:
        add(INBOUND, f"-p tcp -j {IN_REDIRECT}")
    else:
        for match in _ports_match(list(s.include_inbound_ports)):
            add(INBOUND, f"-p tcp {match} -j {IN_REDIRECT}")

    # Outbound.
    add(REDIRECT, f"-p tcp -j REDIRECT --to-ports {s.outbound_port}")
    # A pod calling itself through its own (non-loopback) IP: its sidecar's inbound side must
    # see that connection, unless the sidecar itself made it.
    add(OUTPUT, f"! -d 127.0.0.1/32 -o lo -m owner --uid-owner {s.proxy_uid} -j RETURN")
    add(OUTPUT, f"! -d 127.0.0.1/32 -o lo -m owner --gid-owner {s.proxy_gid} -j RETURN")
    add(OUTPUT, f"! -d 127.0.0.1/32 -o lo -j {IN_REDIRECT}")
    # The sidecar's own connections (to upstreams, to the control plane) go out as they are.
    add(OUTPUT, f"-m owner --uid-owner {s.proxy_uid} -j RETURN")
    add(OUTPUT, f"-m owner --gid-owner {s.proxy_gid} -j RETURN")
    # Loopback is the pod talking to itself: never captured (no loops through the sidecar).
    add(OUTPUT, "-d 127.0.0.1/32 -j RETURN")
    add(OUTPUT, "-o lo -j RETURN")
    for network in s.exclude_outbound_cidrs:
        add(OUTPUT, f"-d {network} -j RETURN")
    for match in _ports_match(list(s.exclude_outbound_ports)):
        add(OUTPUT, f"-p tcp {match} -j RETURN")
    targets = [f"-d {n} " for n in s.include_outbound_cidrs] \
        if s.include_outbound_cidrs is not None else [""]
    port_matches = [f"{m} " for m in _ports_match(list(s.include_outbound_ports))] \
        if s.include_outbound_ports is not None else [""]
    for target in targets:
        for ports in port_matches:
            add(OUTPUT, f"{target}-p tcp {ports}-j {REDIRECT}".replace("  ", " "))
    for chain, rule in JUMPS:
        add(chain, rule)
    lines.append("COMMIT")
    return lines
