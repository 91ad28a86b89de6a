"""The workers' buffered AMQP frame reader (hbbus.amqp.BufferedFrameReceiver): pure parsing
against pamqp's own marshalling, then a real broker connection that reads through it."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
from types import SimpleNamespace

import aio_pika
import aiormq
import aiormq.connection
import aiormq.exceptions
import pamqp.frame
import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from pamqp import commands, heartbeat
from pamqp.body import ContentBody
from pamqp.header import ContentHeader, ProtocolHeader

import hbbus.frames
from hbbus.amqp import connect, use_buffered_frame_reader
from hbbus.frames import BufferedFrameReceiver
from hbbus.settings import Settings
from tests.helpers import wait_until


def wire() -> tuple[bytes, list[tuple[int, object]]]:
    """A conversation as the broker writes it: marshalled frames and what each one is."""
    body = b'{"v":1,"s":"web","i":"web-0"}'
    frames: list[tuple[int, object]] = [
        (0, commands.Connection.Tune(channel_max=2047, frame_max=131072, heartbeat=60)),
        (1, commands.Basic.Deliver("ctag", 1, False, "hbbus.heartbeats", "hb.web.web-0")),
        (1, ContentHeader(0, len(body))),
        (1, ContentBody(body)),
        (0, heartbeat.Heartbeat()),
        (1, commands.Basic.Deliver("ctag", 2, True, "x", "rk")),
        (1, ContentHeader(0, 300_000)),
        (1, ContentBody(b"y" * 131_064)),  # a body over several frames
        (1, ContentBody(b"y" * 131_064)),
        (1, ContentBody(b"y" * 37_872)),
        (3, commands.Channel.Close(406, "PRECONDITION_FAILED", 60, 40)),
    ]
    data = b"".join(pamqp.frame.marshal(frame, channel) for channel, frame in frames)
    return data, frames


def reader_of(chunks: list[bytes], eof: bool = True) -> asyncio.StreamReader:
    """A stream holding ``chunks`` (merged: a read returns all of it, up to its limit)."""
    reader = asyncio.StreamReader()
    for chunk in chunks:
        reader.feed_data(chunk)
    if eof:
        reader.feed_eof()
    return reader


async def reading(reader: asyncio.StreamReader) -> None:
    """Until a read waits on ``reader`` for more data."""
    await wait_until(lambda: reader._waiter is not None, 5, "a read waiting for data")


class ChunkReader:
    """A stream whose every read returns one of ``chunks`` (never merged: as a socket that
    delivered them one by one), then the end."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = [c for c in chunks if c]

    async def read(self, n: int) -> bytes:
        await asyncio.sleep(0)
        if not self.chunks:
            return b""
        chunk = self.chunks.pop(0)
        if len(chunk) > n:
            chunk, rest = chunk[:n], chunk[n:]
            self.chunks.insert(0, rest)
        return chunk

    def at_eof(self) -> bool:
        return not self.chunks


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


async def read_all(receiver: BufferedFrameReceiver) -> list[tuple[int, object]]:
    got = []
    while True:
        try:
            _, channel, frame = await receiver.get_frame()
        except StopAsyncIteration:
            return got
        got.append((channel, frame))


def same(got: list[tuple[int, object]], want: list[tuple[int, object]]) -> None:
    """The same frames on the same channels: each marshals to the same bytes again."""
    assert [(c, type(f)) for c, f in got] == [(c, type(f)) for c, f in want]
    for (c, g), (_, w) in zip(got, want, strict=True):
        assert pamqp.frame.marshal(g, c) == pamqp.frame.marshal(w, c)  # type: ignore[arg-type]


@hsettings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=310_000), max_size=40))
def test_frames_come_out_whole_however_the_bytes_arrive(cuts):
    data, frames = wire()

    async def go() -> list[tuple[int, object]]:
        return await read_all(BufferedFrameReceiver(ChunkReader(split(data, cuts))))  # type: ignore[arg-type]

    same(asyncio.run(go()), frames)


