"""End to end on the real servers: DESIGN.md section 6, guarantees 1 and 2 (events side)."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import aio_pika
import aiormq.connection
import orjson

from hbbus.amqp import (
    can_publish_batch,
    connect,
    publish_batch,
    publish_confirmed,
    use_buffered_frame_reader,
)
from hbbus.client import Heartbeater
from hbbus.errors import DeliveryFailed
from hbbus.frames import Delivery
from hbbus.names import Names
from hbbus.settings import Settings
from hbbus.store import Store
from hbbus.wire import Heartbeat
from hbbus.workers.aggregator import direct_delivery
from tests.conftest import FAST
from tests.helpers import EventSink, start_fleet, wait_until

INTERVAL_S = 0.2
MISSES = 3
TTL_MS = round(INTERVAL_S * 1000) * MISSES


async def fleet(settings: Settings, service: str, n: int) -> list[Heartbeater]:
    beaters = await start_fleet(settings, service, n, INTERVAL_S, MISSES)
    assert all(b.connected for b in beaters)
    return beaters


async def test_fleet_deaths_leaves_recoveries_and_restarts(settings, aggregators, sink):
    await aggregators(2)
    beaters = await fleet(settings, "web", 20)
    await sink.wait_for("joined", count=20, timeout_s=10)

    killed = beaters[:3]
    last_sent = {}
    for b in killed:
        await b.abort()  # dies without `left`
        last_sent[b.instance] = time.time()
    await beaters[3].stop(leave=True)

    dead = await sink.wait_for("dead", count=3, timeout_s=10)
    await sink.wait_for("left", "web-3")
    await asyncio.sleep(TTL_MS / 1000 * 3)  # nothing else may die meanwhile
    assert sorted(e["instance"] for e in sink.of("dead")) == ["web-0", "web-1", "web-2"]
    assert not sink.of("dead", "web-3"), "a clean exit must not produce `dead`"
    for event in dead:
        silent_ms = event["at_ms"] - event["last_seen_ms"]
        assert TTL_MS <= silent_ms <= TTL_MS + 250, (
            f"{event['instance']} declared after {silent_ms} ms"
        )
        assert event["meta"]["endpoint"].startswith("127.0.0.1:")

    # a killed instance comes back (a new process) -> recovered
    back = Heartbeater("web", "web-0", interval_s=INTERVAL_S, misses=MISSES, settings=settings)
    await back.start()
    recovered = await sink.wait_for("recovered", "web-0")
    assert recovered[0]["incarnation"] == back.incarnation

    # a process restarted within its TTL -> restarted, never dead
    await beaters[4].abort()
    again = Heartbeater("web", "web-4", interval_s=INTERVAL_S, misses=MISSES, settings=settings)
    await again.start()
    await sink.wait_for("restarted", "web-4")
    await asyncio.sleep(TTL_MS / 1000 * 2)
    assert not sink.of("dead", "web-4")

    # every event id is unique: exactly one event per transition
    ids = [e["id"] for e in sink.events]
    assert len(ids) == len(set(ids))
    for b in [*beaters[5:], back, again]:
        await b.stop()


async def test_an_event_held_back_goes_out_once_the_one_before_is_confirmed(
    settings, aggregators, sink
):
    """An instance's event waits in the outbox while its previous one is being published.
    When that one is confirmed and finalised, the reaper hands the waiting one out at once,
    not at its next look (here a minute away: no deadline is near, and its longest sleep is
    a minute)."""
    config = dataclasses.replace(FAST, reaper_max_sleep_ms=60_000)
    [proc] = await aggregators(1, config)
    publisher = proc.aggregator.publisher
    gate = asyncio.Event()
    publish_all = publisher._publish_all

    async def gated(events):  # the `joined` publish waits until the restart is recorded
        if any(e.routing_key.startswith("joined.") for e in events):
            await gate.wait()
        return await publish_all(events)

    publisher._publish_all = gated
    store = Store.from_settings(settings)
    connection = await connect(settings, "test-held-back", robust=False)
    try:
        async with connection:
            channel = await connection.channel()
            exchange = await channel.get_exchange(Names(settings.namespace).heartbeats_exchange)
            for incarnation in ("inc-1", "inc-2"):  # joined, then restarted

                async def applied(incarnation: str = incarnation) -> bool:
                    record = await store.record("held", "h-1")
                    return record is not None and record["inc"] == incarnation

                beat = Heartbeat("held", "h-1", incarnation, 1, 20_000, 3, 0, "ok", {})
                await exchange.publish(aio_pika.Message(beat.encode()), beat.routing_key)
                await wait_until(applied, 10, f"the heartbeat of {incarnation} applied")
        assert not sink.events
        gate.set()
        await sink.wait_for("joined", "h-1", timeout_s=10)
        restarted = await sink.wait_for("restarted", "h-1", timeout_s=10)
        assert restarted[0]["incarnation"] == "inc-2"
    finally:
        gate.set()
        await store.close()


async def test_killed_between_claim_and_publish_loses_nothing(settings, aggregators, sink):
    """A worker that claims transitions and dies before publishing them: another one publishes
    them after the lease, with the same ids, and in order per instance."""
    store = Store.from_settings(settings, FAST.store)
    try:
        now_ms = int(time.time() * 1000)
        one = Heartbeat("db", "db-1", "inc-a", 1, 100, 2, now_ms, "ok", {"role": "primary"})
        two = Heartbeat("db", "db-2", "inc-b", 1, 100, 2, now_ms, "ok", {"role": "replica"})
        # a worker that had caught up with the heartbeat queue (its probe stamped far ahead)
        _, joined = await store.ingest([(one, 100, 200), (two, 100, 200)], "dying", 2**50)
        await store.finalize([e.id for e in joined if e.routing_key == "joined.db.db-1"])
        # db-2's `joined` stays claimed by an "ingest that died"; now a "reaper" claims db-1's
        # death and dies too
        await asyncio.sleep(0.3)
        await store.ingest([], "dying", 2**50)  # a fresh probe (capped at Redis time)
        claim = await store.claim()
        dead = [e for e in claim.events if e.routing_key == "dead.db.db-1"]
        assert len(dead) == 1
        assert not sink.events, "nothing is published before an aggregator runs"

        await aggregators(1)
        lease_s = FAST.store.lease_ms / 1000
        got = await sink.wait_for("dead", "db-1", timeout_s=lease_s + 5)
        assert got[0]["id"] == dead[0].id
        joined_two = await sink.wait_for("joined", "db-2", timeout_s=lease_s + 5)
        assert joined_two[0]["id"] == next(
            e.id for e in joined if e.routing_key == "joined.db.db-2"
        )
        await sink.wait_for("dead", "db-2", timeout_s=lease_s + 5)
        kinds_two = [e["kind"] for e in sink.of(instance="db-2")]
        assert kinds_two == ["joined", "dead"], "db-2's death waited for its `joined`"
        assert len(sink.of("dead")) == 2
        assert await wait_until(lambda: _outbox_empty(store), 5, "outbox drained")
    finally:
        await store.close()


async def _outbox_empty(store: Store) -> bool:
    return await store.pending_events() == 0


async def test_aggregator_killed_mid_batch_then_other_takes_over(settings, aggregators, sink):
    """Two aggregators; one is cancelled abruptly; deaths are still reported exactly once.
    (Four services of two instances, one of each dies: below the mass-expiry guard.)"""
    aggs = await aggregators(2)
    fleets = [await fleet(settings, f"svc{i}", 2) for i in range(4)]
    await sink.wait_for("joined", count=8)
    await aggs[0].kill()
    for beaters in fleets:
        await beaters[0].abort()
    await sink.wait_for("dead", count=4, timeout_s=10)
    await asyncio.sleep(0.5)
    assert sorted(e["service"] for e in sink.of("dead")) == [f"svc{i}" for i in range(4)]
    for beaters in fleets:
        await beaters[1].stop()


async def test_events_survive_with_no_consumer_and_history_is_kept(settings, aggregators):
    """History (`hbbus events`) keeps every transition even when no one listened live."""
    await aggregators(1)
    async with Heartbeater("solo", "s-1", interval_s=INTERVAL_S, misses=MISSES, settings=settings):
        await asyncio.sleep(0.5)
    store = Store.from_settings(settings)
    try:
        events = await wait_until(lambda: _kinds(store), 5, "joined and left in history")
        assert events == ["joined", "left"]
        record = await store.record("solo", "s-1")
        assert record is not None and record["state"] == "left"
    finally:
        await store.close()


async def _kinds(store: Store) -> list[str] | None:
    kinds = [e["kind"] for e in await store.recent_events(10)]
    return kinds if kinds == ["joined", "left"] else None


async def test_unrouted_events_are_parked_not_lost(settings, aggregators):
    await aggregators(1)
    async with Heartbeater("lonely", "l-1", interval_s=INTERVAL_S, settings=settings):
        await asyncio.sleep(0.3)
    from hbbus.amqp import connect
    from hbbus.names import Names

    connection = await connect(settings, "test", robust=False)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(Names(settings.namespace).unrouted_queue, passive=True)
        kinds = []
        for _ in range(10):
            message = await queue.get(fail=False, no_ack=True)
            if message is None:
                break
            kinds.append(orjson.loads(message.body)["kind"])
    assert kinds == ["joined", "left"]


async def test_sink_helper_sees_only_its_namespace(settings, base_settings, aggregators, sink):
    other = base_settings.with_namespace(settings.namespace + "-x")
    other_sink = await EventSink(other).start()
    try:
        await aggregators(1)
        async with Heartbeater("ns", "n-1", interval_s=INTERVAL_S, settings=settings):
            await sink.wait_for("joined", "n-1")
        assert not other_sink.events
    finally:
        await other_sink.close()
        from tests.helpers import drop_namespace

        await drop_namespace(other)


async def test_direct_delivery_hands_every_message_to_take(settings):
    """The aggregator's delivery hook (no task per delivery): with the installed aiormq it
    installs, every message arrives whole and in order, and the consumer callback (aiormq's
    task path) is never used. The aggregator installs it on each channel it consumes on,
    the reopened one included (workers/aggregator.py, Aggregator._consume)."""
    connection = await connect(settings, "test-direct-delivery", robust=False)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        raw = await channel.get_underlay_channel()
        taken: list = []
        called: list = []

        async def callback(message: object) -> None:
            called.append(message)

        assert direct_delivery(raw, taken.append), "the hook did not install on this aiormq"
        await raw.basic_consume(queue.name, callback)
        bodies = [b"x" * n for n in (0, 10, 300_000)]  # an empty body, and one of many frames
        for body in bodies:
            await raw.basic_publish(body, routing_key=queue.name)
        await wait_until(lambda: len(taken) == len(bodies), 5, "three deliveries")
        assert [m.body for m in taken] == bodies
        assert [m.delivery_tag for m in taken] == [1, 2, 3]
        await raw.basic_ack(taken[-1].delivery_tag, multiple=True)
        assert called == []


async def test_the_buffered_reader_hands_deliveries_out_directly_in_order(settings, monkeypatch):
    """As the aggregator process reads: through the buffered frame reader, which after the
    first delivery (through the hook) parses whole deliveries itself and hands them to take.
    Every message arrives once, whole and in order, empty and many-frame bodies included,
    most of them handed out directly, and a multiple ack of the last one takes them all."""
    monkeypatch.setattr(aiormq.connection, "FrameReceiver", aiormq.connection.FrameReceiver)
    assert use_buffered_frame_reader()
    connection = await connect(settings, "test-direct-reader", robust=False)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True)  # gone with the connection
        raw = await channel.get_underlay_channel()
        await raw.basic_qos(prefetch_count=5000)
        taken: list = []
        assert direct_delivery(raw, taken.append)
        bodies = [b"first", b""] + [b'{"n":%d}' % i for i in range(3000)] + [b"y" * 300_000]
        bodies += [b"after %d" % i for i in range(500)]
        for body in bodies:
            await raw.basic_publish(body, routing_key=queue.name)
        await raw.basic_consume(queue.name, lambda message: None)
        await wait_until(lambda: len(taken) == len(bodies), 20, "every delivery")
        assert [m.body for m in taken] == bodies
        assert [m.delivery_tag for m in taken] == list(range(1, len(bodies) + 1))
        assert {m.routing_key for m in taken} == {queue.name}
        direct = [m for m in taken if isinstance(m, Delivery)]
        assert len(direct) > len(bodies) // 2, "few deliveries were handed out directly"
        assert not isinstance(taken[0], Delivery), "the first one registers the channel"
        assert not isinstance(taken[3002], Delivery), "a body of many frames goes aiormq's way"
        await raw.basic_ack(taken[-1].delivery_tag, multiple=True)
        await raw.basic_qos(prefetch_count=1)  # a round trip: the ack was taken, no error
        await raw.close()  # anything not acked would go back to the queue now
        other = await connection.channel()
        declared = await other.declare_queue(queue.name, passive=True)
        assert declared.declaration_result.message_count == 0


async def test_the_aggregator_consumes_again_after_the_broker_cancels_it(
    settings, aggregators, sink
):
    """The aggregator queue is deleted under a running aggregator (the broker cancels its
    consumer): it declares the queue again and goes on applying heartbeats."""
    [agg] = await aggregators(1)
    beaters = await fleet(settings, "cancelled", 1)
    try:
        await sink.wait_for("joined", count=1, timeout_s=10)
        connection = await connect(settings, "test-delete-queue", robust=False)
        async with connection:
            channel = await connection.channel()
            await channel.queue_delete(Names(settings.namespace).aggregator_queue)
        beaters += await fleet(settings, "after", 1)
        joined = await sink.wait_for("joined", count=2, timeout_s=10)
        assert {e["service"] for e in joined} == {"cancelled", "after"}
        assert agg.aggregator._consumer_tag is not None
    finally:
        for b in beaters:
            await b.stop()


async def test_a_consumer_wanted_no_more_is_not_started_by_a_pending_retry(settings, aggregators):
    """A retry of the consume (after a reconnect or a broker cancel) that runs after the
    aggregator decided to stop consuming (Redis lost) must not consume: the channel follows
    the aggregator's intent as it is when the retry runs, never the one it was started for."""
    [proc] = await aggregators(1)
    agg = proc.aggregator
    channel = await agg._consume_channel.get_underlay_channel()
    agg._want_consumer = False  # no consumer, as after a reconnect or a broker cancel
    await agg._sync_consumer()
    assert agg._consumer_tag is None and not channel.consumers
    agg._want_consumer = True
    async with agg._consume_lock:  # the retry starts and waits here, as behind a reconnect
        agg._resync_consumer("test")
        await asyncio.sleep(0)  # let the retry reach the lock
        agg._want_consumer = False  # as _redis_lost decides meanwhile
    await asyncio.wait_for(agg._resync, 10)
    assert agg._consumer_tag is None and not channel.consumers, "consuming after all"
    agg._want_consumer = True  # as when Redis is back
    agg._resync_consumer("test")
    await asyncio.wait_for(agg._resync, 10)
    assert agg._consumer_tag in channel.consumers


