"""The heartbeat client: a broker outage only pauses heartbeats, an absent broker never blocks
or breaks the host, the thread-based client, and a failing meta callable.

The outage tests stop and start a RabbitMQ node of their own (tests/servers.py), one of them
under an aggregator told to stop meanwhile; the shared broker is only ever used, never
stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aio_pika
import pytest

from hbbus.amqp import connect, declare_heartbeats
from hbbus.client import Heartbeater, SyncHeartbeater
from hbbus.names import Names
from hbbus.settings import Settings
from hbbus.wire import Heartbeat, decode_heartbeat
from tests.helpers import rss_bytes, wait_until
from tests.servers import free_port

INTERVAL_S = 0.1


class Reader:
    """A queue bound to a namespace's heartbeats exchange ('hb.#'), read with basic.get."""

    def __init__(self, settings: Settings, queue_name: str | None = None) -> None:
        self.settings = settings
        self.queue_name = queue_name  # None: an exclusive server-named queue
        self.beats: list[Heartbeat] = []
        self.connection: aio_pika.abc.AbstractConnection | None = None
        self.queue: aio_pika.abc.AbstractQueue | None = None

    async def open(self) -> Reader:
        """(Re)connect; declaring a durable queue that is already there is a no-op."""
        self.connection = await connect(self.settings, "test-heartbeat-reader", robust=False)
        channel = await self.connection.channel()
        exchange = await declare_heartbeats(channel, Names(self.settings.namespace))
        if self.queue_name is None:
            self.queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        else:
            self.queue = await channel.declare_queue(self.queue_name, durable=True)
        await self.queue.bind(exchange, "hb.#")
        return self

    async def drain(self) -> list[Heartbeat]:
        """Fetch what is in the queue now; return everything read so far."""
        assert self.queue is not None
        while (message := await self.queue.get(no_ack=True, fail=False, timeout=5)) is not None:
            self.beats.append(decode_heartbeat(message.body, message.routing_key))
        return self.beats

    async def close(self) -> None:
        if self.connection is not None:
            with contextlib.suppress(Exception):  # may be dead already (broker stopped)
                await self.connection.close()
            self.connection = None


@pytest.fixture
async def readers() -> AsyncIterator[Callable[..., Any]]:
    opened: list[Reader] = []

    async def open_reader(settings: Settings, queue_name: str | None = None) -> Reader:
        reader = await Reader(settings, queue_name).open()
        opened.append(reader)
        return reader

    yield open_reader
    for reader in opened:
        await reader.close()


def assert_in_order(beats: list[Heartbeat]) -> None:
    seqs = [b.seq for b in beats]
    assert seqs == sorted(set(seqs)), f"seqs not strictly increasing: {seqs}"


async def test_broker_outage_pauses_heartbeats_same_incarnation(private_rabbit, readers, caplog):
    caplog.set_level(logging.WARNING, logger="hbbus.client")
    settings = Settings(amqp_url=private_rabbit.url, namespace=f"t-outage-{secrets.token_hex(3)}")
    queue_name = f"{settings.namespace}.test-reader"
    reader = await readers(settings, queue_name)
    hb = Heartbeater(
        "svc",
        "svc-1",
        interval_s=INTERVAL_S,
        settings=settings,
        connect_timeout_s=2.0,
        max_backoff_s=1.0,
    )
    try:
        await hb.start()
        assert hb.connected and hb.connects == 1
        before = await wait_until(lambda: _at_least(reader, 3), 10, "3 beats before the outage")
        assert {b.incarnation for b in before} == {hb.incarnation}
        assert_in_order(before)
        max_before = max(b.seq for b in before)

        t0 = time.monotonic()
        await asyncio.to_thread(private_rabbit.stop_app)
        await wait_until(lambda: not hb.connected, 10, "the heartbeater to notice the outage")
        noticed_s = time.monotonic() - t0
        await reader.close()
        assert hb._task is not None and not hb._task.done(), "the background task must live on"

        await asyncio.to_thread(private_rabbit.start_app)
        t1 = time.monotonic()
        await wait_until(lambda: hb.connected, 20, "the heartbeater to reconnect")
        reconnect_s = time.monotonic() - t1
        await reader.open()  # the durable queue survived stop_app/start_app

        def after() -> list[Heartbeat]:
            return [b for b in reader.beats if b.seq > max_before]

        async def three_after() -> list[Heartbeat]:
            await reader.drain()
            return after() if len(after()) >= 3 else []

        resumed = await wait_until(three_after, 10, "3 heartbeats after the restart")
        assert {b.incarnation for b in resumed} == {hb.incarnation}, "incarnation must not change"
        assert all(b.service == "svc" and b.instance == "svc-1" for b in resumed)
        assert_in_order(resumed)
        assert hb.connects >= 2
        assert any("connection lost or refused" in r.getMessage() for r in caplog.records)
        logging.getLogger(__name__).info(
            "outage noticed after %.2fs, reconnected %.2fs after start_app", noticed_s, reconnect_s
        )

        await asyncio.wait_for(hb.stop(), 5)
        last = await wait_until(lambda: _last_status(reader, "left"), 5, "the `left` heartbeat")
        assert last.incarnation == hb.incarnation and last.seq == hb.seq
    finally:
        await hb.abort()
        if reader.connection is not None and not reader.connection.is_closed:
            channel = await reader.connection.channel()
            await channel.queue_delete(queue_name)