async def test_we_read_what_aiormqs_own_reader_reads():
    """The same (bytes consumed, channel, frame) tuples as aiormq's FrameReceiver, with the
    bytes arriving in 1-byte and 5-byte pieces."""
    data, _ = wire()
    stock = BufferedFrameReceiver.__bases__[0]
    assert stock.__module__ == "aiormq.connection"
    theirs = stock(reader_of([data]))
    want = []
    while len(want) < len(wire()[1]):
        want.append(await theirs.get_frame())
    for size in (1, 5):
        chunks = [data[i : i + size] for i in range(0, len(data), size)]
        ours = BufferedFrameReceiver(ChunkReader(chunks))  # type: ignore[arg-type]
        got = [await ours.get_frame() for _ in want]
        assert [(w, c) for w, c, _ in got] == [(w, c) for w, c, _ in want]
        same([(c, f) for _, c, f in got], [(c, f) for _, c, f in want])


async def test_a_frame_larger_than_a_read(monkeypatch):
    monkeypatch.setattr(hbbus.frames, "READ_CHUNK", 100)
    data, frames = wire()
    same(await read_all(BufferedFrameReceiver(reader_of([data]))), frames)


async def test_a_reset_connection_is_a_connection_error():
    reader = reader_of([], eof=False)
    reader.set_exception(ConnectionResetError("reset by peer"))
    with pytest.raises(aiormq.exceptions.AMQPConnectionError, match="reset"):
        await BufferedFrameReceiver(reader).get_frame()


async def test_frames_split_at_every_byte_of_a_delivery():
    _, frames = wire()
    small = b"".join(pamqp.frame.marshal(f, c) for c, f in frames[1:5])
    for cut in range(1, len(small)):
        receiver = BufferedFrameReceiver(ChunkReader([small[:cut], small[cut:]]))  # type: ignore[arg-type]
        same(await read_all(receiver), frames[1:5])


async def test_the_weight_is_the_frame_length():
    """aiormq's reader gets (bytes consumed, channel, frame), as from pamqp.frame.unmarshal."""
    data, frames = wire()
    receiver = BufferedFrameReceiver(reader_of([data]))
    first = pamqp.frame.marshal(frames[0][1], 0)
    weight, channel, frame = await receiver.get_frame()
    assert (weight, channel) == (len(first), 0)
    assert isinstance(frame, commands.Connection.Tune)


async def test_a_frame_waits_for_its_last_byte():
    data, _ = wire()
    reader = reader_of([data[:19]], eof=False)  # Tune is 20 bytes
    receiver = BufferedFrameReceiver(reader)
    pending = asyncio.ensure_future(receiver.get_frame())
    await reading(reader)
    assert not pending.done()
    reader.feed_data(data[19:])
    _, _, frame = await asyncio.wait_for(pending, 1)
    assert isinstance(frame, commands.Connection.Tune)


async def test_the_broker_refusing_our_protocol_version_is_a_syntax_error():
    reader = reader_of([ProtocolHeader(0, 9, 1).marshal()])
    with pytest.raises(aiormq.exceptions.ProtocolSyntaxError, match="protocol header"):
        await BufferedFrameReceiver(reader).get_frame()


async def test_a_connection_closed_inside_a_frame_is_a_connection_error():
    data, _ = wire()
    receiver = BufferedFrameReceiver(reader_of([data[:30]]))
    await receiver.get_frame()  # the Tune frame is whole
    with pytest.raises(aiormq.exceptions.AMQPConnectionError, match="unexpectedly closed"):
        await receiver.get_frame()


async def test_a_connection_closed_while_waiting_is_a_connection_error():
    """As aiormq's reader: the end of the stream while a read waits is an error (a robust
    connection reconnects on it); only an end already seen between frames stops the loop."""
    reader = reader_of([], eof=False)
    pending = asyncio.ensure_future(BufferedFrameReceiver(reader).get_frame())
    await reading(reader)
    reader.feed_eof()
    with pytest.raises(aiormq.exceptions.AMQPConnectionError, match="unexpectedly closed"):
        await asyncio.wait_for(pending, 1)


