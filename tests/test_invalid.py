"""Guarantee 4: bad input is refused with a reason, counted, parked; the worker keeps going."""

from __future__ import annotations

import aio_pika
import orjson

from hbbus.amqp import connect, declare_heartbeats
from hbbus.names import Names
from hbbus.store import Store
from hbbus.wire import Heartbeat
from tests.helpers import wait_until


async def test_malformed_oversized_misnamed_are_parked_and_counted(settings, aggregators, sink):
    aggs = await aggregators(1)
    names = Names(settings.namespace)
    good = Heartbeat("ok", "ok-1", "inc", 1, 200, 3, 0, "ok", {})
    bad = {
        "hb.x.y": b"{not json",
        "hb.big.big-1": Heartbeat(
            "big", "big-1", "inc", 1, 200, 3, 0, "ok", {"blob": "x" * 9000}
        ).encode(),
        "hb.bad.name": orjson.dumps({**orjson.loads(good.encode()), "svc": "bad name!"}),
        "hb.ver.v": orjson.dumps({"v": 99}),
        "hb.ok.other": good.encode(),  # routing key does not match the body
    }
    connection = await connect(settings, "test", robust=False)
    async with connection:
        channel = await connection.channel()
        exchange = await declare_heartbeats(channel, names)
        for key, body in bad.items():
            await exchange.publish(aio_pika.Message(body), key)
        await exchange.publish(aio_pika.Message(good.encode()), good.routing_key)
        # the aggregator is still alive and applied the good heartbeat after the bad ones
        await sink.wait_for("joined", "ok-1")
        parked_queue = await channel.declare_queue(names.invalid_queue, passive=True)
        parked = []
        await wait_until(lambda: _drain(parked_queue, parked, len(bad)), 5, "5 parked messages")
    reasons = sorted(m.headers["x-hbbus-reason"] for m in parked)
    assert reasons == ["malformed", "name", "oversized", "routing-key", "version"]
    oversized = next(m for m in parked if m.headers["x-hbbus-reason"] == "oversized")
    assert oversized.headers["x-hbbus-size"] > 9000 and len(oversized.body) <= 8192
    assert all(m.headers["x-hbbus-detail"] for m in parked)
    assert aggs[0].aggregator.counts["invalid"] == 5
    assert not aggs[0].task.done()
    store = Store.from_settings(settings)
    try:
        stats = await store.stats()
    finally:
        await store.close()
    assert {k: v for k, v in stats.items() if k.startswith("invalid:")} == {
        "invalid:malformed": 1,
        "invalid:name": 1,
        "invalid:oversized": 1,
        "invalid:routing-key": 1,
        "invalid:version": 1,
    }


async def _drain(queue, into, want):
    message = await queue.get(fail=False, no_ack=True)
    if message is not None:
        into.append(message)
    return len(into) >= want
