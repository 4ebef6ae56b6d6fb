"""ResourceCache, Resource and the views: versions from content, serialization done once and
shared, exact change sets, and what a scoped proxy may see."""

from __future__ import annotations

import pytest

from envoy.service.discovery.v3 import discovery_pb2

from tests.support.xds_client import cluster, endpoints, listener, route
from xds_server.xds import types
from xds_server.xds.cache import Change, FilteredView, FullView, ResourceCache
from xds_server.xds.resource import Resource, content_version, set_version

CDS, EDS, LDS, RDS = types.CLUSTER, types.ENDPOINT, types.LISTENER, types.ROUTE


# Resource -------------------------------------------------------------------------------------------


def test_equal_content_has_equal_version_across_instances_and_caches():
    one, two = ResourceCache(), ResourceCache()
    one.set_type(CDS, [cluster("a"), cluster("b")])
    two.set_type(CDS, [cluster("b"), cluster("a")])  # other order, other cache
    assert one.get(CDS, "a").version == two.get(CDS, "a").version
    assert one.get(CDS, "b").version == two.get(CDS, "b").version
    assert Resource.from_message(cluster("a")).version == one.get(CDS, "a").version


def test_different_content_has_different_version():
    assert Resource.from_message(cluster("a")).version != Resource.from_message(
        cluster("a", connect_timeout_ms=2000)
    ).version
    assert Resource.from_message(cluster("a")).version != Resource.from_message(cluster("b")).version


def test_version_is_a_hash_of_the_deterministic_serialization():
    message = cluster("a")
    resource = Resource.from_message(message)
    assert resource.body == message.SerializeToString(deterministic=True)
    assert resource.version == content_version(resource.body)
    assert len(resource.version) == 16
    assert resource.unpack(type(message)) == message


def test_names_and_type_urls_come_from_the_message():
    assert Resource.from_message(cluster("c")).name == "c"
    assert Resource.from_message(cluster("c")).type_url == CDS
    cla = Resource.from_message(endpoints("svc", 80))
    assert (cla.name, cla.type_url) == ("svc", EDS)  # ClusterLoadAssignment: cluster_name
    assert Resource.from_message(listener("l", 1)).type_url == LDS
    assert Resource.from_message(route("r", "a")).type_url == RDS
    assert Resource.from_message(cluster("c"), name="alias").name == "alias"


def test_pre_encoded_entries_decode_to_the_resource():
    resource = Resource.from_message(cluster("a"))
    sotw = discovery_pb2.DiscoveryResponse.FromString(resource.sotw_entry)
    assert len(sotw.resources) == 1
    assert sotw.resources[0].type_url == CDS
    assert sotw.resources[0].value == resource.body
    delta = discovery_pb2.DeltaDiscoveryResponse.FromString(resource.delta_entry)
    assert len(delta.resources) == 1
    entry = delta.resources[0]
    assert (entry.name, entry.version) == ("a", resource.version)
    assert entry.resource.type_url == CDS and entry.resource.value == resource.body


def test_concatenated_entries_make_one_response():
    a, b = Resource.from_message(cluster("a")), Resource.from_message(cluster("b"))
    header = discovery_pb2.DiscoveryResponse(version_info="v", type_url=CDS, nonce="1")
    response = discovery_pb2.DiscoveryResponse.FromString(
        a.sotw_entry + b.sotw_entry + header.SerializeToString()
    )
    assert [r.value for r in response.resources] == [a.body, b.body]
    assert (response.version_info, response.type_url, response.nonce) == ("v", CDS, "1")


def test_resource_equality_is_by_type_name_and_version():
    a1, a2 = Resource.from_message(cluster("a")), Resource.from_message(cluster("a"))
    assert a1 == a2 and hash(a1) == hash(a2)
    assert a1 != Resource.from_message(cluster("a", connect_timeout_ms=5))
    assert len({a1, a2}) == 1


def test_set_version_depends_on_names_and_versions_not_order():
    assert set_version({"a": "1", "b": "2"}) == set_version({"b": "2", "a": "1"})
    assert set_version({"a": "1", "b": "2"}) != set_version({"a": "1", "b": "3"})
    assert set_version({"a": "1"}) != set_version({"b": "1"})
    assert set_version({"ab": "1"}) != set_version({"a": "b1"})
    assert set_version({}) == set_version({})


# Serialized once, shared ----------------------------------------------------------------------------


def test_resources_are_serialized_once_and_shared_by_every_view():
    cache = ResourceCache()
    cache.set_type(CDS, [cluster("a")])
    stored = cache.get(CDS, "a")
    full_one, full_two = FullView(cache), FullView(cache)
    scoped = FilteredView(cache, "tenant", lambda t, n: True)
    assert full_one.get(CDS, "a") is stored
    assert full_two.get(CDS, "a") is stored
    assert scoped.get(CDS, "a") is stored
    assert next(iter(full_one.visible(CDS))) is stored
    assert scoped.visible(CDS)[0] is stored


def test_rewriting_unchanged_content_keeps_the_same_objects():
    cache = ResourceCache()
    cache.set_type(CDS, [cluster("a"), cluster("b")])
    a, b = cache.get(CDS, "a"), cache.get(CDS, "b")
    change = cache.set_type(CDS, [cluster("a"), cluster("b", connect_timeout_ms=2000)])
    assert change.changed == {"b"}
    assert cache.get(CDS, "a") is a
    assert cache.get(CDS, "b") is not b
    cache.update(CDS, [cluster("a")])
    assert cache.get(CDS, "a") is a


# Change sets ----------------------------------------------------------------------------------------


