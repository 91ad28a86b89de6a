"""The Lua state machine on the real Redis (no broker): transitions, ordering, leases, purge."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import re
from pathlib import Path

import orjson
import pytest

from hbbus.ops import alive_for_ms
from hbbus.store import RECORD_FIELDS, Store, StoreConfig, decode_record, encode_record
from hbbus.wire import Heartbeat
from tests.helpers import wait_until


@pytest.fixture
async def store(settings):
    s = Store.from_settings(settings, StoreConfig(lease_ms=200, retention_ms=400))
    yield s
    await s.close()


CAUGHT_UP = 2**50  # a probe stamp "from the future": the store caps it at Redis time


async def claim(store):
    """The reaper's step, as an aggregator "t" that has just applied a fresh probe."""
    await store.ingest([], "t", CAUGHT_UP)
    return await store.claim()


def hb(seq, inc="i1", status="ok", inst="a", meta=None):
    return Heartbeat("svc", inst, inc, seq, 100, 2, 0, status, meta or {})


async def ingest(store, *beats, ttl_ms=200, publish=True):
    """Apply heartbeats; with ``publish``, finalise the events handed out, as a publisher would."""
    # as an aggregator that has caught up with everything (a probe stamped far ahead)
    stale, events = await store.ingest([(b, 100, ttl_ms) for b in beats], "t", CAUGHT_UP)
    if publish:
        await store.finalize(e.id for e in events)
    return stale, events


def kinds(events):
    return [e.routing_key.split(".")[0] for e in events]


async def test_join_then_stale_and_duplicate_seqs_are_ignored(store):
    stale, events = await ingest(store, hb(5))
    assert (stale, kinds(events)) == (0, ["joined"])
    stale, events = await ingest(store, hb(5), hb(4), hb(6))
    assert stale == 2 and events == []
    record = await store.record("svc", "a")
    assert record["seq"] == "6" and record["state"] == "alive"
    assert alive_for_ms(record, await store.time_ms())


async def test_restart_and_old_incarnation_reordered(store):
    await ingest(store, hb(10, "i1"))
    _, events = await ingest(store, hb(1, "i2"))
    assert kinds(events) == ["restarted"]
    stale, events = await ingest(store, hb(11, "i1"))  # late message of the old process
    assert stale == 1 and events == []
    assert (await store.record("svc", "a"))["inc"] == "i2"


async def test_dead_recovered_left_and_purge(store):
    await ingest(store, hb(1))
    result = await wait_until(lambda: _claim_kind(store, "dead"), 3, "dead")
    event = result[0]
    assert event.routing_key == "dead.svc.a"
    assert alive_for_ms(await store.record("svc", "a"), await store.time_ms()) is None
    _, events = await ingest(store, hb(2))
    assert kinds(events) == ["recovered"]
    _, events = await ingest(store, hb(3, status="left"))
    assert kinds(events) == ["left"]
    _, events = await ingest(store, hb(4, status="left"))
    assert events == []  # a second `left` is not a transition
    # a left record is purged after its retention
    await wait_until(lambda: _gone(store), 5, "purge after retention")
    assert not await store.redis.hexists(store.names.bucket_key("svc", "a"), "svc/a")
    assert await store.records() == []


async def _claim_kind(store, kind):
    result = await claim(store)
    await store.finalize(e.id for e in result.events)
    return [e for e in result.events if e.routing_key.startswith(kind + ".")]


async def _gone(store):
    await claim(store)
    return await store.record("svc", "a") is None


async def test_left_of_unknown_instance_creates_nothing(store):
    stale, events = await ingest(store, hb(1, status="left"))
    assert stale == 1 and events == [] and await store.record("svc", "a") is None


async def test_unpublished_event_is_claimed_again_with_same_id(store):
    _, events = await ingest(store, hb(1), publish=False)
    first = events[0]
    result = await claim(store)
    assert first.id not in [e.id for e in result.events]  # lease still held
    await asyncio.sleep(0.25)
    result = await claim(store)
    again = [e for e in result.events if e.id == first.id]
    assert again and again[0].body == first.body
    await store.finalize([first.id])
    assert first.id not in await store.redis.hkeys(store.names.outbox_body_key)


async def test_each_transition_has_a_growing_ord_and_history(store):
    await ingest(store, hb(1))
    await ingest(store, hb(1, "i2"))
    await ingest(store, hb(2, "i2", status="left"))
    history = await store.history("svc", "a")
    assert [h["kind"] for h in history] == ["left", "restarted", "joined"]
    ords = [h["ord"] for h in reversed(history)]
    assert ords == sorted(ords) and len(set(ords)) == 3
    assert [e["kind"] for e in await store.recent_events()] == ["joined", "restarted", "left"]