async def test_a_passed_deadline_does_not_wait_for_the_next_probe(settings, aggregators, sink):
    """Probes go every minute here, so only the probe the reaper has sent when a deadline
    passes can let the death go (else it would wait up to a minute)."""
    config = dataclasses.replace(FAST, probe_interval_ms=60_000)
    await aggregators(1, config)
    beater = Heartbeater("slow", "slow-1", interval_s=INTERVAL_S, misses=MISSES, settings=settings)
    await beater.start()
    await sink.wait_for("joined", "slow-1")
    await beater.abort()
    await sink.wait_for("suspect", "slow-1", timeout_s=10)
    await sink.wait_for("dead", "slow-1", timeout_s=10)


async def test_a_queue_restore_asked_for_while_a_retry_waits_is_done(settings, aggregators):
    """A retry of the consume started after a reconnect (no restore) is waiting when the
    broker's cancel asks for the deleted queue to be declared again: the retry does both,
    so the consume finds its queue (a consume of a missing queue would close the channel)."""
    [proc] = await aggregators(1)
    agg = proc.aggregator
    channel = await agg._consume_channel.get_underlay_channel()
    agg._want_consumer = False  # no consumer, as after a reconnect
    await agg._sync_consumer()
    connection = await connect(settings, "test-restore-queue", robust=False)
    async with connection:
        other = await connection.channel()
        await other.queue_delete(Names(settings.namespace).aggregator_queue)
    agg._want_consumer = True
    async with agg._consume_lock:  # the retry starts and waits here
        agg._resync_consumer("after a reconnect")
        await asyncio.sleep(0)
        agg._resync_consumer("after the broker cancelled it", restore_queue=True)
    await asyncio.wait_for(agg._resync, 10)
    assert await agg._consume_channel.get_underlay_channel() is channel, "the channel closed"
    assert agg._consumer_tag in channel.consumers


