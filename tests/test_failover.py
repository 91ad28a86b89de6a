"""The failover-consumer framework on the real broker and Redis (guarantees 2 and 6)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator

import aio_pika
import orjson
import pytest

from hbbus.amqp import connect, declare_events
from hbbus.client import Heartbeater
from hbbus.errors import PermanentFailure
from hbbus.failover import FailoverConsumer, RetryPolicy, dlq_messages
from hbbus.names import Names
from hbbus.workers.failover_runner import exec_consumer
from tests.helpers import running, wait_until

FAST_RETRY = RetryPolicy(max_retries=3, base_s=0.05, max_s=0.2)


def event(kind="dead", instance="db-1", ord_=1, id_=None):
    return {
        "v": 1,
        "id": id_ or f"{kind}-{instance}-{ord_}",
        "kind": kind,
        "service": "db",
        "instance": instance,
        "incarnation": "inc",
        "seq": 1,
        "ord": ord_,
        "at_ms": 1,
        "last_seen_ms": 0,
        "ttl_ms": 1,
        "prev": "alive",
        "meta": {},
    }


async def publish(settings, *events):
    connection = await connect(settings, "test-publisher", robust=False)
    async with connection:
        channel = await connection.channel()
        exchange = await declare_events(channel, Names(settings.namespace))
        for e in events:
            await exchange.publish(
                aio_pika.Message(orjson.dumps(e), delivery_mode=2),
                f"{e['kind']}.{e['service']}.{e['instance']}",
            )


def consumer_with(settings, handler, group="g", bindings=("dead.#",), kinds=("dead",), **kw):
    consumer = FailoverConsumer(settings, group, list(bindings), retry=FAST_RETRY, **kw)
    consumer.on(*kinds)(handler)
    return consumer


async def test_events_published_while_no_consumer_runs_are_handled_on_start(
    settings, aggregators, sink
):
    seen = []

    async def handler(e):
        seen.append((e.kind, e.instance))

    consumer = consumer_with(settings, handler, bindings=["*.app.*"], kinds=("joined", "dead"))
    async with running(consumer):
        pass  # the group's durable queue now exists; no member runs from here on
    await aggregators(1)
    hb = Heartbeater("app", "app-1", interval_s=0.1, misses=2, settings=settings)
    await hb.start()
    await sink.wait_for("joined", "app-1")
    await hb.abort()
    await sink.wait_for("dead", "app-1", timeout_s=5)  # published while no member runs
    assert seen == []
    async with running(
        consumer_with(settings, handler, bindings=["*.app.*"], kinds=("joined", "dead"))
    ):
        await wait_until(lambda: len(seen) >= 2, 10, "joined and dead handled")
    assert seen == [("joined", "app-1"), ("dead", "app-1")]


async def test_fails_twice_then_succeeds_runs_three_times(settings):
    calls = []

    async def flaky(e):
        calls.append(e.id)
        if len(calls) < 3:
            raise RuntimeError("not yet")

    consumer = consumer_with(settings, flaky)
    async with running(consumer):
        await publish(settings, event())
        await wait_until(lambda: consumer.counts["handled"] == 1, 10, "handled")
        await asyncio.sleep(0.3)  # no further runs may follow
    assert calls == ["dead-db-1-1"] * 3
    assert consumer.counts["retried"] == 2


async def test_always_failing_ends_in_dlq_and_can_be_replayed(settings):
    calls = []

    async def broken(e):
        calls.append(e.id)
        raise RuntimeError("disk on fire")

    consumer = consumer_with(settings, broken)
    async with running(consumer):
        await publish(settings, event())
        await wait_until(lambda: consumer.counts["dead-lettered"] == 1, 10, "dead-lettered")
    assert len(calls) == FAST_RETRY.max_retries + 1
    items = await dlq_messages(settings, "g")
    assert len(items) == 1 and "disk on fire" in items[0]["error"]
    assert items[0]["attempts"] == FAST_RETRY.max_retries + 1
    assert len(await dlq_messages(settings, "g")) == 1, "listing does not consume"

    fixed = []

    async def works(e):
        fixed.append(e.id)

    assert len(await dlq_messages(settings, "g", replay=True)) == 1
    async with running(consumer_with(settings, works)):
        await wait_until(lambda: fixed == ["dead-db-1-1"], 10, "replayed event handled")
    assert await dlq_messages(settings, "g") == []


async def test_permanent_failure_skips_retries(settings):
    calls = []

    async def refuse(e):
        calls.append(1)
        raise PermanentFailure("no replica to promote")

    consumer = consumer_with(settings, refuse)
    async with running(consumer):
        await publish(settings, event())
        await wait_until(lambda: consumer.counts["dead-lettered"] == 1, 10, "dead-lettered")
    assert calls == [1]


async def test_duplicates_are_handled_once_per_group_across_members(settings):
    calls = []

    async def handler(e):
        calls.append(e.id)
        await asyncio.sleep(0.05)

    a = consumer_with(settings, handler)
    b = consumer_with(settings, handler)
    other_group = []

    async def other(e):
        other_group.append(e.id)

    c = consumer_with(settings, other, group="g2")
    async with running(a), running(b), running(c):
        dup = event(id_="same-id")
        await publish(settings, dup, dup, dup, event(instance="db-2"))
        await wait_until(lambda: len(calls) >= 2 and len(other_group) >= 2, 10, "handled")
        await wait_until(
            lambda: (
                a.counts["duplicate"] + b.counts["duplicate"] + a.counts["busy"] + b.counts["busy"]
                >= 2
            ),
            10,
            "duplicates skipped",
        )
        await asyncio.sleep(0.3)
    assert sorted(calls) == ["dead-db-2-1", "same-id"]
    assert sorted(other_group) == ["dead-db-2-1", "same-id"]


async def test_older_event_after_newer_one_is_stale(settings):
    calls = []

    async def handler(e):
        calls.append((e.kind, e.ord))

    consumer = consumer_with(settings, handler, bindings=["#"], kinds=("dead", "recovered"))
    async with running(consumer):
        await publish(settings, event("recovered", ord_=5), event("dead", ord_=4))
        await wait_until(lambda: consumer.counts["stale"] == 1, 10, "stale skipped")
    assert calls == [("recovered", 5)]


async def test_undecodable_event_goes_to_dlq(settings):
    consumer = consumer_with(settings, lambda e: asyncio.sleep(0))
    async with running(consumer):
        connection = await connect(settings, "test", robust=False)
        async with connection:
            channel = await connection.channel()
            exchange = await declare_events(channel, Names(settings.namespace))
            await exchange.publish(aio_pika.Message(b"garbage"), "dead.db.x")
        await wait_until(lambda: consumer.counts["dead-lettered"] == 1, 10, "dead-lettered")
    items = await dlq_messages(settings, "g")
    assert items[0]["body"] == "garbage" and "not an hbbus event" in items[0]["error"]


async def test_exec_action_gets_event_on_stdin_and_retries_on_nonzero(settings, tmp_path):
    out = tmp_path / "runs"
    script = tmp_path / "action.sh"
    script.write_text(f"""#!/bin/sh
