from __future__ import annotations

import asyncio
import re

import pytest
import redis
import redis.asyncio as aredis

from core.schema import EntityType
from core.settings import Settings
from features.keys import RedisKeys
from features.redis_store import RedisStore, StoreUnavailable, redact_url

pytestmark = pytest.mark.integration


def test_every_key_is_namespaced() -> None:
    keys = RedisKeys("ns-1")
    built = [
        keys.item("i1"),
        keys.user("u1"),
        keys.items_all(),
        keys.items_active(),
        keys.users_all(),
        keys.creator_items("c1"),
        keys.following("u1"),
        keys.followers("u1"),
        keys.edge_count(),
        keys.stream_events(),
        keys.stream_impressions(),
        keys.exclusions("u1"),
        keys.blocked_creators("u1"),
        keys.removed_items(),
        keys.blocked_items(),
        keys.blocked_creators_global(),
        keys.erased_users(),
        keys.processed_events("users", 29_000_000),
        keys.processed_events("items", 29_000_000),
        keys.processed_events("users", 29_000_001),
        keys.features(EntityType.ITEM, "i1"),
        keys.feature_state("user", "u1"),
    ]
    assert all(k.startswith("ns-1:") for k in built)
    assert len(set(built)) == len(built)
    assert keys.pattern() == "ns-1:*"
    assert keys.stream_events() == "ns-1:stream:events"
    # An id holding ':' cannot build another kind's key.
    assert keys.user("x:following") != keys.following("x")


def test_bad_namespace_and_empty_id_are_refused() -> None:
    with pytest.raises(ValueError, match="namespace"):
        RedisKeys("Bad:NS")
    with pytest.raises(ValueError, match="empty id"):
        RedisKeys("ok").item("")


def test_keys_written_are_in_the_namespace(store: RedisStore) -> None:
    store.mset_json({store.keys.item("i1"): {"a": 1}})
    store.sadd_many({store.keys.items_all(): ["i1"]})
    found = sorted(store.client.scan_iter(match=store.keys.pattern()))
    assert found == sorted([store.keys.item("i1"), store.keys.items_all()])


def test_mset_mget_round_trip_across_chunks(store: RedisStore) -> None:
    records = {
        store.keys.item(f"i{n}"): {"item_id": f"i{n}", "n": n, "tags": ["a", "é"]} for n in range(2500)
    }
    store.mset_json(records, chunk=1000)
    wanted = [*records, store.keys.item("missing")]
    got = store.mget_json(wanted, chunk=700)
    assert got[:-1] == list(records.values())
    assert got[-1] is None
    assert store.mget_json([]) == []


def test_async_mget(store: RedisStore) -> None:
    store.mset_json({store.keys.item("a"): {"x": 1}})

    async def read() -> list[dict[str, object] | None]:
        try:
            await store.aping()
            return await store.amget_json([store.keys.item("a"), store.keys.item("b")])
        finally:
            await store.aclient.aclose()
            await store.apool.disconnect()

    assert asyncio.run(read()) == [{"x": 1}, None]


def test_sets_in_one_pipeline(store: RedisStore) -> None:
    k1, k2, k3 = store.keys.following("u1"), store.keys.following("u2"), store.keys.following("u3")
    added = store.sadd_many({k1: ["a", "b"], k2: [f"m{n}" for n in range(2100)], k3: []})
    assert added == 2102
    assert store.sadd_many({k1: ["a"]}) == 0
    first, second, third = store.smembers_many([k1, k2, k3])
    assert first == {"a", "b"}
    assert len(second) == 2100
    assert third == set()


def test_delete_namespace_keeps_other_namespaces(store: RedisStore, redis_settings: Settings) -> None:
    other = RedisStore(redis_settings.redis_url, f"{redis_settings.namespace}-other")
    try:
        store.mset_json({store.keys.item(f"i{n}"): {"n": n} for n in range(2500)})
        other.mset_json({other.keys.item("keep"): {"n": 1}})
        assert store.delete_namespace(batch=500) == 2500
        assert list(store.client.scan_iter(match=store.keys.pattern())) == []
        assert other.mget_json([other.keys.item("keep")]) == [{"n": 1}]
    finally:
        other.delete_namespace()
        other.close()


def test_eval_many_answers_as_eval_does(store: RedisStore) -> None:
    script = "return {#KEYS, ARGV[1], tonumber(ARGV[2]) + 1, {ARGV[#ARGV]}}"
    args: list[str | bytes | int] = ["k1", "k2", "é", 41, *(str(i) for i in range(5000)), b"last"]
    assert store.eval_many(script, 2, *args) == store.client.eval(script, 2, *args) == [2, "é", 42, ["last"]]
    with pytest.raises(redis.ResponseError):
        store.eval_many("return redis.error_reply('refused')", 0)
    assert store.eval_many("return 1", 0) == 1  # the connection is still good


def test_unreachable_redis_names_the_url() -> None:
    url = "redis://127.0.0.1:6399/0"
    unreachable = RedisStore(url, "test-down", timeout_s=0.5)
    try:
        with pytest.raises(StoreUnavailable, match=re.escape(url)):
            unreachable.ping()
        with pytest.raises(StoreUnavailable, match="6399"):
            unreachable.mget_json([unreachable.keys.item("x")])
    finally:
        unreachable.close()


def test_password_is_never_shown() -> None:
    assert redact_url("redis://user:s3cret@host:6380/1") == "redis://user:***@host:6380/1"
    assert "s3cret" not in repr(RedisStore("redis://:s3cret@127.0.0.1:6399/0", "x"))


def test_async_commands_are_packed_as_redis_py_packs_them() -> None:
    store = RedisStore("redis://127.0.0.1:6379/0", "pack-test")
    try:
        connection = store.apool.connection_class()
        reference = aredis.Connection()
        for args in [
            ("MGET", "a", "b", "héllo"),
            ("SET", "k", 0.1 + 0.2),
            ("INCRBY", "k", 12345678901234567890),
            ("CONFIG GET", "maxmemory"),
            ("SET", b"k", bytearray(b"v"), memoryview(b"w")),
        ]:
            assert b"".join(connection.pack_command(*args)) == b"".join(reference.pack_command(*args)), args
    finally:
        store.close()