async def test_history_keeps_the_newest_transitions_whole(settings):
    store = Store.from_settings(settings, StoreConfig(history_len=3))
    try:
        events = (await ingest(store, hb(1, "i0", meta={"n": 0})))[1]  # joined
        assert not await store.redis.exists(store.names.history_key("svc", "a"))  # one line
        for n in range(1, 5):  # four restarts
            events += (await ingest(store, hb(1, f"i{n}", meta={"n": n})))[1]
        history = await store.history("svc", "a")
        assert [h["incarnation"] for h in history] == ["i4", "i3", "i2"]

        # the newest line is in the record, the older ones in the history key
        async def dead() -> bool:  # suspect, then dead: every claimed event kept
            result = await claim(store)
            await store.finalize(e.id for e in result.events)
            events.extend(result.events)
            return "dead" in kinds(events)

        await wait_until(dead, 3, "dead")
        history = await store.history("svc", "a")
        assert [h["kind"] for h in history] == ["dead", "suspect", "restarted"]
        assert len(await store.history("svc", "a", count=2)) == 2
        published = [orjson.loads(e.body) for e in reversed(events)][:3]
        for event in published:
            del event["meta"]  # the history keeps no meta; every other field is as published
        assert history == published
        assert history[0]["last_seen_ms"] < history[0]["at_ms"] <= history[0]["ord"]
        assert (await store.record("svc", "a"))["meta"] == '{"n":4}'
    finally:
        await store.close()


async def test_forget(store):
    await ingest(store, hb(1, meta={"endpoint": "x"}))
    assert await store.forget("svc", "a")
    assert await store.record("svc", "a") is None
    assert not await store.forget("svc", "a")
    assert await store.deadline("svc", "a") is None


async def test_forget_leaves_no_key_behind(store):
    await ingest(store, hb(1, meta={"endpoint": "x"}))
    await ingest(store, hb(1, "i2"))
    assert await store.forget("svc", "a")
    assert await store.redis.keys(store.names.key_prefix + "*svc/a") == []


async def test_a_record_of_the_earlier_layout_is_read_and_moved_with_its_history(store):
    """A namespace written by the layout before packed records (a hash per instance, meta,
    alive and history keys, the set of instances): read where it is, moved into its bucket by
    the first script that reads it, with its meta and its history, and no old key left."""
    n, now = store.names, await store.time_ms()
    old = {
        "svc": "svc",
        "inst": "a",
        "state": "alive",
        "inc": "i1",
        "seq": "4",
        "ord": now,
        "last": now,
        "ttl": 200,
        "ivl": 100,
        "dttl": 200,
        "status": "ok",
        "first": now,
        "since": now,
        "pub": "alive",
        "held": "",
    }
    lines = [
        f"{'e' * 24} recovered dead i1 4 {now} {now} {now} 200 -",
        f"{'d' * 24} joined none i1 1 {now - 9} {now - 9} {now - 9} 200 -",
    ]
    await store.redis.hset(n.record_key("svc", "a"), mapping=old)
    await store.redis.set(n.meta_key("svc", "a"), '{"endpoint":"x"}')
    await store.redis.set(n.alive_key("svc", "a"), 1, px=200)
    await store.redis.set(n.history_key("svc", "a"), "\n".join(lines))
    await store.redis.sadd(n.instances_key, "svc/a")
    await store.redis.sadd(n.service_members_key("svc"), "svc/a")
    await store.redis.zadd(n.deadlines_key, {"svc/a": now + 200})
    assert (await store.record("svc", "a"))["meta"] == '{"endpoint":"x"}'
    assert [r["inst"] for r in await store.records()] == ["a"]
    assert [e["kind"] for e in await store.history("svc", "a")] == ["recovered", "joined"]
    await store.ingest([], "t", 0)  # the first script call moves the whole namespace
    for key in ("record_key", "meta_key", "alive_key"):
        assert not await store.redis.exists(getattr(n, key)("svc", "a")), key
    for key in (n.instances_key, n.service_members_key("svc"), n.deadlines_key):
        assert not await store.redis.exists(key), key
    assert await store.deadline("svc", "a") == now + 200
    await index_agrees(store)
    assert await store.redis.hexists(n.bucket_key("svc", "a"), "svc/a")
    assert await store.redis.hgetall(n.key_prefix + "scopes") == {"service:svc": "1"}
    assert [e["kind"] for e in await store.history("svc", "a")] == ["recovered", "joined"]
    dead = await wait_until(lambda: _claim_kind(store, "dead"), 3, "dead")  # TTL 200 ms
    assert [orjson.loads(e.body)["meta"] for e in dead] == [{"endpoint": "x"}]
    await store.finalize(e.id for e in dead)
    assert await store.redis.zscore(n.notalive_key, "svc/a") is not None
    assert await store.redis.hgetall(n.key_prefix + "scopes") == {}
    record = await store.record("svc", "a")
    assert (record["state"], record["seq"], record["meta"]) == ("dead", "4", '{"endpoint":"x"}')
    history = await store.history("svc", "a")
    assert [e["kind"] for e in history] == ["dead", "recovered", "joined"]
    _, events = await ingest(store, hb(5, "i1", meta={"endpoint": "y"}))
    assert kinds(events) == ["recovered"]
    assert (await store.record("svc", "a"))["meta"] == '{"endpoint":"y"}'
    assert await store.forget("svc", "a")
    assert await store.redis.keys(n.key_prefix + "*svc/a") == []
    assert not await store.redis.hexists(n.bucket_key("svc", "a"), "svc/a")


async def scope_counts(store: Store) -> dict[str, int]:
    """How many instances of each scope are alive or suspect, from the records themselves."""
    counts: dict[str, int] = {}
    for r in await store.records():
        if r["state"] in ("alive", "suspect"):
            for scope in (f"service:{r['svc']}", f"zone:{r['zone']}" if r.get("zone") else ""):
                if scope:
                    counts[scope] = counts.get(scope, 0) + 1
    return counts


async def redis_clock_moved(store: Store) -> None:
    """Until Redis time is past the current millisecond: the next call's NOW is later."""
    start = await store.time_ms()

    async def later() -> bool:
        return await store.time_ms() > start

    await wait_until(later, 2, "Redis time to move on")