async def _at_least(reader: Reader, n: int) -> list[Heartbeat]:
    beats = await reader.drain()
    return beats if len(beats) >= n else []


async def _last_status(reader: Reader, status: str) -> Heartbeat | None:
    beats = await reader.drain()
    return beats[-1] if beats and beats[-1].status == status else None


async def test_a_broker_that_stops_reading_costs_the_client_bounded_memory(private_rabbit, readers):
    """Guarantee 5 under a broker memory alarm: RabbitMQ stops reading from the publishing
    connection while the TCP connection stays up. The beats that cannot be written are
    dropped instead of piling up in memory, the connection is kept, and beats flow again,
    same incarnation, once the alarm clears."""
    settings = Settings(amqp_url=private_rabbit.url, namespace=f"t-alarm-{secrets.token_hex(3)}")
    reader = await readers(settings)
    # 7 KB beats every millisecond: up to 7 MB a second offered to a socket nobody reads
    hb = Heartbeater("svc", "svc-1", interval_s=0.001, settings=settings, meta={"pad": "x" * 7000})
    beat_bytes = len(hb.body("ok"))
    try:
        await hb.start()
        await wait_until(lambda: _at_least(reader, 3), 10, "beats before the alarm")
        await asyncio.to_thread(private_rabbit.memory_alarm, True)
        # the kernel's socket buffers fill first (megabytes); then nothing more is written
        quiet = {"sent": hb.sent, "seq": hb.seq}

        def writes_stopped() -> bool:
            if hb.sent != quiet["sent"]:
                quiet.update(sent=hb.sent, seq=hb.seq)
                return False
            return hb.seq - quiet["seq"] >= 200

        await wait_until(writes_stopped, 30, "writes to stop while the broker is blocked")
        seq0, dropped0, sent0, rss0 = hb.seq, hb.dropped, hb.sent, rss_bytes()
        more = 5000  # 35 MB offered: were they kept, memory would grow by that much
        await wait_until(lambda: hb.seq >= seq0 + more, 30, f"{more} more beats")
        grown = rss_bytes() - rss0
        assert grown < 10 * 2**20, f"memory grew by {grown / 2**20:.1f} MB while blocked"
        assert hb.dropped - dropped0 >= more * 0.9, "the beats that cannot go are dropped"
        assert (hb.sent - sent0) * beat_bytes < 4 * 2**20, "nothing is written to a blocked peer"
        assert hb.connected and hb.connects == 1  # paused, not torn down

        await asyncio.to_thread(private_rabbit.memory_alarm, False)
        seq1 = hb.seq

        async def resumed() -> list[Heartbeat]:
            beats = await reader.drain()
            return [b for b in beats if b.seq > seq1]

        after = await wait_until(resumed, 20, "beats after the alarm cleared")
        assert {b.incarnation for b in after} == {hb.incarnation}
        assert_in_order(reader.beats)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.to_thread(private_rabbit.memory_alarm, False)
        await hb.abort()


async def test_start_without_broker_never_raises_and_stops_promptly(caplog):
    caplog.set_level(logging.WARNING, logger="hbbus.client")
    port = free_port()  # nothing listens there
    settings = Settings(
        amqp_url=f"amqp://guest:guest@127.0.0.1:{port}/",
        namespace=f"t-nobroker-{secrets.token_hex(3)}",
    )
    hb = Heartbeater(
        "svc", "svc-1", interval_s=INTERVAL_S, settings=settings, connect_timeout_s=0.5
    )
    try:
        t0 = time.monotonic()
        await asyncio.wait_for(hb.start(), 5)
        assert time.monotonic() - t0 < 2.0
        assert not hb.connected
        assert hb._task is not None and not hb._task.done(), "it must keep trying"
        await wait_until(
            lambda: (
                sum("connection lost or refused" in r.getMessage() for r in caplog.records) >= 2
            ),
            5,
            "two failed attempts",
        )
        t1 = time.monotonic()
        await asyncio.wait_for(hb.stop(), 5)
        assert time.monotonic() - t1 < 1.5
        assert hb.connects == 0 and hb.sent == 0 and not hb.connected
    finally:
        await hb.abort()


