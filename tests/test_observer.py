"""The observer guards itself (issue 3, first part): suspect before dead, the watermark,
observer.degraded / observer.recovered, the grace period, and a Redis that lost its data.
Each test uses its own namespace; servers that must fail are the test's own."""

from __future__ import annotations

import asyncio
import logging
import secrets

import aio_pika

from hbbus.amqp import connect, declare_heartbeats
from hbbus.names import Names
from hbbus.store import Store, StoreConfig
from hbbus.wire import Heartbeat
from hbbus.workers.aggregator import AggregatorConfig
from tests.conftest import FAST
from tests.helpers import EventSink, drop_namespace, start_fleet
from tests.servers import PrivateRedis

# TTL 1.5 s; the observer is degraded after 2 s of watermark lag (the default)
INTERVAL_S, MISSES = 0.5, 3
TTL_S = INTERVAL_S * MISSES


async def fleet(settings, n, service="fleet"):
    return await start_fleet(settings, service, n, INTERVAL_S, MISSES, max_backoff_s=1.0)


async def publish_beat(settings, seq, inc="inc-1", instance="s-1", misses=4):
    connection = await connect(settings, "test-beat", robust=False)
    async with connection:
        channel = await connection.channel()
        exchange = await declare_heartbeats(channel, Names(settings.namespace))
        beat = Heartbeat("sus", instance, inc, seq, 200, misses, 0, "ok", {})
        await exchange.publish(aio_pika.Message(beat.encode()), beat.routing_key)


async def test_suspect_before_dead_and_back_to_alive(settings, aggregators, sink):
    await aggregators(1)
    await publish_beat(settings, 1)
    await sink.wait_for("joined", "s-1")
    suspect = await sink.wait_for("suspect", "s-1", timeout_s=5)
    silent = suspect[0]["at_ms"] - suspect[0]["last_seen_ms"]
    assert 300 <= silent < 800, f"suspect after {silent} ms (interval 200, ttl 800)"
    await publish_beat(settings, 2)
    alive = await sink.wait_for("alive", "s-1")
    assert alive[0]["prev"] == "suspect"
    dead = await sink.wait_for("dead", "s-1", timeout_s=5)
    assert dead[0]["prev"] == "suspect"
    assert [e["kind"] for e in sink.of(instance="s-1")] == [
        "joined",
        "suspect",
        "alive",
        "suspect",
        "dead",
    ]


async def test_stopped_aggregators_cause_no_false_deaths(settings, aggregators, sink):
    """Backlog: all aggregators stop for 3x TTL while 50 instances keep heartbeating."""
    first = await aggregators(2)
    beaters = await fleet(settings, 50)
    await sink.wait_for("joined", count=50, timeout_s=15)
    for agg in first:
        await agg.stop()
    await asyncio.sleep(3 * TTL_S)  # the outage itself: nothing may be judged meanwhile
    await aggregators(2)
    await sink.wait_for("observer.recovered", timeout_s=15)
    await asyncio.sleep(2 * TTL_S)  # and nothing may die after it either
    assert sink.of("dead") == [] and sink.of("suspect") == []
    assert len(sink.of("observer.degraded")) == 1 and len(sink.of("observer.recovered")) == 1
    degraded = sink.of("observer.degraded")[0]
    assert "expiries are held" in degraded["reason"]
    # the fleet is still watched: one that really stops is reported, after its grace
    await beaters[0].abort()
    await sink.wait_for("dead", "fleet-0", timeout_s=15)
    assert [e["instance"] for e in sink.of("dead")] == ["fleet-0"]
    for b in beaters[1:]:
        await b.stop()