async def bucket_minimums(store: Store) -> tuple[dict[str, int], dict[str, int]]:
    """K_DLMIN's entries, and each bucket's earliest deadline."""
    n = store.names
    mins = {b: int(at) for b, at in await store.redis.zrange(n.dlmin_key, 0, -1, withscores=True)}
    prefix = n.key_prefix + "dl:"
    found = {}
    pattern = prefix.replace("{", "\\{").replace("}", "\\}") + "*"
    async for key in store.redis.scan_iter(match=pattern):
        first = await store.redis.zrange(key, 0, 0, withscores=True)
        if first:
            found[key[len(prefix) :]] = int(first[0][1])
    return mins, found


async def index_agrees(store: Store) -> None:
    """K_DLMIN names every bucket with a deadline and no other, never later than the bucket's
    earliest deadline (that would miss it), and its first entry is exact after a claim."""
    mins, found = await bucket_minimums(store)
    assert set(mins) == set(found)
    late = {b: (mins[b], found[b]) for b in found if mins[b] > found[b]}
    assert not late, late
    if found:
        await claim(store)
        mins, found = await bucket_minimums(store)
        assert min(mins.values()) == min(found.values())


async def test_the_deadline_index_follows_joins_deaths_purges_and_forgets(store):
    """Sixty instances spread over buckets: the per-bucket minimums stay exact while they
    join, some die and are purged after their retention, one is forgotten; the claim names
    the earliest deadline."""
    steady = [hb(1, inst=f"s{k}") for k in range(50)]
    _, events = await store.ingest([(b, 1_000, 5_000) for b in steady], "t", CAUGHT_UP)
    await store.finalize(e.id for e in events)
    await ingest(store, *[hb(1, inst=f"d{k}") for k in range(10)])  # TTL 200 ms
    assert await store.instance_count() == 60
    await index_agrees(store)
    await redis_clock_moved(store)
    again = [hb(2, inst=f"s{k}") for k in range(50)]  # moves their deadlines later
    await store.ingest([(b, 1_000, 5_000) for b in again], "t", CAUGHT_UP)
    mins, found = await bucket_minimums(store)
    assert any(mins[b] < found[b] for b in found), "heartbeats leave buckets early"
    await index_agrees(store)
    assert await store.forget("svc", "s0")
    await index_agrees(store)

    async def purged() -> bool:
        await claim(store)
        await index_agrees(store)
        return await store.instance_count() == 49

    await wait_until(purged, 5, "the dead purged after their retention")
    result = await claim(store)
    deadlines = [await store.deadline("svc", f"s{k}") for k in range(1, 50)]
    assert result.next_due_ms == min(d for d in deadlines if d is not None)


async def test_a_steady_heartbeat_that_moves_a_deadline_earlier_lowers_its_bucket(store):
    """A steady heartbeat usually moves its instance's deadline later, which leaves the
    bucket's entry in ``dlmin`` right as it is. When the deadline it replaces was later
    still (a grace period after the observer recovered), the entry must come down with it,
    else the death would be found late."""
    await ingest(store, hb(1), ttl_ms=5_000)
    n, bucket = store.names, store.names.bucket("svc", "a")
    far = await store.time_ms() + 3_600_000  # as a grace period would leave it
    await store.redis.zadd(n.deadline_key("svc", "a"), {"svc/a": far})
    await store.redis.zadd(n.dlmin_key, {bucket: far})
    await ingest(store, hb(2), ttl_ms=5_000)  # steady: the short path
    deadline = await store.deadline("svc", "a")
    assert deadline is not None and deadline < far
    assert await store.redis.zscore(n.dlmin_key, bucket) <= deadline
    await index_agrees(store)


async def test_the_guard_s_counts_follow_every_transition(store):
    """K_SCOPES (alive or suspect per service and zone) equals a count of the records after
    joins, a zone move, suspicion, deaths, a recovery, a departure, a purge and a forget."""
    stored = store.names.key_prefix + "scopes"

    async def agree() -> dict[str, int]:
        counted = {k: int(v) for k, v in (await store.redis.hgetall(stored)).items()}
        assert counted == await scope_counts(store)
        return counted

    async def steady(*beats: Heartbeat) -> None:  # interval 1 s, TTL 5 s: alive throughout
        _, events = await store.ingest([(b, 1_000, 5_000) for b in beats], "t", CAUGHT_UP)
        await store.finalize(e.id for e in events)

    await steady(*[hb(1, inst=f"i{k}", meta={"zone": "z1" if k < 3 else "z2"}) for k in range(5)])
    assert await agree() == {"service:svc": 5, "zone:z1": 3, "zone:z2": 2}
    await steady(hb(2, inst="i0", meta={"zone": "z2"}))  # moves zone
    assert (await agree())["zone:z2"] == 3
    await steady(hb(3, inst="i0", status="left"))
    await ingest(store, hb(2, inst="i1", meta={"zone": "z1"}))  # TTL 200 ms: dies
    await wait_until(lambda: _claim_kind(store, "dead"), 3, "dead")
    assert await agree() == {"service:svc": 3, "zone:z1": 1, "zone:z2": 2}
    await steady(hb(3, inst="i1", meta={"zone": "z1"}))  # recovered
    assert (await agree())["zone:z1"] == 2
    assert await store.forget("svc", "i2")
    assert await agree() == {"service:svc": 3, "zone:z1": 1, "zone:z2": 2}
    await index_agrees(store)
    await wait_until(lambda: _gone_from(store, "i0"), 5, "left i0 purged after its retention")
    assert await agree() == {"service:svc": 3, "zone:z1": 1, "zone:z2": 2}