async def test_a_broker_cancel_before_the_consume_reply_is_recognised(settings, aggregators):
    """The broker may cancel a consumer (its queue deleted) before the aggregator has read
    the reply to its consume: the cancel names the new tag, and the aggregator must take it
    as a cancel of its consumer and consume again, not ignore it and believe it consumes."""
    [proc] = await aggregators(1)
    agg = proc.aggregator
    channel = await agg._consume_channel.get_underlay_channel()
    consume = channel.basic_consume
    cancelled: list[str] = []

    async def cancelled_before_the_reply(queue, callback, **kwargs):  # once
        channel.basic_consume = consume
        agg._on_cancelled(aiormq.spec.Basic.Cancel(consumer_tag=kwargs["consumer_tag"]))
        cancelled.append(kwargs["consumer_tag"])
        return await consume(queue, callback, **kwargs)

    agg._want_consumer = False
    await agg._sync_consumer()
    channel.basic_consume = cancelled_before_the_reply
    agg._want_consumer = True
    await agg._sync_consumer()
    await wait_until(lambda: agg._resync is not None and agg._resync.done(), 10, "the resync")
    assert cancelled and agg._consumer_tag not in (None, cancelled[0])
    assert agg._consumer_tag in channel.consumers
    await channel.basic_cancel(cancelled[0])  # the broker never cancelled it: we do