async def test_redis_restarted_empty_causes_no_false_deaths(
    base_settings, private_redis, aggregators
):
    settings = base_settings.with_namespace(f"t-redis-empty-{secrets.token_hex(3)}")
    settings = type(settings)(
        amqp_url=settings.amqp_url, redis_url=private_redis.url, namespace=settings.namespace
    )
    sink = await EventSink(settings).start()
    beaters = []
    try:
        await aggregators(2, s=settings)
        beaters = await fleet(settings, 10, "db")
        await sink.wait_for("joined", count=10, timeout_s=10)
        private_redis.stop()
        await asyncio.sleep(3 * TTL_S)
        private_redis.start()  # empty: no persistence
        rejoined = await sink.wait_for("joined", count=20, timeout_s=20)
        await asyncio.sleep(2 * TTL_S)
        assert sink.of("dead") == []
        resynced = rejoined[10:]
        assert sorted(e["instance"] for e in resynced) == sorted(b.instance for b in beaters)
        assert all(e.get("resync") is True for e in resynced), "they say they come from a resync"
        assert not any(e.get("resync") for e in rejoined[:10])
    finally:
        for b in beaters:
            await b.stop()
        await sink.close()
        await drop_namespace(settings)


async def test_broker_outage_causes_no_false_deaths_and_real_deaths_follow_the_grace(
    base_settings, private_rabbit, aggregators
):
    """The broker stops for 3x TTL while clients keep trying; one instance really dies
    meanwhile. After the broker returns: no false deaths, one degraded/recovered pair, and
    the real death is reported after the grace period."""
    ns = f"t-broker-outage-{secrets.token_hex(3)}"
    settings = type(base_settings)(
        amqp_url=private_rabbit.url, redis_url=base_settings.redis_url, namespace=ns
    )
    config = AggregatorConfig(
        store=StoreConfig(lease_ms=1500, grace_ms=3000),
        reaper_max_sleep_ms=FAST.reaper_max_sleep_ms,
    )
    sink = await EventSink(settings, queue=f"{ns}.test-sink").start()
    beaters = []
    try:
        await aggregators(2, config=config, s=settings)
        beaters = await fleet(settings, 10, "web")
        await sink.wait_for("joined", count=10, timeout_s=10)
        private_rabbit.stop_app()
        await asyncio.sleep(0.5)
        await beaters[0].abort()  # really dies during the outage
        await asyncio.sleep(3 * TTL_S)
        private_rabbit.start_app()
        await sink.reconnect()
        recovered = await sink.wait_for("observer.recovered", timeout_s=30)
        dead = await sink.wait_for("dead", "web-0", timeout_s=20)
        grace_end = recovered[0]["at_ms"] + 3000
        assert dead[0]["at_ms"] >= grace_end - 5, "judged only after the grace period"
        await asyncio.sleep(TTL_S)
        assert [e["instance"] for e in sink.of("dead")] == ["web-0"]
        assert len(sink.of("observer.degraded")) == 1
        assert len(sink.of("observer.recovered")) == 1
    finally:
        for b in beaters[1:]:
            await b.stop()
        await sink.close()
        await drop_namespace(settings, [f"{ns}.test-sink"])


async def test_a_flapping_instance_triggers_failover_at_most_once(settings, aggregators, sink):
    """Heard, then silent past its TTL, then heard again, every half second: it is marked
    flapping, and a failover consumer bound to its deaths runs once."""
    from hbbus.failover import FailoverConsumer, RetryPolicy
    from tests.test_failover import running

    runs = []

    async def failover(event):
        runs.append(event.kind)

    consumer = FailoverConsumer(
        settings, "flap", ["dead.#", "flapping.#"], retry=RetryPolicy(max_retries=1, base_s=0.1)
    )
    consumer.on("dead")(failover)
    consumer.on("flapping")(lambda e: asyncio.sleep(0))
    await aggregators(1)
    async with running(consumer):
        for cycle in range(4):  # TTL 800 ms (200 ms x 4): silent 1 s, then heard
            await publish_beat(settings, cycle * 2 + 1)
            await asyncio.sleep(1.0)
        await publish_beat(settings, 99)
        await sink.wait_for("flapping", "s-1", timeout_s=5)
        await asyncio.sleep(0.5)
    assert runs == ["dead"], runs
    assert len(sink.of("dead", "s-1")) == 1 and len(sink.of("flapping", "s-1")) == 1
    code_rows = await _status_row(settings)
    assert code_rows["flapping"] is True