async def _gone_from(store, instance):
    await claim(store)
    return await store.record("svc", instance) is None


async def write_old_layout(store: Store, instances: list[str], now: int, due: int) -> None:
    """Records of the layout before packed records, as its scripts wrote them."""
    n = store.names
    async with store.redis.pipeline(transaction=False) as pipe:
        for inst in instances:
            iid = f"svc/{inst}"
            record = {"svc": "svc", "inst": inst, "state": "alive", "inc": "i1", "seq": "1"}
            record |= {"ord": now, "last": now, "ttl": 200, "ivl": 100, "dttl": 200}
            record |= {"status": "ok", "first": now, "since": now, "pub": "alive", "zone": "z"}
            pipe.hset(n.record_key("svc", inst), mapping=record)
            pipe.set(n.meta_key("svc", inst), '{"zone":"z"}')
            pipe.set(
                n.history_key("svc", inst), f"{'e' * 24} joined none i1 1 {now} {now} {now} 200 -"
            )
            pipe.sadd(n.instances_key, iid)
            pipe.sadd(n.service_members_key("svc"), iid)
            pipe.sadd(n.key_prefix + "zone:z", iid)
            pipe.zadd(n.deadlines_key, {iid: due})
        await pipe.execute()


async def test_a_large_namespace_of_the_earlier_layout_moves_in_short_steps(store):
    """5,000 records of the earlier layout move a thousand per call; meanwhile every one is
    listed and counted, a death among those not moved yet is found in the old deadlines and
    judged with its service counted whole (no mass expiry for one death in 5,000), and once
    all have moved no key of the earlier layout is left."""
    n, now = store.names, await store.time_ms()
    await write_old_layout(store, [f"i{k}" for k in range(5000)], now, now + 600_000)
    await write_old_layout(store, ["x"], now - 1000, now - 800)  # silent: dead already
    await store.ingest([], "t", 0)
    assert await store.redis.scard(n.instances_key) == 5001 - 1000
    assert len(await store.records()) == await store.instance_count() == 5001
    assert await store.deadline("svc", "x") == now - 800
    result = await claim(store)
    await store.finalize(e.id for e in result.events)
    assert kinds(result.events) == ["dead"]
    assert orjson.loads(result.events[0].body)["instance"] == "x"
    await wait_until(lambda: _moved(store), 10, "every record moved")
    for key in (
        n.instances_key,
        n.deadlines_key,
        n.service_members_key("svc"),
        n.key_prefix + "zone:z",
    ):
        assert not await store.redis.exists(key), key
    assert await store.redis.keys(n.key_prefix + "inst:*") == []
    assert await store.redis.hgetall(n.key_prefix + "scopes") == {
        "service:svc": "5000",
        "zone:z": "5000",
    }
    assert await store.redis.hget(n.observer_key, "notalive") == "complete"
    assert len(await store.records()) == await store.instance_count() == 5001
    assert [e["kind"] for e in await store.history("svc", "x")] == ["dead", "joined"]
    await index_agrees(store)


async def _moved(store: Store) -> bool:
    await store.ingest([], "t", 0)
    return not await store.redis.exists(store.names.deadlines_key)


async def test_a_steady_heartbeat_rewrites_its_record_as_the_general_path_would(store):
    """A steady heartbeat takes ingest.lua's short path (the record rewritten in place): the
    record it leaves is the one the general path packs, seq and last moved and nothing else."""
    key, meta = store.names.bucket_key("svc", "a"), {"endpoint": "h:1"}
    await ingest(store, hb(1, meta=meta), ttl_ms=5_000)
    before = decode_record("svc/a", await store.redis.hget(key, "svc/a"))
    await redis_clock_moved(store)
    stale, events = await ingest(store, hb(2, meta=meta), ttl_ms=5_000)
    assert (stale, events) == (0, [])
    packed = await store.redis.hget(key, "svc/a")
    after = decode_record("svc/a", packed)
    assert int(after["last"]) > int(before["last"]) and after["seq"] == "2"
    assert {**before, "seq": "2", "last": after["last"]} == after
    assert encode_record(after) == packed  # canonical: what rec_pack would write
    assert await store.deadline("svc", "a") == int(after["last"]) + 150  # suspect at 1.5 ivl
    assert (await ingest(store, hb(2, meta=meta), ttl_ms=5_000))[0] == 1  # stale still counted
    # restarted: the record keeps its previous incarnation after the meta, and stays steady
    assert kinds((await ingest(store, hb(1, "i2", meta=meta), ttl_ms=5_000))[1]) == ["restarted"]
    before = decode_record("svc/a", await store.redis.hget(key, "svc/a"))
    assert before["pinc"] == "i1"
    await redis_clock_moved(store)
    assert await ingest(store, hb(2, "i2", meta=meta), ttl_ms=5_000) == (0, [])
    packed = await store.redis.hget(key, "svc/a")
    after = decode_record("svc/a", packed)
    assert {**before, "seq": "2", "last": after["last"]} == after
    assert int(after["last"]) > int(before["last"]) and encode_record(after) == packed