async def test_a_frame_without_its_end_byte_is_refused():
    data = bytearray(pamqp.frame.marshal(commands.Basic.Ack(1), 1))
    data[-1] = 0
    with pytest.raises(aiormq.exceptions.InvalidFrameError):
        await BufferedFrameReceiver(reader_of([bytes(data)])).get_frame()


def receivers_built(monkeypatch: pytest.MonkeyPatch) -> list[BufferedFrameReceiver]:
    """The buffered readers built from now on (one per connection opened)."""
    used: list[BufferedFrameReceiver] = []
    real_init = BufferedFrameReceiver.__init__

    def counting_init(self: BufferedFrameReceiver, reader: asyncio.StreamReader) -> None:
        real_init(self, reader)
        used.append(self)

    monkeypatch.setattr(BufferedFrameReceiver, "__init__", counting_init)
    return used


async def test_a_connection_reads_through_the_buffered_reader(settings, monkeypatch):
    """A real connection opens, consumes a large body and many small ones, and closes, all
    through the buffered reader; use_buffered_frame_reader is idempotent."""
    monkeypatch.setattr(aiormq.connection, "FrameReceiver", aiormq.connection.FrameReceiver)
    assert use_buffered_frame_reader()
    assert use_buffered_frame_reader()
    assert aiormq.connection.FrameReceiver is BufferedFrameReceiver
    used = receivers_built(monkeypatch)
    connection = await connect(settings, "test-buffered-reader", robust=False)
    async with connection:
        assert len(used) == 1, "the connection did not read through the buffered reader"
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        bodies = [b"z" * 400_000] + [str(i).encode() for i in range(2000)]
        for body in bodies:
            await channel.default_exchange.publish(aio_pika.Message(body), queue.name)
        got: list[bytes] = []

        async def on_message(message) -> None:  # type: ignore[no-untyped-def]
            got.append(message.body)
            await message.ack()

        await queue.consume(on_message)
        await wait_until(lambda: len(got) == len(bodies), 20, "every message")
        assert got == bodies


async def test_the_buffer_keeps_only_what_is_not_handed_out():
    """Memory stays bounded: what was handed out is dropped before the next read."""
    one = b"".join(pamqp.frame.marshal(f, c) for c, f in wire()[1][1:4])
    reader = reader_of([], eof=False)
    receiver = BufferedFrameReceiver(reader)
    for _ in range(500):
        reader.feed_data(one)
        for _ in range(3):
            await receiver.get_frame()
    reader.feed_data(one[:10])
    pending = asyncio.ensure_future(receiver.get_frame())
    await reading(reader)
    assert len(receiver._buffer) - receiver._pos <= 10
    assert len(receiver._buffer) <= 2 * len(one)
    pending.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await pending


async def test_a_robust_connection_reading_through_it_survives_a_broker_restart(
    private_rabbit, monkeypatch
):
    """The aggregator's connection: robust, reading through the buffered reader. The broker
    stops (the reader sees the end of the stream) and starts again; the connection comes back
    and a consumer gets messages again, reading through a new buffered reader."""
    monkeypatch.setattr(aiormq.connection, "FrameReceiver", aiormq.connection.FrameReceiver)
    assert use_buffered_frame_reader()
    used = receivers_built(monkeypatch)
    name = f"t-frames-restart-{secrets.token_hex(3)}"
    settings = Settings(amqp_url=private_rabbit.url, namespace=name)
    connection = await connect(settings, "test-buffered-restart")
    try:
        assert len(used) == 1
        channel = await connection.channel()
        queue = await channel.declare_queue(name, durable=False, auto_delete=False)
        got: list[bytes] = []

        async def on_message(message) -> None:  # type: ignore[no-untyped-def]
            got.append(message.body)
            await message.ack()

        await queue.consume(on_message)
        await channel.default_exchange.publish(aio_pika.Message(b"before"), queue.name)
        await wait_until(lambda: got == [b"before"], 10, "a message before the restart")
        await asyncio.to_thread(private_rabbit.stop_app)
        await asyncio.to_thread(private_rabbit.start_app)

        async def publish_after() -> bool:  # confirmed: the robust connection is back
            try:
                await channel.default_exchange.publish(aio_pika.Message(b"after"), queue.name)
            except Exception:
                await asyncio.sleep(0.2)
                return False
            return True

        await wait_until(publish_after, 30, "a confirmed publish after the restart")
        await wait_until(lambda: b"after" in got, 30, "a message after the restart")
        assert len(used) >= 2, "the reconnected connection did not read through it"
    finally:
        await connection.close()