def test_set_type_reports_changed_and_removed_names():
    cache = ResourceCache()
    seen: list[Change] = []
    cache.add_listener(seen.append)
    first = cache.set_type(CDS, [cluster("a"), cluster("b")])
    assert (first.changed, first.removed) == ({"a", "b"}, frozenset())
    second = cache.set_type(CDS, [cluster("b", connect_timeout_ms=9), cluster("c")])
    assert second.type_url == CDS
    assert second.changed == {"b", "c"}
    assert second.removed == {"a"}
    assert second.names == {"a", "b", "c"}
    assert seen == [first, second]
    assert sorted(cache.resources(CDS)) == ["b", "c"]
    assert cache.get(CDS, "a") is None


def test_writing_the_same_content_is_not_a_change():
    cache = ResourceCache()
    seen: list[Change] = []
    cache.add_listener(seen.append)
    cache.set_type(CDS, [cluster("a")])
    generation = cache.generation(CDS)
    again = cache.set_type(CDS, [cluster("a")])
    assert not again
    assert not cache.update(CDS, [cluster("a")], remove=["never-there"])
    assert cache.generation(CDS) == generation
    assert len(seen) == 1


def test_update_upserts_and_removes_leaving_the_rest():
    cache = ResourceCache()
    cache.set_type(CDS, [cluster("a"), cluster("b"), cluster("c")])
    change = cache.update(CDS, [cluster("b", connect_timeout_ms=7), cluster("d")], remove=["c", "x"])
    assert change.changed == {"b", "d"}
    assert change.removed == {"c"}  # "x" was never there
    assert sorted(cache.resources(CDS)) == ["a", "b", "d"]


def test_update_that_adds_and_removes_the_same_name_reports_removal_only():
    cache = ResourceCache()
    cache.set_type(CDS, [cluster("a")])
    change = cache.update(CDS, [cluster("a", connect_timeout_ms=3)], remove=["a"])
    assert change.changed == frozenset() and change.removed == {"a"}
    assert cache.get(CDS, "a") is None


def test_generation_counts_effective_writes_per_type():
    cache = ResourceCache()
    assert cache.generation(CDS) == 0
    cache.set_type(CDS, [cluster("a")])
    cache.set_type(LDS, [listener("l", 1)])
    cache.update(CDS, [cluster("b")])
    assert cache.generation(CDS) == 2
    assert cache.generation(LDS) == 1
    assert set(cache.type_urls()) == {CDS, LDS}


def test_bad_input_is_rejected():
    cache = ResourceCache()
    with pytest.raises(ValueError, match="duplicate"):
        cache.set_type(CDS, [cluster("a"), cluster("a", connect_timeout_ms=5)])
    with pytest.raises(ValueError, match="not a"):
        cache.set_type(CDS, [listener("l", 1)])
    with pytest.raises(ValueError, match="not a"):
        cache.update(LDS, [cluster("a")])
    assert cache.get(CDS, "a") is None


def test_a_broken_listener_does_not_stop_the_others():
    cache = ResourceCache()
    seen: list[Change] = []

    def broken(change: Change) -> None:
        raise RuntimeError("boom")

    cache.add_listener(broken)
    remove = cache.add_listener(seen.append)
    cache.set_type(CDS, [cluster("a")])
    assert len(seen) == 1
    remove()
    cache.set_type(CDS, [cluster("b")])
    assert len(seen) == 1


def test_readers_get_a_read_only_mapping():
    cache = ResourceCache()
    cache.set_type(CDS, [cluster("a")])
    with pytest.raises(TypeError):
        cache.resources(CDS)["b"] = cache.get(CDS, "a")  # type: ignore[index]
    assert dict(cache.resources(RDS)) == {}


# Views --------------------------------------------------------------------------------------------------


def test_full_view_sees_everything():
    cache = ResourceCache()
    cache.set_type(CDS, [cluster("a"), cluster("b")])
    view = FullView(cache)
    assert sorted(r.name for r in view.visible(CDS)) == ["a", "b"]
    assert view.get(CDS, "a").name == "a"
    assert view.get(CDS, "zzz") is None
    assert view.may_see(CDS, "anything")
    assert FullView(cache).key == view.key  # equal views share a key
    assert FullView(ResourceCache()).key != view.key


def test_filtered_view_hides_what_it_does_not_allow():
    cache = ResourceCache()
    cache.set_type(CDS, [cluster("shop/a"), cluster("bank/b"), cluster("shop/c")])
    view = FilteredView(cache, ("ns", "shop"), lambda t, n: n.startswith("shop/"))
    assert view.key == ("ns", "shop")
    assert sorted(r.name for r in view.visible(CDS)) == ["shop/a", "shop/c"]
    assert view.get(CDS, "shop/a").name == "shop/a"
    assert view.get(CDS, "bank/b") is None  # invisible even when asked for by name
    assert view.may_see(CDS, "shop/new")
    assert not view.may_see(CDS, "bank/b")
    # The view follows the cache: no copy to go stale.
    cache.update(CDS, [cluster("shop/d")], remove=["shop/a"])
    assert sorted(r.name for r in view.visible(CDS)) == ["shop/c", "shop/d"]


def test_filtered_view_predicate_gets_type_and_name():
    cache = ResourceCache()
    cache.set_type(CDS, [cluster("x")])
    cache.set_type(LDS, [listener("x", 1)])
    view = FilteredView(cache, "clusters-only", lambda t, n: t == CDS)
    assert view.get(CDS, "x") is not None
    assert view.get(LDS, "x") is None
    assert list(view.visible(LDS)) == []