async def test_every_field_of_a_record_survives_packing(store):
    """The script's field list and hbbus.store.RECORD_FIELDS agree: a record written by the
    scripts decodes to the values they wrote, meta with tabs and all."""
    meta = {"endpoint": "h:1", "note": "a\tb"}
    await ingest(store, hb(7, meta=meta))
    await redis_clock_moved(store)
    await ingest(store, hb(1, "i2", meta=meta))  # restarted: since and ord move, last too
    await ingest(store, hb(2, "i2", meta=meta))
    record = await store.record("svc", "a")
    assert orjson.loads(record["meta"]) == meta
    assert (record["svc"], record["inst"], record["seq"], record["inc"]) == ("svc", "a", "2", "i2")
    newest = (await store.history("svc", "a"))[0]
    assert (newest["kind"], newest["incarnation"]) == ("restarted", "i2")
    assert int(record["since"]) == newest["at_ms"] and int(record["ord"]) == newest["ord"]
    assert int(record["first"]) < int(record["since"]) <= int(record["last"])
    assert record["dttl"] == record["ttl"] == "200" and record["status"] == "ok"
    bucket = store.names.bucket_key("svc", "a")
    packed = await store.redis.hget(bucket, "svc/a")
    assert encode_record(decode_record("svc/a", packed)) == packed
    assert "i2" not in packed.split("\t")[RECORD_FIELDS.index("hist")]  # "=": the record's
    assert set(record) - {"svc", "inst"} <= set(RECORD_FIELDS)
    common = (Path(__file__).parents[1] / "hbbus" / "lua" / "common.lua").read_text()
    listed = re.search(r"local RF = \{(.*?)\}", common, re.S)
    assert listed and tuple(re.findall(r"'(\w+)'", listed.group(1))) == RECORD_FIELDS


async def test_batch_of_many_instances_in_one_call(store):
    beats = [hb(1, inst=f"i{n}") for n in range(500)]
    stale, events = await ingest(store, *beats, publish=False)
    assert stale == 0 and len(events) == 500
    assert await store.instance_count() == 500


async def test_an_instance_events_are_handed_out_in_order(store):
    """A newer event of an instance waits until the older one is published (finalised)."""
    _, joined = await ingest(store, hb(1), publish=False)
    _, restarted = await ingest(store, hb(1, "i2"), publish=False)
    assert restarted == [], "held back behind the unpublished `joined`"
    assert (await claim(store)).events == []  # `joined` is leased; `restarted` must wait
    assert await store.finalize([joined[0].id]) == 1, "finalize says a later event waits"
    handed = (await claim(store)).events
    assert kinds(handed) == ["restarted"]
    # a publish that failed is released: handed out again at once, same id, before newer ones
    await store.release_events([handed[0].id])
    _, left = await ingest(store, hb(2, "i2", status="left"), publish=False)
    assert left == []
    again = (await claim(store)).events
    assert [e.id for e in again] == [handed[0].id]
    assert await store.finalize([handed[0].id]) == 1
    left = (await claim(store)).events
    assert kinds(left) == ["left"]
    assert await store.finalize([left[0].id]) == 0, "nothing waits behind the last one"
    # other instances are not held up by this one
    _, other = await ingest(store, hb(1, inst="b"), publish=False)
    assert kinds(other) == ["joined"]


async def test_the_reaper_reads_only_the_events_it_hands_out(settings, private_redis):
    """Events in flight under a live lease cost a claim nothing: it reads the events due
    (``outbox:due`` up to now), not the whole outbox. (Commands counted on a server of the
    test's own: the earlier reaper read two hash fields per event in flight, every step.)"""
    config = StoreConfig(lease_ms=300, retention_ms=60_000)
    store = Store.from_settings(dataclasses.replace(settings, redis_url=private_redis.url), config)
    try:
        beats = [hb(1, inst=f"i{k}") for k in range(400)]
        _, joined = await ingest(store, *beats, ttl_ms=60_000, publish=False)
        assert len(joined) == 400  # handed out, each with a lease: in flight
        await store.redis.config_resetstat()
        assert (await claim(store)).events == []
        stats = await store.redis.info("commandstats")
        reads = sum(stats.get(f"cmdstat_{c}", {}).get("calls", 0) for c in ("hget", "hmget"))
        assert reads < 10, f"{reads} hash reads for a claim with nothing to hand out"
        # once the leases run out, every one of them is handed out again, same ids
        again: list[str] = []

        async def all_again() -> bool:
            again.extend(e.id for e in (await claim(store)).events)
            return len(again) >= 400

        await wait_until(all_again, 5, "handed out again after the leases")
        assert sorted(again) == sorted(e.id for e in joined)
    finally:
        await store.close()


async def test_an_outbox_of_the_earlier_release_is_indexed_once(store):
    """The release before ``outbox:due`` kept leases in a hash and found an instance's oldest
    event by reading the whole outbox. Its outbox is indexed by the first script that
    touches it: the oldest event of each instance is due at its lease's end (now if none),
    the ones behind it wait for it."""
    _, a_joined = await ingest(store, hb(1, inst="a"), publish=False)
    _, a_restarted = await ingest(store, hb(1, "i2", inst="a"), publish=False)
    assert a_restarted == []  # waits behind `joined`
    _, b_joined = await ingest(store, hb(1, inst="b"), publish=False)
    _, c_joined = await ingest(store, hb(1, inst="c"), publish=False)
    p, r = store.names.key_prefix, store.redis
    # as the earlier release left it: a and c leased (c's lease over), b never handed out
    now_ms = await store.time_ms()
    await r.delete(f"{p}outbox:due", f"{p}outbox:wait:svc/a", f"{p}outbox:indexed")
    await r.hset(f"{p}outbox:lease", mapping={a_joined[0].id: now_ms + 60_000, c_joined[0].id: 1})
    handed = (await claim(store)).events
    assert sorted(e.id for e in handed) == sorted([b_joined[0].id, c_joined[0].id])
    assert not await r.exists(f"{p}outbox:lease") and await r.exists(f"{p}outbox:indexed")
    assert await store.finalize([a_joined[0].id]) == 1, "restarted waits behind it"
    assert kinds((await claim(store)).events) == ["restarted"]
    assert (await claim(store)).events == []  # all leased now, none handed out twice