async def _status_row(settings):
    from hbbus import ops

    [row] = await ops.status(settings, "sus")
    return row


async def test_adaptive_deadlines_no_false_dead_under_jitter_and_stop_within_ceiling(
    settings, aggregators, sink
):
    import random

    from hbbus.detect import DetectorConfig
    from hbbus.store import Store

    store = Store.from_settings(settings)
    try:
        await store.detector_set("sus", DetectorConfig(k=4, floor_ms=100, ceiling_ms=1000))
    finally:
        await store.close()
    await aggregators(1)
    rng = random.Random(11)
    # gaps 100..400 ms (0.5x..2x the 200 ms interval). The first 21 beats (20 gaps: the
    # detector's warm-up, when the declared TTL still applies) declare 200 ms x 4 = 800 ms;
    # the next 39 declare 200 ms x 1 = 200 ms, which their gaps overrun: only the adaptive
    # deadline keeps it alive.
    for seq in range(1, 61):
        await publish_beat(settings, seq, misses=4 if seq <= 21 else 1)
        await asyncio.sleep(rng.uniform(0.1, 0.4))
    assert sink.of("dead") == [], "no false dead under jitter"
    dead = await sink.wait_for("dead", "s-1", timeout_s=5)
    silent = dead[0]["at_ms"] - dead[0]["last_seen_ms"]
    assert silent <= 1000 + 250, f"dead after {silent} ms; the ceiling is 1000 ms"
    assert 200 < dead[0]["ttl_ms"] <= 1000, "the adaptive deadline, not the declared 200 ms"


async def test_aggregator_start_advises_on_redis_memory_and_changes_nothing(
    base_settings, private_redis, aggregators, caplog
):
    """With Redis' default hash-max-listpack-value (64) an aggregator says once, at start and
    as a warning, what `hbbus doctor` says, and leaves the setting alone; at 1024 it says
    nothing; where CONFIG is renamed away it says so at debug level and starts all the same."""
    caplog.set_level(logging.DEBUG, logger="hbbus.aggregator")
    ns = f"t-listpack-{secrets.token_hex(3)}"
    settings = type(base_settings)(
        amqp_url=base_settings.amqp_url, redis_url=private_redis.url, namespace=ns
    )
    store = Store.from_settings(settings)
    no_config = PrivateRedis(args=("--rename-command", "CONFIG", "")).start()
    renamed = type(settings)(
        amqp_url=settings.amqp_url, redis_url=no_config.url, namespace=f"{ns}-noconfig"
    )
    started = []

    def advice() -> list[tuple[int, str]]:
        return [
            (r.levelno, r.getMessage())
            for r in caplog.records
            if "hash-max-listpack-value" in r.getMessage()
        ]

    try:
        assert await store.listpack_value() == 64  # Redis' default
        started += await aggregators(1, s=settings)
        [(level, said)] = advice()
        assert level == logging.WARNING
        assert said.startswith("Redis memory: hash-max-listpack-value is 64: ")
        assert "CONFIG SET hash-max-listpack-value 1024" in said
        assert await store.listpack_value() == 64, "the operator's setting is left alone"

        await store.redis.config_set("hash-max-listpack-value", 1024)
        started += await aggregators(1, s=settings)
        assert len(advice()) == 1, "no advice where records are kept compact"

        started += await aggregators(1, s=renamed)  # starts and consumes
        [_, (level, said)] = advice()
        assert level == logging.DEBUG
        assert said.startswith("cannot read Redis' hash-max-listpack-value: ")
    finally:
        for handle in started:  # before their queues and their Redis go
            await handle.stop()
        await drop_namespace(settings)
        await drop_namespace(renamed)
        await store.close()
        no_config.stop()