cat >> {out}; echo " $HBBUS_EVENT_KIND $HBBUS_SERVICE/$HBBUS_INSTANCE" >> {out}
[ $(wc -l < {out}) -ge 2 ]
""")
    os.chmod(script, 0o755)
    consumer = exec_consumer(settings, "ex", ["dead.#"], str(script), retry=FAST_RETRY, timeout_s=5)
    async with running(consumer):
        await publish(settings, event())
        await wait_until(lambda: consumer.counts["handled"] == 1, 10, "handled")
    lines = out.read_text().splitlines()
    assert len(lines) == 2 and all(line.endswith(" dead db/db-1") for line in lines)
    assert orjson.loads(lines[0].rsplit(" dead", 1)[0])["id"] == "dead-db-1-1"


async def test_exec_timeout_is_a_failure(settings):
    consumer = exec_consumer(
        settings,
        "slow",
        ["dead.#"],
        "sleep 30",
        retry=RetryPolicy(max_retries=0, base_s=0.05),
        timeout_s=0.3,
    )
    async with running(consumer):
        await publish(settings, event())
        await wait_until(lambda: consumer.counts["dead-lettered"] == 1, 10, "dead-lettered")
    items = await dlq_messages(settings, "slow")
    assert "timed out" in items[0]["error"]


def test_unknown_kind_is_refused(settings):
    consumer = FailoverConsumer(settings, "g", ["#"])
    with pytest.raises(Exception, match="unknown event kind"):
        consumer.on("deceased")


async def test_busy_event_is_retried_even_without_retries(settings):
    """Another member holds the event (its in-flight lease): this one looks again later —
    also with max_retries=0 — and runs it once the lease is gone."""
    from hbbus.store import connect_redis

    calls = []

    async def handler(e):
        calls.append(e.id)

    consumer = FailoverConsumer(
        settings, "busy", ["dead.#"], retry=RetryPolicy(max_retries=0, base_s=0.1)
    )
    consumer.on("dead")(handler)
    redis = connect_redis(settings)
    try:
        names = Names(settings.namespace)
        await redis.set(names.failover_key("busy", "inflight:dead-db-1-1"), "1", px=400)
        async with running(consumer):
            await publish(settings, event())
            await wait_until(lambda: calls, 10, "handled after the other member's lease")
        assert calls == ["dead-db-1-1"] and consumer.counts["busy"] >= 1
    finally:
        await redis.aclose()


async def test_stop_waits_for_the_handler_in_hand(settings):
    started, finished = asyncio.Event(), []

    async def slow(e):
        started.set()
        await asyncio.sleep(0.5)
        finished.append(e.id)

    consumer = consumer_with(settings, slow)
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    await asyncio.wait_for(consumer.ready.wait(), 10)
    await publish(settings, event())
    await asyncio.wait_for(started.wait(), 10)
    stop.set()
    await asyncio.wait_for(task, 10)
    assert finished == ["dead-db-1-1"], "the handler ran to its end"
    connection = await connect(settings, "test", robust=False)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(
            Names(settings.namespace).failover_queue("g"), passive=True
        )
        assert queue.declaration_result.message_count == 0, "acked: nothing is redelivered"


async def lease_test_consumer(settings, group):
    """A consumer whose dead handler blocks until released, and records how it ended."""
    started, release, ended = asyncio.Event(), asyncio.Event(), []

    async def handler(e):
        started.set()
        try:
            await release.wait()
        except asyncio.CancelledError:
            ended.append("cancelled")
            raise
        ended.append("finished")

    consumer = FailoverConsumer(
        settings, group, ["dead.#"], retry=FAST_RETRY, lease_ms=300, handler_timeout_s=30
    )
    consumer.on("dead")(handler)
    return consumer, started, release, ended


@contextlib.asynccontextmanager
async def running_released(
    consumer: FailoverConsumer, release: asyncio.Event
) -> AsyncIterator[None]:
    """``running(consumer)``, with the blocked handler released before the teardown waits
    for it, also when an assertion failed (else the teardown times out and hides it)."""
    async with running(consumer):
        try:
            yield
        finally:
            release.set()


@pytest.mark.parametrize("other", ["holds the lease", "finished the event"])
async def test_a_member_whose_event_was_taken_over_stops_its_handler(settings, other):
    """Guarantee 6: this member stalled past its lease and another member took the event
    over (it holds the in-flight lease now, or has finished the event and released it):
    this member's handler is cancelled, its message acked, and it neither takes the lease
    again, nor marks the event done, nor retries or dead-letters it."""
    from hbbus.store import connect_redis

    group = "taken" if other == "holds the lease" else "finished"
    consumer, started, release, ended = await lease_test_consumer(settings, group)
    names = Names(settings.namespace)
    inflight = names.failover_key(group, "inflight:dead-db-1-1")
    done = names.failover_key(group, "done:dead-db-1-1")
    redis = connect_redis(settings)
    try:
        async with running_released(consumer, release):
            await publish(settings, event())
            await asyncio.wait_for(started.wait(), 10)
            if other == "holds the lease":
                await redis.set(inflight, "another-member", px=10_000)
            else:
                await redis.set(done, "1", ex=60)
                await redis.delete(inflight)
            await wait_until(lambda: consumer.counts["taken-over"] == 1, 10, "taken over")
            assert ended == ["cancelled"]
            if other == "holds the lease":
                assert await redis.get(inflight) == "another-member", "the other's lease"
                assert not await redis.exists(done), "this member marked it done"
            else:
                assert not await redis.exists(inflight), "this member took the lease again"
            assert consumer.counts["retried"] == consumer.counts["dead-lettered"] == 0
        connection = await connect(settings, "test", robust=False)
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(names.failover_queue(group), passive=True)
            assert queue.declaration_result.message_count == 0, "acked, not requeued"
    finally:
        await redis.aclose()


async def test_a_lease_that_ran_out_untaken_is_the_holders_again(settings):
    """The lease ran out (a stall) but nobody took the event: the handler goes on, the
    lease is taken again, and the event is handled once."""
    from hbbus.store import connect_redis

    consumer, started, release, ended = await lease_test_consumer(settings, "regained")
    inflight = Names(settings.namespace).failover_key("regained", "inflight:dead-db-1-1")
    redis = connect_redis(settings)
    try:
        async with running_released(consumer, release):
            await publish(settings, event())
            await asyncio.wait_for(started.wait(), 10)
            token = await redis.get(inflight)
            assert token.startswith(f"{consumer.token}:"), "a run's token, of this member"
            await redis.delete(inflight)  # as if it ran out
            await wait_until(lambda: redis.get(inflight), 5, "the lease taken again")
            assert await redis.get(inflight) == token, "taken again by the same run"
            release.set()
            await wait_until(lambda: consumer.counts["handled"] == 1, 10, "handled")
        assert ended == ["finished"] and consumer.counts["taken-over"] == 0
    finally:
        await redis.aclose()


async def test_a_stale_event_is_not_taken_back(settings):
    """The lease ran out while nobody took it, but a newer event of the same instance was
    handled meanwhile: the older event is stale, and its run stops instead of going on."""
    from hbbus.store import connect_redis

    consumer, started, release, ended = await lease_test_consumer(settings, "stale")
    names = Names(settings.namespace)
    inflight = names.failover_key("stale", "inflight:dead-db-1-1")
    redis = connect_redis(settings)
    try:
        async with running_released(consumer, release):
            await publish(settings, event())
            await asyncio.wait_for(started.wait(), 10)
            await redis.hset(names.failover_key("stale", "order"), "db/db-1", 2)
            await redis.delete(inflight)  # ran out; a newer event (ord 2) was handled
            await wait_until(lambda: consumer.counts["taken-over"] == 1, 10, "stopped")
            assert ended == ["cancelled"] and not await redis.exists(inflight)
    finally:
        await redis.aclose()