async def test_finalize_twice_is_harmless(store):
    _, events = await ingest(store, hb(1), publish=False)
    await store.finalize([events[0].id])
    await store.finalize([events[0].id])
    assert await store.redis.hgetall(store.names.outbox_pending_key) == {}
    _, events = await ingest(store, hb(2, status="left"), publish=False)
    assert kinds(events) == ["left"], "the pending count went back to zero, not below"


async def test_seq_zero_is_an_unordered_sender(store):
    _, events = await ingest(store, hb(0, "oneshot"))
    assert kinds(events) == ["joined"]
    stale, _ = await ingest(store, hb(0, "oneshot"))
    assert stale == 0
    assert (await store.record("svc", "a"))["state"] == "alive"


async def test_the_watermark_holds_verdicts_and_never_runs_ahead(store):
    await ingest(store, hb(1))
    await asyncio.sleep(0.3)  # past suspect (150 ms) and dead (200 ms)
    # a registered aggregator that has not applied a probe yet holds every verdict
    await store.ingest([], "late", 0)
    await store.ingest([], "t", CAUGHT_UP)  # the other aggregator has caught up: only "late" holds
    assert (await store.claim()).events == []
    # a probe from the future is capped at Redis time: it cannot vouch for what comes later
    await store.ingest([], "late", 2**52)
    entry = await store.redis.hget(store.names.observers_key, "late")
    stamp, seen = (int(x) for x in entry.split())
    assert stamp <= seen
    obs = await store.observer()
    assert obs["aggregators"]["late"]["behind_ms"] >= 0
    assert kinds(await _claim_kind(store, "dead")) == ["dead"]


async def test_a_recreated_epoch_is_a_resync(store):
    await ingest(store, hb(1))
    await store.redis.delete(store.names.key_prefix + "epoch", store.names.bucket_key("svc", "a"))
    other = Store(store.redis, store.names, store.config)  # another client re-creates it first
    await other.ingest([], "other", 0)
    _, events = await ingest(store, hb(2, inst="b"))
    assert '"resync":true' in events[0].body


async def test_maintenance_quiets_deaths_and_announces_them_when_it_ends(store):
    await ingest(store, hb(1, inst="a"), hb(1, inst="b"))
    until = await store.maintenance_on("svc", 60_000, "kernel upgrade")
    assert until > 0 and [w["target"] for w in await store.maintenance()] == ["svc"]
    await asyncio.sleep(0.3)
    result = await claim(store)
    assert result.events == [], "suspect and dead are not published under maintenance"
    record = await store.record("svc", "a")
    assert record["state"] == "dead" and record["muted"] == "1", "state is still tracked"
    assert [h["kind"] for h in await store.history("svc", "a")] == ["dead", "joined"]
    assert (await store.history("svc", "a"))[0]["muted"] is True
    # b comes back during the window: quietly too
    _, events = await ingest(store, hb(2, inst="b"))
    assert events == [] and (await store.record("svc", "b"))["state"] == "alive"
    # ending the window early announces a's death, which still holds
    assert await store.maintenance_off("svc")
    result = await claim(store)
    dead = [e for e in result.events if e.routing_key == "dead.svc.a"]
    assert len(dead) == 1 and '"prev":"maintenance"' in dead[0].body
    await store.finalize(e.id for e in result.events)
    assert not await store.maintenance_off("svc")
    assert await store.maintenance() == []


async def test_maintenance_of_one_instance_leaves_the_others_alone(store):
    await ingest(store, hb(1, inst="a"), hb(1, inst="b"))
    await store.maintenance_on("svc/a", 60_000, "disk swap")
    await asyncio.sleep(0.3)
    dead = await _claim_kind(store, "dead")
    assert [e.routing_key for e in dead] == ["dead.svc.b"]
    assert (await store.record("svc", "a"))["state"] == "dead"


async def test_a_window_ends_by_itself(store):
    await ingest(store, hb(1))
    await store.maintenance_on("svc", 400, "short")
    await asyncio.sleep(0.3)
    assert await _claim_kind(store, "dead") == []
    dead = await wait_until(lambda: _claim_kind(store, "dead"), 5, "dead after the window")
    assert '"prev":"maintenance"' in dead[0].body


