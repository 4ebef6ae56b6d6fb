"""The garbage-collection policy around translation drains (xds_server/gc_policy.py), as the
orchestrator drives it: automatic collection off while a drain runs, young collections
between slices, survivors of a big drain frozen, the collector as it was afterwards."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import pytest

from xds_server.gc_policy import DrainCollector
from xds_server.model.mesh import Service, ServicePort
from xds_server.model.store import MeshStore
from xds_server.translate.controller import MeshController
from xds_server.xds.cache import ResourceCache


@pytest.fixture
def collector_state() -> Iterator[None]:
    enabled = gc.isenabled()
    yield
    gc.unfreeze()
    gc.enable() if enabled else gc.disable()


def test_a_drain_turns_automatic_collection_off_and_back_on(collector_state: None) -> None:
    gc.enable()
    collector = DrainCollector(young=10)
    collector.begin()
    assert not gc.isenabled()
    garbage = [[] for _ in range(50)]
    collector.between_slices()  # over `young`: the youngest generation is collected
    assert gc.get_count()[0] < 50
    del garbage
    collector.end(big=False)
    assert gc.isenabled() and collector.freezes == 0


def test_a_big_drain_freezes_what_survived(collector_state: None) -> None:
    gc.enable()
    frozen = gc.get_freeze_count()
    collector = DrainCollector()
    collector.begin()
    survivors = [{"n": i} for i in range(1000)]
    collector.end(big=True)
    assert gc.isenabled() and collector.freezes == 1
    assert gc.get_freeze_count() >= frozen + len(survivors)


def test_a_disabled_collector_is_left_alone(collector_state: None) -> None:
    gc.disable()
    collector = DrainCollector()
    collector.begin()
    collector.end(big=True)
    assert not gc.isenabled() and collector.freezes == 0  # the operator's choice stands


async def test_the_orchestrator_drives_it_around_a_drain(collector_state: None) -> None:
    gc.enable()
    seen: list[str] = []

    class Spy(DrainCollector):
        def begin(self) -> None:
            seen.append("begin")
            super().begin()

        def end(self, big: bool) -> None:
            seen.append(f"end big={big}")
            super().end(big)

    store, cache = MeshStore(), ResourceCache()
    controller = MeshController(store, cache, collector=Spy())
    controller.start()
    try:
        store.put("test", Service("shop", "web", ports=(ServicePort(80, "http", 8080),)))
        await controller.settled()
        await asyncio.sleep(0)
        assert seen[:2] == ["begin", "end big=False"] and gc.isenabled()
        assert cache.resources("type.googleapis.com/envoy.config.cluster.v3.Cluster")
    finally:
        await controller.stop()
