"""Capture mode's pod-IP chains (translate/capture.py PodIpChains) kept incrementally give
exactly what a fresh build of the same entries gives, whichever path a change takes (a few
entries in place, many at once), and one chain per address and port (Envoy refuses two)."""

from __future__ import annotations

import random

from envoy.config.listener.v3 import listener_pb2

from xds_server.translate.capture import PASSTHROUGH, PASSTHROUGH_MTLS, PodIpChains, PodIp


def fresh(entries: list[PodIp]) -> bytes:
    chains = PodIpChains()
    chains.update((), entries)
    return chains.encode()


def chains_of(encoded: bytes) -> dict[str, tuple[int, list[str], str]]:
    out = {}
    for chain in listener_pb2.Listener.FromString(encoded).filter_chains:
        match = chain.filter_chain_match
        proxy = chain.filters[0].typed_config.value
        cluster = PASSTHROUGH_MTLS if PASSTHROUGH_MTLS.encode() in proxy else PASSTHROUGH
        out[chain.name] = (match.destination_port.value, [r.address_prefix for r in match.prefix_ranges], cluster)
    return out


def test_incremental_changes_equal_a_fresh_build() -> None:
    rng = random.Random(7)
    pool = [(f"10.0.{i // 200}.{i % 200}", rng.choice((8080, 9090)), rng.random() < 0.7) for i in range(2000)]
    held: list[PodIp] = []
    chains = PodIpChains()
    for _ in range(40):
        removed = rng.sample(held, min(len(held), rng.choice((1, 3, 200))))
        for entry in removed:
            held.remove(entry)
        added = rng.sample(pool, rng.choice((1, 5, 300)))
        held += added
        chains.update(removed, added)
        assert chains.encode() == fresh(held)


def test_an_address_counted_with_and_without_mtls_gets_one_chain_with_mtls() -> None:
    chains = PodIpChains()
    chains.update((), [("10.0.0.1", 80, False), ("10.0.0.2", 80, False)])
    chains.update((), [("10.0.0.1", 80, True)])  # another service says it accepts mTLS
    assert chains_of(chains.encode()) == {
        "pod-ips_80": (80, ["10.0.0.2"], PASSTHROUGH),
        "pod-ips_80_mtls": (80, ["10.0.0.1"], PASSTHROUGH_MTLS),
    }
    chains.update([("10.0.0.1", 80, True)], ())
    assert chains_of(chains.encode()) == {"pod-ips_80": (80, ["10.0.0.1", "10.0.0.2"], PASSTHROUGH)}
    chains.update([("10.0.0.1", 80, False), ("10.0.0.2", 80, False)], ())
    assert chains.encode() == b"" and len(chains) == 0