async def test_mass_expiry_holds_the_deaths_and_release_publishes_each_once(store):
    await ingest(store, *[hb(1, inst=f"m{i}") for i in range(10)])
    # one instance stops alone first: an ordinary death
    await asyncio.sleep(0.1)
    await ingest(store, *[hb(2, inst=f"m{i}") for i in range(1, 10)])
    dead = await wait_until(lambda: _claim_kind(store, "dead"), 5, "m0 dead")
    assert [e.routing_key for e in dead] == ["dead.svc.m0"]
    # then the other nine stop at once (with m0 recently dead: 10 of 10 failing)
    await asyncio.sleep(0.3)
    result = await claim(store)
    await store.finalize(e.id for e in result.events)
    keys = [e.routing_key for e in result.events]
    assert keys.count("mass-expiry.service.svc") == 1
    assert not [k for k in keys if k.startswith("dead.svc.m")], "held, not published"
    mass = next(e for e in result.events if e.routing_key.startswith("mass-expiry"))
    assert '"scope":"service:svc"' in mass.body and "m9" in mass.body
    [tripped] = await store.guard()
    assert tripped["scope"] == "service:svc" and len(tripped["held"]) >= 8
    # one comes back: its held death is dropped, quietly
    _, events = await ingest(store, hb(3, inst="m9"))
    assert events == []
    # release: each remaining held death is published once
    released, scopes = await store.release(["service:svc"])
    assert scopes == ["service:svc"] and released == len(tripped["held"]) - 1
    handed = (await claim(store)).events
    published = sorted(e.routing_key for e in handed if e.routing_key.startswith("dead."))
    assert published == sorted(f"dead.svc.m{i}" for i in range(1, 9))
    assert all('"prev":"held"' in e.body for e in handed if e.routing_key.startswith("dead."))
    await store.finalize(e.id for e in handed)
    assert await store.guard() == []
    assert await store.release(["service:svc"]) == (0, [])


async def test_a_zone_trips_across_services(store):
    beats = [Heartbeat(f"s{i}", "x", "inc", 1, 100, 2, 0, "ok", {"zone": "eu-1"}) for i in range(4)]
    beats.append(Heartbeat("s9", "y", "inc", 1, 100, 2, 0, "ok", {"zone": "us-1"}))
    await ingest(store, *beats)
    await asyncio.sleep(0.3)
    events = (await claim(store)).events
    await store.finalize(e.id for e in events)
    keys = sorted(e.routing_key for e in events)
    assert "mass-expiry.zone.eu-1" in keys
    assert "dead.s9.y" in keys, "another zone is not held"
    assert not [k for k in keys if k.startswith("dead.s") and k != "dead.s9.y"]


async def test_flapping_is_announced_once_then_coalesced_until_stable(settings):
    config = StoreConfig(lease_ms=200, retention_ms=60_000, flap_stable_ms=600)
    store = Store.from_settings(settings, config)
    published = []

    async def beat(seq):
        published.extend((await ingest(store, hb(seq)))[1])

    async def reap():
        result = await claim(store)
        await store.finalize(e.id for e in result.events)
        published.extend(result.events)

    try:
        for seq in (1, 3, 5):  # heard, silent past the TTL (dead), heard again...
            await beat(seq)
            await asyncio.sleep(0.3)
            await reap()
        await beat(7)
        seen = kinds(published)
        assert seen.count("flapping") == 1
        assert seen.count("dead") == 1, "only the first death goes to failover"
        assert seen.count("recovered") == 1
        record = await store.record("svc", "a")
        assert record["flapping"] == "1" and record["state"] == "alive"
        history = [h["kind"] for h in await store.history("svc", "a")]
        assert history.count("dead") == 3, "every change is kept in the history"
        # quiet (no dead/recovered change) for flap_stable_ms, heartbeats going on
        for seq in range(8, 20):
            await beat(seq)
            await asyncio.sleep(0.06)
            await reap()
        seen = kinds(published)
        assert seen.count("stable") == 1
        # failover last heard `recovered` and the instance is alive: nothing more to say
        assert seen.count("dead") == 1 and seen.count("recovered") == 1
        assert (await store.record("svc", "a")).get("flapping", "") == ""
    finally:
        await store.close()


async def test_adaptive_deadline_in_lua_matches_the_python_maths(store):
    from hbbus.detect import DetectorConfig, GapStats, deadlines

    config = DetectorConfig(k=4, floor_ms=50, ceiling_ms=5000)
    await store.detector_set("svc", config)
    rng = __import__("random").Random(7)
    for seq in range(1, 27):
        await ingest(store, hb(seq))
        await asyncio.sleep(rng.uniform(0.02, 0.06))
    record = await store.record("svc", "a")
    stats = GapStats(
        int(record["gn"]),
        float(record["gm"]),
        float(record["gv"]),
        [int(g) for g in record["gaps"].split()],
    )
    assert stats.n == 25 and len(stats.recent) == 20
    dead_after, suspect_after = deadlines(stats, config, int(record["dttl"]))
    assert abs(int(record["ttl"]) - dead_after) <= 1, (record, dead_after)
    assert record.get("sus", "") == "" or abs(int(record["sus"]) - (suspect_after or 0)) <= 1
    assert int(record["ttl"]) != int(record["dttl"]), "adaptive, not the declared TTL"
    assert await store.detector_off("svc")
    await ingest(store, hb(30))
    assert (await store.record("svc", "a"))["ttl"] == "200", "declared again"