# -- deliveries handed out directly --------------------------------------------------------
class StubChannel:
    """What the reader reads of an aiormq channel: its number, frame queue, consumers, state
    and its connection's channels."""

    def __init__(self, number: int = 1) -> None:
        self.number = number
        self.frames: asyncio.Queue = asyncio.Queue()
        self.consumers: dict[str, object] = {"ctag": None}
        self.is_closed = False
        self.connection = SimpleNamespace(channels={number: self})


def deliveries() -> list[tuple[int, object]]:
    """Deliveries on channel 1 (empty, small and many-frame bodies, one for a consumer the
    channel does not know) among frames of other channels."""
    out: list[tuple[int, object]] = []
    for tag in range(1, 31):
        body = b"" if tag == 3 else b"x" * 300_000 if tag == 9 else b'{"n":%d}' % tag
        ctag = "other" if tag == 17 else "ctag"
        key = f"hb.web.web-{tag}-\u00e9"  # a non-ASCII routing key
        out.append((1, commands.Basic.Deliver(ctag, tag, tag % 2 == 0, "hbbus.hb", key)))
        out.append((1, ContentHeader(0, len(body))))
        out += [(1, ContentBody(body[i : i + 131_064])) for i in range(0, len(body), 131_064)]
        if tag % 7 == 0:
            out.append((2, commands.Basic.Ack(tag)))
        if tag % 11 == 0:
            out.append((0, heartbeat.Heartbeat()))
    return out


async def read_channel(
    channel: StubChannel, got: list[tuple[str, object]], others: list[tuple[int, object]]
) -> None:
    """As aiormq's channel reader with the aggregator's hook: deliveries from the queue."""

    async def next_frame() -> object:
        frame = await channel.frames.get()
        channel.frames.task_done()
        return frame

    while True:
        frame = await next_frame()
        if not isinstance(frame, commands.Basic.Deliver):
            others.append((channel.number, frame))
            continue
        header = await next_frame()
        assert isinstance(header, ContentHeader)
        body = b""
        while len(body) < header.body_size:
            body += (await next_frame()).value  # type: ignore[attr-defined]
        if frame.consumer_tag in channel.consumers:
            got.append(("aiormq", (frame, body)))


async def connection_reading(
    chunks: list[bytes], channel: StubChannel, *, channel_reader: bool = True
) -> tuple[list[tuple[str, object]], list[tuple[int, object]]]:
    """As an aiormq connection reads through the buffered reader with ``channel`` registered:
    frames of the channel go to its queue, a channel reader (as aiormq's, with the
    aggregator's hook) reads deliveries from it. Returns what the consumer got, in order
    (``("direct", Delivery)`` or ``("aiormq", (Deliver, body))``), and the other frames."""
    got: list[tuple[str, object]] = []
    others: list[tuple[int, object]] = []
    receiver = BufferedFrameReceiver(ChunkReader(chunks))  # type: ignore[arg-type]
    receiver.deliver_directly(channel, lambda d: got.append(("direct", d)))  # type: ignore[arg-type]

    reader = asyncio.create_task(read_channel(channel, got, others)) if channel_reader else None
    try:
        while True:
            try:
                _, number, frame = await receiver.get_frame()
            except StopAsyncIteration:
                break
            if number == channel.number:
                await channel.frames.put(frame)
            else:
                others.append((number, frame))
        if reader is not None:
            await asyncio.wait_for(channel.frames.join(), 5)
    finally:
        if reader is not None:
            reader.cancel()
    return got, others