async def test_sync_heartbeater_in_a_thread(settings, readers):
    reader = await readers(settings)
    enough = threading.Event()
    started: list[SyncHeartbeater] = []

    def run() -> None:
        with SyncHeartbeater(
            "sync", "s-1", interval_s=INTERVAL_S, settings=settings, meta=lambda: {"load": 0.5}
        ) as shb:
            started.append(shb)
            assert enough.wait(15), "the test never saw enough heartbeats"

    t0 = time.monotonic()
    worker = asyncio.ensure_future(asyncio.to_thread(run))
    try:
        beats = await wait_until(lambda: _at_least(reader, 5), 10, "5 heartbeats from the thread")
    finally:
        enough.set()
        await asyncio.wait_for(worker, 15)
    ran_s = time.monotonic() - t0
    assert started and not started[0]._thread, "the thread must have been joined"

    last = await wait_until(lambda: _last_status(reader, "left"), 5, "the `left` heartbeat")
    beats = reader.beats
    assert last is beats[-1]
    assert all(b.meta == {"load": 0.5} for b in beats)
    assert all(b.status == "ok" for b in beats[:-1])
    assert {b.incarnation for b in beats} == {started[0].heartbeater.incarnation}
    assert {(b.service, b.instance) for b in beats} == {("sync", "s-1")}
    assert_in_order(beats)
    assert ran_s < 5


class FlakyMeta:
    """Good meta for the first ``good`` calls, then raises (sync or async)."""

    def __init__(self, good: int, is_async: bool) -> None:
        self.good = good
        self.calls = 0
        self.is_async = is_async

    def _value(self) -> dict[str, Any]:
        self.calls += 1
        if self.calls > self.good:
            raise RuntimeError(f"meta broke on call {self.calls}")
        return {"call": self.calls}

    def __call__(self) -> Any:
        if not self.is_async:
            return self._value()

        async def value() -> dict[str, Any]:
            return self._value()

        return value()


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("good", [0, 2], ids=["always-raises", "raises-after-2"])
async def test_raising_meta_does_not_stop_heartbeats(settings, readers, caplog, good, is_async):
    caplog.set_level(logging.WARNING, logger="hbbus.client")
    reader = await readers(settings)
    meta = FlakyMeta(good, is_async)
    expected = {"call": good} if good else {}
    async with Heartbeater(
        "flaky", "f-1", interval_s=INTERVAL_S, settings=settings, meta=meta
    ) as hb:
        beats = await wait_until(lambda: _at_least(reader, good + 5), 10, f"{good + 5} heartbeats")
        assert hb.connected
    assert [b.meta for b in beats[:good]] == [{"call": i + 1} for i in range(good)]
    assert all(b.meta == expected for b in beats[good:]), [b.meta for b in beats]
    assert meta.calls >= good + 5
    assert_in_order(beats)
    # logged once per failure streak, not once per heartbeat
    assert sum("meta is unusable" in r.getMessage() for r in caplog.records) == 1
    last = await wait_until(lambda: _last_status(reader, "left"), 5, "the `left` heartbeat")
    assert last.meta == expected


async def test_a_large_meta_goes_out_in_several_body_frames(private_rabbit, readers):
    """The client marshals its own publish frames: a body larger than the connection's
    frame_max is split across body frames, and the broker takes it whole."""
    settings = Settings(amqp_url=private_rabbit.url, namespace=f"t-frames-{secrets.token_hex(3)}")
    before = private_rabbit.get_env("frame_max")
    private_rabbit.set_env("frame_max", "4096")  # the least AMQP allows
    try:
        reader = await readers(settings)
        assert reader.connection is not None
        tune = reader.connection.transport.connection.connection_tune  # type: ignore[union-attr]
        assert tune.frame_max == 4096, "the node did not take the smaller frame_max"
        meta = {"blob": "x" * 6000, "zone": "eu-1"}
        hb = Heartbeater("big", "big-1", interval_s=INTERVAL_S, meta=meta, settings=settings)
        await hb.start()
        try:
            beats = await wait_until(lambda: _at_least(reader, 3), 10, "3 large heartbeats")
        finally:
            await hb.stop()
    finally:
        private_rabbit.set_env("frame_max", before)
    assert all(b.meta == meta for b in beats)
    assert hb.dropped == 0
    assert_in_order(beats)


async def test_an_aggregator_told_to_stop_during_a_broker_outage_stops(
    private_rabbit, aggregators, settings
):
    """A stop while the broker is away (SIGTERM during an outage): the aggregator does not
    wait for the broker to come back to cancel a consumer that went with the connection."""
    [proc] = await aggregators(1, s=dataclasses.replace(settings, amqp_url=private_rabbit.url))
    agg = proc.aggregator
    assert agg._consumer_tag is not None
    await asyncio.to_thread(private_rabbit.stop_app)
    try:
        await wait_until(lambda: agg._consume_channel.is_closed, 10, "the channel to go")
        # as a Redis outage meanwhile stops consuming: no wait for the broker
        await asyncio.wait_for(agg._stop_consuming(), 3)
        assert agg._consumer_tag is None
        agg._want_consumer = True  # as it was
        proc.stop_event.set()
        done, _ = await asyncio.wait({proc.task}, timeout=30)
        assert done, "the aggregator is still waiting for the broker"
        assert proc.task.exception() is None
    finally:
        await asyncio.to_thread(private_rabbit.start_app)