async def test_held_deaths_can_be_released_by_themselves_at_a_limited_rate(settings):
    config = StoreConfig(
        lease_ms=200, retention_ms=60_000, release_after_ms=300, release_every_ms=150
    )
    store = Store.from_settings(settings, config)
    try:
        await ingest(store, *[hb(1, inst=f"r{i}") for i in range(4)])
        await asyncio.sleep(0.3)
        first = (await claim(store)).events
        await store.finalize(e.id for e in first)
        assert kinds(first) == ["mass-expiry"]
        released_at: list[float] = []
        deadline = asyncio.get_running_loop().time() + 10
        while len(released_at) < 4:
            assert asyncio.get_running_loop().time() < deadline, f"released: {len(released_at)}"
            result = await claim(store)
            await store.finalize(e.id for e in result.events)
            released_at += [
                asyncio.get_running_loop().time()
                for e in result.events
                if e.routing_key.startswith("dead.")
            ]
            await asyncio.sleep(0.02)
        gaps = [b - a for a, b in itertools.pairwise(released_at)]
        assert all(g >= 0.12 for g in gaps), gaps  # one per 150 ms (Redis vs loop clock)
        [tripped] = await store.guard()  # the guard itself lasts its window
        assert tripped["held"] == []
    finally:
        await store.close()


async def test_an_upgraded_namespace_counts_its_members_for_the_guard(settings):
    """A namespace that had instances before the `notalive` index existed (an upgrade) does
    not trust its bound: 30 departed and 4 live instances, 3 of the 4 stop, and the guard
    trips on the member count. (The bound, which misses the departures, says at most 7 of
    34 failing: the deaths would go out.)"""
    store = Store.from_settings(settings, StoreConfig(lease_ms=200))
    try:
        await ingest(store, *[hb(1, inst=f"u{i}") for i in range(34)])
        await ingest(store, *[hb(2, inst=f"u{i}", status="left") for i in range(30)])
        # as after an upgrade: neither the index nor its marker is there
        await store.redis.delete(store.names.notalive_key)
        await store.redis.hdel(store.names.observer_key, "notalive")
        seq = itertools.count(3)
        seen: list = []

        async def judged() -> bool:
            await ingest(store, hb(next(seq), inst="u30"))  # u30 beats on; u31..u33 stopped
            result = await claim(store)
            await store.finalize(e.id for e in result.events)
            seen.extend(e.routing_key for e in result.events)
            return any(k.startswith(("dead.", "mass-expiry.")) for k in seen)

        await wait_until(judged, 5, "the stopped instances judged", poll_s=0.05)
        assert "mass-expiry.service.svc" in seen
        assert not [k for k in seen if k.startswith("dead.")], "held, not published"
    finally:
        await store.close()


async def test_a_store_born_again_under_a_running_fleet_trusts_its_notalive_index(settings):
    """The store's birth (its epoch created: a new namespace, or Redis lost its data) marks
    the `notalive` index complete, whatever the ingest brings before the reaper's first
    claim: a fleet that re-fills `instances` at once does not make the namespace count
    member by member for good."""
    store = Store.from_settings(settings, StoreConfig(lease_ms=200))
    try:
        await ingest(store, *[hb(1, inst=f"b{i}") for i in range(5)])
        assert await store.redis.hget(store.names.observer_key, "notalive") == "complete"
        # Redis lost its data; the first ingest after it already carries the fleet
        keys = [k async for k in store.redis.scan_iter(match=f"{store.names.key_prefix}*")]
        await store.redis.delete(*keys)
        await ingest(store, *[hb(2, inst=f"b{i}") for i in range(5)])
        assert len(await store.records()) == 5
        assert await store.redis.hget(store.names.observer_key, "notalive") == "complete"
    finally:
        await store.close()


async def test_claim_names_the_next_deadline_to_come_while_one_past_waits(store):
    """A deadline past that no probe vouches for yet, and one still to come: the claim says
    both (the reaper has a probe sent for each as it passes)."""
    await ingest(store, hb(1, inst="soon"), ttl_ms=2000)  # suspect at +150 ms, dead at +2 s
    _, joined = await store.ingest([(hb(1, inst="later"), 10_000, 30_000)], "t", CAUGHT_UP)
    await store.finalize(e.id for e in joined)
    # the watermark stays where the last probe put it (Redis time at that ingest), before
    # the first deadline
    soon = await store.deadline("svc", "soon")
    later = await store.deadline("svc", "later")

    async def past():
        result = await store.claim(aggregator="t")
        return result if result.now_ms >= soon else None

    result = await wait_until(past, timeout_s=5, what="the first deadline to pass")
    assert result.events == []  # not vouched for: nobody judged
    assert (result.next_due_ms, result.upcoming_ms) == (soon, later)
    await store.ingest([], "t", CAUGHT_UP)
    result = await store.claim(aggregator="t")
    assert "suspect.svc.soon" in [e.routing_key for e in result.events]
    # nothing past waits any more: the next deadline (soon's death) is the one to sleep until
    assert result.next_due_ms > result.now_ms and result.upcoming_ms is None


async def test_drop_namespace_deletes_its_keys_and_only_its_keys(store, settings):
    other = Store.from_settings(dataclasses.replace(settings, namespace=settings.namespace + "x"))
    try:
        prefix = store.names.key_prefix
        async with store.redis.pipeline(transaction=False) as pipe:
            for k in range(2_345):  # more than one batch of deletes
                pipe.set(f"{prefix}k{k}", 1)
            await pipe.execute()
        await other.redis.set(other.names.key_prefix + "kept", 1)
        assert await store.drop_namespace() == 2_345
        assert [k async for k in store.redis.scan_iter(match=prefix + "*", count=1000)] == []
        assert await other.redis.get(other.names.key_prefix + "kept") is not None
    finally:
        await other.drop_namespace()
        await other.close()