def as_sent(got: list[tuple[str, object]]) -> list[tuple[str, int, bool, str, str, bytes]]:
    """What the consumer got, as (consumer tag, delivery tag, redelivered, exchange,
    routing key, body), whichever way it came."""
    out = []
    for how, item in got:
        if how == "direct":
            d = item
            out.append(
                (d.consumer_tag, d.delivery_tag, d.redelivered, d.exchange, d.routing_key, d.body)  # type: ignore[attr-defined]
            )
        else:
            f, body = item  # type: ignore[misc]
            out.append(
                (f.consumer_tag, f.delivery_tag, f.redelivered, f.exchange, f.routing_key, body)
            )
    return out


def wanted() -> list[tuple[str, int, bool, str, str, bytes]]:
    frames = deliveries()
    out = []
    for i, (_, frame) in enumerate(frames):
        if isinstance(frame, commands.Basic.Deliver) and frame.consumer_tag == "ctag":
            body = b"".join(
                f.value
                for _, f in itertools.takewhile(
                    lambda cf: not isinstance(cf[1], commands.Basic.Deliver), frames[i + 2 :]
                )
                if isinstance(f, ContentBody)
            )
            out.append(
                (
                    frame.consumer_tag,
                    frame.delivery_tag,
                    frame.redelivered,
                    frame.exchange,
                    frame.routing_key,
                    body,
                )
            )
    return out


def marshalled(frames: list[tuple[int, object]]) -> bytes:
    return b"".join(pamqp.frame.marshal(f, c) for c, f in frames)  # type: ignore[arg-type]


async def test_deliveries_of_a_registered_channel_are_handed_out_whole_and_in_order():
    data = marshalled(deliveries())
    got, others = await connection_reading([data], StubChannel())
    assert as_sent(got) == wanted()
    ways = {
        item[0].delivery_tag if how == "aiormq" else item.delivery_tag: how for how, item in got
    }  # type: ignore[index,attr-defined]
    assert ways[9] == "aiormq", "a body of many frames goes the way aiormq reads it"
    assert 17 not in ways, "a delivery for a consumer the channel does not know is dropped"
    assert sum(how == "direct" for how in ways.values()) == len(ways) - 1
    kinds = [(c, type(f).__name__) for c, f in others if not isinstance(f, heartbeat.Heartbeat)]
    assert kinds == [(2, "Ack")] * 4, "the other channels' frames come out as they were"


@hsettings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=400_000), max_size=60))
def test_deliveries_keep_their_order_however_the_bytes_arrive(cuts):
    """Whole deliveries are handed out directly, split ones go through the channel's queue:
    the consumer gets every delivery once, whole, in the order the broker sent them."""
    data = marshalled(deliveries())

    async def go() -> list[tuple[str, object]]:
        got, _ = await connection_reading(split(data, cuts), StubChannel())
        return got

    assert as_sent(asyncio.run(go())) == wanted()


