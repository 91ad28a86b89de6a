"""Routing tables (Lua, real Redis), the Router's strategies, and the routes action end to end:
heartbeaters -> aggregator -> events -> routes action -> table -> `routes` event -> Router."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from hbbus import ops
from hbbus.client import Heartbeater
from hbbus.failover import FailoverConsumer, RetryPolicy
from hbbus.names import Names
from hbbus.routing import Endpoint, NoRoute, Router, RoutingTable, Table
from hbbus.settings import Settings
from hbbus.store import Store, connect_redis
from hbbus.wire import Event, Heartbeat, decode_event
from hbbus.workers.routes import DEFAULT_BINDINGS, RoutesAction
from tests.helpers import run_cli, running, set_record_fields, wait_until


def event(kind: str, instance: str, ord_: int, **meta: Any) -> Event:
    """An event of service ``db`` as the aggregator would publish it."""
    doc = {
        "v": 1,
        "id": f"{kind}-{instance}-{ord_}",
        "kind": kind,
        "service": "db",
        "instance": instance,
        "incarnation": "i1",
        "seq": ord_,
        "ord": ord_,
        "at_ms": 0,
        "last_seen_ms": 0,
        "ttl_ms": 0,
        "prev": "",
        "meta": meta,
    }
    return decode_event(orjson.dumps(doc))


@pytest.fixture
async def table(settings: Settings) -> AsyncIterator[RoutingTable]:
    redis = connect_redis(settings, "test-routing")
    yield RoutingTable(redis, Names(settings.namespace))
    await redis.aclose()


# -- the table's rules ----------------------------------------------------------------------
async def test_first_primary_is_the_primary_and_a_second_one_is_fenced(table):
    await table.upsert(event("joined", "a", 1, endpoint="h:1", role="master"))
    await table.upsert(event("joined", "b", 1, endpoint="h:2", role="replica", weight=3))
    change = await table.upsert(event("joined", "c", 1, endpoint="h:3", role="primary"))
    assert change is not None and change.changed and change.primary == "a"
    snap = await table.read("db")
    assert snap.primary == "a" and snap.epoch == 0
    assert [e.instance for e in snap.routable()] == ["a", "b"]
    assert snap.entries["b"].weight == 3 and snap.entries["b"].role == "replica"
    assert snap.entries["c"].fenced and "claims primary while a is" in snap.entries["c"].reason


async def test_upsert_without_endpoint_is_not_routed_and_repeats_do_not_bump(table):
    assert await table.upsert(event("joined", "x", 1, role="replica")) is None
    first = await table.upsert(event("joined", "a", 1, endpoint="h:1"))
    again = await table.upsert(event("recovered", "a", 2, endpoint="h:1"))
    assert first is not None and again is not None
    assert first.changed and not again.changed and again.version == first.version


async def test_remove_keeps_the_entry_with_the_reason(table):
    await table.upsert(event("joined", "a", 1, endpoint="h:1"))
    change = await table.remove("db", "a", "dead")
    assert change.changed
    entry = (await table.read("db")).entries["a"]
    assert not entry.routable and entry.reason == "dead"
    assert not (await table.remove("db", "a", "dead")).changed


async def test_promotion_lock_one_holder_commit_fences_the_old_primary(table, settings):
    await table.upsert(event("joined", "a", 1, endpoint="h:1", role="primary"))
    await table.upsert(event("joined", "b", 1, endpoint="h:2", role="replica"))
    await table.remove("db", "a", "dead")
    verdict, epoch, old, _ = await table.begin_promotion("db", "a", "w1", 5000)
    assert (verdict, epoch, old) == ("begin", 1, "a")
    assert (await table.begin_promotion("db", "a", "w2", 5000))[0] == "busy"
    assert await table.promotion_step("db", 1, "w1", 5000, "candidate", "b")
    assert not await table.promotion_step("db", 1, "w2", 5000, "candidate", "x")
    assert await table.commit_promotion("db", 1, "w2", "b", "a") is None  # not the holder
    change = await table.commit_promotion("db", 1, "w1", "b", "a")
    assert change is not None and change.primary == "b" and change.epoch == 1
    snap = await table.read("db")
    assert snap.entries["b"].role == "primary" and snap.entries["b"].routable
    assert snap.entries["a"].fenced and "demoted at epoch 1" in snap.entries["a"].reason
    assert (await table.begin_promotion("db", "a", "w2", 5000))[:3] == ("not-primary", 1, "b")


async def test_an_expired_lock_is_resumed_with_its_candidate(table):
    await table.upsert(event("joined", "a", 1, endpoint="h:1", role="primary"))
    assert (await table.begin_promotion("db", "a", "w1", 300))[0] == "begin"
    await table.promotion_step("db", 1, "w1", 300, "candidate", "b")
    assert (await table.begin_promotion("db", "a", "w2", 5000))[0] == "busy"  # still held

    async def taken_over() -> tuple[str, int, str, str] | None:
        # the holder "died": once its lease runs out (Redis time) another worker resumes
        verdict = await table.begin_promotion("db", "a", "w2", 5000)
        return verdict if verdict[0] == "resume" else None

    assert await wait_until(taken_over, 5, "the lease to run out") == ("resume", 1, "a", "b")
    assert not await table.promotion_step("db", 1, "w1", 5000)  # the old holder lost it


async def test_a_returning_old_primary_stays_fenced_until_unfenced(table):
    await table.upsert(event("joined", "a", 1, endpoint="h:1", role="primary"))
    await table.upsert(event("joined", "b", 1, endpoint="h:2", role="replica"))
    await table.begin_promotion("db", "a", "w1", 5000)
    await table.commit_promotion("db", 1, "w1", "b", "a")
    await table.upsert(event("recovered", "a", 3, endpoint="h:1", role="primary"))
    assert not (await table.read("db")).entries["a"].routable
    await table.unfence("db", "a", 3)
    # the same event applied again by another action: its primary claim predates the fix
    await table.upsert(event("recovered", "a", 3, endpoint="h:1", role="primary"))
    entry = (await table.read("db")).entries["a"]
    assert entry.routable and entry.role == "replica" and not entry.fenced
    # a later claim (it restarted as a primary again) is fenced again
    await table.upsert(event("restarted", "a", 5, endpoint="h:1", role="primary"))
    assert (await table.read("db")).entries["a"].fenced


async def test_an_older_event_never_takes_the_primary_role_away(table):
    """Two actions apply the same events: a late `recovered` of the new primary, from before
    its promotion (role replica), must not leave the service without a routable primary."""
    await table.upsert(event("joined", "a", 1, endpoint="h:1", role="primary"))
    await table.upsert(event("joined", "c", 1, endpoint="h:3", role="replica"))
    await table.begin_promotion("db", "a", "w1", 5000)
    await table.commit_promotion("db", 1, "w1", "c", "a")
    await table.upsert(event("recovered", "c", 2, endpoint="h:3", role="replica"))
    snap = await table.read("db")
    assert snap.primary == "c" and snap.entries["c"].role == "primary"
    assert snap.entries["c"].routable


async def test_the_old_primary_returning_mid_promotion_is_fenced(table):
    await table.upsert(event("joined", "a", 1, endpoint="h:1", role="primary"))
    await table.remove("db", "a", "dead")
    await table.begin_promotion("db", "a", "w1", 5000)
    await table.upsert(event("recovered", "a", 3, endpoint="h:1", role="primary"))
    entry = (await table.read("db")).entries["a"]
    assert entry.fenced and not entry.routable
    assert entry.reason == "a promotion is replacing it"


async def test_an_aborted_promotion_gives_the_returned_primary_back(table, settings):
    """No replica to promote: the lock goes, and the old primary that came back meanwhile is
    the routable primary again (its promotion fence does not outlive the promotion)."""
    await table.upsert(event("joined", "a", 1, endpoint="h:1", role="primary"))
    await table.remove("db", "a", "dead")
    _, epoch, _, _ = await table.begin_promotion("db", "a", "w1", 5000)
    await table.upsert(event("recovered", "a", 3, endpoint="h:1", role="primary"))
    store = Store(table.redis, Names(settings.namespace))  # alive again in the store
    await store.ingest([(Heartbeat("db", "a", "i2", 1, 1000, 3, 0, "ok", {}), 1000, 5000)])
    await table.abort_promotion("db", "a", epoch, "w2")  # not the holder: nothing changes
    assert (await table.read("db")).entries["a"].fenced
    await table.abort_promotion("db", "a", epoch, "w1")
    after = await table.read("db")
    assert after.primary == "a" and await table.promotion("db") == {}
    entry = after.entries["a"]
    assert entry.routable and not entry.fenced and entry.role == "primary"


# -- strategies (no I/O) ----------------------------------------------------------------------
def router_with(entries: list[Endpoint], strategy: str = "round_robin") -> Router:
    router = Router("db", settings=Settings(), strategy=strategy)
    router.table = Table("db", 1, 0, "", {e.instance: e for e in entries})
    return router


def test_weighted_round_robin_is_proportional_and_smooth():
    router = router_with([Endpoint("a", "h:1", weight=3), Endpoint("b", "h:2", weight=1)])
    picks = [router.pick().instance for _ in range(8)]
    assert Counter(picks) == {"a": 6, "b": 2}
    assert "b" in picks[:4] and "b" in picks[4:]  # spread, not a burst of a's


def test_least_load_prefers_the_lowest_load_per_weight():
    router = router_with(
        [Endpoint("a", "h:1", load=5), Endpoint("b", "h:2", load=1), Endpoint("c", "h:3", load=1)],
        strategy="least_load",
    )
    assert {router.pick().instance for _ in range(4)} == {"b", "c"}


def test_no_route_and_primary_rules():
    router = router_with(
        [Endpoint("a", "h:1", role="replica"), Endpoint("b", "h:2", routable=False)]
    )
    with pytest.raises(NoRoute):
        router.primary()
    with pytest.raises(NoRoute):
        router.pick(role="primary")
    assert router.pick(role="replica").instance == "a"


# -- end to end ---------------------------------------------------------------------------------
def routes_consumer(settings: Settings, group: str = "routes") -> FailoverConsumer:
    consumer = FailoverConsumer(
        settings, group, DEFAULT_BINDINGS, retry=RetryPolicy(max_retries=3, base_s=0.2)
    )
    consumer.add_action(RoutesAction())
    return consumer


async def test_router_follows_joins_and_deaths_without_polling(settings, aggregators):
    await aggregators(1)
    beats = [
        Heartbeater(
            "web",
            f"web-{i}",
            interval_s=0.2,
            misses=3,
            meta={"endpoint": f"127.0.0.1:{9000 + i}", "weight": i},
            settings=settings,
        )
        for i in (1, 2)
    ]
    async with running(routes_consumer(settings)):
        for hb in beats:
            await hb.start()
        async with Router("web", settings=settings, refresh_s=3600) as router:
            assert await router.wait_for(lambda t: len(t.routable()) == 2, 10)
            picks = Counter(router.pick().endpoint for _ in range(30))
            assert picks == {"127.0.0.1:9001": 10, "127.0.0.1:9002": 20}
            refreshes = router.refreshes
            await beats[1].abort()  # dies without `left`
            assert await router.wait_for(lambda t: len(t.routable()) == 1, 10)
            assert {router.pick().instance for _ in range(5)} == {"web-1"}
            assert router.refreshes - refreshes <= 3  # once per change, not per request
            await beats[0].stop()  # `left`
            assert await router.wait_for(lambda t: not t.routable(), 10)
            with pytest.raises(NoRoute):
                router.pick()
    result = await run_cli(settings, "routes", "web")
    assert result.exit_code == 0, result.output
    assert "web-1" in result.output and "127.0.0.1:9002" in result.output
    doc = orjson.loads((await run_cli(settings, "routes", "--json")).output)
    reasons = {e["instance"]: e["reason"] for e in doc[0]["endpoints"]}
    assert reasons == {"web-1": "left", "web-2": "dead"}


async def test_routes_action_reconciles_instances_that_joined_before_it(settings, aggregators):
    await aggregators(1)
    async with Heartbeater(
        "api", "api-1", interval_s=0.2, misses=3, meta={"endpoint": "h:1"}, settings=settings
    ):
        # the join is in Redis before any routes consumer exists
        await wait_until(lambda: ops.status(settings, "api", "alive"), 5, "api-1 tracked")
        async with (
            running(routes_consumer(settings, "late")),
            Router("api", settings=settings) as router,
        ):
            assert await router.wait_for(lambda t: len(t.routable()) == 1, 10)


async def test_reconcile_leaves_alone_deaths_the_guard_holds(settings):
    """A routes worker (re)started while the mass-expiry guard holds deaths must not act on
    them: failover was not told, so the instances stay routable (and no promotion follows)."""
    store = Store.from_settings(settings)
    try:
        beats = [
            (Heartbeat("db", f"db-{i}", "i1", 1, 100, 2, 0, "ok", {"endpoint": f"h:{i}"}), 100, 200)
            for i in range(4)
        ]
        _, joined = await store.ingest(beats, "t", 2**50)
        await store.finalize(e.id for e in joined)
        async with running(routes_consumer(settings, "first")):
            pass  # its start reconciles: four routable entries
        table = RoutingTable(store.redis, store.names)
        assert len((await table.read("db")).routable()) == 4
        await wait_until(lambda: _held(store), 5, "the four deaths held by the guard")
        async with running(routes_consumer(settings, "second")):
            pass
        assert len((await table.read("db")).routable()) == 4
    finally:
        await store.close()


async def _held(store):
    await store.ingest([], "t", 2**50)  # a caught-up watermark, as an aggregator's probe
    result = await store.claim()
    await store.finalize(e.id for e in result.events)
    records = [await store.record("db", f"db-{i}") for i in range(4)]
    return all(r["state"] == "dead" and r.get("pub") != "dead" and r["held"] for r in records)


async def test_routes_of_an_unknown_service_is_not_found(settings):
    result = await run_cli(settings, "routes", "nope")
    assert result.exit_code == 3
    assert "no routing table for 'nope'" in result.output


async def test_a_cancelled_promotion_lets_another_member_resume_it_at_once(
    table, settings, monkeypatch
):
    """redis-promote cancelled mid-promotion (its event was taken over by another member,
    or a shutdown): the lock runs out at once, and the other member resumes the promotion at
    the same epoch instead of waiting out the lease (the promotion is never aborted)."""
    import asyncio
    from types import SimpleNamespace

    from hbbus.workers.redis_failover import RedisPromoteAction

    await table.upsert(event("joined", "a", 1, endpoint="h:1", role="primary"))
    await table.upsert(event("joined", "b", 1, endpoint="h:2", role="replica"))
    await table.remove("db", "a", "dead")
    verdict, epoch, old, candidate = await table.begin_promotion("db", "a", "w1", 60_000)
    assert verdict == "begin"
    action = RedisPromoteAction("db", lease_ms=60_000)
    action.routes._table = table
    action._consumer = SimpleNamespace(token="w1")  # type: ignore[assignment]
    steps_started = asyncio.Event()

    async def blocked_steps(*_: object) -> str:
        steps_started.set()
        await asyncio.sleep(3600)
        return ""

    monkeypatch.setattr(action, "_promote_steps", blocked_steps)
    task = asyncio.create_task(action._promote(epoch, old, candidate))
    await asyncio.wait_for(steps_started.wait(), 5)
    assert (await table.begin_promotion("db", "a", "w2", 5000))[0] == "busy"
    task.cancel()
    await asyncio.wait({task})
    assert task.cancelled()
    verdict, again, _, _ = await table.begin_promotion("db", "a", "w2", 5000)
    assert (verdict, again) == ("resume", epoch)


async def test_reconcile_gives_a_muted_recovery_the_reason_failover_was_told(settings):
    """An instance failover was told is dead (``pub`` dead) whose recovery was kept quiet
    (flap damping: alive again in the store) stays out of routing as "dead", the reason the
    live path gave it, so a redis-promote worker starting later still sees a dead primary."""
    store = Store.from_settings(settings)
    try:
        beat = Heartbeat("db", "db-0", "i1", 1, 10_000, 3, 0, "ok", {"endpoint": "h:0"})
        _, joined = await store.ingest([(beat, 10_000, 30_000)], "t", 2**50)
        await store.finalize(e.id for e in joined)
        async with running(routes_consumer(settings, "before")):
            pass  # its start reconciles: db-0 routable
        await set_record_fields(store, "db", "db-0", pub="dead")
        async with running(routes_consumer(settings, "after")):
            pass  # reconciles again
        entry = (await RoutingTable(store.redis, store.names).read("db")).entries["db-0"]
        assert not entry.routable and entry.reason == "dead"
    finally:
        await store.close()
