"""The client against the shared broker: meta that goes bad, restarts of one Heartbeater."""

from __future__ import annotations

import asyncio
import decimal

import aio_pika
import pytest

from hbbus.amqp import connect, declare_heartbeats
from hbbus.client import Heartbeater
from hbbus.names import Names
from hbbus.wire import decode_heartbeat
from tests.helpers import wait_until


async def _reader(settings):
    connection = await connect(settings, "test-reader", robust=False)
    channel = await connection.channel()
    exchange = await declare_heartbeats(channel, Names(settings.namespace))
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    await queue.bind(exchange, "hb.#")
    return connection, queue


async def _read(queue: aio_pika.abc.AbstractQueue, into: list) -> list:
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        into.append(decode_heartbeat(message.body))
    return into


async def test_a_dict_meta_that_goes_bad_keeps_the_last_good_one(settings):
    connection, queue = await _reader(settings)
    meta = {"load": 1}
    beats: list = []
    async with connection:
        hb = Heartbeater("m", "m-1", interval_s=0.05, meta=meta, settings=settings)
        await hb.start()
        await wait_until(lambda: _read(queue, beats), 5, "first heartbeats")
        meta["cost"] = decimal.Decimal("1.5")  # not JSON: must not stop heartbeats
        seen = len(beats)
        await wait_until(lambda: _count_after(queue, beats, seen, 5), 5, "more heartbeats")
        assert beats[-1].meta == {"load": 1}
        del meta["cost"]
        meta["load"] = 2
        await wait_until(lambda: _has_meta(queue, beats, {"load": 2}), 5, "the fixed meta")
        await hb.stop()
        await wait_until(lambda: _has_status(queue, beats, "left"), 5, "left")


async def test_stop_during_a_beat_does_not_wait_for_the_next_one(settings):
    """stop() while a beat is under way (its meta still being computed) ends the loop after
    that beat and sends ``left``, instead of sleeping through the 10 s interval first."""
    computing = asyncio.Event()

    async def meta():
        computing.set()
        await asyncio.sleep(0.3)
        return {"load": 1}

    hb = Heartbeater("m", "m-1", interval_s=10, meta=meta, settings=settings)
    await hb.start()
    await asyncio.wait_for(computing.wait(), 5)
    async with asyncio.timeout(5):  # the fault made this take the whole interval (10 s)
        await hb.stop()
    assert hb.sent == 2  # the beat under way, then left


async def _count_after(queue, beats, seen, n):
    await _read(queue, beats)
    return len(beats) >= seen + n


async def _has_meta(queue, beats, meta):
    await _read(queue, beats)
    return beats and beats[-1].meta == meta


async def _has_status(queue, beats, status):
    await _read(queue, beats)
    return beats and beats[-1].status == status


async def test_a_heartbeater_can_be_stopped_and_started_again(settings):
    connection, queue = await _reader(settings)
    beats: list = []
    async with connection:
        hb = Heartbeater("r", "r-1", interval_s=0.05, settings=settings)
        await hb.start()
        await hb.stop()
        assert not hb.connected
        await _read(queue, beats)
        stopped_at = len(beats)
        assert beats[-1].status == "left"
        await hb.start()
        assert hb.connected
        await wait_until(
            lambda: _count_after(queue, beats, stopped_at, 3),
            5,
            "heartbeats after the second start",
        )
        assert beats[-1].status == "ok" and beats[-1].seq > beats[stopped_at - 1].seq
        await hb.stop()


async def test_a_heartbeat_carries_its_amqp_properties(settings):
    """The client writes its publish frames itself (hbbus.client._payload): the message
    arrives transient, as JSON, without a message id (the body's seq identifies a beat)."""
    connection, queue = await _reader(settings)
    async with connection:
        hb = Heartbeater("p", "p-1", interval_s=0.05, meta={"zone": "eu-1"}, settings=settings)
        await hb.start()
        try:
            messages: list[aio_pika.abc.AbstractIncomingMessage] = []

            async def three() -> bool:
                while (m := await queue.get(no_ack=True, fail=False)) is not None:
                    messages.append(m)
                return len(messages) >= 3

            await wait_until(three, 5, "3 heartbeats")
        finally:
            await hb.stop(leave=False)
    for message in messages:
        beat = decode_heartbeat(message.body, message.routing_key)
        assert (beat.service, beat.instance, beat.meta) == ("p", "p-1", {"zone": "eu-1"})
        assert message.routing_key == "hb.p.p-1"
        assert message.content_type == "application/json"
        assert message.delivery_mode == aio_pika.DeliveryMode.NOT_PERSISTENT
        assert message.message_id is None  # the body's seq identifies a beat
        assert message.exchange == Names(settings.namespace).heartbeats_exchange


async def test_a_nested_change_in_a_dict_meta_goes_out(settings):
    """A dict meta is read every beat: a value changed in place deep inside it, or to one
    that compares equal but encodes differently (1 -> True), goes out with the next beats."""
    connection, queue = await _reader(settings)
    meta = {"stats": {"load": 1}}
    beats: list = []
    async with connection:
        hb = Heartbeater("n", "n-1", interval_s=0.05, meta=meta, settings=settings)
        await hb.start()
        try:
            await wait_until(lambda: _has_meta(queue, beats, {"stats": {"load": 1}}), 5, "meta")
            meta["stats"]["load"] = True  # == 1 in Python, but `true` in JSON

            async def sends_true() -> bool:
                await _read(queue, beats)
                return bool(beats) and beats[-1].meta["stats"]["load"] is True

            await wait_until(sends_true, 5, "load: true")
            meta["stats"]["load"] = 2
            await wait_until(lambda: _has_meta(queue, beats, {"stats": {"load": 2}}), 5, "load 2")
        finally:
            await hb.stop(leave=False)


async def test_a_caller_cancelled_while_stop_or_abort_waits_is_cancelled(settings):
    """The caller's cancel is raised, never swallowed; a cancelled ``stop`` does not cancel
    the heartbeat task's ``left``, it is sent all the same."""
    connection, queue = await _reader(settings)
    beats: list = []
    async with connection:
        hb = Heartbeater("c", "c-1", interval_s=0.05, settings=settings)
        await hb.start()
        stopping = asyncio.ensure_future(hb.stop())
        await asyncio.sleep(0)  # stop() waits for the task now
        stopping.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stopping
        await wait_until(lambda: _has_status(queue, beats, "left"), 5, "left all the same")
        task = hb._task
        assert task is not None
        await wait_until(task.done, 5, "the heartbeat task ended")
        assert not hb.connected
        await hb.start()  # the task has ended: it starts again
        assert hb.connected
        await hb.stop()

        hb = Heartbeater("c", "c-2", interval_s=0.05, settings=settings)
        await hb.start()
        task = hb._task
        aborting = asyncio.ensure_future(hb.abort())
        await asyncio.sleep(0)
        aborting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await aborting
        await wait_until(lambda: task.done(), 5, "the heartbeat task ended")