async def test_a_batch_publish_is_one_write_confirmed_message_by_message(settings):
    """publish_batch (the aggregator's events) on the real broker: every message arrives in
    order with its properties, a body larger than a frame whole; an unroutable one (mandatory)
    is refused by itself; publishes one at a time before and after keep aiormq's count of
    delivery tags right (each is confirmed)."""
    exchange_name, queue_name = f"{settings.namespace}.batch", f"{settings.namespace}.batch-q"
    connection = await connect(settings, "test-batch", robust=False)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.declare_exchange(
            exchange_name, aio_pika.ExchangeType.TOPIC, auto_delete=True
        )
        queue = await channel.declare_queue(queue_name, exclusive=True)
        await queue.bind(exchange, "ok.#")
        before = await publish_confirmed(exchange, b"before", "ok.before", message_id="b0")
        underlay = await channel.get_underlay_channel()
        assert can_publish_batch(underlay)

        def props(n: int) -> aiormq.spec.Basic.Properties:
            return aiormq.spec.Basic.Properties(
                content_type="application/json",
                delivery_mode=2,
                message_id=f"m{n}",
                message_type="joined",
            )

        big = b"x" * 300_000  # more than a frame (RabbitMQ's frame_max: 128 KiB)
        messages = [(f"{n}".encode(), f"ok.{n}", props(n)) for n in range(300)]
        messages.insert(100, (b"lost", "nobody.home", props(1000)))
        messages.append((big, "ok.big", props(2000)))
        results = await publish_batch(underlay, exchange_name, messages)
        refused = [i for i, r in enumerate(results) if r is not None]
        assert refused == [100] and isinstance(results[100], DeliveryFailed)
        assert before is None
        await publish_confirmed(exchange, b"after", "ok.after", message_id="a0")
        got = []
        async with queue.iterator(no_ack=True) as it:
            async for message in it:
                got.append(message)
                if message.message_id == "a0":
                    break
        assert [m.message_id for m in got] == ["b0", *(f"m{n}" for n in range(300)), "m2000", "a0"]
        assert got[150].body == b"149" and got[-2].body == big
        assert got[1].type == "joined" and got[1].content_type == "application/json"
        assert got[1].delivery_mode == aio_pika.DeliveryMode.PERSISTENT