async def test_a_delivery_behind_a_queued_frame_waits_for_the_channel_reader():
    """The channel's reader gets one turn of the loop to take what is queued; if the queue
    still holds a frame after it, the delivery goes through the queue, behind it."""
    channel = StubChannel()
    one = marshalled(
        [
            (1, commands.Basic.Deliver("ctag", 5, False, "x", "k")),
            (1, ContentHeader(0, 2)),
            (1, ContentBody(b"{}")),
        ]
    )
    channel.frames.put_nowait(commands.Basic.Deliver("ctag", 4, False, "x", "k"))  # stuck
    got, _ = await connection_reading([one], channel, channel_reader=False)
    assert got == [], "handed out ahead of a delivery still in the queue"
    assert channel.frames.qsize() == 4  # the stuck one, then tag 5's three frames behind it

    channel = StubChannel()
    channel.frames.put_nowait(commands.Basic.Deliver("ctag", 4, False, "x", "k"))
    channel.frames.put_nowait(ContentHeader(0, 2))
    channel.frames.put_nowait(ContentBody(b"{}"))
    got, _ = await connection_reading([one], channel)
    ways = [how for how, _ in got]
    assert list(zip(ways, [sent[1] for sent in as_sent(got)], strict=True)) == [
        ("aiormq", 4),
        ("direct", 5),
    ]


async def test_a_closed_channel_or_a_reused_number_is_read_the_aiormq_way():
    data = marshalled(deliveries()[:3])  # tag 1, whole
    closed = StubChannel()
    closed.is_closed = True
    got, _ = await connection_reading([data], closed)
    assert [how for how, _ in got] == ["aiormq"]
    reused = StubChannel()
    reused.connection.channels[1] = StubChannel()  # the number is another channel's now
    got, _ = await connection_reading([data], reused)
    assert [how for how, _ in got] == ["aiormq"]


async def test_handing_out_gives_the_connection_a_frame_before_waiting():
    """aiormq's connection judges the socket dead by the time of the last frame it got: after
    handing deliveries out, the reader returns a heartbeat frame before it waits to read."""
    channel = StubChannel()
    taken: list[object] = []
    reader = reader_of([marshalled(deliveries()[:6])], eof=False)  # tags 1 and 2
    receiver = BufferedFrameReceiver(reader)
    receiver.deliver_directly(channel, taken.append)  # type: ignore[arg-type]
    _, number, frame = await receiver.get_frame()
    assert (number, type(frame)) == (0, heartbeat.Heartbeat)
    assert [d.delivery_tag for d in taken] == [1, 2]  # type: ignore[attr-defined]
    pending = asyncio.ensure_future(receiver.get_frame())
    await reading(reader)
    assert not pending.done()
    pending.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await pending


async def test_a_failing_take_is_logged_and_reading_goes_on(caplog):
    channel = StubChannel()
    seen: list[int] = []

    def take(delivery) -> None:  # type: ignore[no-untyped-def]
        seen.append(delivery.delivery_tag)
        raise RuntimeError("boom")

    receiver = BufferedFrameReceiver(reader_of([marshalled(deliveries()[:6])]))
    receiver.deliver_directly(channel, take)  # type: ignore[arg-type]
    [(number, frame)] = await read_all(receiver)
    assert (number, type(frame)) == (0, heartbeat.Heartbeat)
    assert seen == [1, 2]
    assert caplog.text.count("taking a delivery failed") == 2


async def test_a_short_content_header_is_refused_as_aiormq_refuses_it():
    """A delivery whose header frame is too short to read is not handed out: pamqp reads it
    and the error is aiormq's, whether or not the header is the last thing in the buffer."""
    deliver = pamqp.frame.marshal(commands.Basic.Deliver("ctag", 1, False, "x", "k"), 1)
    short = bytes([2, 0, 1, 0, 0, 0, 4, 0, 0x3C, 0, 0, 0xCE])  # 4 bytes of a 14-byte header
    body = pamqp.frame.marshal(ContentBody(b"{}"), 1)
    for data in (deliver + short, deliver + short + body):
        receiver = BufferedFrameReceiver(reader_of([data]))
        taken: list[object] = []
        receiver.deliver_directly(StubChannel(), taken.append)  # type: ignore[arg-type]
        _, _, frame = await receiver.get_frame()
        assert isinstance(frame, commands.Basic.Deliver) and taken == []
        with pytest.raises(aiormq.exceptions.InvalidFrameError, match="ContentHeader"):
            await receiver.get_frame()
